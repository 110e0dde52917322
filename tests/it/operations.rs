//! Tier-3 tests of what an operator touches besides the app: the `--config` file and its precedence under the
//! FERRULE_* variables and the command line, the JSON log, the text access log, and the metrics that nginx
//! publishes from `--metrics`.
//!
//! Each test starts its own ferrule (and nginx where a real client path matters) on temp sockets; no fixed
//! ports, every wait bounded.

mod openmetrics;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::harness::ferrule::{Addr, Ferrule, FerruleBuilder, Output, apps_dir, listening_addrs, temp_dir};
use crate::harness::http::{self, ReqBody, raw_http};
use crate::harness::json::{Json, json_log_objects, json_records_with, parse_json};
use crate::harness::nginx::Nginx;
use crate::harness::procs::{self, all_threads_stopped, id_of, live_children, poll_until, require_root};
use crate::harness::server::{Server, probe_app};
use crate::harness::stack::Stack;
use crate::harness::uwsgi::{self, MODIFIER_PING, encode_header, nginx_vars, parse_response, read_to_close};
use crate::harness::venv::{system_venv_ferrule, test_venv};
use crate::harness::{EXIT_TIMEOUT, LOG_WAIT, STOP_TIMEOUT};
use openmetrics::{Scrape, parse_openmetrics};

/// `--check-config` and a refused start never load Python; this only bounds a hang.
const EXIT_WAIT: Duration = Duration::from_secs(20);
/// Workers report their counters every second; a scrape must show a change within a few reports.
const METRICS_WAIT: Duration = Duration::from_secs(10);
/// Starting a worker imports CPython; on a loaded 2-core box that takes a while.
const WORKERS_WAIT: Duration = Duration::from_secs(30);

/// `ops_app:application` from tests/apps.
fn ops_app() -> FerruleBuilder {
    FerruleBuilder::new("ops_app:application")
        .arg("--pythonpath")
        .arg(apps_dir())
}

fn write_file(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path.to_owned()
}

// --- config: file < FERRULE_* < command line ---------------------------------------------------------

/// Runs `--check-config` and parses the effective configuration it prints; panics unless it exits 0.
fn effective_config(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> toml::Table {
    let out = FerruleBuilder::without_app()
        .current_dir(dir)
        .arg("--check-config")
        .args(args)
        .envs(envs)
        .run(EXIT_WAIT);
    assert!(out.status.success(), "--check-config failed\n{}", out.describe());
    out.stdout
        .parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("--check-config did not print TOML: {e}\n{}", out.describe()))
}

fn int(table: &toml::Table, key: &str) -> i64 {
    table
        .get(key)
        .and_then(toml::Value::as_integer)
        .unwrap_or_else(|| panic!("no integer `{key}` in the effective config:\n{table:#?}"))
}

fn string(table: &toml::Table, key: &str) -> String {
    table
        .get(key)
        .and_then(toml::Value::as_str)
        .unwrap_or_else(|| panic!("no string `{key}` in the effective config:\n{table:#?}"))
        .to_owned()
}

fn boolean(table: &toml::Table, key: &str) -> bool {
    table
        .get(key)
        .and_then(toml::Value::as_bool)
        .unwrap_or_else(|| panic!("no boolean `{key}` in the effective config:\n{table:#?}"))
}

fn strings(table: &toml::Table, key: &str) -> Vec<String> {
    table
        .get(key)
        .and_then(toml::Value::as_array)
        .unwrap_or_else(|| panic!("no list `{key}` in the effective config:\n{table:#?}"))
        .iter()
        .map(|v| v.as_str().expect("a list of strings").to_owned())
        .collect()
}

#[test]
fn config_file_then_environment_then_command_line() {
    let dir = temp_dir();
    let d = dir.path().display();
    // Kebab and snake case both name an option, as the keys of the help text do.
    let file = write_file(
        &dir.path().join("ferrule.toml"),
        &format!(
            r#"workers = 2
threads = 3
socket = ["unix:{d}/file.sock", "127.0.0.1:0"]
app = "file_mod:app"
access-log = true
max_body_size = 12345
listen-backlog = 77
log-format = "json"
"#
        ),
    );
    let file = file.to_str().expect("UTF-8 temp path");
    // --check-config imports the app, so each source names one that exists (the working directory is on
    // sys.path).
    for module in ["file_mod", "env_mod", "cli_mod"] {
        write_file(
            &dir.path().join(format!("{module}.py")),
            "def app(environ, start_response):
    pass
",
        );
    }

    // The file alone.
    let c = effective_config(dir.path(), &["--config", file], &[]);
    assert_eq!(int(&c, "workers"), 2, "{c:#?}");
    assert_eq!(int(&c, "threads"), 3, "{c:#?}");
    assert_eq!(
        strings(&c, "socket"),
        [format!("unix:{d}/file.sock"), "127.0.0.1:0".into()],
        "{c:#?}"
    );
    assert_eq!(string(&c, "app"), "file_mod:app", "{c:#?}");
    assert!(boolean(&c, "access_log"), "{c:#?}");
    assert_eq!(int(&c, "max_body_size"), 12345, "{c:#?}");
    assert_eq!(int(&c, "listen_backlog"), 77, "{c:#?}");
    assert_eq!(string(&c, "log_format"), "json", "{c:#?}");
    assert_eq!(
        int(&c, "read_timeout"),
        30,
        "an option nobody set keeps its default: {c:#?}"
    );

    // The environment wins over the file, key by key; what it does not set still comes from the file.
    let env_sock = format!("unix:{d}/env.sock");
    let envs = [
        ("FERRULE_WORKERS", "3"),
        ("FERRULE_THREADS", "5"),
        ("FERRULE_SOCKET", env_sock.as_str()),
        ("FERRULE_APP", "env_mod:app"),
        // A flag the file turned on, turned off again by the environment.
        ("FERRULE_ACCESS_LOG", "false"),
    ];
    let c = effective_config(dir.path(), &["--config", file], &envs);
    assert_eq!(int(&c, "workers"), 3, "{c:#?}");
    assert_eq!(int(&c, "threads"), 5, "{c:#?}");
    assert_eq!(
        strings(&c, "socket"),
        [env_sock.as_str()],
        "the environment's list replaces the file's: {c:#?}"
    );
    assert_eq!(string(&c, "app"), "env_mod:app", "{c:#?}");
    assert!(
        !boolean(&c, "access_log"),
        "FERRULE_ACCESS_LOG=false beats `access-log = true`: {c:#?}"
    );
    assert_eq!(int(&c, "max_body_size"), 12345, "{c:#?}");
    assert_eq!(int(&c, "listen_backlog"), 77, "{c:#?}");
    assert_eq!(string(&c, "log_format"), "json", "{c:#?}");

    // The command line wins over both.
    let cli_sock = format!("unix:{d}/cli.sock");
    let c = effective_config(
        dir.path(),
        &[
            "--config",
            file,
            "--workers",
            "4",
            "--socket",
            &cli_sock,
            "--log-format",
            "text",
            "cli_mod:app",
        ],
        &envs,
    );
    assert_eq!(int(&c, "workers"), 4, "{c:#?}");
    assert_eq!(int(&c, "threads"), 5, "FERRULE_THREADS still beats the file: {c:#?}");
    assert_eq!(strings(&c, "socket"), [cli_sock], "{c:#?}");
    assert_eq!(string(&c, "app"), "cli_mod:app", "{c:#?}");
    assert_eq!(string(&c, "log_format"), "text", "{c:#?}");
    assert!(!boolean(&c, "access_log"), "{c:#?}");
    assert_eq!(int(&c, "max_body_size"), 12345, "{c:#?}");
    assert_eq!(int(&c, "listen_backlog"), 77, "{c:#?}");
}

