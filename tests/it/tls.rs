//! Tier 3, end to end over TLS: an HTTP client -> a real nginx (`uwsgi_pass suwsgi://` with the
//! `uwsgi_ssl_*` settings) -> the real `ferrule` binary on a `tls://127.0.0.1:0` socket -> the test apps. Also a
//! rustls client talking uwsgi to the socket directly (close_notify against an abort, the certificate served),
//! and hostile peers that are not TLS at all or never finish their handshake.
//!
//! Each test makes its own PKI (tests/it/harness/tls.rs) and starts its own ferrule and nginx on free ports, so the
//! tests share no state and run in parallel. Run with `cargo test --release --test it tls::`.

mod certificate_v1;
mod read_path;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::harness::LOG_WAIT;
use crate::harness::ferrule::{Addr, Ferrule, FerruleBuilder, apps_dir, listening_addrs, temp_dir};
use crate::harness::http::{self, ReqBody, pseudo_random_bytes, sha256_hex};
use crate::harness::json::{Json, parse_json};
use crate::harness::log::field;
use crate::harness::nginx::Nginx;
use crate::harness::procs::{alive, live_children, poll_until};
use crate::harness::response::{BodyEnd, Response};
use crate::harness::stack::Stack;
use crate::harness::tls::{Pki, TlsEnd, client_hello, tls_request};
use crate::harness::uwsgi::{encode_request, is_reset_error, nginx_vars, parse_response, read_to_close};
use rustls::HandshakeKind;

/// A refused start or `--check-config` never gets far; this only bounds a hang.
const EXIT_WAIT: Duration = Duration::from_secs(20);
/// Workers report their counters to the master about once a second; a scrape shows them within a few reports.
const METRICS_WAIT: Duration = Duration::from_secs(15);
/// Starting a worker imports CPython; on a loaded 2-core box that takes a while.
const WORKER_WAIT: Duration = Duration::from_secs(30);
/// How long a connection ferrule should close may stay open: far below the default --read-timeout, so a close
/// means ferrule decided to close it.
const CLOSE_WITHIN: Duration = Duration::from_secs(10);

const TRACEBACK: &str = "Traceback (most recent call last)";

// --- ferrule, nginx and the metrics in front of it -----------------------------------------------------------

/// tests/apps/wsgi_cases.py.
fn wsgi_cases() -> FerruleBuilder {
    FerruleBuilder::new(&format!("{}:application", apps_dir().join("wsgi_cases.py").display()))
}

/// tests/apps/lifecycle_app.py (its /pid and /sleep answer with the worker's pid) with `--workers N`.
fn lifecycle_app(workers: usize) -> FerruleBuilder {
    FerruleBuilder::new("lifecycle_app:application")
        .arg("--pythonpath")
        .arg(apps_dir())
        .arg("--workers")
        .arg(workers.to_string())
}

/// Listens on `tls://127.0.0.1:0` (the port read back from the `listening` line) with these files.
fn over_tls(builder: FerruleBuilder, cert: &Path, key: &Path) -> FerruleBuilder {
    builder
        .socket("tls://127.0.0.1:0")
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
}

/// Adds `--metrics unix:<tempdir>/metrics.sock`; returns the nginx `location = /metrics` (for the `server`
/// block) that publishes it, as tests/it/operations.rs does.
fn with_metrics(builder: FerruleBuilder) -> (FerruleBuilder, String) {
    let socket = builder.tempdir().join("metrics.sock");
    let location = format!(
        "        location = /metrics {{\n            include /etc/nginx/uwsgi_params;\n            uwsgi_pass unix:{};\n        }}",
        socket.display()
    );
    (
        builder.arg("--metrics").arg(format!("unix:{}", socket.display())),
        location,
    )
}

/// The address of ferrule's (first) socket, the `tls://` one in these tests.
fn tls_addr(ferrule: &Ferrule) -> SocketAddr {
    match &ferrule.addr {
        Addr::Tcp(addr) => *addr,
        other => panic!("expected a TCP socket, got {other:?}"),
    }
}

/// nginx's `uwsgi_pass` value for ferrule's TLS socket.
fn suwsgi(ferrule: &Ferrule) -> String {
    format!("suwsgi://{}", tls_addr(ferrule))
}

/// nginx checks ferrule's certificate against `ca` for the name `name` (nginx matches DNS names only, so
/// `localhost` rather than 127.0.0.1).
fn verify_conf(ca: &Path, name: &str) -> String {
    format!(
        "            uwsgi_ssl_trusted_certificate {};\n            uwsgi_ssl_verify on;\n            uwsgi_ssl_name {name};\n",
        ca.display()
    )
}

/// nginx presents this client certificate to ferrule.
fn client_cert_conf(cert: &Path, key: &Path) -> String {
    format!(
        "            uwsgi_ssl_certificate {};\n            uwsgi_ssl_certificate_key {};\n",
        cert.display(),
        key.display()
    )
}

/// ferrule and an nginx in front of it that verifies ferrule's certificate, with `extra` in `location /` and
/// `server_conf` in `server`.
fn tls_stack(builder: FerruleBuilder, pki: &Pki, extra: &str, server_conf: &str) -> Stack {
    let ferrule = builder.spawn();
    let location = format!("{}{extra}", verify_conf(&pki.ca, "localhost"));
    let nginx = Nginx::start_with_server_conf(&suwsgi(&ferrule), &location, server_conf);
    Stack { nginx, ferrule }
}

/// GET `path` through nginx; panics (with both logs) unless it is a complete 200.
fn get_ok(stack: &Stack, path: &str) -> Response {
    let r = stack.get(path);
    assert!(
        r.status == 200 && r.is_complete(),
        "GET {path}: {}\n{}",
        r.summary(),
        stack.logs()
    );
    r
}

/// /metrics through nginx, as OpenMetrics text.
fn scrape(port: u16) -> String {
    let r = http::get(port, "/metrics");
    assert!(r.status == 200 && r.is_complete(), "GET /metrics: {}", r.summary());
    let text = r.text();
    assert!(text.ends_with("# EOF\n"), "OpenMetrics text ends with `# EOF`:\n{text}");
    text
}

/// The sample `name{key="value"}` of a scrape (summed if several series carry that label); 0 while there is
/// none, as a counter whose label value has not occurred yet may not be written.
fn sample(text: &str, name: &str, (key, value): (&str, &str)) -> f64 {
    let label = format!("{key}=\"{value}\"");
    let mut total = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, rest) = match line.find('}') {
            Some(end) => (&line[..end], &line[end + 1..]),
            None => continue,
        };
        let Some((series_name, labels)) = series.split_once('{') else {
            continue;
        };
        if series_name != name || !labels.split(',').any(|l| l == label) {
            continue;
        }
        let v = rest.split_whitespace().next().unwrap_or("");
        total += v
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad sample value in {line:?}"));
    }
    total
}

/// `ferrule_tls_handshakes_total{kind=...}`: `full` or `resumed`.
fn handshakes(text: &str, kind: &str) -> f64 {
    sample(text, "ferrule_tls_handshakes_total", ("kind", kind))
}

/// `ferrule_tls_handshake_failures_total{reason=...}`.
fn failures(text: &str, reason: &str) -> f64 {
    sample(text, "ferrule_tls_handshake_failures_total", ("reason", reason))
}

/// Scrapes (bounded) until `done` holds for the scrape; returns it, or panics with the last one and `what`.
fn wait_metrics(port: u16, what: &str, done: impl Fn(&str) -> bool) -> String {
    let mut last = String::new();
    let ok = poll_until(METRICS_WAIT, || {
        last = scrape(port);
        done(&last)
    });
    assert!(ok, "the metrics never showed {what}:\n{last}");
    last
}

/// The lines saying a handshake failed for `reason` (`reason=x` or `reason="x"`).
fn failure_lines(log: &str, reason: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("TLS handshake failed") && field(l, "reason") == Some(reason))
        .map(str::to_owned)
        .collect()
}

