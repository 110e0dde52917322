//! One connection: read the packet and body, give the request to an app thread, which writes the response.
//!
//! Two ways in. An app thread that accepts a connection whose whole request is already queued (nearly every
//! request nginx forwards: it writes the request right after connecting) decodes it on the spot and runs it:
//! no hand-off between threads and no event loop (`read_queued`). Anything else (a request still arriving, a
//! body to spool, a ping, a request the server refuses) goes to the async side (`serve`), which reads it with
//! timeouts and without holding an app thread, then queues it for the next free app thread. Either way the app
//! thread writes the response itself, through a [`Responder`].
//!
//! Part of the request (at least its last byte) is peeked, not read, until the response is complete. Closing a
//! socket with unread data makes the kernel report an error to the peer (an RST on TCP, ECONNRESET on a Unix
//! socket), so an aborted response reaches nginx as an upstream error instead of a clean end of a truncated
//! body; a complete response consumes the rest first and ends with an ordinary close.

mod access;
mod responder;
mod watchdog;

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use nix::poll::PollFlags;
use socket2::Socket;
use tokio::io::AsyncWriteExt;
use tracing::Instrument;

use crate::app::Job;
use crate::body::Body;
use crate::config::Config;
use crate::environ::{Environ, EnvironError};
use crate::listener::{self, Stream};
use crate::metrics::WorkerMetrics;
use crate::packet::{self, HEADER_LEN, MODIFIER_PING, MODIFIER_WSGI, PacketError, PacketHeader};
use crate::response;
use crate::worker::Lifecycle;

pub use access::RequestInfo;
use access::record;
pub use responder::{Gone, Responder};
pub use watchdog::{Watchdog, run as watch_timeouts};

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

/// What every connection shares.
pub struct ConnShared {
    pub config: Arc<Config>,
    pub lifecycle: Arc<Lifecycle>,
    pub metrics: Arc<WorkerMetrics>,
    /// Answers requests that run past `--timeout`; `None` without one.
    pub watchdog: Option<Watchdog>,
    /// Requests with an app thread that have not ended or timed out: what a graceful stop waits for.
    pub active: AtomicUsize,
}

impl ConnShared {
    pub fn new(config: Arc<Config>, lifecycle: Arc<Lifecycle>, metrics: Arc<WorkerMetrics>) -> ConnShared {
        ConnShared {
            watchdog: config.timeout.map(Watchdog::new),
            config,
            lifecycle,
            metrics,
            active: AtomicUsize::new(0),
        }
    }
}

/// Why a request was not handed to the app.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
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

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof
    )
}

/// The span of one connection.
pub fn conn_span(peer: Option<SocketAddr>, listener: &str) -> tracing::Span {
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

/// What `read_queued` made of a freshly accepted connection.
// Made once per connection and taken apart at once: boxing the request would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Queued {
    /// The whole request was there: run it.
    Job(Job),
    /// Not (yet) a request this thread can run: nothing was consumed, the async side takes it from here.
    PassOn(Socket),
}

