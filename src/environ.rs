//! Packet vars to the CGI half of a PEP 3333 environ: joining repeated headers, fallbacks, the body length
//! and the URL scheme. Pure: bytes in, bytes out; the Python strings are made in `app`.

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};

use crate::packet::Var;

/// `wsgi.url_scheme`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlScheme {
    Http,
    Https,
}

/// The request as the app will see it, before conversion to Python objects.
///
/// Its keys and values are mostly ranges of the packet they were decoded from, which it holds: building it
/// takes no reference count per var, and the vars it looks at itself are found by position, not by a scan.
#[derive(Debug, Clone)]
pub struct Environ {
    /// The buffer the packet was decoded from.
    packet: Bytes,
    /// CGI vars in the order nginx sent them: repeated headers joined, `HTTP_CONTENT_*` twins removed and
    /// fallbacks (`SCRIPT_NAME`, `SERVER_NAME`, ...) appended.
    vars: Vec<(Text, Text)>,
    /// Where each of the [`Known`] keys is in `vars`.
    known: [Option<u16>; Known::COUNT],
    pub url_scheme: UrlScheme,
    /// Length of the body that follows the vars (`CONTENT_LENGTH`, empty or missing = 0).
    pub content_length: u64,
    pub method: Bytes,
    /// The packet had vars but no `REQUEST_METHOD` (a `location` without `include uwsgi_params;`), so the
    /// method was taken to be GET.
    pub method_defaulted: bool,
    /// What the access log shows: `REQUEST_URI`, else `PATH_INFO?QUERY_STRING`.
    pub log_path: Bytes,
}

/// A key or a value of the environ: a range of the packet, or bytes of its own (a joined header, a fallback).
#[derive(Debug, Clone)]
enum Text {
    /// `packet[start..start + len]`.
    At {
        start: u32,
        len: u32,
    },
    Static(&'static [u8]),
    Own(Bytes),
}

/// The vars the environ builder reads or fills in itself, found by position instead of by a scan.
#[derive(Debug, Clone, Copy)]
enum Known {
    RequestMethod,
    ContentLength,
    ContentType,
    UwsgiScheme,
    Https,
    RequestScheme,
    ScriptName,
    RequestUri,
    PathInfo,
    QueryString,
    ServerProtocol,
    HttpHost,
    ServerName,
    ServerPort,
}

impl Known {
    const COUNT: usize = 14;

    fn of(key: &[u8]) -> Option<Known> {
        // Told apart by length and a few bytes first, so the many other keys of a packet cost no comparison of
        // their bytes; the whole key is compared once at the end.
        let (&first, &last) = (key.first()?, key.last()?);
        let known = match (key.len(), first, last) {
            (14, b'R', b'D') => Known::RequestMethod,
            (14, b'C', b'H') => Known::ContentLength,
            (12, b'C', b'E') => Known::ContentType,
            (12, b'U', b'E') => Known::UwsgiScheme,
            (5, b'H', b'S') => Known::Https,
            (14, b'R', b'E') => Known::RequestScheme,
            (11, b'S', b'E') if key[1] == b'C' => Known::ScriptName,
            (11, b'S', b'E') => Known::ServerName,
            (11, b'R', b'I') => Known::RequestUri,
            (9, b'P', b'O') => Known::PathInfo,
            (12, b'Q', b'G') => Known::QueryString,
            (15, b'S', b'L') => Known::ServerProtocol,
            (9, b'H', b'T') => Known::HttpHost,
            (11, b'S', b'T') => Known::ServerPort,
            _ => return None,
        };
        (key == known.key()).then_some(known)
    }

    /// The key of each, in the order of their declaration.
    const KEYS: [&'static [u8]; Known::COUNT] = [
        b"REQUEST_METHOD",
        b"CONTENT_LENGTH",
        b"CONTENT_TYPE",
        b"UWSGI_SCHEME",
        b"HTTPS",
        b"REQUEST_SCHEME",
        b"SCRIPT_NAME",
        b"REQUEST_URI",
        b"PATH_INFO",
        b"QUERY_STRING",
        b"SERVER_PROTOCOL",
        b"HTTP_HOST",
        b"SERVER_NAME",
        b"SERVER_PORT",
    ];

