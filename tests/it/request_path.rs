//! Tier-3 tests: the real `ferrule` binary on a temp Unix socket and on 127.0.0.1:0, raw uwsgi bytes in, raw HTTP bytes out.
//!
//! Each test starts its own server (no fixed ports); every wait is bounded. Checks that matter for both
//! transports run through `on_both`, which starts one server per transport.

mod end_to_end;
mod frameworks;

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use std::{fs, thread};

use crate::harness::ferrule::{Addr, Ferrule, FerruleBuilder, apps_dir, listening_addrs};
use crate::harness::http::sha256_hex;
use crate::harness::json::{env_str, parse_json};
use crate::harness::log::count;
use crate::harness::nginx::Nginx;
use crate::harness::procs::poll_until;
use crate::harness::response::Response;
use crate::harness::server::{Server, probe_app};
use crate::harness::uwsgi::{
    MODIFIER_PING, Vars, encode_packet, encode_packet_with_block, encode_request, encode_vars, is_reset_error,
    nginx_vars, parse_response, read_to_close, read_until, request, send_raw,
};
use crate::harness::{LOG_WAIT, http};

/// How long a failing start-up or a graceful stop may take.
const EXIT_WAIT: Duration = Duration::from_secs(20);

// --- harness ----------------------------------------------------------------------------------------

/// The test app from tests/apps, found through --pythonpath.
fn cases() -> FerruleBuilder {
    FerruleBuilder::new("wsgi_cases:application")
        .arg("--pythonpath")
        .arg(apps_dir())
}

fn plain(b: FerruleBuilder) -> FerruleBuilder {
    b
}

/// Runs `check` against a fresh server on a Unix socket, then against one on loopback TCP.
fn on_both(configure: impl Fn(FerruleBuilder) -> FerruleBuilder, check: impl Fn(&Ferrule)) {
    for tcp in [false, true] {
        let builder = configure(cases());
        let builder = if tcp { builder.tcp() } else { builder.unix() };
        let f = builder.spawn();
        eprintln!("--- checking over {:?}", f.addr);
        check(&f);
    }
}

fn exchange(f: &Ferrule, vars: &Vars, body: &[u8]) -> Vec<u8> {
    let mut s = f.connect();
    request(&mut s, vars.as_slice(), body)
}

fn send(f: &Ferrule, vars: &Vars, body: &[u8]) -> Response {
    parse_response(&exchange(f, vars, body))
}

fn get(f: &Ferrule, uri: &str) -> Response {
    send(f, &nginx_vars("GET", uri, b""), b"")
}

fn post(f: &Ferrule, uri: &str, body: &[u8]) -> Response {
    send(f, &nginx_vars("POST", uri, body), body)
}

fn assert_still_serving(f: &Ferrule) {
    let r = get(f, "/hello");
    assert_eq!(
        r.status_line, "HTTP/1.1 200 OK",
        "the server stopped serving after the previous request"
    );
    assert_eq!(r.body, b"hello world");
}

/// `ascii(environ[key])` as the app sees it, for a GET whose vars `edit` adjusts.
fn environ_key(f: &Ferrule, key: &str, edit: impl FnOnce(Vars) -> Vars) -> String {
    let vars = edit(nginx_vars("GET", &format!("/environ/key?key={key}"), b""));
    let r = send(f, &vars, b"");
    assert_eq!(r.status, 200, "environ lookup of {key}: {}", r.text());
    r.text()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Polls for a file another process writes: there is no notification to wait on, so poll, bounded.
fn wait_for_file_containing(path: &Path, needle: &str, timeout: Duration) -> bool {
    poll_until(timeout, || fs::read_to_string(path).is_ok_and(|s| s.contains(needle)))
}

fn wait_for_path(path: &Path, timeout: Duration) -> bool {
    poll_until(timeout, || path.exists())
}

fn unix_path(f: &Ferrule) -> PathBuf {
    match &f.addr {
        Addr::Unix(p) => p.clone(),
        Addr::Tcp(a) => panic!("expected a Unix socket, got {a}"),
    }
}

/// Bytes with lines of awkward lengths (empty, 99/100/101 around readline(100), 8191..8193 around
/// read(8192), longer than any buffer) and every byte value but b'\n' inside lines.
fn test_body(len: usize, seed: u64) -> Vec<u8> {
    const LINE_LENGTHS: [usize; 12] = [0, 1, 37, 99, 100, 101, 250, 4096, 8191, 8192, 8193, 70_000];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::with_capacity(len + 70_001);
    while out.len() < len {
        let line_len = LINE_LENGTHS[(next() % LINE_LENGTHS.len() as u64) as usize];
        for _ in 0..line_len {
            let b = next() as u8;
            out.push(if b == b'\n' { b'N' } else { b });
        }
        out.push(b'\n');
    }
    out.truncate(len);
    out
}

/// 3 MiB + a bit: above the default 1 MiB --body-buffer-size, so the body spools to a temp file.
fn big_body() -> &'static (Vec<u8>, String) {
    static BIG: OnceLock<(Vec<u8>, String)> = OnceLock::new();
    BIG.get_or_init(|| {
        let body = test_body(3 * 1024 * 1024 + 17, 2);
        let digest = format!("{} {}", body.len(), sha256_hex(&body));
        (body, digest)
    })
}

fn digest(body: &[u8]) -> String {
    format!("{} {}", body.len(), sha256_hex(body))
}

// The hashing helper is checked against FIPS 180-4 vectors once, in tests/e2e_nginx.rs.

// --- start-up and logs ------------------------------------------------------------------------------

#[test]
fn listening_lines_name_the_real_addresses() {
    let f = cases().tcp().spawn();
    let Addr::Tcp(addr) = f.addr else {
        unreachable!("tcp() was asked for")
    };
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    assert_ne!(addr.port(), 0, "the log must give the port the kernel picked, not 0");

    let f = cases().unix().spawn();
    let path = unix_path(&f);
    assert!(
        f.log().contains(&format!("listening address=unix:{}", path.display())),
        "no `listening address=unix:<path>` line:\n{}",
        f.log()
    );
}

#[test]
fn logs_carry_no_ansi_colours() {
    let f = cases().spawn();
    get(&f, "/hello");
    assert!(
        !f.raw_log().contains('\u{1b}'),
        "escape codes in a log that is not a terminal:\n{:?}",
        f.raw_log()
    );
}

#[test]
fn one_ferrule_listens_on_unix_and_tcp_at_once() {
    let f = cases().arg("--socket").arg("127.0.0.1:0").spawn();
    let addrs = listening_addrs(&f.log());
    let tcp = addrs
        .iter()
        .find_map(|a| match a {
            Addr::Tcp(a) => Some(*a),
            Addr::Unix(_) => None,
        })
        .expect("a TCP listening line");
    assert!(addrs.contains(&f.addr), "no listening line for {:?}: {addrs:?}", f.addr);
    assert_still_serving(&f);
    let mut s = std::net::TcpStream::connect(tcp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let r = parse_response(&request(&mut s, nginx_vars("GET", "/hello", b"").as_slice(), b""));
    assert_eq!(r.body, b"hello world");
}

#[test]
fn bare_absolute_socket_path_means_unix() {
    let b = cases();
    let path = b.tempdir().join("bare.sock");
    let f = b.socket(path.to_str().unwrap()).spawn();
    assert_eq!(f.addr, Addr::Unix(path.clone()));
    assert!(fs::metadata(&path).unwrap().file_type().is_socket());
    assert_still_serving(&f);
}

#[test]
fn workers_option_is_accepted() {
    let f = cases().arg("--workers").arg("2").spawn();
    assert_still_serving(&f);
}

// --- the response -----------------------------------------------------------------------------------

#[test]
fn hello_exact_bytes_with_added_content_length() {
    on_both(plain, |f| {
        let raw = exchange(f, &nginx_vars("GET", "/hello", b""), b"");
        assert!(
            raw.starts_with(b"HTTP/1.1 200 OK\r\n"),
            "{:?}",
            String::from_utf8_lossy(&raw)
        );
        assert!(
            raw.ends_with(b"\r\n\r\nhello world"),
            "{:?}",
            String::from_utf8_lossy(&raw)
        );
        let r = parse_response(&raw);
        // App headers in app order and spelling, then exactly one added Content-Length.
        let app_headers: Vec<_> = r
            .headers
            .iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case("content-length"))
            .collect();
        assert_eq!(
            app_headers,
            [
                &("Content-Type".to_owned(), "text/plain".to_owned()),
                &("X-Order-A".to_owned(), "1".to_owned()),
                &("x-order-b".to_owned(), "2".to_owned()),
            ]
        );
        assert_eq!(r.headers_all("Content-Length"), ["11"]);
        assert_eq!(r.body, b"hello world");
    });
}

