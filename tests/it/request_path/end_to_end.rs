//! Tier 3, end to end: an HTTP client -> a real nginx (`uwsgi_pass`) -> the real `ferrule` binary
//! on a Unix socket -> tests/apps/wsgi_cases.py, checking what the client and the app see.
//!
//! Each test starts its own ferrule and nginx, so tests share no state and run in parallel.

use std::time::{Duration, Instant};

use crate::harness::LOG_WAIT;
use crate::harness::ferrule::{FerruleBuilder, apps_dir};
use crate::harness::http::{ReqBody, StreamEvent, pseudo_random_bytes, sha256_hex};
use crate::harness::response::{BodyEnd, Response};
use crate::harness::stack::Stack;

const TRACEBACK: &str = "Traceback (most recent call last)";

/// The end-to-end tests' ways to start the harness's [`Stack`] on wsgi_cases.py, and to ask its app.
impl Stack {
    /// ferrule on a Unix socket (the usual deployment) behind nginx with `extra_conf` in `location /`.
    fn unix(extra_conf: &str) -> Stack {
        Stack::start(wsgi_cases().unix(), extra_conf)
    }

    /// ferrule on 127.0.0.1 (a free port) behind nginx.
    fn tcp(extra_conf: &str) -> Stack {
        Stack::start(wsgi_cases().tcp(), extra_conf)
    }

    /// The app's view of one environ key, via `/environ/key` (which answers with Python's
    /// `ascii()` of the value, so `'a, b'` for the string a, b).
    fn environ_key(&self, key: &str, headers: &[(&str, &str)]) -> (String, Response) {
        let r = self
            .client()
            .request("GET", &format!("/environ/key?key={key}"), headers, ReqBody::Empty);
        assert!(
            r.status == 200 && r.is_complete(),
            "environ key {key}: {}\n{}",
            r.summary(),
            self.logs()
        );
        (r.text(), r)
    }
}

fn wsgi_cases() -> FerruleBuilder {
    let app = apps_dir().join("wsgi_cases.py");
    FerruleBuilder::new(&format!("{}:application", app.display()))
}

/// Python's `ascii()` of a str made only of printable ASCII without quotes or backslashes.
fn py_ascii(s: &str) -> String {
    format!("'{s}'")
}

