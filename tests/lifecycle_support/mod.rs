//! Helpers for tests/lifecycle.rs: ferrule with workers behind nginx, the master's log read as events, the
//! worker processes seen in /proc, a load generator run as a second process, and a bare spawner for the tests
//! that hand ferrule an inherited socket.
#![allow(dead_code)] // not every helper is used by every test

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::ferrule::{Ferrule, FerruleBuilder, apps_dir, bin, strip_ansi};
use crate::common::http;
use crate::common::nginx::Nginx;

/// The Python the harness uses (tests/common/venv.rs): the load generator runs on it too.
pub const PYTHON: &str = "python3.11";

/// Starting every worker imports CPython once per process; on a loaded 2-core box that takes a while.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fast stop (SIGINT) at the end of a test may take before the harness kills the master.
const FAST_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// `lifecycle_app:application` from tests/apps with `--workers N`.
pub fn lifecycle_app(workers: u32) -> FerruleBuilder {
    FerruleBuilder::new("lifecycle_app:application")
        .arg("--pythonpath")
        .arg(apps_dir())
        .arg("--workers")
        .arg(workers.to_string())
}

/// ferrule (master and workers) with a real nginx in front of it. Dropping it stops the master fast (so the
/// workers are reaped too, not left to notice the master is gone), then nginx.
pub struct Stack {
    pub ferrule: Ferrule,
    pub nginx: Nginx,
}

impl Stack {
    /// Spawns ferrule, waits for the master's `ready workers=N` (all first-generation workers up), starts nginx.
    pub fn start(builder: FerruleBuilder, workers: usize) -> Stack {
        let ferrule = builder.spawn();
        wait_master_ready(&ferrule, workers);
        let nginx = Nginx::start(&ferrule.addr.nginx_upstream(), "");
        Stack { ferrule, nginx }
    }

    pub fn port(&self) -> u16 {
        self.nginx.port()
    }

    pub fn master_pid(&self) -> u32 {
        self.ferrule.pid()
    }

    pub fn get(&self, path: &str) -> http::Response {
        http::get(self.port(), path)
    }

    /// GET /pid through nginx; panics (with the log) unless it is a 200 with a pid.
    pub fn served_pid(&self) -> u32 {
        let r = self.get("/pid");
        assert_eq!(r.status, 200, "GET /pid: {}\n{}", r.summary(), self.ferrule.log());
        r.text()
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("GET /pid: {}", r.summary()))
    }

    /// Sequential GET /pid until `pid` answers; false if it did not within `timeout`.
    pub fn wait_served_by(&self, pid: u32, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.served_pid() == pid {
                return true;
            }
        }
        false
    }

    /// Workers the master has now: live (not zombie) child processes of the master pid.
    pub fn worker_pids(&self) -> BTreeSet<u32> {
        live_children(self.master_pid())
    }

    /// Polls /proc (bounded) until the master has exactly `n` live children; returns them.
    pub fn wait_worker_count(&self, n: usize, timeout: Duration) -> BTreeSet<u32> {
        let mut last = BTreeSet::new();
        let ok = poll_until(timeout, || {
            last = self.worker_pids();
            last.len() == n
        });
        assert!(
            ok,
            "expected {n} worker processes, /proc shows {last:?}\n--- log ---\n{}",
            self.ferrule.log()
        );
        last
    }

    /// Waits (bounded) until the log after `offset` holds `n` occurrences of `needle`; panics with the log if not.
    pub fn expect_count_since(&self, offset: usize, needle: &str, n: usize, timeout: Duration) {
        let got = wait_for_count_since(&self.ferrule, offset, needle, n, timeout);
        assert!(
            got >= n,
            "expected {n} × {needle:?} in the log within {timeout:?}, saw {got}\n--- log since offset ---\n{}",
            self.ferrule.log_since(offset)
        );
    }

    /// Sends a signal to the master.
    pub fn signal(&self, sig: i32) {
        self.ferrule.signal(sig);
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if self.ferrule.wait_exit(Duration::ZERO).is_none() {
            // SAFETY: kill(2) on our own unreaped child (the master); SIGINT makes it stop its workers at once.
            unsafe { libc::kill(self.ferrule.pid() as libc::pid_t, libc::SIGINT) };
            self.ferrule.wait_exit(FAST_STOP_TIMEOUT);
        }
    }
}