    fn key(self) -> &'static [u8] {
        Known::KEYS[self as usize]
    }
}

/// Why the vars do not make a request the app can be called with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvironError {
    #[error("invalid CONTENT_LENGTH {0:?}")]
    InvalidContentLength(String),
    #[error("missing REQUEST_METHOD")]
    MissingMethod,
    #[error("conflicting CONTENT_LENGTH values {0:?} and {1:?}")]
    ConflictingContentLength(String, String),
}

/// Above this many vars, repeated keys are found through a hash map, so a hostile block of thousands of tiny
/// vars costs linear time; a typical nginx packet (about 20 vars) is checked against a small bit set of the
/// keys seen so far, which needs a scan only when two keys share a bit.
const SCAN_LIMIT: usize = 32;

impl Environ {
    /// The vars in order, as (key, value).
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&[u8], &[u8])> + '_ {
        self.vars.iter().map(|(k, v)| (self.text(k), self.text(v)))
    }

    /// The value of a var, if present.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        if let Some(known) = Known::of(key) {
            return self.known(known);
        }
        self.vars
            .iter()
            .find(|(k, _)| self.text(k) == key)
            .map(|(_, v)| self.text(v))
    }

    /// The value of a var as its own `Bytes` (sharing the packet's buffer), if present.
    pub fn get_shared(&self, key: &[u8]) -> Option<Bytes> {
        let at = self.vars.iter().position(|(k, _)| self.text(k) == key)?;
        Some(self.shared(&self.vars[at].1))
    }

    fn text<'a>(&'a self, t: &'a Text) -> &'a [u8] {
        match t {
            Text::At { start, len } => &self.packet[*start as usize..(*start + *len) as usize],
            Text::Static(s) => s,
            Text::Own(b) => b,
        }
    }

    fn shared(&self, t: &Text) -> Bytes {
        match t {
            Text::At { start, len } => self.packet.slice(*start as usize..(*start + *len) as usize),
            Text::Static(s) => Bytes::from_static(s),
            Text::Own(b) => b.clone(),
        }
    }

    fn known(&self, known: Known) -> Option<&[u8]> {
        let at = self.known[known as usize]?;
        Some(self.text(&self.vars[usize::from(at)].1))
    }

    fn known_shared(&self, known: Known) -> Option<Bytes> {
        let at = self.known[known as usize]?;
        Some(self.shared(&self.vars[usize::from(at)].1))
    }

    /// Builds the environ from a packet's vars. `buf` is the buffer the vars borrow from, so keys and values are
    /// ranges of it instead of copies.
    pub fn from_vars(buf: &Bytes, vars: &[Var<'_>]) -> Result<Environ, EnvironError> {
        let mut env = Environ {
            packet: buf.clone(),
            vars: Vec::with_capacity(vars.len() + 4),
            known: [None; Known::COUNT],
            url_scheme: UrlScheme::Http,
            content_length: 0,
            method: Bytes::new(),
            method_defaulted: false,
            log_path: Bytes::new(),
        };
        let http_content_type = env.merge_vars(vars)?;
        env.method = match env.known_shared(Known::RequestMethod) {
            Some(m) if !m.is_empty() => m,
            // nginx's own tests of uwsgi backends set a few params and no method; uWSGI calls the app and
            // gunicorn takes GET. An empty method, or no vars at all, is no request.
            None if !vars.is_empty() => {
                env.set(Known::RequestMethod, Text::Static(b"GET"));
                env.method_defaulted = true;
                Bytes::from_static(b"GET")
            }
            _ => return Err(EnvironError::MissingMethod),
        };
        env.content_length = parse_content_length(env.known(Known::ContentLength))?;
        env.url_scheme = url_scheme(&env);
        if env.known(Known::ContentType).is_none() {
            if let Some(ct) = http_content_type {
                env.set(Known::ContentType, ct);
            }
        }
        env.apply_fallbacks();
        env.log_path = env.path_for_log();
        Ok(env)
    }

    /// `s` as a range of the packet, or a copy when it is not part of it (a part of a value of the environ's own).
    fn at(&self, s: &[u8]) -> Text {
        let base = self.packet.as_ptr() as usize;
        let offset = (s.as_ptr() as usize).wrapping_sub(base);
        match (u32::try_from(offset), u32::try_from(s.len())) {
            (Ok(start), Ok(len)) if offset + s.len() <= self.packet.len() => Text::At { start, len },
            _ => Text::Own(Bytes::copy_from_slice(s)),
        }
    }

    /// Appends a var, noting where a known one is.
    fn push(&mut self, key: Text, value: Text) {
        if let Some(known) = Known::of(self.text(&key)) {
            self.known[known as usize] = u16::try_from(self.vars.len()).ok();
        }
        self.vars.push((key, value));
    }

    /// Sets a known var: replaced where it is, else appended.
    fn set(&mut self, known: Known, value: Text) {
        match self.known[known as usize] {
            Some(at) => self.vars[usize::from(at)].1 = value,
            None => self.push(Text::Static(known.key()), value),
        }
    }

    /// What the access log shows: `REQUEST_URI`, else `SCRIPT_NAME` + `PATH_INFO` + `?QUERY_STRING`.
    fn path_for_log(&self) -> Bytes {
        match self.known_shared(Known::RequestUri) {
            Some(uri) if !uri.is_empty() => uri,
            _ => {
                let mut p = BytesMut::new();
                p.extend_from_slice(self.known(Known::ScriptName).unwrap_or_default());
                p.extend_from_slice(self.known(Known::PathInfo).unwrap_or_default());
                if let Some(q) = self.known(Known::QueryString).filter(|q| !q.is_empty()) {
                    p.extend_from_slice(b"?");
                    p.extend_from_slice(q);
                }
                p.freeze()
            }
        }
    }

    /// Fills in what PEP 3333 requires and a bare uwsgi client may leave out.
    fn apply_fallbacks(&mut self) {
        // SCRIPT_NAME is always present; "/" means the root, which PEP 3333 spells as "".
        match self.known(Known::ScriptName) {
            None | Some(b"/") => self.set(Known::ScriptName, Text::Static(b"")),
            Some(_) => {}
        }
        if self.known(Known::PathInfo).is_none() || self.known(Known::QueryString).is_none() {
            let uri = self.known(Known::RequestUri).unwrap_or_default();
            let (uri_path, uri_query) = match uri.iter().position(|&b| b == b'?') {
                Some(q) => (&uri[..q], Some(&uri[q + 1..])),
                None => (uri, None),
            };
            let query = uri_query.map_or(Text::Static(b""), |q| self.at(q));
            let path = self.known(Known::PathInfo).is_none().then(|| {
                let script = self.known(Known::ScriptName).unwrap_or_default();
                let decoded = percent_decode(uri_path);
                let path = match decoded.strip_prefix(script) {
                    Some(rest) if !script.is_empty() => rest.to_vec(),
                    _ => decoded,
                };
                if path.is_empty() && script.is_empty() {
                    Text::Static(b"/")
                } else {
                    Text::Own(Bytes::from(path))
                }
            });
            if let Some(path) = path {
                self.set(Known::PathInfo, path);
            }
            if self.known(Known::QueryString).is_none() {
                self.set(Known::QueryString, query);
            }
        }
        if self.known(Known::ServerProtocol).is_none_or(<[u8]>::is_empty) {
            self.set(Known::ServerProtocol, Text::Static(b"HTTP/1.1"));
        }
        let host = self.known(Known::HttpHost).unwrap_or_default();
        let (host_name, host_port) = split_host(host);
        let name = if host_name.is_empty() {
            Text::Static(b"localhost")
        } else {
            self.at(host_name)
        };
        let port = match host_port {
            Some(p) => self.at(p),
            None if self.url_scheme == UrlScheme::Https => Text::Static(b"443"),
            None => Text::Static(b"80"),
        };
        if self.known(Known::ServerName).is_none_or(<[u8]>::is_empty) {
            self.set(Known::ServerName, name);
        }
        if self.known(Known::ServerPort).is_none_or(<[u8]>::is_empty) {
            self.set(Known::ServerPort, port);
        }
    }

    /// Appends the vars in the order nginx sent them, each key once: repeated headers joined, a repeated
    /// param's later value kept, `HTTP_CONTENT_LENGTH` dropped; `HTTP_CONTENT_TYPE` is returned aside (PEP
    /// 3333: CONTENT_TYPE and CONTENT_LENGTH have no HTTP_ twins), for when the packet has no `CONTENT_TYPE`.
    fn merge_vars(&mut self, vars: &[Var<'_>]) -> Result<Option<Text>, EnvironError> {
        let mut index: Option<HashMap<&[u8], usize>> =
            (vars.len() > SCAN_LIMIT).then(|| HashMap::with_capacity(vars.len()));
        let mut seen = KeyBits::default();
        let mut http_content_type = None;
        for var in vars {
            match var.key {
                b"HTTP_CONTENT_LENGTH" => continue,
                b"HTTP_CONTENT_TYPE" => {
                    http_content_type = Some(self.at(var.value));
                    continue;
                }
                _ => {}
            }
            let existing = match &index {
                Some(map) => map.get(var.key).copied(),
                None if seen.insert(var.key) => None,
                None => self.vars.iter().position(|(k, _)| self.text(k) == var.key),
            };
            match existing {
                // A client cannot send Host twice (nginx refuses it), so a repeated HTTP_HOST comes from the
                // configuration: `uwsgi_param HTTP_HOST ...;` after `include uwsgi_params;` overrides it.
                Some(at) if var.key == b"HTTP_HOST" => self.vars[at].1 = self.at(var.value),
                // The length decides where the body ends: two different ones cannot both be honoured.
                Some(at) if var.key == b"CONTENT_LENGTH" && self.text(&self.vars[at].1) != var.value => {
                    return Err(EnvironError::ConflictingContentLength(
                        String::from_utf8_lossy(self.text(&self.vars[at].1)).into_owned(),
                        String::from_utf8_lossy(var.value).into_owned(),
                    ));
                }
                // Older nginx sends a repeated request header as repeated vars; uWSGI keeps only one of them.
                Some(at) if var.key.starts_with(b"HTTP_") => {
                    let sep: &[u8] = if var.key == b"HTTP_COOKIE" { b"; " } else { b", " };
                    let old = self.text(&self.vars[at].1);
                    let mut joined = BytesMut::with_capacity(old.len() + sep.len() + var.value.len());
                    joined.extend_from_slice(old);
                    joined.extend_from_slice(sep);
                    joined.extend_from_slice(var.value);
                    self.vars[at].1 = Text::Own(joined.freeze());
                }
                // A param set twice in the nginx config: the later one wins, as nginx's own order suggests.
                Some(at) => self.vars[at].1 = self.at(var.value),
                None => {
                    if let Some(map) = &mut index {
                        map.insert(var.key, self.vars.len());
                    }
                    let (key, value) = (self.at(var.key), self.at(var.value));
                    self.push(key, value);
                }
            }
        }
        Ok(http_content_type)
    }
}

/// A small bit set of the keys seen so far, by a hash of their length and last bytes: a key whose bit is
/// clear is certainly new, so only a key whose bit was already set is looked for among the others.
#[derive(Default)]
struct KeyBits([u64; 4]);

impl KeyBits {
    /// Marks `key` seen; true if its bit was clear (the key is certainly new).
    fn insert(&mut self, key: &[u8]) -> bool {
        let tail = key.len().min(8);
        let mut last = [0u8; 8];
        last[..tail].copy_from_slice(&key[key.len() - tail..]);
        let h = (u64::from_le_bytes(last) ^ key.len() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56;
        let (word, bit) = ((h >> 6) as usize, 1u64 << (h & 63));
        let new = self.0[word] & bit == 0;
        self.0[word] |= bit;
        new
    }
}

/// `CONTENT_LENGTH`: empty or missing is 0; anything but plain decimal digits fitting a u64 is refused.
pub fn parse_content_length(value: Option<&[u8]>) -> Result<u64, EnvironError> {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Ok(0);
    };
    let invalid = || EnvironError::InvalidContentLength(String::from_utf8_lossy(value).into_owned());
    if value.len() > 20 || !value.iter().all(u8::is_ascii_digit) {
        return Err(invalid());
    }
    value.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)
            .and_then(|acc| acc.checked_add(u64::from(d - b'0')))
            .ok_or_else(invalid)
    })
}

