//! The async side, one path for plain and TLS connections alike: reads the request within `--read-timeout`,
//! answers what the server answers itself (a ping, the refusals: 400, 413, 431, 503), reads the body inside
//! the request's span, and makes the request for the next free app thread.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use socket2::Socket;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::Instrument;

use super::body::{consume, read_body};
use super::open::{ConnError, INITIAL_PEEK, Opening, open, warn_about_defaults};
use super::transport::{Transport, held};
use crate::app::Request;
use crate::config::Config;
use crate::connection::access::{RequestInfo, record};
use crate::connection::context::WorkerContext;
use crate::connection::responder::Responder;
use crate::connection::wire::is_disconnect;
use crate::environ::{Environ, EnvironError};
use crate::listener::Stream;
use crate::log_scope::{self, LogScope};
use crate::packet::{self, Decoded, Var};

/// After the server answers a request it refused, it reads and drops what the peer still sends for at most
/// this long, so the answer is not lost to a reset.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 4 << 20;

/// Reads a plain connection the fast path handed back. Returns the request for an app thread, if there is one
/// to run.
pub(crate) async fn read_pending(socket: Socket, tcp: bool, ctx: Arc<WorkerContext>) -> Option<Request> {
    let started = Instant::now();
    let stream = match Stream::from_socket(socket, tcp) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::error!(%error, "cannot register a connection with the runtime");
            return None;
        }
    };
    let deadline = tokio::time::Instant::now() + ctx.config.limits.read_timeout;
    read(stream, &ctx, started, deadline).await
}