/// A bad config file is refused with a non-zero exit and a message that names the key, both by
/// `--check-config` and by a real start (which must not get as far as binding its socket).
#[test]
fn config_errors_name_the_offending_key() {
    let dir = temp_dir();
    let sock = dir.path().join("never.sock");
    let socket_line = format!("socket = [\"unix:{}\"]\n", sock.display());
    let cases: [(&str, String, &str); 4] = [
        (
            "unknown",
            format!("app = \"ops_app:application\"\n{socket_line}bogus = 1\n"),
            "unknown key `bogus`",
        ),
        (
            "bad-threads",
            format!("app = \"ops_app:application\"\n{socket_line}threads = \"many\"\n"),
            "`threads`",
        ),
        // The key as the file spells it, kebab case.
        (
            "bad-kebab",
            format!("app = \"ops_app:application\"\n{socket_line}max-body-size = \"lots\"\n"),
            "`max-body-size`",
        ),
        ("no-app", format!("{socket_line}workers = 2\n"), "no APP given"),
    ];
    for (name, text, needle) in &cases {
        let file = write_file(&dir.path().join(format!("{name}.toml")), text);
        let file = file.to_str().expect("UTF-8 temp path");
        for check in [true, false] {
            let args: Vec<&str> = if check {
                vec!["--check-config", "--config", file]
            } else {
                vec!["--config", file]
            };
            let out: Output = FerruleBuilder::without_app()
                .current_dir(dir.path())
                .args(&args)
                .run(EXIT_WAIT);
            assert!(
                !out.status.success(),
                "{name} (check={check}) was accepted\n{}",
                out.describe()
            );
            assert!(
                out.stderr.contains(needle),
                "{name} (check={check}): the error should say {needle:?}\n{}",
                out.describe()
            );
            assert!(
                out.stdout.trim().is_empty(),
                "{name}: no config is printed for a bad file\n{}",
                out.describe()
            );
            assert!(
                !sock.exists(),
                "{name}: a refused config must not bind its socket\n{}",
                out.describe()
            );
        }
    }
}

/// A server whose app, socket and options all come from the file serves a request.
#[test]
fn server_runs_from_a_config_file_alone() {
    let dir = temp_dir();
    let sock = dir.path().join("from-file.sock");
    let file = write_file(
        &dir.path().join("ferrule.toml"),
        &format!(
            "app = \"ops_app:application\"\nsocket = [\"unix:{}\"]\npythonpath = [\"{}\"]\nworkers = 2\naccess_log = true\n",
            sock.display(),
            apps_dir().display()
        ),
    );
    // The harness always appends its APP argument; `--config=FILE` in that place is an option to clap, so the
    // command line holds nothing but the file's name.
    let ferrule = FerruleBuilder::new(&format!("--config={}", file.display()))
        .no_default_socket()
        .spawn();
    assert_eq!(ferrule.addr, Addr::Unix(sock.clone()), "listening where the file says");
    assert!(
        ferrule.wait_for_log("ready workers=2", WORKERS_WAIT),
        "the master never reported both workers of `workers = 2` ready:\n{}",
        ferrule.log()
    );
    let mut stream = ferrule.connect();
    let raw = uwsgi::request(&mut stream, nginx_vars("GET", "/pid", b"").as_slice(), b"");
    let resp = parse_response(&raw);
    assert_eq!(resp.status, 200, "{}", resp.text());
    let pid: u32 = resp.text().parse().expect("the app answers its pid");
    let workers = live_children(ferrule.pid());
    assert_eq!(workers.len(), 2, "`workers = 2` from the file: {workers:?}");
    assert!(workers.contains(&pid), "served by a worker: {pid} not in {workers:?}");
    assert!(
        ferrule.wait_for_log(&format!("path=/pid status=200 bytes={}", resp.body.len()), LOG_WAIT),
        "`access_log = true` from the file logs the request:\n{}",
        ferrule.log()
    );
}