/// The fast path, on the app thread that accepted the connection: if the whole request is queued in the
/// socket, decode it from a peek and run it; otherwise pass the connection on untouched. Nothing is consumed
/// until the response is complete (then the whole request is, in one read): a request seen whole takes one
/// peek and one read, and an aborted response still closes with the request unread, so nginx sees a reset.
pub fn read_queued(socket: Socket, tcp: bool, span: tracing::Span, shared: &Arc<ConnShared>) -> Queued {
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
        return Queued::PassOn(socket);
    }
    let seen = Bytes::from(buf);
    let Some((environ, packet_len, total)) = whole_request(&seen, &shared.config) else {
        return Queued::PassOn(socket);
    };
    shared.metrics.received(total as u64);
    warn_about_defaults(&environ);
    let body = Body::Memory(seen.slice(packet_len..total));
    let request = RequestInfo::of(&environ, shared.config.access_log);
    let span = {
        let _conn = span.enter();
        request_span(&environ)
    };
    let responder = Responder::new(socket, tcp, total, Arc::clone(shared), request, started, &span);
    Queued::Job(Job {
        environ,
        body,
        responder,
        span,
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

/// Decodes a request the first peek saw in full: `(environ, packet length, total length)` when it is an
/// ordinary WSGI request that fits in memory and that the server does not refuse.
fn whole_request(seen: &Bytes, config: &Config) -> Option<(Environ, usize, usize)> {
    let (_, header) = packet::parse_uwsgi_header(seen).ok()?;
    if header.modifier1 != MODIFIER_WSGI || usize::from(header.datasize) > config.max_vars_size {
        return None;
    }
    let packet_len = HEADER_LEN + usize::from(header.datasize);
    if seen.len() < packet_len {
        return None;
    }
    let packet = seen.slice(..packet_len);
    let (_, vars) = packet::parse_uwsgi_vars(&packet[HEADER_LEN..]).ok()?;
    let environ = Environ::from_vars(&packet, &vars).ok()?;
    drop(vars);
    let body_len = environ.content_length;
    if body_len > config.body_buffer_size || config.max_body_size.is_some_and(|limit| body_len > limit) {
        return None;
    }
    let total = packet_len.checked_add(usize::try_from(body_len).ok()?)?;
    (total <= seen.len()).then_some((environ, packet_len, total))
}

/// The async side: reads a connection an app thread passed on, within `--read-timeout`, and answers what the
/// server answers itself (pings, refusals). Returns the request for an app thread, if there is one to run.
pub async fn serve(socket: Socket, tcp: bool, shared: Arc<ConnShared>) -> Option<Job> {
    let started = Instant::now();
    let stream = match Stream::from_socket(socket, tcp) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::error!(%error, "cannot register a connection with the runtime");
            return None;
        }
    };
    match handle(stream, tcp, &shared, started).await {
        Ok(job) => job,
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
    /// The header and the whole vars block.
    packet: Bytes,
    /// Everything the peek saw, which for most requests is the whole request, last byte included.
    seen: Bytes,
}

enum Start {
    Request(Peeked),
    /// A packet that is not a WSGI request and has been dealt with.
    Handled,
    /// A request the server answers itself with this status.
    Refuse(u16),
    /// The peer connected and closed without sending anything (a port probe, a TCP health check).
    Empty,
}

async fn handle(
    mut stream: Stream,
    tcp: bool,
    shared: &Arc<ConnShared>,
    started: Instant,
) -> Result<Option<Job>, ConnError> {
    let config = &shared.config;
    let deadline = tokio::time::Instant::now() + config.read_timeout;
    let timeout = |_: tokio::time::error::Elapsed| ConnError::ReadTimeout(config.read_timeout);

    let peeked = match tokio::time::timeout_at(deadline, peek_packet(&mut stream, config))
        .await
        .map_err(timeout)??
    {
        Start::Request(p) => p,
        Start::Handled => return Ok(None),
        Start::Refuse(status) => {
            return refuse(&mut stream, shared, status, &RequestInfo::unknown(), started)
                .await
                .map(|()| None);
        }
        Start::Empty => {
            tracing::debug!("peer closed without sending a request");
            return Ok(None);
        }
    };
    let (_, vars) = packet::parse_uwsgi_vars(&peeked.packet[HEADER_LEN..]).map_err(|e| match e {
        nom::Err::Error(e) | nom::Err::Failure(e) => ConnError::Malformed(e),
        // Complete parser over a whole block: it cannot ask for more.
        nom::Err::Incomplete(_) => ConnError::Malformed(PacketError::TruncatedLength { remaining: 0 }),
    })?;
    let environ = match Environ::from_vars(&peeked.packet, &vars) {
        Ok(env) => env,
        Err(error) => {
            tracing::warn!(%error, "refusing request");
            let status = match error {
                EnvironError::InvalidContentLength(_)
                | EnvironError::MissingMethod
                | EnvironError::ConflictingContentLength(..) => 400,
            };
            let request = RequestInfo::of_vars(&peeked.packet, &vars);
            return refuse(&mut stream, shared, status, &request, started)
                .await
                .map(|()| None);
        }
    };
    drop(vars);
    warn_about_defaults(&environ);
    if let Some(limit) = config.max_body_size.filter(|&limit| environ.content_length > limit) {
        tracing::warn!(
            content_length = environ.content_length,
            limit,
            "request body larger than --max-body-size; answering 413"
        );
        let request = RequestInfo::of(&environ, shared.config.access_log);
        return refuse(&mut stream, shared, 413, &request, started).await.map(|()| None);
    }
    let span = request_span(&environ);
    async move {
        let total = peeked.packet.len() as u64 + environ.content_length;
        let body = match tokio::time::timeout_at(deadline, read_body(&mut stream, &peeked, total, config))
            .await
            .map_err(timeout)?
        {
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
                let request = RequestInfo::of(&environ, shared.config.access_log);
                return refuse(&mut stream, shared, 503, &request, started).await.map(|()| None);
            }
            Err(other) => return Err(other),
        };
        shared.metrics.received(total);
        let request = RequestInfo::of(&environ, shared.config.access_log);
        let span = tracing::Span::current();
        // The async side read all but the request's last byte.
        let responder = Responder::new(
            stream.into_socket()?,
            tcp,
            1,
            Arc::clone(shared),
            request,
            started,
            &span,
        );
        Ok(Some(Job {
            environ,
            body,
            responder,
            span,
        }))
    }
    .instrument(span)
    .await
}

