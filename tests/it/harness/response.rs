//! The one HTTP response type of the tests: what ferrule wrote straight to a uwsgi socket, or what nginx answered
//! an HTTP client, with how its body ended.

/// How a response body ended. Only `Complete` means the client got the whole body as announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyEnd {
    /// The terminating zero-size chunk arrived, `Content-Length` bytes arrived, or (with neither
    /// header) the server closed cleanly, which is the only end such a body has.
    Complete,
    /// The connection closed (cleanly) before the terminating zero-size chunk.
    IncompleteChunked,
    /// The connection closed before `Content-Length` bytes arrived.
    ShortContentLength { expected: u64, got: u64 },
    /// The connection was reset while the body was being read.
    Reset,
    /// A read waited longer than [`IO_TIMEOUT`](super::http::IO_TIMEOUT).
    TimedOut,
    /// The chunked framing itself was broken (bad size line, missing CRLF).
    BadFraming(String),
}

/// A response read to its end (whatever that end was, see `end`).
#[derive(Debug, Clone)]
pub struct Response {
    /// `HTTP/1.1 200 OK`, as sent.
    pub status_line: String,
    pub status: u16,
    /// In the order received, names as sent.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// A direct uwsgi answer is read to the socket's close, so it is `Complete`.
    pub end: BodyEnd,
    /// The client's port, which nginx passes on as REMOTE_PORT; `None` for a direct uwsgi answer.
    pub local_port: Option<u16>,
}

impl Response {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every header with this name (case-insensitive), in order.
    pub fn headers_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn is_complete(&self) -> bool {
        self.end == BodyEnd::Complete
    }

    /// A one-line summary for assertion messages (the body is cut, it may be megabytes).
    pub fn summary(&self) -> String {
        let text = self.text();
        let cut: String = text.chars().take(600).collect();
        format!(
            "status={} end={:?} headers={:?} body({} bytes)={:?}",
            self.status,
            self.end,
            self.headers,
            self.body.len(),
            cut
        )
    }
}
