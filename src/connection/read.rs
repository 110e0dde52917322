//! Reading a request, two ways, over one decode ([`packet::decode`], then the environ).
//!
//! An app thread that accepts a connection whose whole request is already queued (nearly every request nginx
//! forwards: it writes the request right after connecting) decodes it from a peek and runs it on the spot: no
//! hand-off between threads and no event loop ([`read_if_whole`]). Anything else (a request still arriving, a
//! body to spool, a ping, a request the server refuses) goes to the async side ([`read_pending`]), which reads
//! it with timeouts and without holding an app thread, then hands the request to the next free app thread.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use nix::poll::PollFlags;
use socket2::Socket;
use tokio::io::AsyncWriteExt;
use tracing::Instrument;

use super::access::{RequestInfo, record};
use super::context::WorkerContext;
use super::responder::Responder;
use super::wire::{Wire, is_disconnect};
use crate::app::Request;
use crate::body::Body;
use crate::config::Config;
use crate::environ::{Environ, EnvironError};
use crate::listener::{self, Stream};
use crate::packet::{self, Decoded, PacketError};
use crate::tls::HandshakeFailure;

/// First peek size: a typical nginx packet (about 1 KiB of vars) fits with room to spare.
const INITIAL_PEEK: usize = 8 * 1024;
/// Read size while spooling a large body to its file.
const SPOOL_CHUNK: usize = 256 * 1024;
/// After the server answers a request it refused, it reads and drops what the peer still sends for at most
/// this long, so the answer is not lost to a reset.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 4 << 20;
/// How long an app thread that accepted a connection waits for its request before passing the connection to
/// the async side. nginx writes the request right after connecting, so this is the gap of a few microseconds
/// between its connect() and write(); a peer slower than this cannot hold an app thread.
const FIRST_BYTES_WAIT: Duration = Duration::from_millis(2);

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

/// The span of one connection.
pub(crate) fn conn_span(peer: Option<SocketAddr>, listener: &str) -> tracing::Span {
    match peer {
        Some(addr) => tracing::info_span!("conn", peer = %addr, listener),
        None => tracing::info_span!("conn", peer = "unix", listener),
    }
}

fn request_span(environ: &Environ) -> tracing::Span {
    tracing::info_span!(
        "request",
        method = %String::from_utf8_lossy(&environ.method),
        path = %String::from_utf8_lossy(&environ.log_path),
    )
}

/// Says once per worker that requests arrive without `REQUEST_METHOD`, which almost always means a `location`
/// that forwards with `uwsgi_pass` but lacks `include uwsgi_params;`.
fn warn_about_defaults(environ: &Environ) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if environ.method_defaulted && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            path = %String::from_utf8_lossy(&environ.log_path),
            "a request came without REQUEST_METHOD, so the app sees GET (PEP 3333 needs a method): is \
             `include uwsgi_params;` missing from the nginx location? (said once per worker)"
        );
    }
}

/// A request decoded from the bytes seen so far of a connection, packet and environ: the decode both read
/// paths share. Logs nothing: the fast path hands back whatever is not a plain request, and the async side
/// says what it does with it.
// Made once per connection and taken apart at once: boxing the environ would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Opening {
    /// Not a whole WSGI request packet (yet): see [`Decoded`] for what else it can be.
    NotARequest,
    /// The vars do not make an environ: 400.
    BadEnviron { error: EnvironError, request: RequestInfo },
    /// A request, its packet `packet_len` bytes long; the body follows.
    Request { environ: Environ, packet_len: usize },
}

fn open(seen: &Bytes, config: &Config) -> Result<Opening, PacketError> {
    Ok(match packet::decode(seen, config.limits.max_vars_size)? {
        Decoded::Incomplete { .. } | Decoded::Ping { .. } | Decoded::Unsupported { .. } | Decoded::TooLarge { .. } => {
            Opening::NotARequest
        }
        Decoded::Request { packet, len } => match Environ::from_vars(seen, &packet.vars) {
            Ok(environ) => Opening::Request {
                environ,
                packet_len: len,
            },
            Err(error) => Opening::BadEnviron {
                error,
                request: RequestInfo::of_vars(seen, &packet.vars),
            },
        },
    })
}

