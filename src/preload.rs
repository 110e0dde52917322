//! `--preload`: the zygote. The master starts it the way it starts a worker; it imports the app once, freezes
//! what the import made (`gc.collect()`, `gc.freeze()`), says `ready`, and then forks a worker each time the
//! master asks on the fork channel. Forking it is safe because it has no thread but its main one and no
//! runtime: the workers start theirs after the fork. A replacement worker is a fork of the preloaded state,
//! which takes milliseconds, not a new import.
//!
//! Each worker is forked twice: the zygote forks a short-lived middle process, which forks the worker through
//! `os.fork()` (so Python's fork hooks run in the worker itself) and exits at once. The worker, orphaned, is
//! adopted by the master (a child subreaper), which so sees its exit status as it does for a worker it started
//! itself, and supervises it the same way.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use nix::sys::wait::waitpid;

use crate::app::{self, App};
use crate::config::Config;
use crate::control::{self, EXIT_APP_LOAD, ForkRequest, Handoff, Message};
use crate::listener::BoundSocket;
use crate::worker;

/// Runs the zygote until the master closes the fork channel (then it exits 0), or returns the exit status of a
/// forked worker, in which this function returns too.
pub(crate) fn run(handoff: Handoff, json_logs: bool) -> i32 {
    let Handoff {
        config,
        sockets,
        mut control,
        fork_channel,
        master_pid,
    } = handoff;
    let Some(channel) = fork_channel else {
        tracing::error!("the zygote has no fork channel: this process was not started by a ferrule master");
        return 1;
    };
    let span = tracing::info_span!("zygote", pid = std::process::id()).entered();
    // Without the variable (a master of an older ferrule), the parent now is the best guess.
    die_with_the_master(master_pid.unwrap_or_else(nix::unistd::getppid));
    set_stop_signals(libc::SIG_IGN);
    let threads_before_import = thread_ids();
    // The app's output at import becomes log lines too, without the capture thread a worker uses.
    let loaded = if json_logs {
        worker::log_app_output_of(|| worker::load_for_reload(&config, &mut control))
    } else {
        worker::load_for_reload(&config, &mut control)
    };
    let app = match loaded {
        Ok(app) => app,
        Err(error) => {
            tracing::error!("{error}");
            return EXIT_APP_LOAD;
        }
    };
    if let Err(error) = app.freeze() {
        tracing::warn!(%error, "forking without gc.freeze()");
    }
    warn_about_threads(&threads_before_import);
    tracing::info!("app preloaded; forking the workers from it");
    control.send(&Message::Ready);
    drop(span);

    loop {
        let request = match control::receive_fork_request(&channel) {
            Ok(Some(request)) => request,
            // The master closed the channel: this generation is over (or the master is gone).
            Ok(None) => return 0,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => {
                tracing::error!(%error, "cannot read the master's fork request; the zygote stops");
                return 1;
            }
        };
        match fork_twice(request) {
            Forked::Zygote(result) => {
                if let Err(error) = control::answer_fork(&channel, result) {
                    tracing::error!(%error, "cannot answer the master; the zygote stops");
                    return 1;
                }
            }
            Forked::Worker(request) => {
                // The zygote's lines to the master are the zygote's: the worker has its own.
                drop(channel);
                drop(control);
                return run_worker(app, config, sockets, request, json_logs);
            }
        }
    }
}

/// Where a double fork left this process.
enum Forked {
    /// Still the zygote: the new worker's pid, or why there is none.
    Zygote(Result<u32, String>),
    /// The new worker.
    Worker(ForkRequest),
}

fn fork_twice(request: ForkRequest) -> Forked {
    let (mut read, write) = match std::os::unix::net::UnixStream::pair() {
        Ok(pair) => pair,
        Err(error) => return Forked::Zygote(Err(format!("cannot make a pipe: {error}"))),
    };
    // Both forks are os.fork(): it takes the GIL and Python's fork locks first, so a thread the app started at
    // import (it was warned about) cannot hold them across the fork and leave the child stuck.
    match app::fork_process() {
        Ok(None) => {
            drop(read);
            middle(write, request)
        }
        Ok(Some(child)) => {
            let child = nix::unistd::Pid::from_raw(child as i32);
            drop(write);
            // The middle process writes the worker's pid and exits at once.
            let mut pid = [0u8; 4];
            let got = read.read_exact(&mut pid);
            while let Err(nix::errno::Errno::EINTR) = waitpid(child, None) {}
            // The zygote's copy of the worker's control line.
            drop(request);
            Forked::Zygote(match got.map(|()| u32::from_le_bytes(pid)) {
                Ok(0) | Err(_) => Err("the fork of the worker failed (see the log)".to_owned()),
                Ok(pid) => Ok(pid),
            })
        }
        Err(error) => Forked::Zygote(Err(format!("fork: {error}"))),
    }
}

/// Ties the zygote's life to the master's (`master`, the pid the master passed down): it ignores stop signals
/// (see `set_stop_signals`), so if the master dies, even by SIGKILL, the kernel kills the zygote, wherever it
/// is (a hung import included). Forked processes do not inherit this.
fn die_with_the_master(master: nix::unistd::Pid) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag on this process.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot tie the zygote to the master");
    }
    // The master may have died before the flag was set: then this process was already re-parented, to PID 1
    // or to the nearest subreaper (systemd --user, a container's init), so the parent is compared with the
    // master's pid, not with 1.
    if nix::unistd::getppid() != master {
        // SAFETY: ends this process at once; nothing was started that needs cleaning up.
        unsafe { libc::_exit(1) };
    }
}