// --- the JSON log ------------------------------------------------------------------------------------

/// The ops tests' way to start the harness's [`Stack`].
impl Stack {
    /// Starts `builder` with `--workers N`, waits for all of them to be ready (the master's `ready` line, as text
    /// or as JSON), then starts nginx with `extra` in `location /`.
    fn start_workers(builder: FerruleBuilder, workers: usize, extra: &str) -> Stack {
        Stack::start_ready(builder.arg("--workers").arg(workers.to_string()), workers, extra)
    }

    /// Waits (bounded) until the log holds at least `n` lines containing `needle` (the needles here occur once
    /// per line).
    fn wait_lines(&self, needle: &str, n: usize) -> bool {
        self.ferrule.wait_for_count_since(0, needle, n, LOG_WAIT) >= n
    }
}

/// The access-log object whose request_id is `id`; panics (with the log) unless there is exactly one.
fn access_entry<'a>(entries: &'a [Json], id: &str, log: &str) -> &'a Json {
    let found: Vec<&Json> = entries
        .iter()
        .filter(|e| e.get("request_id").and_then(Json::as_str) == Some(id))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "access-log entries with request_id {id:?}: {found:?}\n--- log ---\n{log}"
    );
    found[0]
}

fn field_str<'a>(entry: &'a Json, key: &str) -> &'a str {
    entry
        .get(key)
        .and_then(Json::as_str)
        .unwrap_or_else(|| panic!("no string field {key:?} in {entry:?}"))
}

fn field_u64(entry: &Json, key: &str) -> u64 {
    entry
        .get(key)
        .and_then(Json::as_u64)
        .unwrap_or_else(|| panic!("no integer field {key:?} in {entry:?}"))
}

#[test]
fn json_log_stays_one_valid_object_per_line_whatever_the_request_holds() {
    let stack = Stack::start_workers(ops_app().arg("--log-format").arg("json").arg("--access-log"), 2, "");
    let port = stack.port();

    // 1. A plain request: every field checked against what the client knows.
    let plain = http::request(port, "GET", "/pid", &[("X-Request-Id", "ops-json-1")], ReqBody::Empty);
    assert_eq!(plain.status, 200, "{}", plain.summary());
    let served_by: u64 = plain.text().parse().expect("the app answers its pid");

    // 2. Quote, backslash, newline, a control byte and non-ASCII, percent-encoded in the URL (nginx decodes
    //    them into PATH_INFO; the access log shows REQUEST_URI as sent) and raw in the X-Request-Id header.
    let odd_uri = "/odd%22q%5Cb%0Ac%01%C3%A9?k=%22%5C%0A";
    let odd_id = "id-\"quoted\"-\\back\\-\u{1}-\u{7f}-é-\t-end";
    let odd = http::request(port, "GET", odd_uri, &[("X-Request-Id", odd_id)], ReqBody::Empty);
    assert_eq!(odd.status, 404, "{}", odd.summary());

    // 3. The same bytes raw in the request line, and bytes that are not UTF-8 at all in the headers.
    let (status, _) = raw_http(
        port,
        b"GET /raw\"quote\\back\xc3\xa9\xff?q=\"\\ HTTP/1.1\r\nX-Request-Id: raw-\x01-\x7f-\xff-\"\\\r\nX-Nasty: \x01\"\\\xc3\xa9\xff",
    );
    assert_eq!(status, 404, "nginx passes such a request on to the app");

    // 4. An app traceback whose message holds the decoded path and a raw header (see ops_app.boom), written
    //    to wsgi.errors as well.
    let (status, _) = raw_http(
        port,
        b"GET /boom/%22q%5Cb%0Ac%01%C3%A9 HTTP/1.1\r\nX-Request-Id: ops-json-boom\r\nX-Nasty: \"\\\x01\xc3\xa9\xff",
    );
    assert_eq!(status, 500);

    assert!(
        stack.wait_lines("\"target\":\"ferrule::access\"", 4),
        "four access-log lines expected:\n{}",
        stack.ferrule.log()
    );
    let log = stack.ferrule.log();
    let objects = json_log_objects(&log);

    let access: Vec<Json> = objects
        .iter()
        .filter(|o| o.get("target").and_then(Json::as_str) == Some("ferrule::access"))
        .cloned()
        .collect();
    assert_eq!(access.len(), 4, "one access-log line per request:\n{log}");
    let workers: BTreeSet<u64> = live_children(stack.ferrule.pid()).into_iter().map(u64::from).collect();
    for entry in &access {
        for key in ["method", "path", "request_id", "remote_addr"] {
            field_str(entry, key);
        }
        for key in ["status", "bytes", "duration_us", "pid"] {
            field_u64(entry, key);
        }
        assert_eq!(field_str(entry, "method"), "GET", "{entry:?}");
        assert_eq!(
            field_str(entry, "remote_addr"),
            "127.0.0.1",
            "nginx's REMOTE_ADDR: {entry:?}"
        );
        assert!(
            workers.contains(&field_u64(entry, "pid")),
            "pid is a worker's ({workers:?}): {entry:?}"
        );
    }

    let e = access_entry(&access, "ops-json-1", &log);
    assert_eq!(field_str(e, "path"), "/pid", "{e:?}");
    assert_eq!(field_u64(e, "status"), 200, "{e:?}");
    assert_eq!(field_u64(e, "bytes"), plain.body.len() as u64, "{e:?}");
    assert_eq!(
        field_u64(e, "pid"),
        served_by,
        "the pid of the worker that served it: {e:?}"
    );

    // The escapes must round-trip: what the parser reads back is exactly what was sent.
    let e = access_entry(&access, odd_id, &log);
    assert_eq!(field_str(e, "path"), odd_uri, "{e:?}");
    assert_eq!(field_u64(e, "status"), 404, "{e:?}");
    assert_eq!(field_u64(e, "bytes"), odd.body.len() as u64, "{e:?}");

    let raw = access
        .iter()
        .find(|e| field_str(e, "request_id").starts_with("raw-\u{1}-\u{7f}-"))
        .unwrap_or_else(|| panic!("no access-log entry for the raw request:\n{log}"));
    assert!(field_str(raw, "request_id").ends_with("-\"\\"), "{raw:?}");
    assert!(field_str(raw, "path").starts_with("/raw\"quote\\backé"), "{raw:?}");
    assert_eq!(field_u64(raw, "status"), 404, "{raw:?}");

    let e = access_entry(&access, "ops-json-boom", &log);
    assert_eq!(field_str(e, "path"), "/boom/%22q%5Cb%0Ac%01%C3%A9", "{e:?}");
    assert_eq!(field_u64(e, "status"), 500, "{e:?}");
    // PEP 3333: PATH_INFO reaches Python as latin-1, so the UTF-8 of é shows as "Ã©".
    let decoded = "/boom/\"q\\b\nc\u{1}Ã©";
    let traceback = objects
        .iter()
        .flat_map(|o| match o {
            Json::Object(members) => members.clone(),
            _ => Vec::new(),
        })
        .filter_map(|(_, v)| v.as_str().map(str::to_owned))
        .find(|v| v.contains("Traceback (most recent call last)") && v.contains("ops boom:"))
        .unwrap_or_else(|| panic!("no JSON field holds the app's traceback:\n{log}"));
    assert!(
        traceback.contains(&format!("ValueError: ops boom: {decoded} | ")),
        "the traceback reads back with its quote, backslash, newline and control byte intact: {traceback:?}"
    );
}

