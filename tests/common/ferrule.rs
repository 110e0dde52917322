//! Starts the real `ferrule` binary for tier-3 tests: a temp socket, a captured log, a bounded readiness wait, cleanup on drop.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long `spawn` waits for the `ready` line: importing CPython on a loaded 2-core CI box can be slow.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Read/write timeouts on every test connection, so a server that hangs fails the test instead of CI.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a running ferrule listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Addr {
    /// The address in the form nginx's `uwsgi_pass` takes.
    pub fn nginx_upstream(&self) -> String {
        match self {
            Addr::Unix(path) => format!("unix:{}", path.display()),
            Addr::Tcp(addr) => addr.to_string(),
        }
    }

    /// The address in the form ferrule's `--socket` takes.
    pub fn socket_arg(&self) -> String {
        self.nginx_upstream()
    }
}

enum SocketChoice {
    /// `unix:<tempdir>/ferrule.sock`
    UnixInTempdir,
    /// `unix:<path>` chosen by the test (stale or shared socket files).
    UnixAt(PathBuf),
    /// `127.0.0.1:0`, the real port read back from the log.
    Tcp,
    /// A `--socket` value written by the test; the address is read back from the first `listening` line.
    Spec(String),
    /// The test passes its own `--socket` options through `arg`; the address is read back from the log.
    FromArgs,
}

/// Builds the command line for one ferrule process.
pub struct FerruleBuilder {
    /// The `ferrule` command to run; `None`: the test venv's ([`bin`]).
    program: Option<PathBuf>,
    app: OsString,
    args: Vec<OsString>,
    envs: Vec<(String, OsString)>,
    current_dir: Option<PathBuf>,
    socket: SocketChoice,
    tempdir: TempDir,
    /// RLIMIT_NOFILE (soft, hard) for the process, set between fork and exec.
    nofile: Option<(u64, u64)>,
}

impl FerruleBuilder {
    /// `app` is the APP argument, e.g. `wsgi_cases:application`.
    pub fn new(app: &str) -> Self {
        // Under /tmp rather than $TMPDIR: a Unix socket path must fit in sun_path (108 bytes).
        let tempdir = tempfile::Builder::new()
            .prefix("ferrule-test-")
            .tempdir_in("/tmp")
            .expect("create temp dir under /tmp");
        FerruleBuilder {
            program: None,
            app: app.into(),
            args: Vec::new(),
            envs: Vec::new(),
            current_dir: None,
            socket: SocketChoice::UnixInTempdir,
            tempdir,
            nofile: None,
        }
    }

    /// Runs this `ferrule` command (another venv's) instead of the test venv's.
    pub fn program(mut self, path: impl Into<PathBuf>) -> Self {
        self.program = Some(path.into());
        self
    }

    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    pub fn env(mut self, k: &str, v: impl Into<OsString>) -> Self {
        self.envs.push((k.to_owned(), v.into()));
        self
    }

    pub fn current_dir(mut self, d: impl Into<PathBuf>) -> Self {
        self.current_dir = Some(d.into());
        self
    }

    /// Listen on `unix:<tempdir>/ferrule.sock` (the default).
    pub fn unix(mut self) -> Self {
        self.socket = SocketChoice::UnixInTempdir;
        self
    }

    /// Listen on a Unix socket at a path the test chose.
    pub fn unix_at(mut self, path: impl Into<PathBuf>) -> Self {
        self.socket = SocketChoice::UnixAt(path.into());
        self
    }

    /// Listen on `127.0.0.1:0`; the real port comes from the `listening address=` log line.
    pub fn tcp(mut self) -> Self {
        self.socket = SocketChoice::Tcp;
        self
    }

    /// Pass `--socket <spec>` verbatim; `addr` is read back from the first `listening` log line.
    pub fn socket(mut self, spec: &str) -> Self {
        self.socket = SocketChoice::Spec(spec.to_owned());
        self
    }

    /// Add no `--socket` of ours: the test passes its own through `arg`.
    pub fn no_default_socket(mut self) -> Self {
        self.socket = SocketChoice::FromArgs;
        self
    }

    /// Starts the process with this descriptor limit (soft, hard), as `prlimit --nofile=SOFT:HARD` would;
    /// raising the hard limit needs root.
    pub fn nofile_limit(mut self, soft: u64, hard: u64) -> Self {
        self.nofile = Some((soft, hard));
        self
    }

