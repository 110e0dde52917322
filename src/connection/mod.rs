//! One connection: read the request, hand it to an app thread, and carry the response back. This module owns
//! the socket in both directions and implements the app's [`ResponseSink`](crate::app::ResponseSink); it also
//! answers requests past `--timeout` and writes the access log.
//!
//! Files, in the order of the flow: `read/` (the fast path on the app thread for plain sockets, and one async
//! read path, generic over the stream, for plain and TLS connections alike: see its module doc), `wire` (the
//! socket as the response side uses it), `tls_wire` (rustls under `wire` for tls:// connections: sealing,
//! close_notify, the fatal alert of an aborted response), `responder` (the response sink), `watchdog`
//! (`--timeout`), `access` (the access log and the per-request counters), `context` (what every connection of
//! a worker shares).
//!
//! Part of the request (at least its last byte) is peeked, not read, until the response is complete. Closing a
//! socket with unread data makes the kernel report an error to the peer (an RST on TCP, ECONNRESET on a Unix
//! socket), so an aborted response reaches nginx as an upstream error instead of a clean end of a truncated
//! body; a complete response consumes the rest first and ends with an ordinary close.

mod access;
mod context;
mod read;
mod responder;
mod tls_wire;
mod watchdog;
mod wire;

use std::sync::Arc;

pub(crate) use context::WorkerContext;
pub(crate) use read::{Arrival, read_if_whole, read_pending, read_pending_tls};

/// Answers the requests that run past `--timeout`, for the life of the worker (returns at once without one).
pub(crate) async fn watch_timeouts(ctx: Arc<WorkerContext>) {
    if let Some(watchdog) = &ctx.watchdog {
        watchdog::run(watchdog, &ctx.config, &ctx.metrics, &ctx.lifecycle).await;
    }
}