/// What [`read_if_whole`] made of a freshly accepted connection.
// Made once per connection and taken apart at once: boxing the request would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Arrival {
    /// The whole request was there: run it.
    Whole(Request),
    /// Not (yet) a request this thread can run: nothing was consumed; [`read_pending`] takes it from here.
    Pending(Socket),
}

/// The fast path, on the app thread that accepted the connection: if the whole request is queued in the
/// socket, decode it from a peek and make the request; otherwise hand the connection back untouched. Nothing
/// is consumed until the response is complete (then the whole request is, in one read): a request seen whole
/// takes one peek and one read, and an aborted response still closes with the request unread, so nginx sees
/// a reset.
pub(crate) fn read_if_whole(socket: Socket, tcp: bool, span: tracing::Span, ctx: &Arc<WorkerContext>) -> Arrival {
    let started = Instant::now();
    let mut buf = Vec::with_capacity(INITIAL_PEEK);
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
    if n.is_none() {
        return Arrival::Pending(socket);
    }
    let seen = Bytes::from(buf);
    let config = &ctx.config;
    let Ok(Opening::Request { environ, packet_len }) = open(&seen, config) else {
        return Arrival::Pending(socket);
    };
    let body_len = environ.content_length;
    if body_len > config.limits.body_buffer_size || config.limits.max_body_size.is_some_and(|limit| body_len > limit) {
        return Arrival::Pending(socket);
    }
    let total = usize::try_from(body_len).ok().and_then(|b| packet_len.checked_add(b));
    let Some(total) = total.filter(|&total| total <= seen.len()) else {
        return Arrival::Pending(socket);
    };
    ctx.metrics.received(total as u64);
    warn_about_defaults(&environ);
    let body = Body::Memory(seen.slice(packet_len..total));
    let request = RequestInfo::of(&environ, config.logs.access_log);
    let span = {
        let _conn = span.enter();
        request_span(&environ)
    };
    let wire = Wire::new(socket, tcp, total);
    let sink = Responder::new(wire, Arc::clone(ctx), request, started, &span);
    Arrival::Whole(Request {
        environ,
        body,
        span,
        sink: Box::new(sink),
    })
}

/// Peeks at what is queued, without waiting, into `buf`'s spare capacity (which it then holds); `None` when
/// nothing is queued (or the peer already closed).
fn peek(socket: &Socket, buf: &mut Vec<u8>) -> Option<usize> {
    match listener::peek_now(socket, buf) {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(n),
    }
}

/// The async side: reads a connection the fast path handed back, within `--read-timeout`, and answers what
/// the server answers itself (pings, refusals). Returns the request for an app thread, if there is one to run.
pub(crate) async fn read_pending(socket: Socket, tcp: bool, ctx: Arc<WorkerContext>) -> Option<Request> {
    let started = Instant::now();
    let stream = match Stream::from_socket(socket, tcp) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::error!(%error, "cannot register a connection with the runtime");
            return None;
        }
    };
    match read_request(stream, tcp, &ctx, started).await {
        Ok(request) => request,
        Err(ConnError::Io(error)) if is_disconnect(&error) => {
            tracing::debug!(%error, "peer went away");
            None
        }
        Err(error) => {
            tracing::warn!(%error, "closing connection");
            None
        }
    }
}

/// The header and vars block, peeked (still queued in the kernel).
struct Peeked {
    /// Everything the peek saw, which for most requests is the whole request, last byte included.
    seen: Bytes,
    environ: Environ,
    packet_len: usize,
}

/// How the start of a connection turned out.
enum Start {
    Request(Peeked),
    /// A ping, answered; or not a WSGI request, logged and closed.
    Answered,
    /// A request the server answers itself with this status.
    Refuse(u16, RequestInfo),
    /// The peer connected and closed without sending anything (a port probe, a TCP health check).
    Empty,
}

