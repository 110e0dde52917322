//! The master process: binds the sockets once, starts workers that inherit them, supervises them, and handles
//! the operator's signals: SIGHUP rolling reload, SIGTERM graceful stop, SIGINT/SIGQUIT fast stop,
//! SIGTTIN/SIGTTOU one worker more/fewer.
//!
//! Workers are the same Python started again as `python -u -m ferrule` (fork and exec, never a bare fork of a
//! process that may hold threads) with the sockets at descriptors 3.. and a control socket after them, whose
//! first line hands them the validated settings. A worker says `ready` once
//! its app imported, and `retire REASON` when it wants a replacement; the master answers with signals.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::{Config, systemd_fds};
use crate::control::{self, ENV_WORKER_FDS, ENV_WORKER_ID, ENV_ZYGOTE, EXIT_APP_LOAD, Message};
use crate::lifecycle::RetireReason;
use crate::listener::{self, BoundSocket, ListenError, Listener, Stream};
use crate::metrics::{MasterMetrics, Snapshot};
use crate::tls::TicketKeyRing;

/// Why the master could not run.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MasterError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot start a worker with {program}: {error}{hint}")]
    Spawn {
        program: String,
        error: std::io::Error,
        hint: &'static str,
    },
    #[error(
        "the open-file limit is {limit} (soft and hard), too low to run: ferrule needs at least {needed} \
         descriptors for these sockets and threads (raise it with ulimit -n, LimitNOFILE= in systemd, or the \
         container's nofile ulimit)"
    )]
    DescriptorLimit { limit: u64, needed: u64 },
    #[error("the app could not be loaded (see the error above); not starting")]
    AppLoad,
    #[error(transparent)]
    Fork(#[from] control::ForkError),
    #[error("the preloaded app is not ready to fork workers from")]
    NotPreloaded,
    #[error("worker {pid} exited during start-up ({status})")]
    StartupCrash { pid: u32, status: String },
    #[error("cannot switch to {what}: {reason}")]
    Privileges { what: String, reason: String },
    #[error(
        "TLS: {error} (checked as user {user}, the --uid the workers run as: they read the certificate and key \
         themselves, at start-up and on every SIGHUP, so give that user read access, e.g. chown {user} on the \
         key with mode 600)"
    )]
    TlsAsUser { user: String, error: crate::tls::TlsError },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Who the workers run as: `--uid`/`--gid` resolved once, before binding, so the socket files ferrule creates
/// can be given to that user and group (nginx then reaches them through `--socket-mode`).
struct Identity {
    user: Option<nix::unistd::User>,
    gid: Option<nix::unistd::Gid>,
}

fn privileges_error(what: &str, reason: String) -> MasterError {
    MasterError::Privileges {
        what: what.to_owned(),
        reason,
    }
}

fn resolve_identity(config: &Config) -> Result<Identity, MasterError> {
    use nix::unistd::{Gid, Group, Uid, User};
    let user = match &config.fixed.uid {
        Some(u) => {
            let found = match u.parse::<u32>() {
                Ok(n) => User::from_uid(Uid::from_raw(n)),
                Err(_) => User::from_name(u),
            };
            Some(
                found
                    .map_err(|e| privileges_error(&format!("user {u}"), e.to_string()))?
                    .ok_or_else(|| privileges_error(&format!("user {u}"), "no such user".into()))?,
            )
        }
        None => None,
    };
    let gid = match &config.fixed.gid {
        Some(g) => {
            let found = match g.parse::<u32>() {
                Ok(n) => Group::from_gid(Gid::from_raw(n)),
                Err(_) => Group::from_name(g),
            };
            Some(
                found
                    .map_err(|e| privileges_error(&format!("group {g}"), e.to_string()))?
                    .ok_or_else(|| privileges_error(&format!("group {g}"), "no such group".into()))?
                    .gid,
            )
        }
        None => user.as_ref().map(|u| u.gid),
    };
    Ok(Identity { user, gid })
}

impl Identity {
    /// The owner for socket files: only root can give a file away, and only when a user or group is set.
    fn socket_owner(&self) -> Option<(Option<u32>, Option<u32>)> {
        let uid = self.user.as_ref().map(|u| u.uid.as_raw());
        let gid = self.gid.map(|g| g.as_raw());
        (nix::unistd::geteuid().is_root() && (uid.is_some() || gid.is_some())).then_some((uid, gid))
    }

    /// Started as root, switch to `--uid`/`--gid` now that the sockets are bound; workers inherit the identity.
    fn switch_to(&self) -> Result<(), MasterError> {
        use nix::unistd::{getuid, setgid, setgroups, setuid};
        let fail = privileges_error;
        if !getuid().is_root() {
            if self.user.as_ref().is_some_and(|u| u.uid != getuid()) {
                return Err(fail("another user", "only root can change user".into()));
            }
            return Ok(());
        }
        let Some(gid) = self.gid else {
            tracing::warn!("running as root: pass --uid and --gid so the app does not run with root's privileges");
            return Ok(());
        };
        // Group first: once the user changes, changing groups is no longer allowed.
        setgroups(&[gid]).map_err(|e| fail("supplementary groups", e.to_string()))?;
        setgid(gid).map_err(|e| fail(&format!("gid {gid}"), e.to_string()))?;
        if let Some(user) = &self.user {
            setuid(user.uid).map_err(|e| fail(&format!("user {}", user.name), e.to_string()))?;
        }
        tracing::info!(uid = %getuid(), gid = %gid, "dropped privileges");
        Ok(())
    }
}

