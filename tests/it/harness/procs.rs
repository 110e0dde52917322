//! The process table for the tier-3 tests: a ferrule master's live workers, their resident memory, signals to
//! them, and polling for such state.

use std::collections::BTreeSet;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

/// How often `poll_until` looks again.
pub const POLL: Duration = Duration::from_millis(20);

/// Polls `done` until it holds or `timeout` passes; returns whether it held. Only for state with nothing to
/// wait on (the process table, a metrics page); log lines are waited for through the harness instead.
pub fn poll_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL);
    }
}

/// State and parent of a process, from /proc/PID/stat (the command name may hold spaces and parentheses,
/// so the fields are read after the last `)`).
pub fn state_and_ppid(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Whether every thread of `pid` is stopped (state `T`). kill(SIGSTOP) returns before the stop has reached
/// all threads of a process: the kernel wakes one thread, which then stops the others.
pub fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .all(|tid| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat"))
                .ok()
                .and_then(|stat| Some(stat[stat.rfind(')')? + 1..].split_whitespace().next()?.starts_with('T')))
                .unwrap_or(false)
        })
}

/// Live (not zombie) children of `parent`, from the whole process table.
pub fn live_children(parent: u32) -> BTreeSet<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| state_and_ppid(pid).is_some_and(|(state, ppid)| ppid == parent && state != 'Z'))
        .collect()
}

/// Whether a process exists (a zombie counts as gone).
pub fn alive(pid: u32) -> bool {
    state_and_ppid(pid).is_some_and(|(state, _)| state != 'Z')
}

/// Resident set size of one process in KiB (VmRSS from /proc/PID/status); None once it is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Total resident memory of a master's live workers, in KiB.
pub fn workers_rss_kib(master: u32) -> u64 {
    live_children(master).into_iter().filter_map(rss_kib).sum()
}

/// Sends `sig` to a process the test found among its own server's workers.
pub fn signal(pid: u32, sig: i32) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits in pid_t");
    // SAFETY: kill(2) with a pid taken from the master's live children a moment ago; the master reaps its
    // workers, so the pid stays the worker's until the master sees it exit.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}): {}", std::io::Error::last_os_error());
}

pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "{what} needs root (CI runs the tests as root): run `cargo test` as root"
    );
}

/// uid of a user / gid of a group, from `id`.
pub fn id_of(args: &[&str]) -> u32 {
    let out = Command::new("id").args(args).output().expect("run id");
    assert!(out.status.success(), "id {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("id {args:?}: {out:?}"))
}

/// The (soft, hard) "Max open files" of a process, from /proc/PID/limits.
pub fn nofile_limits(pid: u32) -> (String, String) {
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