#[test]
fn list_and_tuple_bodies_get_content_length() {
    on_both(plain, |f| {
        let r = get(f, "/list");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"one two three"[..]));
        assert_eq!(r.headers_all("Content-Length"), ["13"]);
        let r = get(f, "/tuple");
        assert_eq!(r.body, b"tuple");
        assert_eq!(r.headers_all("Content-Length"), ["5"]);
    });
}

#[test]
fn app_content_length_is_not_doubled() {
    on_both(plain, |f| {
        let r = get(f, "/explicit_length");
        assert_eq!(r.headers_all("Content-Length"), ["5"], "{:?}", r.headers);
        assert_eq!(r.body, b"exact");
    });
}

#[test]
fn head_gets_no_added_content_length() {
    on_both(plain, |f| {
        let r = send(f, &nginx_vars("HEAD", "/head", b""), b"");
        assert_eq!(r.status_line, "HTTP/1.1 200 OK");
        assert_eq!(r.header("X-Method"), Some("HEAD"));
        assert_eq!(
            r.header("Content-Length"),
            None,
            "HEAD must not get an added Content-Length: {:?}",
            r.headers
        );
    });
}

#[test]
fn status_204_and_304_get_no_content_length() {
    on_both(plain, |f| {
        let r = get(f, "/204");
        assert_eq!(r.status_line, "HTTP/1.1 204 No Content");
        assert_eq!(r.header("Content-Length"), None, "{:?}", r.headers);
        assert_eq!(r.header("X-Empty"), Some("yes"));
        assert!(r.body.is_empty());
        let r = get(f, "/304");
        assert_eq!(r.status_line, "HTTP/1.1 304 Not Modified");
        assert_eq!(r.header("Content-Length"), None, "{:?}", r.headers);
        assert!(r.body.is_empty());
    });
}

#[test]
fn generator_response_gets_no_content_length() {
    on_both(plain, |f| {
        let r = get(f, "/stream?n=3");
        assert_eq!(r.body, b"chunk 0\nchunk 1\nchunk 2\n");
        assert_eq!(
            r.header("Content-Length"),
            None,
            "a streamed body has no length up front: {:?}",
            r.headers
        );
        let r = get(f, "/empty_chunks");
        assert_eq!(r.body, b"ab", "empty chunks must neither end the body nor add bytes");
    });
}

/// PEP 3333 "Buffering and Streaming": each yielded block must reach the client without waiting for the next.
#[test]
fn streamed_chunks_arrive_before_the_generator_finishes() {
    on_both(plain, |f| {
        let gate = f.tempdir().join("stream-gate");
        let mut s = f.connect();
        let vars = nginx_vars("GET", &format!("/stream?n=3&gate={}", gate.display()), b"");
        s.write_all(&encode_request(vars.as_slice(), b"")).unwrap();
        // The generator blocks after chunk 0 until the gate file exists, so chunk 0 can only arrive now
        // if the server sent it as soon as it was yielded.
        let mut got = read_until(&mut s, b"chunk 0\n");
        assert!(
            !contains(&got, b"gate timed out"),
            "chunk 0 was held back until the generator went on"
        );
        assert!(!contains(&got, b"chunk 1"));
        fs::write(&gate, b"").unwrap();
        got.extend(read_to_close(&mut s).bytes);
        let r = parse_response(&got);
        assert_eq!(r.text(), "chunk 0\nchunk 1\nchunk 2\n");
    });
}

/// PEP 3333 "The write() Callable".
#[test]
fn write_callable_output_is_sent() {
    on_both(plain, |f| {
        for (route, want) in [
            ("/write", &b"written data"[..]),
            ("/write_then_iterable", b"written then returned"),
        ] {
            let r = get(f, route);
            assert_eq!(r.status, 200);
            assert_eq!(r.body, want, "{route}");
            if let Some(len) = r.header("Content-Length") {
                assert_eq!(
                    len,
                    want.len().to_string(),
                    "{route}: a Content-Length that does not match the body"
                );
            }
        }
    });
}

/// PEP 3333 "Optional Platform-Specific File Handling": file_wrapper, sendfile for real files, from the
/// file's current position.
#[test]
fn file_wrapper_sends_the_whole_file_from_its_position() {
    on_both(plain, |f| {
        for query in [
            "size=0",
            "size=100",
            "size=3000000",
            "size=200000&offset=1000",
            "size=100000&kind=bytesio",
        ] {
            let r = get(f, &format!("/file?{query}"));
            assert_eq!(r.status, 200, "{query}: {}", r.status_line);
            let size: usize = r.header("X-Size").unwrap().parse().unwrap();
            assert_eq!(r.body.len(), size, "{query}: body length");
            assert_eq!(
                Some(sha256_hex(&r.body).as_str()),
                r.header("X-Sha256"),
                "{query}: body bytes"
            );
            if let Some(len) = r.header("Content-Length") {
                assert_eq!(len, size.to_string(), "{query}");
            }
        }
    });
}

// --- environ ----------------------------------------------------------------------------------------

/// PEP 3333 "Unicode Issues": environ strings are the raw bytes decoded as latin-1.
#[test]
fn environ_values_are_latin1_decoded() {
    on_both(plain, |f| {
        let got = environ_key(f, "HTTP_X_NAME", |v| v.add("HTTP_X_NAME", b"caf\xc3\xa9 \xff"));
        assert_eq!(got, r"'caf\xc3\xa9 \xff'");
    });
}

#[test]
fn repeated_http_vars_are_joined_with_comma() {
    on_both(plain, |f| {
        let got = environ_key(f, "HTTP_X_MULTI", |v| {
            v.add("HTTP_X_MULTI", "a").add("HTTP_X_MULTI", "b")
        });
        assert_eq!(got, "'a, b'");
    });
}

#[test]
fn repeated_cookie_vars_are_joined_with_semicolon() {
    on_both(plain, |f| {
        let got = environ_key(f, "HTTP_COOKIE", |v| {
            v.add("HTTP_COOKIE", "a=1").add("HTTP_COOKIE", "b=2")
        });
        assert_eq!(got, "'a=1; b=2'");
    });
}

/// nginx forwards Content-Type/Content-Length as HTTP_CONTENT_* too; PEP 3333 (and wsgiref's validator)
/// want only the CGI names.
#[test]
fn no_http_content_twins_in_environ() {
    on_both(plain, |f| {
        let body = b"0123456789";
        let vars = nginx_vars("POST", "/environ", body);
        assert!(
            vars.get("HTTP_CONTENT_TYPE").is_some(),
            "the test must send the twins to check they are dropped"
        );
        let r = send(f, &vars, body);
        let json = r.text();
        assert!(!json.contains("\"HTTP_CONTENT_TYPE\""), "{json}");
        assert!(!json.contains("\"HTTP_CONTENT_LENGTH\""), "{json}");
        assert!(
            json.contains("\"CONTENT_TYPE\": \"application/octet-stream\""),
            "{json}"
        );
        assert!(json.contains("\"CONTENT_LENGTH\": \"10\""), "{json}");
    });
}

#[test]
fn script_name_is_always_present() {
    on_both(plain, |f| {
        assert_eq!(environ_key(f, "SCRIPT_NAME", |v| v.remove("SCRIPT_NAME")), "''");
        assert_eq!(
            environ_key(f, "SCRIPT_NAME", |v| v.set("SCRIPT_NAME", "/mounted")),
            "'/mounted'"
        );
    });
}

