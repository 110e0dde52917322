//! The fast path, plain sockets only: an app thread that accepts a connection whose whole request is already
//! queued (nearly every request nginx forwards: it writes the request right after connecting) decodes it from
//! a peek and runs it on the spot, with no hand-off between threads and no event loop.

use std::cell::Cell;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use nix::poll::PollFlags;
use socket2::Socket;

use super::open::{INITIAL_PEEK, Opening, open, warn_about_defaults};
use crate::app::Request;
use crate::body::Body;
use crate::connection::access::RequestInfo;
use crate::connection::context::WorkerContext;
use crate::connection::responder::Responder;
use crate::connection::wire::Wire;
use crate::listener;
use crate::log_scope::{ConnSpan, LogScope};
use crate::packet::{self, Decoded};

/// How long an app thread that accepted a connection waits for its request before passing the connection to
/// the async side. nginx writes the request right after connecting, so this is the gap of a few microseconds
/// between its connect() and write(); a peer slower than this cannot hold an app thread.
const FIRST_BYTES_WAIT: Duration = Duration::from_millis(2);

/// What [`read_if_whole`] made of a freshly accepted connection.
// Made once per connection and taken apart at once: boxing the request would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Arrival {
    /// The whole request was there: run it.
    Whole(Request),
    /// Not (yet) a request this thread can run: nothing was consumed; the async side
    /// ([`read_pending`](super::read_pending)) takes it from here, in the connection's span.
    Pending(Socket, ConnSpan),
}

/// On the app thread that accepted the connection: if the whole request is queued in the socket, decode it
/// from a peek and make the request; otherwise hand the connection back untouched. Nothing is consumed until
/// the response is complete (then the whole request is, in one read): a request seen whole takes one peek and
/// one read, and an aborted response still closes with the request unread, so nginx sees a reset.
pub(crate) fn read_if_whole(socket: Socket, tcp: bool, conn: ConnSpan, ctx: &Arc<WorkerContext>) -> Arrival {
    let started = Instant::now();
    let mut buf = PEEK_BUFFER.take();
    let mut n = peek(&socket, &mut buf);
    if n.is_none() {
        // nginx writes the request right after connect() returns, so it is usually microseconds away: let
        // nginx run if it shares this core, and only then sleep in poll (which costs two context switches).
        std::thread::yield_now();
        n = peek(&socket, &mut buf);
    }
    if n.is_none()
        && matches!(
            listener::wait_ready(socket.as_fd(), PollFlags::POLLIN, FIRST_BYTES_WAIT),
            Ok(true)
        )
    {
        n = peek(&socket, &mut buf);
    }
    let seen = buf.split().freeze();
    PEEK_BUFFER.set(buf);
    if n.is_none() {
        return Arrival::Pending(socket, conn);
    }
    let config = &ctx.config;
    let Ok(Decoded::Request { packet, len }) = packet::decode(&seen, config.limits.max_vars_size) else {
        return Arrival::Pending(socket, conn);
    };
    let Opening::Request { environ, packet_len } = open(&seen, &packet.vars, len) else {
        return Arrival::Pending(socket, conn);
    };
    let body_len = environ.content_length;
    if body_len > config.limits.body_buffer_size || config.limits.max_body_size.is_some_and(|limit| body_len > limit) {
        return Arrival::Pending(socket, conn);
    }
    let total = usize::try_from(body_len).ok().and_then(|b| packet_len.checked_add(b));
    let Some(total) = total.filter(|&total| total <= seen.len()) else {
        return Arrival::Pending(socket, conn);
    };
    ctx.metrics.received(total as u64);
    warn_about_defaults(&environ);
    let body = Body::Memory(seen.slice(packet_len..total));
    let request = RequestInfo::of(&environ, config.logs.access_log);
    // The request's span is made only if a line is written in it (or a watchdog may write one).
    let mut scope = LogScope::deferred(conn, environ.method.clone(), environ.log_path.clone());
    let wire = Wire::new(socket, tcp, total);
    let sink = Responder::new(wire, Arc::clone(ctx), request, started, &mut scope);
    Arrival::Whole(Request {
        environ,
        body,
        scope,
        sink: Box::new(sink),
    })
}

thread_local! {
    /// The app thread's buffer for peeks. What a request was decoded from is split off it, and the next peek
    /// reuses the same memory once that request has let go of it, so a request takes no allocation for its
    /// packet (a request still holding it when the next one comes gets a new buffer instead).
    static PEEK_BUFFER: Cell<BytesMut> = Cell::new(BytesMut::new());
}

/// Peeks at what is queued, without waiting, into `buf` (with room for at least [`INITIAL_PEEK`] bytes; what
/// it held is replaced), which then holds it; `None` when nothing is queued (or the peer already closed).
fn peek(socket: &Socket, buf: &mut BytesMut) -> Option<usize> {
    buf.reserve(INITIAL_PEEK);
    match listener::peek_now(socket, buf) {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(n),
    }
}
