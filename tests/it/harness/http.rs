//! A small blocking HTTP/1.1 client for talking to the nginx in front of ferrule, which tells a
//! complete response body apart from a truncated one.
//!
//! Why not an HTTP crate: the tests need to see exactly how a body ended (terminating chunk,
//! short `Content-Length`, reset), which client crates smooth over or turn into one generic error.
//! One request per connection (`Connection: close`), so every response ends in a way we can judge.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use super::response::{BodyEnd, Response};

/// Every single read or write on the socket gives up after this long. Generous because the
/// tests move tens of megabytes through nginx on a 2-core machine, and a debug-built server is slow.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// The body of a request we send.
#[derive(Debug, Clone, Copy)]
pub enum ReqBody<'a> {
    Empty,
    /// Sent with `Content-Length`.
    Fixed(&'a [u8]),
    /// Sent with `Transfer-Encoding: chunked`, one chunk per slice (empty slices are skipped,
    /// since a zero-size chunk would end the body).
    Chunked(&'a [&'a [u8]]),
}

fn header_in<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Something that went wrong while reading, before it is judged as a [`BodyEnd`].
#[derive(Debug)]
enum ReadErr {
    Eof,
    Reset,
    TimedOut,
    Other(io::Error),
}

impl ReadErr {
    fn from_io(e: io::Error) -> ReadErr {
        match e.kind() {
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe => {
                ReadErr::Reset
            }
            // A socket read timeout surfaces as WouldBlock on Linux.
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ReadErr::TimedOut,
            _ => ReadErr::Other(e),
        }
    }

    fn into_end(self, eof_means: BodyEnd) -> BodyEnd {
        match self {
            ReadErr::Eof => eof_means,
            ReadErr::Reset => BodyEnd::Reset,
            ReadErr::TimedOut => BodyEnd::TimedOut,
            ReadErr::Other(e) => BodyEnd::BadFraming(format!("read error: {e}")),
        }
    }
}

/// A socket with a read buffer, so the head, chunk size lines and chunk data can be taken apart.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
}

impl Conn {
    fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Read once from the socket into the buffer; `Eof` when the peer closed.
    fn fill(&mut self) -> Result<(), ReadErr> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        let mut tmp = [0u8; 64 * 1024];
        loop {
            match self.stream.read(&mut tmp) {
                Ok(0) => return Err(ReadErr::Eof),
                Ok(n) => {
                    self.buf.extend_from_slice(&tmp[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ReadErr::from_io(e)),
            }
        }
    }

    /// A line ending in CRLF, without the CRLF.
    fn read_line(&mut self) -> Result<Vec<u8>, ReadErr> {
        loop {
            if let Some(i) = self.buffered().windows(2).position(|w| w == b"\r\n") {
                let line = self.buffered()[..i].to_vec();
                self.pos += i + 2;
                return Ok(line);
            }
            self.fill()?;
        }
    }

    /// Up to `n` bytes into `out`; on an error `out` keeps what did arrive.
    fn read_n_into(&mut self, n: usize, out: &mut Vec<u8>) -> Result<(), ReadErr> {
        let mut left = n;
        while left > 0 {
            if self.buffered().is_empty() {
                self.fill()?;
            }
            let take = left.min(self.buffered().len());
            out.extend_from_slice(&self.buffered()[..take]);
            self.pos += take;
            left -= take;
        }
        Ok(())
    }

    /// Whatever is buffered, or one read's worth from the socket.
    fn read_some(&mut self) -> Result<Vec<u8>, ReadErr> {
        if self.buffered().is_empty() {
            self.fill()?;
        }
        let out = self.buffered().to_vec();
        self.pos = self.buf.len();
        Ok(out)
    }
}

/// How the body after the head is framed.
#[derive(Debug, Clone, Copy)]
enum Framing {
    None,
    Chunked,
    Length(u64),
    UntilClose,
}

/// A blocking client for one nginx port, with a cookie jar shared by its requests.
pub struct Client {
    pub port: u16,
    /// name -> value, filled from `Set-Cookie` and sent back as one `Cookie` header.
    pub cookies: BTreeMap<String, String>,
}

impl Client {
    pub fn new(port: u16) -> Client {
        Client {
            port,
            cookies: BTreeMap::new(),
        }
    }