/// The middle process: forks the worker the way `os.fork()` does, tells the zygote its pid, and exits, so the
/// worker is orphaned and adopted by the master.
fn middle(mut to_zygote: UnixStream, request: ForkRequest) -> Forked {
    match app::fork_process() {
        Ok(None) => {
            drop(to_zygote);
            Forked::Worker(request)
        }
        Ok(Some(pid)) => {
            let _ = to_zygote.write_all(&pid.to_le_bytes());
            // SAFETY: _exit ends this process at once, without running the Python or Rust clean-up the zygote
            // still needs; nothing here is left to flush.
            unsafe { libc::_exit(0) }
        }
        Err(error) => {
            tracing::error!(%error, "cannot fork a worker");
            let _ = to_zygote.write_all(&0u32.to_le_bytes());
            // SAFETY: as above.
            unsafe { libc::_exit(1) }
        }
    }
}

/// The forked worker: serves the preloaded app with the zygote's settings and sockets.
fn run_worker(
    mut app: App,
    mut config: Config,
    sockets: Vec<BoundSocket>,
    request: ForkRequest,
    json_logs: bool,
) -> i32 {
    let ForkRequest { id, workers, control } = request;
    config.workers.count = workers;
    app.set_multiprocess(workers > 1);
    // The worker stops on signals as any worker does (its runtime installs the handlers).
    set_stop_signals(libc::SIG_DFL);
    let _span = tracing::info_span!("worker", id, pid = std::process::id()).entered();
    if json_logs {
        if let Err(error) = worker::capture_app_output() {
            tracing::warn!(%error, "cannot capture the app's output");
        }
    }
    match worker::serve(app, config, sockets, control) {
        Ok(()) => 0,
        Err(error) => {
            tracing::error!("{error:#}");
            1
        }
    }
}

/// The zygote ignores the stop signals: its life is its fork channel, which the master closes when it stops.
/// A service manager signals the whole group at once (systemd's `KillMode=control-group`), and a zygote killed
/// by that before the master handled its own signal would look like a crash to be repaired.
fn set_stop_signals(disposition: libc::sighandler_t) {
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT, libc::SIGHUP] {
        // SAFETY: setting a signal's disposition to SIG_IGN or SIG_DFL installs no handler code; this process
        // has one thread at this point.
        unsafe { libc::signal(signal, disposition) };
    }
}

/// Threads alive in the zygote after the import (the app's, or a C library's, which `threading` does not
/// list) are not carried into the forked workers, and whatever they were doing is left half done there.
/// Threads that were already there before the import are not the app's: under an emulator such as
/// qemu-user, `/proc/self/task` lists the emulator's own thread from the start, and it is no concern here.
fn warn_about_threads(before_import: &BTreeSet<u32>) {
    let threads = started_since(before_import, &thread_ids());
    if threads > 0 {
        tracing::warn!(
            threads,
            "the app started threads while it was imported; a forked worker gets none of them, and a lock one \
             held stays locked there: start threads after the fork, for example on the first request (see the \
             README's --preload section)"
        );
    }
}

/// The ids of this process's threads; empty if `/proc` cannot be read, which then warns of nothing.
fn thread_ids() -> BTreeSet<u32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return BTreeSet::new();
    };
    tasks
        .filter_map(|task| task.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// How many of the threads in `now` were not in `before`: those started in between.
fn started_since(before: &BTreeSet<u32>, now: &BTreeSet<u32>) -> usize {
    now.difference(before).count()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::{Arc, Barrier};

    use super::{started_since, thread_ids};

    #[test]
    fn a_thread_present_before_the_import_is_not_counted() {
        // The main thread (1) and an emulator's thread (2) were there before; the app started 3.
        let before = BTreeSet::from([1, 2]);
        assert_eq!(started_since(&before, &BTreeSet::from([1, 2])), 0);
        assert_eq!(started_since(&before, &BTreeSet::from([1, 2, 3])), 1);
        // A thread that was there and has ended makes no difference either way.
        assert_eq!(started_since(&before, &BTreeSet::from([1, 3])), 1);
    }

    #[test]
    fn a_thread_started_after_the_snapshot_is_seen_in_proc() {
        let before = thread_ids();
        assert!(!before.is_empty(), "/proc/self/task lists no thread");
        let started = Arc::new(Barrier::new(2));
        let stop = Arc::new(Barrier::new(2));
        let thread = std::thread::spawn({
            let (started, stop) = (Arc::clone(&started), Arc::clone(&stop));
            move || {
                started.wait();
                stop.wait();
            }
        });
        started.wait();
        // Other tests of this binary may start threads too, so at least one, not exactly one.
        let seen = started_since(&before, &thread_ids());
        stop.wait();
        thread.join().expect("the test thread does not panic");
        assert!(seen >= 1, "the spawned thread is not in /proc/self/task: {seen}");
    }
}
