//! One connection: read the packet and body, hand the request to the app pool, write the response.
//!
//! The request's last byte is peeked, not read, until the response is complete. Closing a socket with unread
//! data makes the kernel report an error to the peer (an RST on TCP, ECONNRESET on a Unix socket), so an
//! aborted response reaches nginx as an upstream error instead of a clean end of a truncated body; a complete
//! response consumes the byte first and ends with an ordinary close.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::app::{AppPool, Job};
use crate::body::Body;
use crate::config::{Config, LogFormat};
use crate::environ::{Environ, EnvironError};
use crate::listener::Stream;
use crate::metrics::WorkerMetrics;
use crate::packet::{self, HEADER_LEN, MODIFIER_PING, MODIFIER_WSGI, PacketError, PacketHeader};
use crate::response::{self, Reply};
use crate::worker::{Lifecycle, RetireReason};

/// First peek size: a typical nginx packet (about 1 KiB of vars) fits with room to spare.
const INITIAL_PEEK: usize = 8 * 1024;
/// Read size while spooling a large body to its file.
const SPOOL_CHUNK: usize = 256 * 1024;
/// How many replies an app thread may queue ahead of the socket: enough to overlap Python and I/O, small
/// enough that a fast generator and a slow client cannot pile up memory.
const REPLY_QUEUE: usize = 8;
/// After the server answers a request it refused, it reads and drops what the peer still sends for at most
/// this long, so the answer is not lost to a reset.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 4 << 20;
/// Most bytes of queued chunks gathered into one writev.
const WRITE_BATCH: usize = 256 * 1024;
/// How long a timed-out request's stack dump may wait for the GIL.
const STACK_DUMP_LIMIT: Duration = Duration::from_secs(5);

/// What every connection shares.
pub struct ConnShared {
    pub config: Arc<Config>,
    pub pool: Arc<AppPool>,
    pub lifecycle: Arc<Lifecycle>,
    pub metrics: Arc<WorkerMetrics>,
    /// One permit per app thread, taken by a request from hand-over until its response is written.
    pub app_slots: tokio::sync::Semaphore,
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
    #[error("the peer stopped reading the response for {0:?}; dropping it")]
    WriteStalled(Duration),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Serves one connection to its end. Errors end this connection only.
pub async fn serve(stream: Stream, shared: Arc<ConnShared>) {
    match handle(stream, &shared).await {
        Ok(()) => {}
        Err(ConnError::Io(error)) if is_disconnect(&error) => {
            tracing::debug!(%error, "peer went away")
        }
        Err(error) => tracing::warn!(%error, "closing connection"),
    }
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof
    )
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

async fn handle(mut stream: Stream, shared: &ConnShared) -> Result<(), ConnError> {
    let config = &shared.config;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + config.read_timeout;
    let timeout = |_: tokio::time::error::Elapsed| ConnError::ReadTimeout(config.read_timeout);

    let peeked = match tokio::time::timeout_at(deadline, peek_packet(&mut stream, config))
        .await
        .map_err(timeout)??
    {
        Start::Request(p) => p,
        Start::Handled => return Ok(()),
        Start::Refuse(status) => return refuse(&mut stream, shared, status, &RequestInfo::unknown(), started).await,
        Start::Empty => {
            tracing::debug!("peer closed without sending a request");
            return Ok(());
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
                EnvironError::InvalidContentLength(_) | EnvironError::MissingMethod => 400,
            };
            return refuse(
                &mut stream,
                shared,
                status,
                &RequestInfo::of_vars(&peeked.packet, &vars),
                started,
            )
            .await;
        }
    };
    drop(vars);
    if let Some(limit) = config.max_body_size.filter(|&limit| environ.content_length > limit) {
        tracing::warn!(
            content_length = environ.content_length,
            limit,
            "request body larger than --max-body-size; answering 413"
        );
        return refuse(
            &mut stream,
            shared,
            413,
            &RequestInfo::of(&environ, shared.config.access_log),
            started,
        )
        .await;
    }
    let span = tracing::info_span!(
        "request",
        method = %String::from_utf8_lossy(&environ.method),
        path = %String::from_utf8_lossy(&environ.log_path),
    );
    async move {
        let total = peeked.packet.len() as u64 + environ.content_length;
        let body = tokio::time::timeout_at(deadline, read_body(&mut stream, &peeked, total, config))
            .await
            .map_err(timeout)??;
        shared.metrics.received(total);
        respond(stream, shared, environ, body, started).await
    }
    .instrument(span)
    .await
}