/// `UWSGI_SCHEME`, else `HTTPS` on/1, else `REQUEST_SCHEME`, else http.
fn url_scheme(env: &Environ) -> UrlScheme {
    let scheme_of = |v: &[u8]| {
        if v.eq_ignore_ascii_case(b"https") {
            Some(UrlScheme::Https)
        } else if v.eq_ignore_ascii_case(b"http") {
            Some(UrlScheme::Http)
        } else {
            None
        }
    };
    if let Some(s) = env.known(Known::UwsgiScheme).and_then(scheme_of) {
        return s;
    }
    if let Some(v) = env.known(Known::Https) {
        if v.eq_ignore_ascii_case(b"on") || v == b"1" {
            return UrlScheme::Https;
        }
    }
    env.known(Known::RequestScheme)
        .and_then(scheme_of)
        .unwrap_or(UrlScheme::Http)
}

/// Splits a Host header into name and port: `example.com:8080`, `[::1]:8080`, `example.com`.
fn split_host(host: &[u8]) -> (&[u8], Option<&[u8]>) {
    if host.first() == Some(&b'[') {
        if let Some(end) = host.iter().position(|&b| b == b']') {
            let port = host[end + 1..].strip_prefix(b":").filter(|p| !p.is_empty());
            return (&host[..=end], port);
        }
        return (host, None);
    }
    match host.iter().rposition(|&b| b == b':') {
        Some(colon) if colon + 1 < host.len() => (&host[..colon], Some(&host[colon + 1..])),
        Some(colon) => (&host[..colon], None),
        None => (host, None),
    }
}