/// The JSON log promises one object per line on stderr, and an app's own stderr (print, the stdlib's
/// `logging`) goes to the same stream: with `--log-format json` ferrule wraps those lines too.
#[test]
fn json_log_wraps_what_the_app_writes_to_stderr() {
    let stack = Stack::start_workers(ops_app().arg("--log-format").arg("json"), 1, "");
    let resp = http::get(stack.port(), "/stderr?marker=ops-json-stderr");
    assert_eq!(resp.status, 200, "{}", resp.summary());
    assert!(
        stack.wait_lines("ops-json-stderr via logging", 1),
        "the app's lines never reached the log:\n{}",
        stack.ferrule.log()
    );
    let log = stack.ferrule.log();
    let bad: Vec<&str> = log.lines().filter(|l| parse_json(l).is_err()).collect();
    assert!(bad.is_empty(), "lines that are not JSON: {bad:?}");
}

// --- the text access log -----------------------------------------------------------------------------

/// The message of the access-log line containing `needle` (the text after `ferrule::access: `).
fn access_message(ferrule: &Ferrule, needle: &str) -> String {
    assert!(
        ferrule.wait_for_log(needle, LOG_WAIT),
        "no access-log line with {needle:?}:\n{}",
        ferrule.log()
    );
    let log = ferrule.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ferrule::access: ") && l.contains(needle))
        .collect();
    assert_eq!(lines.len(), 1, "one access-log line with {needle:?}:\n{log}");
    lines[0]
        .split_once("ferrule::access: ")
        .expect("filtered on it")
        .1
        .to_owned()
}

#[test]
fn text_access_log_default_line() {
    let stack = Stack::start_workers(ops_app().arg("--access-log"), 1, "");
    let resp = http::request(
        stack.port(),
        "GET",
        "/pid?x=1",
        &[("X-Request-Id", "ops-text-1")],
        ReqBody::Empty,
    );
    assert_eq!(resp.status, 200, "{}", resp.summary());
    let message = access_message(&stack.ferrule, "request_id=ops-text-1");
    let fields: Vec<(&str, &str)> = message
        .split(' ')
        .skip(1) // the event's message, `request`
        .map(|kv| {
            kv.split_once('=')
                .unwrap_or_else(|| panic!("{kv:?} is not key=value in {message:?}"))
        })
        .collect();
    let keys: Vec<&str> = fields.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        &keys[..7],
        ["method", "path", "status", "bytes", "duration_us", "pid", "request_id"],
        "{message:?}"
    );
    let value = |key: &str| fields.iter().find(|(k, _)| *k == key).expect("checked above").1;
    assert_eq!(value("method"), "GET", "{message:?}");
    assert_eq!(value("path"), "/pid?x=1", "{message:?}");
    assert_eq!(value("status"), "200", "{message:?}");
    assert_eq!(value("bytes"), resp.body.len().to_string(), "{message:?}");
    value("duration_us")
        .parse::<u64>()
        .unwrap_or_else(|_| panic!("duration_us is a number: {message:?}"));
    assert_eq!(
        value("pid"),
        resp.text(),
        "the pid of the worker that served it: {message:?}"
    );
    assert_eq!(value("request_id"), "ops-text-1", "{message:?}");
}