/// Peeks until the header and the whole vars block are queued, answering pings and refusing foreign protocols.
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
                    Some(proto) => tracing::warn!(
                        protocol = proto,
                        "this looks like {proto} sent to a uwsgi socket: point nginx at it with uwsgi_pass, not proxy_pass"
                    ),
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
        let mut all = vec![0u8; total];
        read_exact(stream, &mut all[..total - 1]).await?;
        match peeked.seen.get(total - 1) {
            // The first peek already saw the last byte: one syscall fewer for most requests.
            Some(&last) => all[total - 1] = last,
            None => peek_last(stream, &mut all[total - 1..]).await?,
        }
        return Ok(Body::Memory(Bytes::from(all).slice(packet_len..)));
    }
    let mut scratch = vec![0u8; packet_len.max(SPOOL_CHUNK)];
    read_exact(stream, &mut scratch[..packet_len]).await?;
    // Made with the current thread's blocking call: creating an unlinked file is one quick syscall.
    let mut file = tokio::fs::File::from_std(tempfile::tempfile()?);
    let mut left = body_len - 1;
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(SPOOL_CHUNK);
        let n = stream.read(&mut scratch[..want]).await?;
        if n == 0 {
            return Err(ConnError::Truncated((total - left) as usize));
        }
        file.write_all(&scratch[..n]).await?;
        left -= n as u64;
    }
    let mut last = [0u8; 1];
    peek_last(stream, &mut last).await?;
    file.write_all(&last).await?;
    file.flush().await?;
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