    /// The temp dir the process will own; files a test puts here live as long as the `Ferrule`.
    pub fn tempdir(&self) -> &Path {
        self.tempdir.path()
    }

    /// Starts ferrule and waits (at most 30 s) for its `ready` line; panics with the whole log otherwise.
    pub fn spawn(self) -> Ferrule {
        let unix_path = match &self.socket {
            SocketChoice::UnixInTempdir => Some(self.tempdir.path().join("ferrule.sock")),
            SocketChoice::UnixAt(p) => Some(p.clone()),
            _ => None,
        };
        let wants_tcp = matches!(self.socket, SocketChoice::Tcp);
        let command_line = self.describe();
        let (child, log, tempdir) = self.start();
        let mut ferrule = Ferrule {
            addr: Addr::Tcp(SocketAddr::from(([127, 0, 0, 1], 0))),
            child,
            tempdir,
            log,
            exit: None,
        };
        let ready = ferrule.log.wait_until(READY_TIMEOUT, |bytes, open| {
            !open || strip_ansi(&String::from_utf8_lossy(bytes)).lines().any(is_ready_line)
        });
        let text = ferrule.log();
        if !ready || !text.lines().any(is_ready_line) {
            let status = ferrule.kill_and_reap();
            panic!(
                "ferrule did not log `ready` within {READY_TIMEOUT:?} (exit: {status:?})\ncommand: {command_line}\n--- log ---\n{text}--- end of log ---"
            );
        }
        let listening = listening_addrs(&text);
        ferrule.addr = if let Some(path) = unix_path {
            Addr::Unix(path)
        } else if wants_tcp {
            match listening.iter().find(|a| matches!(a, Addr::Tcp(_))) {
                Some(a) => a.clone(),
                None => panic!("no `listening address=<ip>:<port>` line in the log\n--- log ---\n{text}"),
            }
        } else {
            match listening.first() {
                Some(a) => a.clone(),
                None => panic!("no `listening address=` line in the log\n--- log ---\n{text}"),
            }
        };
        ferrule
    }

    /// Starts ferrule expecting it to exit on its own (bad options or app); returns its status and log.
    /// Panics with the log if it is still running after `timeout`.
    pub fn spawn_expect_exit(self, timeout: Duration) -> (ExitStatus, String) {
        let command_line = self.describe();
        let (child, log, tempdir) = self.start();
        let mut ferrule = Ferrule {
            addr: Addr::Tcp(SocketAddr::from(([127, 0, 0, 1], 0))),
            child,
            tempdir,
            log,
            exit: None,
        };
        match ferrule.wait_exit(timeout) {
            Some(status) => {
                // The pipes close when the process is gone; wait (bounded) so the log is complete.
                ferrule.log.wait_until(Duration::from_secs(5), |_, open| !open);
                (status, ferrule.log())
            }
            None => {
                let text = ferrule.log();
                ferrule.kill_and_reap();
                panic!(
                    "ferrule was expected to exit within {timeout:?} but kept running\ncommand: {command_line}\n--- log ---\n{text}--- end of log ---"
                );
            }
        }
    }

    fn socket_args(&self) -> Vec<OsString> {
        let spec: Option<OsString> = match &self.socket {
            SocketChoice::UnixInTempdir => {
                let mut s = OsString::from("unix:");
                s.push(self.tempdir.path().join("ferrule.sock"));
                Some(s)
            }
            SocketChoice::UnixAt(p) => {
                let mut s = OsString::from("unix:");
                s.push(p);
                Some(s)
            }
            SocketChoice::Tcp => Some("127.0.0.1:0".into()),
            SocketChoice::Spec(spec) => Some(spec.into()),
            SocketChoice::FromArgs => None,
        };
        match spec {
            Some(spec) => vec!["--socket".into(), spec],
            None => Vec::new(),
        }
    }

    fn describe(&self) -> String {
        let mut parts = vec![self.program.clone().unwrap_or_else(bin).display().to_string()];
        parts.extend(self.socket_args().iter().map(|a| a.to_string_lossy().into_owned()));
        parts.extend(self.args.iter().map(|a| a.to_string_lossy().into_owned()));
        parts.push(self.app.to_string_lossy().into_owned());
        parts.join(" ")
    }

