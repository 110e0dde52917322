//! Tier-3 tests of what a first deployment runs into: the default socket, repeated timeouts, a Host header set
//! twice by Debian's uwsgi_params, packets without REQUEST_METHOD, an app returning bare bytes, deep recursion,
//! multi-line wsgi.errors writes, config reloads, a full spool disk, low descriptor limits, memory recycling,
//! the option spellings gunicorn and uWSGI users type, and the hints a misdirected peer gets.
//!
//! Each test runs the real `ferrule` binary on tests/apps/first_contact_app.py, behind a real nginx where nginx
//! matters. Some need root (tmpfs, --uid, descriptor limits): CI runs as root, and they fail, not skip, without it.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::ferrule::{Addr, Ferrule, FerruleBuilder, Output, apps_dir, temp_dir};
use common::http::{self, Client, ReqBody, form_encode};
use common::json::{Json, parse_json};
use common::log::{count, field, worker_lines};
use common::nginx::Nginx;
use common::procs::{alive, live_children, poll_until, rss_kib};
use common::uwsgi::{self, Raw, Response, Vars, encode_request, nginx_vars, parse_response, read_to_close};
use common::venv::{system_venv_ferrule, test_venv};

const APP: &str = "first_contact_app:application";
/// Bound for a log line the server writes in reaction to something the test just did.
const LOG_WAIT: Duration = Duration::from_secs(10);
/// Bound for a worker to start (import CPython and the app) on a loaded 2-core box.
const WORKER_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound for a run that should exit by itself (`--check-config`, a refused start).
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a graceful stop at the end of a test may take before the harness kills the master.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------

/// `first_contact_app:application` from tests/apps.
fn app() -> FerruleBuilder {
    FerruleBuilder::new(APP).arg("--pythonpath").arg(apps_dir())
}

/// A running ferrule that is stopped with SIGINT (master and workers together) when the test ends.
struct Server(Ferrule);

impl Server {
    fn spawn(builder: FerruleBuilder) -> Server {
        Server(builder.spawn())
    }

    /// Sends `vars` and `body` on a fresh connection and reads to the close (10 s read bound).
    fn send(&self, vars: &Vars, body: &[u8]) -> Raw {
        let mut s = self.connect();
        s.set_read_timeout(Some(LOG_WAIT));
        uwsgi::send_raw(&mut s, &encode_request(vars.as_slice(), body))
    }

    /// Sends a request and parses the answer; panics (with the log) on a close without an answer.
    fn request(&self, vars: &Vars, body: &[u8]) -> Response {
        let raw = self.send(vars, body);
        assert!(
            !raw.bytes.is_empty(),
            "no answer (reset: {}) to {:?}\n--- log ---\n{}",
            raw.reset,
            String::from_utf8_lossy(vars.get("REQUEST_URI").unwrap_or(b"?")),
            self.log()
        );
        parse_response(&raw.bytes)
    }

    fn get(&self, uri: &str) -> Response {
        self.request(&nginx_vars("GET", uri, b""), b"")
    }

    /// GET /env: the environ the app saw, as JSON.
    fn env(&self, vars: &Vars, body: &[u8]) -> Json {
        let r = self.request(vars, body);
        assert_eq!(r.status, 200, "{r:?}\n--- log ---\n{}", self.log());
        parse_json(&r.body_str()).unwrap_or_else(|e| panic!("/env did not answer JSON ({e}): {r:?}"))
    }

    /// The pid of the worker that answered GET /pid.
    fn served_pid(&self) -> u32 {
        let r = self.get("/pid");
        assert_eq!(r.status, 200, "GET /pid: {r:?}\n--- log ---\n{}", self.log());
        r.body_str()
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("GET /pid: {r:?}"))
    }

    fn workers(&self) -> BTreeSet<u32> {
        live_children(self.pid())
    }
}

impl Deref for Server {
    type Target = Ferrule;
    fn deref(&self) -> &Ferrule {
        &self.0
    }
}

impl DerefMut for Server {
    fn deref_mut(&mut self) -> &mut Ferrule {
        &mut self.0
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.0.stop_fast(STOP_TIMEOUT);
    }
}

/// Waits for the master's `ready workers=N` line.
fn wait_ready(server: &Server, workers: usize) {
    server.wait_master_ready(workers);
}

/// A string field of the app's /env JSON ("" when absent).
fn env_str(env: &Json, key: &str) -> String {
    env.get(key).and_then(Json::as_str).unwrap_or_default().to_owned()
}

fn env_bool(env: &Json, key: &str) -> Option<bool> {
    match env.get(key) {
        Some(Json::Bool(b)) => Some(*b),
        _ => None,
    }
}

/// Every string in a JSON value (keys and values, nested objects included), so a check does not depend on the
/// field a log record puts its text in.
fn json_strings(v: &Json, out: &mut String) {
    match v {
        Json::String(s) => {
            out.push_str(s);
            out.push('\u{0}');
        }
        Json::Array(items) => items.iter().for_each(|i| json_strings(i, out)),
        Json::Object(members) => {
            for (k, v) in members {
                out.push_str(k);
                out.push('\u{0}');
                json_strings(v, out);
            }
        }
        _ => {}
    }
}

/// The log records (JSON lines) whose text contains `needle`, each as the concatenation of its strings.
fn json_records_with(log: &str, needle: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| parse_json(l).ok())
        .map(|v| {
            let mut s = String::new();
            json_strings(&v, &mut s);
            s
        })
        .filter(|s| s.contains(needle))
        .collect()
}

fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "{what} needs root (CI runs the tests as root): run `cargo test` as root"
    );
}

/// uid of a user / gid of a group, from `id`.
fn id_of(args: &[&str]) -> u32 {
    let out = Command::new("id").args(args).output().expect("run id");
    assert!(out.status.success(), "id {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("id {args:?}: {out:?}"))
}

/// Runs `ferrule --check-config ARGS --pythonpath tests/apps first_contact_app:application` (with only `envs`
/// of the FERRULE_* family set) in a temp dir; the app is a real one, since the check imports it.
fn check_config(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let dir = temp_dir();
    FerruleBuilder::new(APP)
        .no_default_socket()
        .current_dir(dir.path())
        .arg("--check-config")
        .args(args)
        .arg("--pythonpath")
        .arg(apps_dir())
        .envs(envs)
        .run(EXIT_TIMEOUT)
}

/// The effective settings `check_config` prints, as TOML; panics unless it exits 0.
fn effective_config(args: &[&str], envs: &[(&str, &str)]) -> toml::Table {
    let out = check_config(args, envs);
    assert!(
        out.status.success(),
        "--check-config {args:?} with {envs:?} failed\n{}",
        out.describe()
    );
    out.stdout
        .parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("--check-config did not print TOML: {e}\n{}", out.describe()))
}

