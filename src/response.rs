//! Status and headers from the app to HTTP/1.1 bytes for nginx, and the server's own 4xx/5xx answers.
//! Pure: no I/O, no pyo3.

use bytes::{BufMut, Bytes, BytesMut};

/// Why a status or header from the app was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("invalid status {0:?}: expected 'NNN Reason'")]
    InvalidStatus(String),
    #[error("invalid header name {0:?}")]
    InvalidHeaderName(String),
    #[error("header {0:?} has a value with CR, LF, NUL or another control character")]
    InvalidHeaderValue(String),
    #[error("header {0:?} is not latin-1")]
    NotLatin1(String),
    #[error("hop-by-hop header {0:?} is not allowed from a WSGI app (PEP 3333)")]
    HopByHop(String),
}

/// Checks a status line from the app (`"200 OK"`) and returns its code.
pub fn parse_status(status: &str) -> Result<u16, ResponseError> {
    let invalid = || ResponseError::InvalidStatus(status.to_owned());
    let b = status.as_bytes();
    if b.len() < 4 || !b[..3].iter().all(u8::is_ascii_digit) || b[3] != b' ' || b[0] == b'0' {
        return Err(invalid());
    }
    // The reason phrase goes on the status line verbatim: no control characters, latin-1 only.
    if status[4..]
        .chars()
        .any(|c| c.is_control() && c != '\t' || c as u32 > 0xFF)
    {
        return Err(invalid());
    }
    Ok(u16::from(b[0] - b'0') * 100 + u16::from(b[1] - b'0') * 10 + u16::from(b[2] - b'0'))
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 7230 hop-by-hop headers, which PEP 3333 forbids an app to send.
fn is_hop_by_hop(name: &str) -> bool {
    const HOP: [&str; 9] = [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    ];
    HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// Checks one response header from the app.
pub fn check_header(name: &str, value: &str) -> Result<(), ResponseError> {
    if name.is_empty() || !name.bytes().all(is_tchar) {
        return Err(ResponseError::InvalidHeaderName(name.to_owned()));
    }
    if is_hop_by_hop(name) {
        return Err(ResponseError::HopByHop(name.to_owned()));
    }
    for c in value.chars() {
        if c as u32 > 0xFF {
            return Err(ResponseError::NotLatin1(name.to_owned()));
        }
        // CR, LF and NUL would let a value start a new header or end the head (header injection).
        if c.is_control() && c != '\t' {
            return Err(ResponseError::InvalidHeaderValue(name.to_owned()));
        }
    }
    Ok(())
}

/// Whether a Content-Length may be added for a response whose whole body is known: never for HEAD (the
/// body was not produced, so its length is unknown) and never for statuses that have no body.
pub fn may_add_content_length(is_head: bool, status: u16) -> bool {
    !is_head && status_has_body(status)
}

/// Whether a response with this status carries a body at all (1xx, 204 and 304 never do).
pub fn status_has_body(status: u16) -> bool {
    !(100..200).contains(&status) && status != 204 && status != 304
}

fn put_latin1(buf: &mut BytesMut, s: &str) {
    if s.is_ascii() {
        buf.put_slice(s.as_bytes());
    } else {
        // Checked as latin-1 before, so every char fits a byte.
        buf.extend(s.chars().map(|c| c as u32 as u8));
    }
}

/// Encodes a validated status and headers, plus an optional Content-Length, into an HTTP/1.1 head.
/// `extra` reserves room for body bytes that will be appended to the same buffer.
pub fn encode_head<'a>(
    status: &str,
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    content_length: Option<u64>,
    extra: usize,
) -> BytesMut {
    let mut buf = BytesMut::with_capacity(256 + extra);
    buf.put_slice(b"HTTP/1.1 ");
    put_latin1(&mut buf, status);
    buf.put_slice(b"\r\n");
    for (name, value) in headers {
        buf.put_slice(name.as_bytes());
        buf.put_slice(b": ");
        put_latin1(&mut buf, value);
        buf.put_slice(b"\r\n");
    }
    if let Some(len) = content_length {
        buf.put_slice(b"Content-Length: ");
        buf.put_slice(len.to_string().as_bytes());
        buf.put_slice(b"\r\n");
    }
    buf.put_slice(b"\r\n");
    buf
}

/// A complete response the server makes itself (400, 413, 431, 500, ...), and the length of its body.
pub fn server_response(status: u16) -> (Bytes, u64) {
    let reason = reason_phrase(status);
    let body = format!("{reason}\n");
    let mut buf = encode_head(
        &format!("{status} {reason}"),
        [("Content-Type", "text/plain; charset=utf-8")],
        Some(body.len() as u64),
        body.len(),
    );
    buf.put_slice(body.as_bytes());
    (buf.freeze(), body.len() as u64)
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_rules() {
        assert_eq!(parse_status("200 OK"), Ok(200));
        assert_eq!(parse_status("404 Not Found"), Ok(404));
        assert_eq!(parse_status("599 "), Ok(599));
        for bad in [
            "200",
            "200OK",
            "abc OK",
            "20 OK",
            "099 X",
            "200 OK\r\nX: y",
            "200 \u{100}",
        ] {
            assert!(parse_status(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn header_rules() {
        assert!(check_header("Content-Type", "text/html").is_ok());
        assert!(check_header("X-Latin", "caf\u{e9}").is_ok());
        assert!(check_header("X-Tab", "a\tb").is_ok());
        assert_eq!(
            check_header("X-Evil", "a\r\nSet-Cookie: x=1"),
            Err(ResponseError::InvalidHeaderValue("X-Evil".into()))
        );
        assert!(check_header("X-Nul", "a\0").is_err());
        assert!(check_header("Bad Name", "v").is_err());
        assert!(check_header("Bad:Name", "v").is_err());
        assert!(check_header("", "v").is_err());
        assert!(check_header("X-Euro", "\u{20ac}").is_err());
        assert_eq!(
            check_header("Connection", "close"),
            Err(ResponseError::HopByHop("Connection".into()))
        );
        assert!(check_header("transfer-encoding", "chunked").is_err());
    }

    #[test]
    fn head_encoding() {
        let head = encode_head(
            "200 OK",
            [("Content-Type", "text/plain"), ("X-A", "\u{e9}")],
            Some(11),
            0,
        );
        assert_eq!(
            &head[..],
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-A: \xe9\r\nContent-Length: 11\r\n\r\n"
        );
    }

    #[test]
    fn content_length_is_added_only_where_it_is_right() {
        assert!(may_add_content_length(false, 200));
        assert!(!may_add_content_length(true, 200));
        assert!(!may_add_content_length(false, 204));
        assert!(!may_add_content_length(false, 304));
        assert!(!may_add_content_length(false, 101));
    }

    #[test]
    fn server_responses_are_complete() {
        let (r, body_len) = server_response(500);
        assert_eq!(body_len, 22);
        assert!(r.starts_with(b"HTTP/1.1 500 Internal Server Error\r\n"));
        assert!(r.ends_with(b"\r\n\r\nInternal Server Error\n"));
    }
}