    pub fn get(&mut self, path: &str) -> Response {
        self.request("GET", path, &[], ReqBody::Empty)
    }

    /// Sends one request on a fresh connection and reads the response to its end.
    pub fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: ReqBody) -> Response {
        let mut s = self.stream(method, path, headers, body);
        let mut out = Vec::new();
        let end = loop {
            match s.next_chunk() {
                StreamEvent::Data(_, bytes) => out.extend_from_slice(&bytes),
                StreamEvent::End(end) => break end,
            }
        };
        Response {
            status_line: s.status_line.clone(),
            status: s.status,
            headers: s.headers.clone(),
            body: out,
            end,
            local_port: Some(s.local_port),
        }
    }

    /// Sends one request and reads only the head; the body is read chunk by chunk with
    /// [`StreamingResponse::next_chunk`], each stamped with the time it arrived.
    pub fn stream(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: ReqBody) -> StreamingResponse {
        let stream = TcpStream::connect(("127.0.0.1", self.port))
            .unwrap_or_else(|e| panic!("connect to nginx on 127.0.0.1:{}: {e}", self.port));
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("set read timeout");
        stream.set_write_timeout(Some(IO_TIMEOUT)).expect("set write timeout");
        stream.set_nodelay(true).ok();
        let local_port = stream.local_addr().expect("local addr").port();

        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost:{}\r\nConnection: close\r\n",
            self.port
        );
        let caller_sets_cookie = headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("cookie"));
        if !caller_sets_cookie && !self.cookies.is_empty() {
            let jar: Vec<String> = self.cookies.iter().map(|(k, v)| format!("{k}={v}")).collect();
            head.push_str(&format!("Cookie: {}\r\n", jar.join("; ")));
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        match body {
            ReqBody::Empty => {}
            ReqBody::Fixed(b) => head.push_str(&format!("Content-Length: {}\r\n", b.len())),
            ReqBody::Chunked(_) => head.push_str("Transfer-Encoding: chunked\r\n"),
        }
        head.push_str("\r\n");

        // If nginx answers early (413, 400) it may close while we are still writing; the
        // response it already sent is what the test wants to see, so a failed write is not fatal.
        let mut writer = &stream;
        let write_result = (|| -> io::Result<()> {
            writer.write_all(head.as_bytes())?;
            match body {
                ReqBody::Empty => {}
                ReqBody::Fixed(b) => writer.write_all(b)?,
                ReqBody::Chunked(chunks) => {
                    for c in chunks.iter().filter(|c| !c.is_empty()) {
                        writer.write_all(format!("{:x}\r\n", c.len()).as_bytes())?;
                        writer.write_all(c)?;
                        writer.write_all(b"\r\n")?;
                    }
                    writer.write_all(b"0\r\n\r\n")?;
                }
            }
            writer.flush()
        })();

        let mut conn = Conn {
            stream,
            buf: Vec::new(),
            pos: 0,
        };
        let status_line = conn.read_line().unwrap_or_else(|e| {
            panic!("{method} {path}: no response status line from nginx ({e:?}); write result: {write_result:?}")
        });
        let status_line = String::from_utf8_lossy(&status_line).into_owned();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        assert!(
            version.starts_with("HTTP/1."),
            "{method} {path}: bad status line {status_line:?}"
        );
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{method} {path}: bad status line {status_line:?}"));

        let mut resp_headers = Vec::new();
        loop {
            let line = conn
                .read_line()
                .unwrap_or_else(|e| panic!("{method} {path}: response head cut short ({e:?})"));
            if line.is_empty() {
                break;
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            let (k, v) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("{method} {path}: bad header line {line:?}"));
            resp_headers.push((k.trim().to_string(), v.trim().to_string()));
        }

        for (k, v) in &resp_headers {
            if k.eq_ignore_ascii_case("set-cookie") {
                self.store_cookie(v);
            }
        }

        let framing = if method.eq_ignore_ascii_case("HEAD") || status / 100 == 1 || status == 204 || status == 304 {
            Framing::None
        } else if header_in(&resp_headers, "transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            Framing::Chunked
        } else if let Some(cl) = header_in(&resp_headers, "content-length") {
            Framing::Length(
                cl.parse()
                    .unwrap_or_else(|_| panic!("{method} {path}: bad Content-Length {cl:?}")),
            )
        } else {
            Framing::UntilClose
        };

        StreamingResponse {
            status_line,
            status,
            headers: resp_headers,
            local_port,
            conn,
            framing,
            received: 0,
            finished: false,
        }
    }

    /// Keeps `name=value` from a `Set-Cookie` value; an empty value or `Max-Age=0` deletes it
    /// (that is how Django expires a cookie).
    fn store_cookie(&mut self, set_cookie: &str) {
        let mut attrs = set_cookie.split(';');
        let Some((name, value)) = attrs.next().and_then(|nv| nv.split_once('=')) else {
            return;
        };
        let (name, value) = (name.trim().to_string(), value.trim().trim_matches('"').to_string());
        let expired = attrs.any(|a| a.trim().eq_ignore_ascii_case("max-age=0"));
        if value.is_empty() || expired {
            self.cookies.remove(&name);
        } else {
            self.cookies.insert(name, value);
        }
    }
}

