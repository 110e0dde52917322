//! Starting processes: a worker or the zygote is `python -u -m ferrule` again (fork and exec) with the sockets
//! at descriptors 3.. and its control lines after them (`place_fds`, between fork and exec); a worker's
//! control line is read into events for the supervision loop. Also how a child's end is told: `describe`.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;

use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::config::Config;
use crate::control::{self, ENV_WORKER_FDS, ENV_WORKER_ID, EXIT_APP_LOAD, Message};

use super::error::MasterError;
use super::events::{Event, Events};
use super::ids::{ChildPid, WorkerId};

/// How this ferrule was started, so the master can read its configuration again and start workers.
pub(crate) struct Launch {
    /// The command line, for re-reading the configuration on SIGHUP.
    pub(crate) argv: Vec<OsString>,
    /// The interpreter that runs ferrule, and the arguments that make it a ferrule worker.
    pub(crate) worker_program: PathBuf,
    pub(crate) worker_args: Vec<OsString>,
}

/// Why no worker was started.
#[derive(Debug)]
pub(super) enum SpawnError {
    /// Starting a process failed.
    Process(std::io::Error),
    /// The zygote gave no worker.
    Fork(control::ForkError),
    /// Under `--preload`, no zygote is ready (one is importing the app): the worker is forked once it is.
    NotPreloaded,
}

impl From<std::io::Error> for SpawnError {
    fn from(error: std::io::Error) -> SpawnError {
        SpawnError::Process(error)
    }
}

/// What every process the master starts gets: the program and arguments that make it ferrule, and the
/// listening sockets, which the master keeps open for as long as it runs.
pub(super) struct Spawner {
    launch: Launch,
    fds: Vec<RawFd>,
}

impl Spawner {
    pub(super) fn new(launch: Launch, fds: Vec<RawFd>) -> Spawner {
        Spawner { launch, fds }
    }

    /// The command line the master was started with.
    pub(super) fn argv(&self) -> &[OsString] {
        &self.launch.argv
    }

    /// Starts `python -m ferrule` with the sockets at descriptors 3.. followed by `extra`, and `env`.
    pub(super) fn start(&self, env: &[(&str, String)], extra: &[RawFd]) -> std::io::Result<tokio::process::Child> {
        let mut cmd = tokio::process::Command::new(&self.launch.worker_program);
        cmd.args(&self.launch.worker_args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env(ENV_WORKER_FDS, self.fds.len().to_string())
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES");
        let mut fds = self.fds.clone();
        fds.extend_from_slice(extra);
        // SAFETY: the closure runs in the child between fork and exec and only calls fcntl, dup2 and close on
        // descriptors listed in `fds` (captured before the fork, so no allocation happens there); these are
        // async-signal-safe.
        unsafe {
            cmd.pre_exec(move || place_fds(&fds));
        }
        cmd.spawn()
    }

    /// Starts worker `id` as a new process: its settings go first on its control line (a few KiB, which the
    /// socket buffer takes whole), then what `before_start` writes; its exit comes as an event. Returns its
    /// pid and the master's end of its control line.
    pub(super) fn start_worker(
        &self,
        id: WorkerId,
        settings: &Config,
        before_start: impl FnOnce(&UnixStream) -> std::io::Result<()>,
        events: &Events,
    ) -> Result<(ChildPid, UnixStream), SpawnError> {
        let (ours, theirs) = UnixStream::pair()?;
        control::send_settings(&ours, settings)?;
        before_start(&ours)?;
        let child = self.start(&[(ENV_WORKER_ID, id.get().to_string())], &[theirs.as_raw_fd()])?;
        drop(theirs);
        // A child that was just spawned and not yet waited for always has its pid.
        let pid = child
            .id()
            .ok_or_else(|| std::io::Error::other("the worker exited at once"))?;
        let tx = events.clone();
        tokio::spawn(async move {
            let mut child = child;
            if let Ok(status) = child.wait().await {
                let _ = tx.send(Event::Exited(id, status));
            }
        });
        Ok((ChildPid::new(pid), ours))
    }

    /// A new process (a worker, or the zygote) could not be started.
    pub(super) fn error(&self, config: &Config, error: std::io::Error) -> MasterError {
        let hint = match error.kind() {
            std::io::ErrorKind::PermissionDenied if config.fixed.uid.is_some() || config.fixed.gid.is_some() => {
                " (the --uid/--gid user cannot run this Python: a venv of a Python under a home directory, such \
                 as pyenv's, is out of its reach; install ferrule into a venv of a Python that user can read)"
            }
            _ => "",
        };
        MasterError::Spawn {
            program: self.launch.worker_program.display().to_string(),
            error,
            hint,
        }
    }
}

/// Reads a child's control line, turning each message it knows into an event for the master.
pub(super) fn read_control_line(
    ours: UnixStream,
    events: &Events,
    event: impl Fn(Message) -> Event + Send + 'static,
) -> std::io::Result<()> {
    ours.set_nonblocking(true)?;
    let control = tokio::net::UnixStream::from_std(ours)?;
    let tx = events.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(control).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let Some(message) = Message::parse(&line) else { continue };
            if tx.send(event(message)).is_err() {
                break;
            }
        }
    });
    Ok(())
}

/// A worker's messages as events.
pub(super) fn worker_event(id: WorkerId) -> impl Fn(Message) -> Event + Send + 'static {
    move |message| match message {
        Message::Ready => Event::Ready(id),
        Message::Stats(s) => Event::Stats(id, s),
        Message::Retire(r) => Event::Retire(id, r),
        Message::Unavailable => Event::Unavailable(id),
        Message::Files(files) => Event::Files(files),
        Message::FilesDone => Event::FilesDone,
    }
}

/// Puts the inherited descriptors at 3, 4, ... in the child, without CLOEXEC. Runs between fork and exec.
fn place_fds(fds: &[RawFd]) -> std::io::Result<()> {
    // First move every descriptor above the target range, so no dup2 overwrites a source not yet moved. The
    // copies go to the lowest free numbers past that range, so a low open-file limit still has room.
    const MAX: usize = 80;
    let mut high = [0 as RawFd; MAX];
    if fds.len() > MAX {
        return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
    }
    let floor = 3 + fds.len() as RawFd;
    for (i, &fd) in fds.iter().enumerate() {
        // SAFETY: fcntl(F_DUPFD) on a descriptor the parent keeps open.
        let h = unsafe { libc::fcntl(fd, libc::F_DUPFD, floor) };
        if h < 0 {
            return Err(std::io::Error::last_os_error());
        }
        high[i] = h;
    }
    for (i, &h) in high[..fds.len()].iter().enumerate() {
        // SAFETY: dup2 onto a small descriptor number the child is about to hand to the worker; dup2's result
        // does not carry CLOEXEC, so it survives exec.
        if unsafe { libc::dup2(h, 3 + i as RawFd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: closing the temporary duplicate made above.
        unsafe { libc::close(h) };
    }
    Ok(())
}

/// What a worker (or the zygote) that exited during start-up means for the master: the app could not be
/// loaded, or the process crashed.
pub(super) fn startup_failure(pid: Option<ChildPid>, status: ExitStatus) -> MasterError {
    if status.code() == Some(EXIT_APP_LOAD) {
        MasterError::AppLoad
    } else {
        MasterError::StartupCrash {
            pid: pid.map_or(0, ChildPid::get),
            status: describe(status),
        }
    }
}

pub(super) fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => status.to_string(),
    }
}
