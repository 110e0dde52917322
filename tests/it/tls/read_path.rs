//! The async read path is one path for plain and TLS connections: what a plain socket gets from it, a `tls://`
//! socket gets too. A uWSGI ping is answered, and a body that does not fit the spool directory is answered 503
//! with its log line inside the request's span (its `conn{..}:request{..}` prefix), as on a plain socket
//! (tests/server.rs and tests/first_contact.rs test those).
//!
//! Run with `cargo test --release --test it tls::read_path::` (the spool test mounts a tmpfs: as root).

use std::net::SocketAddr;

use crate::harness::LOG_WAIT;
use crate::harness::ferrule::{Addr, Ferrule, FerruleBuilder, apps_dir};
use crate::harness::http::{self, ReqBody, sha256_hex};
use crate::harness::nginx::Nginx;
use crate::harness::procs::poll_until;
use crate::harness::tls::{Pki, TlsEnd, tls_request};
use crate::harness::tmpfs::Tmpfs;
use crate::harness::uwsgi::{MODIFIER_PING, encode_header, encode_request, nginx_vars, parse_response};

const PONG: [u8; 4] = [100, 0, 0, 1];

/// tests/apps/wsgi_cases.py on `tls://127.0.0.1:0` with this PKI's server certificate.
fn over_tls(pki: &Pki) -> FerruleBuilder {
    FerruleBuilder::new(&format!("{}:application", apps_dir().join("wsgi_cases.py").display()))
        .socket("tls://127.0.0.1:0")
        .arg("--tls-cert")
        .arg(&pki.server_cert)
        .arg("--tls-key")
        .arg(&pki.server_key)
}

fn tls_addr(ferrule: &Ferrule) -> SocketAddr {
    match &ferrule.addr {
        Addr::Tcp(addr) => *addr,
        other => panic!("expected a TCP socket, got {other:?}"),
    }
}

/// An nginx that forwards to ferrule's `tls://` socket with `uwsgi_pass suwsgi://`, checking its certificate.
fn nginx_in_front(ferrule: &Ferrule, pki: &Pki) -> Nginx {
    let location = format!(
        "            uwsgi_ssl_trusted_certificate {};\n            uwsgi_ssl_verify on;\n            uwsgi_ssl_name localhost;\n",
        pki.ca.display()
    );
    Nginx::start(&format!("suwsgi://{}", tls_addr(ferrule)), &location)
}

#[test]
fn a_ping_over_tls_gets_a_pong() {
    let pki = Pki::new();
    let ferrule = over_tls(&pki).spawn();
    let addr = tls_addr(&ferrule);

    let answer = tls_request(addr, pki.client(false), &encode_header(MODIFIER_PING, 0, 0))
        .unwrap_or_else(|e| panic!("the handshake failed: {e}\n{}", ferrule.log()));
    assert_eq!(
        answer.bytes,
        PONG,
        "a ping over TLS is answered as on a plain socket\n{}",
        ferrule.log()
    );
    assert_eq!(answer.end, TlsEnd::CloseNotify, "the pong ends with close_notify");

    let get = encode_request(nginx_vars("GET", "/hello", b"").as_slice(), b"");
    let answer = tls_request(addr, pki.client(false), &get).expect("a request after the ping");
    let response = parse_response(&answer.bytes);
    assert_eq!(response.status, 200, "a request after the ping: {}", response.text());
}

/// A body that does not fit the spool directory is the server's problem, not a broken upstream, over TLS as
/// on a plain socket: 503, one log line naming the method, the path and the directory, written inside the
/// request's span (so within the connection's, which names the peer), no file left behind, and the next
/// spooled request that fits is served.
#[test]
fn a_full_spool_disk_over_tls_answers_503_inside_the_request_span() {
    let spool = Tmpfs::mount("1m");
    let pki = Pki::new();
    let ferrule = over_tls(&pki)
        .arg("--body-buffer-size")
        .arg("65536")
        .env("TMPDIR", spool.path())
        .spawn();
    let nginx = nginx_in_front(&ferrule, &pki);
    let offset = ferrule.log_offset();
    let big = vec![b'x'; 4 << 20];
    let r = http::request(
        nginx.port(),
        "POST",
        "/rp-spool-full",
        &[("Content-Type", "application/octet-stream")],
        ReqBody::Fixed(&big),
    );
    assert_eq!(
        r.status,
        503,
        "a 4 MiB body into a 1 MiB spool: {}\n{}\n--- ferrule log ---\n{}",
        r.summary(),
        nginx.error_log(),
        ferrule.log()
    );
    let dir = spool.path().display().to_string();
    assert!(
        ferrule.wait_for_log_since(offset, &dir, LOG_WAIT),
        "no log line names the spool directory {dir}\n{}",
        ferrule.log_since(offset)
    );
    let log = ferrule.log_since(offset);
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(&dir)).collect();
    assert_eq!(lines.len(), 1, "one line naming {dir}:\n{log}");
    let line = lines[0];
    assert!(line.contains("503"), "the line says the answer: {line}");
    assert!(
        line.contains("request{method=POST path=/rp-spool-full}"),
        "the body is read inside the request's span: {line}"
    );
    assert!(
        line.contains("conn{peer=127.0.0.1:"),
        "the request's span is inside the connection's: {line}"
    );
    let left: Vec<_> = std::fs::read_dir(spool.path())
        .expect("read spool dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    assert!(left.is_empty(), "files left in the spool dir: {left:?}");

    // The file's space is freed once the refused connection is done (after the drain that follows a refusal).
    assert!(
        poll_until(LOG_WAIT, || spool.used() < 64 * 1024),
        "the spool file's space was not freed: {} bytes in use",
        spool.used()
    );
    let fits = vec![b'y'; 512 * 1024];
    let want = format!("{} {}", fits.len(), sha256_hex(&fits));
    let r = http::request(nginx.port(), "POST", "/input/read", &[], ReqBody::Fixed(&fits));
    assert!(
        r.status == 200 && r.text() == want,
        "a spooled body that fits: {}\n{}",
        r.summary(),
        ferrule.log_since(offset)
    );
}