/// Shorthand for one request without cookies.
pub fn request(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: ReqBody) -> Response {
    Client::new(port).request(method, path, headers, body)
}

pub fn get(port: u16, path: &str) -> Response {
    Client::new(port).get(path)
}

/// Sends `head` (request line and headers, CRLF-separated, without the blank line; `Connection: close` is
/// added) to nginx and reads the answer to EOF. For request lines and header values that are not UTF-8, which
/// [`Client`] (taking `&str`) cannot send. Returns the status and the raw bytes after the head.
pub fn raw_http(port: u16, head: &[u8]) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("connect to nginx: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("read timeout");
    s.set_write_timeout(Some(Duration::from_secs(30)))
        .expect("write timeout");
    let mut req = head.to_vec();
    req.extend_from_slice(b"\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(&req).expect("write request to nginx");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap_or_else(|e| {
        panic!(
            "read answer from nginx: {e}; so far {:?}",
            String::from_utf8_lossy(&raw)
        )
    });
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body_at = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(raw.len(), |i| i + 4);
    (status, raw[body_at..].to_vec())
}

/// One step of reading a streamed body.
#[derive(Debug)]
pub enum StreamEvent {
    /// A piece of body (a decoded chunk when chunked, else one socket read) and when it arrived.
    Data(Instant, Vec<u8>),
    /// The body ended; `Complete` only when it ended as its framing says it should.
    End(BodyEnd),
}

/// A response whose head has been read; the body is read on demand.
pub struct StreamingResponse {
    pub status_line: String,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub local_port: u16,
    conn: Conn,
    framing: Framing,
    received: u64,
    finished: bool,
}

