//! The one uwsgi packet encoder of the test harness, and a raw uwsgi client: packet encoding and layout, nginx-like
//! vars, reading and splitting the HTTP answer.

use std::io::{self, Read, Write};

use super::response::{BodyEnd, Response};

/// modifier1 of a WSGI request.
pub const MODIFIER_WSGI: u8 = 0;
/// modifier1 of a ping; the answer is the 4 bytes `[100, 0, 0, 1]`.
pub const MODIFIER_PING: u8 = 100;

/// The vars block: `(u16 LE keylen, key, u16 LE vallen, value)*`. Panics if a key or value exceeds u16.
pub fn encode_vars<K: AsRef<[u8]>, V: AsRef<[u8]>>(vars: &[(K, V)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in vars {
        let (k, v) = (k.as_ref(), v.as_ref());
        out.extend_from_slice(&u16::try_from(k.len()).expect("key fits in u16").to_le_bytes());
        out.extend_from_slice(k);
        out.extend_from_slice(&u16::try_from(v.len()).expect("value fits in u16").to_le_bytes());
        out.extend_from_slice(v);
    }
    out
}

/// The 4-byte header `[modifier1, datasize u16 LE, modifier2]`.
pub fn encode_header(modifier1: u8, datasize: u16, modifier2: u8) -> [u8; 4] {
    let [lo, hi] = datasize.to_le_bytes();
    [modifier1, lo, hi, modifier2]
}

/// Header and vars block, without the body. Panics if the block exceeds the u16 datasize.
pub fn encode_packet<K: AsRef<[u8]>, V: AsRef<[u8]>>(modifier1: u8, vars: &[(K, V)], modifier2: u8) -> Vec<u8> {
    encode_packet_with_block(modifier1, &encode_vars(vars), modifier2)
}

/// A header whose datasize covers `block`, then `block` as given: for vars blocks a test has made malformed on
/// purpose. Panics if the block exceeds the u16 datasize.
pub fn encode_packet_with_block(modifier1: u8, block: &[u8], modifier2: u8) -> Vec<u8> {
    let size = u16::try_from(block.len()).expect("vars block fits in the u16 datasize");
    let mut out = encode_header(modifier1, size, modifier2).to_vec();
    out.extend_from_slice(block);
    out
}

/// A whole WSGI request (modifier 0/0) with its body appended, ready for a single write.
pub fn encode_request<K: AsRef<[u8]>, V: AsRef<[u8]>>(vars: &[(K, V)], body: &[u8]) -> Vec<u8> {
    let mut out = encode_packet(MODIFIER_WSGI, vars, 0);
    out.extend_from_slice(body);
    out
}

/// The datasize field of a packet, read straight from its bytes 1 and 2 (independent of the parser under test).
pub fn datasize_of(packet: &[u8]) -> usize {
    usize::from(u16::from_le_bytes([packet[1], packet[2]]))
}

/// Offsets (from the start of the vars block) of every u16 length prefix, keys and values alternating. Walks
/// the block with its own code, so the negative tests do not trust the parser; panics unless the block is
/// well formed.
pub fn length_offsets(block: &[u8]) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut pos = 0;
    while pos < block.len() {
        offsets.push(pos);
        let len = usize::from(u16::from_le_bytes([block[pos], block[pos + 1]]));
        pos += 2 + len;
    }
    assert_eq!(pos, block.len(), "vars block is not well formed");
    offsets
}

/// Sends one request (vars and body in one write) and reads the raw response to EOF.
/// Panics if the server reset the connection instead of closing it.
pub fn request<S: Read + Write, K: AsRef<[u8]>, V: AsRef<[u8]>>(
    stream: &mut S,
    vars: &[(K, V)],
    body: &[u8],
) -> Vec<u8> {
    let raw = send_raw(stream, &encode_request(vars, body));
    assert!(
        !raw.reset,
        "connection reset by the server after {} bytes: {:?}",
        raw.bytes.len(),
        String::from_utf8_lossy(&raw.bytes)
    );
    raw.bytes
}

/// What came back before the server closed the connection, and whether the close was abrupt.
#[derive(Debug)]
pub struct Raw {
    pub bytes: Vec<u8>,
    /// ECONNRESET (TCP RST, or AF_UNIX close with unread data) rather than an orderly EOF.
    pub reset: bool,
}

impl Raw {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// Writes `bytes` as they are (a write refused because the server already closed is not an error:
/// the server may answer early) and reads until the server closes.
pub fn send_raw<S: Read + Write>(stream: &mut S, bytes: &[u8]) -> Raw {
    if let Err(e) = stream.write_all(bytes).and_then(|()| stream.flush()) {
        assert!(is_reset_error(&e), "write to the server failed: {e}");
    }
    read_to_close(stream)
}

/// Reads until EOF or a reset; panics on a timeout (a server that never closes is a bug).
pub fn read_to_close<R: Read>(stream: &mut R) -> Raw {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                return Raw { bytes, reset: false };
            }
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_reset_error(&e) => return Raw { bytes, reset: true },
            Err(e) => panic!(
                "reading the response failed after {} bytes ({e}); so far: {:?}",
                bytes.len(),
                String::from_utf8_lossy(&bytes[..bytes.len().min(2000)])
            ),
        }
    }
}