#[test]
fn server_name_falls_back_to_host() {
    on_both(plain, |f| {
        let got = environ_key(f, "SERVER_NAME", |v| {
            v.remove("SERVER_NAME").set("HTTP_HOST", "example.test")
        });
        assert_eq!(got, "'example.test'");
        let got = environ_key(f, "SERVER_NAME", |v| {
            v.set("SERVER_NAME", "named.test").set("HTTP_HOST", "host.test")
        });
        assert_eq!(got, "'named.test'", "SERVER_NAME from nginx wins over Host");
    });
}

/// wsgi.url_scheme: UWSGI_SCHEME, else HTTPS on/1, else REQUEST_SCHEME, else http.
#[test]
fn url_scheme_follows_uwsgi_scheme_then_https_then_request_scheme() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[], "http"),
        (&[("UWSGI_SCHEME", "https")], "https"),
        (&[("HTTPS", "on")], "https"),
        (&[("HTTPS", "1")], "https"),
        (&[("HTTPS", "off")], "http"),
        (&[("HTTPS", "")], "http"),
        (&[("REQUEST_SCHEME", "https")], "https"),
        (&[("REQUEST_SCHEME", "http")], "http"),
        (
            &[("UWSGI_SCHEME", "http"), ("HTTPS", "on"), ("REQUEST_SCHEME", "https")],
            "http",
        ),
        (&[("HTTPS", "on"), ("REQUEST_SCHEME", "http")], "https"),
        (&[("HTTPS", ""), ("REQUEST_SCHEME", "https")], "https"),
    ];
    on_both(plain, |f| {
        for (set, want) in cases {
            let got = environ_key(f, "wsgi.url_scheme", |v| {
                let mut v = v.remove("REQUEST_SCHEME").remove("HTTPS").remove("UWSGI_SCHEME");
                for (k, val) in *set {
                    v = v.set(k, val);
                }
                v
            });
            assert_eq!(got, format!("'{want}'"), "vars {set:?}");
        }
    });
}

#[test]
fn environ_has_pep3333_wsgi_keys() {
    on_both(plain, |f| {
        let json = get(f, "/environ").text();
        for needle in [
            "\"environ_type\": \"dict\"",
            "\"wsgi.version\": [1, 0]",
            "\"wsgi.multithread\": true",
            "\"wsgi.run_once\": false",
            "\"wsgi.input_terminated\": true",
            "\"wsgi.url_scheme\": \"http\"",
            "\"REQUEST_METHOD\": \"GET\"",
            "\"PATH_INFO\": \"/environ\"",
            "\"SERVER_PROTOCOL\": \"HTTP/1.1\"",
            "\"SERVER_PORT\": \"80\"",
            "\"REMOTE_ADDR\": \"127.0.0.1\"",
            "\"wsgi.input\":",
            "\"wsgi.errors\":",
            "\"wsgi.file_wrapper\":",
            "\"wsgi.multiprocess\":",
        ] {
            assert!(json.contains(needle), "{needle} not in {json}");
        }
    });
}

/// The whole request checked by the stdlib's PEP 3333 validator (its warnings are errors in the app).
#[test]
fn wsgiref_validator_accepts_get_and_post() {
    on_both(plain, |f| {
        let r = get(f, "/validator");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), format!("validated {}", digest(b"")));
        let body = test_body(5000, 3);
        let r = post(f, "/validator", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), format!("validated {}", digest(&body)));
    });
}

// --- reading the packet and the body ----------------------------------------------------------------

#[test]
fn body_in_the_same_write_as_the_vars() {
    on_both(plain, |f| {
        let body = test_body(20_000, 4);
        let mut s = f.connect();
        // One write_all of header + vars + body.
        let raw = request(&mut s, nginx_vars("POST", "/echo", &body).as_slice(), &body);
        assert_eq!(parse_response(&raw).body, body);
    });
}

#[test]
fn request_split_over_many_writes() {
    on_both(plain, |f| {
        let body = test_body(50_000, 5);
        let packet = encode_request(nginx_vars("POST", "/echo", &body).as_slice(), &body);
        let vars_end = packet.len() - body.len();
        let cuts = [
            1,
            3,
            4,
            6,
            vars_end - 1,
            vars_end,
            vars_end + 1,
            vars_end + 4000,
            packet.len() - 1,
        ];
        let mut s = f.connect();
        let mut from = 0;
        for cut in cuts.into_iter().chain([packet.len()]) {
            s.write_all(&packet[from..cut]).unwrap();
            from = cut;
            // The pause is the point: it makes each piece reach the server as a separate read.
            thread::sleep(Duration::from_millis(15));
        }
        let raw = read_to_close(&mut s);
        assert!(!raw.reset);
        assert_eq!(parse_response(&raw.bytes).body, body);
    });
}

/// nginx de-chunks the body and sends CONTENT_LENGTH; HTTP_TRANSFER_ENCODING is only a header var.
#[test]
fn transfer_encoding_var_does_not_change_body_reading() {
    on_both(plain, |f| {
        let body = b"3\r\nabc\r\n0\r\n\r\n";
        let vars = nginx_vars("POST", "/echo", body).add("HTTP_TRANSFER_ENCODING", "chunked");
        assert_eq!(
            send(f, &vars, body).body,
            body,
            "the body is CONTENT_LENGTH raw bytes, never de-chunked"
        );
        // Without CONTENT_LENGTH the body is empty: the server must answer without waiting for EOF.
        let vars = nginx_vars("POST", "/input/read", b"").add("HTTP_TRANSFER_ENCODING", "chunked");
        assert_eq!(send(f, &vars, b"").text(), digest(b""));
    });
}

#[test]
fn missing_or_empty_content_length_means_empty_body() {
    on_both(plain, |f| {
        let vars = nginx_vars("POST", "/input/read", b"").remove("CONTENT_LENGTH");
        assert_eq!(send(f, &vars, b"").text(), digest(b""));
        let vars = nginx_vars("POST", "/input/read", b"").set("CONTENT_LENGTH", "");
        assert_eq!(send(f, &vars, b"").text(), digest(b""));
    });
}

/// Big header blocks are where uWSGI's default 4 KiB buffer-size bites; ferrule's default is the whole u16.
#[test]
fn vars_blocks_of_60000_and_65535_bytes_work() {
    on_both(plain, |f| {
        for total in [60_000usize, 65_535] {
            let base = nginx_vars("GET", "/environ/key?key=HTTP_X_BIG", b"");
            let overhead = base.encode().len() + 2 + "HTTP_X_BIG".len() + 2;
            let value = "a".repeat(total - overhead);
            let vars = base.add("HTTP_X_BIG", &value);
            assert_eq!(vars.encode().len(), total);
            let r = send(f, &vars, b"");
            assert_eq!(r.status, 200, "{total}-byte vars block: {}", r.status_line);
            assert_eq!(r.body.len(), value.len() + 2, "{total}-byte vars block");
        }
    });
}

#[test]
fn vars_block_over_buffer_size_gets_431() {
    on_both(
        |b| b.arg("--buffer-size").arg("4096"),
        |f| {
            let vars = nginx_vars("GET", "/touch?path=never", b"").add("HTTP_X_BIG", "b".repeat(5000));
            let r = send(f, &vars, b"");
            assert!(
                r.status_line.starts_with("HTTP/1.1 431"),
                "expected 431 for a 5000-byte block with --buffer-size 4096, got {:?}",
                r.status_line
            );
            assert_still_serving(f);
        },
    );
}

/// --body-buffer-size is the spool threshold; bodies just under, at and over it must read the same.
#[test]
fn bodies_around_the_spool_threshold_read_back_intact() {
    on_both(
        |b| b.arg("--body-buffer-size").arg("1000"),
        |f| {
            for len in [999, 1000, 1001, 50_000] {
                let body = test_body(len, len as u64);
                for route in ["/input/read", "/input/readline", "/input/read_n"] {
                    assert_eq!(post(f, route, &body).text(), digest(&body), "{route}, {len} bytes");
                }
            }
        },
    );
}

