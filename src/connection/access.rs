//! The access log and the per-request metrics: one line (text or JSON) and the counters for every answered
//! request, whoever answered it (the app, the server's own refusal, or a timeout).

use std::time::Instant;

use bytes::Bytes;

use crate::config::{Config, LogFormat};
use crate::environ::Environ;
use crate::metrics::WorkerMetrics;

/// What the access log says about a request.
#[derive(Debug, Clone)]
pub(crate) struct RequestInfo {
    method: Bytes,
    path: Bytes,
    request_id: Option<Bytes>,
    remote_addr: Option<Bytes>,
}

impl RequestInfo {
    /// A request whose vars were never decoded.
    pub(crate) fn unknown() -> RequestInfo {
        RequestInfo {
            method: Bytes::from_static(b"-"),
            path: Bytes::from_static(b"-"),
            request_id: None,
            remote_addr: None,
        }
    }

    /// From raw vars, for a request refused before its environ could be built.
    pub(crate) fn of_vars(packet: &Bytes, vars: &[crate::packet::Var<'_>]) -> RequestInfo {
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
    pub(crate) fn of(environ: &Environ, details: bool) -> RequestInfo {
        let get = |key: &[u8]| if details { environ.get_shared(key) } else { None };
        RequestInfo {
            method: environ.method.clone(),
            path: environ.log_path.clone(),
            request_id: get(b"HTTP_X_REQUEST_ID"),
            remote_addr: get(b"REMOTE_ADDR"),
        }
    }
}

/// Counts an answer in the metrics and writes its access-log line.
pub(crate) fn record(
    config: &Config,
    metrics: &WorkerMetrics,
    request: &RequestInfo,
    status: u16,
    body_bytes: u64,
    started: Instant,
) {
    let elapsed = started.elapsed();
    metrics.answered(status, body_bytes, elapsed);
    if !config.logs.access_log {
        return;
    }
    let duration_us = elapsed.as_micros() as u64;
    let pid = std::process::id();
    let text_mode = config.logs.log_format == LogFormat::Text;
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
    if let (Some(format), true) = (&config.logs.access_log_format, text_mode) {
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