/// Waits (bounded) for a failed-handshake line with `reason` after `offset`, checks it is a warning that names
/// the peer (`peer=<peer>`, or any loopback peer when `None`), and returns it.
fn expect_failure_line(ferrule: &Ferrule, offset: usize, reason: &str, peer: Option<SocketAddr>) -> String {
    let mut lines = Vec::new();
    let seen = poll_until(LOG_WAIT, || {
        lines = failure_lines(&ferrule.log_since(offset), reason);
        !lines.is_empty()
    });
    assert!(
        seen,
        "no `TLS handshake failed ... reason={reason}` line\n--- log since the attempt ---\n{}",
        ferrule.log_since(offset)
    );
    let line = lines.swap_remove(0);
    assert!(line.contains("WARN"), "a failed handshake is a warning: {line}");
    let named = match peer {
        // The whole address: `peer=127.0.0.1:4000` must not pass for 127.0.0.1:40001.
        Some(p) => line
            .match_indices(&format!("peer={p}"))
            .any(|(at, m)| !line[at + m.len()..].starts_with(|c: char| c.is_ascii_digit())),
        None => line.contains("peer=127.0.0.1:"),
    };
    assert!(named, "the connection span names the peer ({peer:?}): {line}");
    line
}

/// A uwsgi GET as nginx sends it, ready to write.
fn uwsgi_get(uri: &str) -> Vec<u8> {
    encode_request(nginx_vars("GET", uri, b"").as_slice(), b"")
}

// --- requests through nginx ----------------------------------------------------------------------------------

/// The request and response shapes of tests/it/request_path/end_to_end.rs, through `suwsgi://`: a GET, a 10 MB POST (spooled
/// to a file by ferrule) and a small one, a generator's body, a 50 MB wsgi.file_wrapper response (read and
/// sealed in 64 KiB pieces, no sendfile), and an app error before the headers (a whole 500).
#[test]
fn get_post_stream_file_and_500_arrive_intact_through_suwsgi() {
    let pki = Pki::new();
    let stack = tls_stack(over_tls(wsgi_cases(), &pki.server_cert, &pki.server_key), &pki, "", "");

    let r = get_ok(&stack, "/hello?x=1");
    assert_eq!(r.text(), "hello world");
    assert_eq!(r.header("content-length"), Some("11"), "{}", r.summary());

    let body = pseudo_random_bytes(10 * 1024 * 1024 + 7, 41);
    let want = format!("{} {}", body.len(), sha256_hex(&body));
    let r = stack.client().request(
        "POST",
        "/input/read",
        &[("Content-Type", "application/octet-stream")],
        ReqBody::Fixed(&body),
    );
    assert!(
        r.status == 200 && r.is_complete() && r.text() == want,
        "POST 10 MB: want {want:?}, got {}\n{}",
        r.summary(),
        stack.logs()
    );
    let small = pseudo_random_bytes(5000, 42);
    let r = stack.client().request("POST", "/echo", &[], ReqBody::Fixed(&small));
    assert!(
        r.status == 200 && r.is_complete() && r.body == small,
        "POST /echo: {}\n{}",
        r.summary(),
        stack.logs()
    );

    let r = get_ok(&stack, "/stream?n=200");
    let want: String = (0..200).map(|i| format!("chunk {i}\n")).collect();
    assert_eq!(r.text(), want, "the generator's body");

    for (path, size) in [
        ("/file?size=52428800", 52_428_800usize),
        ("/file?size=1000003&offset=12345", 1_000_003 - 12_345),
        ("/file?size=300001&kind=bytesio", 300_001),
    ] {
        let r = get_ok(&stack, path);
        assert_eq!(r.body.len(), size, "GET {path}: body length");
        assert_eq!(
            r.header("x-size").and_then(|s| s.parse::<usize>().ok()),
            Some(size),
            "{}",
            r.summary()
        );
        let want = r.header("x-sha256").expect("X-Sha256 from the app").to_owned();
        assert!(
            sha256_hex(&r.body) == want,
            "GET {path}: checksum differs from the app's"
        );
    }

    let offset = stack.ferrule.log_offset();
    let r = stack.get("/error/before");
    assert!(
        r.status == 500 && r.is_complete() && r.text().contains("Internal Server Error"),
        "GET /error/before: {}\n{}",
        r.summary(),
        stack.logs()
    );
    assert!(
        stack
            .ferrule
            .wait_for_log_since(offset, "ValueError: boom before start_response", LOG_WAIT),
        "no traceback for the 500\n{}",
        stack.logs()
    );
    assert_eq!(get_ok(&stack, "/hello").text(), "hello world", "served after the 500");
}

/// Removes the per-connection and routing keys from a `/environ` answer (they differ by design) after checking
/// the routing header says which way the request went.
fn environ_without(environ: Json, via: &str) -> Json {
    let Json::Object(members) = environ else {
        panic!("/environ answers an object: {environ:?}")
    };
    let strings = members
        .iter()
        .find(|(k, _)| k == "str")
        .map(|(_, v)| v.clone())
        .expect("a \"str\" member");
    assert_eq!(
        strings.get("HTTP_X_FERRULE_VIA").and_then(Json::as_str),
        Some(via),
        "nginx routed the request by its X-Ferrule-Via header"
    );
    let drop = ["REMOTE_PORT", "HTTP_X_FERRULE_VIA"];
    Json::Object(
        members
            .into_iter()
            .map(|(k, v)| match (k.as_str(), v) {
                ("str", Json::Object(m)) => (
                    k,
                    Json::Object(m.into_iter().filter(|(k, _)| !drop.contains(&k.as_str())).collect()),
                ),
                (_, v) => (k, v),
            })
            .collect(),
    )
}

/// TLS between nginx and ferrule is invisible to the app: one ferrule serves a `tls://` and a plain TCP socket,
/// nginx sends the same requests to each (picked by a header), and the environs are equal but for REMOTE_PORT
/// and that header. In particular wsgi.url_scheme follows what nginx says (UWSGI_SCHEME here), not the hop.
#[test]
fn environ_over_tls_is_the_environ_over_plain_tcp() {
    let pki = Pki::new();
    let ferrule = over_tls(wsgi_cases(), &pki.server_cert, &pki.server_key)
        .arg("--socket")
        .arg("127.0.0.1:0")
        .spawn();
    let addrs = listening_addrs(&ferrule.log());
    let [Addr::Tcp(tls), Addr::Tcp(plain)] = addrs.as_slice() else {
        panic!(
            "two TCP listeners expected, the tls:// one first: {addrs:?}\n{}",
            ferrule.log()
        )
    };
    assert_eq!(*tls, tls_addr(&ferrule));
    let location = format!(
        "{}            uwsgi_param UWSGI_SCHEME $http_x_scheme if_not_empty;\n            if ($http_x_ferrule_via = plain) {{\n                uwsgi_pass {plain};\n            }}\n",
        verify_conf(&pki.ca, "localhost")
    );
    let nginx = Nginx::start(&format!("suwsgi://{tls}"), &location);
    let stack = Stack { nginx, ferrule };

    let body = pseudo_random_bytes(5000, 43);
    let cases = [
        (
            "GET",
            "/environ?a=1&b=%20x&c=",
            vec![("X-Custom", "v1"), ("Cookie", "c=1; d=2"), ("Accept", "*/*")],
            ReqBody::Empty,
        ),
        (
            "POST",
            "/environ?posted=1",
            vec![("Content-Type", "text/plain; charset=utf-8")],
            ReqBody::Fixed(&body),
        ),
        ("GET", "/environ", vec![("X-Scheme", "https")], ReqBody::Empty),
    ];
    for (method, path, headers, body) in cases {
        let mut answers = Vec::new();
        for via in ["tls", "plain"] {
            let mut h = headers.clone();
            h.push(("X-Ferrule-Via", via));
            let r = stack.client().request(method, path, &h, body);
            assert!(
                r.status == 200 && r.is_complete(),
                "{method} {path} via {via}: {}\n{}",
                r.summary(),
                stack.logs()
            );
            let json = parse_json(&r.text()).unwrap_or_else(|e| panic!("/environ is JSON ({e}): {}", r.summary()));
            answers.push(environ_without(json, via));
        }
        let scheme = |j: &Json| {
            j.get("str")
                .and_then(|s| s.get("wsgi.url_scheme"))
                .and_then(Json::as_str)
                .map(str::to_owned)
        };
        let want_scheme = if headers.iter().any(|(k, _)| *k == "X-Scheme") {
            "https"
        } else {
            "http"
        };
        assert_eq!(
            scheme(&answers[0]).as_deref(),
            Some(want_scheme),
            "{method} {path}: wsgi.url_scheme over TLS"
        );
        assert_eq!(
            answers[0], answers[1],
            "{method} {path}: the environ over tls:// (left) differs from the one over plain TCP (right)"
        );
    }
}

