//! The response side of a connection, driven by the app thread that runs the request (without the GIL): the
//! app's [`ResponseSink`]. What the app produces goes straight to the socket, waiting only while the socket is
//! full, for at most `--write-timeout` at a time. The connection ends with an ordinary close when the response
//! is complete, else with a reset (see the module doc of `connection`).

use std::fs::File;
use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::access::{RequestInfo, record};
use super::context::WorkerContext;
use super::watchdog::Watch;
use super::wire::{Wire, is_disconnect};
use crate::app::{Gone, ResponseSink};
use crate::lifecycle::InFlightGuard;
use crate::log_scope::LogScope;

/// Most buffers per writev: Linux refuses more than IOV_MAX (1024) in one call.
const MAX_IOV: usize = 512;
/// Most bytes per sendfile(2) call: big enough to keep the socket buffer full.
const SENDFILE_CHUNK: u64 = 1 << 20;

/// Writes one response and ends its connection.
pub(crate) struct Responder {
    /// Declared first, so it is dropped (the connection closed) before `watch` and `in_flight` let go of the
    /// request's place in the count of work in flight: a stopping worker must not exit between the response's
    /// last bytes and the close, which would reset the connection with the rest of the request unread.
    wire: Wire,
    ctx: Arc<WorkerContext>,
    request: RequestInfo,
    started: Instant,
    /// Registered with the watchdog when there is a `--timeout` (which then holds `in_flight`).
    watch: Option<Arc<Watch>>,
    /// The request's place in the worker's count of work in flight, without a watchdog; let go when this is
    /// dropped, after the connection is closed.
    _in_flight: Option<InFlightGuard>,
    /// A write failed and the peer is gone (already logged).
    gone: bool,
    /// The response was completed or aborted.
    ended: bool,
}

impl Responder {
    pub(crate) fn new(
        wire: Wire,
        ctx: Arc<WorkerContext>,
        request: RequestInfo,
        started: Instant,
        scope: &mut LogScope,
    ) -> Responder {
        ctx.metrics.request_started();
        let in_flight = ctx.in_flight.enter();
        let (watch, in_flight) = match &ctx.watchdog {
            Some(w) => (
                Some(w.watch(wire.takeover(), started, request.clone(), scope.span(), in_flight)),
                None,
            ),
            None => (None, Some(in_flight)),
        };
        Responder {
            wire,
            ctx,
            request,
            started,
            watch,
            _in_flight: in_flight,
            gone: false,
            ended: false,
        }
    }

    /// Writes `last` and ends the response: complete (consuming the rest of the request so the close is an
    /// ordinary end) or aborted (a reset). The worker's memory limit is checked first, before the client can
    /// have the answer and send its next request.
    fn end_with(mut self, last: &[&[u8]], status: u16, body_bytes: u64, complete: bool) -> Result<(), Gone> {
        self.ctx.lifecycle.check_memory();
        // The request is consumed only after the last write. Consuming it earlier, so the close would follow
        // the write at once, was measured to cost more: reading the request frees room in nginx's send buffer,
        // which wakes nginx (it waits for its upstream socket to be writable too) while it has nothing to do,
        // two context switches more per request in nginx on the Flask view. After the last write nginx is
        // being woken for the response anyway.
        self.send(last)?;
        if !self.end() {
            return Ok(());
        }
        if complete {
            if let Err(error) = self.wire.finish(self.ctx.config.limits.write_timeout) {
                if self.wire.is_tls() {
                    // Through TLS the end of the response was still in the session: it did not go out, so the
                    // response is cut short, and no close_notify says otherwise.
                    tracing::warn!(%error, "the peer did not take the end of the response; dropping it");
                    self.wire.reset(Duration::ZERO);
                } else {
                    tracing::debug!(%error, "cannot read the rest of the request");
                }
            }
        } else {
            self.wire.reset(self.ctx.config.limits.write_timeout);
        }
        record(
            &self.ctx.config,
            &self.ctx.metrics,
            &self.request,
            status,
            body_bytes,
            self.started,
        );
        self.ctx.lifecycle.request_finished();
        Ok(())
    }