/// `socket_mode` as --check-config shows it: an octal string ("660", "0o660") or the mode as a number.
fn socket_mode(table: &toml::Table) -> Option<u32> {
    match table.get("socket_mode")? {
        toml::Value::String(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8).ok(),
        toml::Value::Integer(i) => u32::try_from(*i).ok(),
        _ => None,
    }
}

/// The (soft, hard) "Max open files" of a process, from /proc/PID/limits.
fn nofile_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read /proc/PID/limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("no `Max open files` in\n{limits}"));
    let mut fields = line["Max open files".len()..].split_whitespace();
    (
        fields.next().unwrap_or_default().to_owned(),
        fields.next().unwrap_or_default().to_owned(),
    )
}

/// A TLS 1.2 ClientHello as a browser or `grpc_pass`/https upstream sends it: record type 0x16, version 3.1.
#[rustfmt::skip]
const CLIENT_HELLO: &[u8] = &[
    0x16, 0x03, 0x01, 0x00, 0x2f, 0x01, 0x00, 0x00, 0x2b, 0x03, 0x03,
    // 32 bytes of client random.
    0x5a, 0x17, 0x44, 0x02, 0x9b, 0xe3, 0x6c, 0x10, 0x7f, 0x33, 0x81, 0x0d, 0xaa, 0x52, 0x19, 0x64,
    0x2e, 0xd0, 0x4b, 0x90, 0x37, 0xc1, 0x08, 0xfe, 0x66, 0x21, 0x7b, 0x93, 0x4c, 0x05, 0xb8, 0xe2,
    // Empty session id, two cipher suites, null compression.
    0x00, 0x00, 0x04, 0x13, 0x01, 0x13, 0x02, 0x01, 0x00,
];

// ---------------------------------------------------------------------------------------------------------
// 1. The default socket
// ---------------------------------------------------------------------------------------------------------

/// `ferrule APP` with no socket anywhere listens on 127.0.0.1:3031, uWSGI's customary port, as the help text
/// promises (today it starts with no listener at all).
#[test]
fn without_a_socket_ferrule_listens_on_127_0_0_1_port_3031() {
    for var in ["FERRULE_SOCKET", "FERRULE_CONFIG", "LISTEN_FDS"] {
        assert!(
            std::env::var_os(var).is_none(),
            "{var} is set in the test environment; unset it to run this test"
        );
    }
    match TcpListener::bind(("127.0.0.1", 3031)) {
        Ok(probe) => drop(probe),
        Err(e) => panic!(
            "127.0.0.1:3031 is taken ({e}); this test needs ferrule's default port free: find the owner with \
             `ss -ltnp 'sport = 3031'`"
        ),
    }
    let server = Server::spawn(app().no_default_socket());
    assert_eq!(
        server.addr,
        Addr::Tcp(SocketAddr::from(([127, 0, 0, 1], 3031))),
        "the first listening address\n--- log ---\n{}",
        server.log()
    );
    let r = server.get("/pid");
    assert_eq!(r.status, 200, "{r:?}");
}