/// After the headers went out, an app error must not look like a complete response (PEP 3333, "Error
/// Handling"): over TLS ferrule ends the connection without close_notify (a reset), so nginx's read fails and
/// it cuts the client's response short, buffered or not. `cases` are (path, what the app raised).
fn check_truncated_through_nginx(cases: &[(&str, &str)], with_length: bool) {
    let pki = Pki::new();
    let ferrule = over_tls(wsgi_cases(), &pki.server_cert, &pki.server_key).spawn();
    let verify = verify_conf(&pki.ca, "localhost");
    let buffered = Nginx::start(&suwsgi(&ferrule), &verify);
    let unbuffered = Nginx::start(
        &suwsgi(&ferrule),
        &format!("{verify}            uwsgi_buffering off;\n"),
    );
    let mut problems = Vec::new();
    for nginx in [&buffered, &unbuffered] {
        for (path, raised) in cases {
            let offset = ferrule.log_offset();
            let r = http::get(nginx.port(), path);
            let what = format!("GET {path} (nginx on {})", nginx.port());
            if r.status != 200 {
                problems.push(format!(
                    "{what}: the headers were sent, so the status stays 200: {}",
                    r.summary()
                ));
            }
            if r.is_complete() {
                problems.push(format!(
                    "{what}: the app failed midstream but the client got a COMPLETE body: {}",
                    r.summary()
                ));
            }
            if with_length && r.header("content-length") != Some("1000") {
                problems.push(format!(
                    "{what}: the app's Content-Length is passed on: {}",
                    r.summary()
                ));
            }
            if !(b"first chunk\n".starts_with(&r.body) || r.body.starts_with(b"first chunk\n")) {
                problems.push(format!("{what}: unexpected body {}", r.summary()));
            }
            if r.text().contains("must never be sent") {
                problems.push(format!("{what}: {}", r.summary()));
            }
            if !ferrule.wait_for_log_since(offset, raised, LOG_WAIT) {
                problems.push(format!("{what}: the log lacks {raised:?}"));
            } else if !ferrule.log_since(offset).contains(TRACEBACK) {
                problems.push(format!("{what}: no traceback"));
            }
        }
    }
    let after = http::get(buffered.port(), "/hello");
    if !(after.status == 200 && after.is_complete()) {
        problems.push(format!("GET /hello afterwards: {}", after.summary()));
    }
    assert!(
        problems.is_empty(),
        "{}\n--- ferrule log ---\n{}\n{}{}",
        problems.join("\n"),
        ferrule.log(),
        buffered.error_log(),
        unbuffered.error_log()
    );
}

/// The app's own Content-Length: nginx counts the bytes, so the client gets fewer than announced.
#[test]
fn an_error_after_the_headers_cuts_a_response_with_content_length_short() {
    check_truncated_through_nginx(
        &[(
            "/e2e/error_midstream_with_length",
            "ValueError: boom midstream with length",
        )],
        true,
    );
}

/// No Content-Length (a generator's body): nginx reads the body until the upstream closes and sends it chunked,
/// so only a failed read keeps it from sending the last chunk that would pass the body off as complete.
#[test]
fn an_error_after_the_headers_leaves_a_chunked_response_without_its_last_chunk() {
    check_truncated_through_nginx(
        &[
            ("/error/midstream", "ValueError: boom midstream"),
            ("/exc_info/late", "ValueError: late failure"),
        ],
        false,
    );
}

/// What nginx cannot show: on the wire, a complete response ends with close_notify and an aborted one with a
/// fatal alert instead; the certificate served is the configured one; and a second connection resumes the
/// first one's session.
#[test]
fn a_direct_client_sees_close_notify_after_a_response_and_none_after_an_abort() {
    let pki = Pki::new();
    let ferrule = over_tls(wsgi_cases(), &pki.server_cert, &pki.server_key).spawn();
    let addr = tls_addr(&ferrule);
    let client = pki.client(false);

    let first = tls_request(addr, Arc::clone(&client), &uwsgi_get("/hello"))
        .unwrap_or_else(|e| panic!("TLS request: {e}\n{}", ferrule.log()));
    assert_eq!(first.end, TlsEnd::CloseNotify, "{}", ferrule.log());
    assert_eq!(
        first.peer_leaf, pki.server_der,
        "the certificate from --tls-cert is served"
    );
    assert_eq!(first.handshake, Some(HandshakeKind::Full));
    let r = parse_response(&first.bytes);
    assert_eq!((r.status, r.text().as_str()), (200, "hello world"));

    let second = tls_request(addr, Arc::clone(&client), &uwsgi_get("/stream?n=50")).expect("TLS request");
    assert_eq!(second.end, TlsEnd::CloseNotify);
    assert_eq!(
        second.handshake,
        Some(HandshakeKind::Resumed),
        "the same client connecting again resumes its session with a ticket"
    );
    let want: String = (0..50).map(|i| format!("chunk {i}\n")).collect();
    assert_eq!(parse_response(&second.bytes).text(), want);

    // 3 MiB in 64 KiB pieces, each sealed as it is read.
    let file = tls_request(addr, Arc::clone(&client), &uwsgi_get("/file?size=3145728")).expect("TLS request");
    assert_eq!(file.end, TlsEnd::CloseNotify);
    let r = parse_response(&file.bytes);
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 3_145_728);
    assert!(
        Some(sha256_hex(&r.body).as_str()) == r.header("x-sha256"),
        "the file's checksum"
    );

    for path in ["/error/midstream", "/e2e/error_midstream_with_length"] {
        let aborted = tls_request(addr, Arc::clone(&client), &uwsgi_get(path)).expect("TLS request");
        assert!(
            matches!(&aborted.end, TlsEnd::Error(alert) if alert.contains("BadRecordMac")),
            "GET {path}: an aborted response ends in a fatal alert, without close_notify, got {:?} after {:?}",
            aborted.end,
            String::from_utf8_lossy(&aborted.bytes)
        );
        assert!(
            !String::from_utf8_lossy(&aborted.bytes).contains("must never be sent"),
            "GET {path}"
        );
    }
    let after = tls_request(addr, client, &uwsgi_get("/hello")).expect("TLS request");
    assert_eq!(after.end, TlsEnd::CloseNotify);
}