/// Reads until `needle` has arrived (or panics at EOF/timeout); returns everything read so far.
pub fn read_until<R: Read>(stream: &mut R, needle: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    while !bytes.windows(needle.len()).any(|w| w == needle) {
        match stream.read(&mut buf) {
            Ok(0) => panic!(
                "EOF before {:?} arrived; got {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&bytes)
            ),
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!(
                "waiting for {:?} failed ({e}); got {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&bytes)
            ),
        }
    }
    bytes
}

/// Errors that mean the peer went away abruptly.
pub fn is_reset_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted
    )
}

/// An ordered uwsgi var list; duplicates allowed, as nginx sends a repeated header twice.
#[derive(Debug, Clone, Default)]
pub struct Vars(pub Vec<(Vec<u8>, Vec<u8>)>);

impl Vars {
    /// Replaces the first `key` (dropping later duplicates) or appends it.
    pub fn set(mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Self {
        let key = key.as_ref();
        match self.0.iter().position(|(k, _)| k == key) {
            Some(i) => {
                self.0[i].1 = value.as_ref().to_vec();
                let mut seen = 0;
                self.0.retain(|(k, _)| {
                    if k == key {
                        seen += 1;
                        seen == 1
                    } else {
                        true
                    }
                });
            }
            None => self.0.push((key.to_vec(), value.as_ref().to_vec())),
        }
        self
    }

    /// Appends `key`, even if it is already present.
    pub fn add(mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Self {
        self.0.push((key.as_ref().to_vec(), value.as_ref().to_vec()));
        self
    }

    pub fn remove(mut self, key: impl AsRef<[u8]>) -> Self {
        self.0.retain(|(k, _)| k != key.as_ref());
        self
    }

    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(k, _)| k == key.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    pub fn as_slice(&self) -> &[(Vec<u8>, Vec<u8>)] {
        &self.0
    }

    pub fn encode(&self) -> Vec<u8> {
        encode_vars(&self.0)
    }
}

/// The vars nginx's stock `uwsgi_params` plus its HTTP_* header vars would send for `method uri`.
/// With a body, CONTENT_LENGTH/CONTENT_TYPE are set and (like nginx) also sent as HTTP_CONTENT_* twins;
/// without one they are empty strings, as `$content_length`/`$content_type` are.
pub fn nginx_vars(method: &str, uri: &str, body: &[u8]) -> Vars {
    let (path, query) = match uri.split_once('?') {
        Some((p, q)) => (p, q),
        None => (uri, ""),
    };
    let (content_length, content_type) = if body.is_empty() {
        (String::new(), "")
    } else {
        (body.len().to_string(), "application/octet-stream")
    };
    let mut vars = Vars::default()
        .add("QUERY_STRING", query)
        .add("REQUEST_METHOD", method)
        .add("CONTENT_TYPE", content_type)
        .add("CONTENT_LENGTH", &content_length)
        .add("REQUEST_URI", uri)
        .add("PATH_INFO", path)
        .add("DOCUMENT_ROOT", "/usr/share/nginx/html")
        .add("SERVER_PROTOCOL", "HTTP/1.1")
        .add("REQUEST_SCHEME", "http")
        .add("HTTPS", "")
        .add("REMOTE_ADDR", "127.0.0.1")
        .add("REMOTE_PORT", "54321")
        .add("SERVER_PORT", "80")
        .add("SERVER_NAME", "localhost")
        .add("HTTP_HOST", "localhost")
        .add("HTTP_USER_AGENT", "ferrule-tests");
    if !body.is_empty() {
        vars = vars
            .add("HTTP_CONTENT_LENGTH", &content_length)
            .add("HTTP_CONTENT_TYPE", content_type);
    }
    vars
}

/// Splits raw response bytes into status line, headers and body; panics (showing the bytes) if malformed.
pub fn parse_response(raw: &[u8]) -> Response {
    let shown = || String::from_utf8_lossy(&raw[..raw.len().min(2000)]).into_owned();
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers (CRLF CRLF) in response: {:?}", shown()));
    let head = std::str::from_utf8(&raw[..end]).unwrap_or_else(|_| panic!("response head is not UTF-8: {:?}", shown()));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("").to_owned();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    assert_eq!(
        version,
        "HTTP/1.1",
        "status line {status_line:?} in response {:?}",
        shown()
    );
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("no status code in {status_line:?}"));
    let headers = lines
        .map(|line| {
            let (k, v) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("header line without a colon: {line:?} in {:?}", shown()));
            (k.to_owned(), v.trim_start_matches([' ', '\t']).to_owned())
        })
        .collect();
    Response {
        status_line,
        status,
        headers,
        body: raw[end + 4..].to_vec(),
        end: BodyEnd::Complete,
        local_port: None,
    }
}