/// `--check-config` without a socket shows the default it will use: `socket = ["127.0.0.1:3031"]`.
#[test]
fn check_config_shows_the_default_socket() {
    let table = effective_config(&[], &[]);
    assert_eq!(
        table.get("socket"),
        Some(&toml::Value::Array(vec![toml::Value::String("127.0.0.1:3031".into())])),
        "{table:#?}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// 2. Request timeouts, again and again
// ---------------------------------------------------------------------------------------------------------

/// `--timeout 1` five times in a row on one worker: every stuck request gets its 504 within the limit plus 1 s
/// and every one has its Python stack logged (gunicorn logs the stuck worker's traceback on each timeout); each
/// timeout retires the worker, and the master's replacement must behave as well as the first.
#[test]
fn every_timeout_answers_504_in_time_and_logs_the_stuck_stack() {
    const ROUNDS: usize = 5;
    let server = Server::spawn(app().arg("--timeout").arg("1"));
    wait_ready(&server, 1);
    for round in 1..=ROUNDS {
        let offset = server.log_offset();
        let started = Instant::now();
        let raw = server.send(&nginx_vars("GET", "/stuck", b""), b"");
        let took = started.elapsed();
        assert!(
            !raw.bytes.is_empty(),
            "round {round}: no answer after {took:?} (reset: {})\n--- log ---\n{}",
            raw.reset,
            server.log_since(offset)
        );
        let r = parse_response(&raw.bytes);
        assert_eq!(r.status, 504, "round {round}: {r:?}");
        assert!(
            took < Duration::from_secs(2),
            "round {round}: the 504 came after {took:?}, want within --timeout 1 s + 1 s"
        );
        assert!(
            server.wait_for_log_since(offset, "in stuck_view_marker", LOG_WAIT),
            "round {round}: no logged stack with stuck_view_marker\n--- log since the request ---\n{}",
            server.log_since(offset)
        );
        let log = server.log_since(offset);
        let dump = log
            .find("Python stack")
            .unwrap_or_else(|| panic!("round {round}: no `Python stack` line\n--- log since the request ---\n{log}"));
        assert!(
            log[dump..].contains("in stuck_view_marker"),
            "round {round}: the stack does not follow the `Python stack` line\n{log}"
        );
        // The replacement must be up before the next round, or the next request waits for it.
        let ready = server.wait_for_count_since(offset, "worker ready", 1, WORKER_TIMEOUT);
        assert_eq!(
            ready,
            1,
            "round {round}: no replacement worker became ready\n{}",
            server.log_since(offset)
        );
    }
    let log = server.log();
    assert_eq!(count(&log, "Python stack"), ROUNDS, "one stack dump per timeout\n{log}");
    assert_eq!(
        count(&log, "in stuck_view_marker"),
        ROUNDS,
        "one stuck frame per timeout\n{log}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// 3. A Host header set twice
// ---------------------------------------------------------------------------------------------------------

/// Debian's uwsgi_params sets `HTTP_HOST $host`; a site that adds `uwsgi_param HTTP_HOST $host:$server_port`
/// sends it twice. The later value wins (as for any param set twice, and as uWSGI keeps one), and SERVER_NAME/
/// SERVER_PORT derived from it agree; other repeated headers are still joined (RFC 9110 5.3, cookies with "; ").
#[test]
fn a_repeated_http_host_keeps_the_last_value_and_other_headers_join() {
    let server = Server::spawn(app());
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
    let server = Server::spawn(app());
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
    let server = Server::spawn(app());
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

/// Django's CSRF check compares Origin with `request.get_host()`, which must carry the port on a non-default
/// port: with the host:port param, a POST with its token succeeds (today Django gets "localhost,
/// localhost:PORT", refuses it as an invalid host and answers 400).
#[test]
fn django_csrf_post_succeeds_on_a_non_default_port() {
    let venv = test_venv();
    let site = apps_dir().join("django_site");
    let server = Server::spawn(
        FerruleBuilder::new("mysite.wsgi:application")
            .arg("--virtualenv")
            .arg(venv.to_str().expect("utf-8 venv path"))
            .arg("--chdir")
            .arg(site.to_str().expect("utf-8 site path"))
            .env("DJANGO_SETTINGS_MODULE", "mysite.settings"),
    );
    let nginx = Nginx::start(
        &server.addr.nginx_upstream(),
        "uwsgi_param HTTP_HOST $host:$server_port;",
    );
    let mut client = Client::new(nginx.port());
    let page = client.get("/form/");
    assert_eq!(
        page.status,
        200,
        "GET /form/: {}\n--- log ---\n{}",
        page.summary(),
        server.log()
    );
    let marker = r#"name="csrfmiddlewaretoken" value=""#;
    let text = page.text();
    let start = text.find(marker).unwrap_or_else(|| panic!("no token in {text}")) + marker.len();
    let token = &text[start..start + text[start..].find('"').expect("closing quote")];
    let origin = format!("http://localhost:{}", nginx.port());
    let form = form_encode(&[("csrfmiddlewaretoken", token), ("name", "ferrule")]);
    let r = client.request(
        "POST",
        "/form/",
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Origin", &origin),
        ],
        ReqBody::Fixed(form.as_bytes()),
    );
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "thanks ferrule"),
        "POST /form/ with token and Origin {origin}: {}\n--- log ---\n{}",
        r.summary(),
        server.log()
    );
}

// ---------------------------------------------------------------------------------------------------------
// 4. No REQUEST_METHOD
// ---------------------------------------------------------------------------------------------------------

/// A location that forgot `include uwsgi_params` sends no REQUEST_METHOD: like uWSGI, the request is served as
/// a GET (its body still readable), with one warning per worker naming the missing include. An empty method or
/// a packet with no vars at all is still refused.
#[test]
fn a_packet_without_request_method_is_served_as_get_with_one_warning() {
    let server = Server::spawn(app());
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
// 5. Bare bytes instead of an iterable
// ---------------------------------------------------------------------------------------------------------

/// An app returning `b"hello"` (or a bytearray) instead of `[b"hello"]` breaks PEP 3333 ("the application
/// object must return an iterable yielding zero or more bytestrings"); iterating it would send 104, 101, ...
/// ferrule sends it as the whole body, honouring HEAD, 204/304 and the app's Content-Length, and warns once
/// per worker citing PEP 3333. A bare str is still a 500.
#[test]
fn bare_bytes_returned_by_the_app_are_sent_as_the_body() {
    let server = Server::spawn(app());
    for kind in ["bytes", "bytearray"] {
        let r = server.get(&format!("/bare?kind={kind}"));
        assert_eq!((r.status, r.body_str().as_str()), (200, "hello"), "{kind}: {r:?}");
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
    assert_eq!(
        with_length.headers_named("content-length"),
        vec!["5"],
        "{with_length:?}"
    );
    assert_eq!(with_length.body_str(), "hello");

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

// ---------------------------------------------------------------------------------------------------------
// 7. Deep recursion
// ---------------------------------------------------------------------------------------------------------

/// With `sys.setrecursionlimit(100000)` an app may recurse 10000 levels through C calls (`map`), each using C
/// stack; that fits in the 8 MiB a main thread (gunicorn sync) or a default pthread (gthread, uWSGI) has, so an
/// app thread must have as much (Rust's 2 MiB default overflows and the worker dies with SIGSEGV).
#[test]
fn deep_recursion_through_c_calls_fits_an_app_threads_stack() {
    let server = Server::spawn(app());
    let raw = server.send(&nginx_vars("GET", "/recurse?n=10000&limit=100000", b""), b"");
    assert!(
        !raw.bytes.is_empty(),
        "no answer to 10000 levels of recursion (reset: {}): did the worker crash?\n--- log ---\n{}",
        raw.reset,
        server.log()
    );
    let r = parse_response(&raw.bytes);
    assert_eq!((r.status, r.body_str().as_str()), (200, "10000"), "{r:?}");
    assert!(!server.log().contains("worker died"), "{}", server.log());
}

/// Unbounded recursion under the default limit ends as RecursionError: a 500 with the traceback logged, and
/// the same worker process serves the next request.
#[test]
fn runaway_recursion_is_a_500_and_the_worker_serves_on() {
    let server = Server::spawn(app());
    let before = server.served_pid();
    let r = server.get("/recurse?n=100000");
    assert_eq!(r.status, 500, "{r:?}");
    assert!(
        server.wait_for_log("RecursionError", LOG_WAIT),
        "no RecursionError traceback\n{}",
        server.log()
    );
    assert_eq!(server.served_pid(), before, "the worker was replaced");
}

// ---------------------------------------------------------------------------------------------------------
// 8. wsgi.errors
// ---------------------------------------------------------------------------------------------------------

/// One `wsgi.errors.write()` of three lines is one message (a traceback an app writes itself stays one log
/// record, as with `logging`), so with `--log-format json` it is one JSON object holding all three lines.
#[test]
fn one_multi_line_wsgi_errors_write_is_one_log_record() {
    let server = Server::spawn(app().arg("--log-format").arg("json"));
    assert_eq!(server.get("/errors?case=multi&tag=fcmulti").status, 200);
    assert!(
        server.wait_for_log("fcmulti-line3", LOG_WAIT),
        "the lines never reached the log\n{}",
        server.log()
    );
    let records = json_records_with(&server.log(), "fcmulti-line1");
    assert_eq!(records.len(), 1, "one record for one write: {records:#?}");
    for line in ["fcmulti-line2", "fcmulti-line3"] {
        assert!(records[0].contains(line), "{line} missing from {:?}", records[0]);
    }
}

/// A line written in two pieces is one record, with the pieces in order.
#[test]
fn a_line_written_in_pieces_is_one_log_record() {
    let server = Server::spawn(app().arg("--log-format").arg("json"));
    assert_eq!(server.get("/errors?case=partial&tag=fcpart").status, 200);
    assert!(
        server.wait_for_log("fcpart-part2", LOG_WAIT),
        "the line never reached the log\n{}",
        server.log()
    );
    let records = json_records_with(&server.log(), "fcpart-part1");
    assert_eq!(records.len(), 1, "{records:#?}");
    assert!(records[0].contains("fcpart-part1 fcpart-part2"), "{:?}", records[0]);
}

/// Text written without a final newline is logged when the request ends, not held until some later request
/// on the same thread happens to end the line (or lost when the worker exits).
#[test]
fn a_trailing_partial_line_is_logged_at_the_end_of_the_request() {
    let server = Server::spawn(app().arg("--log-format").arg("json"));
    assert_eq!(server.get("/errors?case=tail&tag=fctail").status, 200);
    assert!(
        server.wait_for_log("fctail-tail-without-newline", LOG_WAIT),
        "the unterminated line was not logged at the end of its request\n{}",
        server.log()
    );
    assert_eq!(json_records_with(&server.log(), "fctail-tail-without-newline").len(), 1);
}

// ---------------------------------------------------------------------------------------------------------
// 9. Reloading a config file
// ---------------------------------------------------------------------------------------------------------

/// A config file with a socket in a temp dir, and the server started from it.
struct FromFile {
    server: Server,
    file: PathBuf,
    socket: PathBuf,
}

impl FromFile {
    fn start(workers: usize) -> FromFile {
        let builder = app().no_default_socket();
        let file = builder.tempdir().join("ferrule.toml");
        let socket = builder.tempdir().join("app.sock");
        std::fs::write(&file, Self::text(&socket, workers, "")).expect("write config");
        let server = Server::spawn(builder.arg("--config").arg(&file));
        wait_ready(&server, workers);
        FromFile { server, file, socket }
    }

    fn text(socket: &Path, workers: usize, extra: &str) -> String {
        format!(
            "workers = {workers}\nsocket = [\"unix:{}\"]\n{extra}\n",
            socket.display()
        )
    }

    fn rewrite(&self, text: &str) {
        std::fs::write(&self.file, text).expect("rewrite config");
    }
}

/// SIGHUP re-reads the config file before touching a worker: an invalid value is refused with an error naming
/// the file and key, and the running workers (same pids) keep serving, instead of new workers failing to start
/// in a loop. A valid change is then applied with fresh workers (uWSGI and gunicorn re-read theirs on HUP).
#[test]
fn sighup_with_an_invalid_config_file_keeps_the_old_workers() {
    let ff = FromFile::start(2);
    let server = &ff.server;
    let old = server.workers();
    assert_eq!(old.len(), 2, "{old:?}");

    ff.rewrite(&FromFile::text(&ff.socket, 2, "threads = \"lots\""));
    let offset = server.log_offset();
    server.signal(libc::SIGHUP);
    assert!(
        server.wait_for_log_since(offset, "reload refused", LOG_WAIT),
        "no `reload refused` after SIGHUP with an invalid file\n--- log since SIGHUP ---\n{}",
        server.log_since(offset)
    );
    let log = server.log_since(offset);
    let refused = log.lines().find(|l| l.contains("reload refused")).expect("waited for");
    assert!(
        refused.contains("threads") || log.contains("`threads`"),
        "the error does not name the key\n{log}"
    );
    assert!(
        log.contains(&ff.file.display().to_string()),
        "the error does not name the file\n{log}"
    );
    for _ in 0..20 {
        let pid = server.served_pid();
        assert!(
            old.contains(&pid),
            "served by {pid}, not one of the old workers {old:?}"
        );
    }
    let log = server.log_since(offset);
    for bad in ["worker died", "worker started"] {
        assert!(!log.contains(bad), "{bad:?} after a refused reload\n{log}");
    }
    assert_eq!(server.workers(), old, "the old workers are still the workers");

    // A valid change reloads.
    ff.rewrite(&FromFile::text(&ff.socket, 2, "max_requests = 1000"));
    let offset = server.log_offset();
    server.signal(libc::SIGHUP);
    let ready = server.wait_for_count_since(offset, "worker ready", 2, WORKER_TIMEOUT);
    assert_eq!(
        ready,
        2,
        "two new workers after a valid reload\n{}",
        server.log_since(offset)
    );
    let new: BTreeSet<u32> = worker_lines(&server.log_since(offset), "worker ready")
        .iter()
        .map(|w| w.pid)
        .collect();
    assert!(new.is_disjoint(&old), "new {new:?} old {old:?}");
    assert!(
        poll_until(WORKER_TIMEOUT, || server.workers() == new),
        "the old workers did not leave: /proc shows {:?}, new {new:?}\n{}",
        server.workers(),
        server.log_since(offset)
    );
    for _ in 0..10 {
        let pid = server.served_pid();
        assert!(new.contains(&pid), "served by {pid}, not a new worker {new:?}");
    }
    assert!(!server.log().contains("worker died"), "{}", server.log());
}

/// A `socket` changed in the file cannot be applied by a reload (the master holds the bound sockets): SIGHUP
/// says a restart is needed, and the old socket keeps serving.
#[test]
fn sighup_with_a_changed_socket_says_a_restart_is_needed() {
    let ff = FromFile::start(1);
    let server = &ff.server;
    let moved = ff.socket.with_file_name("moved.sock");
    ff.rewrite(&FromFile::text(&moved, 1, ""));
    let offset = server.log_offset();
    server.signal(libc::SIGHUP);
    assert!(
        server.wait_for_log_since(offset, "restart", LOG_WAIT),
        "no line saying the socket change needs a restart\n--- log since SIGHUP ---\n{}",
        server.log_since(offset)
    );
    assert_eq!(server.get("/pid").status, 200, "the old socket still serves");
    assert!(!server.log().contains("worker died"), "{}", server.log());
}

/// SIGTTIN takes one worker to two: the new worker is one of several processes, so its environ says
/// `wsgi.multiprocess` True (PEP 3333: true if an equivalent app object may be invoked by another process).
#[test]
fn a_worker_added_by_sigttin_sees_wsgi_multiprocess() {
    let server = Server::spawn(app().arg("--workers").arg("1"));
    wait_ready(&server, 1);
    let offset = server.log_offset();
    server.signal(libc::SIGTTIN);
    assert_eq!(
        server.wait_for_count_since(offset, "worker ready", 1, WORKER_TIMEOUT),
        1,
        "no new worker after SIGTTIN\n{}",
        server.log_since(offset)
    );
    let new = worker_lines(&server.log_since(offset), "worker ready")[0].pid;
    let deadline = Instant::now() + WORKER_TIMEOUT;
    let env = loop {
        let env = server.env(&nginx_vars("GET", "/env", b""), b"");
        if env.get("pid").and_then(Json::as_u64) == Some(u64::from(new)) {
            break env;
        }
        assert!(
            Instant::now() < deadline,
            "the new worker {new} never answered\n{}",
            server.log()
        );
    };
    assert_eq!(env_bool(&env, "wsgi.multiprocess"), Some(true), "{env:?}");
}

// ---------------------------------------------------------------------------------------------------------
// 6. Dropping privileges
// ---------------------------------------------------------------------------------------------------------

/// `--uid nobody --gid nogroup --socket-mode 660`: the Unix socket belongs to the user and group ferrule runs as
/// (uWSGI's chown-socket done for you), so an nginx whose workers are in that group can connect; today it stays
/// root's and nginx answers 502 (Permission denied). On SIGTERM the socket file is removed, or a warning names
/// the directory that keeps the unprivileged process from removing it.
#[test]
fn uid_and_gid_own_the_socket_so_nginx_can_connect() {
    require_root("--uid/--gid");
    // A venv `nobody` can run: the system's Python, not pyenv's under root's home.
    let venv_ferrule = system_venv_ferrule();
    let builder = app().program(&venv_ferrule);
    let dir = builder.tempdir().to_path_buf();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod the socket dir");
    let socket = dir.join("app.sock");
    let mut server = Server::spawn(
        builder
            .unix_at(&socket)
            .arg("--uid")
            .arg("nobody")
            .arg("--gid")
            .arg("nogroup")
            .arg("--socket-mode")
            .arg("660"),
    );
    let meta = std::fs::metadata(&socket).expect("socket file");
    assert_eq!(
        (meta.uid(), meta.gid()),
        (id_of(&["-u", "nobody"]), id_of(&["-g", "nobody"])),
        "owner and group of {}",
        socket.display()
    );
    assert_eq!(meta.mode() & 0o777, 0o660, "mode of {}", socket.display());

    let nginx = Nginx::start_as(&server.addr.nginx_upstream(), "", "nobody nogroup");
    let r = http::get(nginx.port(), "/pid");
    assert_eq!(
        r.status,
        200,
        "nginx as nobody:nogroup: {}\n{}\n--- ferrule log ---\n{}",
        r.summary(),
        nginx.error_log(),
        server.log()
    );
    // The app runs in the venv ferrule was started from, whoever it runs as (issue: --uid once made workers
    // load another libpython).
    let r = http::get(nginx.port(), "/python");
    assert_eq!(r.status, 200, "{}", r.summary());
    let venv = venv_ferrule
        .parent()
        .and_then(Path::parent)
        .expect("the venv of bin/ferrule");
    let python = r.text();
    assert!(
        python.contains(&format!("\"prefix\": \"{}\"", venv.display())),
        "the app's sys.prefix is not {}: {python}",
        venv.display()
    );
    let system_version = Command::new("/usr/bin/python3")
        .args(["-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"])
        .output()
        .expect("run /usr/bin/python3");
    let system_version = String::from_utf8_lossy(&system_version.stdout).trim().to_owned();
    assert!(
        python.contains(&format!("\"version\": \"{system_version}\"")),
        "the app does not run on the venv's Python {system_version}: {python}"
    );
    drop(nginx);

    server.signal(libc::SIGTERM);
    assert!(
        server.wait_exit(Duration::from_secs(40)).is_some(),
        "no exit after SIGTERM\n{}",
        server.log()
    );
    if socket.exists() {
        let dir = dir.display().to_string();
        let log = server.log();
        let names_dir = log
            .lines()
            .any(|l| l.replace(&socket.display().to_string(), "").contains(&dir));
        assert!(
            names_dir,
            "the socket file stayed and no warning names its directory {dir}\n{log}"
        );
    }
}

// ---------------------------------------------------------------------------------------------------------
// 10. A full spool disk
// ---------------------------------------------------------------------------------------------------------

/// A small tmpfs mounted on a temp dir, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = temp_dir();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=1777"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(out.status.success(), "mount tmpfs on {}: {out:?}", dir.path().display());
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes in use on the file system.
    fn used(&self) -> u64 {
        let path = std::ffi::CString::new(self.path().to_str().expect("utf-8 path")).expect("no NUL");
        let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
        // SAFETY: statvfs writes one struct into the zeroed storage it is given; the path is NUL-terminated.
        let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
        assert_eq!(rc, 0, "statvfs: {}", std::io::Error::last_os_error());
        // SAFETY: statvfs succeeded, so it filled the struct.
        let st = unsafe { st.assume_init() };
        (st.f_blocks - st.f_bfree) * st.f_frsize
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a process that still holds a file there cannot keep the temp dir from being removed.
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// A body that does not fit the spool directory (ENOSPC) is the server's problem, not a broken upstream: 503,
/// one log line naming the method, the path and the directory, no file left behind, and the next request
/// (even a spooled one that fits) is served.
#[test]
fn a_full_spool_disk_answers_503_and_names_the_directory() {
    require_root("mounting a tmpfs");
    let spool = Tmpfs::mount("1m");
    let server = Server::spawn(app().arg("--body-buffer-size").arg("65536").env("TMPDIR", spool.path()));
    let nginx = Nginx::start(&server.addr.nginx_upstream(), "");
    let offset = server.log_offset();
    let big = vec![b'x'; 4 << 20];
    let r = http::request(
        nginx.port(),
        "POST",
        "/fc-spool-full",
        &[("Content-Type", "application/octet-stream")],
        ReqBody::Fixed(&big),
    );
    assert_eq!(
        r.status,
        503,
        "a 4 MiB body into a 1 MiB spool: {}\n{}\n--- ferrule log ---\n{}",
        r.summary(),
        nginx.error_log(),
        server.log()
    );
    let dir = spool.path().display().to_string();
    assert!(
        server.wait_for_log_since(offset, &dir, LOG_WAIT),
        "no log line names the spool directory {dir}\n{}",
        server.log_since(offset)
    );
    let log = server.log_since(offset);
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(&dir)).collect();
    assert_eq!(lines.len(), 1, "one line naming {dir}:\n{log}");
    assert!(
        lines[0].contains("POST") && lines[0].contains("/fc-spool-full"),
        "the line names neither method nor path: {}",
        lines[0]
    );
    let left: Vec<_> = std::fs::read_dir(spool.path())
        .expect("read spool dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    assert!(left.is_empty(), "files left in the spool dir: {left:?}");
    assert!(
        poll_until(LOG_WAIT, || spool.used() < 64 * 1024),
        "the spool file's space was not freed: {} bytes in use",
        spool.used()
    );

    assert_eq!(http::get(nginx.port(), "/pid").status, 200, "a small request after");
    let fits = vec![b'y'; 512 * 1024];
    let r = http::request(nginx.port(), "POST", "/env", &[], ReqBody::Fixed(&fits));
    assert_eq!(r.status, 200, "a spooled body that fits: {}", r.summary());
    let env = parse_json(&r.text()).expect("JSON");
    assert_eq!(env_str(&env, "body").len(), fits.len());
}

// ---------------------------------------------------------------------------------------------------------
// 11. Descriptor limits
// ---------------------------------------------------------------------------------------------------------

/// With only 64 descriptors (`prlimit --nofile=64:64`, a tight container) ferrule still starts two workers and
/// serves, and warns at start that --max-connections cannot fit in that limit.
#[test]
fn a_low_descriptor_limit_still_serves_and_warns_about_max_connections() {
    require_root("setting RLIMIT_NOFILE");
    let server = Server::spawn(app().nofile_limit(64, 64).arg("--workers").arg("2"));
    wait_ready(&server, 2);
    for _ in 0..10 {
        assert_eq!(server.get("/pid").status, 200);
    }
    let log = server.log();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && (l.contains("max-connections") || l.contains("max_connections"))),
        "no warning that --max-connections 1024 does not fit in 64 descriptors\n{log}"
    );
}

/// A soft descriptor limit below the hard one is raised to the hard one in each worker, as nginx's
/// `worker_rlimit_nofile` and most servers do, so connections are bounded by --max-connections, not by a
/// distribution's default of 1024 (here 64).
#[test]
fn workers_raise_the_soft_descriptor_limit_to_the_hard_one() {
    require_root("setting RLIMIT_NOFILE");
    let server = Server::spawn(app().nofile_limit(64, 4096));
    wait_ready(&server, 1);
    let workers = server.workers();
    assert_eq!(workers.len(), 1, "{workers:?}");
    for pid in workers {
        assert_eq!(
            nofile_limits(pid),
            ("4096".to_owned(), "4096".to_owned()),
            "worker {pid}'s Max open files (soft, hard)"
        );
    }
}

/// Out of descriptors, accept() fails until connections close. The error is logged once, not on every retry
/// (today: every 100 ms per app thread), and when connections can be accepted again a line says so with how
/// many failures there were; then the worker serves as before.
#[test]
fn running_out_of_descriptors_is_logged_once_and_clears() {
    const IDLE: usize = 80;
    require_root("setting RLIMIT_NOFILE");
    let server = Server::spawn(
        app()
            .nofile_limit(64, 64)
            .arg("--threads")
            .arg("2")
            .arg("--read-timeout")
            .arg("120"),
    );
    wait_ready(&server, 1);
    assert_eq!(server.get("/pid").status, 200);
    let offset = server.log_offset();
    let idle: Vec<_> = (0..IDLE).map(|_| server.connect()).collect();
    assert!(
        server.wait_for_log_since(offset, "Too many open files", Duration::from_secs(15)),
        "{IDLE} idle connections did not exhaust 64 descriptors\n{}",
        server.log_since(offset)
    );
    // Bounded wait for a second occurrence: returns at once if it comes, else after 3 s.
    let seen = server.wait_for_count_since(offset, "Too many open files", 2, Duration::from_secs(3));
    assert_eq!(
        seen,
        1,
        "`Too many open files` repeated within 3 s\n{}",
        server.log_since(offset)
    );

    let closed = server.log_offset();
    drop(idle);
    // The wording is the server's to choose ("cleared", "accepting connections again", "recovered"); what
    // matters is a line after the close that says so with the number of failed accepts.
    let says_cleared = |line: &str| {
        // The message and its fields: after the target (`ferrule::server: `), past the timestamp and span pids.
        let Some(message) = line
            .find("ferrule::")
            .and_then(|t| line[t..].find(": ").map(|m| line[t + m..].to_ascii_lowercase()))
        else {
            return false;
        };
        ["clear", "again", "recover"].iter().any(|w| message.contains(w)) && message.chars().any(|c| c.is_ascii_digit())
    };
    assert!(
        poll_until(LOG_WAIT, || server.log_since(closed).lines().any(says_cleared)),
        "no line (with a count) saying the descriptor shortage cleared\n{}",
        server.log_since(closed)
    );
    assert_eq!(server.get("/pid").status, 200, "served after the connections closed");
    assert!(!server.log().contains("worker died"), "{}", server.log());
}

// ---------------------------------------------------------------------------------------------------------
// 12. Recycling by memory
// ---------------------------------------------------------------------------------------------------------

/// `--reload-on-rss 100`: once a request leaves a worker above the limit it accepts no new connection (uWSGI's
/// reload-on-rss stops the worker after that request), while the other worker and the replacement serve every
/// following request without a failure.
#[test]
fn a_worker_over_reload_on_rss_stops_accepting_at_once() {
    let server = Server::spawn(app().arg("--workers").arg("2").arg("--reload-on-rss").arg("100"));
    wait_ready(&server, 2);
    for pid in server.workers() {
        let rss = rss_kib(pid).expect("worker RSS") / 1024;
        assert!(rss < 60, "an idle worker already uses {rss} MiB");
    }
    let nginx = Nginx::start(&server.addr.nginx_upstream(), "");
    let grown = http::get(nginx.port(), "/grow?mb=150");
    assert_eq!(grown.status, 200, "{}", grown.summary());
    let big: u32 = grown.text().trim().parse().expect("pid");
    let mut served = Vec::new();
    for i in 0..40 {
        let r = http::get(nginx.port(), "/pid");
        assert_eq!(
            r.status,
            200,
            "request {i} after the big one: {}\n{}",
            r.summary(),
            server.log()
        );
        served.push(r.text().trim().parse::<u32>().expect("pid"));
    }
    assert!(
        !served.contains(&big),
        "the worker {big} over --reload-on-rss served again: {served:?}\n{}",
        server.log()
    );
    assert!(
        poll_until(WORKER_TIMEOUT, || !alive(big)),
        "the grown worker {big} did not leave\n{}",
        server.log()
    );
}

// ---------------------------------------------------------------------------------------------------------
// 13-17. Options as newcomers write them
// ---------------------------------------------------------------------------------------------------------

/// gunicorn's `-w`, `-b`/`--bind`, `-t`, `-c` and uWSGI's `--processes`, `--chmod-socket` are accepted with
/// their meaning there.
#[test]
fn gunicorn_and_uwsgi_option_spellings_are_accepted() {
    let dir = temp_dir();
    let file = dir.path().join("conf.toml");
    std::fs::write(&file, "workers = 3\n").expect("write config");
    let file = file.to_str().expect("utf-8 path");
    type Check = fn(&toml::Table) -> bool;
    let cases: [(&[&str], &str, Check); 7] = [
        (&["-w", "2"], "workers = 2", |t| {
            t.get("workers") == Some(&toml::Value::Integer(2))
        }),
        (&["--processes", "2"], "workers = 2", |t| {
            t.get("workers") == Some(&toml::Value::Integer(2))
        }),
        (
            &["-b", "unix:/tmp/fc-alias.sock"],
            "socket = [unix:/tmp/fc-alias.sock]",
            |t| t.get("socket") == Some(&toml::Value::Array(vec!["unix:/tmp/fc-alias.sock".into()])),
        ),
        (&["--bind", "127.0.0.1:9123"], "socket = [127.0.0.1:9123]", |t| {
            t.get("socket") == Some(&toml::Value::Array(vec!["127.0.0.1:9123".into()]))
        }),
        (&["-t", "5"], "timeout = 5", |t| {
            t.get("timeout") == Some(&toml::Value::Integer(5))
        }),
        (&["--chmod-socket", "660"], "socket_mode 660", |t| {
            socket_mode(t) == Some(0o660)
        }),
        (&["-c", ""], "workers = 3 from the file", |t| {
            t.get("workers") == Some(&toml::Value::Integer(3))
        }),
    ];
    let mut failures = Vec::new();
    for (args, want, check) in cases {
        let args: Vec<&str> = args.iter().map(|a| if a.is_empty() { file } else { a }).collect();
        let out = check_config(&args, &[]);
        let table = out.stdout.parse::<toml::Table>().ok();
        if !out.status.success() || !table.as_ref().is_some_and(check) {
            failures.push(format!("{args:?}: want {want}\n{}", out.describe()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// `FERRULE_VIRTUALENV` works like every other FERRULE_ variable (today only VIRTUAL_ENV is read), and boolean
/// variables take the spellings systemd units and compose files use: yes/on/1/true and no/off/0/false.
#[test]
fn environment_variables_take_the_usual_spellings() {
    let venv = test_venv();
    let venv_path = venv.to_str().expect("utf-8 path");
    let table = effective_config(&[], &[("FERRULE_VIRTUALENV", venv_path)]);
    assert_eq!(
        table.get("virtualenv").and_then(toml::Value::as_str),
        Some(venv_path),
        "FERRULE_VIRTUALENV: {table:#?}"
    );

    let mut failures = Vec::new();
    for (value, want) in [
        ("yes", true),
        ("on", true),
        ("1", true),
        ("true", true),
        ("no", false),
        ("off", false),
        ("0", false),
        ("false", false),
    ] {
        let out = check_config(&[], &[("FERRULE_ACCESS_LOG", value)]);
        let got = out
            .stdout
            .parse::<toml::Table>()
            .ok()
            .and_then(|t| t.get("access_log").and_then(toml::Value::as_bool));
        if !out.status.success() || got != Some(want) {
            failures.push(format!("FERRULE_ACCESS_LOG={value}: want {want}\n{}", out.describe()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// In TOML a mode is written `0o660` (an octal integer) or `"660"`; a bare `660` is the decimal 660 (0o1224),
/// which is surely a mistake, so it is refused with a message showing both accepted forms.
#[test]
fn socket_mode_in_toml_is_octal_or_refused() {
    for (text, what) in [("socket_mode = 0o660", "0o660"), ("socket_mode = \"660\"", "\"660\"")] {
        let dir = temp_dir();
        let file = dir.path().join("conf.toml");
        std::fs::write(&file, format!("{text}\n")).expect("write config");
        let table = effective_config(&["--config", file.to_str().expect("utf-8 path")], &[]);
        assert_eq!(socket_mode(&table), Some(0o660), "{what}: {table:#?}");
    }
    let dir = temp_dir();
    let file = dir.path().join("conf.toml");
    std::fs::write(&file, "socket_mode = 660\n").expect("write config");
    let out = check_config(&["--config", file.to_str().expect("utf-8 path")], &[]);
    let said = format!("{}{}", out.stdout, out.stderr);
    assert!(!out.status.success(), "a bare 660 was accepted\n{}", out.describe());
    assert!(
        said.contains("0o660") && said.contains("\"660\""),
        "the message does not show both accepted forms\n{}",
        out.describe()
    );
}

/// `--check-config` imports the app as a start would (gunicorn's `--check-config` does), so a typo in the app
/// name fails the check, not the deploy.
#[test]
fn check_config_imports_the_app() {
    let dir = temp_dir();
    let apps = apps_dir();
    let apps = apps.to_str().expect("utf-8 path");
    let bad = FerruleBuilder::without_app()
        .current_dir(dir.path())
        .args(["--check-config", "--pythonpath", apps, "nonexistent_module_xyz"])
        .run(EXIT_TIMEOUT);
    let said = format!("{}{}", bad.stdout, bad.stderr);
    assert!(
        !bad.status.success(),
        "a missing app passed the check\n{}",
        bad.describe()
    );
    assert!(
        said.contains("nonexistent_module_xyz") && said.contains("No module named"),
        "the import error is not reported\n{}",
        bad.describe()
    );
    let good = check_config(&[], &[]);
    assert!(good.status.success(), "{}", good.describe());
}

/// An unknown `{field}` in --access-log-format is a typo the operator wants to hear about at start, with the
/// fields that exist, rather than a literal `{nonsense}` in every access-log line.
#[test]
fn an_unknown_access_log_field_is_refused_at_start() {
    let (status, log) = app()
        .arg("--access-log")
        .arg("--access-log-format")
        .arg("{method} {nonsense}")
        // Refused before any worker starts; a server that accepts the format keeps running until this bound.
        .spawn_expect_exit(Duration::from_secs(15));
    assert!(!status.success(), "{log}");
    assert!(log.contains("nonsense"), "the unknown field is not named\n{log}");
    assert!(
        log.contains("{status}") && log.contains("{path}"),
        "the known fields are not listed\n{log}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// 18-20. What the log says
// ---------------------------------------------------------------------------------------------------------

/// Ctrl-C in a terminal sends SIGINT: the log names SIGINT, not the SIGQUIT it is handled like.
#[test]
fn sigint_is_logged_as_sigint() {
    let mut server = Server::spawn(app());
    wait_ready(&server, 1);
    let offset = server.log_offset();
    server.signal(libc::SIGINT);
    assert!(server.wait_exit(STOP_TIMEOUT).is_some(), "no exit on SIGINT");
    let log = server.log_since(offset);
    assert!(log.contains("SIGINT"), "the log does not name SIGINT\n{log}");
    assert!(!log.contains("SIGQUIT"), "the log names SIGQUIT for a SIGINT\n{log}");
}

/// A start that fails (the app does not import) stops without a `stopping ... signal=` line: no signal was
/// involved, and the line misleads whoever reads the log for the cause.
#[test]
fn a_failed_start_logs_no_stopping_signal_line() {
    let (status, log) = FerruleBuilder::new("nonexistent_module_xyz").spawn_expect_exit(EXIT_TIMEOUT);
    assert!(!status.success(), "{log}");
    assert!(log.contains("No module named"), "{log}");
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("stopping") && l.contains("signal"))
        .collect();
    assert!(bad.is_empty(), "a signal line for a failed start: {bad:?}\n{log}");
}

/// `--socket unix:/nonexistent-dir-xyz/app.sock`: the error names the missing directory itself (as in "create
/// /nonexistent-dir-xyz or fix the path"), not only ENOENT on the socket path.
#[test]
fn a_missing_socket_directory_is_named() {
    let socket = "/nonexistent-dir-xyz/app.sock";
    let (status, log) = app().socket(&format!("unix:{socket}")).spawn_expect_exit(EXIT_TIMEOUT);
    assert!(!status.success(), "{log}");
    assert!(
        log.replace(socket, "").contains("/nonexistent-dir-xyz"),
        "the error does not name the directory /nonexistent-dir-xyz on its own\n{log}"
    );
}

/// HTTP sent to the `--metrics` socket (a browser, `curl`, a Prometheus job scraping it directly) is closed at
/// once with the hint the app socket gives, instead of waiting 5 s for a uwsgi packet that never comes.
#[test]
fn http_on_the_metrics_socket_is_closed_promptly_with_a_hint() {
    let server = Server::spawn(app().arg("--metrics").arg("127.0.0.1:0"));
    let log = server.log();
    let line = log
        .lines()
        .find(|l| l.contains("serving metrics"))
        .unwrap_or_else(|| panic!("no `serving metrics` line\n{log}"));
    let addr: SocketAddr = field(line, "address")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line}"));
    let offset = server.log_offset();
    let mut s = TcpStream::connect(addr).expect("connect to the metrics socket");
    s.set_read_timeout(Some(LOG_WAIT)).expect("read timeout");
    let started = Instant::now();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let raw = read_to_close(&mut s);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the metrics socket held an HTTP request for {took:?} (answer {:?})",
        raw.text()
    );
    assert!(
        server.wait_for_log_since(offset, "HTTP", Duration::from_secs(2)),
        "no hint that HTTP was sent to the metrics socket\n{}",
        server.log_since(offset)
    );
}

/// A TLS ClientHello on the app socket is nginx pointed at it with `uwsgi_pass suwsgi://` or an https upstream:
/// the hint says to use plain `uwsgi://` (ferrule speaks no TLS; the socket belongs on loopback or a Unix path).
#[test]
fn tls_on_the_app_socket_hints_at_suwsgi() {
    let server = Server::spawn(app().tcp());
    let offset = server.log_offset();
    let mut s = server.connect();
    s.set_read_timeout(Some(LOG_WAIT));
    let raw = uwsgi::send_raw(&mut s, CLIENT_HELLO);
    assert!(raw.bytes.is_empty(), "an answer to TLS: {:?}", raw.text());
    assert!(
        server.wait_for_log_since(offset, "suwsgi", LOG_WAIT),
        "the TLS hint does not mention suwsgi\n{}",
        server.log_since(offset)
    );
    assert_eq!(server.get("/pid").status, 200);
}