/// The limits answer through TLS as they do on a plain socket, each answer sealed and ended with close_notify:
/// 413 past `--max-body-size` (through nginx too, which is still sending the body when the answer comes),
/// 431 past `--buffer-size`, 400 for a bad CONTENT_LENGTH; `--allow-from` refuses a peer before any handshake.
#[test]
fn limits_answer_with_their_status_codes_through_tls() {
    let pki = Pki::new();
    let builder = over_tls(wsgi_cases(), &pki.server_cert, &pki.server_key).args([
        "--max-body-size",
        "1000",
        "--buffer-size",
        "4096",
    ]);
    let stack = tls_stack(builder, &pki, "", "");
    let ferrule = &stack.ferrule;
    let addr = tls_addr(ferrule);
    let big = pseudo_random_bytes(3 * 1024 * 1024, 7);
    let r = stack.client().request(
        "POST",
        "/input/read",
        &[("Content-Type", "application/octet-stream")],
        ReqBody::Fixed(&big),
    );
    assert_eq!(
        r.status,
        413,
        "a 3 MB POST through nginx: {}\n{}",
        r.summary(),
        stack.logs()
    );
    let client = pki.client(false);
    let body = vec![b'x'; 5000];
    let too_big = encode_request(nginx_vars("POST", "/echo", &body).as_slice(), &body);
    let big_vars = nginx_vars("GET", "/hello", b"").add("HTTP_X_BIG", "y".repeat(5000));
    let too_many_vars = encode_request(big_vars.as_slice(), b"");
    let bad_length = nginx_vars("POST", "/echo", b"abc").add("CONTENT_LENGTH", "12abc");
    let bad_length = encode_request(bad_length.as_slice(), b"abc");
    for (what, request, status) in [
        ("a body over --max-body-size", too_big, 413),
        ("vars over --buffer-size", too_many_vars, 431),
        ("an invalid CONTENT_LENGTH", bad_length, 400),
    ] {
        let answer = tls_request(addr, Arc::clone(&client), &request)
            .unwrap_or_else(|e| panic!("{what}: TLS request: {e}\n{}", ferrule.log()));
        assert_eq!(
            parse_response(&answer.bytes).status,
            status,
            "{what}\n{}",
            ferrule.log()
        );
        assert_eq!(answer.end, TlsEnd::CloseNotify, "{what}: a whole answer, ended cleanly");
    }
    let fine = tls_request(addr, client, &uwsgi_get("/hello")).expect("TLS request");
    assert_eq!(parse_response(&fine.bytes).status, 200, "the worker serves on");

    let fenced = over_tls(wsgi_cases(), &pki.server_cert, &pki.server_key)
        .args(["--allow-from", "10.0.0.0/8"])
        .spawn();
    let refused = tls_request(tls_addr(&fenced), pki.client(false), &uwsgi_get("/hello"));
    assert!(
        refused.is_err(),
        "a peer outside --allow-from gets no handshake: {:?}\n{}",
        refused.map(|a| a.end),
        fenced.log()
    );
}

/// `--timeout` through TLS: a request stuck before its headers gets a sealed 504 that ends with close_notify;
/// one stuck after its headers were sent is cut off with a fatal alert, never a clean end.
#[test]
fn a_timed_out_request_gets_a_sealed_504_or_is_cut_off_through_tls() {
    let pki = Pki::new();
    let ferrule = over_tls(wsgi_cases(), &pki.server_cert, &pki.server_key)
        .args(["--timeout", "1"])
        .spawn();
    let addr = tls_addr(&ferrule);
    let client = pki.client(false);
    let stuck = tls_request(addr, Arc::clone(&client), &uwsgi_get("/sleep?s=4")).expect("TLS request");
    assert_eq!(parse_response(&stuck.bytes).status, 504, "{}", ferrule.log());
    assert_eq!(stuck.end, TlsEnd::CloseNotify, "the 504 is a whole answer");

    let cut = tls_request(addr, client, &uwsgi_get("/stream?n=3&delay=4")).expect("TLS request");
    let text = String::from_utf8_lossy(&cut.bytes);
    assert!(
        cut.end != TlsEnd::CloseNotify && !text.contains("chunk 2"),
        "a response stuck after its headers must not end cleanly: {:?} after {text:?}\n{}",
        cut.end,
        ferrule.log()
    );
}

// --- certificates both ways ----------------------------------------------------------------------------------

/// `--tls-client-ca`: nginx without a client certificate, or with one from another CA, gets no answer (502)
/// and ferrule logs and counts why; with a certificate from the CA it is served.
#[test]
fn a_client_certificate_from_the_ca_is_required_with_tls_client_ca() {
    let pki = Pki::new();
    let builder = over_tls(wsgi_cases(), &pki.server_cert, &pki.server_key)
        .arg("--tls-client-ca")
        .arg(&pki.ca);
    let (builder, metrics) = with_metrics(builder);
    let ferrule = builder.spawn();
    let verify = verify_conf(&pki.ca, "localhost");
    let upstream = suwsgi(&ferrule);
    let right = Nginx::start_with_server_conf(
        &upstream,
        &format!("{verify}{}", client_cert_conf(&pki.client_cert, &pki.client_key)),
        &metrics,
    );
    let none = Nginx::start(&upstream, &verify);
    let other = Nginx::start(
        &upstream,
        &format!(
            "{verify}{}",
            client_cert_conf(&pki.other_client_cert, &pki.other_client_key)
        ),
    );
    let logs = || {
        format!(
            "--- ferrule log ---\n{}\n{}{}{}",
            ferrule.log(),
            right.error_log(),
            none.error_log(),
            other.error_log()
        )
    };

    let before = scrape(right.port());
    for family in ["ferrule_tls_handshakes", "ferrule_tls_handshake_failures"] {
        assert!(
            before.contains(&format!("# TYPE {family} counter")),
            "no counter family {family}:\n{before}"
        );
    }

    let offset = ferrule.log_offset();
    let r = http::get(none.port(), "/hello");
    assert_eq!(r.status, 502, "no client certificate: {}\n{}", r.summary(), logs());
    assert!(!r.text().contains("hello world"));
    expect_failure_line(&ferrule, offset, "no-client-certificate", None);

    let offset = ferrule.log_offset();
    let r = http::get(other.port(), "/hello");
    assert_eq!(r.status, 502, "another CA's certificate: {}\n{}", r.summary(), logs());
    expect_failure_line(&ferrule, offset, "unknown-ca", None);

    let r = http::get(right.port(), "/hello");
    assert!(
        r.status == 200 && r.is_complete() && r.text() == "hello world",
        "the CA's certificate: {}\n{}",
        r.summary(),
        logs()
    );

    let s = wait_metrics(right.port(), "one failure of each kind and a handshake", |s| {
        failures(s, "no-client-certificate") >= 1.0
            && failures(s, "unknown-ca") >= 1.0
            && handshakes(s, "full") + handshakes(s, "resumed") >= 1.0
    });
    assert_eq!(failures(&s, "no-client-certificate"), 1.0, "{s}");
    assert_eq!(failures(&s, "unknown-ca"), 1.0, "{s}");
    for reason in [
        "bad-certificate",
        "plain-uwsgi",
        "http",
        "not-tls",
        "timeout",
        "protocol",
    ] {
        assert_eq!(failures(&s, reason), 0.0, "reason {reason}:\n{s}");
    }
}

/// nginx verifying ferrule (`uwsgi_ssl_verify on`): the right CA and name are served; a wrong name, or a CA
/// that did not sign ferrule's certificate, is a 502 with nginx saying why in its error log.
#[test]
fn nginx_verifies_ferrules_certificate_and_name() {
    let pki = Pki::new();
    let ferrule = over_tls(wsgi_cases(), &pki.server_cert, &pki.server_key).spawn();
    let upstream = suwsgi(&ferrule);
    let good = Nginx::start(&upstream, &verify_conf(&pki.ca, "localhost"));
    let wrong_name = Nginx::start(&upstream, &verify_conf(&pki.ca, "wrong.example"));
    let wrong_ca = Nginx::start(&upstream, &verify_conf(&pki.other_ca, "localhost"));

    let r = http::get(good.port(), "/hello");
    assert!(
        r.status == 200 && r.text() == "hello world",
        "{}\n{}\n{}",
        r.summary(),
        ferrule.log(),
        good.error_log()
    );

    let r = http::get(wrong_name.port(), "/hello");
    assert_eq!(r.status, 502, "{}", r.summary());
    let log = wrong_name.error_log();
    assert!(
        log.contains("upstream SSL certificate does not match \"wrong.example\""),
        "nginx says the name does not match:\n{log}"
    );

    let r = http::get(wrong_ca.port(), "/hello");
    assert_eq!(r.status, 502, "{}", r.summary());
    let log = wrong_ca.error_log();
    assert!(
        log.contains("upstream SSL certificate verify error"),
        "nginx says it cannot verify the certificate:\n{log}"
    );
}