/// Every wsgi.input method from PEP 3333 "Input and Error Streams", on an empty, a small and a 3 MiB body.
fn check_input_style(route: &str) {
    let small = test_body(1000, 1);
    let (big, big_digest) = big_body();
    on_both(plain, |f| {
        for body in [&b""[..], &small] {
            let r = post(f, route, body);
            assert_eq!(r.status, 200, "{route}, {} bytes: {}", body.len(), r.text());
            assert_eq!(r.text(), digest(body), "{route}, {} bytes", body.len());
        }
        let r = post(f, route, big);
        assert_eq!(r.status, 200, "{route}, 3 MiB: {}", r.text());
        assert_eq!(&r.text(), big_digest, "{route}, 3 MiB");
    });
}

#[test]
fn input_read_all() {
    check_input_style("/input/read");
}

#[test]
fn input_read_in_8192_byte_pieces() {
    check_input_style("/input/read_n");
}

#[test]
fn input_readline() {
    check_input_style("/input/readline");
}

#[test]
fn input_readline_with_size_limit() {
    check_input_style("/input/readline_limit");
}

#[test]
fn input_readlines() {
    check_input_style("/input/readlines");
}

#[test]
fn input_iteration() {
    check_input_style("/input/iter");
}

#[test]
fn echo_small_and_3mib_bodies() {
    let (big, _) = big_body();
    on_both(plain, |f| {
        assert_eq!(post(f, "/echo", b"small body").body, b"small body");
        let r = post(f, "/echo", big);
        assert_eq!(r.body.len(), big.len());
        assert!(r.body == *big, "3 MiB echo differs");
    });
}

/// An app that ignores the body must still get its answer to nginx intact: closing with the body unread
/// would turn the close into an RST over TCP, and nginx would log "upstream prematurely closed" or lose
/// the response.
#[test]
fn unread_request_body_does_not_cost_the_response() {
    let (big, _) = big_body();
    on_both(plain, |f| {
        for body in [&b"small unread body"[..], big] {
            let r = post(f, "/hello", body);
            assert_eq!(r.status_line, "HTTP/1.1 200 OK", "{} unread bytes", body.len());
            assert_eq!(r.body, b"hello world", "{} unread bytes", body.len());
        }
    });
}

/// A client that promises more body than it sends and then half-closes must not wedge an app thread.
#[test]
fn truncated_body_ends_the_request_without_hanging() {
    on_both(plain, |f| {
        let vars = nginx_vars("POST", "/input/read", b"").set("CONTENT_LENGTH", "1000");
        let mut s = f.connect();
        s.write_all(&encode_request(vars.as_slice(), &[b'x'; 10])).unwrap();
        s.shutdown_write();
        let raw = read_to_close(&mut s);
        if !raw.bytes.is_empty() {
            let r = parse_response(&raw.bytes);
            assert_ne!(
                r.status,
                200,
                "a 10-byte body passed for a 1000-byte one: {:?}",
                raw.text()
            );
        }
        assert_still_serving(f);
    });
}

/// PEP 3333 "Input and Error Streams": the app must never read past CONTENT_LENGTH, and reads at the end
/// return b"" at once instead of blocking on the socket.
#[test]
fn input_never_reads_past_content_length() {
    on_both(plain, |f| {
        for len in [0usize, 100, 2_000_000] {
            let body = test_body(len, 9);
            let r = post(f, "/input/overread", &body);
            assert_eq!(r.status, 200, "{len} bytes: {}", r.text());
            assert_eq!(r.text(), format!("{} 0 0 0", digest(&body)), "{len} bytes");
        }
    });
}

// --- protocol: ping, junk, malformed packets, bad values --------------------------------------------

#[test]
fn ping_gets_pong() {
    on_both(plain, |f| {
        let mut s = f.connect();
        let raw = send_raw(&mut s, &[MODIFIER_PING, 0, 0, 0]);
        assert_eq!(raw.bytes, [100, 0, 0, 1]);
        assert!(!raw.reset);
        assert_still_serving(f);
    });
}

/// Sends `bytes` (then half-closes if asked) and expects: no answer, a log line, the app not called
/// (`marker` never created), and the next request served.
fn assert_closed_without_answer(f: &Ferrule, what: &str, bytes: &[u8], half_close: bool, marker: Option<&Path>) {
    let offset = f.log_offset();
    let mut s = f.connect();
    if let Err(e) = s.write_all(bytes) {
        assert!(is_reset_error(&e), "{what}: write failed: {e}");
    }
    if half_close {
        s.shutdown_write();
    }
    let raw = read_to_close(&mut s);
    assert!(
        raw.bytes.is_empty(),
        "{what}: expected a close without an answer, got {:?}",
        raw.text()
    );
    assert!(
        f.wait_for_new_line_since(offset, LOG_WAIT),
        "{what}: nothing was logged"
    );
    assert_still_serving(f);
    if let Some(marker) = marker {
        assert!(!marker.exists(), "{what}: the app was called");
    }
}

fn touch_vars(f: &Ferrule, name: &str) -> (Vars, PathBuf) {
    let marker = f.tempdir().join(name);
    (
        nginx_vars("GET", &format!("/touch?path={}", marker.display()), b""),
        marker,
    )
}

#[test]
fn touch_route_control_calls_the_app() {
    // The negative tests below rely on /touch creating its file when the app does run.
    on_both(plain, |f| {
        let (vars, marker) = touch_vars(f, "control");
        assert_eq!(send(f, &vars, b"").body, b"touched");
        assert!(marker.exists());
    });
}

#[test]
fn unknown_modifier1_is_closed_without_calling_the_app() {
    on_both(plain, |f| {
        for modifier1 in [1u8, 5, 17, 99, 101, 255] {
            let (vars, marker) = touch_vars(f, &format!("modifier-{modifier1}"));
            let packet = encode_packet(modifier1, vars.as_slice(), 0);
            assert_closed_without_answer(f, &format!("modifier1 {modifier1}"), &packet, false, Some(&marker));
        }
    });
}

fn tls_client_hello() -> Vec<u8> {
    let mut hello = vec![0x03, 0x03]; // client_version TLS 1.2
    hello.extend([0x5a; 32]); // random
    hello.push(0); // no session id
    hello.extend([0x00, 0x04, 0x13, 0x01, 0x13, 0x02]); // two TLS 1.3 suites
    hello.extend([0x01, 0x00]); // null compression
    hello.extend([0x00, 0x00]); // no extensions
    let mut handshake = vec![0x01]; // ClientHello
    handshake.extend(&(hello.len() as u32).to_be_bytes()[1..]);
    handshake.extend(hello);
    let mut record = vec![0x16, 0x03, 0x01]; // handshake record, TLS 1.0 framing
    record.extend((handshake.len() as u16).to_be_bytes());
    record.extend(handshake);
    record
}

/// Someone pointing a browser, curl or an HTTPS client straight at the uwsgi socket.
#[test]
fn http_and_tls_bytes_are_closed_with_a_log_line() {
    on_both(plain, |f| {
        let junk: [(&str, Vec<u8>); 4] = [
            (
                "HTTP/1.1 request",
                b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
            ),
            (
                "HTTP POST",
                b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc".to_vec(),
            ),
            ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()),
            ("TLS ClientHello", tls_client_hello()),
        ];
        for (what, bytes) in junk {
            // No half-close: the server must decide from modifier1 alone, not wait for 21573 bytes of "vars".
            assert_closed_without_answer(f, what, &bytes, false, None);
        }
    });
}

#[test]
fn truncated_header_or_vars_is_closed_with_a_log_line() {
    on_both(plain, |f| {
        let (vars, marker) = touch_vars(f, "truncated");
        let packet = encode_packet(0, vars.as_slice(), 0);
        assert_closed_without_answer(f, "2 of 4 header bytes", &packet[..2], true, Some(&marker));
        assert_closed_without_answer(f, "half of the vars", &packet[..packet.len() / 2], true, Some(&marker));
        assert_closed_without_answer(
            f,
            "all but the last vars byte",
            &packet[..packet.len() - 1],
            true,
            Some(&marker),
        );
    });
}

/// Builds a packet whose vars block is the good `vars` followed by `tail`, with datasize covering both.
fn packet_with_tail(vars: &Vars, tail: &[u8]) -> Vec<u8> {
    let mut block = vars.encode();
    block.extend_from_slice(tail);
    encode_packet_with_block(0, &block, 0)
}

