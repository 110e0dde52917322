//! The one ferrule spawner of the test harness: starts the real `ferrule` binary for tier-3 tests with a temp
//! socket (or one the test bound itself), a captured log, a bounded readiness wait and cleanup on drop, or runs it
//! once to its exit (`--check-config`, a refused start).

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::RawFd;
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
/// Step of the poll for a one-shot run's exit: std has no pollable handle for a child's exit.
const EXIT_POLL: Duration = Duration::from_millis(20);

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
    /// A listening socket the test bound itself, handed over as a supervisor would; the address is read back
    /// from the log.
    Inherited { listener: RawFd, how: Inherit },
}

/// How a test hands ferrule a listening socket it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inherit {
    /// systemd socket activation: the socket at descriptor 3, `LISTEN_FDS=1` and `LISTEN_PID` = ferrule's pid.
    Systemd,
    /// `--socket fd://N`: the socket at descriptor N.
    FdArg(RawFd),
}

/// Builds the command line for one ferrule process.
pub struct FerruleBuilder {
    /// The `ferrule` command to run; `None`: the test venv's ([`bin`]).
    program: Option<PathBuf>,
    /// The APP argument, last on the command line; `None` for a run whose arguments say it all.
    app: Option<OsString>,
    args: Vec<OsString>,
    envs: Vec<(String, OsString)>,
    current_dir: Option<PathBuf>,
    socket: SocketChoice,
    tempdir: TempDir,
    /// RLIMIT_NOFILE (soft, hard) for the process, set between fork and exec.
    nofile: Option<(u64, u64)>,
    /// `cgroup.procs` files the process moves itself into between fork and exec.
    cgroups: Vec<std::ffi::CString>,
    /// The network namespace the process runs in (joined between fork and exec), held open until then.
    netns: Option<std::fs::File>,
}

impl FerruleBuilder {
    /// `app` is the APP argument, e.g. `wsgi_cases:application`.
    pub fn new(app: &str) -> Self {
        FerruleBuilder {
            app: Some(app.into()),
            socket: SocketChoice::UnixInTempdir,
            ..FerruleBuilder::without_app()
        }
    }

