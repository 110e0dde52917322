//! The TLS session-ticket keys every worker of a tls:// socket shares, so a session resumes on any worker:
//! the master makes each period's keys and hands them down the control lines, to a new worker before it
//! serves and to every worker when a new period begins.

use std::os::unix::net::UnixStream;

use crate::config::Config;
use crate::control;
use crate::tls::TicketKeyRing;

use super::error::LOG;
use super::workers::Workers;

#[derive(Default)]
pub(super) struct Tickets {
    ring: TicketKeyRing,
}

impl Tickets {
    /// With tls:// sockets: writes the current keys on a new worker's control line, where the worker reads
    /// them before it serves.
    pub(super) fn send_to_new(
        &mut self,
        line: &UnixStream,
        config: &Config,
        workers: &mut Workers,
    ) -> std::io::Result<()> {
        if config.tls.files.is_none() {
            return Ok(());
        }
        // A new period's keys go to the other workers too, not only to this one.
        self.rotate(config, workers);
        control::send_ticket_keys(line, self.ring.keys())
    }

    /// With tls:// sockets: when a new ticket period has begun, makes its keys and sends them to every worker.
    /// Each worker already holds the key of the period that just began, so nothing waits for this.
    pub(super) fn rotate(&mut self, config: &Config, workers: &mut Workers) {
        if config.tls.files.is_none()
            || !self
                .ring
                .advance(crate::tls::current_period(config.tls.ticket_rotation))
        {
            return;
        }
        tracing::info!(target: LOG, "session-ticket keys rotated");
        for (id, worker) in workers.iter_mut() {
            let Some(line) = &worker.control else { continue };
            if let Err(error) = control::send_ticket_keys(line, self.ring.keys()) {
                // The line is non-blocking (it is shared with its reader): a worker that has not read for so
                // long that its socket is full may hold part of a line, so it gets no more. It keeps sealing
                // with the keys it has until they run out, then makes full handshakes until it is replaced.
                tracing::warn!(target: LOG, worker = id.get(), %error, "cannot send the new session-ticket keys; this worker gets no more");
                worker.control = None;
            }
        }
    }
}