#[test]
fn text_access_log_custom_format_has_exactly_that_shape() {
    let format = "{remote_addr} {method} {path} {status} {bytes} {duration_us} {pid} {request_id}";
    let stack = Stack::start_workers(
        ops_app().arg("--access-log").arg("--access-log-format").arg(format),
        1,
        "",
    );
    let resp = http::request(
        stack.port(),
        "GET",
        "/pid",
        &[("X-Request-Id", "ops-fmt-1")],
        ReqBody::Empty,
    );
    assert_eq!(resp.status, 200, "{}", resp.summary());
    let missing = http::get(stack.port(), "/no-such-route");
    assert_eq!(missing.status, 404);

    let message = access_message(&stack.ferrule, " ops-fmt-1");
    let parts: Vec<&str> = message.split(' ').collect();
    assert_eq!(parts.len(), 8, "eight fields, nothing else: {message:?}");
    let duration: u64 = parts[5]
        .parse()
        .unwrap_or_else(|_| panic!("duration_us is a number: {message:?}"));
    let expected = format!(
        "127.0.0.1 GET /pid 200 {} {duration} {} ops-fmt-1",
        resp.body.len(),
        resp.text()
    );
    assert_eq!(message, expected);

    // Without X-Request-Id the field still holds a placeholder, so the line keeps its eight fields.
    let message = access_message(&stack.ferrule, " GET /no-such-route ");
    let parts: Vec<&str> = message.split(' ').collect();
    assert_eq!(parts.len(), 8, "{message:?}");
    assert_eq!(
        &parts[..5],
        [
            "127.0.0.1",
            "GET",
            "/no-such-route",
            "404",
            &missing.body.len().to_string()
        ],
        "{message:?}"
    );
    assert_eq!(parts[7], "-", "{message:?}");
}

/// A placeholder's name inside a request's own bytes is data, not a placeholder: the line must show the path
/// and request id as sent, or a client could rewrite what the log says about its request.
#[test]
fn text_access_log_format_keeps_braces_in_values_verbatim() {
    let format = "{method} {path} {status} {request_id} {remote_addr}";
    let stack = Stack::start_workers(
        ops_app().arg("--access-log").arg("--access-log-format").arg(format),
        1,
        "",
    );
    let resp = http::request(
        stack.port(),
        "GET",
        "/pid?q={status}{remote_addr}",
        &[("X-Request-Id", "ops-brace-{pid}{bytes}")],
        ReqBody::Empty,
    );
    assert_eq!(resp.status, 200, "{}", resp.summary());
    let message = access_message(&stack.ferrule, "ops-brace-");
    assert_eq!(
        message,
        "GET /pid?q={status}{remote_addr} 200 ops-brace-{pid}{bytes} 127.0.0.1"
    );
}

/// `--access-log` is "one line per request", including the requests the server answers itself (413 here).
#[test]
fn text_access_log_includes_answers_the_server_makes_itself() {
    let stack = Stack::start_workers(ops_app().arg("--access-log").arg("--max-body-size").arg("100"), 1, "");
    let body = vec![b'x'; 1000];
    let refused = http::request(
        stack.port(),
        "POST",
        "/echo_length",
        &[("X-Request-Id", "ops-413")],
        ReqBody::Fixed(&body),
    );
    assert_eq!(refused.status, 413, "{}", refused.summary());
    // One worker logs in order: once the next request's line is there, the 413's would be too.
    let after = http::request(
        stack.port(),
        "GET",
        "/pid",
        &[("X-Request-Id", "ops-after-413")],
        ReqBody::Empty,
    );
    assert_eq!(after.status, 200);
    access_message(&stack.ferrule, "request_id=ops-after-413");
    let log = stack.ferrule.log();
    let line = log
        .lines()
        .find(|l| l.contains("ferrule::access: ") && l.contains("request_id=ops-413"))
        .unwrap_or_else(|| panic!("no access-log line for the 413:\n{log}"));
    assert!(line.contains("method=POST path=/echo_length status=413 "), "{line:?}");
}

/// Request bytes that drive a terminal (ESC, BEL) must not reach the text log raw: `cat`ing the log would
/// run them (the terminal-injection class of CVE-2025-58160, which tracing-subscriber fixed for the message
/// only, not for field values). nginx passes such bytes in header values.
#[test]
fn text_access_log_escapes_terminal_control_bytes() {
    let stack = Stack::start_workers(ops_app().arg("--access-log"), 1, "");
    let (status, _) = raw_http(
        stack.port(),
        b"GET /pid HTTP/1.1\r\nX-Request-Id: ops-esc-\x1b[2J\x1b[31mred\x1b]0;title\x07-end",
    );
    assert_eq!(status, 200);
    access_message(&stack.ferrule, "request_id=ops-esc-");
    let raw = stack.ferrule.raw_log();
    let line = raw
        .lines()
        .find(|l| l.contains("request_id=ops-esc-"))
        .expect("found above");
    assert!(
        !line.bytes().any(|b| b == 0x1b || b == 0x07),
        "raw ESC/BEL from the request in the log line: {line:?}"
    );
}

// --- metrics -----------------------------------------------------------------------------------------

/// Scrapes /metrics through nginx and parses it, checking the answer is OpenMetrics text.
fn scrape(port: u16) -> Scrape {
    let resp = http::get(port, "/metrics");
    assert_eq!(resp.status, 200, "{}", resp.summary());
    assert!(resp.is_complete(), "{}", resp.summary());
    let ct = resp.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("application/openmetrics-text"), "Content-Type {ct:?}");
    let text = resp.text();
    assert!(text.ends_with("# EOF\n"), "OpenMetrics text ends with `# EOF`:\n{text}");
    parse_openmetrics(&text)
}

/// The counters that must never go backwards, in one comparable value.
#[derive(Debug, Clone, PartialEq)]
struct Totals {
    requests: Vec<f64>,
    duration_count: f64,
    duration_sum: f64,
    buckets: Vec<f64>,
    request_bytes: f64,
    response_bytes: f64,
    timeouts: f64,
}