/// Waits for the master's `ready workers=N` line (all first-generation workers serving).
pub fn wait_master_ready(ferrule: &Ferrule, workers: usize) {
    let needle = format!("ready workers={workers} ");
    assert!(
        ferrule.wait_for_log(&needle, READY_TIMEOUT),
        "no {needle:?} line within {READY_TIMEOUT:?}\n--- log ---\n{}",
        ferrule.log()
    );
}

/// How many times `needle` occurs in `text`.
pub fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

/// Waits until the log after `offset` holds `n` occurrences of `needle` or `timeout` passes; returns how many
/// there were. Waits on the harness's log notifications (one occurrence at a time), not on a timer.
pub fn wait_for_count_since(ferrule: &Ferrule, offset: usize, needle: &str, n: usize, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    let mut from = offset;
    let mut seen = 0;
    while seen < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if !ferrule.wait_for_log_since(from, needle, left) {
            break;
        }
        // The log is plain text (no colours when stderr is a pipe), so positions in `log_since` are byte
        // offsets into the log.
        let tail = ferrule.log_since(from);
        let Some(at) = tail.find(needle) else { break };
        from += at + needle.len();
        seen += 1;
    }
    seen
}

/// The value of `key=` in one tracing line (unquoted; a quoted value keeps its quotes off).
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!(" {key}=");
    let start = line.find(&pat)? + pat.len();
    let rest = &line[start..];
    if let Some(quoted) = rest.strip_prefix('"') {
        return quoted.split('"').next();
    }
    rest.split_whitespace().next()
}

/// A master log line about one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerLine {
    pub id: u32,
    pub pid: u32,
    pub generation: Option<u32>,
}

/// Every master line containing `message` (e.g. "worker started", "worker ready"), with its worker id and pid.
pub fn worker_lines(log: &str, message: &str) -> Vec<WorkerLine> {
    log.lines()
        .filter(|l| l.contains("ferrule::master") && l.contains(&format!("{message} worker=")))
        .filter_map(|l| {
            Some(WorkerLine {
                id: field(l, "worker")?.parse().ok()?,
                pid: field(l, "pid")?.parse().ok()?,
                generation: field(l, "generation").and_then(|g| g.parse().ok()),
            })
        })
        .collect()
}

pub use crate::common::procs::{live_children, poll_until};

/// Resident memory of a process in MiB, from /proc/PID/status.
pub fn rss_mib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Whether a process exists (a zombie counts as gone).
pub fn alive(pid: u32) -> bool {
    crate::common::procs::state_and_ppid(pid).is_some_and(|(state, _)| state != 'Z')
}

// --- load generator ----------------------------------------------------------------------------------------

/// tests/apps/load.py running as its own process.
pub struct Load {
    child: Option<Child>,
    output: mpsc::Receiver<String>,
    describe: String,
}

/// What load.py reported.
#[derive(Debug, Clone)]
pub struct LoadResult {
    pub ok: u64,
    pub failed: u64,
    pub statuses: BTreeMap<String, u64>,
    pub errors: Vec<String>,
    /// Distinct response bodies and how often each came back.
    pub bodies: BTreeMap<String, u64>,
    pub raw: String,
}

impl LoadResult {
    /// The bodies that are pids (routes /pid, /sleep and /grow answer with the worker's pid).
    pub fn pids(&self) -> BTreeSet<u32> {
        self.bodies.keys().filter_map(|b| b.trim().parse().ok()).collect()
    }
}