#[test]
fn sha256_matches_known_vectors() {
    // FIPS 180-4 examples, plus lengths around the 55/56/64-byte padding edges.
    assert_eq!(
        sha256_hex(b""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(
        sha256_hex(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
    );
    assert_eq!(
        sha256_hex(&[b'a'; 64]),
        "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb"
    );
}

#[test]
fn get_with_query_string() {
    let stack = Stack::unix("");
    let (qs, _) = stack.environ_key("QUERY_STRING&x=1&y=a%20b&z=", &[]);
    assert_eq!(qs, py_ascii("key=QUERY_STRING&x=1&y=a%20b&z="), "{}", stack.logs());
    let (path, _) = stack.environ_key("PATH_INFO&x=1", &[]);
    assert_eq!(path, py_ascii("/environ/key"));
    let (method, _) = stack.environ_key("REQUEST_METHOD", &[]);
    assert_eq!(method, py_ascii("GET"));

    let r = stack.get("/hello?ignored=1");
    assert!(r.status == 200 && r.is_complete(), "{}", r.summary());
    assert_eq!(r.text(), "hello world");
    // App headers keep their order and spelling through ferrule (nginx keeps them too).
    let names: Vec<&str> = r
        .headers
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| k.to_ascii_lowercase().starts_with("x-order"))
        .collect();
    assert_eq!(names, ["X-Order-A", "x-order-b"], "{}", r.summary());
    // A list body has a known length, so ferrule sends Content-Length and nginx passes it on.
    assert_eq!(r.header("content-length"), Some("11"), "{}", r.summary());
}

#[test]
fn post_10mb_read_in_every_wsgi_input_style() {
    let stack = Stack::unix("");
    // Pseudo-random bytes hold a newline every ~256 bytes, so the readline styles see many
    // lines of uneven length, and the last line has no newline.
    let body = pseudo_random_bytes(10 * 1024 * 1024 + 7, 1);
    let want = format!("{} {}", body.len(), sha256_hex(&body));
    let mut failures = Vec::new();
    for style in ["read", "read_n", "readline", "readline_limit", "readlines", "iter"] {
        let path = format!("/input/{style}");
        let r = stack.client().request(
            "POST",
            &path,
            &[("Content-Type", "application/octet-stream")],
            ReqBody::Fixed(&body),
        );
        if !(r.status == 200 && r.is_complete() && r.text() == want) {
            failures.push(format!("POST {path}: want {want:?}, got {}", r.summary()));
        }
    }
    assert!(failures.is_empty(), "{}\n{}", failures.join("\n"), stack.logs());
}

#[test]
fn chunked_upload_reaches_the_app_exactly() {
    let stack = Stack::unix("");
    // nginx de-chunks the request and sends ferrule a CONTENT_LENGTH; uneven chunk sizes make a
    // lost or repeated chunk change the checksum.
    let body = pseudo_random_bytes(3 * 1024 * 1024 + 333, 2);
    let mut chunks: Vec<&[u8]> = Vec::new();
    let mut rest = &body[..];
    for size in [1usize, 10, 4096, 65535, 1, 1_000_000].iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (head, tail) = rest.split_at((*size).min(rest.len()));
        chunks.push(head);
        rest = tail;
    }
    let r = stack
        .client()
        .request("POST", "/input/read", &[], ReqBody::Chunked(&chunks));
    let want = format!("{} {}", body.len(), sha256_hex(&body));
    assert!(
        r.status == 200 && r.is_complete() && r.text() == want,
        "chunked POST: want {want:?}, got {}\n{}",
        r.summary(),
        stack.logs()
    );
}

#[test]
fn streamed_response_reaches_the_client_as_it_is_produced() {
    // Streaming deployments turn nginx's response buffering off; with it on, nginx may hold
    // pieces back, which would test nginx rather than ferrule.
    let stack = Stack::unix("uwsgi_buffering off;");
    let gate_dir = tempfile::tempdir().expect("temp dir");
    let gate = gate_dir.path().join("gate");
    let (n, delay) = (5, 0.3);
    let path = format!("/stream?n={n}&delay={delay}&gate={}", gate.display());

    let mut client = stack.client();
    let mut s = client.stream("GET", &path, &[], ReqBody::Empty);
    assert_eq!(s.status, 200, "{}", stack.logs());
    assert!(
        s.header("content-length").is_none(),
        "a generator's body has no Content-Length: {:?}",
        s.headers
    );

    // The app holds chunk 1 until the gate file exists, and we only create it once chunk 0 is
    // here: if ferrule (or nginx) held chunk 0 back, the app gives up after its 10 s gate
    // timeout and says so in the body.
    let mut body = Vec::new();
    let first_at = loop {
        match s.next_chunk() {
            StreamEvent::Data(at, bytes) => {
                body.extend_from_slice(&bytes);
                if body.len() >= b"chunk 0\n".len() {
                    break at;
                }
            }
            StreamEvent::End(end) => panic!("body ended ({end:?}) before chunk 0: {body:?}\n{}", stack.logs()),
        }
    };
    assert!(body.starts_with(b"chunk 0\n"), "{:?}", String::from_utf8_lossy(&body));
    std::fs::write(&gate, b"").expect("open the gate");

    let (pieces, end) = s.collect_timed();
    assert_eq!(end, BodyEnd::Complete, "{}", stack.logs());
    for (_, p) in &pieces {
        body.extend_from_slice(p);
    }
    let want: String = (0..n).map(|i| format!("chunk {i}\n")).collect();
    assert_eq!(
        String::from_utf8_lossy(&body),
        want,
        "the body (\"gate timed out\" means chunk 0 was held back)"
    );

    // The app sleeps `delay` before each later chunk, so chunk 0 arrives at least (n-1)*delay
    // before the last one unless something buffers; half of that is a generous bound.
    let last_at = pieces.last().map(|(at, _)| *at).expect("chunks after the first");
    let spread = last_at.duration_since(first_at);
    let min = Duration::from_secs_f64((n - 1) as f64 * delay * 0.5);
    assert!(
        spread >= min,
        "first chunk arrived only {spread:?} before the last (want >= {min:?})"
    );
}

#[test]
fn file_wrapper_50mb_arrives_intact() {
    let stack = Stack::unix("");
    for (size, offset) in [(52_428_800u64, 0u64), (1_000_003, 12_345)] {
        let path = format!("/file?size={size}&offset={offset}");
        let started = Instant::now();
        let r = stack.get(&path);
        let took = started.elapsed();
        assert!(
            r.status == 200 && r.is_complete(),
            "GET {path}: {}\n{}",
            r.summary(),
            stack.logs()
        );
        let want_sha = r.header("x-sha256").expect("X-Sha256 from the app").to_string();
        let want_size: usize = r
            .header("x-size")
            .expect("X-Size from the app")
            .parse()
            .expect("number");
        assert_eq!(r.body.len(), want_size, "GET {path}: body length");
        assert_eq!(r.body.len() as u64, size - offset);
        assert!(
            sha256_hex(&r.body) == want_sha,
            "GET {path}: checksum differs from the app's ({took:?})"
        );
    }
}

#[test]
fn large_request_header_arrives_intact() {
    let stack = Stack::unix("");
    // 30 KB: far above a 4 KB or 8 KB header buffer, still inside ferrule's 64 KiB vars block.
    let value: String = pseudo_random_bytes(30 * 1024, 3)
        .iter()
        .map(|b| char::from(b'a' + b % 26))
        .collect();
    let (seen, _) = stack.environ_key("HTTP_X_BIG", &[("X-Big", &value)]);
    assert!(
        seen == py_ascii(&value),
        "HTTP_X_BIG: got {} bytes, want {}\n{}",
        seen.len(),
        value.len() + 2,
        stack.logs()
    );
}

/// Every way the app can fail before anything is sent: each is a 500 from ferrule (passed on by
/// nginx) with the traceback in ferrule's log, and the server keeps serving.
#[test]
fn app_errors_give_500_with_traceback_and_server_survives() {
    let stack = Stack::unix("");
    // (path, text that must follow the traceback in the log, when the app raised it itself)
    let cases: &[(&str, Option<&str>)] = &[
        ("/error/before", Some("ValueError: boom before start_response")),
        ("/error/after_start", Some("ValueError: boom after start_response")),
        ("/error/first_chunk", Some("ValueError: boom in first chunk")),
        ("/error/bad_status?status=abc", None),
        // A CRLF in the status would inject a header into the response to nginx.
        ("/error/bad_status?status=200%20OK%0D%0AX-Injected:%201", None),
        ("/error/non_str_status", None),
        ("/error/bad_header", None),
        ("/error/bad_header_name", None),
        ("/error/hop_by_hop", None),
        ("/error/non_bytes", None),
        ("/error/no_start_response", None),
        ("/error/start_response_twice", None),
    ];
    let mut failures = Vec::new();
    for (path, raised) in cases {
        let offset = stack.ferrule.log_offset();
        let r = stack.get(path);
        if r.status != 500 || !r.is_complete() || !r.text().contains("Internal Server Error") {
            failures.push(format!(
                "GET {path}: want a complete 500 \"Internal Server Error\", got {}",
                r.summary()
            ));
        }
        if r.header("x-injected").is_some() || r.header("set-cookie").is_some() {
            failures.push(format!(
                "GET {path}: an injected header reached the client: {}",
                r.summary()
            ));
        }
        if !stack.ferrule.wait_for_log_since(offset, TRACEBACK, LOG_WAIT) {
            failures.push(format!("GET {path}: no traceback in the log for this request"));
        } else if let Some(text) = raised {
            if !stack.ferrule.wait_for_log_since(offset, text, LOG_WAIT) {
                failures.push(format!("GET {path}: the log lacks {text:?}"));
            }
        }
    }
    let after = stack.get("/hello");
    if !(after.status == 200 && after.is_complete() && after.text() == "hello world") {
        failures.push(format!("GET /hello after the errors: {}", after.summary()));
    }
    assert!(failures.is_empty(), "{}\n{}", failures.join("\n"), stack.logs());
}

/// After the headers went out, an error must not look like a complete response: the client
/// has to be able to tell (PEP 3333 "Error Handling": the server should abort the response).
fn assert_incomplete(stack: &Stack, path: &str, raised: &str) {
    let offset = stack.ferrule.log_offset();
    let r = stack.get(path);
    assert_eq!(
        r.status,
        200,
        "GET {path}: headers were sent, so the status stays: {}\n{}",
        r.summary(),
        stack.logs()
    );
    assert!(
        !r.is_complete(),
        "GET {path}: the app failed midstream but the client got a COMPLETE body: {}\n{}",
        r.summary(),
        stack.logs()
    );
    assert!(
        b"first chunk\n".starts_with(&r.body) || r.body.starts_with(b"first chunk\n"),
        "GET {path}: unexpected body {}",
        r.summary()
    );
    assert!(!r.text().contains("must never be sent"), "GET {path}: {}", r.summary());
    assert!(
        stack.ferrule.wait_for_log_since(offset, raised, LOG_WAIT),
        "GET {path}: the log lacks {raised:?}\n{}",
        stack.logs()
    );
    assert!(
        stack.ferrule.log_since(offset).contains(TRACEBACK),
        "GET {path}: no traceback\n{}",
        stack.logs()
    );
    let after = stack.get("/hello");
    assert!(
        after.status == 200 && after.is_complete(),
        "GET /hello afterwards: {}",
        after.summary()
    );
}

/// Each midstream failure, through both nginx modes (buffered and not take different paths
/// through nginx's upstream code).
fn check_midstream_errors(stack_for: fn(&str) -> Stack) {
    for conf in ["", "uwsgi_buffering off;"] {
        let stack = stack_for(conf);
        assert_incomplete(&stack, "/error/midstream", "ValueError: boom midstream");
        assert_incomplete(&stack, "/exc_info/late", "ValueError: late failure");
        assert_incomplete(
            &stack,
            "/e2e/error_midstream_with_length",
            "ValueError: boom midstream with length",
        );
    }
}

#[test]
fn error_midstream_gives_incomplete_body_over_unix() {
    // A Unix socket has no RST, and a generator's body has no length: if ferrule just closed,
    // nginx would take the EOF as the end of the body and send the client a clean terminating
    // chunk, passing the truncated body off as complete. ferrule has to make nginx's read fail
    // instead (Linux reports ECONNRESET when a socket is closed with unread data).
    check_midstream_errors(Stack::unix);
}

#[test]
fn error_midstream_gives_incomplete_body_over_tcp() {
    // Over TCP the same comes from an RST.
    check_midstream_errors(Stack::tcp);
}

#[test]
fn head_request_has_headers_and_no_body() {
    let stack = Stack::start(wsgi_cases().unix().arg("--access-log"), "");
    let get = stack.get("/head");
    assert!(get.status == 200 && get.is_complete(), "{}", get.summary());
    assert_eq!(get.header("x-method"), Some("GET"));

    let head = stack.client().request("HEAD", "/head", &[], ReqBody::Empty);
    assert_eq!(head.status, 200, "{}\n{}", head.summary(), stack.logs());
    assert_eq!(head.header("x-method"), Some("HEAD"), "{}", head.summary());
    assert_eq!(head.header("content-type"), Some("text/plain"), "{}", head.summary());
    assert!(head.body.is_empty(), "{}", head.summary());
    // nginx takes HEAD answers as head-only: a body ferrule might send is dropped, not forwarded.
    assert!(
        stack
            .ferrule
            .wait_for_log("method=HEAD path=/head status=200", LOG_WAIT),
        "no access line for the HEAD\n{}",
        stack.logs()
    );
}

#[test]
fn no_content_and_not_modified() {
    let stack = Stack::start(wsgi_cases().unix().arg("--access-log"), "");
    let r = stack.get("/204");
    assert_eq!(r.status, 204, "{}\n{}", r.summary(), stack.logs());
    assert_eq!(r.header("x-empty"), Some("yes"), "{}", r.summary());
    assert!(r.header("content-length").is_none_or(|v| v == "0"), "{}", r.summary());

    let r = stack.get("/304");
    assert_eq!(r.status, 304, "{}\n{}", r.summary(), stack.logs());
    assert_eq!(r.header("etag"), Some("\"v1\""), "{}", r.summary());

    let log = stack.nginx.error_log();
    assert!(
        !log.contains("upstream sent"),
        "nginx found the upstream response malformed:\n{log}"
    );
    for line in ["path=/204 status=204 bytes=0", "path=/304 status=304 bytes=0"] {
        assert!(
            stack.ferrule.wait_for_log(line, LOG_WAIT),
            "no access line with {line:?}\n{}",
            stack.logs()
        );
    }
}

#[test]
fn validator_sees_no_protocol_violation() {
    let stack = Stack::unix("");
    let offset = stack.ferrule.log_offset();
    // wsgi_cases.py turns every WSGIWarning into an exception, so a violation shows as a 500.
    let body = b"checked by wsgiref.validate";
    let post = stack.client().request(
        "POST",
        "/validator",
        &[("Content-Type", "text/plain")],
        ReqBody::Fixed(body),
    );
    let want = format!("validated {} {}", body.len(), sha256_hex(body));
    assert!(
        post.status == 200 && post.is_complete() && post.text() == want,
        "POST /validator: {}\n{}",
        post.summary(),
        stack.logs()
    );
    let get = stack.get("/validator");
    let want = format!("validated 0 {}", sha256_hex(b""));
    assert!(
        get.status == 200 && get.is_complete() && get.text() == want,
        "GET /validator: {}\n{}",
        get.summary(),
        stack.logs()
    );
    let log = stack.ferrule.log_since(offset);
    for bad in ["WSGIWarning", "AssertionError", TRACEBACK] {
        assert!(!log.contains(bad), "the validator complained ({bad}):\n{log}");
    }
}

#[test]
fn repeated_request_headers_are_joined() {
    let stack = Stack::unix("");
    // nginx passes each header line as its own uwsgi var; ferrule joins them (RFC 9110 5.3),
    // cookies with "; " (RFC 6265 5.4).
    let (multi, _) = stack.environ_key(
        "HTTP_X_MULTI",
        &[("X-Multi", "a"), ("X-Multi", "b"), ("X-Multi", "c d")],
    );
    assert_eq!(multi, py_ascii("a, b, c d"), "{}", stack.logs());
    let (cookie, _) = stack.environ_key("HTTP_COOKIE", &[("Cookie", "a=1"), ("Cookie", "b=2")]);
    assert_eq!(cookie, py_ascii("a=1; b=2"), "{}", stack.logs());
}

#[test]
fn remote_addr_and_port_reach_the_app() {
    let stack = Stack::unix("");
    // gunicorn behind nginx on a Unix socket reports no usable REMOTE_ADDR; the uwsgi protocol
    // carries nginx's view of the client.
    let (addr, _) = stack.environ_key("REMOTE_ADDR", &[]);
    assert_eq!(addr, py_ascii("127.0.0.1"), "{}", stack.logs());
    let (port, r) = stack.environ_key("REMOTE_PORT", &[]);
    assert_eq!(
        port,
        py_ascii(
            &r.local_port
                .expect("a response through nginx has a client port")
                .to_string()
        ),
        "REMOTE_PORT should be our client port"
    );
}