    fn start(self) -> (Child, Arc<LogBuf>, TempDir) {
        let mut cmd = Command::new(self.program.clone().unwrap_or_else(bin));
        cmd.args(self.socket_args()).args(&self.args).arg(&self.app);
        // Hermetic by default: the developer's shell must not change what the tests see.
        cmd.env_remove("RUST_LOG")
            .env_remove("VIRTUAL_ENV")
            .env_remove("PYTHONPATH");
        // Keep tests/apps free of __pycache__ litter.
        cmd.env("PYTHONDONTWRITEBYTECODE", "1");
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        if let Some(dir) = &self.current_dir {
            cmd.current_dir(dir);
        }
        if let Some((soft, hard)) = self.nofile {
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            // SAFETY: runs between fork and exec and only calls setrlimit, which is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}", bin().display()));
        let log = Arc::new(LogBuf::new());
        let stdout: ChildStdout = child.stdout.take().expect("stdout is piped");
        let stderr: ChildStderr = child.stderr.take().expect("stderr is piped");
        spawn_reader(stdout, Arc::clone(&log));
        spawn_reader(stderr, Arc::clone(&log));
        (child, log, self.tempdir)
    }
}

/// A running ferrule process; dropping it kills (SIGKILL) and reaps the process and removes its temp dir.
pub struct Ferrule {
    pub addr: Addr,
    child: Child,
    tempdir: TempDir,
    log: Arc<LogBuf>,
    exit: Option<ExitStatus>,
}

impl Ferrule {
    /// Everything written to stdout and stderr so far, ANSI escapes removed.
    pub fn log(&self) -> String {
        strip_ansi(&self.log.text())
    }

    /// The log exactly as written, escapes included (to check that no colours are emitted).
    pub fn raw_log(&self) -> String {
        self.log.text()
    }

    /// A position in the log to pass to `wait_for_log_since`, so a check only sees lines written after it.
    pub fn log_offset(&self) -> usize {
        self.log.len()
    }

    /// The log written after `offset`, ANSI escapes removed.
    pub fn log_since(&self, offset: usize) -> String {
        strip_ansi(&self.log.text_from(offset))
    }

    /// Waits (bounded) until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_for_log_since(0, needle, timeout)
    }

    /// Waits (bounded) until the log written after `offset` contains `needle`.
    pub fn wait_for_log_since(&self, offset: usize, needle: &str, timeout: Duration) -> bool {
        self.log.wait_until(timeout, |bytes, _| {
            let tail = bytes.get(offset..).unwrap_or(&[]);
            strip_ansi(&String::from_utf8_lossy(tail)).contains(needle)
        })
    }

    /// Waits (bounded) until at least one complete new line was logged after `offset`.
    pub fn wait_for_new_line_since(&self, offset: usize, timeout: Duration) -> bool {
        self.wait_for_log_since(offset, "\n", timeout)
    }

    /// A fresh connection to the listener, with 30 s read/write timeouts.
    pub fn connect(&self) -> Stream {
        let stream = match &self.addr {
            Addr::Unix(path) => UnixStream::connect(path).map(Stream::Unix),
            Addr::Tcp(addr) => TcpStream::connect(addr).map(|s| {
                // Tests that split a request over several writes want each write to leave at once.
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        };
        let stream = stream.unwrap_or_else(|e| panic!("connect to {:?}: {e}\n--- log ---\n{}", self.addr, self.log()));
        stream.set_read_timeout(Some(IO_TIMEOUT));
        stream.set_write_timeout(Some(IO_TIMEOUT));
        stream
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, sig: i32) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits in pid_t");
        // SAFETY: kill(2) on our own child's pid; the child is not reaped until `wait_exit`/drop, so the
        // pid cannot have been reused.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig}): {}", io::Error::last_os_error());
    }

    /// Waits (bounded) for the process to exit; `None` if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exit {
            return Some(status);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.exit = Some(status);
                    return Some(status);
                }
                Ok(None) => {}
                Err(e) => panic!("waitpid: {e}"),
            }
            if Instant::now() >= deadline {
                return None;
            }
            // No pollable handle for a child's exit in std; the pipes closing is the cue we wait on,
            // with a short poll of waitpid as the bound.
            self.log.wait_until(Duration::from_millis(20), |_, open| !open);
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// The temp dir this process owns (its default socket lives here).
    pub fn tempdir(&self) -> &Path {
        self.tempdir.path()
    }

    fn kill_and_reap(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            let _ = self.child.kill();
            self.exit = self.child.wait().ok();
        }
        self.exit
    }
}