#[test]
fn malformed_vars_block_is_closed_with_a_log_line() {
    on_both(plain, |f| {
        let (vars, marker) = touch_vars(f, "malformed");
        let cases: [(&str, Vec<u8>); 5] = [
            // keylen 200 in a block that has 3 bytes left
            ("key length overrunning the block", vec![200, 0, b'A']),
            // good key, vallen 300 with 2 bytes left
            (
                "value length overrunning the block",
                [&encode_vars(&[("X", "")])[..3], &[44, 1, b'v', b'v']].concat(),
            ),
            ("zero-length key", vec![0, 0, 1, 0, b'v']),
            ("dangling half of a key length", vec![5]),
            ("key without its value length", vec![1, 0, b'K']),
        ];
        for (what, tail) in cases {
            let packet = packet_with_tail(&vars, &tail);
            assert_closed_without_answer(f, what, &packet, false, Some(&marker));
        }
        // One corrupted length byte in an otherwise good packet: the first key's length.
        let mut packet = encode_packet(0, vars.as_slice(), 0);
        packet[4] = 0xff;
        assert_closed_without_answer(f, "first key length corrupted", &packet, false, Some(&marker));
    });
}

#[test]
fn invalid_content_length_gets_400() {
    on_both(plain, |f| {
        for value in ["abc", "-1", "99999999999999999999999", "1.5", "0x10"] {
            let (vars, marker) = touch_vars(f, "bad-length");
            let vars = vars.set("CONTENT_LENGTH", value);
            let r = send(f, &vars, b"");
            assert_eq!(r.status_line, "HTTP/1.1 400 Bad Request", "CONTENT_LENGTH {value:?}");
            assert!(!marker.exists(), "CONTENT_LENGTH {value:?}: the app was called");
            assert_still_serving(f);
        }
    });
}

/// A packet with vars but no REQUEST_METHOD is a GET, as uWSGI and gunicorn treat it (nginx's own tests of
/// uwsgi backends send a few params and no method); an empty method is still refused.
#[test]
fn missing_request_method_is_a_get_and_an_empty_one_gets_400() {
    on_both(plain, |f| {
        let (vars, marker) = touch_vars(f, "no-method");
        let r = send(f, &vars.remove("REQUEST_METHOD"), b"");
        assert_eq!(r.status_line, "HTTP/1.1 200 OK");
        assert!(marker.exists(), "the app was not called without REQUEST_METHOD");
        let (vars, marker) = touch_vars(f, "empty-method");
        let r = send(f, &vars.set("REQUEST_METHOD", ""), b"");
        assert_eq!(r.status_line, "HTTP/1.1 400 Bad Request");
        assert!(!marker.exists(), "the app was called with an empty REQUEST_METHOD");
        assert_still_serving(f);
    });
}

// --- app errors -------------------------------------------------------------------------------------

/// PEP 3333 "Error Handling": an error before anything was sent becomes a plain 500; the log says why.
fn assert_500_before_headers(route: &str, log_needles: &[&str]) {
    on_both(plain, |f| {
        let offset = f.log_offset();
        let r = get(f, route);
        assert_eq!(
            r.status_line,
            "HTTP/1.1 500 Internal Server Error",
            "{route}: {:?}",
            r.text()
        );
        assert!(
            r.text().contains("Internal Server Error"),
            "{route}: body {:?}",
            r.text()
        );
        assert!(
            r.header("Content-Type").is_some_and(|ct| ct.starts_with("text/plain")),
            "{route}: {:?}",
            r.headers
        );
        // Nothing the app set survives into the 500 (in particular no injected header).
        for (k, _) in &r.headers {
            let k = k.to_ascii_lowercase();
            assert!(
                ["content-type", "content-length"].contains(&k.as_str()),
                "{route}: app header {k} leaked into the 500: {:?}",
                r.headers
            );
        }
        for needle in log_needles {
            assert!(
                f.wait_for_log_since(offset, needle, LOG_WAIT),
                "{route}: {needle:?} not logged"
            );
        }
        assert!(
            f.wait_for_log_since(offset, "ERROR", LOG_WAIT),
            "{route}: no ERROR line"
        );
        assert_still_serving(f);
    });
}

const TRACEBACK: &str = "Traceback (most recent call last)";

#[test]
fn exception_before_start_response_gives_500() {
    assert_500_before_headers("/error/before", &[TRACEBACK, "ValueError: boom before start_response"]);
}

#[test]
fn exception_after_start_response_before_body_gives_500() {
    // PEP 3333: headers are not sent until the first non-empty chunk, so a 500 is still possible.
    assert_500_before_headers(
        "/error/after_start",
        &[TRACEBACK, "ValueError: boom after start_response"],
    );
}

#[test]
fn exception_in_first_chunk_gives_500() {
    assert_500_before_headers("/error/first_chunk", &[TRACEBACK, "ValueError: boom in first chunk"]);
}

#[test]
fn status_without_reason_gives_500() {
    assert_500_before_headers("/error/bad_status?status=200", &[]);
}

#[test]
fn non_numeric_status_gives_500() {
    assert_500_before_headers("/error/bad_status?status=abc", &[]);
}

#[test]
fn bytes_status_gives_500() {
    // PEP 3333 "The start_response() Callable": status is a native str.
    assert_500_before_headers("/error/non_str_status", &[]);
}

#[test]
fn header_value_with_crlf_gives_500() {
    // Response splitting: a CRLF in a value would let the app forge headers.
    assert_500_before_headers("/error/bad_header", &[]);
}

#[test]
fn header_name_with_space_gives_500() {
    assert_500_before_headers("/error/bad_header_name", &[]);
}

#[test]
fn hop_by_hop_header_gives_500() {
    // PEP 3333 "Other HTTP Features": an app must not send hop-by-hop headers; the server treats it as an error.
    assert_500_before_headers("/error/hop_by_hop", &[]);
}

#[test]
fn str_chunk_gives_500() {
    // PEP 3333 "Unicode Issues": body chunks must be bytes.
    assert_500_before_headers("/error/non_bytes", &[]);
}

#[test]
fn no_start_response_gives_500() {
    assert_500_before_headers("/error/no_start_response", &[]);
}

#[test]
fn second_start_response_without_exc_info_gives_500() {
    // PEP 3333 "The start_response() Callable": a second call without exc_info is a fatal error.
    assert_500_before_headers("/error/start_response_twice", &[]);
}

/// PEP 3333 "Error Handling": after headers were sent, the only honest signal is an abrupt close, so nginx
/// sees a truncated upstream response. Over TCP that is an RST. Over a Unix socket there is no RST: the
/// close looks like EOF, so only the absence of anything after the failure is checked there.
fn assert_reset_after_headers(route: &str, sent: &str, log_needles: &[&str]) {
    on_both(plain, |f| {
        let offset = f.log_offset();
        let mut s = f.connect();
        let raw = send_raw(&mut s, &encode_request(nginx_vars("GET", route, b"").as_slice(), b""));
        let text = raw.text();
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 200 OK\r\n"),
            "{route}: {text:?}"
        );
        if let Some((_, body)) = text.split_once("\r\n\r\n") {
            assert!(
                sent.starts_with(body),
                "{route}: only {sent:?} may precede the failure, got {body:?}"
            );
        }
        assert!(!text.contains("must never be sent"), "{route}: {text:?}");
        assert!(
            !text.contains("Internal Server Error"),
            "{route}: a 500 glued after a sent body: {text:?}"
        );
        if s.is_tcp() {
            assert!(
                raw.reset,
                "{route}: expected an RST after the headers were sent, got a clean EOF after {text:?}"
            );
        }
        for needle in log_needles {
            assert!(
                f.wait_for_log_since(offset, needle, LOG_WAIT),
                "{route}: {needle:?} not logged"
            );
        }
        assert_still_serving(f);
    });
}

#[test]
fn exception_midstream_resets_the_connection() {
    assert_reset_after_headers(
        "/error/midstream",
        "first chunk\n",
        &[TRACEBACK, "ValueError: boom midstream"],
    );
}