/// A client certificate from the CA that has expired is refused, and the reason says so.
#[test]
fn an_expired_client_certificate_is_refused_as_a_bad_certificate() {
    let pki = Pki::new();
    let ferrule = over_tls(wsgi_cases(), &pki.server_cert, &pki.server_key)
        .arg("--tls-client-ca")
        .arg(&pki.ca)
        .spawn();
    let addr = tls_addr(&ferrule);
    let offset = ferrule.log_offset();
    let expired =
        crate::harness::tls::client_config(&pki.ca, Some((&pki.expired_client_cert, &pki.expired_client_key)));
    match tls_request(addr, expired, &uwsgi_get("/hello")) {
        Err(_) => {}
        Ok(answer) => assert!(
            answer.bytes.is_empty() && answer.end != TlsEnd::CloseNotify,
            "an expired client certificate got an answer: {:?} {:?}",
            answer.end,
            String::from_utf8_lossy(&answer.bytes)
        ),
    }
    let line = expect_failure_line(&ferrule, offset, "bad-certificate", None);
    assert!(line.contains("Expired"), "the line says why: {line}");
    let fine = tls_request(addr, pki.client(true), &uwsgi_get("/hello")).expect("TLS request");
    assert_eq!(parse_response(&fine.bytes).status, 200);
}

// --- sessions ------------------------------------------------------------------------------------------------

/// Session tickets are sealed with keys every worker shares, so with `uwsgi_ssl_session_reuse on` (nginx's
/// default) nginx resumes its session whichever of the 3 workers takes the connection: almost every handshake
/// after the first is resumed. With reuse off every one is full. TLS 1.2 is what Debian's nginx 1.22 speaks
/// unless told otherwise; there OpenSSL drops a session resumed with a ticket when a new ticket arrives.
#[test]
fn sessions_resume_on_every_worker_with_session_reuse_on_tls12() {
    sessions_resume_on_every_worker("TLSv1.2", false);
}

#[test]
fn sessions_resume_on_every_worker_with_session_reuse_on_tls13() {
    sessions_resume_on_every_worker("TLSv1.3", false);
}

/// Under `--preload` the workers are forked by the zygote and get the master's keys the same way.
#[test]
fn sessions_resume_on_every_preloaded_worker() {
    sessions_resume_on_every_worker("TLSv1.2", true);
}

fn sessions_resume_on_every_worker(protocol: &str, preload: bool) {
    let pki = Pki::new();
    let mut app = over_tls(lifecycle_app(3), &pki.server_cert, &pki.server_key);
    if preload {
        app = app.arg("--preload");
    }
    let (builder, metrics) = with_metrics(app);
    let ferrule = builder.spawn();
    ferrule.wait_master_ready(3);
    let verify = format!(
        "{}            uwsgi_ssl_protocols {protocol};\n",
        verify_conf(&pki.ca, "localhost")
    );
    let nginx = Nginx::start_with_server_conf(
        &suwsgi(&ferrule),
        &format!("{verify}            uwsgi_ssl_session_reuse on;\n"),
        &metrics,
    );
    let stack = Stack { nginx, ferrule };
    let port = stack.port();

    // One request makes the session, then 12 at a time keep every worker's app threads busy in turn (an idle
    // worker takes the next connection), so the load spreads over the workers.
    let first = get_ok(&stack, "/pid");
    let (total, concurrency) = (60, 12);
    let next = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..concurrency)
        .map(|_| {
            let next = Arc::clone(&next);
            thread::spawn(move || {
                let mut answers = Vec::new();
                while next.fetch_add(1, Ordering::SeqCst) < total {
                    answers.push(http::get(port, "/sleep?s=0.05&tag=reuse"));
                }
                answers
            })
        })
        .collect();
    let mut pids = std::collections::BTreeSet::new();
    pids.insert(first.text());
    for answers in clients.into_iter().map(|c| c.join().expect("client thread")) {
        for r in answers {
            assert!(r.status == 200 && r.is_complete(), "{}\n{}", r.summary(), stack.logs());
            pids.insert(r.text());
        }
    }
    assert!(
        pids.len() >= 2,
        "the load should spread over the workers to test sharing the tickets; served by {pids:?}"
    );
    let handshakes_made = (total + 1) as f64;
    let s = wait_metrics(port, "61 handshakes", |s| {
        handshakes(s, "full") + handshakes(s, "resumed") >= handshakes_made
    });
    let (full, resumed) = (handshakes(&s, "full"), handshakes(&s, "resumed"));
    assert_eq!(full + resumed, handshakes_made, "one handshake per request:\n{s}");
    assert!(
        resumed > full && resumed >= 0.75 * handshakes_made,
        "{protocol}: with session reuse most handshakes after the first resume on any worker: {full} full, \
         {resumed} resumed (served by {pids:?})\n{s}"
    );

    let no_reuse = Nginx::start(
        &suwsgi(&stack.ferrule),
        &format!("{verify}            uwsgi_ssl_session_reuse off;\n"),
    );
    let n = 20;
    for _ in 0..n {
        let r = http::get(no_reuse.port(), "/pid");
        assert!(r.status == 200 && r.is_complete(), "{}\n{}", r.summary(), stack.logs());
    }
    let after = wait_metrics(port, "20 more handshakes", |s| {
        handshakes(s, "full") + handshakes(s, "resumed") >= handshakes_made + n as f64
    });
    assert_eq!(
        handshakes(&after, "resumed"),
        resumed,
        "with uwsgi_ssl_session_reuse off nothing resumes:\n{after}"
    );
    assert_eq!(handshakes(&after, "full"), full + n as f64, "{after}");
}

/// The master replaces the ticket keys every `--tls-ticket-rotation` seconds and sends them to the workers: two
/// periods after the workers started (by then they seal with a key they did not get at start), a new session
/// still resumes; a ticket from two periods back no longer opens.
#[test]
fn ticket_keys_rotate_and_reach_every_worker() {
    const PERIOD: u64 = 2;
    let pki = Pki::new();
    let builder = over_tls(lifecycle_app(2), &pki.server_cert, &pki.server_key)
        .arg("--tls-ticket-rotation")
        .arg(PERIOD.to_string());
    let ferrule = builder.spawn();
    ferrule.wait_master_ready(2);
    let addr = tls_addr(&ferrule);
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
    };
    // Start early in a period, so each step below stays inside the period it means.
    let wait_for_next_period = || {
        let into = now().as_millis() % u128::from(PERIOD * 1000);
        thread::sleep(Duration::from_millis((u128::from(PERIOD * 1000) - into + 100) as u64));
    };
    wait_for_next_period();
    let old_client = pki.client(false);
    let first = tls_request(addr, Arc::clone(&old_client), &uwsgi_get("/pid")).expect("TLS request");
    assert_eq!(first.handshake, Some(HandshakeKind::Full));
    wait_for_next_period();
    wait_for_next_period();

    // Two periods on: the workers seal with a key the master sent after they started.
    let client = pki.client(false);
    let fresh = tls_request(addr, Arc::clone(&client), &uwsgi_get("/pid")).expect("TLS request");
    assert_eq!(fresh.handshake, Some(HandshakeKind::Full));
    for i in 0..6 {
        let again = tls_request(addr, Arc::clone(&client), &uwsgi_get("/pid")).expect("TLS request");
        assert_eq!(
            again.handshake,
            Some(HandshakeKind::Resumed),
            "connection {i} after two rotations: a ticket sealed with the new key opens on every worker\n{}",
            ferrule.log()
        );
        assert_eq!(parse_response(&again.bytes).status, 200);
    }
    let stale = tls_request(addr, old_client, &uwsgi_get("/pid")).expect("TLS request");
    assert_eq!(
        stale.handshake,
        Some(HandshakeKind::Full),
        "a ticket two periods old does not open"
    );
    assert!(
        ferrule.log().contains("session-ticket keys rotated"),
        "the master says when it rotates\n{}",
        ferrule.log()
    );
}

// --- reload --------------------------------------------------------------------------------------------------

/// Requests sent one after another by `threads` threads through nginx until stopped, each answer checked.
struct Hammer {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<Vec<String>>>,
}

