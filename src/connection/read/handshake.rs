//! A tls:// connection on the async side: what is not TLS at all is named and closed, the handshake runs
//! within `--read-timeout`, and the request is then read by the same path as a plain one, by the same
//! deadline. Nothing can be peeked through TLS, so the request is read whole, and the response ends with
//! close_notify (complete) or a fatal alert (aborted).

use std::sync::Arc;
use std::time::Instant;

use socket2::Socket;

use super::pending;
use super::transport::TlsStream;
use crate::app::Request;
use crate::connection::context::WorkerContext;
use crate::tls::HandshakeFailure;

/// The handshake, then the request. Returns the request for an app thread, if there is one to run.
pub(crate) async fn read_pending_tls(socket: Socket, ctx: Arc<WorkerContext>) -> Option<Request> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + ctx.config.limits.read_timeout;
    let tcp = std::net::TcpStream::from(std::os::fd::OwnedFd::from(socket));
    let tcp = match tokio::net::TcpStream::from_std(tcp) {
        Ok(tcp) => tcp,
        Err(error) => {
            tracing::error!(%error, "cannot register a connection with the runtime");
            return None;
        }
    };
    let tls = handshake(tcp, &ctx, deadline).await?;
    pending::read(tls, &ctx, started, deadline).await
}

/// Says what made a handshake fail, and counts it.
fn failed(ctx: &WorkerContext, why: HandshakeFailure, detail: &dyn std::fmt::Display) {
    ctx.metrics.tls_handshake_failed(why);
    tracing::warn!(reason = why.as_str(), "TLS handshake failed: {detail}; closing");
}

/// Runs the handshake by `deadline`, after a look at the first bytes: what is not TLS at all gets a line
/// saying what it is (plain uwsgi, HTTP), not a handshake error. `None` (logged) when it fails.
async fn handshake(
    tcp: tokio::net::TcpStream,
    ctx: &WorkerContext,
    deadline: tokio::time::Instant,
) -> Option<TlsStream> {
    let Some(tls_config) = ctx.tls.clone() else {
        tracing::error!("a tls:// connection, but this worker has no TLS configuration");
        return None;
    };
    let mut first = [0u8; 16];
    match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
        Ok(Ok(0)) => {
            // Connected and closed: a port probe or a health check, not a failed client.
            ctx.metrics.tls_handshake_failed(HandshakeFailure::Closed);
            tracing::debug!("closed before a TLS handshake began");
            return None;
        }
        Ok(Ok(n)) => {
            if let Some(why) = HandshakeFailure::of_first_bytes(&first[..n]) {
                failed(ctx, why, &not_tls_advice(why));
                return None;
            }
        }
        Ok(Err(error)) => {
            ctx.metrics.tls_handshake_failed(HandshakeFailure::Closed);
            tracing::debug!(%error, "peer went away before a TLS handshake");
            return None;
        }
        Err(_) => {
            failed(ctx, HandshakeFailure::Timeout, &"nothing sent within --read-timeout");
            return None;
        }
    }
    let accept = tokio_rustls::TlsAcceptor::from(tls_config).accept(tcp);
    let tls = match tokio::time::timeout_at(deadline, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            failed(ctx, HandshakeFailure::of(&error), &HandshakeFailure::explain(&error));
            return None;
        }
        Err(_) => {
            failed(ctx, HandshakeFailure::Timeout, &"not done within --read-timeout");
            return None;
        }
    };
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    ctx.metrics.tls_handshake_done(resumed);
    Some(tls)
}

/// What to tell the operator about first bytes that are not TLS.
fn not_tls_advice(why: HandshakeFailure) -> &'static str {
    match why {
        HandshakeFailure::PlainUwsgi => {
            "plain uwsgi sent to a tls:// socket: nginx needs uwsgi_pass suwsgi://host:port (and the \
             uwsgi_ssl_* settings)"
        }
        HandshakeFailure::Http => "HTTP sent to a tls:// socket: it speaks uwsgi over TLS for nginx's suwsgi://",
        _ => "not TLS: this tls:// socket speaks uwsgi over TLS for nginx's suwsgi://",
    }
}