/// Percent-decodes a URI path, as nginx does for `$document_uri`; malformed escapes stay as they are.
fn percent_decode(s: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            if let (Some(h), Some(l)) = (hex(s[i + 1]), hex(s[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(vars: &[(&str, &str)]) -> Result<Environ, EnvironError> {
        let mut buf = Vec::new();
        let mut spans = Vec::new();
        for (k, v) in vars {
            let ks = buf.len();
            buf.extend_from_slice(k.as_bytes());
            let vs = buf.len();
            buf.extend_from_slice(v.as_bytes());
            spans.push((ks..vs, vs..buf.len()));
        }
        let buf = Bytes::from(buf);
        let parsed: Vec<Var<'_>> = spans
            .iter()
            .map(|(k, v)| Var {
                key: &buf[k.clone()],
                value: &buf[v.clone()],
            })
            .collect();
        Environ::from_vars(&buf, &parsed)
    }

    fn get<'e>(env: &'e Environ, key: &str) -> Option<&'e str> {
        env.get(key.as_bytes()).map(|v| std::str::from_utf8(v).unwrap())
    }

    #[test]
    fn joins_repeated_headers_and_cookies() {
        let env = env_of(&[
            ("REQUEST_METHOD", "GET"),
            ("HTTP_X_DUP", "one"),
            ("HTTP_COOKIE", "a=1"),
            ("HTTP_X_DUP", "two"),
            ("HTTP_COOKIE", "b=2"),
        ])
        .unwrap();
        assert_eq!(get(&env, "HTTP_X_DUP"), Some("one, two"));
        assert_eq!(get(&env, "HTTP_COOKIE"), Some("a=1; b=2"));
    }

    #[test]
    fn joins_through_the_hash_map_past_the_scan_limit() {
        let mut vars: Vec<(String, String)> = (0..100).map(|i| (format!("HTTP_X_{i}"), "v".into())).collect();
        vars.push(("REQUEST_METHOD".into(), "GET".into()));
        vars.push(("HTTP_X_7".into(), "w".into()));
        let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let env = env_of(&refs).unwrap();
        assert_eq!(get(&env, "HTTP_X_7"), Some("v, w"));
    }

    #[test]
    fn drops_http_content_twins_and_keeps_cgi_ones() {
        let env = env_of(&[
            ("REQUEST_METHOD", "POST"),
            ("CONTENT_LENGTH", "3"),
            ("HTTP_CONTENT_LENGTH", "3"),
            ("HTTP_CONTENT_TYPE", "text/plain"),
        ])
        .unwrap();
        assert_eq!(env.content_length, 3);
        assert_eq!(get(&env, "HTTP_CONTENT_LENGTH"), None);
        assert_eq!(get(&env, "HTTP_CONTENT_TYPE"), None);
        // With no CONTENT_TYPE var, the header's value is not lost.
        assert_eq!(get(&env, "CONTENT_TYPE"), Some("text/plain"));
    }

    #[test]
    fn content_length_rules() {
        assert_eq!(parse_content_length(None), Ok(0));
        assert_eq!(parse_content_length(Some(b"")), Ok(0));
        assert_eq!(parse_content_length(Some(b"1234")), Ok(1234));
        assert_eq!(parse_content_length(Some(b"18446744073709551615")), Ok(u64::MAX));
        for bad in [
            &b"-1"[..],
            b"abc",
            b"18446744073709551616",
            b"99999999999999999999999",
            b" 1",
            b"+1",
        ] {
            assert!(parse_content_length(Some(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_missing_method_is_get_but_an_empty_one_is_refused() {
        let env = env_of(&[("PATH_INFO", "/"), ("CONTENT_LENGTH", "2")]).unwrap();
        assert_eq!(env.method, "GET");
        assert!(env.method_defaulted);
        assert_eq!(get(&env, "REQUEST_METHOD"), Some("GET"));
        assert_eq!(env_of(&[]).unwrap_err(), EnvironError::MissingMethod);
        let empty = env_of(&[("REQUEST_METHOD", ""), ("PATH_INFO", "/")]);
        assert_eq!(empty.unwrap_err(), EnvironError::MissingMethod);
        assert!(!env_of(&[("REQUEST_METHOD", "GET")]).unwrap().method_defaulted);
    }

    #[test]
    fn a_repeated_host_keeps_the_last_value() {
        let env = env_of(&[
            ("REQUEST_METHOD", "GET"),
            ("HTTP_HOST", "127.0.0.1"),
            ("HTTP_HOST", "127.0.0.1:18081"),
        ])
        .unwrap();
        assert_eq!(get(&env, "HTTP_HOST"), Some("127.0.0.1:18081"));
        assert_eq!(get(&env, "SERVER_PORT"), Some("18081"));
    }

    #[test]
    fn repeated_content_lengths_must_agree() {
        let same = env_of(&[
            ("REQUEST_METHOD", "POST"),
            ("CONTENT_LENGTH", "3"),
            ("CONTENT_LENGTH", "3"),
        ]);
        assert_eq!(same.unwrap().content_length, 3);
        let conflict = env_of(&[
            ("REQUEST_METHOD", "POST"),
            ("CONTENT_LENGTH", "3"),
            ("CONTENT_LENGTH", "4"),
        ]);
        assert!(matches!(conflict, Err(EnvironError::ConflictingContentLength(..))));
    }

    #[test]
    fn scheme_precedence() {
        let s = |vars: &[(&str, &str)]| {
            let mut v = vec![("REQUEST_METHOD", "GET")];
            v.extend_from_slice(vars);
            env_of(&v).unwrap().url_scheme
        };
        assert_eq!(s(&[]), UrlScheme::Http);
        assert_eq!(s(&[("REQUEST_SCHEME", "https")]), UrlScheme::Https);
        assert_eq!(s(&[("HTTPS", "on"), ("REQUEST_SCHEME", "http")]), UrlScheme::Https);
        assert_eq!(s(&[("HTTPS", "1")]), UrlScheme::Https);
        assert_eq!(s(&[("HTTPS", "off"), ("REQUEST_SCHEME", "http")]), UrlScheme::Http);
        assert_eq!(s(&[("UWSGI_SCHEME", "http"), ("HTTPS", "on")]), UrlScheme::Http);
        assert_eq!(s(&[("UWSGI_SCHEME", "https")]), UrlScheme::Https);
    }

    #[test]
    fn fallbacks_for_a_bare_client() {
        let env = env_of(&[
            ("REQUEST_METHOD", "GET"),
            ("REQUEST_URI", "/caf%C3%A9/x?q=1"),
            ("HTTP_HOST", "example.com:8443"),
        ])
        .unwrap();
        assert_eq!(get(&env, "SCRIPT_NAME"), Some(""));
        assert_eq!(get(&env, "PATH_INFO"), Some("/café/x"));
        assert_eq!(get(&env, "QUERY_STRING"), Some("q=1"));
        assert_eq!(get(&env, "SERVER_NAME"), Some("example.com"));
        assert_eq!(get(&env, "SERVER_PORT"), Some("8443"));
        assert_eq!(get(&env, "SERVER_PROTOCOL"), Some("HTTP/1.1"));
        assert_eq!(&env.log_path[..], b"/caf%C3%A9/x?q=1");
    }

    #[test]
    fn server_name_falls_back_to_host_when_empty() {
        let env = env_of(&[
            ("REQUEST_METHOD", "GET"),
            ("SERVER_NAME", ""),
            ("HTTP_HOST", "[::1]:81"),
        ])
        .unwrap();
        assert_eq!(get(&env, "SERVER_NAME"), Some("[::1]"));
        assert_eq!(get(&env, "SERVER_PORT"), Some("81"));
        let env = env_of(&[("REQUEST_METHOD", "GET")]).unwrap();
        assert_eq!(get(&env, "SERVER_NAME"), Some("localhost"));
        assert_eq!(get(&env, "SERVER_PORT"), Some("80"));
    }

    #[test]
    fn script_name_slash_is_the_root() {
        let env = env_of(&[("REQUEST_METHOD", "GET"), ("SCRIPT_NAME", "/"), ("PATH_INFO", "/a")]).unwrap();
        assert_eq!(get(&env, "SCRIPT_NAME"), Some(""));
    }

    #[test]
    fn known_keys_are_found_and_only_they() {
        for known in [
            Known::RequestMethod,
            Known::ContentLength,
            Known::ContentType,
            Known::UwsgiScheme,
            Known::Https,
            Known::RequestScheme,
            Known::ScriptName,
            Known::RequestUri,
            Known::PathInfo,
            Known::QueryString,
            Known::ServerProtocol,
            Known::HttpHost,
            Known::ServerName,
            Known::ServerPort,
        ] {
            assert_eq!(Known::of(known.key()).map(|k| k as usize), Some(known as usize));
        }
        for other in [
            &b"REMOTE_ADDR"[..],
            b"REMOTE_PORT",
            b"SERVER_ADDR",
            b"HTTP_ACCEPT",
            b"SCRIPT_NAMX",
            b"",
            b"H",
        ] {
            assert!(Known::of(other).is_none(), "{}", String::from_utf8_lossy(other));
        }
    }

    #[test]
    fn percent_decoding_leaves_bad_escapes() {
        assert_eq!(percent_decode(b"/a%2"), b"/a%2");
        assert_eq!(percent_decode(b"/a%zz%41"), b"/a%zzA");
    }
}