impl Hammer {
    fn start(port: u16, path: &'static str, threads: usize) -> Hammer {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let threads = (0..threads)
            .map(|_| {
                let (stop, ok) = (Arc::clone(&stop), Arc::clone(&ok));
                thread::spawn(move || {
                    let mut failed = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        // The client panics on a connection nginx drops; that is a failed request here.
                        match std::panic::catch_unwind(|| http::get(port, path)) {
                            Ok(r) if r.status == 200 && r.is_complete() && r.text().trim().parse::<u32>().is_ok() => {
                                ok.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok(r) => failed.push(r.summary()),
                            Err(_) => failed.push("the request failed (see the panic above)".to_owned()),
                        }
                    }
                    failed
                })
            })
            .collect();
        Hammer { stop, ok, threads }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until `n` more requests than now have succeeded.
    fn wait_more(&self, n: u64) {
        let target = self.ok() + n;
        assert!(
            poll_until(WORKER_WAIT, || self.ok() >= target),
            "the load stalled at {} answers",
            self.ok()
        );
    }

    /// Stops the load; returns the answers that were not a complete 200 with a pid.
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let failed = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().expect("load thread"))
            .collect();
        (self.ok.load(Ordering::SeqCst), failed)
    }
}

/// Writes `from`'s contents to `to` as a renewal tool would: a new file renamed over the old one, so a reader
/// never sees half of it.
fn replace_file(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), tmp.display()));
    std::fs::rename(&tmp, to).unwrap_or_else(|e| panic!("rename {} to {}: {e}", tmp.display(), to.display()));
}

/// ferrule's live certificate and key: copies of the PKI's server files that a test overwrites.
fn live_files(pki: &Pki) -> (PathBuf, PathBuf) {
    let cert = pki.dir().join("live.pem");
    let key = pki.dir().join("live-key.pem");
    replace_file(&pki.server_cert, &cert);
    replace_file(&pki.server_key, &key);
    (cert, key)
}

/// The leaf a fresh client (no session to resume, so the server sends its certificate) gets from `addr`.
fn served_leaf(pki: &Pki, addr: SocketAddr) -> Vec<u8> {
    let answer = tls_request(addr, pki.client(false), &uwsgi_get("/pid")).expect("a direct TLS request");
    assert_eq!(answer.end, TlsEnd::CloseNotify);
    assert_eq!(parse_response(&answer.bytes).status, 200);
    answer.peer_leaf
}

/// A renewed certificate and key written over the old files, then SIGHUP, while two threads keep requests going
/// through an nginx that verifies ferrule's certificate: not one request fails, and the new workers serve the
/// new certificate.
#[test]
fn sighup_serves_a_renewed_certificate_without_a_failed_request() {
    let pki = Pki::new();
    let (cert, key) = live_files(&pki);
    let stack = tls_stack(over_tls(lifecycle_app(2), &cert, &key), &pki, "", "");
    stack.ferrule.wait_master_ready(2);
    let addr = tls_addr(&stack.ferrule);
    assert!(
        served_leaf(&pki, addr) == pki.server_der,
        "the first certificate is served"
    );
    let old = stack.worker_pids();

    let load = Hammer::start(stack.port(), "/pid", 2);
    load.wait_more(20);
    replace_file(&pki.renewed_cert, &cert);
    replace_file(&pki.renewed_key, &key);
    let offset = stack.ferrule.log_offset();
    stack.signal(libc::SIGHUP);
    stack.expect_count_since(offset, "worker ready", 2, WORKER_WAIT);
    stack.expect_count_since(offset, "worker exited", 2, WORKER_WAIT);
    load.wait_more(20);
    let (ok, failed) = load.finish();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed across the reload: {failed:#?}\n{}",
        failed.len(),
        ok + failed.len() as u64,
        stack.logs()
    );

    let new = stack.wait_worker_count(2, WORKER_WAIT);
    assert!(old.is_disjoint(&new), "new workers: before {old:?}, after {new:?}");
    for _ in 0..4 {
        assert!(
            served_leaf(&pki, addr) == pki.renewed_der,
            "after the reload the renewed certificate is served\n{}",
            stack.ferrule.log()
        );
    }
    let r = get_ok(&stack, "/pid");
    assert!(new.iter().any(|p| p.to_string() == r.text().trim()), "{}", r.summary());
}

/// A renewal that cannot be loaded (a new certificate written without its new key) is refused on SIGHUP with
/// the file named, like a failed import: the old workers keep serving the old certificate, with no failed
/// request.
#[test]
fn sighup_with_a_broken_renewal_keeps_the_old_workers_serving() {
    let pki = Pki::new();
    let (cert, key) = live_files(&pki);
    let stack = tls_stack(over_tls(lifecycle_app(2), &cert, &key), &pki, "", "");
    stack.ferrule.wait_master_ready(2);
    let addr = tls_addr(&stack.ferrule);
    let old = stack.wait_worker_count(2, WORKER_WAIT);

    let load = Hammer::start(stack.port(), "/pid", 2);
    load.wait_more(10);
    replace_file(&pki.renewed_cert, &cert);
    let offset = stack.ferrule.log_offset();
    stack.signal(libc::SIGHUP);
    let named = format!("{}: this key does not belong to the certificate in", key.display());
    assert!(
        stack.ferrule.wait_for_log_since(offset, &named, WORKER_WAIT),
        "the reload's error names the key file ({named:?})\n{}",
        stack.ferrule.log_since(offset)
    );
    load.wait_more(20);
    let (ok, failed) = load.finish();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:#?}\n{}",
        failed.len(),
        ok + failed.len() as u64,
        stack.logs()
    );
    // Whatever the master tried, what serves now is the old generation.
    assert_eq!(
        stack.wait_worker_count(2, WORKER_WAIT),
        old,
        "the old workers keep serving"
    );
    for _ in 0..10 {
        let r = get_ok(&stack, "/pid");
        assert!(
            old.iter().any(|p| p.to_string() == r.text().trim()),
            "served by an old worker: {}",
            r.summary()
        );
    }
    assert!(
        served_leaf(&pki, addr) == pki.server_der,
        "the old certificate is still served"
    );
    assert!(!stack.ferrule.log().contains("panicked"), "{}", stack.ferrule.log());
}

/// A resumed session keeps the authentication of its first handshake (rustls restores the client's
/// certificates from the ticket), so tickets are bound to `--tls-client-ca`: after a reload that starts
/// requiring a client certificate, a session made without one does not resume, and the client is refused.
#[test]
fn a_reload_that_requires_client_certificates_does_not_honour_older_sessions() {
    let pki = Pki::new();
    let dir = temp_dir();
    let config = dir.path().join("ferrule.toml");
    std::fs::write(&config, "# no client CA yet\n").expect("write the config file");
    let builder = over_tls(lifecycle_app(1), &pki.server_cert, &pki.server_key)
        .arg("--config")
        .arg(&config);
    let stack = tls_stack(builder, &pki, "", "");
    stack.ferrule.wait_master_ready(1);
    let addr = tls_addr(&stack.ferrule);
    let old = stack.wait_worker_count(1, WORKER_WAIT);
    let client = pki.client(false);
    let first = tls_request(addr, Arc::clone(&client), &uwsgi_get("/pid")).expect("TLS request");
    assert_eq!(first.handshake, Some(HandshakeKind::Full));
    let again = tls_request(addr, Arc::clone(&client), &uwsgi_get("/pid")).expect("TLS request");
    assert_eq!(
        again.handshake,
        Some(HandshakeKind::Resumed),
        "sessions resume before the reload"
    );

    std::fs::write(&config, format!("tls_client_ca = {:?}\n", shown(&pki.ca))).expect("write the config file");
    let offset = stack.ferrule.log_offset();
    stack.signal(libc::SIGHUP);
    let replaced = poll_until(WORKER_WAIT, || {
        let now = stack.worker_pids();
        now.len() == 1 && now.is_disjoint(&old)
    });
    assert!(replaced, "the reload replaced the worker\n{}", stack.ferrule.log());

    match tls_request(addr, Arc::clone(&client), &uwsgi_get("/pid")) {
        Err(_) => {}
        Ok(after) => assert!(
            after.handshake != Some(HandshakeKind::Resumed)
                && after.bytes.is_empty()
                && after.end != TlsEnd::CloseNotify,
            "a session made without a client certificate must not get past --tls-client-ca: {:?}, {:?}, {:?}",
            after.handshake,
            after.end,
            String::from_utf8_lossy(&after.bytes)
        ),
    }
    expect_failure_line(&stack.ferrule, offset, "no-client-certificate", None);
    let with_cert = tls_request(addr, pki.client(true), &uwsgi_get("/pid")).expect("TLS request");
    assert_eq!(
        parse_response(&with_cert.bytes).status,
        200,
        "a client with a certificate is served"
    );
}