/// Reads a request from `transport` by `deadline`, answering what the server answers itself; says why when
/// there is no request to run.
pub(super) async fn read<T: Transport>(
    transport: T,
    ctx: &Arc<WorkerContext>,
    started: Instant,
    deadline: tokio::time::Instant,
) -> Option<Request> {
    match read_request(transport, ctx, started, deadline).await {
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

/// The packet of a request, decoded.
struct Head {
    /// Everything the transport showed, which for most requests is the whole request, last byte included.
    seen: Bytes,
    environ: Environ,
    packet_len: usize,
}

/// How the start of a connection turned out.
enum Start {
    Request(Head),
    /// A ping, answered; or not a WSGI request, logged and closed.
    Answered,
    /// A request the server answers itself with this status.
    Refuse(u16, RequestInfo),
    /// The peer connected and closed without sending anything (a port probe, a TCP health check).
    Empty,
}

/// `read` within `deadline`, or [`ConnError::ReadTimeout`].
async fn within<X>(
    deadline: tokio::time::Instant,
    config: &Config,
    read: impl Future<Output = Result<X, ConnError>>,
) -> Result<X, ConnError> {
    tokio::time::timeout_at(deadline, read)
        .await
        .map_err(|_| ConnError::ReadTimeout(config.limits.read_timeout))?
}

async fn read_request<T: Transport>(
    mut transport: T,
    ctx: &Arc<WorkerContext>,
    started: Instant,
    deadline: tokio::time::Instant,
) -> Result<Option<Request>, ConnError> {
    let config = &ctx.config;
    let head = match within(deadline, config, read_head(&mut transport, config)).await? {
        Start::Request(head) => head,
        Start::Answered => return Ok(None),
        Start::Refuse(status, request) => {
            return refuse(&mut transport, ctx, status, &request, started)
                .await
                .map(|()| None);
        }
        Start::Empty => {
            tracing::debug!("peer closed without sending a request");
            return Ok(None);
        }
    };
    if let Some(request) = body_over_limit(&head.environ, config) {
        return refuse(&mut transport, ctx, 413, &request, started).await.map(|()| None);
    }
    // The request's span, inside its connection's: its body is read, and the app runs, in it.
    let span = log_scope::request_span(&tracing::Span::current(), &head.environ.method, &head.environ.log_path);
    read_rest(transport, head, ctx, started, deadline)
        .instrument(span)
        .await
}

/// Inside the request's span: reads the body (answering 503 when it cannot be spooled) and makes the request.
async fn read_rest<T: Transport>(
    mut transport: T,
    head: Head,
    ctx: &Arc<WorkerContext>,
    started: Instant,
    deadline: tokio::time::Instant,
) -> Result<Option<Request>, ConnError> {
    let config = &ctx.config;
    let Head {
        seen,
        environ,
        packet_len,
    } = head;
    let total = packet_len as u64 + environ.content_length;
    let read = read_body(&mut transport, &seen, packet_len, total, config.limits.body_buffer_size);
    let body = match within(deadline, config, read).await {
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
            return refuse(&mut transport, ctx, 503, &request, started).await.map(|()| None);
        }
        Err(other) => return Err(other),
    };
    ctx.metrics.received(total);
    let request = RequestInfo::of(&environ, config.logs.access_log);
    let mut scope = LogScope::made(tracing::Span::current());
    let wire = transport.into_wire()?;
    let sink = Responder::new(wire, Arc::clone(ctx), request, started, &mut scope);
    Ok(Some(Request {
        environ,
        body,
        scope,
        sink: Box::new(sink),
    }))
}

/// Looks until the header and the whole vars block are in, and decodes them, once; answers a ping, and says
/// what anything else is.
async fn read_head<T: Transport>(transport: &mut T, config: &Config) -> Result<Start, ConnError> {
    let mut seen = Vec::with_capacity(INITIAL_PEEK);
    loop {
        let before = seen.len();
        transport.show_more(&mut seen).await?;
        if seen.len() <= before {
            return if seen.is_empty() {
                Ok(Start::Empty)
            } else {
                Err(ConnError::Truncated(seen.len()))
            };
        }
        // Decoded from `Bytes`, so that the environ shares its keys and values with this very buffer.
        let shown = Bytes::from(std::mem::take(&mut seen));
        let want = match packet::decode(&shown, config.limits.max_vars_size).map_err(ConnError::Malformed)? {
            Decoded::Incomplete { want } => want,
            Decoded::Request { packet, len } => return Ok(start(&shown, &packet.vars, len)),
            Decoded::Ping { len } => {
                let held = held::<T>(&shown);
                return answer_ping(transport, held, len).await.map(|()| Start::Answered);
            }
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
        // Back to a vector to look further: the same allocation, as nothing else holds the bytes.
        seen = Vec::from(shown);
        if let Some(want) = want {
            seen.reserve(want.saturating_sub(seen.len()));
        }
    }
}

/// A request packet decoded from `seen`: the request, or the refusal of an environ that cannot be built.
fn start(seen: &Bytes, vars: &[Var<'_>], packet_len: usize) -> Start {
    match open(seen, vars, packet_len) {
        Opening::Request { environ, packet_len } => Start::Request(Head {
            seen: seen.clone(),
            environ,
            packet_len,
        }),
        Opening::BadEnviron { error, request } => Start::Refuse(refusal(&error), request),
    }
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

/// Answers a uWSGI ping the way uWSGI does: the same header back with modifier2 = 1. The ping's `len` bytes
/// are consumed first (`held` of them already are).
async fn answer_ping<T: Transport>(transport: &mut T, held: usize, len: usize) -> Result<(), ConnError> {
    let mut packet = vec![0u8; len];
    consume(transport, &mut packet, len.saturating_sub(held)).await?;
    transport.write_all(&packet::PONG).await?;
    transport.shutdown().await?;
    Ok(())
}

/// Answers a request the server refuses itself, then drains what the peer still sends for a bounded time so
/// the answer is not lost to a reset. Through TLS the answer is sealed and ends with close_notify.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    ctx: &WorkerContext,
    status: u16,
    request: &RequestInfo,
    started: Instant,
) -> Result<(), ConnError> {
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
