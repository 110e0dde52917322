//! What both read paths share: a decoded request packet made into an environ (the one decode, then
//! [`Environ::from_vars`]) and why a connection yields no request.

use std::io;
use std::time::Duration;

use bytes::Bytes;

use crate::connection::access::RequestInfo;
use crate::environ::{Environ, EnvironError};
use crate::packet::{PacketError, Var};

/// First look at a connection: a typical nginx packet (about 1 KiB of vars) fits with room to spare.
pub(super) const INITIAL_PEEK: usize = 8 * 1024;

/// Why a request was not handed to the app.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("peer closed the connection after {0} bytes of an incomplete packet")]
    Truncated(usize),
    #[error("malformed packet: {0}")]
    Malformed(PacketError),
    #[error("the peer did not send its request within {0:?}")]
    ReadTimeout(Duration),
    /// The body could not be written to its temporary file (a full disk, most likely).
    #[error("cannot spool the request body: {0}")]
    Spool(io::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Says once per worker that requests arrive without `REQUEST_METHOD`, which almost always means a `location`
/// that forwards with `uwsgi_pass` but lacks `include uwsgi_params;`.
pub(super) fn warn_about_defaults(environ: &Environ) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if environ.method_defaulted && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            path = %String::from_utf8_lossy(&environ.log_path),
            "a request came without REQUEST_METHOD, so the app sees GET (PEP 3333 needs a method): is \
             `include uwsgi_params;` missing from the nginx location? (said once per worker)"
        );
    }
}

/// A whole request packet, decoded by [`crate::packet::decode`], made into an environ. Logs nothing: the fast
/// path hands back what it cannot run, and the async side says what it does with it.
// Made once per connection and taken apart at once: boxing the environ would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub(super) enum Opening {
    /// The vars do not make an environ: 400.
    BadEnviron { error: EnvironError, request: RequestInfo },
    /// A request, its packet `packet_len` bytes long; the body follows.
    Request { environ: Environ, packet_len: usize },
}

/// Makes the environ of the packet decoded from `seen` (`vars` borrow from it, and `packet_len` is its length).
pub(super) fn open(seen: &Bytes, vars: &[Var<'_>], packet_len: usize) -> Opening {
    match Environ::from_vars(seen, vars) {
        Ok(environ) => Opening::Request { environ, packet_len },
        Err(error) => Opening::BadEnviron {
            error,
            request: RequestInfo::of_vars(seen, vars),
        },
    }
}