// --- start-up ------------------------------------------------------------------------------------------------

/// A path as ferrule's messages show it.
fn shown(path: &Path) -> String {
    path.display().to_string()
}

/// Every bad TLS setting stops start-up (and `--check-config`) with a non-zero exit and one line that names
/// the file and what is wrong with it.
#[test]
fn bad_tls_files_stop_start_up_with_one_line_naming_the_file() {
    let pki = Pki::new();
    let d = pki.dir();
    let missing = d.join("missing.pem");
    let s = shown;
    let cert_key = |cert: &Path, key: &Path| vec!["--tls-cert".to_owned(), s(cert), "--tls-key".to_owned(), s(key)];
    let cases: Vec<(&str, Vec<String>, Vec<String>)> = vec![
        (
            "expired",
            cert_key(&pki.expired_cert, &pki.expired_key),
            vec![format!("{}: the certificate expired on", s(&pki.expired_cert))],
        ),
        (
            "key of another certificate",
            cert_key(&pki.server_cert, &pki.client_key),
            vec![format!(
                "{}: this key does not belong to the certificate in {}",
                s(&pki.client_key),
                s(&pki.server_cert)
            )],
        ),
        (
            "missing certificate",
            cert_key(&missing, &pki.server_key),
            vec![format!("{}: cannot read it", s(&missing))],
        ),
        (
            "missing key",
            cert_key(&pki.server_cert, &missing),
            vec![format!("{}: cannot read it", s(&missing))],
        ),
        (
            "a directory as the certificate",
            cert_key(d, &pki.server_key),
            vec![format!("{}: cannot read it", s(d))],
        ),
        (
            "missing client CA",
            [
                cert_key(&pki.server_cert, &pki.server_key),
                vec!["--tls-client-ca".into(), s(&missing)],
            ]
            .concat(),
            vec![format!("{}: cannot read it", s(&missing))],
        ),
        (
            "no --tls-cert",
            vec!["--tls-key".into(), s(&pki.server_key)],
            vec!["tls://127.0.0.1:0".into(), "--tls-cert".into()],
        ),
    ];
    let mut problems = Vec::new();
    for (name, args, needles) in &cases {
        for check in [false, true] {
            let mut builder = wsgi_cases().socket("tls://127.0.0.1:0").args(args);
            if check {
                builder = builder.arg("--check-config");
            }
            let out = builder.run(EXIT_WAIT);
            let what = format!("{name} (--check-config: {check})");
            if out.status.success() {
                problems.push(format!("{what}: accepted\n{}", out.describe()));
                continue;
            }
            let lines: Vec<&str> = out
                .stderr
                .lines()
                .filter(|l| needles.iter().all(|n| l.contains(n.as_str())))
                .collect();
            if lines.len() != 1 {
                problems.push(format!(
                    "{what}: want one line with {needles:?}, got {lines:?}\n{}",
                    out.describe()
                ));
            }
            if check && !out.stdout.trim().is_empty() {
                problems.push(format!("{what}: no configuration is printed\n{}", out.describe()));
            }
            if out.stderr.contains("panicked") || out.stderr.contains("Traceback") {
                problems.push(format!("{what}: a crash, not a message\n{}", out.describe()));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

/// The TLS files can come from FERRULE_TLS_* and from the config file like any option, the command line
/// winning; they are checked the same way whatever their source, and a server started from the environment
/// serves TLS.
#[test]
fn tls_files_from_the_environment_and_the_config_file() {
    let pki = Pki::new();
    let dir = temp_dir();
    let s = shown;
    let refused = |out: &crate::harness::ferrule::Output, needle: &str, what: &str| {
        assert!(!out.status.success(), "{what}: accepted\n{}", out.describe());
        assert!(
            out.stderr.lines().any(|l| l.contains(needle)),
            "{what}: want a line with {needle:?}\n{}",
            out.describe()
        );
    };

    let out = wsgi_cases()
        .socket("tls://127.0.0.1:0")
        .env("FERRULE_TLS_CERT", &pki.expired_cert)
        .env("FERRULE_TLS_KEY", &pki.expired_key)
        .run(EXIT_WAIT);
    refused(
        &out,
        &format!("{}: the certificate expired on", s(&pki.expired_cert)),
        "FERRULE_TLS_CERT",
    );

    let missing = pki.dir().join("no-ca.pem");
    let out = over_tls(wsgi_cases(), &pki.server_cert, &pki.server_key)
        .env("FERRULE_TLS_CLIENT_CA", &missing)
        .arg("--check-config")
        .run(EXIT_WAIT);
    refused(
        &out,
        &format!("{}: cannot read it", s(&missing)),
        "FERRULE_TLS_CLIENT_CA",
    );

    let file = dir.path().join("ferrule.toml");
    std::fs::write(
        &file,
        format!(
            "tls-cert = {:?}\ntls_key = {:?}\n",
            s(&pki.server_cert),
            s(&pki.client_key)
        ),
    )
    .expect("write the config file");
    let out = wsgi_cases()
        .socket("tls://127.0.0.1:0")
        .arg("--config")
        .arg(&file)
        .run(EXIT_WAIT);
    refused(
        &out,
        &format!("{}: this key does not belong to the certificate in", s(&pki.client_key)),
        "the config file's tls-cert and tls_key",
    );

    // The command line beats the environment's expired certificate.
    let out = over_tls(wsgi_cases(), &pki.server_cert, &pki.server_key)
        .env("FERRULE_TLS_CERT", &pki.expired_cert)
        .arg("--check-config")
        .run(EXIT_WAIT);
    assert!(
        out.status.success(),
        "--tls-cert beats FERRULE_TLS_CERT\n{}",
        out.describe()
    );

    let ferrule = wsgi_cases()
        .socket("tls://127.0.0.1:0")
        .env("FERRULE_TLS_CERT", &pki.server_cert)
        .env("FERRULE_TLS_KEY", &pki.server_key)
        .spawn();
    let answer = tls_request(tls_addr(&ferrule), pki.client(false), &uwsgi_get("/hello"))
        .unwrap_or_else(|e| panic!("TLS request: {e}\n{}", ferrule.log()));
    assert_eq!(parse_response(&answer.bytes).text(), "hello world");
    assert_eq!(answer.peer_leaf, pki.server_der);
}

// --- hostile peers -------------------------------------------------------------------------------------------

/// Sends `bytes` on a fresh connection to `addr` (half-closing after them when `then_close`) and reads until the
/// server closes; panics if it does not within `CLOSE_WITHIN`. Returns what came back and our address.
fn send_and_wait_close(addr: SocketAddr, bytes: &[u8], then_close: bool) -> (crate::harness::uwsgi::Raw, SocketAddr) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(CLOSE_WITHIN)).expect("read timeout");
    s.set_write_timeout(Some(CLOSE_WITHIN)).expect("write timeout");
    let local = s.local_addr().expect("local addr");
    if let Err(e) = s.write_all(bytes) {
        assert!(is_reset_error(&e), "write failed: {e}");
    }
    if then_close {
        let _ = s.shutdown(Shutdown::Write);
    }
    (read_to_close(&mut s), local)
}

/// What is not TLS (random bytes, a plain uwsgi request, HTTP) and a ClientHello cut short are closed, each with
/// one warning that says what it was and names the peer, and counted by reason; the server goes on serving.
#[test]
fn what_is_not_tls_is_closed_named_and_counted() {
    let pki = Pki::new();
    let (builder, metrics) = with_metrics(over_tls(wsgi_cases(), &pki.server_cert, &pki.server_key));
    let stack = tls_stack(builder, &pki, "", &metrics);
    let addr = tls_addr(&stack.ferrule);

    let mut random = pseudo_random_bytes(300, 44);
    // Not a TLS record (0x16), not a uwsgi header (modifier1 0), not an HTTP method.
    random[0] = 0x9c;
    let hello = client_hello(pki.client(false));
    let cases: [(&str, Vec<u8>, bool, &str); 4] = [
        ("random bytes", random, false, "not-tls"),
        ("a plain uwsgi request", uwsgi_get("/hello"), false, "plain-uwsgi"),
        ("HTTP", b"GET / HTTP/1.1\r\n\r\n".to_vec(), false, "http"),
        (
            "half a ClientHello, then a close",
            hello[..hello.len() / 2].to_vec(),
            true,
            "closed",
        ),
    ];
    for (what, bytes, then_close, reason) in &cases {
        let offset = stack.ferrule.log_offset();
        let (raw, local) = send_and_wait_close(addr, bytes, *then_close);
        let text = raw.text();
        assert!(
            !text.contains("HTTP/1.1") && !text.contains("hello world"),
            "{what}: no answer but a close, got {text:?}"
        );
        let line = expect_failure_line(&stack.ferrule, offset, reason, Some(local));
        assert_eq!(
            stack.ferrule.log_since(offset).matches("TLS handshake failed").count(),
            1,
            "{what}: one line ({line})"
        );
    }
    assert_eq!(get_ok(&stack, "/hello").text(), "hello world", "served afterwards");

    let s = wait_metrics(stack.port(), "the four failures", |s| {
        cases.iter().all(|(_, _, _, reason)| failures(s, reason) >= 1.0)
    });
    for (what, _, _, reason) in &cases {
        assert_eq!(failures(&s, reason), 1.0, "{what} counted once as {reason}:\n{s}");
    }
    for reason in ["no-client-certificate", "unknown-ca", "bad-certificate", "timeout"] {
        assert_eq!(failures(&s, reason), 0.0, "reason {reason}:\n{s}");
    }
    let log = stack.ferrule.log();
    for bad in ["panicked", "worker died"] {
        assert!(!log.contains(bad), "{log}");
    }
}

/// 300 connections that never finish their handshake (half send nothing, half stop inside their ClientHello)
/// are held on the async side: requests through nginx are served at once meanwhile. With `--read-timeout 5`
/// each is closed after about 5 s and counted as a timeout (5 s leaves the requests room on a busy machine).
#[test]
fn stalled_handshakes_neither_starve_requests_nor_stay_open() {
    const STALLED: usize = 300;
    let pki = Pki::new();
    let builder = over_tls(wsgi_cases(), &pki.server_cert, &pki.server_key)
        .arg("--workers")
        .arg("1")
        .arg("--read-timeout")
        .arg("5");
    let (builder, metrics) = with_metrics(builder);
    let stack = tls_stack(builder, &pki, "", &metrics);
    let addr = tls_addr(&stack.ferrule);
    let hello = client_hello(pki.client(false));

    let opened = Instant::now();
    let mut stalled: Vec<TcpStream> = (0..STALLED)
        .map(|i| {
            let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connection {i}: {e}"));
            if i % 2 == 1 {
                s.write_all(&hello[..hello.len() / 2]).expect("half a ClientHello");
            }
            s
        })
        .collect();

    for i in 0..5 {
        let started = Instant::now();
        let r = stack.get(&format!("/hello?during={i}"));
        let took = started.elapsed();
        assert!(
            r.status == 200 && r.is_complete() && took < Duration::from_millis(1500),
            "request {i} while {STALLED} handshakes stall: {} after {took:?}\n{}",
            r.summary(),
            stack.logs()
        );
    }
    // The requests above ran while every stalled connection was still open.
    let during = opened.elapsed();
    let mut open = 0;
    for s in &stalled {
        s.set_nonblocking(true).expect("non-blocking");
        let mut b = [0u8; 1];
        if matches!(s.peek(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) {
            open += 1;
        }
        s.set_nonblocking(false).expect("blocking");
    }
    assert_eq!(
        open,
        STALLED,
        "{} stalled connections were closed within {during:?}, before --read-timeout 5",
        STALLED - open
    );

    let mut first_close = None;
    for (i, s) in stalled.iter_mut().enumerate() {
        s.set_read_timeout(Some(CLOSE_WITHIN)).expect("read timeout");
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                // A TLS alert before the close is allowed.
                Ok(_) => {}
                Err(e) if is_reset_error(&e) => break,
                Err(e) => panic!("stalled connection {i} was not closed: {e}\n{}", stack.ferrule.log()),
            }
        }
        first_close.get_or_insert_with(|| opened.elapsed());
    }
    let first_close = first_close.expect("300 connections");
    assert!(
        first_close >= Duration::from_millis(4500),
        "the first stalled handshake was closed after {first_close:?}, before --read-timeout 5"
    );

    let s = wait_metrics(stack.port(), "300 handshake timeouts", |s| {
        failures(s, "timeout") >= STALLED as f64
    });
    assert_eq!(failures(&s, "timeout"), STALLED as f64, "{s}");
    assert!(
        !failure_lines(&stack.ferrule.log(), "timeout").is_empty(),
        "no `reason=timeout` line\n{}",
        stack.ferrule.log()
    );
    assert_eq!(get_ok(&stack, "/hello").text(), "hello world");
}

// --- stop ----------------------------------------------------------------------------------------------------

/// A client that goes away in the middle of a TLS response is an ordinary event: a debug line, no warning or
/// error, and the worker serves on.
#[test]
fn a_client_abort_mid_response_is_not_a_warning() {
    let pki = Pki::new();
    let ferrule = over_tls(wsgi_cases(), &pki.server_cert, &pki.server_key).spawn();
    let addr = tls_addr(&ferrule);
    let offset = ferrule.log_offset();
    {
        let tcp = TcpStream::connect(addr).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
        let conn = rustls::ClientConnection::new(pki.client(false), name).expect("a client connection");
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.write_all(&uwsgi_get("/stream?n=200&delay=0.02"))
            .expect("send the request");
        let mut first = [0u8; 64];
        let n = tls.read(&mut first).expect("the start of the response");
        assert!(
            n > 0 && first.starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&first[..n])
        );
        // Gone without a word, while the app is still yielding.
        tls.sock.shutdown(Shutdown::Both).expect("shutdown");
    }
    thread::sleep(Duration::from_millis(800));
    let fine = tls_request(addr, pki.client(false), &uwsgi_get("/hello")).expect("TLS request");
    assert_eq!(parse_response(&fine.bytes).status, 200, "the worker serves on");
    let log = ferrule.log_since(offset);
    let loud: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(
        loud.is_empty(),
        "a client abort logged at warn or error:\n{}",
        loud.join("\n")
    );
}