fn totals(s: &Scrape) -> Totals {
    Totals {
        requests: (1..=5)
            .map(|c| s.value("ferrule_requests_total", &[("status_class", &format!("{c}xx"))]))
            .collect(),
        duration_count: s.value("ferrule_request_duration_seconds_count", &[]),
        duration_sum: s.value("ferrule_request_duration_seconds_sum", &[]),
        buckets: s
            .find("ferrule_request_duration_seconds_bucket", &[])
            .iter()
            .map(|b| b.value)
            .collect(),
        request_bytes: s.value("ferrule_request_bytes_total", &[]),
        response_bytes: s.value("ferrule_response_bytes_total", &[]),
        timeouts: s.value("ferrule_request_timeouts_total", &[]),
    }
}

fn restarts(s: &Scrape, reason: &str) -> f64 {
    s.value("ferrule_worker_restarts_total", &[("reason", reason)])
}

/// Worker pids named by the resident-memory gauge.
fn memory_pids(s: &Scrape) -> BTreeSet<u32> {
    s.find("ferrule_worker_resident_memory_bytes", &[])
        .iter()
        .map(|m| m.labels["pid"].parse().expect("pid label is a number"))
        .collect()
}

/// One resident-memory sample per live worker, each of a plausible size. Only for workers that are ready: a
/// worker that has not loaded CPython yet is a few hundred KiB.
fn assert_memory_matches(s: &Scrape, workers: &BTreeSet<u32>) {
    assert_eq!(&memory_pids(s), workers, "{}", s.text);
    for m in s.find("ferrule_worker_resident_memory_bytes", &[]) {
        assert!(m.labels.contains_key("worker"), "{m:?}");
        assert!(
            (1u64 << 20) as f64 <= m.value && m.value <= (4u64 << 30) as f64,
            "a worker running CPython has an RSS between 1 MiB and 4 GiB: {m:?}"
        );
    }
}

/// How many workers the master has seen become ready so far.
fn ready_workers(ferrule: &Ferrule) -> usize {
    ferrule
        .log()
        .lines()
        .filter(|l| l.contains("ferrule::master: worker ready"))
        .count()
}

/// Resumes stopped workers even when an assertion fails while they are stopped, so the test can clean up.
struct Resume(Vec<u32>);

impl Drop for Resume {
    fn drop(&mut self) {
        for &pid in &self.0 {
            procs::signal(pid, libc::SIGCONT);
        }
    }
}

