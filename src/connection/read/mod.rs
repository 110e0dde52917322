//! Reading a request, two ways, over one decode ([`crate::packet::decode`], then the environ).
//!
//! Files: `fast` (plain sockets only: an app thread decodes a request already queued whole from a peek and runs
//! it on the spot), `pending` (the async side, one path for plain and TLS: the rest of the vars block, the
//! ping, the refusals, the request's span), `body` (the body, in memory or spooled to a file), `transport`
//! (the stream `pending` reads: a plain socket, peeked, or a TLS session, read), `handshake` (a tls://
//! connection's handshake in front of `pending`), and `open` (what they share: the decoded packet made into an
//! environ, the spans, the errors).
//!
//! Anything the fast path cannot run (a request still arriving, a body to spool, a ping, a request the server
//! refuses, every TLS connection) goes to the async side, which reads it with timeouts and without holding an
//! app thread, then hands the request to the next free app thread.

mod body;
mod fast;
mod handshake;
mod open;
mod pending;
mod transport;

pub(crate) use fast::{Arrival, read_if_whole};
pub(crate) use handshake::read_pending_tls;
pub(crate) use pending::read_pending;
