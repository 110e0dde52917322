//! X.509 version 1 certificates on a `tls://` socket, through a real nginx (`uwsgi_pass suwsgi://`). A version 1
//! server certificate, made as nginx's own uwsgi_ssl tests make theirs (`openssl req -x509 -new` with a config
//! that has no extensions), is served with `uwsgi_ssl_verify` off (nginx's default) and on (nginx then checks
//! `uwsgi_ssl_name` against its common name), and the real `ferrule` command says so in one warning line, not
//! one per worker. A version 1 client certificate is still refused under `--tls-client-ca`, with a line that
//! says to issue a version 3 one.
//!
//! Run with `cargo test --release --test it tls::certificate_v1::`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::LOG_WAIT;
use crate::harness::ferrule::{Addr, Ferrule, FerruleBuilder, apps_dir, temp_dir};
use crate::harness::http;
use crate::harness::log::field;
use crate::harness::nginx::Nginx;
use crate::harness::procs::poll_until;
use crate::harness::tls::Pki;

/// The start of the warning about a version 1 server certificate.
const V1_WARNING: &str = "the certificate is X.509 version 1";

/// A version 1 certificate for the common name `x` and its key, made by `openssl req -x509 -new` with a
/// config holding only a `[req]` section without extensions, as nginx's uwsgi_ssl tests do.
struct V1Cert {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

impl V1Cert {
    fn new() -> V1Cert {
        let dir = temp_dir();
        let conf = dir.path().join("openssl.conf");
        std::fs::write(
            &conf,
            "[ req ]\ndefault_bits = 2048\nencrypt_key = no\ndistinguished_name = req_distinguished_name\n\
             [ req_distinguished_name ]\n",
        )
        .expect("write the openssl config");
        let cert = dir.path().join("c.pem");
        let key = dir.path().join("k.pem");
        let out = Command::new("openssl")
            .args(["req", "-x509", "-new", "-config"])
            .arg(&conf)
            .args(["-subj", "/CN=x/", "-out"])
            .arg(&cert)
            .arg("-keyout")
            .arg(&key)
            .output()
            .expect("run openssl req");
        assert!(out.status.success(), "openssl req: {out:?}");
        let text = Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(&cert)
            .output()
            .expect("run openssl x509");
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(
            text.contains("Version: 1 (0x0)"),
            "openssl made no version 1 certificate:\n{text}"
        );
        V1Cert { _dir: dir, cert, key }
    }
}

/// tests/apps/wsgi_cases.py with `--workers 2` on `tls://127.0.0.1:0` with this certificate and key, once both
/// workers are ready (each builds its TLS configuration from the files).
fn ferrule_with(cert: &Path, key: &Path, extra: &[&Path]) -> Ferrule {
    let ferrule = FerruleBuilder::new(&format!("{}:application", apps_dir().join("wsgi_cases.py").display()))
        .socket("tls://127.0.0.1:0")
        .arg("--workers")
        .arg("2")
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .args(extra)
        .spawn();
    ferrule.wait_master_ready(2);
    ferrule
}

fn suwsgi(ferrule: &Ferrule) -> String {
    match &ferrule.addr {
        Addr::Tcp(addr) => format!("suwsgi://{addr}"),
        other => panic!("expected a TCP socket, got {other:?}"),
    }
}

/// GET /hello through nginx answers 200 from the app.
fn expect_hello(nginx: &Nginx, ferrule: &Ferrule) {
    let r = http::get(nginx.port(), "/hello");
    assert!(
        r.status == 200 && r.text() == "hello world",
        "GET /hello through nginx: {}\n{}\n--- ferrule log ---\n{}",
        r.summary(),
        nginx.error_log(),
        ferrule.log()
    );
}

/// The log holds the version 1 warning exactly once, naming the file and the common name, and no line about
/// the certificate file speaks of a peer (rustls's words for a certificate a peer sent).
fn expect_one_warning(ferrule: &Ferrule, v1: &V1Cert) {
    let log = ferrule.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains(V1_WARNING)).collect();
    assert_eq!(warnings.len(), 1, "one warning line, not one per worker:\n{log}");
    let line = warnings[0];
    assert!(line.contains("WARN"), "a warning: {line}");
    assert!(
        field(line, "cert") == Some(&*v1.cert.display().to_string()) && field(line, "common_name") == Some("x"),
        "the line names the file and the common name: {line}"
    );
    let cert = v1.cert.display().to_string();
    let peer: Vec<&str> = log
        .lines()
        .filter(|l| (l.contains(&cert) && l.contains("peer")) || l.contains("peer certificate"))
        .collect();
    assert!(
        peer.is_empty(),
        "a line about ferrule's own certificate speaks of a peer: {peer:#?}"
    );
}

#[test]
fn a_version_1_server_certificate_is_served_to_nginx_without_verification() {
    let v1 = V1Cert::new();
    let ferrule = ferrule_with(&v1.cert, &v1.key, &[]);
    // uwsgi_ssl_verify is off unless set: nginx's default.
    let nginx = Nginx::start(&suwsgi(&ferrule), "");
    expect_hello(&nginx, &ferrule);
    expect_one_warning(&ferrule, &v1);
}

#[test]
fn a_version_1_server_certificate_is_verified_by_nginx_against_its_common_name() {
    let v1 = V1Cert::new();
    let ferrule = ferrule_with(&v1.cert, &v1.key, &[]);
    let location = format!(
        "            uwsgi_ssl_verify on;\n            uwsgi_ssl_trusted_certificate {};\n            uwsgi_ssl_name x;\n",
        v1.cert.display()
    );
    let nginx = Nginx::start(&suwsgi(&ferrule), &location);
    expect_hello(&nginx, &ferrule);
    expect_one_warning(&ferrule, &v1);
}

/// A client certificate keeps webpki's rules: a version 1 one is refused even from a trusted CA (here it is
/// its own CA), and the log line says to issue a version 3 certificate.
#[test]
fn a_version_1_client_certificate_is_refused_with_advice_to_reissue_it() {
    let v1 = V1Cert::new();
    let pki = Pki::new();
    let ferrule = ferrule_with(
        &pki.server_cert,
        &pki.server_key,
        &[Path::new("--tls-client-ca"), &v1.cert],
    );
    let location = format!(
        "            uwsgi_ssl_verify on;\n            uwsgi_ssl_trusted_certificate {};\n            uwsgi_ssl_name localhost;\n            uwsgi_ssl_certificate {};\n            uwsgi_ssl_certificate_key {};\n",
        pki.ca.display(),
        v1.cert.display(),
        v1.key.display()
    );
    let nginx = Nginx::start(&suwsgi(&ferrule), &location);
    let offset = ferrule.log_offset();
    let r = http::get(nginx.port(), "/hello");
    assert_eq!(
        r.status,
        502,
        "a version 1 client certificate: {}\n{}",
        r.summary(),
        ferrule.log()
    );
    let mut line = None;
    let seen = poll_until(LOG_WAIT, || {
        line = ferrule
            .log_since(offset)
            .lines()
            .find(|l| l.contains("TLS handshake failed"))
            .map(str::to_owned);
        line.is_some()
    });
    assert!(seen, "no `TLS handshake failed` line\n{}", ferrule.log_since(offset));
    let line = line.unwrap_or_default();
    assert!(
        line.contains("X.509 version 1") && line.contains("issue a version 3 certificate"),
        "the line says the client's certificate is version 1 and to reissue it: {line}"
    );
}