async fn read_request(
    mut stream: Stream,
    tcp: bool,
    ctx: &Arc<WorkerContext>,
    started: Instant,
) -> Result<Option<Request>, ConnError> {
    let config = &ctx.config;
    let deadline = tokio::time::Instant::now() + config.limits.read_timeout;
    let timeout = |_: tokio::time::error::Elapsed| ConnError::ReadTimeout(config.limits.read_timeout);

    let peeked = match tokio::time::timeout_at(deadline, read_packet(&mut stream, config))
        .await
        .map_err(timeout)??
    {
        Start::Request(p) => p,
        Start::Answered => return Ok(None),
        Start::Refuse(status, request) => {
            return refuse(&mut stream, ctx, status, &request, started).await.map(|()| None);
        }
        Start::Empty => {
            tracing::debug!("peer closed without sending a request");
            return Ok(None);
        }
    };
    let environ = &peeked.environ;
    if let Some(request) = body_over_limit(environ, config) {
        return refuse(&mut stream, ctx, 413, &request, started).await.map(|()| None);
    }
    let span = request_span(environ);
    async move {
        let environ = peeked.environ;
        let total = peeked.packet_len as u64 + environ.content_length;
        let read = read_body(&mut stream, &peeked.seen, peeked.packet_len, total, config);
        let body = match tokio::time::timeout_at(deadline, read).await.map_err(timeout)? {
            Ok(body) => body,
            // The server's own failure, not the peer's: answer it, before the app runs, instead of a reset that
            // nginx would turn into a 502 that says nothing.
            Err(ConnError::Spool(error)) => {
                tracing::error!(
                    %error,
                    method = %String::from_utf8_lossy(&environ.method),
                    path = %String::from_utf8_lossy(&environ.log_path),
                    spool_dir = %std::env::temp_dir().display(),
                    content_length = environ.content_length,
                    "cannot spool the request body to the spool directory (TMPDIR); answering 503"
                );
                let request = RequestInfo::of(&environ, config.logs.access_log);
                return refuse(&mut stream, ctx, 503, &request, started).await.map(|()| None);
            }
            Err(other) => return Err(other),
        };
        ctx.metrics.received(total);
        let request = RequestInfo::of(&environ, config.logs.access_log);
        let span = tracing::Span::current();
        // The async side read all but the request's last byte.
        let wire = Wire::new(stream.into_socket()?, tcp, 1);
        let sink = Responder::new(wire, Arc::clone(ctx), request, started, &span);
        Ok(Some(Request {
            environ,
            body,
            span,
            sink: Box::new(sink),
        }))
    }
    .instrument(span)
    .await
}

/// The status for a request whose environ cannot be built, logged.
fn refusal(error: &EnvironError) -> u16 {
    tracing::warn!(%error, "refusing request");
    match error {
        EnvironError::InvalidContentLength(_)
        | EnvironError::MissingMethod
        | EnvironError::ConflictingContentLength(..) => 400,
    }
}

/// What is checked once a request's environ is built, before its body is read: nginx's defaults (warned about
/// once), and `--max-body-size`: the request to answer 413 when its body is over it.
fn body_over_limit(environ: &Environ, config: &Config) -> Option<RequestInfo> {
    warn_about_defaults(environ);
    let limit = config
        .limits
        .max_body_size
        .filter(|&limit| environ.content_length > limit)?;
    tracing::warn!(
        content_length = environ.content_length,
        limit,
        "request body larger than --max-body-size; answering 413"
    );
    Some(RequestInfo::of(environ, config.logs.access_log))
}