/// Warns at start-up when this user cannot remove a socket file on exit (its directory is not writable), so
/// the leftover file is no surprise; the next start replaces a stale file anyway.
fn check_socket_dirs_writable(sockets: &[BoundSocket]) {
    for socket in sockets {
        let Some((path, _)) = &socket.unix_file else { continue };
        let Some(dir) = path.parent() else { continue };
        if nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_err() {
            tracing::warn!(
                directory = %dir.display(),
                uid = %nix::unistd::getuid(),
                "this user cannot write the socket's directory, so the socket file will not be removed on exit; \
                 give the directory to this user (systemd: RuntimeDirectory=) to have it cleaned up"
            );
        }
    }
}

/// Descriptors a worker needs besides its connections: stdio, the sockets and the control channel, one epoll per
/// app thread, the runtime's own, the log pipe and what importing Python and the app opens.
fn descriptors_needed(config: &Config, sockets: usize) -> u64 {
    const BASE: u64 = 32;
    BASE + sockets as u64 + 1 + config.workers.threads as u64 * 2
}

/// Raises the soft open-file limit to the hard limit, as servers commonly do (container and shell defaults can
/// be as low as 64 or 1024 while the hard limit allows far more); workers inherit it. Refuses to start when
/// even that leaves no room to work, and warns when --max-connections cannot be reached.
fn check_descriptor_limit(config: &Config) -> Result<(), MasterError> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return Ok(());
    };
    let soft = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                tracing::debug!(from = soft, to = hard, "raised the open-file limit");
                hard
            }
            Err(_) => soft,
        }
    } else {
        soft
    };
    let sockets = config.fixed.sockets.len().max(1) + usize::from(config.fixed.metrics.is_some());
    let needed = descriptors_needed(config, sockets);
    if soft < needed + 8 {
        return Err(MasterError::DescriptorLimit {
            limit: soft,
            needed: needed + 8,
        });
    }
    let per_worker = needed + config.limits.max_connections as u64 * 2;
    if per_worker > soft {
        tracing::warn!(
            limit = soft,
            max_connections = config.limits.max_connections,
            workers = config.workers.count,
            "the open-file limit is too low for --max-connections: each of the workers needs up to {per_worker} \
             descriptors (a connection can take two, with a spooled body) but may open {soft}; raise the limit \
             (LimitNOFILE=, ulimit -n) or lower --max-connections to {}",
            soft.saturating_sub(needed) / 2
        );
    }
    Ok(())
}

/// How often, under `--preload`, the master looks for adopted processes it does not know (see `reap_strays`).
const STRAY_SWEEP: Duration = Duration::from_secs(5);
/// A crash within this window of the previous ones counts towards the respawn back-off.
const CRASH_WINDOW: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Extra time a stopping worker gets beyond the graceful timeout before it is killed.
const KILL_MARGIN: Duration = Duration::from_secs(5);
/// How long a fast stop waits before killing.
const FAST_STOP: Duration = Duration::from_secs(3);

/// How this ferrule was started, so the master can read its configuration again and start workers.
pub(crate) struct Launch {
    /// The command line, for re-reading the configuration on SIGHUP.
    pub(crate) argv: Vec<OsString>,
    /// The interpreter that runs ferrule, and the arguments that make it a ferrule worker.
    pub(crate) worker_program: PathBuf,
    pub(crate) worker_args: Vec<OsString>,
}