async fn peek_packet(stream: &mut Stream, config: &Config) -> Result<Start, ConnError> {
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
        let header = match packet::parse_uwsgi_header(&buf[..n]) {
            Ok((_, h)) => h,
            Err(nom::Err::Incomplete(_)) => continue,
            Err(nom::Err::Error(e) | nom::Err::Failure(e)) => return Err(ConnError::Malformed(e)),
        };
        match header.modifier1 {
            MODIFIER_WSGI => {}
            MODIFIER_PING => return answer_ping(stream, header).await.map(|()| Start::Handled),
            other => {
                match packet::sniff_foreign_protocol(&buf[..n]) {
                    Some(proto) => tracing::warn!(protocol = proto, "{}", packet::foreign_protocol_hint(proto)),
                    None => {
                        tracing::warn!(modifier1 = other, "unsupported uwsgi modifier1; closing")
                    }
                }
                return Ok(Start::Handled);
            }
        }
        let datasize = usize::from(header.datasize);
        // Check the length against its limit before taking the bytes.
        if datasize > config.max_vars_size {
            tracing::warn!(
                datasize,
                limit = config.max_vars_size,
                "uwsgi vars block larger than --buffer-size; answering 431"
            );
            return Ok(Start::Refuse(431));
        }
        let needed = HEADER_LEN + datasize;
        if n >= needed {
            buf.truncate(n);
            let seen = Bytes::from(buf);
            return Ok(Start::Request(Peeked {
                packet: seen.slice(..needed),
                seen,
            }));
        }
        if buf.len() < needed {
            buf.resize(needed, 0);
        }
    }
}

/// Reads the packet and its body, all but the request's last byte, which is peeked (see the module doc).
/// Bodies up to `--body-buffer-size` stay in memory; larger ones go to an unlinked temporary file.
async fn read_body(stream: &mut Stream, peeked: &Peeked, total: u64, config: &Config) -> Result<Body, ConnError> {
    let packet_len = peeked.packet.len();
    let body_len = total - packet_len as u64;
    if body_len <= config.body_buffer_size {
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
        match peeked.seen.get(total - 1) {
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
async fn answer_ping(stream: &mut Stream, header: PacketHeader) -> Result<(), ConnError> {
    let mut packet = vec![0u8; HEADER_LEN + usize::from(header.datasize)];
    read_exact(stream, &mut packet).await?;

    stream.write_all(&packet::PONG).await?;
    stream.shutdown().await?;
    Ok(())
}

/// Answers a request the server refuses itself, then drains what the peer still sends for a bounded time so
/// the answer is not lost to a reset.
async fn refuse(
    stream: &mut Stream,
    shared: &ConnShared,
    status: u16,
    request: &RequestInfo,
    started: Instant,
) -> Result<(), ConnError> {
    let (bytes, body_len) = response::server_response(status);
    record(shared, request, status, body_len, started);
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