/// Peeks until the header and the whole vars block are in, and decodes them; answers a ping, and says what
/// anything else is.
async fn read_packet(stream: &mut Stream, config: &Config) -> Result<Start, ConnError> {
    let mut buf = vec![0u8; INITIAL_PEEK];
    let mut have = 0;
    loop {
        let n = stream.peek_more(&mut buf, have).await?;
        if n <= have {
            return if n == 0 {
                Ok(Start::Empty)
            } else {
                Err(ConnError::Truncated(n))
            };
        }
        have = n;
        let want = match packet::decode(&buf[..n], config.limits.max_vars_size).map_err(ConnError::Malformed)? {
            Decoded::Incomplete { want } => want,
            // Decoded again below with the environ, from the buffer the request's bytes are then shared from.
            Decoded::Request { .. } => break,
            Decoded::Ping { len } => return answer_ping(stream, len).await.map(|()| Start::Answered),
            Decoded::Unsupported { modifier1, protocol } => {
                match protocol {
                    Some(proto) => tracing::warn!(protocol = proto, "{}", packet::foreign_protocol_hint(proto)),
                    None => tracing::warn!(modifier1, "unsupported uwsgi modifier1; closing"),
                }
                return Ok(Start::Answered);
            }
            Decoded::TooLarge { datasize, limit } => {
                tracing::warn!(
                    datasize,
                    limit,
                    "uwsgi vars block larger than --buffer-size; answering 431"
                );
                return Ok(Start::Refuse(431, RequestInfo::unknown()));
            }
        };
        if let Some(want) = want.filter(|&want| buf.len() < want) {
            buf.resize(want, 0);
        }
    }
    buf.truncate(have);
    let seen = Bytes::from(buf);
    match open(&seen, config).map_err(ConnError::Malformed)? {
        Opening::Request { environ, packet_len } => Ok(Start::Request(Peeked {
            seen,
            environ,
            packet_len,
        })),
        Opening::BadEnviron { error, request } => Ok(Start::Refuse(refusal(&error), request)),
        // `decode` is a pure function, and these very bytes decoded as a whole request packet just above.
        Opening::NotARequest => unreachable!("a whole request packet decodes the same way twice"),
    }
}

/// Reads the packet and its body, all but the request's last byte, which is peeked (see the module doc of
/// `connection`). Bodies up to `--body-buffer-size` stay in memory; larger ones go to an unlinked temporary
/// file.
async fn read_body(
    stream: &mut Stream,
    seen: &Bytes,
    packet_len: usize,
    total: u64,
    config: &Config,
) -> Result<Body, ConnError> {
    let body_len = total - packet_len as u64;
    if body_len <= config.limits.body_buffer_size {
        // One buffer for packet and body: a small POST is one read, and the body is a slice of it.
        let total = usize::try_from(total).map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
        // Filled by the reads without being zeroed first (a 1 MiB body would otherwise be written twice).
        let mut all = Vec::with_capacity(total);
        while all.len() < total - 1 {
            let want = total - 1 - all.len();
            if stream.read_buf(&mut (&mut all).limit(want)).await? == 0 {
                return Err(ConnError::Truncated(all.len()));
            }
        }
        let mut last = [0u8; 1];
        match seen.get(total - 1) {
            // The first peek already saw the last byte: one syscall fewer for most requests.
            Some(&byte) => last[0] = byte,
            None => peek_last(stream, &mut last).await?,
        }
        all.push(last[0]);
        return Ok(Body::Memory(Bytes::from(all).slice(packet_len..)));
    }
    let mut scratch = vec![0u8; packet_len.max(SPOOL_CHUNK)];
    read_exact(stream, &mut scratch[..packet_len]).await?;
    // Made with the current thread's blocking call: creating an unlinked file is one quick syscall. Unlinked,
    // it leaves nothing behind whatever happens to this request.
    let mut file = tokio::fs::File::from_std(tempfile::tempfile().map_err(ConnError::Spool)?);
    let mut left = body_len - 1;
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(SPOOL_CHUNK);
        let n = stream.read(&mut scratch[..want]).await?;
        if n == 0 {
            return Err(ConnError::Truncated((total - left) as usize));
        }
        file.write_all(&scratch[..n]).await.map_err(ConnError::Spool)?;
        left -= n as u64;
    }
    let mut last = [0u8; 1];
    peek_last(stream, &mut last).await?;
    file.write_all(&last).await.map_err(ConnError::Spool)?;
    file.flush().await.map_err(ConnError::Spool)?;
    Ok(Body::Spooled {
        file: file.into_std().await,
        len: body_len,
    })
}

async fn read_exact(stream: &mut Stream, mut buf: &mut [u8]) -> Result<(), ConnError> {
    let mut got = 0;
    while !buf.is_empty() {
        let n = stream.read(buf).await?;
        if n == 0 {
            return Err(ConnError::Truncated(got));
        }
        got += n;
        buf = &mut buf[n..];
    }
    Ok(())
}

/// Waits for the request's last byte and copies it without consuming it.
async fn peek_last(stream: &mut Stream, one: &mut [u8]) -> Result<(), ConnError> {
    if stream.peek_more(one, 0).await? == 0 {
        return Err(ConnError::Truncated(0));
    }
    Ok(())
}

