//! The master's side of `--preload`: the zygote that imports the app once (started, restarted with the crash
//! back-off, replaced by a reload's), the fork requests it answers with a worker's pid, and the workers it
//! forks, which this master adopts as a child subreaper: it waits for them without reaping (`WNOWAIT`) and
//! reaps them when it forgets them, and sweeps /proc for adopted children it never heard of (`reap_strays`).

use std::collections::HashSet;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

use crate::config::Config;
use crate::control::{self, ENV_MASTER_PID, ENV_ZYGOTE, EXIT_APP_LOAD, Message};

use super::backoff::Backoff;
use super::error::LOG;
use super::error::MasterError;
use super::events::{Event, Events};
use super::ids::{ChildPid, WorkerId};
use super::spawn::{self, SpawnError, Spawner, describe};

/// How often, under `--preload`, the master looks for adopted processes it does not know (see `reap_strays`).
pub(super) const STRAY_SWEEP: Duration = Duration::from_secs(5);

/// Workers forked by the zygote are its grandchildren; as a subreaper this process adopts them when their
/// parent (the short-lived middle process) exits, and so gets their exit status.
pub(super) fn become_subreaper() -> Result<(), MasterError> {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER only sets a flag on this process.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(MasterError::Subreaper(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The process that imported the app and forks the workers, and the master's end of its fork channel
/// (closing it makes the zygote exit).
struct Zygote {
    pid: ChildPid,
    generation: u32,
    channel: UnixStream,
    ready: bool,
    /// Under `--reload`: its app did not import, so its workers answer 503.
    unavailable: bool,
    /// Asks the task that waits for the zygote to kill it.
    killer: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Zygote {
    /// Kills the zygote (SIGKILL) and forgets it; its exit still arrives as an event.
    fn kill(mut self) {
        if let Some(killer) = self.killer.take() {
            let _ = killer.send(());
        }
    }
}

/// What a zygote's `ready` means for the workers.
pub(super) enum Preloaded {
    /// A reload's new code: the workers are to be replaced by forks of it.
    NewCode,
    /// The zygote started again after a crash: the missing workers can be forked.
    Again,
    /// A zygote no longer wanted.
    Stale,
}

/// The zygotes of this master.
pub(super) struct Zygotes {
    /// The one the workers are forked from.
    current: Option<Zygote>,
    /// During a reload, the one importing the new code.
    next: Option<Zygote>,
    /// Every zygote still running (the current one, a reload's, and retired ones until they exit).
    pids: HashSet<ChildPid>,
    crashes: Backoff,
    events: Events,
}

impl Zygotes {
    pub(super) fn new(events: Events) -> Zygotes {
        Zygotes {
            current: None,
            next: None,
            pids: HashSet::new(),
            crashes: Backoff::default(),
            events,
        }
    }

    /// Whether a zygote (current, a reload's, or a retired one) has not exited yet.
    pub(super) fn any_running(&self) -> bool {
        !self.pids.is_empty()
    }

    pub(super) fn knows_pid(&self, pid: ChildPid) -> bool {
        self.pids.contains(&pid)
    }

    /// Whether a zygote is ready to fork workers from.
    pub(super) fn is_ready(&self) -> bool {
        self.current.as_ref().is_some_and(|z| z.ready)
    }

    /// At start-up: starts the first zygote; returns its pid, whose events `first_ready` or `first_failed`
    /// answer.
    pub(super) fn start_first(&mut self, spawner: &Spawner, settings: &Config) -> std::io::Result<ChildPid> {
        let zygote = self.start(spawner, settings, 0)?;
        let pid = zygote.pid;
        self.current = Some(zygote);
        Ok(pid)
    }

    pub(super) fn first_ready(&mut self) {
        if let Some(z) = &mut self.current {
            z.ready = true;
        }
    }

    pub(super) fn first_failed(&mut self) {
        self.current = None;
    }

    /// Starts a zygote that imports the app with `settings`, for `generation`.
    fn start(&mut self, spawner: &Spawner, settings: &Config, generation: u32) -> std::io::Result<Zygote> {
        let (ours, theirs) = UnixStream::pair()?;
        let (fork_ours, fork_theirs) = UnixStream::pair()?;
        control::send_settings(&ours, settings)?;
        // The zygote compares its parent with this pid to tell that the master died before it could tie its
        // life to the master's: its parent is then whichever subreaper adopted it, not always PID 1.
        let env = [
            (ENV_ZYGOTE, "1".to_owned()),
            (ENV_MASTER_PID, std::process::id().to_string()),
        ];
        let child = spawner.start(&env, &[theirs.as_raw_fd(), fork_theirs.as_raw_fd()])?;
        drop((theirs, fork_theirs));
        let pid = child
            .id()
            .map(ChildPid::new)
            .ok_or_else(|| std::io::Error::other("the zygote exited at once"))?;
        self.pids.insert(pid);
        tracing::info!(target: LOG,
            pid = pid.get(),
            generation,
            "zygote started: importing the app to fork the workers from"
        );
        let tx = self.events.clone();
        let (killer, kill_rx) = tokio::sync::oneshot::channel::<()>();
        // The zygote is killed through its `Child`, which knows whether it was reaped, so a reused pid is
        // never signalled.
        tokio::spawn(async move {
            let mut child = child;
            let status = tokio::select! {
                status = child.wait() => status,
                Ok(()) = kill_rx => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            if let Ok(status) = status {
                let _ = tx.send(Event::ZygoteExited(pid, status));
            }
        });
        // The zygote says it is ready, and under --reload which files its app imported and whether it did.
        spawn::read_control_line(ours, &self.events, move |message| match message {
            Message::Files(files) => Event::Files(files),
            Message::FilesDone => Event::FilesDone,
            Message::Unavailable => Event::ZygoteUnavailable(pid),
            _ => Event::ZygoteReady(pid),
        })?;
        Ok(Zygote {
            pid,
            generation,
            channel: fork_ours,
            ready: false,
            unavailable: false,
            killer: Some(killer),
        })
    }

    /// Asks the ready zygote for worker `id`, one of `workers`, whose control socket is `control`; the
    /// worker's exit comes as an event. A zygote that does not answer properly is replaced.
    pub(super) fn fork(&mut self, id: WorkerId, workers: usize, control: BorrowedFd) -> Result<ChildPid, SpawnError> {
        let Some(zygote) = self.current.as_ref() else {
            return Err(SpawnError::NotPreloaded);
        };
        let pid = match control::request_fork(&zygote.channel, id.get(), workers, control) {
            Ok(pid) => ChildPid::new(pid),
            Err(error) => {
                // Unless the zygote answered that the fork failed, the channel may be out of step (a late
                // answer would be taken for the next request's), and each further request could wait out the
                // timeout: this zygote is done; another one is started.
                if !matches!(error, control::ForkError::Refused(_)) {
                    tracing::error!(target: LOG, pid = zygote.pid.get(), %error, "the zygote does not answer properly; replacing it");
                    if let Some(broken) = self.current.take() {
                        broken.kill();
                    }
                    self.schedule_restart();
                }
                return Err(SpawnError::Fork(error));
            }
        };
        // The worker is the zygote's grandchild, re-parented to this process (a child subreaper) when the
        // middle process exited, which happened before the zygote answered.
        let tx = self.events.clone();
        tokio::spawn(async move {
            let status = wait_adopted(pid).await;
            let _ = tx.send(Event::Exited(id, status));
        });
        Ok(pid)
    }

    /// A reload: imports the new code in a new zygote; the workers are replaced once it is ready, and if it
    /// fails the current workers and zygote stay.
    pub(super) fn preload_new_code(&mut self, spawner: &Spawner, config: &Config, settings: &Config, generation: u32) {
        if let Some(stale) = self.next.take() {
            stale.kill();
        }
        match self.start(spawner, settings, generation) {
            Ok(zygote) => self.next = Some(zygote),
            Err(error) => tracing::error!(target: LOG, "reload failed: {}", spawner.error(config, error)),
        }
    }

    pub(super) fn on_ready(&mut self, pid: ChildPid) -> Preloaded {
        if let Some(mut next) = self.next.take_if(|z| z.pid == pid) {
            // A reload's new code is imported: fork the new generation from it and retire the old one. The
            // old zygote exits when its channel closes; its workers stop as the new ones become ready.
            next.ready = true;
            tracing::info!(target: LOG,
                pid = pid.get(),
                generation = next.generation,
                "the new code is preloaded; replacing the workers"
            );
            self.current = Some(next);
            Preloaded::NewCode
        } else if let Some(zygote) = self.current.as_mut().filter(|z| z.pid == pid) {
            zygote.ready = true;
            tracing::info!(target: LOG, pid = pid.get(), "the app is preloaded again; forking the missing workers");
            Preloaded::Again
        } else {
            Preloaded::Stale
        }
    }

    /// Under `--reload`, the zygote `pid` could not import the app, and would fork workers that answer 503. A
    /// reload's is dropped while the current zygote has the app, whose workers keep serving; otherwise (at
    /// start-up, or when the current one could not import it either) it goes on, and the next change to a
    /// watched file brings another.
    pub(super) fn on_unavailable(&mut self, pid: ChildPid) {
        let current_has_app = self.current.as_ref().is_some_and(|z| z.pid != pid && !z.unavailable);
        if current_has_app {
            if let Some(next) = self.next.take_if(|z| z.pid == pid) {
                tracing::error!(target: LOG,
                    pid = pid.get(),
                    "reload failed: the new code could not be loaded; the previous workers keep serving"
                );
                next.kill();
                return;
            }
        }
        for zygote in [&mut self.current, &mut self.next].into_iter().flatten() {
            if zygote.pid == pid {
                zygote.unavailable = true;
            }
        }
    }

    pub(super) fn on_exit(&mut self, pid: ChildPid, status: ExitStatus) {
        self.pids.remove(&pid);
        if self.next.take_if(|z| z.pid == pid).is_some() {
            if status.code() == Some(EXIT_APP_LOAD) {
                tracing::error!(target: LOG,
                    pid = pid.get(),
                    "reload failed: the new code could not be loaded; the previous workers keep serving"
                );
            } else {
                tracing::error!(target: LOG,
                    pid = pid.get(),
                    status = %describe(status),
                    "reload failed: the zygote importing the new code died; the previous workers keep serving"
                );
            }
            return;
        }
        if self.current.take_if(|z| z.pid == pid).is_none() {
            tracing::debug!(target: LOG, pid = pid.get(), status = %describe(status), "a retired zygote exited");
            return;
        }
        tracing::error!(target: LOG,
            pid = pid.get(),
            status = %describe(status),
            "the zygote died; starting it again (the workers keep serving; replacements wait for it)"
        );
        self.schedule_restart();
    }

    /// Starts the zygote again, backing off when it keeps dying.
    fn schedule_restart(&mut self) {
        let (_, delay) = self.crashes.crashed();
        let tx = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Event::RestartZygote);
        });
    }

    /// The back-off of a dead zygote is over: start another, unless one is running.
    pub(super) fn restart(&mut self, spawner: &Spawner, config: &Config, settings: &Config, generation: u32) {
        if self.current.is_some() {
            return;
        }
        match self.start(spawner, settings, generation) {
            Ok(zygote) => self.current = Some(zygote),
            Err(error) => {
                tracing::error!(target: LOG, "{}", spawner.error(config, error));
                self.schedule_restart();
            }
        }
    }

    /// At a stop: the zygotes exit when their fork channels close (dropped here); one still importing the app
    /// is not reading its channel, and is killed.
    pub(super) fn stop(&mut self) {
        for zygote in [self.current.take(), self.next.take()].into_iter().flatten() {
            if !zygote.ready {
                zygote.kill();
            }
        }
    }
}

/// Reaps exited children this master never heard of (`known` says which pids it knows): a worker forked for
/// a request the master gave up on (the zygote answered too late) is adopted all the same, and would stay a
/// zombie. Zygotes are left alone: they are the runtime's children, waited for by their own tasks.
pub(super) fn reap_strays(known: impl Fn(ChildPid) -> bool) {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the command name in parentheses: state, then parent pid.
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let mut fields = rest.split(' ');
        let (Some("Z"), Some(ppid)) = (fields.next(), fields.next()) else {
            continue;
        };
        if ppid.parse::<u32>().ok() == Some(me) && !known(ChildPid::new(pid)) {
            let mut raw = 0;
            // SAFETY: waitpid on a specific zombie child of this process, with a valid pointer.
            if unsafe { libc::waitpid(pid as libc::pid_t, &mut raw, libc::WNOHANG) } == pid as libc::pid_t {
                tracing::warn!(target: LOG, pid, status = %describe(ExitStatus::from_raw(raw)), "reaped an unknown worker");
            }
        }
    }
}

/// Reaps an adopted worker whose exit `wait_adopted` saw.
pub(super) fn reap(pid: ChildPid) {
    let mut raw = 0;
    // SAFETY: waitpid on our own exited (zombie) child, with a valid pointer.
    while unsafe { libc::waitpid(pid.get() as libc::pid_t, &mut raw, 0) } < 0
        && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
    {}
}

/// Waits for a worker this process adopted to exit, and returns its status without reaping it (`WNOWAIT`:
/// the master reaps it when it forgets the worker, so the pid stays its own until then). Adopted processes
/// are not tokio's children: each SIGCHLD wakes this to look at the one pid (with a slow timer as well, in
/// case a signal was missed).
async fn wait_adopted(pid: ChildPid) -> ExitStatus {
    let mut sigchld = signal(SignalKind::child()).ok();
    loop {
        match exit_status_of(pid) {
            Ok(Some(status)) => return status,
            Ok(None) => {}
            Err(error) if error.raw_os_error() == Some(libc::EINTR) => continue,
            Err(error) => {
                tracing::error!(target: LOG, pid = pid.get(), %error, "cannot wait for a preloaded worker; counting it as exited");
                return ExitStatus::from_raw(1 << 8);
            }
        }
        let poll = tokio::time::sleep(Duration::from_secs(1));
        match &mut sigchld {
            Some(sigchld) => {
                tokio::select! {
                    _ = sigchld.recv() => {}
                    () = poll => {}
                }
            }
            None => poll.await,
        }
    }
}

/// The exit status of the child `pid` if it has exited, leaving it unreaped (`WNOWAIT`).
fn exit_status_of(pid: ChildPid) -> std::io::Result<Option<ExitStatus>> {
    // SAFETY: an all-zero siginfo_t is a valid value to be filled in.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on a specific pid with a valid siginfo_t; WNOHANG returns at once, WNOWAIT leaves the
    // child waitable.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid.get() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: after a successful waitid, si_pid is 0 if no child exited, else the fields for CLD_EXITED,
    // CLD_KILLED and CLD_DUMPED are set.
    let (exited, code, status) = unsafe { (info.si_pid(), info.si_code, info.si_status()) };
    if exited != pid.get() as libc::pid_t {
        return Ok(None);
    }
    // Back to the wait(2) status encoding that ExitStatus reads.
    let raw = match code {
        libc::CLD_EXITED => (status & 0xff) << 8,
        libc::CLD_DUMPED => status | 0x80,
        _ => status,
    };
    Ok(Some(ExitStatus::from_raw(raw)))
}