impl StreamingResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_in(&self.headers, name)
    }

    pub fn next_chunk(&mut self) -> StreamEvent {
        if self.finished {
            return StreamEvent::End(BodyEnd::Complete);
        }
        let event = match self.framing {
            Framing::None => StreamEvent::End(BodyEnd::Complete),
            Framing::UntilClose => match self.conn.read_some() {
                Ok(bytes) => StreamEvent::Data(Instant::now(), bytes),
                Err(e) => StreamEvent::End(e.into_end(BodyEnd::Complete)),
            },
            Framing::Length(total) => {
                if self.received >= total {
                    StreamEvent::End(BodyEnd::Complete)
                } else {
                    match self.conn.read_some() {
                        Ok(mut bytes) => {
                            // Anything past Content-Length is not body; keep exactly what was announced.
                            bytes.truncate((total - self.received) as usize);
                            self.received += bytes.len() as u64;
                            StreamEvent::Data(Instant::now(), bytes)
                        }
                        Err(e) => StreamEvent::End(e.into_end(BodyEnd::ShortContentLength {
                            expected: total,
                            got: self.received,
                        })),
                    }
                }
            }
            Framing::Chunked => self.next_decoded_chunk(),
        };
        if matches!(event, StreamEvent::End(_)) {
            self.finished = true;
        }
        event
    }

    fn next_decoded_chunk(&mut self) -> StreamEvent {
        let line = match self.conn.read_line() {
            Ok(line) => line,
            Err(e) => return StreamEvent::End(e.into_end(BodyEnd::IncompleteChunked)),
        };
        let text = String::from_utf8_lossy(&line);
        // Chunk extensions (";name=value") are allowed after the size.
        let size_text = text.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            return StreamEvent::End(BodyEnd::BadFraming(format!("chunk size line {text:?}")));
        };
        if size == 0 {
            // Trailers (none expected) end with an empty line.
            loop {
                match self.conn.read_line() {
                    Ok(l) if l.is_empty() => return StreamEvent::End(BodyEnd::Complete),
                    Ok(_) => continue,
                    Err(e) => return StreamEvent::End(e.into_end(BodyEnd::IncompleteChunked)),
                }
            }
        }
        let mut data = Vec::with_capacity(size);
        if let Err(e) = self.conn.read_n_into(size, &mut data) {
            return StreamEvent::End(e.into_end(BodyEnd::IncompleteChunked));
        }
        let at = Instant::now();
        match self.conn.read_line() {
            Ok(l) if l.is_empty() => {}
            Ok(l) => {
                return StreamEvent::End(BodyEnd::BadFraming(format!("no CRLF after chunk data, got {l:?}")));
            }
            Err(e) => return StreamEvent::End(e.into_end(BodyEnd::IncompleteChunked)),
        }
        self.received += size as u64;
        StreamEvent::Data(at, data)
    }

    /// Reads the rest of the body, keeping each piece with its arrival time.
    pub fn collect_timed(mut self) -> (Vec<(Instant, Vec<u8>)>, BodyEnd) {
        let mut pieces = Vec::new();
        loop {
            match self.next_chunk() {
                StreamEvent::Data(at, bytes) => pieces.push((at, bytes)),
                StreamEvent::End(end) => return (pieces, end),
            }
        }
    }
}

impl Drop for StreamingResponse {
    fn drop(&mut self) {
        self.conn.stream.shutdown(Shutdown::Both).ok();
    }
}

/// Builds a `multipart/form-data` body; returns (content type header value, body).
pub fn multipart(fields: &[(&str, &str)], files: &[(&str, &str, &[u8])]) -> (String, Vec<u8>) {
    // The boundary must not occur in the data; the tests' data is text fields and
    // pseudo-random bytes, in which this 40-character string will not occur by chance.
    let boundary = "ferrule-test-boundary-7d9f2c41b0e35a86e1";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes(),
        );
    }
    for (name, filename, data) in files {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Percent-encodes a form value (`application/x-www-form-urlencoded`).
pub fn form_encode(pairs: &[(&str, &str)]) -> String {
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                b' ' => "+".to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Deterministic pseudo-random bytes (xorshift), so large bodies are not all one byte value and a
/// shifted or repeated block changes the checksum.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// SHA-256 as lowercase hex (FIPS 180-4), written out here so the harness needs no hashing crate.
pub fn sha256_hex(data: &[u8]) -> String {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
        0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
        0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
        0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
        0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
        0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
        0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
    ];

    let mut compress = |block: &[u8]| {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16].wrapping_add(s0).wrapping_add(w[i - 7]).wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    };

    let mut blocks = data.chunks_exact(64);
    for block in &mut blocks {
        compress(block);
    }
    // Padding: 0x80, zeros, then the bit length as a big-endian u64, to a multiple of 64 bytes.
    let rest = blocks.remainder();
    let mut tail = rest.to_vec();
    tail.push(0x80);
    while tail.len() % 64 != 56 {
        tail.push(0);
    }
    tail.extend_from_slice(&((data.len() as u64).wrapping_mul(8)).to_be_bytes());
    for block in tail.chunks_exact(64) {
        compress(block);
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}
