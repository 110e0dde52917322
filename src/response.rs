//! Status and headers from the app to HTTP/1.1 bytes for nginx, the framing of a response's body (what may be
//! sent, and whether the response ended complete), and the server's own 4xx/5xx answers. Pure: no I/O, no pyo3.

use bytes::{BufMut, Bytes, BytesMut};

/// Why a status or header from the app was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ResponseError {
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
pub(crate) fn parse_status(status: &str) -> Result<u16, ResponseError> {
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
pub(crate) fn check_header(name: &str, value: &str) -> Result<(), ResponseError> {
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
pub(crate) fn may_add_content_length(is_head: bool, status: u16) -> bool {
    !is_head && status_has_body(status)
}

/// Whether a response with this status carries a body at all (1xx, 204 and 304 never do).
pub(crate) fn status_has_body(status: u16) -> bool {
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
pub(crate) fn encode_head<'a>(
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
pub(crate) fn server_response(status: u16) -> (Bytes, u64) {
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

/// Response headers as the app gave them, in order.
pub(crate) type Headers = Vec<(String, String)>;

/// The app wrote a body before calling `start_response`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("RuntimeError: the app returned a body without calling start_response")]
pub(crate) struct NotStarted;

/// What to write for one chunk of a streamed body.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Chunk<'a> {
    /// The head, with the first chunk that has bytes.
    pub(crate) head: Option<BytesMut>,
    /// The chunk as it may be sent (clipped to the declared length; empty where no body may go).
    pub(crate) data: &'a [u8],
}

/// How a response ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ending {
    pub(crate) status: u16,
    /// False when the app sent less than its Content-Length: the connection is reset, so nginx does not pass
    /// the truncated body off as complete.
    pub(crate) complete: bool,
}

/// The framing of one response, from `start_response` to its end: it decides what of the app's output goes on
/// the wire (the head once, before the first body byte; never more body than the app's Content-Length; none
/// for HEAD, 1xx, 204 and 304; a Content-Length added when the whole body is known) and whether the response
/// ended complete. Writing is the caller's: each step returns the bytes to send.
#[derive(Debug)]
pub(crate) struct Framing {
    /// The status line as the app gave it, and its code.
    status: Option<(String, u16)>,
    headers: Headers,
    /// Content-Length set by the app; the server never sends more body than this.
    declared_length: Option<u64>,
    head_sent: bool,
    body_bytes: u64,
    is_head: bool,
    warned_overlong: bool,
}

impl Framing {
    pub(crate) fn new(is_head: bool) -> Framing {
        Framing {
            status: None,
            headers: Vec::new(),
            declared_length: None,
            head_sent: false,
            body_bytes: 0,
            is_head,
            warned_overlong: false,
        }
    }

    /// Records what `start_response` was given (already checked with [`parse_status`] and [`check_header`]).
    pub(crate) fn start(&mut self, status: String, code: u16, headers: Headers, declared_length: Option<u64>) {
        self.status = Some((status, code));
        self.headers = headers;
        self.declared_length = declared_length;
    }

    pub(crate) fn is_started(&self) -> bool {
        self.status.is_some()
    }

    pub(crate) fn head_sent(&self) -> bool {
        self.head_sent
    }

    /// The app's status code; 500 before `start_response`.
    pub(crate) fn status_code(&self) -> u16 {
        self.status.as_ref().map_or(500, |s| s.1)
    }

    /// Body bytes sent (or being sent) so far.
    pub(crate) fn body_bytes(&self) -> u64 {
        self.body_bytes
    }

    /// One chunk of a streamed body: what to write, the head first if it is not out yet. An empty chunk
    /// writes nothing (PEP 3333: empty chunks do not send the headers early).
    pub(crate) fn chunk<'a>(&mut self, data: &'a [u8]) -> Result<Option<Chunk<'a>>, NotStarted> {
        if data.is_empty() {
            return Ok(None);
        }
        let data = self.clip(data);
        let head = if self.head_sent {
            None
        } else {
            let head = self.head(None)?;
            self.head_sent = true;
            Some(head)
        };
        self.body_bytes += data.len() as u64;
        Ok(Some(Chunk { head, data }))
    }

    /// A body known in full before the head went out: the head, with a Content-Length where one may be
    /// added, and the chunks as they may be sent.
    pub(crate) fn whole<'a>(&mut self, chunks: &[&'a [u8]]) -> Result<(BytesMut, Vec<&'a [u8]>), NotStarted> {
        debug_assert!(!self.head_sent, "a whole body after the head is a sequence of chunks");
        let total: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        let head = self.head(self.may_add_length().then_some(total))?;
        let mut body = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            let chunk = self.clip(chunk);
            self.body_bytes += chunk.len() as u64;
            body.push(chunk);
        }
        self.head_sent = true;
        Ok((head, body))
    }

    /// A file of `len` bytes as the whole body: the head, and how many of its bytes to send.
    pub(crate) fn file(&mut self, len: u64) -> Result<(BytesMut, u64), NotStarted> {
        let len = self.declared_length.map_or(len, |limit| len.min(limit));
        let head = self.head(self.may_add_length().then_some(len))?;
        self.head_sent = true;
        // As for any body: none for HEAD, and none at all for a 1xx, 204 or 304.
        let bodiless = !status_has_body(self.status_code());
        let send = if self.is_head || bodiless { 0 } else { len };
        self.body_bytes = send;
        Ok((head, send))
    }

    /// The body is over: the head if nothing carried it yet (the body was empty, so its length is known to be
    /// zero), and how the response ends.
    pub(crate) fn finish(&mut self) -> Result<(Option<BytesMut>, Ending), NotStarted> {
        let head = if self.head_sent {
            None
        } else {
            let head = self.head(self.may_add_length().then_some(0))?;
            self.head_sent = true;
            Some(head)
        };
        let status = self.status_code();
        let short = self
            .declared_length
            .is_some_and(|l| self.body_bytes < l && !self.is_head && status_has_body(status));
        if short {
            tracing::error!(
                content_length = self.declared_length,
                sent = self.body_bytes,
                "the app sent less body than its Content-Length"
            );
        }
        Ok((
            head,
            Ending {
                status,
                complete: !short,
            },
        ))
    }

    /// The server's own 500, for an app that failed before the head went out.
    pub(crate) fn server_error(&mut self) -> Bytes {
        debug_assert!(!self.head_sent);
        let (bytes, body_len) = server_response(500);
        self.head_sent = true;
        self.body_bytes = body_len;
        bytes
    }

    fn may_add_length(&self) -> bool {
        self.declared_length.is_none() && may_add_content_length(self.is_head, self.status_code())
    }

    fn head(&self, content_length: Option<u64>) -> Result<BytesMut, NotStarted> {
        let (status, _) = self.status.as_ref().ok_or(NotStarted)?;
        let headers = self.headers.iter().map(|(n, v)| (n.as_str(), v.as_str()));
        Ok(encode_head(status, headers, content_length, 0))
    }

    /// PEP 3333: never send more than the app's own Content-Length.
    fn clip<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        // nginx answers HEAD from the head alone and closes the upstream connection right after it, so a body
        // would only be written into a closing socket. A 1xx, 204 or 304 has no body at all (RFC 9110 6.4.1):
        // bytes after its head would reach nginx as garbage.
        let bodiless = self.status.as_ref().is_some_and(|(_, s)| !status_has_body(*s));
        if self.is_head || bodiless {
            return &[];
        }
        let Some(limit) = self.declared_length else {
            return data;
        };
        let room = limit.saturating_sub(self.body_bytes);
        if (data.len() as u64) <= room {
            return data;
        }
        if !self.warned_overlong {
            self.warned_overlong = true;
            tracing::warn!(
                content_length = limit,
                "the app sent more body than its Content-Length; the rest is dropped"
            );
        }
        &data[..room as usize]
    }
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

    fn started(is_head: bool, status: &str, headers: &[(&str, &str)], declared: Option<u64>) -> Framing {
        let mut f = Framing::new(is_head);
        let headers = headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
        f.start(status.to_owned(), parse_status(status).unwrap(), headers, declared);
        f
    }

    const COMPLETE_200: Ending = Ending {
        status: 200,
        complete: true,
    };

    fn text(b: &[u8]) -> &str {
        std::str::from_utf8(b).unwrap()
    }

    #[test]
    fn framing_a_whole_body_adds_its_length() {
        let mut f = started(false, "200 OK", &[("Content-Type", "text/plain")], None);
        let (head, body) = f.whole(&[b"hello ", b"world"]).unwrap();
        assert_eq!(
            text(&head),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\n"
        );
        assert_eq!(body, [&b"hello "[..], b"world"]);
        assert_eq!(f.finish().unwrap(), (None, COMPLETE_200));
        assert_eq!(f.body_bytes(), 11);
    }

    #[test]
    fn framing_streams_the_head_once_with_the_first_nonempty_chunk() {
        let mut f = started(false, "200 OK", &[], None);
        assert_eq!(
            f.chunk(b"").unwrap(),
            None,
            "an empty chunk sends nothing, not even the head"
        );
        assert!(!f.head_sent());
        let Chunk { head, data } = f.chunk(b"ab").unwrap().unwrap();
        assert_eq!(
            text(&head.unwrap()),
            "HTTP/1.1 200 OK\r\n\r\n",
            "no length for a streamed body"
        );
        assert_eq!(data, b"ab");
        let Chunk { head, data } = f.chunk(b"cd").unwrap().unwrap();
        assert!(head.is_none());
        assert_eq!(data, b"cd");
        assert_eq!(f.finish().unwrap(), (None, COMPLETE_200));
        assert_eq!(f.body_bytes(), 4);
    }

    #[test]
    fn framing_never_sends_more_than_the_declared_length_and_a_short_body_is_incomplete() {
        let mut f = started(false, "200 OK", &[("Content-Length", "5")], Some(5));
        assert_eq!(f.chunk(b"abc").unwrap().unwrap().data, b"abc");
        assert_eq!(
            f.chunk(b"defgh").unwrap().unwrap().data,
            b"de",
            "clipped at the declared length"
        );
        assert_eq!(f.chunk(b"ij").unwrap().unwrap().data, b"");
        assert!(f.finish().unwrap().1.complete);

        let mut short = started(false, "200 OK", &[("Content-Length", "5")], Some(5));
        let (head, body) = short.whole(&[b"abc"]).unwrap();
        assert!(
            !text(&head).contains("Content-Length: 3"),
            "the app's own length is kept"
        );
        assert_eq!(body, [&b"abc"[..]]);
        assert_eq!(
            short.finish().unwrap().1,
            Ending {
                status: 200,
                complete: false
            }
        );
    }

    #[test]
    fn framing_sends_no_body_for_head_or_bodiless_statuses() {
        let mut head = started(true, "200 OK", &[], None);
        let (bytes, body) = head.whole(&[b"abc"]).unwrap();
        assert!(
            !text(&bytes).contains("Content-Length"),
            "HEAD: the body's length is unknown"
        );
        assert_eq!(body, [&b""[..]]);
        assert!(head.finish().unwrap().1.complete);

        for status in ["204 No Content", "304 Not Modified", "103 Early Hints"] {
            let mut f = started(false, status, &[], None);
            let (bytes, body) = f.whole(&[b"abc"]).unwrap();
            assert!(!text(&bytes).contains("Content-Length"), "{status}");
            assert_eq!(body, [&b""[..]], "{status}");
            // A declared length is no promise of a body for these.
            let mut declared = started(false, status, &[("Content-Length", "3")], Some(3));
            declared.whole(&[b"abc"]).unwrap();
            assert!(declared.finish().unwrap().1.complete, "{status}");
        }
        let mut head_declared = started(true, "200 OK", &[("Content-Length", "3")], Some(3));
        assert!(head_declared.finish().unwrap().1.complete);
    }

    #[test]
    fn framing_an_empty_body_sends_the_head_at_the_end_with_length_zero() {
        let mut f = started(false, "200 OK", &[], None);
        let (head, ending) = f.finish().unwrap();
        assert_eq!(text(&head.unwrap()), "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(ending, COMPLETE_200);
    }

    #[test]
    fn framing_a_file_honours_the_declared_length_head_and_bodiless_statuses() {
        let mut f = started(false, "200 OK", &[], None);
        let (head, send) = f.file(10).unwrap();
        assert!(text(&head).contains("Content-Length: 10"));
        assert_eq!(send, 10);
        let mut clipped = started(false, "200 OK", &[("Content-Length", "4")], Some(4));
        assert_eq!(clipped.file(10).unwrap().1, 4);
        let mut head = started(true, "200 OK", &[], None);
        let (bytes, send) = head.file(10).unwrap();
        assert!(!text(&bytes).contains("Content-Length"));
        assert_eq!(send, 0);
        for status in ["204 No Content", "304 Not Modified"] {
            let mut f = started(false, status, &[], None);
            let (bytes, send) = f.file(10).unwrap();
            assert!(!text(&bytes).contains("Content-Length"), "{status}");
            assert_eq!(send, 0, "{status}: a file is no body for a status that has none");
            assert!(f.finish().unwrap().1.complete, "{status}");
        }
    }

    #[test]
    fn framing_before_start_response_is_refused_and_a_failure_gets_a_500() {
        let mut f = Framing::new(false);
        assert_eq!(f.status_code(), 500);
        assert_eq!(f.chunk(b"x"), Err(NotStarted));
        assert_eq!(f.whole(&[b"x"]).map(|_| ()), Err(NotStarted));
        assert_eq!(f.finish().map(|_| ()), Err(NotStarted));
        assert!(!f.head_sent());
        let answer = f.server_error();
        assert!(text(&answer).starts_with("HTTP/1.1 500 Internal Server Error\r\n"));
        assert!(f.head_sent());
        assert_eq!(f.body_bytes(), server_response(500).1);
    }
}