/// Binds every socket, runs the workers until a stop signal, and removes the socket files.
pub(crate) fn run(config: Config, launch: Launch) -> Result<(), MasterError> {
    check_descriptor_limit(&config)?;
    let identity = resolve_identity(&config)?;
    let owner = identity.socket_owner();
    let mut specs = config.fixed.sockets.clone();
    specs.extend(systemd_fds());
    let mut sockets: Vec<BoundSocket> = Vec::with_capacity(specs.len());
    for spec in &specs {
        match listener::bind(spec, config.fixed.socket_mode, owner, config.fixed.listen_backlog) {
            Ok(bound) => {
                tracing::info!(address = %bound.display_addr(), "listening");
                sockets.push(bound);
            }
            Err(e) => {
                sockets.iter().for_each(BoundSocket::remove_file);
                return Err(e.into());
            }
        }
    }
    let is_tls = |s: &BoundSocket| matches!(s.spec, crate::config::SocketSpec::Tls(_));
    let client_ca = config.tls.files.as_ref().is_some_and(|t| t.client_ca.is_some());
    for socket in sockets.iter().filter(|s| !s.is_unix() && !is_loopback(s)) {
        let address = socket.display_addr();
        if !is_tls(socket) {
            tracing::warn!(
                %address,
                "listening beyond loopback: the uwsgi protocol has no authentication, so anyone who can reach \
                 this address can send requests as any client (a tls:// socket with --tls-client-ca can require \
                 nginx's certificate)"
            );
        } else if !client_ca {
            tracing::warn!(
                %address,
                "a tls:// socket beyond loopback without --tls-client-ca: traffic is encrypted, but any client \
                 may connect and send requests as any client; give nginx a certificate and ferrule its CA"
            );
        }
    }
    let metrics_socket = match &config.fixed.metrics {
        Some(spec) => match listener::bind(spec, config.fixed.socket_mode, owner, config.fixed.listen_backlog) {
            Ok(bound) => {
                tracing::info!(address = %bound.display_addr(), "serving metrics");
                Some(bound)
            }
            Err(e) => {
                sockets.iter().for_each(BoundSocket::remove_file);
                return Err(e.into());
            }
        },
        None => None,
    };
    let remove_all = |sockets: &[BoundSocket]| {
        sockets
            .iter()
            .chain(metrics_socket.as_ref())
            .for_each(BoundSocket::remove_file);
    };
    if let Err(e) = identity.switch_to() {
        remove_all(&sockets);
        return Err(e);
    }
    // The files were checked as whoever started ferrule; the workers read them as --uid.
    if let (Some(files), Some(user)) = (&config.tls.files, &identity.user) {
        if let Err(error) = crate::tls::check_files(files) {
            remove_all(&sockets);
            return Err(MasterError::TlsAsUser {
                user: user.name.clone(),
                error,
            });
        }
    }
    check_socket_dirs_writable(&sockets);
    if config.fixed.preload {
        // Workers forked by the zygote are its grandchildren; as a subreaper this process adopts them when
        // their parent (the short-lived middle process) exits, and so gets their exit status.
        // SAFETY: prctl with PR_SET_CHILD_SUBREAPER only sets a flag on this process.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            return Err(MasterError::Io(std::io::Error::last_os_error()));
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let result = runtime.block_on(async {
        let master = Master::new(Arc::new(config), launch, &sockets);
        if let Some(bound) = &metrics_socket {
            let queues = sockets
                .iter()
                .filter(|s| !s.is_unix())
                .map(|s| Ok((s.display_addr(), s.fd.try_clone()?)))
                .collect::<std::io::Result<Vec<_>>>()?;
            tokio::spawn(serve_metrics(
                Listener::from_bound(bound)?,
                Arc::clone(&master.metrics),
                queues,
            ));
        }
        master.run().await
    });
    remove_all(&sockets);
    result
}

fn is_loopback(socket: &BoundSocket) -> bool {
    socket2::SockRef::from(&socket.fd)
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .is_some_and(|a| a.ip().is_loopback())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Starting,
    Ready,
    /// Asked to stop (SIGTERM or SIGQUIT sent); killed if still alive at the deadline.
    Stopping {
        kill_at: Instant,
    },
}

struct Worker {
    pid: u32,
    /// Forked by a zygote and adopted: this master reaps it itself, when it forgets it (see `forget`).
    adopted: bool,
    generation: u32,
    state: State,
    /// Set when the worker asked to be replaced; it is stopped once its replacement is ready.
    retiring: Option<RetireReason>,
    /// The master's end of the worker's control line, for the session-ticket keys when they rotate.
    control: Option<std::os::unix::net::UnixStream>,
}

enum Event {
    Ready(u32),
    Stats(u32, Box<Snapshot>),
    Retire(u32, RetireReason),
    Exited(u32, ExitStatus),
    Respawn,
    /// The zygote with this pid imported the app.
    ZygoteReady(u32),
    ZygoteExited(u32, ExitStatus),
    /// Time to start the zygote again after it died.
    RestartZygote,
}

/// Why no worker was started.
#[derive(Debug)]
enum SpawnError {
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

/// Under `--preload`: the process that imported the app and forks the workers, and the master's end of its
/// fork channel (closing it makes the zygote exit).
struct Zygote {
    pid: u32,
    generation: u32,
    channel: std::os::unix::net::UnixStream,
    ready: bool,
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

struct Master<'s> {
    config: Arc<Config>,
    launch: Launch,
    fds: Vec<RawFd>,
    _sockets: &'s [BoundSocket],
    workers: HashMap<u32, Worker>,
    next_id: u32,
    generation: u32,
    desired: usize,
    /// Workers to stop, oldest first, each as soon as a new worker is ready.
    to_replace: VecDeque<u32>,
    crashes: VecDeque<Instant>,
    respawn_pending: bool,
    /// Under `--preload`: the zygote the workers are forked from, and during a reload the one importing the
    /// new code.
    zygote: Option<Zygote>,
    next_zygote: Option<Zygote>,
    zygote_crashes: VecDeque<Instant>,
    /// Every zygote still running (the current one, a reload's, and retired ones until they exit).
    zygote_pids: std::collections::HashSet<u32>,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    metrics: Arc<Mutex<MasterMetrics>>,
    /// The session-ticket keys every worker of a tls:// socket shares (a session resumes on any worker).
    tickets: TicketKeyRing,
}

impl<'s> Master<'s> {
    fn new(config: Arc<Config>, launch: Launch, sockets: &'s [BoundSocket]) -> Master<'s> {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        Master {
            desired: config.workers.count,
            config,
            launch,
            fds: sockets.iter().map(|s| s.fd.as_raw_fd()).collect(),
            _sockets: sockets,
            workers: HashMap::new(),
            next_id: 1,
            generation: 0,
            to_replace: VecDeque::new(),
            crashes: VecDeque::new(),
            respawn_pending: false,
            zygote: None,
            next_zygote: None,
            zygote_crashes: VecDeque::new(),
            zygote_pids: std::collections::HashSet::new(),
            events_tx,
            events_rx,
            metrics: Arc::new(Mutex::new(MasterMetrics::default())),
            tickets: TicketKeyRing::default(),
        }
    }

    async fn run(mut self) -> Result<(), MasterError> {
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut quit = signal(SignalKind::quit())?;
        let mut ttin = signal(SignalKind::from_raw(libc::SIGTTIN))?;
        let mut ttou = signal(SignalKind::from_raw(libc::SIGTTOU))?;

        self.start_up().await?;
        tracing::info!(workers = self.desired, pid = std::process::id(), "ready");

        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut last_sweep = Instant::now();
        // The signal received, and the one the workers get: SIGINT (Ctrl-C) stops them fast, like SIGQUIT.
        let (received, stop_signal) = loop {
            tokio::select! {
                _ = hup.recv() => self.reload(),
                _ = term.recv() => break (Signal::SIGTERM, Signal::SIGTERM),
                _ = int.recv() => break (Signal::SIGINT, Signal::SIGQUIT),
                _ = quit.recv() => break (Signal::SIGQUIT, Signal::SIGQUIT),
                _ = ttin.recv() => {
                    self.desired += 1;
                    tracing::info!(workers = self.desired, "SIGTTIN: one worker more");
                    self.spawn_or_log();
                }
                _ = ttou.recv() => self.one_fewer(),
                _ = tick.tick() => {
                    self.kill_overdue();
                    self.rotate_ticket_keys();
                    if self.config.fixed.preload && last_sweep.elapsed() >= STRAY_SWEEP {
                        last_sweep = Instant::now();
                        self.reap_strays();
                    }
                }
                Some(event) = self.events_rx.recv() => self.on_event(event),
            }
        };
        tracing::info!(signal = %received, "stopping");
        self.stop_all(stop_signal).await;
        Ok(())
    }

    /// Starts the first generation and waits for it: a worker that cannot load the app stops the master with
    /// its error instead of being respawned forever.
    async fn start_up(&mut self) -> Result<(), MasterError> {
        if self.config.fixed.preload {
            self.preload_first().await?;
        }
        for _ in 0..self.desired {
            if let Err(error) = self.spawn() {
                let error = self.spawn_error(error);
                // The workers already started (or forked) must not be left to notice the master is gone.
                self.stop_all(Signal::SIGQUIT).await;
                return Err(error);
            }
        }
        while self.workers.values().any(|w| w.state == State::Starting) {
            let Some(event) = self.events_rx.recv().await else {
                break;
            };
            match event {
                Event::Ready(id) => self.on_event(Event::Ready(id)),
                Event::Exited(id, status) => {
                    let pid = self.forget(id).map_or(0, |w| w.pid);
                    if !self.workers.is_empty() {
                        tracing::info!(
                            workers = self.workers.len(),
                            "start-up failed; stopping the other workers"
                        );
                    }
                    self.stop_all(Signal::SIGQUIT).await;
                    return Err(startup_failure(pid, status));
                }
                other => self.on_event(other),
            }
        }
        Ok(())
    }

    /// `--preload` at start-up: starts the zygote and waits until it has imported the app. One that cannot
    /// stops the master with its error, as a worker would without preload.
    async fn preload_first(&mut self) -> Result<(), MasterError> {
        let zygote = self.start_zygote(0).map_err(|error| self.process_error(error))?;
        let pid = zygote.pid;
        self.zygote = Some(zygote);
        while let Some(event) = self.events_rx.recv().await {
            match event {
                Event::ZygoteReady(ready) if ready == pid => {
                    if let Some(z) = &mut self.zygote {
                        z.ready = true;
                    }
                    return Ok(());
                }
                Event::ZygoteExited(exited, status) if exited == pid => {
                    self.zygote = None;
                    return Err(startup_failure(pid, status));
                }
                other => self.on_event(other),
            }
        }
        Ok(())
    }

    /// Starts one worker: a new process, or under `--preload` a fork of the preloaded app.
    fn spawn(&mut self) -> Result<u32, SpawnError> {
        if self.config.fixed.preload {
            return self.fork_worker();
        }
        let id = self.next_id;
        self.next_id += 1;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        // The worker's settings go first on its control socket (a few KiB, which the socket buffer takes whole).
        // It counts as one of `desired` workers, so one added by SIGTTIN knows it is not alone.
        let mut config = (*self.config).clone();
        config.workers.count = config.workers.count.max(self.desired);
        control::send_settings(&ours, &config)?;
        self.send_ticket_keys(&ours)?;
        let child = self.start_process(&[(ENV_WORKER_ID, id.to_string())], &[theirs.as_raw_fd()])?;
        drop(theirs);
        // A child that was just spawned and not yet waited for always has its pid.
        let pid = child
            .id()
            .ok_or_else(|| std::io::Error::other("the worker exited at once"))?;
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            if let Ok(status) = wait_child(child).await {
                let _ = tx.send(Event::Exited(id, status));
            }
        });
        self.watch_worker(id, pid, false, ours)?;
        Ok(id)
    }

    /// Starts `python -m ferrule` with the sockets at descriptors 3.. followed by `extra`, and `env`.
    fn start_process(&self, env: &[(&str, String)], extra: &[RawFd]) -> std::io::Result<tokio::process::Child> {
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

    /// Under `--preload`: asks the zygote for a worker. Without a ready zygote (it is being started again) no
    /// worker is made now: they are when it is ready.
    fn fork_worker(&mut self) -> Result<u32, SpawnError> {
        if !self.zygote.as_ref().is_some_and(|z| z.ready) {
            return Err(SpawnError::NotPreloaded);
        }
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        // Waiting on the line when the forked worker starts to read it.
        self.send_ticket_keys(&ours)?;
        let Some(zygote) = self.zygote.as_ref() else {
            return Err(SpawnError::NotPreloaded);
        };
        let id = self.next_id;
        self.next_id += 1;
        let workers = self.config.workers.count.max(self.desired);
        let pid = match control::request_fork(&zygote.channel, id, workers, theirs.as_fd()) {
            Ok(pid) => pid,
            Err(error) => {
                // Unless the zygote answered that the fork failed, the channel may be out of step (a late
                // answer would be taken for the next request's), and each further request could wait out the
                // timeout: this zygote is done; another one is started.
                if !matches!(error, control::ForkError::Refused(_)) {
                    tracing::error!(pid = zygote.pid, %error, "the zygote does not answer properly; replacing it");
                    if let Some(broken) = self.zygote.take() {
                        broken.kill();
                    }
                    self.schedule_zygote_restart();
                }
                return Err(SpawnError::Fork(error));
            }
        };
        drop(theirs);
        // The worker is the zygote's grandchild, re-parented to this process (a child subreaper) when the
        // middle process exited, which happened before the zygote answered.
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            let status = reap_adopted(pid).await;
            let _ = tx.send(Event::Exited(id, status));
        });
        self.watch_worker(id, pid, true, ours)?;
        Ok(id)
    }

    /// Registers a started worker and reads its control line.
    fn watch_worker(
        &mut self,
        id: u32,
        pid: u32,
        adopted: bool,
        ours: std::os::unix::net::UnixStream,
    ) -> std::io::Result<()> {
        self.metrics().worker_started(id, pid);
        self.workers.insert(
            id,
            Worker {
                pid,
                adopted,
                generation: self.generation,
                state: State::Starting,
                retiring: None,
                control: ours.try_clone().ok(),
            },
        );
        tracing::info!(worker = id, pid, generation = self.generation, "worker started");
        self.read_control_line(ours, move |message| match message {
            Message::Ready => Event::Ready(id),
            Message::Stats(s) => Event::Stats(id, s),
            Message::Retire(r) => Event::Retire(id, r),
        })
    }

    /// With tls:// sockets: writes the current session-ticket keys on a new worker's control line, where the
    /// worker reads them before it serves.
    fn send_ticket_keys(&mut self, ours: &std::os::unix::net::UnixStream) -> std::io::Result<()> {
        if self.config.tls.files.is_none() {
            return Ok(());
        }
        // A new period's keys go to the other workers too, not only to this one.
        self.rotate_ticket_keys();
        control::send_ticket_keys(ours, self.tickets.keys())
    }

    /// With tls:// sockets: when a new ticket period has begun, makes its keys and sends them to every worker.
    /// Each worker already holds the key of the period that just began, so nothing waits for this.
    fn rotate_ticket_keys(&mut self) {
        if self.config.tls.files.is_none()
            || !self
                .tickets
                .advance(crate::tls::current_period(self.config.tls.ticket_rotation))
        {
            return;
        }
        tracing::info!("session-ticket keys rotated");
        for (id, worker) in &mut self.workers {
            let Some(line) = &worker.control else { continue };
            if let Err(error) = control::send_ticket_keys(line, self.tickets.keys()) {
                // The line is non-blocking (it is shared with its reader): a worker that has not read for so
                // long that its socket is full may hold part of a line, so it gets no more. It keeps sealing
                // with the keys it has until they run out, then makes full handshakes until it is replaced.
                tracing::warn!(worker = id, %error, "cannot send the new session-ticket keys; this worker gets no more");
                worker.control = None;
            }
        }
    }

    /// Reads a child's control line, turning each message it knows into an event for the master.
    fn read_control_line(
        &self,
        ours: std::os::unix::net::UnixStream,
        event: impl Fn(Message) -> Event + Send + 'static,
    ) -> std::io::Result<()> {
        ours.set_nonblocking(true)?;
        let control = tokio::net::UnixStream::from_std(ours)?;
        let tx = self.events_tx.clone();
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

    /// Under `--preload`: starts a zygote that imports the app with the current settings, for `generation`.
    fn start_zygote(&mut self, generation: u32) -> std::io::Result<Zygote> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let (fork_ours, fork_theirs) = std::os::unix::net::UnixStream::pair()?;
        let mut config = (*self.config).clone();
        config.workers.count = config.workers.count.max(self.desired);
        control::send_settings(&ours, &config)?;
        let child = self.start_process(
            &[(ENV_ZYGOTE, "1".to_owned())],
            &[theirs.as_raw_fd(), fork_theirs.as_raw_fd()],
        )?;
        drop((theirs, fork_theirs));
        let pid = child
            .id()
            .ok_or_else(|| std::io::Error::other("the zygote exited at once"))?;
        self.zygote_pids.insert(pid);
        tracing::info!(
            pid,
            generation,
            "zygote started: importing the app to fork the workers from"
        );
        let tx = self.events_tx.clone();
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
        // The zygote only ever says it is ready.
        self.read_control_line(ours, move |_| Event::ZygoteReady(pid))?;
        Ok(Zygote {
            pid,
            generation,
            channel: fork_ours,
            ready: false,
            killer: Some(killer),
        })
    }

    fn spawn_error(&self, error: SpawnError) -> MasterError {
        match error {
            SpawnError::Process(error) => self.process_error(error),
            SpawnError::Fork(error) => MasterError::Fork(error),
            SpawnError::NotPreloaded => MasterError::NotPreloaded,
        }
    }

    /// A new process (a worker, or the zygote) could not be started.
    fn process_error(&self, error: std::io::Error) -> MasterError {
        let hint = match error.kind() {
            std::io::ErrorKind::PermissionDenied
                if self.config.fixed.uid.is_some() || self.config.fixed.gid.is_some() =>
            {
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

    fn metrics(&self) -> MutexGuard<'_, MasterMetrics> {
        // A poisoned lock only means a scrape panicked mid-render; the counts themselves are intact.
        self.metrics.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn spawn_or_log(&mut self) {
        match self.spawn() {
            Ok(_) => {}
            // Under --preload while the zygote imports the app again: the workers are forked once it is ready.
            Err(SpawnError::NotPreloaded) => tracing::debug!("a worker waits for the zygote"),
            Err(error) => tracing::error!("{}", self.spawn_error(error)),
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Ready(id) => {
                let Some(w) = self.workers.get_mut(&id) else { return };
                if w.state == State::Starting {
                    w.state = State::Ready;
                }
                tracing::info!(worker = id, pid = w.pid, "worker ready");
                // A new worker is serving: the oldest one waiting for a replacement can go.
                while let Some(old) = self.to_replace.pop_front() {
                    if self.workers.contains_key(&old) {
                        self.stop_worker(old, Signal::SIGTERM);
                        break;
                    }
                }
            }
            Event::Retire(id, reason) => {
                let Some(w) = self.workers.get_mut(&id) else { return };
                if w.retiring.is_some() || matches!(w.state, State::Stopping { .. }) {
                    return;
                }
                w.retiring = Some(reason);
                self.metrics
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .restarted(reason.as_str(), 1);
                tracing::info!(worker = id, pid = w.pid, reason = reason.as_str(), "replacing worker");
                self.to_replace.push_back(id);
                self.spawn_or_log();
            }
            Event::Stats(id, snapshot) => self.metrics().update(id, *snapshot),
            Event::Exited(id, status) => self.on_exit(id, status),
            Event::Respawn => {
                self.respawn_pending = false;
                self.fill_up();
            }
            Event::ZygoteReady(pid) => self.on_zygote_ready(pid),
            Event::ZygoteExited(pid, status) => self.on_zygote_exit(pid, status),
            Event::RestartZygote => {
                if self.zygote.is_none() {
                    match self.start_zygote(self.generation) {
                        Ok(zygote) => self.zygote = Some(zygote),
                        Err(error) => {
                            tracing::error!("{}", self.process_error(error));
                            self.schedule_zygote_restart();
                        }
                    }
                }
            }
        }
    }

    /// Under `--preload`, reaps exited children this master never heard of: a worker forked for a request the
    /// master gave up on (the zygote answered too late) is adopted all the same, and would stay a zombie.
    /// Zygotes are left alone: they are the runtime's children, waited for by their own tasks.
    fn reap_strays(&mut self) {
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
            let known = self.workers.values().any(|w| w.pid == pid) || self.zygote_pids.contains(&pid);
            if ppid.parse::<u32>().ok() == Some(me) && !known {
                let mut raw = 0;
                // SAFETY: waitpid on a specific zombie child of this process, with a valid pointer.
                if unsafe { libc::waitpid(pid as libc::pid_t, &mut raw, libc::WNOHANG) } == pid as libc::pid_t {
                    tracing::warn!(pid, status = %describe(ExitStatus::from_raw(raw)), "reaped an unknown worker");
                }
            }
        }
    }

    /// Removes an exited worker. An adopted one is reaped only now: its exit was seen without reaping it
    /// (`WNOWAIT`), so until here its pid could not be reused, and signalling it was safe.
    fn forget(&mut self, id: u32) -> Option<Worker> {
        let w = self.workers.remove(&id)?;
        if w.adopted {
            let mut raw = 0;
            // SAFETY: waitpid on our own exited (zombie) child, with a valid pointer.
            while unsafe { libc::waitpid(w.pid as libc::pid_t, &mut raw, 0) } < 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
            {}
        }
        Some(w)
    }

    /// Starts workers until `desired` are serving or starting (not counting those on their way out).
    fn fill_up(&mut self) {
        let active = self
            .workers
            .values()
            .filter(|w| !matches!(w.state, State::Stopping { .. }) && w.retiring.is_none())
            .count();
        for _ in active..self.desired {
            self.spawn_or_log();
        }
    }

    fn on_zygote_ready(&mut self, pid: u32) {
        if let Some(mut next) = self.next_zygote.take_if(|z| z.pid == pid) {
            // A reload's new code is imported: fork the new generation from it and retire the old one. The
            // old zygote exits when its channel closes; its workers stop as the new ones become ready.
            next.ready = true;
            tracing::info!(
                pid,
                generation = next.generation,
                "the new code is preloaded; replacing the workers"
            );
            self.zygote = Some(next);
            self.replace_workers();
        } else if let Some(zygote) = self.zygote.as_mut().filter(|z| z.pid == pid) {
            zygote.ready = true;
            tracing::info!(pid, "the app is preloaded again; forking the missing workers");
            self.fill_up();
        }
    }

    fn on_zygote_exit(&mut self, pid: u32, status: ExitStatus) {
        self.zygote_pids.remove(&pid);
        if self.next_zygote.take_if(|z| z.pid == pid).is_some() {
            if status.code() == Some(EXIT_APP_LOAD) {
                tracing::error!(
                    pid,
                    "reload failed: the new code could not be loaded; the previous workers keep serving"
                );
            } else {
                tracing::error!(
                    pid,
                    status = %describe(status),
                    "reload failed: the zygote importing the new code died; the previous workers keep serving"
                );
            }
            return;
        }
        if self.zygote.take_if(|z| z.pid == pid).is_none() {
            tracing::debug!(pid, status = %describe(status), "a retired zygote exited");
            return;
        }
        tracing::error!(
            pid,
            status = %describe(status),
            "the zygote died; starting it again (the workers keep serving; replacements wait for it)"
        );
        self.schedule_zygote_restart();
    }

    /// Starts the zygote again, backing off when it keeps dying.
    fn schedule_zygote_restart(&mut self) {
        let now = Instant::now();
        self.zygote_crashes.retain(|t| now.duration_since(*t) < CRASH_WINDOW);
        self.zygote_crashes.push_back(now);
        let recent = self.zygote_crashes.len() as u32;
        let delay = match recent {
            0 | 1 => Duration::ZERO,
            n => (Duration::from_millis(100) * 2u32.saturating_pow(n.min(10) - 1)).min(MAX_BACKOFF),
        };
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Event::RestartZygote);
        });
    }

    fn on_exit(&mut self, id: u32, status: ExitStatus) {
        self.metrics().worker_exited(id);
        let Some(w) = self.forget(id) else { return };
        self.to_replace.retain(|&old| old != id);
        let expected = matches!(w.state, State::Stopping { .. });
        if expected {
            tracing::info!(worker = id, pid = w.pid, status = %describe(status), "worker exited");
            return;
        }
        if w.retiring.is_some() {
            // It left before its replacement was ready (a timed-out worker drains and exits by itself); the
            // replacement is already on its way.
            tracing::info!(worker = id, pid = w.pid, status = %describe(status), "retired worker exited");
            return;
        }
        // A worker of a reload that could not load what the reload brought (the app, the TLS files) ends the
        // reload. Outside a reload (a replacement after a crash or a retirement) it is a crash: retried with
        // the back-off, the cause in the worker's own log line, until it loads (a renewed certificate, say).
        let reloading = self.workers.values().any(|other| other.generation < w.generation);
        if w.state == State::Starting && w.generation > 0 && reloading && status.code() == Some(EXIT_APP_LOAD) {
            tracing::error!(
                worker = id,
                pid = w.pid,
                "reload failed: the new code could not be loaded; the previous workers keep serving"
            );
            self.abort_reload(w.generation);
            return;
        }
        tracing::error!(worker = id, pid = w.pid, status = %describe(status), "worker died; replacing it");
        self.metrics().restarted("crash", 1);
        self.schedule_respawn();
    }

    /// Respawns after a crash, backing off when crashes repeat so a crashing app does not spin the CPU.
    fn schedule_respawn(&mut self) {
        let now = Instant::now();
        self.crashes.retain(|t| now.duration_since(*t) < CRASH_WINDOW);
        self.crashes.push_back(now);
        if self.respawn_pending {
            return;
        }
        self.respawn_pending = true;
        let recent = self.crashes.len() as u32;
        let delay = match recent {
            0 | 1 => Duration::ZERO,
            n => (Duration::from_millis(100) * 2u32.saturating_pow(n.min(10) - 1)).min(MAX_BACKOFF),
        };
        if !delay.is_zero() {
            tracing::warn!(recent_crashes = recent, delay = ?delay, "workers keep dying; backing off");
        }
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Event::Respawn);
        });
    }

    /// SIGHUP: read the configuration again, then start a new generation; each old worker stops as soon as a
    /// new one is ready, so the app is re-imported with no gap in service. An invalid configuration is refused
    /// and the current workers keep serving.
    fn reload(&mut self) {
        match self.reread_config() {
            Ok(config) => {
                if config.workers.count != self.config.workers.count {
                    self.desired = config.workers.count;
                }
                self.config = Arc::new(config);
            }
            Err(error) => {
                tracing::error!(%error, "reload refused: the configuration is invalid; the current workers keep serving");
                return;
            }
        }
        self.generation += 1;
        if self.config.fixed.preload {
            // The new code is imported in a new zygote first; the workers are replaced only once it is ready,
            // and if it fails the current workers and zygote stay.
            if let Some(stale) = self.next_zygote.take() {
                stale.kill();
            }
            tracing::info!(
                generation = self.generation,
                workers = self.desired,
                "SIGHUP: reloading; importing the new code in a new zygote"
            );
            match self.start_zygote(self.generation) {
                Ok(zygote) => self.next_zygote = Some(zygote),
                Err(error) => tracing::error!("reload failed: {}", self.process_error(error)),
            }
            return;
        }
        tracing::info!(
            generation = self.generation,
            workers = self.desired,
            "SIGHUP: reloading"
        );
        self.replace_workers();
    }

    /// Starts a new generation of workers; each old one stops as soon as a new one is ready.
    fn replace_workers(&mut self) {
        let mut old: Vec<(u32, u32)> = self
            .workers
            .iter()
            .filter(|(_, w)| !matches!(w.state, State::Stopping { .. }))
            .map(|(id, w)| (w.generation, *id))
            .collect();
        old.sort();
        self.metrics().restarted("reload", old.len() as u64);
        self.to_replace.extend(old.into_iter().map(|(_, id)| id));
        for _ in 0..self.desired {
            self.spawn_or_log();
        }
    }

    /// The configuration as the command line, environment and file now give it, with what was bound or set up
    /// before the workers started kept as it is (`Config::reloaded`); a change to that is logged as needing a
    /// restart.
    fn reread_config(&self) -> Result<Config, crate::config::ConfigError> {
        let options = crate::config::load_options(self.launch.argv.clone())?;
        let (new, needs_restart) = self.config.reloaded(Config::from_options(options)?)?;
        for option in needs_restart {
            tracing::warn!(
                option,
                "this option changed, but it takes a restart to apply; keeping its current value"
            );
        }
        Ok(new)
    }

    fn abort_reload(&mut self, generation: u32) {
        let starting: Vec<u32> = self
            .workers
            .iter()
            .filter(|(_, w)| w.generation == generation && w.state == State::Starting)
            .map(|(id, _)| *id)
            .collect();
        for id in starting {
            self.stop_worker(id, Signal::SIGKILL);
        }
        // The old workers that were waiting for a replacement stay.
        self.to_replace.clear();
    }

    fn one_fewer(&mut self) {
        if self.desired <= 1 {
            tracing::info!("SIGTTOU: already at one worker");
            return;
        }
        self.desired -= 1;
        tracing::info!(workers = self.desired, "SIGTTOU: one worker fewer");
        let newest = self
            .workers
            .iter()
            .filter(|(_, w)| !matches!(w.state, State::Stopping { .. }))
            .map(|(id, _)| *id)
            .max();
        if let Some(id) = newest {
            self.stop_worker(id, Signal::SIGTERM);
        }
    }

    /// Asks a worker to stop, unless it already is stopping.
    fn stop_worker(&mut self, id: u32, sig: Signal) {
        let stopping = self
            .workers
            .get(&id)
            .is_some_and(|w| matches!(w.state, State::Stopping { .. }));
        if !stopping || sig == Signal::SIGKILL {
            self.signal_worker(id, sig);
        }
    }

    fn signal_worker(&mut self, id: u32, sig: Signal) {
        let grace = match sig {
            Signal::SIGTERM => self.config.workers.graceful_timeout + KILL_MARGIN,
            _ => FAST_STOP,
        };
        if let Some(w) = self.workers.get_mut(&id) {
            w.state = State::Stopping {
                kill_at: Instant::now() + grace,
            };
            // The worker is reaped only by its own wait task, so its pid cannot have been reused yet.
            let _ = kill(Pid::from_raw(w.pid as i32), sig);
        }
    }

    /// A worker that did not stop within its time is killed.
    fn kill_overdue(&mut self) {
        let now = Instant::now();
        for (id, w) in &mut self.workers {
            if let State::Stopping { kill_at } = w.state {
                if now >= kill_at {
                    tracing::warn!(worker = id, pid = w.pid, "worker did not stop in time; killing it");
                    let _ = kill(Pid::from_raw(w.pid as i32), Signal::SIGKILL);
                    w.state = State::Stopping {
                        kill_at: now + Duration::from_secs(3600),
                    };
                }
            }
        }
    }

    /// Stops every worker and waits for all of them (killing the overdue).
    async fn stop_all(&mut self, sig: Signal) {
        // A zygote exits when its fork channel closes; one still importing the app is not reading it, and is
        // killed.
        for zygote in [self.zygote.take(), self.next_zygote.take()].into_iter().flatten() {
            if !zygote.ready {
                zygote.kill();
            }
        }
        let ids: Vec<u32> = self.workers.keys().copied().collect();
        tracing::debug!(workers = ids.len(), signal = %sig, "signalling the workers");
        for id in ids {
            // A worker still importing the app has no handlers yet (SIGQUIT's default would dump core) and
            // nothing in flight: it is killed outright.
            let starting = self.workers.get(&id).is_some_and(|w| w.state == State::Starting);
            // Even a worker already stopping gets the signal again, so a fast stop overrides a graceful one.
            self.signal_worker(id, if starting { Signal::SIGKILL } else { sig });
        }
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while !self.workers.is_empty() {
            tokio::select! {
                _ = tick.tick() => self.kill_overdue(),
                Some(event) = self.events_rx.recv() => {
                    if let Event::Exited(id, status) = event {
                        self.metrics().worker_exited(id);
                        if let Some(w) = self.forget(id) {
                            tracing::info!(worker = id, pid = w.pid, status = %describe(status), "worker exited");
                        }
                    }
                }
            }
        }
        tracing::info!("stopped");
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

async fn wait_child(mut child: tokio::process::Child) -> std::io::Result<ExitStatus> {
    child.wait().await
}

/// Waits for a worker this process adopted (under `--preload`) to exit, and returns its status without reaping
/// it (`WNOWAIT`: the master reaps it when it forgets the worker, so the pid stays its own until then).
/// Adopted processes are not tokio's children: each SIGCHLD wakes this to look at the one pid (with a slow
/// timer as well, in case a signal was missed).
async fn reap_adopted(pid: u32) -> ExitStatus {
    let mut sigchld = signal(SignalKind::child()).ok();
    loop {
        match exit_status_of(pid) {
            Ok(Some(status)) => return status,
            Ok(None) => {}
            Err(error) if error.raw_os_error() == Some(libc::EINTR) => continue,
            Err(error) => {
                tracing::error!(pid, %error, "cannot wait for a preloaded worker; counting it as exited");
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
fn exit_status_of(pid: u32) -> std::io::Result<Option<ExitStatus>> {
    // SAFETY: an all-zero siginfo_t is a valid value to be filled in.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on a specific pid with a valid siginfo_t; WNOHANG returns at once, WNOWAIT leaves the
    // child waitable.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
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
    if exited != pid as libc::pid_t {
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

/// What a worker (or the zygote) that exited during start-up means for the master: the app could not be
/// loaded, or the process crashed.
fn startup_failure(pid: u32, status: ExitStatus) -> MasterError {
    if status.code() == Some(EXIT_APP_LOAD) {
        MasterError::AppLoad
    } else {
        MasterError::StartupCrash {
            pid,
            status: describe(status),
        }
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => status.to_string(),
    }
}

/// Serves `--metrics`: any uwsgi request gets the Prometheus text exposition (a ping gets a pong).
async fn serve_metrics(listener: Listener, metrics: Arc<Mutex<MasterMetrics>>, queues: Vec<(String, OwnedFd)>) {
    let queues = Arc::new(queues);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = Arc::clone(&metrics);
        let queues = Arc::clone(&queues);
        tokio::spawn(async move {
            let answered = tokio::time::timeout(Duration::from_secs(5), answer_scrape(stream, &metrics, &queues)).await;
            if !matches!(answered, Ok(Ok(()))) {
                tracing::debug!("metrics: a scrape did not complete");
            }
        });
    }
}

async fn answer_scrape(
    mut stream: Stream,
    metrics: &Mutex<MasterMetrics>,
    queues: &[(String, OwnedFd)],
) -> std::io::Result<()> {
    let mut header = [0u8; crate::packet::HEADER_LEN];
    stream.read_exact(&mut header).await?;
    if let Some(proto) = crate::packet::sniff_foreign_protocol(&header) {
        tracing::warn!(
            protocol = proto,
            "metrics: {}",
            crate::packet::foreign_protocol_hint(proto)
        );
        return stream.shutdown().await;
    }
    let Ok((_, header)) = crate::packet::parse_uwsgi_header(&header) else {
        return Ok(());
    };
    let mut vars = vec![0u8; usize::from(header.datasize)];
    stream.read_exact(&mut vars).await?;
    if header.modifier1 == crate::packet::MODIFIER_PING {
        stream.write_all(&crate::packet::PONG).await?;
        return stream.shutdown().await;
    }
    let depths: Vec<(String, u64)> = queues
        .iter()
        .filter_map(|(name, fd)| Some((name.clone(), listener::listen_queue_depth(fd)?)))
        .collect();
    let body = metrics.lock().unwrap_or_else(|e| e.into_inner()).render(&depths);
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