impl Load {
    /// Starts `load.py PORT PATH TOTAL CONCURRENCY`.
    pub fn start(port: u16, path: &str, total: u32, concurrency: u32) -> Load {
        let script = apps_dir().join("load.py");
        let describe = format!("{PYTHON} {} {port} {path} {total} {concurrency}", script.display());
        let mut child = Command::new(PYTHON)
            .arg(&script)
            .arg(port.to_string())
            .arg(path)
            .arg(total.to_string())
            .arg(concurrency.to_string())
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {describe}: {e}"));
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let (tx, output) = mpsc::channel();
        // Both pipes are read to EOF off the test thread, so neither can fill up and block load.py.
        thread::spawn(move || {
            let err = thread::spawn(move || {
                let mut s = String::new();
                let _ = stderr.read_to_string(&mut s);
                s
            });
            let mut out = String::new();
            let _ = stdout.read_to_string(&mut out);
            let err = err.join().unwrap_or_default();
            let _ = tx.send(if err.is_empty() {
                out
            } else {
                format!("{out}\n--- load.py stderr ---\n{err}")
            });
        });
        Load {
            child: Some(child),
            output,
            describe,
        }
    }

    /// Whether load.py is still sending requests.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Waits (bounded) for load.py to finish and parses its JSON line; panics if it hangs or prints nonsense.
    pub fn finish(mut self, timeout: Duration) -> LoadResult {
        let text = match self.output.recv_timeout(timeout) {
            Ok(text) => text,
            Err(_) => panic!("{} did not finish within {timeout:?}", self.describe),
        };
        let mut child = self.child.take().expect("finish is called once");
        let status = child.wait().expect("reap load.py");
        assert!(status.success(), "{} failed ({status}):\n{text}", self.describe);
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with('{'))
            .unwrap_or_else(|| panic!("{} printed no JSON line:\n{text}", self.describe));
        let value = json::parse(line).unwrap_or_else(|e| panic!("{}: bad JSON ({e}): {line}", self.describe));
        let int = |k: &str| {
            value
                .get(k)
                .and_then(json::Value::as_u64)
                .unwrap_or_else(|| panic!("no {k:?} in {line}"))
        };
        let map = |k: &str| -> BTreeMap<String, u64> {
            match value.get(k) {
                Some(json::Value::Object(m)) => m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_u64()?))).collect(),
                _ => panic!("no object {k:?} in {line}"),
            }
        };
        let errors = match value.get("errors") {
            Some(json::Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    json::Value::String(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .collect(),
            _ => panic!("no array \"errors\" in {line}"),
        };
        LoadResult {
            ok: int("ok"),
            failed: int("failed"),
            statuses: map("statuses"),
            errors,
            bodies: map("bodies"),
            raw: line.to_owned(),
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Just enough JSON to read load.py's one line: no dependency for the sake of one flat object.
pub mod json {
    use std::collections::BTreeMap;

    #[derive(Debug, Clone, PartialEq)]
    pub enum Value {
        Null,
        Bool(bool),
        Number(f64),
        String(String),
        Array(Vec<Value>),
        Object(BTreeMap<String, Value>),
    }

    impl Value {
        pub fn get(&self, key: &str) -> Option<&Value> {
            match self {
                Value::Object(m) => m.get(key),
                _ => None,
            }
        }

        pub fn as_u64(&self) -> Option<u64> {
            match self {
                Value::Number(n) if *n >= 0.0 && n.fract() == 0.0 => Some(*n as u64),
                _ => None,
            }
        }

        pub fn as_bool(&self) -> Option<bool> {
            match self {
                Value::Bool(b) => Some(*b),
                _ => None,
            }
        }
    }

    pub fn parse(text: &str) -> Result<Value, String> {
        let mut p = Parser {
            s: text.as_bytes(),
            i: 0,
        };
        let v = p.value()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(format!("trailing data at byte {}", p.i));
        }
        Ok(v)
    }

    struct Parser<'a> {
        s: &'a [u8],
        i: usize,
    }

    impl Parser<'_> {
        fn ws(&mut self) {
            while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
                self.i += 1;
            }
        }

        fn eat(&mut self, b: u8) -> Result<(), String> {
            self.ws();
            if self.s.get(self.i) == Some(&b) {
                self.i += 1;
                Ok(())
            } else {
                Err(format!("expected {:?} at byte {}", b as char, self.i))
            }
        }

        fn literal(&mut self, word: &str, v: Value) -> Result<Value, String> {
            if self.s[self.i..].starts_with(word.as_bytes()) {
                self.i += word.len();
                Ok(v)
            } else {
                Err(format!("bad literal at byte {}", self.i))
            }
        }

        fn value(&mut self) -> Result<Value, String> {
            self.ws();
            match self.s.get(self.i) {
                Some(b'{') => {
                    self.i += 1;
                    let mut m = BTreeMap::new();
                    self.ws();
                    if self.s.get(self.i) == Some(&b'}') {
                        self.i += 1;
                        return Ok(Value::Object(m));
                    }
                    loop {
                        self.ws();
                        let k = self.string()?;
                        self.eat(b':')?;
                        let v = self.value()?;
                        m.insert(k, v);
                        self.ws();
                        match self.s.get(self.i) {
                            Some(b',') => self.i += 1,
                            Some(b'}') => {
                                self.i += 1;
                                return Ok(Value::Object(m));
                            }
                            _ => return Err(format!("bad object at byte {}", self.i)),
                        }
                    }
                }
                Some(b'[') => {
                    self.i += 1;
                    let mut a = Vec::new();
                    self.ws();
                    if self.s.get(self.i) == Some(&b']') {
                        self.i += 1;
                        return Ok(Value::Array(a));
                    }
                    loop {
                        a.push(self.value()?);
                        self.ws();
                        match self.s.get(self.i) {
                            Some(b',') => self.i += 1,
                            Some(b']') => {
                                self.i += 1;
                                return Ok(Value::Array(a));
                            }
                            _ => return Err(format!("bad array at byte {}", self.i)),
                        }
                    }
                }
                Some(b'"') => Ok(Value::String(self.string()?)),
                Some(b't') => self.literal("true", Value::Bool(true)),
                Some(b'f') => self.literal("false", Value::Bool(false)),
                Some(b'n') => self.literal("null", Value::Null),
                Some(_) => {
                    let start = self.i;
                    while self.i < self.s.len()
                        && matches!(self.s[self.i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                    {
                        self.i += 1;
                    }
                    std::str::from_utf8(&self.s[start..self.i])
                        .ok()
                        .and_then(|t| t.parse().ok())
                        .map(Value::Number)
                        .ok_or_else(|| format!("bad number at byte {start}"))
                }
                None => Err("unexpected end".into()),
            }
        }

        fn string(&mut self) -> Result<String, String> {
            self.eat(b'"')?;
            let mut out: Vec<u8> = Vec::new();
            loop {
                let Some(&b) = self.s.get(self.i) else {
                    return Err("unterminated string".into());
                };
                self.i += 1;
                match b {
                    b'"' => return String::from_utf8(out).map_err(|e| e.to_string()),
                    b'\\' => {
                        let Some(&e) = self.s.get(self.i) else {
                            return Err("unterminated escape".into());
                        };
                        self.i += 1;
                        let c = match e {
                            b'n' => '\n',
                            b't' => '\t',
                            b'r' => '\r',
                            b'b' => '\u{8}',
                            b'f' => '\u{c}',
                            b'u' => {
                                let hex = self
                                    .s
                                    .get(self.i..self.i + 4)
                                    .and_then(|h| std::str::from_utf8(h).ok())
                                    .and_then(|h| u32::from_str_radix(h, 16).ok())
                                    .ok_or("bad \\u escape")?;
                                self.i += 4;
                                // Surrogate pairs do not occur in load.py's output (ASCII pids and messages).
                                char::from_u32(hex).unwrap_or('\u{fffd}')
                            }
                            other => other as char,
                        };
                        let mut buf = [0u8; 4];
                        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                    _ => out.push(b),
                }
            }
        }
    }
}

// --- a bare spawner, for sockets inherited by descriptor ---------------------------------------------------

/// How the test hands a listening socket to ferrule.
pub enum Inherit {
    /// systemd socket activation: the socket at descriptor 3, `LISTEN_FDS=1` and `LISTEN_PID` = ferrule's pid.
    Systemd,
    /// `--socket fd://N`: the socket at descriptor N.
    FdArg(RawFd),
}

/// A ferrule started by the test itself (the harness cannot place a descriptor in the child), with its log.
pub struct Bare {
    child: Child,
    log: Arc<(Mutex<Vec<u8>>, Condvar)>,
    exit: Option<ExitStatus>,
}

impl Bare {
    /// Starts ferrule with `listener` (a listening socket the test owns) placed per `how`, plus `args` and `app`.
    pub fn spawn(listener: RawFd, how: Inherit, args: &[&str], app: &str) -> Bare {
        let target: RawFd = match how {
            Inherit::Systemd => 3,
            Inherit::FdArg(n) => n,
        };
        let mut cmd = match how {
            Inherit::Systemd => {
                // LISTEN_PID must be the pid of the process that reads it. `$$` is the shell's pid, which `exec`
                // hands on to ferrule; setting it from a pre_exec hook would need setenv, which is not
                // async-signal-safe in a multi-threaded parent.
                let mut c = Command::new("/bin/sh");
                c.arg("-c")
                    .arg(r#"LISTEN_PID=$$ exec "$0" "$@""#)
                    .arg(bin())
                    .env("LISTEN_FDS", "1");
                c
            }
            Inherit::FdArg(n) => {
                let mut c = Command::new(bin());
                c.arg("--socket").arg(format!("fd://{n}"));
                c
            }
        };
        cmd.args(args)
            .arg(app)
            .env_remove("RUST_LOG")
            .env_remove("VIRTUAL_ENV")
            .env_remove("PYTHONPATH")
            .env_remove("LISTEN_PID")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if matches!(how, Inherit::FdArg(_)) {
            cmd.env_remove("LISTEN_FDS");
        }
        // SAFETY: runs in the child between fork and exec, and calls only dup2 and fcntl, which are
        // async-signal-safe; `listener` and `target` are plain integers copied in before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if listener == target {
                    // dup2 onto itself keeps CLOEXEC: clear it so the descriptor survives exec.
                    let flags = libc::fcntl(target, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(target, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(listener, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn ferrule: {e}"));
        let log = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        for pipe in [
            Box::new(child.stdout.take().expect("piped")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("piped")),
        ] {
            let log = Arc::clone(&log);
            thread::spawn(move || {
                let mut pipe = pipe;
                let mut buf = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    log.0.lock().unwrap().extend_from_slice(&buf[..n]);
                    log.1.notify_all();
                }
            });
        }
        Bare { child, log, exit: None }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        strip_ansi(&String::from_utf8_lossy(&self.log.0.lock().unwrap()))
    }

    /// Waits (bounded) until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut bytes = self.log.0.lock().unwrap();
        loop {
            if strip_ansi(&String::from_utf8_lossy(&bytes)).contains(needle) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            bytes = self.log.1.wait_timeout(bytes, deadline - now).unwrap().0;
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child, not reaped before `wait_exit`/drop, so the pid is still ours.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exit.is_none() {
            poll_until(timeout, || {
                self.exit = self.child.try_wait().ok().flatten();
                self.exit.is_some()
            });
        }
        self.exit
    }
}

impl Drop for Bare {
    fn drop(&mut self) {
        if self.exit.is_none() {
            // SAFETY: as in `signal`: our own unreaped child. SIGINT stops the workers too; SIGKILL if it hangs.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
            if self.wait_exit(FAST_STOP_TIMEOUT).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        if thread::panicking() {
            eprintln!("--- ferrule log ---\n{}--- end of ferrule log ---", self.log());
        }
    }
}

/// Writes `lifecycle_version.py` (imported by lifecycle_app at import time) into `dir`.
pub fn write_version_module(dir: &Path, version: &str) -> PathBuf {
    let path = dir.join("lifecycle_version.py");
    std::fs::write(&path, format!("VERSION = {version:?}\n")).expect("write lifecycle_version.py");
    path
}
