//! What the app layer needs from the layers above it, as interfaces it defines: a request in (from a
//! [`RequestSource`]) and a response sink out ([`ResponseSink`]). The connection implements both; the app
//! never sees a socket.

use std::fs::File;

use crate::body::Body;
use crate::environ::Environ;
use crate::log_scope::LogScope;

/// The connection is gone: the peer went away or stopped reading, or the request timed out. Already logged.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the connection is gone")]
pub(crate) struct Gone;

/// One request for an app thread, and where its response goes.
pub(crate) struct Request {
    pub(crate) environ: Environ,
    pub(crate) body: Body,
    /// The request's span (made when first needed), entered on the app thread so its log lines carry the
    /// request's fields.
    pub(crate) scope: LogScope,
    pub(crate) sink: Box<dyn ResponseSink>,
}

/// Where an app thread gets its requests.
pub(crate) trait RequestSource: Send {
    /// The next request to run, waiting for one as long as it takes; `None` ends the thread. Called without
    /// the GIL.
    fn next(&mut self) -> Option<Request>;
}

/// Where a response goes, written by the app thread without the GIL, as the app produces it. Each call
/// returns when its bytes are written (or the connection is gone).
pub(crate) trait ResponseSink: Send + Sync {
    /// Names the Python thread (`threading.get_ident()`) running the request, for the stack dump of a request
    /// that times out.
    fn running_on(&self, python_thread: u64);

    /// Writes every buffer, in order.
    fn send(&mut self, bufs: &[&[u8]]) -> Result<(), Gone>;

    /// Sends `len` bytes of `file` from `offset`.
    fn send_file(&mut self, file: &File, offset: u64, len: u64) -> Result<(), Gone>;

    /// Writes the response's last bytes and ends it as a complete response; `status` and `body_bytes` are
    /// for the access log and the metrics.
    fn complete(self: Box<Self>, last: &[&[u8]], status: u16, body_bytes: u64) -> Result<(), Gone>;

    /// Writes `last`, then ends the response as broken (the app failed after the head went out, or sent less
    /// than its Content-Length), so nginx does not pass it off as complete.
    fn abort(self: Box<Self>, last: &[&[u8]], status: u16, body_bytes: u64) -> Result<(), Gone>;
}