    /// One non-blocking write: `Some(bytes written)`, or `None` after waiting for room (or an interrupted
    /// call), so the caller tries again. Fails when the connection is gone, which it logs.
    fn write_step(&mut self, op: impl FnOnce(&Wire) -> io::Result<usize>) -> Result<Option<usize>, Gone> {
        let wire = &self.wire;
        let result = match &self.watch {
            None => op(wire),
            // The watchdog answered the request (and logged it) while the app was still producing it.
            Some(watch) => match watch.write_on_time(|| op(wire)) {
                Some(result) => result,
                None => {
                    self.gone = true;
                    return Err(Gone);
                }
            },
        };
        match result {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait_writable().map(|()| None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(self.lost(e)),
        }
    }

    fn wait_writable(&mut self) -> Result<(), Gone> {
        let stall = self.ctx.config.limits.write_timeout;
        match self.wire.wait_writable(stall) {
            Ok(true) => Ok(()),
            Ok(false) => Err(self.stalled(stall)),
            Err(e) => Err(self.lost(e)),
        }
    }

    fn stalled(&mut self, stall: Duration) -> Gone {
        self.gone = true;
        tracing::warn!(timeout = ?stall, "the peer stopped reading the response; dropping it");
        Gone
    }

    fn lost(&mut self, error: io::Error) -> Gone {
        self.gone = true;
        if is_disconnect(&error) {
            tracing::debug!(%error, "peer went away");
        } else {
            tracing::warn!(%error, "closing connection");
        }
        Gone
    }

    /// Marks the response ended; false if the watchdog already answered it, leaving nothing to do.
    fn end(&mut self) -> bool {
        if self.ended {
            return false;
        }
        self.ended = true;
        self.watch.as_ref().is_none_or(|w| w.end())
    }
}

impl ResponseSink for Responder {
    fn running_on(&self, python_thread: u64) {
        if let Some(watch) = &self.watch {
            watch.running_on(python_thread);
        }
    }

    /// Writes every buffer, in order, with as few writev calls as the socket allows.
    fn send(&mut self, bufs: &[&[u8]]) -> Result<(), Gone> {
        if self.gone {
            return Err(Gone);
        }
        let mut slices: Vec<IoSlice<'_>> = bufs.iter().filter(|b| !b.is_empty()).map(|b| IoSlice::new(b)).collect();
        let mut rest: &mut [IoSlice<'_>] = &mut slices;
        while !rest.is_empty() {
            let batch = rest.len().min(MAX_IOV);
            if let Some(n) = self.write_step(|wire| wire.write_vectored(&rest[..batch]))? {
                IoSlice::advance_slices(&mut rest, n);
            }
        }
        Ok(())
    }

    /// Sends with sendfile(2): from the page cache to the socket without passing through this process.
    fn send_file(&mut self, file: &File, mut offset: u64, len: u64) -> Result<(), Gone> {
        if self.gone {
            return Err(Gone);
        }
        let end = offset.saturating_add(len);
        while offset < end {
            let count = (end - offset).min(SENDFILE_CHUNK) as usize;
            let step = self.write_step(|wire| wire.send_file(file, &mut offset, count))?;
            if step == Some(0) {
                let short = io::Error::new(io::ErrorKind::UnexpectedEof, "file shorter than announced");
                return Err(self.lost(short));
            }
        }
        Ok(())
    }

    fn complete(self: Box<Self>, last: &[&[u8]], status: u16, body_bytes: u64) -> Result<(), Gone> {
        (*self).end_with(last, status, body_bytes, true)
    }

    fn abort(self: Box<Self>, last: &[&[u8]], status: u16, body_bytes: u64) -> Result<(), Gone> {
        (*self).end_with(last, status, body_bytes, false)
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.ctx.metrics.request_ended();
        if self.end() {
            if !self.gone {
                tracing::error!("the app thread ended the response without completing it; resetting");
            }
            // A peer that is gone or stopped reading gets no more waiting.
            let stall = if self.gone {
                Duration::ZERO
            } else {
                self.ctx.config.limits.write_timeout
            };
            self.wire.reset(stall);
        }
    }
}