#[test]
fn exc_info_after_headers_sent_resets_the_connection() {
    // PEP 3333: start_response(..., exc_info) after headers were sent must re-raise.
    assert_reset_after_headers("/exc_info/late", "first chunk\n", &["ValueError: late failure"]);
}

#[test]
fn exc_info_before_anything_sent_replaces_status_and_headers() {
    on_both(plain, |f| {
        let r = get(f, "/exc_info");
        assert_eq!(r.status_line, "HTTP/1.1 503 Custom Failure");
        assert_eq!(
            r.header("X-Dropped"),
            None,
            "headers of the first start_response must be replaced"
        );
        assert_eq!(r.body, b"custom error body");
    });
}

#[test]
fn wsgi_errors_text_reaches_the_log() {
    on_both(plain, |f| {
        get(f, "/errors_stream?marker=errors-marker-7f3a");
        assert!(f.wait_for_log("errors-marker-7f3a via write", LOG_WAIT));
        assert!(f.wait_for_log("errors-marker-7f3a via writelines", LOG_WAIT));
    });
}

// --- close() ----------------------------------------------------------------------------------------

/// PEP 3333 "Specification Details": the iterable's close() must be called whether the request completed,
/// failed, or the client went away.
fn assert_close_called(f: &Ferrule, marker: &Path, what: &str) {
    assert!(
        wait_for_file_containing(marker, "closed", LOG_WAIT),
        "{what}: close() was not called"
    );
    assert_still_serving(f);
    assert_eq!(
        fs::read_to_string(marker).unwrap(),
        "closed\n",
        "{what}: close() called more than once"
    );
}

fn close_tracking_uri(marker: &Path, mode: &str) -> String {
    format!("/close_tracking?path={}&mode={mode}", marker.display())
}

#[test]
fn close_is_called_on_success() {
    on_both(plain, |f| {
        let marker = f.tempdir().join("closed-ok");
        assert_eq!(get(f, &close_tracking_uri(&marker, "ok")).body, b"first second");
        assert_close_called(f, &marker, "success");
    });
}

#[test]
fn close_is_called_when_iteration_fails_before_the_first_chunk() {
    on_both(plain, |f| {
        let marker = f.tempdir().join("closed-error-first");
        assert_eq!(get(f, &close_tracking_uri(&marker, "error_first")).status, 500);
        assert_close_called(f, &marker, "error before the first chunk");
    });
}

#[test]
fn close_is_called_when_iteration_fails_midstream() {
    on_both(plain, |f| {
        let marker = f.tempdir().join("closed-error");
        let mut s = f.connect();
        send_raw(
            &mut s,
            &encode_request(
                nginx_vars("GET", &close_tracking_uri(&marker, "error"), b"").as_slice(),
                b"",
            ),
        );
        assert_close_called(f, &marker, "error midstream");
    });
}

#[test]
fn close_is_called_when_the_client_goes_away_midstream() {
    on_both(plain, |f| {
        let marker = f.tempdir().join("closed-abort");
        let mut s = f.connect();
        let vars = nginx_vars("GET", &close_tracking_uri(&marker, "long"), b"");
        s.write_all(&encode_request(vars.as_slice(), b"")).unwrap();
        read_until(&mut s, b"first ");
        s.abort();
        // The generator would run for 60 s; the server must notice the dead client long before.
        assert!(
            wait_for_file_containing(&marker, "closed", Duration::from_secs(30)),
            "close() not called after the client went away"
        );
        assert_still_serving(f);
    });
}

// --- concurrency and shutdown -----------------------------------------------------------------------

#[test]
fn a_blocked_request_does_not_block_others() {
    on_both(plain, |f| {
        let gate = f.tempdir().join("concurrency-gate");
        let entered = f.tempdir().join("concurrency-entered");
        let mut slow = f.connect();
        let vars = nginx_vars(
            "GET",
            &format!("/gate?path={}&touch={}", gate.display(), entered.display()),
            b"",
        );
        slow.write_all(&encode_request(vars.as_slice(), b"")).unwrap();
        assert!(
            wait_for_path(&entered, LOG_WAIT),
            "the gated request never reached the app"
        );
        assert_still_serving(f);
        // Neither does a client that sent half a header and went quiet.
        let mut idle = f.connect();
        idle.write_all(&[0, 10]).unwrap();
        assert_still_serving(f);
        drop(idle);
        fs::write(&gate, b"").unwrap();
        let r = parse_response(&read_to_close(&mut slow).bytes);
        assert_eq!(r.body, b"opened");
    });
}

#[test]
fn sigterm_removes_the_socket_file_and_exits_0() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut f = cases().spawn();
        let path = unix_path(&f);
        assert!(path.exists());
        f.signal(sig);
        let status = f
            .wait_exit(EXIT_WAIT)
            .unwrap_or_else(|| panic!("no exit within {EXIT_WAIT:?} after signal {sig}"));
        assert_eq!(status.code(), Some(0), "signal {sig}: {status:?}\n{}", f.log());
        assert!(!path.exists(), "signal {sig}: socket file left behind");
    }
    let mut f = cases().tcp().spawn();
    f.signal(libc::SIGTERM);
    let status = f.wait_exit(EXIT_WAIT).expect("exit after SIGTERM");
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// The interpreter is not finalised when a worker exits, so ferrule runs the app's `atexit` handlers itself.
#[test]
fn sigterm_runs_the_apps_atexit_handlers() {
    let marker_dir = tempfile::tempdir().expect("tempdir");
    let marker = marker_dir.path().join("atexit.txt");
    let mut f = FerruleBuilder::new("atexit_app:application")
        .arg("--pythonpath")
        .arg(apps_dir())
        .env("FERRULE_TEST_ATEXIT_FILE", marker.as_os_str())
        .spawn();
    f.signal(libc::SIGTERM);
    let status = f.wait_exit(EXIT_WAIT).expect("exit after SIGTERM");
    assert_eq!(status.code(), Some(0), "{status:?}\n{}", f.log());
    let text = std::fs::read_to_string(&marker).unwrap_or_default();
    assert!(
        text.contains("atexit ran in"),
        "atexit handler did not run: {text:?}\n{}",
        f.log()
    );
}

#[test]
fn sigterm_lets_an_in_flight_request_finish() {
    for tcp in [false, true] {
        let b = cases();
        let mut f = if tcp { b.tcp() } else { b.unix() }.spawn();
        let entered = f.tempdir().join("entered");
        let mut s = f.connect();
        let vars = nginx_vars("GET", &format!("/sleep?s=1&touch={}", entered.display()), b"");
        s.write_all(&encode_request(vars.as_slice(), b"")).unwrap();
        assert!(wait_for_path(&entered, LOG_WAIT), "the request never reached the app");
        f.signal(libc::SIGTERM);
        let raw = read_to_close(&mut s);
        let r = parse_response(&raw.bytes);
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, &b"slept"[..]),
            "graceful stop cut the request"
        );
        let status = f.wait_exit(EXIT_WAIT).expect("exit after SIGTERM");
        assert_eq!(status.code(), Some(0));
    }
}

// --- sockets ----------------------------------------------------------------------------------------

#[test]
fn stale_unix_socket_file_is_replaced() {
    let b = cases();
    let path = b.tempdir().join("stale.sock");
    drop(UnixListener::bind(&path).unwrap());
    assert!(
        fs::metadata(&path).unwrap().file_type().is_socket(),
        "the stale socket file must exist"
    );
    assert!(UnixStream::connect(&path).is_err(), "nobody listens on a stale socket");
    let f = b.unix_at(&path).spawn();
    assert_still_serving(&f);
}

#[test]
fn live_unix_socket_is_not_stolen() {
    let first = cases().spawn();
    let path = unix_path(&first);
    let (status, log) = cases().unix_at(&path).spawn_expect_exit(EXIT_WAIT);
    assert!(!status.success(), "a second ferrule started on a live socket:\n{log}");
    assert!(!log.trim().is_empty(), "no line saying why");
    assert!(path.exists(), "the losing ferrule removed the winner's socket file");
    assert_still_serving(&first);
}