impl Drop for Ferrule {
    fn drop(&mut self) {
        let status = self.kill_and_reap();
        if thread::panicking() {
            // The server's side of the story is usually what explains a failed test.
            eprintln!(
                "--- ferrule log ({:?}, exit {:?}, signal {:?}) ---\n{}--- end of ferrule log ---",
                self.addr,
                status.and_then(|s| s.code()),
                status.and_then(|s| s.signal()),
                self.log()
            );
        }
    }
}

/// A client connection over either transport.
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    pub fn is_tcp(&self) -> bool {
        matches!(self, Stream::Tcp(_))
    }

    pub fn set_read_timeout(&self, d: Option<Duration>) {
        match self {
            Stream::Unix(s) => s.set_read_timeout(d),
            Stream::Tcp(s) => s.set_read_timeout(d),
        }
        .expect("set read timeout");
    }

    pub fn set_write_timeout(&self, d: Option<Duration>) {
        match self {
            Stream::Unix(s) => s.set_write_timeout(d),
            Stream::Tcp(s) => s.set_write_timeout(d),
        }
        .expect("set write timeout");
    }

    /// Half-close: the server sees EOF on its read side, we can still read the answer.
    pub fn shutdown_write(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
        };
    }

    /// Close abruptly: on TCP, SO_LINGER 0 turns the close into an RST.
    pub fn abort(self) {
        if let Stream::Tcp(s) = &self {
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            use std::os::fd::AsRawFd;
            // SAFETY: setsockopt on a socket we own, with a correctly sized `linger` value.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
            }
        }
        drop(self);
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

/// `<crate>/tests/apps`, where the test WSGI apps live.
pub fn apps_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("apps")
}

/// The `ferrule` command of the test venv, where the package built from this checkout is installed.
pub fn bin() -> PathBuf {
    super::venv::installed_ferrule()
}

/// Every address named by a `listening address=...` line, in log order.
pub fn listening_addrs(log: &str) -> Vec<Addr> {
    let mut out = Vec::new();
    for line in log.lines().filter(|l| l.contains("listening")) {
        let Some(start) = line.find("address=") else {
            continue;
        };
        let value = line[start + "address=".len()..]
            .split_whitespace()
            .next()
            .unwrap_or("")
            .trim_matches('"');
        if let Some(path) = value.strip_prefix("unix:") {
            out.push(Addr::Unix(PathBuf::from(path)));
        } else if let Ok(addr) = value.parse::<SocketAddr>() {
            out.push(Addr::Tcp(addr));
        }
    }
    out
}

/// A line announcing readiness: the word `ready` on its own (not `already`, not `ready_count`).
fn is_ready_line(line: &str) -> bool {
    line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .any(|word| word == "ready")
}

/// Removes CSI escape sequences (colours), so log checks hold even if colours slip in.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('\u{40}'..='\u{7e}').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The captured output of one process, shared with its reader threads.
struct LogBuf {
    state: Mutex<LogState>,
    changed: Condvar,
}

struct LogState {
    bytes: Vec<u8>,
    open_pipes: u8,
}

impl LogBuf {
    fn new() -> Self {
        LogBuf {
            state: Mutex::new(LogState {
                bytes: Vec::new(),
                open_pipes: 2,
            }),
            changed: Condvar::new(),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.state.lock().unwrap().bytes).into_owned()
    }

    fn text_from(&self, offset: usize) -> String {
        let state = self.state.lock().unwrap();
        String::from_utf8_lossy(state.bytes.get(offset..).unwrap_or(&[])).into_owned()
    }

    fn len(&self) -> usize {
        self.state.lock().unwrap().bytes.len()
    }

    /// Waits until `done(log bytes, any pipe still open)` holds or `timeout` passes; returns whether it held.
    fn wait_until(&self, timeout: Duration, mut done: impl FnMut(&[u8], bool) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().unwrap();
        loop {
            if done(&state.bytes, state.open_pipes > 0) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self.changed.wait_timeout(state, deadline - now).unwrap().0;
        }
    }
}

fn spawn_reader(mut pipe: impl Read + Send + 'static, log: Arc<LogBuf>) {
    thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    log.state.lock().unwrap().bytes.extend_from_slice(&buf[..n]);
                    log.changed.notify_all();
                }
            }
        }
        log.state.lock().unwrap().open_pipes -= 1;
        log.changed.notify_all();
    });
}
