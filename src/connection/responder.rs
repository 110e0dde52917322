//! The response side of a connection, driven by the app thread that runs the request (without the GIL): what
//! the app produces goes straight to the socket, waiting only while the socket is full, for at most
//! `--write-timeout` at a time. The connection ends with an ordinary close when the response is complete, else
//! with a reset (see the module doc of `connection`).

use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::poll::PollFlags;
use socket2::Socket;

use super::access::{RequestInfo, record};
use super::watchdog::Watch;
use super::{ConnShared, is_disconnect};
use crate::listener;

/// The connection is gone: the peer went away or stopped reading, or the request timed out. Already logged.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the connection is gone")]
pub struct Gone;

/// Most buffers per writev: Linux refuses more than IOV_MAX (1024) in one call.
const MAX_IOV: usize = 512;
/// Most bytes per sendfile(2) call: big enough to keep the socket buffer full.
const SENDFILE_CHUNK: u64 = 1 << 20;

/// Writes one response and ends its connection.
pub struct Responder {
    socket: Socket,
    tcp: bool,
    /// Request bytes still queued unread (see the module doc of `connection`), consumed when the response is
    /// complete.
    unread: usize,
    shared: Arc<ConnShared>,
    request: RequestInfo,
    started: Instant,
    /// Registered with the watchdog when there is a `--timeout`.
    watch: Option<Arc<Watch>>,
    /// A write failed and the peer is gone (already logged).
    gone: bool,
    /// The response was completed or aborted.
    ended: bool,
}

impl Responder {
    pub(super) fn new(
        socket: Socket,
        tcp: bool,
        unread: usize,
        shared: Arc<ConnShared>,
        request: RequestInfo,
        started: Instant,
        span: &tracing::Span,
    ) -> Responder {
        shared.metrics.request_started();
        shared.active.fetch_add(1, Ordering::SeqCst);
        let watch = shared
            .watchdog
            .as_ref()
            .map(|w| w.watch(socket.as_raw_fd(), tcp, unread, started, request.clone(), span.clone()));
        Responder {
            socket,
            tcp,
            unread,
            shared,
            request,
            started,
            watch,
            gone: false,
            ended: false,
        }
    }

    /// Names the Python thread that runs the request, for the stack dump of a request that times out.
    pub fn running_on(&self, thread: u64) {
        if let Some(watch) = &self.watch {
            watch.running_on(thread);
        }
    }

    /// Writes every buffer, in order, with as few writev calls as the socket allows.
    pub fn send(&mut self, bufs: &[&[u8]]) -> Result<(), Gone> {
        if self.gone {
            return Err(Gone);
        }
        let mut slices: Vec<IoSlice<'_>> = bufs.iter().filter(|b| !b.is_empty()).map(|b| IoSlice::new(b)).collect();
        let mut rest: &mut [IoSlice<'_>] = &mut slices;
        while !rest.is_empty() {
            let batch = rest.len().min(MAX_IOV);
            if let Some(n) = self.write_step(|socket| socket.send_vectored(&rest[..batch]))? {
                IoSlice::advance_slices(&mut rest, n);
            }
        }
        Ok(())
    }

    /// Sends `len` bytes of `file` from `offset` with sendfile(2): from the page cache to the socket without
    /// passing through this process.
    pub fn send_file(&mut self, file: &File, mut offset: u64, len: u64) -> Result<(), Gone> {
        if self.gone {
            return Err(Gone);
        }
        let end = offset.saturating_add(len);
        while offset < end {
            let count = (end - offset).min(SENDFILE_CHUNK) as usize;
            let step = self.write_step(|socket| listener::sendfile(socket.as_raw_fd(), file, &mut offset, count))?;
            if step == Some(0) {
                let short = io::Error::new(io::ErrorKind::UnexpectedEof, "file shorter than announced");
                return Err(self.lost(short));
            }
        }
        Ok(())
    }

    /// The app is done: the last bytes of the response follow. The worker's memory limit is checked now,
    /// before the client can have the answer and send its next request.
    pub fn finishing(&self) {
        self.shared.lifecycle.check_memory();
    }

    /// The response is complete: consume the rest of the request so the close is an ordinary end of the
    /// response, then count and log the request.
    pub fn complete(mut self, status: u16, body_bytes: u64) {
        self.conclude(status, body_bytes, true);
    }

    /// The response failed after its head was sent: reset the connection so nginx sees the truncation.
    pub fn abort(mut self, status: u16, body_bytes: u64) {
        self.conclude(status, body_bytes, false);
    }

    fn conclude(&mut self, status: u16, body_bytes: u64, complete: bool) {
        if !self.end() {
            return;
        }
        if complete {
            // Peeked earlier, so it is queued and this returns at once.
            if let Err(error) = listener::discard(&self.socket, self.unread) {
                tracing::debug!(%error, "cannot read the rest of the request");
            }
        } else {
            self.reset();
        }
        record(&self.shared, &self.request, status, body_bytes, self.started);
        self.shared.lifecycle.request_finished();
    }

    /// One non-blocking write: `Some(bytes written)`, or `None` after waiting for room (or an interrupted
    /// call), so the caller tries again. Fails when the connection is gone, which it logs.
    fn write_step(&mut self, op: impl FnOnce(&Socket) -> io::Result<usize>) -> Result<Option<usize>, Gone> {
        let socket = &self.socket;
        let result = match &self.watch {
            None => op(socket),
            // The watchdog answered the request (and logged it) while the app was still producing it.
            Some(watch) => match watch.write_on_time(|| op(socket)) {
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
        let stall = self.shared.config.write_timeout;
        match listener::wait_ready(self.socket.as_fd(), PollFlags::POLLOUT, stall) {
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
        let on_time = self.watch.as_ref().is_none_or(|w| w.end());
        if on_time {
            self.shared.active.fetch_sub(1, Ordering::SeqCst);
        }
        on_time
    }

    /// Makes the close that follows (dropping the socket) an error for the peer: an RST on TCP, ECONNRESET on a
    /// Unix socket, since the request's last byte is still unread.
    fn reset(&self) {
        if self.tcp {
            let _ = self.socket.set_linger(Some(Duration::ZERO));
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.shared.metrics.request_ended();
        if self.end() {
            if !self.gone {
                tracing::error!("the app thread ended the response without completing it; resetting");
            }
            self.reset();
        }
    }
}