#[test]
fn socket_mode_is_applied() {
    for mode in ["600", "666", "660"] {
        let f = cases().arg("--socket-mode").arg(mode).spawn();
        let meta = fs::metadata(unix_path(&f)).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(
            meta.permissions().mode() & 0o777,
            u32::from_str_radix(mode, 8).unwrap(),
            "--socket-mode {mode}"
        );
        assert_still_serving(&f);
    }
}

// --- start-up failures ------------------------------------------------------------------------------

/// A bad app or option must end the process quickly with a non-zero code and one clear line.
fn assert_startup_fails(b: FerruleBuilder, needles: &[&str]) -> String {
    let started = Instant::now();
    let (status, log) = b.spawn_expect_exit(EXIT_WAIT);
    assert!(!status.success(), "expected a failed start-up:\n{log}");
    assert!(
        status.code().is_some(),
        "killed by a signal instead of exiting: {status:?}\n{log}"
    );
    for needle in needles {
        assert!(log.contains(needle), "{needle:?} not in the start-up log:\n{log}");
    }
    assert!(started.elapsed() < EXIT_WAIT);
    log
}

#[test]
fn missing_module_fails_start_up() {
    assert_startup_fails(
        FerruleBuilder::new("no_such_module_for_ferrule")
            .arg("--pythonpath")
            .arg(apps_dir()),
        &["no_such_module_for_ferrule", "ModuleNotFoundError"],
    );
}

#[test]
fn not_callable_attribute_fails_start_up() {
    assert_startup_fails(
        FerruleBuilder::new("wsgi_cases:not_callable")
            .arg("--pythonpath")
            .arg(apps_dir()),
        &["not_callable"],
    );
}

#[test]
fn missing_attribute_fails_start_up() {
    assert_startup_fails(
        FerruleBuilder::new("wsgi_cases:no_such_callable")
            .arg("--pythonpath")
            .arg(apps_dir()),
        &["no_such_callable"],
    );
}

#[test]
fn syntax_error_in_app_fails_start_up() {
    let b = FerruleBuilder::new("broken_syntax");
    fs::write(
        b.tempdir().join("broken_syntax.py"),
        "def application(environ, start_response:\n    pass\n",
    )
    .unwrap();
    let dir = b.tempdir().to_owned();
    assert_startup_fails(b.arg("--pythonpath").arg(dir), &["SyntaxError", "broken_syntax.py"]);
}

#[test]
fn exception_during_import_fails_start_up_with_traceback() {
    let b = FerruleBuilder::new("raises_on_import");
    fs::write(
        b.tempdir().join("raises_on_import.py"),
        "def helper():\n    raise RuntimeError('import-time boom')\n\nhelper()\n",
    )
    .unwrap();
    let dir = b.tempdir().to_owned();
    assert_startup_fails(
        b.arg("--pythonpath").arg(dir),
        &[TRACEBACK, "RuntimeError: import-time boom", "raises_on_import.py"],
    );
}

#[test]
fn bad_options_fail_start_up() {
    for (opt, value) in [
        ("--threads", "abc"),
        ("--threads", "0"),
        ("--socket-mode", "9z"),
        ("--socket", "not an address"),
        ("--buffer-size", "lots"),
        ("--chdir", "/nonexistent/ferrule/dir"),
    ] {
        eprintln!("--- {opt} {value}");
        assert_startup_fails(cases().arg(opt).arg(value), &[]);
    }
}

// --- app forms, --chdir, --pythonpath --------------------------------------------------------------

fn assert_which(f: &Ferrule, want: &str) {
    let r = get(f, "/which");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), want);
}

#[test]
fn module_alone_uses_application_before_app() {
    let f = FerruleBuilder::new("wsgi_cases")
        .arg("--pythonpath")
        .arg(apps_dir())
        .spawn();
    assert_which(&f, "application");
}

#[test]
fn module_alone_falls_back_to_app() {
    let b = FerruleBuilder::new("only_app");
    fs::write(
        b.tempdir().join("only_app.py"),
        "def app(environ, start_response):\n    start_response('200 OK', [('Content-Type', 'text/plain')])\n    return [b'only app']\n",
    )
    .unwrap();
    let dir = b.tempdir().to_owned();
    let f = b.arg("--pythonpath").arg(dir).spawn();
    assert_eq!(get(&f, "/").body, b"only app");
}

#[test]
fn module_and_callable() {
    let f = FerruleBuilder::new("wsgi_cases:app")
        .arg("--pythonpath")
        .arg(apps_dir())
        .spawn();
    assert_which(&f, "app");
}

#[test]
fn file_path_with_and_without_callable() {
    let file = apps_dir().join("wsgi_cases.py");
    let f = FerruleBuilder::new(&format!("{}:app", file.display())).spawn();
    assert_which(&f, "app");
    let f = FerruleBuilder::new(file.to_str().unwrap()).spawn();
    assert_which(&f, "application");
}

#[test]
fn relative_file_path_after_chdir() {
    let f = FerruleBuilder::new("wsgi_cases.py:application")
        .arg("--chdir")
        .arg(apps_dir())
        .spawn();
    assert_which(&f, "application");
    assert_eq!(
        get(&f, "/cwd").text(),
        fs::canonicalize(apps_dir()).unwrap().to_str().unwrap()
    );
}

#[test]
fn relative_file_path_from_the_working_directory() {
    let f = FerruleBuilder::new("wsgi_cases.py").current_dir(apps_dir()).spawn();
    assert_which(&f, "application");
}

#[test]
fn factory_call_form() {
    let f = FerruleBuilder::new("wsgi_cases:create_app()")
        .arg("--pythonpath")
        .arg(apps_dir())
        .spawn();
    assert_which(&f, "application");
}

#[test]
fn chdir_sets_the_working_directory() {
    let b = cases();
    let dir = b.tempdir().to_owned();
    let f = b.arg("--chdir").arg(&dir).spawn();
    assert_eq!(
        get(&f, "/cwd").text(),
        fs::canonicalize(&dir).unwrap().to_str().unwrap()
    );
}

#[test]
fn pythonpath_is_prepended_and_repeatable() {
    let b = FerruleBuilder::new("uses_helper");
    let (lib, app) = (b.tempdir().join("lib"), b.tempdir().join("app"));
    fs::create_dir(&lib).unwrap();
    fs::create_dir(&app).unwrap();
    fs::write(lib.join("helper_for_ferrule.py"), "VALUE = b'from the helper dir'\n").unwrap();
    fs::write(
        app.join("uses_helper.py"),
        "import sys\nfrom helper_for_ferrule import VALUE\n\n\
         def application(environ, start_response):\n    start_response('200 OK', [('Content-Type', 'text/plain')])\n    \
         return [VALUE if environ['PATH_INFO'] == '/' else repr(sys.path[:2]).encode()]\n",
    )
    .unwrap();
    let f = b.arg("--pythonpath").arg(&lib).arg("--pythonpath").arg(&app).spawn();
    assert_eq!(get(&f, "/").body, b"from the helper dir");
    let head = get(&f, "/path").text();
    assert!(
        head.contains(lib.to_str().unwrap()) && head.contains(app.to_str().unwrap()),
        "both --pythonpath dirs must lead sys.path, got {head}"
    );
}

// --- access log -------------------------------------------------------------------------------------

fn access_line(f: &Ferrule, path_field: &str) -> String {
    let needle = format!("path={path_field} ");
    assert!(
        f.wait_for_log(&needle, LOG_WAIT),
        "no access line with {needle:?}:\n{}",
        f.log()
    );
    f.log().lines().find(|l| l.contains(&needle)).unwrap().to_owned()
}

fn assert_access_fields(line: &str, fields: &[&str]) {
    assert!(
        line.contains("ferrule::access"),
        "access lines use target ferrule::access: {line}"
    );
    for field in fields {
        assert!(
            line.split_whitespace().any(|w| w == *field),
            "{field:?} missing from {line}"
        );
    }
    let duration = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("duration_us="))
        .unwrap_or_else(|| panic!("no duration_us= in {line}"));
    assert!(
        duration.parse::<u64>().is_ok(),
        "duration_us={duration} is not a number of microseconds"
    );
}