/// Hands the request to the app pool and writes what comes back.
async fn respond(
    mut stream: Stream,
    shared: &ConnShared,
    environ: Environ,
    body: Body,
    started: Instant,
) -> Result<(), ConnError> {
    let request = RequestInfo::of(&environ, shared.config.access_log);
    let _in_flight = InFlight::start(&shared.metrics);
    let (tx, mut rx) = mpsc::channel(REPLY_QUEUE);
    let running_on = Arc::new(AtomicU64::new(0));
    let job = Job {
        environ,
        body,
        reply: tx,
        span: tracing::Span::current(),
        running_on: Arc::clone(&running_on),
    };
    // Held until the response is written: while every app thread is busy, the accept loop leaves new
    // connections in the shared listen queue, where an idle worker takes them.
    let _app_slot = shared.app_slots.acquire().await;
    if shared.pool.submit(job).is_err() {
        tracing::error!("the app pool has stopped; answering 503");
        return refuse(&mut stream, shared, 503, &request, started).await;
    }
    let deadline = shared
        .config
        .timeout
        .map(|t| tokio::time::Instant::from_std(started) + t);
    let stall = shared.config.write_timeout;
    let stalled = |e: io::Error| match e.kind() {
        io::ErrorKind::TimedOut => ConnError::WriteStalled(stall),
        _ => ConnError::Io(e),
    };
    let mut wrote = false;
    let mut verdict = None;
    // A reply taken from the queue while gathering a batch of writes, handled next.
    let mut next: Option<Reply> = None;
    loop {
        let reply = match next.take() {
            Some(reply) => Some(reply),
            None => match deadline {
                Some(deadline) => tokio::select! {
                    reply = rx.recv() => reply,
                    () = tokio::time::sleep_until(deadline) => {
                        drop(rx);
                        return timed_out(stream, shared, wrote, &running_on, &request, started).await;
                    }
                },
                None => rx.recv().await,
            },
        };
        let Some(reply) = reply else { break };
        match reply {
            // A failed write returns early and drops `rx`, which tells the app thread to stop.
            Reply::Send(bytes) => {
                wrote = true;
                // Chunks the app produced while the last write was in progress go out in one writev.
                let mut batch = vec![bytes];
                let mut batched = batch[0].len();
                while batched < WRITE_BATCH {
                    match rx.try_recv() {
                        Ok(Reply::Send(more)) => {
                            batched += more.len();
                            batch.push(more);
                        }
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                stream.write_all_vectored(batch, stall).await.map_err(stalled)?;
            }
            Reply::SendFile { file, offset, len } => {
                stream.sendfile(&file, offset, len, stall).await.map_err(stalled)?;
            }
            Reply::Done {
                tail,
                status,
                body_bytes,
            } => {
                if !tail.is_empty() {
                    stream.write_all_within(&tail, stall).await.map_err(stalled)?;
                }
                verdict = Some((status, body_bytes, true));
                break;
            }
            Reply::Abort { status, body_bytes } => {
                verdict = Some((status, body_bytes, false));
                break;
            }
        }
    }
    let Some((status, body_bytes, complete)) = verdict else {
        tracing::error!("the app thread ended the response without completing it; resetting");
        stream.abort();
        return Ok(());
    };
    record(shared, &request, status, body_bytes, started);
    let result = if complete {
        finish(&mut stream).await
    } else {
        stream.abort();
        Ok(())
    };
    shared.lifecycle.request_finished();
    result
}

/// Ends a complete response: consume the held-back byte so the close that follows (dropping the stream) is
/// an ordinary end of the response. No shutdown(2): the close sends the same FIN, one syscall fewer.
async fn finish(stream: &mut Stream) -> Result<(), ConnError> {
    let mut last = [0u8; 1];
    stream.read(&mut last).await?;
    Ok(())
}

/// Counts a request as in flight until dropped, whichever way `respond` returns.
struct InFlight<'m>(&'m WorkerMetrics);

impl<'m> InFlight<'m> {
    fn start(metrics: &'m WorkerMetrics) -> InFlight<'m> {
        metrics.request_started();
        InFlight(metrics)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// What the access log says about a request.
struct RequestInfo {
    method: Bytes,
    path: Bytes,
    request_id: Option<Bytes>,
    remote_addr: Option<Bytes>,
}

impl RequestInfo {
    /// A request whose vars were never decoded.
    fn unknown() -> RequestInfo {
        RequestInfo {
            method: Bytes::from_static(b"-"),
            path: Bytes::from_static(b"-"),
            request_id: None,
            remote_addr: None,
        }
    }

    /// From raw vars, for a request refused before its environ could be built.
    fn of_vars(packet: &Bytes, vars: &[crate::packet::Var<'_>]) -> RequestInfo {
        let get = |key: &[u8]| {
            vars.iter()
                .rev()
                .find(|v| v.key == key)
                .map(|v| packet.slice_ref(v.value))
        };
        RequestInfo {
            method: get(b"REQUEST_METHOD").unwrap_or_else(|| Bytes::from_static(b"-")),
            path: get(b"REQUEST_URI")
                .or_else(|| get(b"PATH_INFO"))
                .unwrap_or_else(|| Bytes::from_static(b"-")),
            request_id: get(b"HTTP_X_REQUEST_ID"),
            remote_addr: get(b"REMOTE_ADDR"),
        }
    }

    /// `details` (request id, remote address) are looked up only when the access log will show them.
    fn of(environ: &Environ, details: bool) -> RequestInfo {
        let get = |key: &[u8]| if details { environ.get(key).cloned() } else { None };
        RequestInfo {
            method: environ.method.clone(),
            path: environ.log_path.clone(),
            request_id: get(b"HTTP_X_REQUEST_ID"),
            remote_addr: get(b"REMOTE_ADDR"),
        }
    }
}

/// Counts an answer in the metrics and writes its access-log line.
fn record(shared: &ConnShared, request: &RequestInfo, status: u16, body_bytes: u64, started: Instant) {
    let elapsed = started.elapsed();
    shared.metrics.answered(status, body_bytes, elapsed);
    if !shared.config.access_log {
        return;
    }
    let duration_us = elapsed.as_micros() as u64;
    let pid = std::process::id();
    let text_mode = shared.config.log_format == LogFormat::Text;
    // The text log is read in terminals: whatever the client sent is escaped there. JSON escapes itself.
    let show = |b: Option<&Bytes>| match b {
        None => "-".to_owned(),
        Some(v) if text_mode => log_safe(v),
        Some(v) => String::from_utf8_lossy(v).into_owned(),
    };
    let method = show(Some(&request.method));
    let path = show(Some(&request.path));
    let request_id = show(request.request_id.as_ref());
    let remote_addr = show(request.remote_addr.as_ref());
    if let (Some(format), true) = (&shared.config.access_log_format, text_mode) {
        let line = render_template(format, |name| match name {
            "method" => Some(method.clone()),
            "path" => Some(path.clone()),
            "status" => Some(status.to_string()),
            "bytes" => Some(body_bytes.to_string()),
            "duration_us" => Some(duration_us.to_string()),
            "pid" => Some(pid.to_string()),
            "request_id" => Some(request_id.clone()),
            "remote_addr" => Some(remote_addr.clone()),
            _ => None,
        });
        tracing::info!(target: "ferrule::access", parent: None, "{line}");
        return;
    }
    tracing::info!(
        target: "ferrule::access",
        parent: None,
        %method,
        %path,
        status,
        bytes = body_bytes,
        duration_us,
        pid,
        %request_id,
        %remote_addr,
        "request"
    );
}

/// Fills `{name}` placeholders in one pass, so a value that itself contains `{status}` stays as it is;
/// unknown placeholders are kept verbatim.
fn render_template(format: &str, value: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(format.len() + 64);
    let mut rest = format;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find('}').and_then(|close| Some((close, value(&after[..close])?))) {
            Some((close, v)) => {
                out.push_str(&v);
                rest = &after[close + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Bytes from the client made safe for a text log, as nginx does: control characters, backslashes and
/// bytes that are not UTF-8 become `\xHH`, so a request cannot inject terminal escapes or fake log lines.
fn log_safe(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() || c == '\\' {
                let _ = write!(out, "\\x{:02X}", u32::from(c));
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02X}");
        }
    }
    out
}

/// The request ran past `--timeout`: answer 504 if nothing was sent yet (else reset), log where the app is
/// stuck, and retire this worker, whose thread stays busy with the stuck request.
async fn timed_out(
    mut stream: Stream,
    shared: &ConnShared,
    wrote: bool,
    running_on: &AtomicU64,
    request: &RequestInfo,
    started: Instant,
) -> Result<(), ConnError> {
    let limit = shared.config.timeout.unwrap_or_default();
    tracing::error!(timeout = ?limit, "request timed out");
    let result = if wrote {
        stream.abort();
        Ok(())
    } else {
        let (bytes, body_len) = response::server_response(504);
        record(shared, request, 504, body_len, started);
        match stream.write_all(&bytes).await {
            Ok(()) => finish(&mut stream).await,
            Err(e) => Err(e.into()),
        }
    };
    shared.metrics.timed_out();
    shared.lifecycle.retire(RetireReason::Timeout);
    let thread = running_on.load(Ordering::Acquire);
    let span = tracing::Span::current();
    // Taking the stack needs the GIL, which the stuck thread may hold for a while: never on the I/O thread,
    // and bounded, since the worker waits for this before it exits.
    let dump = tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        match crate::app::python_stack(thread) {
            Some(stack) => tracing::error!(thread, stack = %stack, "stuck request's Python stack"),
            None => tracing::error!(thread, "the stuck request's Python stack is not available"),
        }
    });
    if tokio::time::timeout(STACK_DUMP_LIMIT, dump).await.is_err() {
        tracing::error!("could not take the stuck request's Python stack: the GIL stayed busy");
    }
    result
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_in_one_pass() {
        let v = |name: &str| match name {
            "path" => Some("/x?q={status}".to_owned()),
            "status" => Some("200".to_owned()),
            _ => None,
        };
        assert_eq!(
            render_template("{path} {status} {nope} {", v),
            "/x?q={status} 200 {nope} {"
        );
    }

    #[test]
    fn log_safe_escapes_what_a_terminal_would_act_on() {
        assert_eq!(log_safe(b"/caf\xc3\xa9"), "/caf\u{e9}");
        assert_eq!(log_safe(b"a\x1b[2J\x07\nb"), "a\\x1B[2J\\x07\\x0Ab");
        assert_eq!(log_safe(b"\xff\\"), "\\xFF\\x5C");
    }
}