#[test]
fn metrics_through_nginx_count_what_was_served() {
    let builder = ops_app()
        .arg("--socket")
        .arg("127.0.0.1:0")
        .arg("--max-body-size")
        .arg("1000")
        .arg("--timeout")
        .arg("1");
    let metrics_sock = builder.tempdir().join("metrics.sock");
    let builder = builder.arg("--metrics").arg(format!("unix:{}", metrics_sock.display()));
    let location = format!(
        "            location = /metrics {{\n                include /etc/nginx/uwsgi_params;\n                uwsgi_pass unix:{};\n            }}",
        metrics_sock.display()
    );
    let stack = Stack::start_workers(builder, 2, &location);
    let port = stack.port();
    let master = stack.ferrule.pid();
    let tcp = listening_addrs(&stack.ferrule.log())
        .into_iter()
        .find_map(|a| match a {
            Addr::Tcp(addr) => Some(addr),
            Addr::Unix(_) => None,
        })
        .unwrap_or_else(|| panic!("no TCP listener in the log:\n{}", stack.ferrule.log()));

    // The metrics socket answers a uwsgi ping like the app socket does.
    let mut ping = UnixStream::connect(&metrics_sock).expect("connect to the metrics socket");
    ping.set_read_timeout(Some(LOG_WAIT)).expect("read timeout");
    ping.write_all(&encode_header(MODIFIER_PING, 0, 0)).expect("send ping");
    let pong = read_to_close(&mut ping);
    assert_eq!(pong.bytes, [MODIFIER_PING, 0, 0, 1], "pong");

    // Before any request: every family is there, at zero.
    let s = scrape(port);
    for (family, kind) in [
        ("ferrule_requests", "counter"),
        ("ferrule_requests_in_flight", "gauge"),
        ("ferrule_request_duration_seconds", "histogram"),
        ("ferrule_request_bytes", "counter"),
        ("ferrule_response_bytes", "counter"),
        ("ferrule_request_timeouts", "counter"),
        ("ferrule_worker_restarts", "counter"),
        ("ferrule_workers", "gauge"),
        ("ferrule_worker_resident_memory_bytes", "gauge"),
        ("ferrule_listen_queue_depth", "gauge"),
    ] {
        assert_eq!(
            s.types.get(family).map(String::as_str),
            Some(kind),
            "# TYPE of {family}:\n{}",
            s.text
        );
    }
    assert_eq!(totals(&s).requests, [0.0; 5], "{}", s.text);
    assert_eq!(s.value("ferrule_workers", &[]), 2.0, "{}", s.text);

    // Traffic with a known outcome: 5 x 2xx, 3 x 4xx (an app 404 twice, a server 413), 3 x 5xx (an app
    // error twice, a 504 after --timeout 1).
    let mut body_bytes = 0u64;
    let mut send = |method: &str, path: &str, body: &[u8], want: u16| {
        let req_body = if body.is_empty() {
            ReqBody::Empty
        } else {
            ReqBody::Fixed(body)
        };
        let resp = http::request(port, method, path, &[], req_body);
        assert_eq!(resp.status, want, "{method} {path}: {}", resp.summary());
        assert!(resp.is_complete(), "{}", resp.summary());
        body_bytes += resp.body.len() as u64;
    };
    for _ in 0..4 {
        send("GET", "/pid", b"", 200);
    }
    send("POST", "/echo_length", &[b'a'; 600], 200);
    send("GET", "/missing", b"", 404);
    send("GET", "/missing", b"", 404);
    send("POST", "/echo_length", &[b'b'; 2000], 413);
    send("GET", "/boom", b"", 500);
    send("GET", "/boom", b"", 500);
    send("GET", "/sleep?s=2", b"", 504);

    // Workers report once a second, and the timed-out worker is replaced: wait for the scrape to settle.
    let mut s = Scrape::default();
    let settled = poll_until(METRICS_WAIT, || {
        s = scrape(port);
        let t = totals(&s);
        t.requests.iter().sum::<f64>() >= 11.0
            && s.value("ferrule_workers", &[]) == 2.0
            && restarts(&s, "timeout") >= 1.0
            && s.value("ferrule_requests_in_flight", &[]) == 0.0
            // The two first workers and the timed-out one's replacement.
            && ready_workers(&stack.ferrule) >= 3
    });
    assert!(
        settled,
        "the scrape never showed the 11 requests, 2 ready workers and the timeout restart:\n{}",
        s.text
    );
    let t = totals(&s);
    assert_eq!(
        t.requests,
        [0.0, 5.0, 0.0, 3.0, 3.0],
        "requests by class 1xx..5xx:\n{}",
        s.text
    );
    assert_eq!(s.value("ferrule_requests_in_flight", &[]), 0.0, "{}", s.text);
    assert_eq!(t.timeouts, 1.0, "{}", s.text);
    assert_eq!(restarts(&s, "timeout"), 1.0, "{}", s.text);
    for reason in ["crash", "max-requests", "memory", "reload"] {
        assert_eq!(restarts(&s, reason), 0.0, "restarts for {reason}:\n{}", s.text);
    }
    assert_eq!(
        t.response_bytes, body_bytes as f64,
        "the body bytes the client received:\n{}",
        s.text
    );
    // Packets (a few hundred bytes of nginx vars each) and the 600-byte body; the refused 2000 are never read.
    assert!(
        t.request_bytes >= (600 + 11 * 100) as f64 && t.request_bytes < (600 + 2000 + 11 * 4096) as f64,
        "request bytes {}:\n{}",
        t.request_bytes,
        s.text
    );

    // The histogram: increasing bounds, cumulative counts, +Inf == count == every request answered.
    let buckets = s.find("ferrule_request_duration_seconds_bucket", &[]);
    let bounds: Vec<f64> = buckets
        .iter()
        .map(|b| match b.labels["le"].as_str() {
            "+Inf" => f64::INFINITY,
            le => le.parse().expect("le is a number"),
        })
        .collect();
    assert!(
        bounds.windows(2).all(|w| w[0] < w[1]),
        "bucket bounds increase: {bounds:?}"
    );
    assert_eq!(bounds.last(), Some(&f64::INFINITY), "{}", s.text);
    assert!(
        t.buckets.windows(2).all(|w| w[0] <= w[1]),
        "buckets are cumulative: {:?}",
        t.buckets
    );
    assert_eq!(t.buckets.last(), Some(&11.0), "{}", s.text);
    assert_eq!(t.duration_count, 11.0, "{}", s.text);
    // The 504 ran for at least the 1 s limit: the sum holds it, and the 1 s bucket cannot.
    let one_second = buckets
        .iter()
        .find(|b| b.labels["le"].parse::<f64>().ok() == Some(1.0))
        .unwrap_or_else(|| panic!("no le=\"1\" bucket:\n{}", s.text));
    assert!(
        one_second.value <= 10.0,
        "the timed-out request is above 1 s:\n{}",
        s.text
    );
    assert!(t.duration_sum >= 1.0 && t.duration_sum < 11.0 * 10.0, "{}", s.text);

    // One resident-memory sample per live worker.
    let workers: BTreeSet<u32> = live_children(master).into_iter().collect();
    assert_eq!(workers.len(), 2, "{workers:?}");
    assert_memory_matches(&s, &workers);

    // The TCP listen queue: idle it is empty; with both workers stopped, connections wait in it.
    let tcp_label = tcp.to_string();
    assert_eq!(
        s.value("ferrule_listen_queue_depth", &[("socket", &tcp_label)]),
        0.0,
        "{}",
        s.text
    );
    {
        let stopped = Resume(workers.iter().copied().collect());
        for &pid in &stopped.0 {
            procs::signal(pid, libc::SIGSTOP);
        }
        // Every app thread accepts, so one still running could take a connection meant for the queue.
        assert!(
            poll_until(METRICS_WAIT, || stopped.0.iter().all(|&pid| all_threads_stopped(pid))),
            "the workers did not stop"
        );
        let waiting: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect(tcp).expect("connect to the TCP listener"))
            .collect();
        let mut depth = 0.0;
        let queued = poll_until(METRICS_WAIT, || {
            depth = scrape(port).value("ferrule_listen_queue_depth", &[("socket", &tcp_label)]);
            depth == 3.0
        });
        assert!(queued, "three unaccepted connections, depth {depth}");
        drop(waiting);
    }
    let before = {
        // The empty connections are not requests; wait until the resumed workers are idle again.
        let mut s = Scrape::default();
        let idle = poll_until(METRICS_WAIT, || {
            s = scrape(port);
            s.value("ferrule_listen_queue_depth", &[("socket", &tcp_label)]) == 0.0
                && s.value("ferrule_requests_in_flight", &[]) == 0.0
        });
        assert!(idle, "{}", s.text);
        s
    };
    assert_eq!(
        totals(&before),
        t,
        "connections that sent nothing are not requests:\n{}",
        before.text
    );

    // A worker killed with SIGKILL is a crash; its counts stay in the totals.
    let victim = *workers.iter().next().expect("two workers");
    procs::signal(victim, libc::SIGKILL);
    let mut after = Scrape::default();
    let replaced = poll_until(METRICS_WAIT, || {
        after = scrape(port);
        let pids = live_children(master);
        restarts(&after, "crash") >= 1.0
            && after.value("ferrule_workers", &[]) == 2.0
            && pids.len() == 2
            && !pids.contains(&victim)
            && ready_workers(&stack.ferrule) >= 4
    });
    assert!(
        replaced,
        "the killed worker was not reported as a crash and replaced:\n{}",
        after.text
    );
    // The replacement is ready now: its memory is that of a worker running CPython.
    let workers: BTreeSet<u32> = live_children(master).into_iter().collect();
    assert_memory_matches(&scrape(port), &workers);
    assert_eq!(restarts(&after, "crash"), 1.0, "{}", after.text);
    assert_eq!(restarts(&after, "timeout"), 1.0, "{}", after.text);
    assert_eq!(
        totals(&after),
        totals(&before),
        "the totals do not go backwards when a worker dies:\n{}",
        after.text
    );
}