/// Answers a uWSGI ping the way uWSGI does: the same header back with modifier2 = 1.
async fn answer_ping(stream: &mut Stream, len: usize) -> Result<(), ConnError> {
    let mut packet = vec![0u8; len];
    read_exact(stream, &mut packet).await?;
    stream.write_all(&packet::PONG).await?;
    stream.shutdown().await?;
    Ok(())
}

/// Answers a request the server refuses itself, then drains what the peer still sends for a bounded time so
/// the answer is not lost to a reset. Through TLS the answer is sealed and ends with close_notify.
async fn refuse<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    ctx: &WorkerContext,
    status: u16,
    request: &RequestInfo,
    started: Instant,
) -> Result<(), ConnError> {
    use tokio::io::AsyncReadExt;
    let (bytes, body_len) = crate::response::server_response(status);
    record(&ctx.config, &ctx.metrics, request, status, body_len, started);
    stream.write_all(&bytes).await?;
    stream.shutdown().await?;
    let mut scratch = vec![0u8; 64 * 1024];
    let mut drained = 0;
    let _ = tokio::time::timeout(LINGER, async {
        while drained < LINGER_BYTES {
            match stream.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
    Ok(())
}

/// The async side of a tls:// connection: the handshake, then the whole request, within `--read-timeout`.
/// Nothing can be peeked through TLS, so the request is read whole, and the response ends with close_notify
/// (complete) or a reset without it (aborted).
pub(crate) async fn read_pending_tls(socket: Socket, ctx: Arc<WorkerContext>) -> Option<Request> {
    let started = Instant::now();
    let Some(tls_config) = ctx.tls.clone() else {
        tracing::error!("a tls:// connection, but this worker has no TLS configuration");
        return None;
    };
    let tcp = std::net::TcpStream::from(std::os::fd::OwnedFd::from(socket));
    let tcp = match tokio::net::TcpStream::from_std(tcp) {
        Ok(tcp) => tcp,
        Err(error) => {
            tracing::error!(%error, "cannot register a connection with the runtime");
            return None;
        }
    };
    let deadline = tokio::time::Instant::now() + ctx.config.limits.read_timeout;
    let failed = |why: HandshakeFailure, detail: &dyn std::fmt::Display| {
        ctx.metrics.tls_handshake_failed(why);
        tracing::warn!(reason = why.as_str(), "TLS handshake failed: {detail}; closing");
    };
    // What is not TLS at all gets a line saying what it is (plain uwsgi, HTTP), not a handshake error.
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
                let advice = match why {
                    HandshakeFailure::PlainUwsgi => {
                        "plain uwsgi sent to a tls:// socket: nginx needs uwsgi_pass suwsgi://host:port (and the \
                         uwsgi_ssl_* settings)"
                    }
                    HandshakeFailure::Http => {
                        "HTTP sent to a tls:// socket: it speaks uwsgi over TLS for nginx's suwsgi://"
                    }
                    _ => "not TLS: this tls:// socket speaks uwsgi over TLS for nginx's suwsgi://",
                };
                failed(why, &advice);
                return None;
            }
        }
        Ok(Err(error)) => {
            ctx.metrics.tls_handshake_failed(HandshakeFailure::Closed);
            tracing::debug!(%error, "peer went away before a TLS handshake");
            return None;
        }
        Err(_) => {
            failed(HandshakeFailure::Timeout, &"nothing sent within --read-timeout");
            return None;
        }
    }
    let accept = tokio_rustls::TlsAcceptor::from(tls_config).accept(tcp);
    let tls = match tokio::time::timeout_at(deadline, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            failed(HandshakeFailure::of(&error), &HandshakeFailure::explain(&error));
            return None;
        }
        Err(_) => {
            failed(HandshakeFailure::Timeout, &"not done within --read-timeout");
            return None;
        }
    };
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    ctx.metrics.tls_handshake_done(resumed);
    let read = read_tls_request(tls, &ctx, started);
    match tokio::time::timeout_at(deadline, read).await {
        Ok(Ok(request)) => request,
        Ok(Err(ConnError::Io(error))) if is_disconnect(&error) => {
            tracing::debug!(%error, "peer went away");
            None
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "closing connection");
            None
        }
        Err(_) => {
            tracing::warn!(timeout = ?ctx.config.limits.read_timeout, "the peer did not send its request in time; closing");
            None
        }
    }
}

type TlsStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

async fn read_tls_request(
    mut tls: TlsStream,
    ctx: &Arc<WorkerContext>,
    started: Instant,
) -> Result<Option<Request>, ConnError> {
    use tokio::io::AsyncReadExt;
    let config = &ctx.config;
    let mut buf = Vec::with_capacity(INITIAL_PEEK);
    loop {
        if tls.read_buf(&mut buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(ConnError::Truncated(buf.len()))
            };
        }
        match packet::decode(&buf, config.limits.max_vars_size).map_err(ConnError::Malformed)? {
            Decoded::Incomplete { .. } => {}
            Decoded::Request { .. } => break,
            Decoded::Ping { .. } | Decoded::Unsupported { .. } => {
                tracing::warn!("not a uwsgi request on a tls:// socket; closing");
                return Ok(None);
            }
            Decoded::TooLarge { datasize, limit } => {
                tracing::warn!(
                    datasize,
                    limit,
                    "uwsgi vars block larger than --buffer-size; answering 431"
                );
                refuse(&mut tls, ctx, 431, &RequestInfo::unknown(), started).await?;
                return Ok(None);
            }
        }
    }
    let seen = Bytes::from(buf);
    let (environ, packet_len) = match open(&seen, config).map_err(ConnError::Malformed)? {
        Opening::Request { environ, packet_len } => (environ, packet_len),
        Opening::BadEnviron { error, request } => {
            refuse(&mut tls, ctx, refusal(&error), &request, started).await?;
            return Ok(None);
        }
        // `decode` is a pure function, and these very bytes decoded as a whole request packet just above.
        Opening::NotARequest => unreachable!("a whole request packet decodes the same way twice"),
    };
    if let Some(request) = body_over_limit(&environ, config) {
        refuse(&mut tls, ctx, 413, &request, started).await?;
        return Ok(None);
    }
    let total = packet_len as u64 + environ.content_length;
    let body = if environ.content_length <= config.limits.body_buffer_size {
        let total = usize::try_from(total).map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
        let mut all = seen.to_vec();
        while all.len() < total {
            let want = total - all.len();
            if tls.read_buf(&mut (&mut all).limit(want)).await? == 0 {
                return Err(ConnError::Truncated(all.len()));
            }
        }
        all.truncate(total);
        Body::Memory(Bytes::from(all).slice(packet_len..))
    } else {
        let mut file = tokio::fs::File::from_std(tempfile::tempfile().map_err(ConnError::Spool)?);
        // The peer may have sent more than CONTENT_LENGTH: the body is CONTENT_LENGTH bytes, whatever follows.
        let already = &seen[packet_len.min(seen.len())..];
        let already = &already[..already
            .len()
            .min(usize::try_from(environ.content_length).unwrap_or(usize::MAX))];
        file.write_all(already).await.map_err(ConnError::Spool)?;
        let mut left = environ.content_length - already.len() as u64;
        let mut scratch = vec![0u8; SPOOL_CHUNK];
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(usize::MAX).min(SPOOL_CHUNK);
            let n = tls.read(&mut scratch[..want]).await?;
            if n == 0 {
                return Err(ConnError::Truncated((total - left) as usize));
            }
            file.write_all(&scratch[..n]).await.map_err(ConnError::Spool)?;
            left -= n as u64;
        }
        file.flush().await.map_err(ConnError::Spool)?;
        Body::Spooled {
            file: file.into_std().await,
            len: environ.content_length,
        }
    };
    ctx.metrics.received(total);
    let request = RequestInfo::of(&environ, config.logs.access_log);
    let span = request_span(&environ);
    let (tcp, conn) = tls.into_inner();
    let socket = Socket::from(std::os::fd::OwnedFd::from(tcp.into_std()?));
    let sink = Responder::new(Wire::tls(socket, conn), Arc::clone(ctx), request, started, &span);
    Ok(Some(Request {
        environ,
        body,
        span,
        sink: Box::new(sink),
    }))
}