#[test]
fn access_log_line_format() {
    on_both(
        |b| b.arg("--access-log"),
        |f| {
            get(f, "/hello?y=1");
            assert_access_fields(&access_line(f, "/hello?y=1"), &["method=GET", "status=200", "bytes=11"]);
            get(f, "/stream?n=3");
            assert_access_fields(
                &access_line(f, "/stream?n=3"),
                &["method=GET", "status=200", "bytes=24"],
            );
            get(f, "/error/before");
            assert_access_fields(&access_line(f, "/error/before"), &["method=GET", "status=500"]);
            post(f, "/echo", b"12345");
            assert_access_fields(&access_line(f, "/echo"), &["method=POST", "status=200", "bytes=5"]);
        },
    );
}

#[test]
fn no_access_lines_without_the_option() {
    let f = cases().spawn();
    get(&f, "/hello?y=1");
    assert_still_serving(&f);
    assert!(
        !f.log().contains("ferrule::access"),
        "access lines without --access-log:\n{}",
        f.log()
    );
}

// ---------------------------------------------------------------------------------------------------------
// Headers nginx sends twice
// ---------------------------------------------------------------------------------------------------------

/// Debian's uwsgi_params sets `HTTP_HOST $host`; a site that adds `uwsgi_param HTTP_HOST $host:$server_port`
/// sends it twice. The later value wins (as for any param set twice, and as uWSGI keeps one), and SERVER_NAME/
/// SERVER_PORT derived from it agree; other repeated headers are still joined (RFC 9110 5.3, cookies with "; ").
#[test]
fn a_repeated_http_host_keeps_the_last_value_and_other_headers_join() {
    let server = Server::spawn(probe_app());
    let vars = nginx_vars("GET", "/env", b"")
        .remove("SERVER_NAME")
        .remove("SERVER_PORT")
        .set("HTTP_HOST", "127.0.0.1")
        .add("HTTP_HOST", "127.0.0.1:18081")
        .add("HTTP_X_FOO", "a")
        .add("HTTP_X_FOO", "b")
        .add("HTTP_COOKIE", "a=1")
        .add("HTTP_COOKIE", "b=2");
    let env = server.env(&vars, b"");
    let got = |k: &str| env_str(&env, k);
    assert_eq!(got("HTTP_HOST"), "127.0.0.1:18081", "{env:?}");
    assert_eq!(got("SERVER_NAME"), "127.0.0.1", "{env:?}");
    assert_eq!(got("SERVER_PORT"), "18081", "{env:?}");
    assert_eq!(got("HTTP_X_FOO"), "a, b", "{env:?}");
    assert_eq!(got("HTTP_COOKIE"), "a=1; b=2", "{env:?}");
}

/// CONTENT_LENGTH given twice with different values is ambiguous framing (RFC 9112 6.3, the request smuggling
/// case): 400 before the app runs. Twice with the same value is harmless and served.
#[test]
fn a_repeated_content_length_must_agree() {
    let server = Server::spawn(probe_app());
    let body = b"hello!!";
    let conflicting = nginx_vars("POST", "/env?tag=cl-conflict", body).add("CONTENT_LENGTH", "5");
    let r = server.request(&conflicting, body);
    assert_eq!(r.status, 400, "CONTENT_LENGTH 7 then 5: {r:?}");
    assert!(
        !server.log().contains("called tag=cl-conflict"),
        "the app ran for conflicting lengths\n{}",
        server.log()
    );

    let same = nginx_vars("POST", "/env?tag=cl-same", body).add("CONTENT_LENGTH", "7");
    let env = server.env(&same, body);
    assert_eq!(env_str(&env, "body"), "hello!!", "{env:?}");
    assert_eq!(env_str(&env, "CONTENT_LENGTH"), "7", "{env:?}");
}

/// Through a real nginx with Debian's uwsgi_params plus `uwsgi_param HTTP_HOST $host:$server_port;` (the fix
/// the params file itself suggests for a non-default port): the app sees host:port.
#[test]
fn nginx_host_with_port_reaches_the_app() {
    let server = Server::spawn(probe_app());
    let nginx = Nginx::start(
        &server.addr.nginx_upstream(),
        "uwsgi_param HTTP_HOST $host:$server_port;",
    );
    let r = http::get(nginx.port(), "/env");
    assert_eq!(r.status, 200, "{}\n--- log ---\n{}", r.summary(), server.log());
    let env = parse_json(&r.text()).expect("JSON");
    assert_eq!(
        env_str(&env, "HTTP_HOST"),
        format!("localhost:{}", nginx.port()),
        "{env:?}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// No REQUEST_METHOD
// ---------------------------------------------------------------------------------------------------------

/// A location that forgot `include uwsgi_params` sends no REQUEST_METHOD: like uWSGI, the request is served as
/// a GET (its body still readable), with one warning per worker naming the missing include. An empty method or
/// a packet with no vars at all is still refused.
#[test]
fn a_packet_without_request_method_is_served_as_get_with_one_warning() {
    let server = Server::spawn(probe_app());
    let body = b"body-without-method";
    for n in 1..=2 {
        let vars = nginx_vars("POST", &format!("/env?tag=nomethod-{n}"), body).remove("REQUEST_METHOD");
        let env = server.env(&vars, body);
        assert_eq!(env_str(&env, "REQUEST_METHOD"), "GET", "request {n}: {env:?}");
        assert_eq!(env_str(&env, "body"), "body-without-method", "request {n}: {env:?}");
    }
    assert!(
        server.wait_for_log("uwsgi_params", LOG_WAIT),
        "no warning naming uwsgi_params\n{}",
        server.log()
    );
    assert_eq!(
        count(&server.log(), "uwsgi_params"),
        1,
        "one warning per worker, not per request\n{}",
        server.log()
    );

    let empty = nginx_vars("GET", "/env?tag=empty-method", b"").set("REQUEST_METHOD", "");
    assert_eq!(server.request(&empty, b"").status, 400, "an empty REQUEST_METHOD");
    let no_vars = Vars::default();
    assert_eq!(server.request(&no_vars, b"").status, 400, "a packet with no vars");
    assert!(
        !server.log().contains("called tag=empty-method"),
        "the app ran for an empty method\n{}",
        server.log()
    );
}

// ---------------------------------------------------------------------------------------------------------
// Bare bytes instead of an iterable
// ---------------------------------------------------------------------------------------------------------

/// An app returning `b"hello"` (or a bytearray) instead of `[b"hello"]` breaks PEP 3333 ("the application
/// object must return an iterable yielding zero or more bytestrings"); iterating it would send 104, 101, ...
/// ferrule sends it as the whole body, honouring HEAD, 204/304 and the app's Content-Length, and warns once
/// per worker citing PEP 3333. A bare str is still a 500.
#[test]
fn bare_bytes_returned_by_the_app_are_sent_as_the_body() {
    let server = Server::spawn(probe_app());
    for kind in ["bytes", "bytearray"] {
        let r = server.get(&format!("/bare?kind={kind}"));
        assert_eq!((r.status, r.text().as_str()), (200, "hello"), "{kind}: {r:?}");
    }
    let head = server.request(&nginx_vars("HEAD", "/bare?kind=bytes", b""), b"");
    assert_eq!(head.status, 200, "HEAD: {head:?}");
    assert!(head.body.is_empty(), "HEAD has no body: {head:?}");
    for status in [204, 304] {
        let r = server.get(&format!("/bare?kind=bytes&status={status}"));
        assert_eq!(r.status, status, "{r:?}");
        assert!(r.body.is_empty(), "{status} has no body: {r:?}");
    }
    let with_length = server.get("/bare?kind=bytes&cl=5");
    assert_eq!(with_length.status, 200, "{with_length:?}");
    assert_eq!(with_length.headers_all("content-length"), vec!["5"], "{with_length:?}");
    assert_eq!(with_length.text(), "hello");

    assert!(
        server.wait_for_log("PEP 3333", LOG_WAIT),
        "no warning citing PEP 3333\n{}",
        server.log()
    );
    assert_eq!(
        count(&server.log(), "PEP 3333"),
        1,
        "one warning per worker\n{}",
        server.log()
    );

    let s = server.get("/bare?kind=str");
    assert_eq!(s.status, 500, "a bare str: {s:?}");
}