// ---------------------------------------------------------------------------------------------------------
// Helpers for the option and identity tests
// ---------------------------------------------------------------------------------------------------------

/// Runs `ferrule --check-config ARGS --pythonpath tests/apps probe_app:application` (with only `envs`
/// of the FERRULE_* family set) in a temp dir; the app is a real one, since the check imports it.
fn check_config(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let dir = temp_dir();
    FerruleBuilder::new("probe_app:application")
        .no_default_socket()
        .current_dir(dir.path())
        .arg("--check-config")
        .args(args)
        .arg("--pythonpath")
        .arg(apps_dir())
        .envs(envs)
        .run(EXIT_TIMEOUT)
}

/// The effective settings `check_config` prints for the probe app, as TOML; panics unless it exits 0.
fn probe_config(args: &[&str], envs: &[(&str, &str)]) -> toml::Table {
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

// ---------------------------------------------------------------------------------------------------------
// The default socket
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
    let server = Server::spawn(probe_app().no_default_socket());
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
    let table = probe_config(&[], &[]);
    assert_eq!(
        table.get("socket"),
        Some(&toml::Value::Array(vec![toml::Value::String("127.0.0.1:3031".into())])),
        "{table:#?}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Dropping privileges
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
    let builder = probe_app().program(&venv_ferrule);
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
    // The app runs in the venv ferrule was started from, whoever it runs as (a bug fixed: --uid once made workers
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
// wsgi.errors in the log
// ---------------------------------------------------------------------------------------------------------

/// One `wsgi.errors.write()` of three lines is one message (a traceback an app writes itself stays one log
/// record, as with `logging`), so with `--log-format json` it is one JSON object holding all three lines.
#[test]
fn one_multi_line_wsgi_errors_write_is_one_log_record() {
    let server = Server::spawn(probe_app().arg("--log-format").arg("json"));
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
    let server = Server::spawn(probe_app().arg("--log-format").arg("json"));
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
    let server = Server::spawn(probe_app().arg("--log-format").arg("json"));
    assert_eq!(server.get("/errors?case=tail&tag=fctail").status, 200);
    assert!(
        server.wait_for_log("fctail-tail-without-newline", LOG_WAIT),
        "the unterminated line was not logged at the end of its request\n{}",
        server.log()
    );
    assert_eq!(json_records_with(&server.log(), "fctail-tail-without-newline").len(), 1);
}

// ---------------------------------------------------------------------------------------------------------
// Options as newcomers write them
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
    let table = probe_config(&[], &[("FERRULE_VIRTUALENV", venv_path)]);
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
        let table = probe_config(&["--config", file.to_str().expect("utf-8 path")], &[]);
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
    let (status, log) = probe_app()
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
// What the log says about starting and stopping
// ---------------------------------------------------------------------------------------------------------

/// Ctrl-C in a terminal sends SIGINT: the log names SIGINT, not the SIGQUIT it is handled like.
#[test]
fn sigint_is_logged_as_sigint() {
    let mut server = Server::spawn(probe_app());
    server.wait_master_ready(1);
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
    let (status, log) = probe_app()
        .socket(&format!("unix:{socket}"))
        .spawn_expect_exit(EXIT_TIMEOUT);
    assert!(!status.success(), "{log}");
    assert!(
        log.replace(socket, "").contains("/nonexistent-dir-xyz"),
        "the error does not name the directory /nonexistent-dir-xyz on its own\n{log}"
    );
}

/// A path option that is not UTF-8 (a directory named in Latin-1, say) is refused at start-up with one line
/// naming the option, instead of the master handing its workers an empty settings line they cannot read.
#[test]
fn a_path_option_that_is_not_utf8_is_refused_naming_it() {
    use std::os::unix::ffi::OsStrExt;
    let dir = temp_dir();
    let latin1 = dir.path().join(std::ffi::OsStr::from_bytes(b"caf\xe9"));
    std::fs::create_dir(&latin1).expect("make a directory whose name is not UTF-8");
    for option in ["--chdir", "--pythonpath"] {
        let (status, log) = probe_app()
            .arg(option)
            .arg(latin1.as_os_str())
            .spawn_expect_exit(EXIT_TIMEOUT);
        assert!(
            !status.success(),
            "{option}: started with a path that is not UTF-8\n{log}"
        );
        let line = log
            .lines()
            .find(|l| l.contains("not valid UTF-8"))
            .unwrap_or_else(|| panic!("{option}: no line says the path is not UTF-8\n{log}"));
        assert!(
            line.contains(option),
            "{option}: the line does not name the option: {line}\n{log}"
        );
        assert!(!log.contains("worker started"), "{option}: a worker was started\n{log}");
    }
}