/// SIGTERM while a 2 s request is in flight over TLS: it still gets its whole 200 through nginx, then ferrule
/// exits 0.
#[test]
fn sigterm_lets_an_in_flight_tls_request_finish() {
    let pki = Pki::new();
    let mut stack = tls_stack(over_tls(wsgi_cases(), &pki.server_cert, &pki.server_key), &pki, "", "");
    let touched = stack.ferrule.tempdir().join("reached-the-app");
    let port = stack.port();
    let path = format!("/sleep?s=2&touch={}", touched.display());
    let slow = thread::spawn(move || http::get(port, &path));
    assert!(
        poll_until(LOG_WAIT, || touched.exists()),
        "the slow request never reached the app\n{}",
        stack.logs()
    );
    let workers = live_children(stack.master_pid());
    stack.signal(libc::SIGTERM);
    let r = slow.join().expect("request thread");
    assert!(
        r.status == 200 && r.end == BodyEnd::Complete && r.text() == "slept",
        "the in-flight request was cut off: {}\n{}",
        r.summary(),
        stack.logs()
    );
    let status = stack.ferrule.wait_exit(Duration::from_secs(10));
    let status = status.unwrap_or_else(|| panic!("still running 10 s after SIGTERM\n{}", stack.ferrule.log()));
    assert_eq!(status.code(), Some(0), "{status:?}\n{}", stack.ferrule.log());
    for pid in workers {
        assert!(!alive(pid), "worker {pid} outlived the master");
    }
}