    /// A command line of only what `arg` adds: no APP argument and no `--socket` of ours (`--check-config` with a
    /// config file, `--version`).
    pub fn without_app() -> Self {
        FerruleBuilder {
            program: None,
            app: None,
            args: Vec::new(),
            envs: Vec::new(),
            current_dir: None,
            socket: SocketChoice::FromArgs,
            tempdir: temp_dir(),
            nofile: None,
            cgroups: Vec::new(),
            netns: None,
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

    pub fn args<A: Into<OsString>>(mut self, args: impl IntoIterator<Item = A>) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, k: &str, v: impl Into<OsString>) -> Self {
        self.envs.push((k.to_owned(), v.into()));
        self
    }

    pub fn envs(mut self, vars: &[(&str, &str)]) -> Self {
        self.envs
            .extend(vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).into())));
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

    /// Hands ferrule `listener`, a listening socket the test owns, placed as `how` says (as systemd or another
    /// supervisor would); no `--socket` of ours. The descriptor must stay open until the process has started.
    pub fn inherit_socket(mut self, listener: RawFd, how: Inherit) -> Self {
        self.socket = SocketChoice::Inherited { listener, how };
        self
    }

    /// Starts the process with this descriptor limit (soft, hard), as `prlimit --nofile=SOFT:HARD` would;
    /// raising the hard limit needs root.
    pub fn nofile_limit(mut self, soft: u64, hard: u64) -> Self {
        self.nofile = Some((soft, hard));
        self
    }

    /// Starts the process in the cgroup of this `cgroup.procs` file (repeatable, one per v1 hierarchy): it
    /// moves itself there before exec, so the master and every worker live in it. Needs root.
    pub fn in_cgroup(mut self, procs: &Path) -> Self {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(procs.as_os_str().as_bytes()).expect("a cgroup path has no NUL");
        self.cgroups.push(path);
        self
    }

    /// Runs the process in the network namespace whose file is `path` (`/run/netns/NAME`), as
    /// `ip netns exec NAME` would, but with ferrule itself as the child (its pid is the master's).
    pub fn netns(mut self, path: impl AsRef<Path>) -> Self {
        let path = path.as_ref();
        let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        self.netns = Some(file);
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

    /// Runs ferrule to its exit, as a one-shot command (`--check-config`, a refused config); returns its status
    /// and what it wrote to stdout and to stderr, each on its own. Kills it and panics if it is still running
    /// after `timeout`.
    pub fn run(self, timeout: Duration) -> Output {
        let command_line = self.describe();
        let mut cmd = self.command();
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {command_line}: {e}"));
        let read_all = |mut pipe: Box<dyn Read + Send>| {
            thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = pipe.read_to_end(&mut buf);
                String::from_utf8_lossy(&buf).into_owned()
            })
        };
        let stdout = read_all(Box::new(child.stdout.take().expect("stdout is piped")));
        let stderr = read_all(Box::new(child.stderr.take().expect("stderr is piped")));
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().expect("waitpid") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("ferrule did not exit within {timeout:?}\ncommand: {command_line}");
            }
            thread::sleep(EXIT_POLL);
        };
        Output {
            status,
            stdout: stdout.join().expect("stdout reader"),
            stderr: stderr.join().expect("stderr reader"),
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
            SocketChoice::Inherited {
                how: Inherit::FdArg(n), ..
            } => Some(format!("fd://{n}").into()),
            SocketChoice::FromArgs
            | SocketChoice::Inherited {
                how: Inherit::Systemd, ..
            } => None,
        };
        match spec {
            Some(spec) => vec!["--socket".into(), spec],
            None => Vec::new(),
        }
    }

    fn is_systemd(&self) -> bool {
        matches!(
            self.socket,
            SocketChoice::Inherited {
                how: Inherit::Systemd,
                ..
            }
        )
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.is_systemd() {
            parts.push("LISTEN_FDS=1 LISTEN_PID=<its pid>".to_owned());
        }
        parts.push(self.program.clone().unwrap_or_else(bin).display().to_string());
        parts.extend(self.socket_args().iter().map(|a| a.to_string_lossy().into_owned()));
        parts.extend(self.args.iter().map(|a| a.to_string_lossy().into_owned()));
        parts.extend(self.app.iter().map(|a| a.to_string_lossy().into_owned()));
        parts.join(" ")
    }

    /// The command line and environment, without stdio.
    fn command(&self) -> Command {
        let program = self.program.clone().unwrap_or_else(bin);
        let mut cmd = if self.is_systemd() {
            // LISTEN_PID must be the pid of the process that reads it. `$$` is the shell's pid, which `exec`
            // hands on to ferrule; setting it from a pre_exec hook would need setenv, which is not
            // async-signal-safe in a multi-threaded parent.
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(r#"LISTEN_PID=$$ exec "$0" "$@""#).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        cmd.args(self.socket_args()).args(&self.args).args(&self.app);
        // Hermetic by default: the developer's shell must not change what the tests see (an exported FERRULE_*
        // option would change a precedence test, an inherited LISTEN_FDS the sockets).
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("FERRULE_") {
                cmd.env_remove(&key);
            }
        }
        cmd.env_remove("RUST_LOG")
            .env_remove("VIRTUAL_ENV")
            .env_remove("PYTHONPATH")
            .env_remove("LISTEN_PID");
        if self.is_systemd() {
            cmd.env("LISTEN_FDS", "1");
        } else {
            cmd.env_remove("LISTEN_FDS");
        }
        // Keep tests/apps free of __pycache__ litter.
        cmd.env("PYTHONDONTWRITEBYTECODE", "1");
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        if let Some(dir) = &self.current_dir {
            cmd.current_dir(dir);
        }
        if let SocketChoice::Inherited { listener, how } = self.socket {
            let target: RawFd = match how {
                Inherit::Systemd => 3,
                Inherit::FdArg(n) => n,
            };
            // SAFETY: runs in the child between fork and exec, and calls only dup2 and fcntl, which are
            // async-signal-safe; `listener` and `target` are plain integers copied in before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    if listener == target {
                        // dup2 onto itself keeps CLOEXEC: clear it so the descriptor survives exec.
                        let flags = libc::fcntl(target, libc::F_GETFD);
                        if flags < 0 || libc::fcntl(target, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                            return Err(io::Error::last_os_error());
                        }
                    } else if libc::dup2(listener, target) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        for procs in self.cgroups.clone() {
            // SAFETY: runs between fork and exec and only calls open, write and close, which are
            // async-signal-safe, on a path made before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // "0": the process that writes it.
                    let written = libc::write(fd, b"0\n".as_ptr().cast(), 2);
                    let error = io::Error::last_os_error();
                    libc::close(fd);
                    if written != 2 {
                        return Err(error);
                    }
                    Ok(())
                });
            }
        }
        if let Some(netns) = &self.netns {
            let fd = std::os::fd::AsRawFd::as_raw_fd(netns);
            // SAFETY: runs between fork and exec and only calls setns(2), which is async-signal-safe; `fd` is a
            // plain integer for a file the builder holds open until the process has started.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
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
        cmd
    }

    fn start(self) -> (Child, Arc<LogBuf>, TempDir) {
        let mut cmd = self.command();
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}", self.describe()));
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

    /// Waits until the log after `offset` holds `n` occurrences of `needle` or `timeout` passes; returns how many
    /// there were. Waits on the log's notifications (one occurrence at a time), not on a timer.
    pub fn wait_for_count_since(&self, offset: usize, needle: &str, n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut from = offset;
        let mut seen = 0;
        while seen < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if !self.wait_for_log_since(from, needle, left) {
                break;
            }
            // The log is plain text (no colours when stderr is a pipe), so positions in `log_since` are byte
            // offsets into the log.
            let tail = self.log_since(from);
            let Some(at) = tail.find(needle) else { break };
            from += at + needle.len();
            seen += 1;
        }
        seen
    }

    /// Waits (at most 30 s, as for `ready`) for the master's line saying all `workers` first-generation workers
    /// are ready, in the text or the JSON log format; panics with the log if it does not come.
    pub fn wait_master_ready(&self, workers: usize) {
        let text = format!("ready workers={workers} ");
        let json = format!("\"message\":\"ready\",\"workers\":{workers},");
        let ready = self.log.wait_until(READY_TIMEOUT, |bytes, _| {
            let log = strip_ansi(&String::from_utf8_lossy(bytes));
            log.contains(&text) || log.contains(&json)
        });
        assert!(
            ready,
            "not all {workers} workers became ready within {READY_TIMEOUT:?} (no {text:?} line)\n--- log ---\n{}",
            self.log()
        );
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

    /// Stops the process the fast way and waits up to `timeout` for it: SIGINT makes a master stop its workers at
    /// once, so they are reaped with it instead of being left to notice that their master is gone (as after the
    /// SIGKILL of a drop). Does nothing once the process has exited.
    pub fn stop_fast(&mut self, timeout: Duration) {
        if self.wait_exit(Duration::ZERO).is_none() {
            let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits in pid_t");
            // SAFETY: kill(2) on our own unreaped child. The result is not checked: this runs in drops, also
            // while a failed test unwinds, where a second panic would abort.
            unsafe { libc::kill(pid, libc::SIGINT) };
            let _ = self.wait_exit(timeout);
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

/// What a one-shot run ([`FerruleBuilder::run`]) left behind.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Both streams, for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "exit: {:?}\n--- stdout ---\n{}--- stderr ---\n{}--- end ---",
            self.status, self.stdout, self.stderr
        )
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

/// A temp dir under /tmp rather than $TMPDIR: a Unix socket path in it must fit in sun_path (108 bytes).
pub fn temp_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("ferrule-test-")
        .tempdir_in("/tmp")
        .expect("create temp dir under /tmp")
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
