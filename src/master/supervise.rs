//! The supervision loop: one `Master` holds the owners (the worker table, the zygotes, the ticket keys, the
//! process spawner) and one loop dispatches to them: signals from the operator, events from the children
//! (a control line's message, an exit), and a tick for deadlines. Only this loop changes the state, so no
//! owner needs a lock.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::Config;
use crate::control::EXIT_APP_LOAD;
use crate::lifecycle::RetireReason;
use crate::metrics::MasterMetrics;

use super::backoff::Backoff;
use super::binding::Bound;
use super::error::LOG;
use super::error::MasterError;
use super::events::Event;
use super::ids::{ChildPid, WorkerId};
use super::reload;
use super::scaling::{Change, Scaling, Sight};
use super::scrape;
use super::sizing;
use super::spawn::{self, Launch, SpawnError, Spawner, describe, startup_failure};
use super::tickets::Tickets;
use super::watch::Watch;
use super::workers::{State, Worker, Workers};
use super::zygote::{self, Preloaded, STRAY_SWEEP, Zygotes};

/// How long a graceful stop waits for the zygotes to exit (they do as soon as their fork channel closes)
/// before it stops the workers anyway.
const ZYGOTE_EXIT: Duration = Duration::from_secs(5);

struct Master<'s> {
    config: Arc<Config>,
    spawner: Spawner,
    /// The sockets the workers inherit: bound before this value lives, and removed after it, or at the start of
    /// a graceful stop (`release_sockets`).
    bound: &'s mut Bound,
    /// The master's copies of the TCP sockets `--metrics` reports the queues of.
    queues: scrape::Queues,
    workers: Workers,
    generation: u32,
    desired: usize,
    /// `--max-workers`: the floor and ceiling of `desired`, and when to move it with the load.
    scaling: Scaling,
    /// The memory check of `--workers` against the cgroup's limit is made once, on the first worker ready.
    memory_checked: bool,
    crashes: Backoff,
    respawn_pending: bool,
    /// Under `--preload`: the zygote the workers are forked from, and during a reload the one importing the
    /// new code.
    zygotes: Zygotes,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    metrics: Arc<Mutex<MasterMetrics>>,
    /// The session-ticket keys every worker of a tls:// socket shares (a session resumes on any worker).
    tickets: Tickets,
    /// `--reload` and `--touch-reload`: the files whose change reloads.
    watch: Watch,
}

/// Runs the master on the bound sockets until a stop signal, with `--metrics` served beside it.
pub(super) async fn run(config: Config, launch: Launch, bound: &mut Bound) -> Result<(), MasterError> {
    let metrics = Arc::new(Mutex::new(MasterMetrics::default()));
    let queues = match &bound.metrics {
        Some(socket) => scrape::start(socket, &bound.sockets, &metrics)?,
        None => scrape::Queues::default(),
    };
    Master::new(Arc::new(config), launch, bound, metrics, queues)
        .run()
        .await
}

impl<'s> Master<'s> {
    fn new(
        config: Arc<Config>,
        launch: Launch,
        bound: &'s mut Bound,
        metrics: Arc<Mutex<MasterMetrics>>,
        queues: scrape::Queues,
    ) -> Master<'s> {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let fds = bound.sockets.iter().map(|s| s.fd.as_raw_fd()).collect();
        let watch = Watch::start(&config, &events_tx);
        Master {
            desired: config.workers.count,
            scaling: Scaling::new(&config),
            memory_checked: false,
            config,
            spawner: Spawner::new(launch, fds),
            bound,
            queues,
            workers: Workers::new(),
            generation: 0,
            crashes: Backoff::default(),
            respawn_pending: false,
            zygotes: Zygotes::new(events_tx.clone()),
            events_tx,
            events_rx,
            metrics,
            tickets: Tickets::default(),
            watch,
        }
    }

    async fn run(mut self) -> Result<(), MasterError> {
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut quit = signal(SignalKind::quit())?;
        let mut ttin = signal(SignalKind::from_raw(libc::SIGTTIN))?;
        let mut ttou = signal(SignalKind::from_raw(libc::SIGTTOU))?;

        sizing::log_counts(&self.config);
        self.start_up().await?;
        tracing::info!(target: LOG, workers = self.desired, pid = std::process::id(), "ready");

        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut last_sweep = Instant::now();
        // The signal received, and the one the workers get: SIGINT (Ctrl-C) stops them fast, like SIGQUIT.
        let (received, stop_signal) = loop {
            tokio::select! {
                _ = hup.recv() => self.reload("SIGHUP"),
                _ = term.recv() => break (Signal::SIGTERM, Signal::SIGTERM),
                _ = int.recv() => break (Signal::SIGINT, Signal::SIGQUIT),
                _ = quit.recv() => break (Signal::SIGQUIT, Signal::SIGQUIT),
                _ = ttin.recv() => self.one_more(),
                _ = ttou.recv() => self.one_fewer(),
                _ = tick.tick() => {
                    self.workers.kill_overdue();
                    self.scale();
                    self.tickets.rotate(&self.config, &mut self.workers);
                    if self.config.fixed.preload && last_sweep.elapsed() >= STRAY_SWEEP {
                        last_sweep = Instant::now();
                        zygote::reap_strays(|pid| self.workers.knows_pid(pid) || self.zygotes.knows_pid(pid));
                    }
                }
                Some(event) = self.events_rx.recv() => self.on_event(event),
            }
        };
        tracing::info!(target: LOG, signal = %received, "stopping");
        if received == Signal::SIGTERM {
            self.release_sockets().await;
        }
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
        while self.workers.any_starting() {
            let Some(event) = self.events_rx.recv().await else {
                break;
            };
            match event {
                Event::Exited(id, status) => {
                    let pid = self.workers.forget(id).map(|w| w.pid);
                    if !self.workers.is_empty() {
                        tracing::info!(target: LOG,
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
        let pid = self
            .zygotes
            .start_first(&self.spawner, &self.settings())
            .map_err(|error| self.spawner.error(&self.config, error))?;
        while let Some(event) = self.events_rx.recv().await {
            match event {
                Event::ZygoteReady(ready) if ready == pid => {
                    self.zygotes.first_ready();
                    return Ok(());
                }
                Event::ZygoteExited(exited, status) if exited == pid => {
                    self.zygotes.first_failed();
                    return Err(startup_failure(Some(pid), status));
                }
                other => self.on_event(other),
            }
        }
        Ok(())
    }

    /// The settings a new worker or zygote gets: the current ones, counting `desired` workers (one added by
    /// SIGTTIN knows it is not alone).
    fn settings(&self) -> Config {
        let mut config = (*self.config).clone();
        config.workers.count = config.workers.most().max(self.desired);
        config
    }

    /// Starts one worker: a new process, or under `--preload` a fork of the preloaded app.
    fn spawn(&mut self) -> Result<WorkerId, SpawnError> {
        if self.config.fixed.preload {
            return self.fork_worker();
        }
        let id = self.workers.next_id();
        let settings = self.settings();
        let (tickets, workers, config) = (&mut self.tickets, &mut self.workers, &self.config);
        let (pid, ours) = self.spawner.start_worker(
            id,
            &settings,
            |line| tickets.send_to_new(line, config, workers),
            &self.events_tx,
        )?;
        self.watch_worker(id, pid, false, ours)?;
        Ok(id)
    }

    /// Under `--preload`: asks the zygote for a worker. Without a ready zygote (it is being started again) no
    /// worker is made now: they are when it is ready.
    fn fork_worker(&mut self) -> Result<WorkerId, SpawnError> {
        if !self.zygotes.is_ready() {
            return Err(SpawnError::NotPreloaded);
        }
        let (ours, theirs) = UnixStream::pair()?;
        // Waiting on the line when the forked worker starts to read it.
        self.tickets.send_to_new(&ours, &self.config, &mut self.workers)?;
        let id = self.workers.next_id();
        let workers = self.config.workers.most().max(self.desired);
        let pid = self.zygotes.fork(id, workers, theirs.as_fd())?;
        drop(theirs);
        self.watch_worker(id, pid, true, ours)?;
        Ok(id)
    }

    /// Registers a started worker and reads its control line.
    fn watch_worker(&mut self, id: WorkerId, pid: ChildPid, adopted: bool, ours: UnixStream) -> std::io::Result<()> {
        self.metrics().worker_started(id.get(), pid.get());
        let worker = Worker {
            pid,
            adopted,
            generation: self.generation,
            state: State::Starting,
            retiring: None,
            control: ours.try_clone().ok(),
            unavailable: false,
        };
        self.workers.insert(id, worker);
        tracing::info!(target: LOG,
            worker = id.get(),
            pid = pid.get(),
            generation = self.generation,
            "worker started"
        );
        spawn::read_control_line(ours, &self.events_tx, spawn::worker_event(id))
    }

    fn spawn_error(&self, error: SpawnError) -> MasterError {
        match error {
            SpawnError::Process(error) => self.spawner.error(&self.config, error),
            SpawnError::Fork(error) => MasterError::Fork(error),
            SpawnError::NotPreloaded => MasterError::NotPreloaded,
        }
    }

    /// SIGHUP, or a change to a watched file (`cause`): read the configuration again, then start a new
    /// generation; each old worker stops as soon as a new one is ready, so the app is re-imported with no gap
    /// in service. An invalid configuration is refused and the current workers keep serving.
    fn reload(&mut self, cause: &str) {
        match reload::reread(self.spawner.argv(), &self.config) {
            Ok(config) => {
                self.scaling.reconfigure(&self.config, &config);
                if self.scaling.bounded() {
                    // Adaptive workers keep the count the load gave them, within the new floor and ceiling.
                    self.desired = self.scaling.keep(self.desired);
                } else if config.workers.count != self.config.workers.count {
                    self.desired = config.workers.count;
                }
                sizing::log_counts(&config);
                self.config = Arc::new(config);
            }
            Err(error) => {
                tracing::error!(target: LOG, %error, "reload refused: the configuration is invalid; the current workers keep serving");
                return;
            }
        }
        self.generation += 1;
        if self.config.fixed.preload {
            // The new code is imported in a new zygote first; the workers are replaced only once it is ready,
            // and if it fails the current workers and zygote stay.
            tracing::info!(target: LOG,
                generation = self.generation,
                workers = self.desired,
                "{cause}: reloading; importing the new code in a new zygote"
            );
            let settings = self.settings();
            self.zygotes
                .preload_new_code(&self.spawner, &self.config, &settings, self.generation);
            return;
        }
        tracing::info!(target: LOG,
            generation = self.generation,
            workers = self.desired,
            "{cause}: reloading"
        );
        self.replace_workers();
    }

    /// Starts a new generation of workers; each old one stops as soon as a new one is ready.
    fn replace_workers(&mut self) {
        let old = self.workers.replace_all_later();
        self.metrics().restarted("reload", old as u64);
        for _ in 0..self.desired {
            self.spawn_or_log();
        }
    }

    /// A worker of the new generation could not load what the reload brought: its siblings still starting
    /// are killed, and the old workers stay.
    fn abort_reload(&mut self, generation: u32) {
        for id in self.workers.cancel_generation(generation) {
            self.workers
                .stop(id, Signal::SIGKILL, self.config.workers.graceful_timeout);
        }
    }

    fn metrics(&self) -> MutexGuard<'_, MasterMetrics> {
        // A poisoned lock only means a scrape panicked mid-render; the counts themselves are intact.
        crate::sync::lock(&self.metrics)
    }

    fn spawn_or_log(&mut self) {
        match self.spawn() {
            Ok(_) => {}
            // Under --preload while the zygote imports the app again: the workers are forked once it is ready.
            Err(SpawnError::NotPreloaded) => tracing::debug!(target: LOG, "a worker waits for the zygote"),
            Err(error) => tracing::error!(target: LOG, "{}", self.spawn_error(error)),
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Ready(id) => self.on_ready(id),
            Event::Retire(id, reason) => self.on_retire(id, reason),
            Event::Stats(id, snapshot) => {
                self.scaling.reported(id, snapshot.in_flight);
                self.metrics().update(id.get(), *snapshot);
            }
            Event::Exited(id, status) => self.on_exit(id, status),
            Event::Respawn => {
                self.respawn_pending = false;
                self.fill_up();
            }
            Event::ZygoteReady(pid) => match self.zygotes.on_ready(pid) {
                Preloaded::NewCode => self.replace_workers(),
                Preloaded::Again => self.fill_up(),
                Preloaded::Stale => {}
            },
            Event::ZygoteExited(pid, status) => self.zygotes.on_exit(pid, status),
            Event::Unavailable(id) => self.on_unavailable(id),
            Event::ZygoteUnavailable(pid) => self.zygotes.on_unavailable(pid),
            Event::Files(files) => self.watch.add(files),
            Event::FilesDone => self.watch.report_done(),
            Event::Changed { file, others } => {
                tracing::info!(target: LOG, file = %file.display(), others, "a watched file changed");
                self.reload("file change");
            }
            Event::RestartZygote => {
                let settings = self.settings();
                self.zygotes
                    .restart(&self.spawner, &self.config, &settings, self.generation);
            }
        }
    }

    fn on_ready(&mut self, id: WorkerId) {
        let Some(w) = self.workers.get_mut(id) else { return };
        if w.state == State::Starting {
            w.state = State::Ready;
        }
        let pid = w.pid;
        tracing::info!(target: LOG, worker = id.get(), pid = pid.get(), "worker ready");
        if !self.memory_checked {
            self.memory_checked = true;
            sizing::check_memory(
                pid.get(),
                self.config.workers.most().max(self.desired),
                self.config.fixed.preload,
            );
        }
        // A new worker is serving: the oldest one waiting for a replacement can go.
        if let Some(old) = self.workers.next_to_replace() {
            self.workers
                .stop(old, Signal::SIGTERM, self.config.workers.graceful_timeout);
        }
    }

    /// Under `--reload`, a worker whose app did not import: in a reload while the previous workers serve the
    /// app, the reload failed (as when such a worker exits without `--reload`); otherwise it answers 503 until
    /// the next change to a watched file.
    fn on_unavailable(&mut self, id: WorkerId) {
        let Some(w) = self.workers.get_mut(id) else { return };
        w.unavailable = true;
        let (generation, pid) = (w.generation, w.pid.get());
        if self.workers.any_serving_older_than(generation) {
            tracing::error!(target: LOG,
                worker = id.get(),
                pid,
                "reload failed: the new code could not be loaded; the previous workers keep serving"
            );
            self.abort_reload(generation);
        }
    }

    fn on_retire(&mut self, id: WorkerId, reason: RetireReason) {
        let Some(w) = self.workers.get_mut(id) else { return };
        if w.retiring.is_some() || w.is_stopping() {
            return;
        }
        w.retiring = Some(reason);
        let pid = w.pid;
        self.metrics().restarted(reason.as_str(), 1);
        tracing::info!(target: LOG,
            worker = id.get(),
            pid = pid.get(),
            reason = reason.as_str(),
            "replacing worker"
        );
        self.workers.replace_later(id);
        self.spawn_or_log();
    }

    /// Starts workers until `desired` are serving or starting (not counting those on their way out).
    fn fill_up(&mut self) {
        for _ in self.workers.active()..self.desired {
            self.spawn_or_log();
        }
    }

    fn on_exit(&mut self, id: WorkerId, status: ExitStatus) {
        self.metrics().worker_exited(id.get());
        self.scaling.forget(id);
        let Some(w) = self.workers.forget(id) else { return };
        let (worker, pid) = (id.get(), w.pid.get());
        if w.is_stopping() {
            tracing::info!(target: LOG, worker, pid, status = %describe(status), "worker exited");
            return;
        }
        if w.retiring.is_some() {
            // It left before its replacement was ready (a timed-out worker drains and exits by itself); the
            // replacement is already on its way.
            tracing::info!(target: LOG, worker, pid, status = %describe(status), "retired worker exited");
            return;
        }
        // A worker of a reload that could not load what the reload brought (the app, the TLS files) ends the
        // reload. Outside a reload (a replacement after a crash or a retirement) it is a crash: retried with
        // the back-off, the cause in the worker's own log line, until it loads (a renewed certificate, say).
        let reloading = self.workers.any_older_than(w.generation);
        if w.state == State::Starting && w.generation > 0 && reloading && status.code() == Some(EXIT_APP_LOAD) {
            tracing::error!(target: LOG,
                worker,
                pid,
                "reload failed: the new code could not be loaded; the previous workers keep serving"
            );
            self.abort_reload(w.generation);
            return;
        }
        tracing::error!(target: LOG, worker, pid, status = %describe(status), "worker died; replacing it");
        self.metrics().restarted("crash", 1);
        self.schedule_respawn();
    }

    /// Respawns after a crash, backing off when crashes repeat so a crashing app does not spin the CPU.
    fn schedule_respawn(&mut self) {
        let (recent, delay) = self.crashes.crashed();
        if self.respawn_pending {
            return;
        }
        self.respawn_pending = true;
        if !delay.is_zero() {
            tracing::warn!(target: LOG, recent_crashes = recent, delay = ?delay, "workers keep dying; backing off");
        }
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Event::Respawn);
        });
    }

    /// SIGTTIN: one worker more; with `--max-workers`, the floor one higher (up to the ceiling).
    fn one_more(&mut self) {
        if !self.scaling.raise_floor() {
            tracing::info!(target: LOG, workers = self.desired, "SIGTTIN: already at --max-workers");
            return;
        }
        if self.desired >= self.scaling.floor() {
            tracing::info!(target: LOG, floor = self.scaling.floor(), workers = self.desired, "SIGTTIN: the floor one higher");
            return;
        }
        self.desired += 1;
        tracing::info!(target: LOG, workers = self.desired, "SIGTTIN: one worker more");
        self.spawn_or_log();
    }

    /// SIGTTOU: one worker fewer; with `--max-workers`, the floor one lower (a worker the load added stays
    /// until it is idle).
    fn one_fewer(&mut self) {
        let at_floor = self.desired <= self.scaling.floor();
        if !self.scaling.lower_floor() {
            tracing::info!(target: LOG, "SIGTTOU: already at one worker");
            return;
        }
        if !at_floor {
            tracing::info!(target: LOG, floor = self.scaling.floor(), workers = self.desired, "SIGTTOU: the floor one lower");
            return;
        }
        self.desired -= 1;
        tracing::info!(target: LOG, workers = self.desired, "SIGTTOU: one worker fewer");
        self.retire_newest();
    }

    fn retire_newest(&mut self) -> Option<WorkerId> {
        let id = self.workers.newest_active()?;
        self.scaling.forget(id);
        self.workers
            .stop(id, Signal::SIGTERM, self.config.workers.graceful_timeout);
        Some(id)
    }

    /// `--max-workers`: one worker more while requests wait, one fewer while a worker's worth of threads idles.
    fn scale(&mut self) {
        if !self.scaling.bounded() {
            return;
        }
        let serving = self.workers.serving();
        let queued = self
            .bound
            .sockets
            .iter()
            .filter(|s| !s.is_unix())
            .filter_map(|s| crate::listener::listen_queue_depth(&s.fd))
            .sum();
        let sight = Sight {
            serving: &serving,
            starting: self.workers.any_starting() || self.workers.active() != self.desired,
            queued,
        };
        match self.scaling.decide(Instant::now(), self.desired, &sight) {
            None => {}
            Some(Change::Up { busy, threads, queued }) => {
                self.desired += 1;
                self.metrics().scaled(true);
                tracing::info!(target: LOG,
                    workers = self.desired,
                    busy_threads = busy,
                    threads,
                    listen_queue = queued,
                    waited = ?self.config.workers.scale_up_after,
                    "scaling up: requests waited"
                );
                self.spawn_or_log();
            }
            Some(Change::Down { idle, threads }) => {
                self.desired -= 1;
                self.metrics().scaled(false);
                let worker = self.retire_newest().map(WorkerId::get);
                tracing::info!(target: LOG,
                    workers = self.desired,
                    worker,
                    idle_threads = idle,
                    threads,
                    idle_for = ?self.config.workers.scale_down_after,
                    "scaling down: threads idle"
                );
            }
        }
    }

    /// A graceful stop, before the workers are told: new connections are turned away first (the socket files
    /// go, a TCP socket drops new handshakes), so that nginx tries another server; then the zygotes exit and
    /// the master closes its own copies of the sockets it bound, so that the workers hold them last. Each worker takes every connection still queued
    /// before it closes its copy (see `server`), and the last close of a listening socket resets whatever is
    /// queued on it: done the other way round, the master's exit would reset what arrived during the drain.
    async fn release_sockets(&mut self) {
        self.bound.refuse_new_connections();
        self.zygotes.stop();
        let deadline = Instant::now() + ZYGOTE_EXIT;
        while self.zygotes.any_running() {
            let Ok(Some(event)) = tokio::time::timeout_at(deadline, self.events_rx.recv()).await else {
                tracing::warn!(target: LOG, "a zygote did not exit in time; the stop goes on without waiting for it");
                break;
            };
            match event {
                Event::ZygoteExited(pid, status) => self.zygotes.on_exit(pid, status),
                Event::Exited(id, status) => self.on_stopped(id, status),
                Event::Stats(id, snapshot) => self.metrics().update(id.get(), *snapshot),
                // A worker that became ready may be serving: it is to be stopped gracefully, not killed.
                Event::Ready(id) => {
                    if let Some(w) = self.workers.get_mut(id).filter(|w| w.state == State::Starting) {
                        w.state = State::Ready;
                    }
                }
                // Nothing starts any more: a retirement, a respawn, a zygote's restart.
                _ => {}
            }
        }
        self.bound.close_own();
        self.queues.close();
    }

    /// A worker exited during a stop: it is only forgotten, never replaced.
    fn on_stopped(&mut self, id: WorkerId, status: ExitStatus) {
        self.metrics().worker_exited(id.get());
        if let Some(w) = self.workers.forget(id) {
            tracing::info!(target: LOG, worker = id.get(), pid = w.pid.get(), status = %describe(status), "worker exited");
        }
    }

    /// Stops every worker and waits for all of them (killing the overdue).
    async fn stop_all(&mut self, sig: Signal) {
        self.zygotes.stop();
        let ids = self.workers.ids();
        tracing::debug!(target: LOG, workers = ids.len(), signal = %sig, "signalling the workers");
        for id in ids {
            // A worker still importing the app has no handlers yet (SIGQUIT's default would dump core) and
            // nothing in flight: it is killed outright.
            let starting = self.workers.get_mut(id).is_some_and(|w| w.state == State::Starting);
            // Even a worker already stopping gets the signal again, so a fast stop overrides a graceful one.
            let sig = if starting { Signal::SIGKILL } else { sig };
            self.workers.signal(id, sig, self.config.workers.graceful_timeout);
        }
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while !self.workers.is_empty() {
            tokio::select! {
                _ = tick.tick() => self.workers.kill_overdue(),
                Some(event) = self.events_rx.recv() => {
                    if let Event::Exited(id, status) = event {
                        self.on_stopped(id, status);
                    }
                }
            }
        }
        tracing::info!(target: LOG, "stopped");
    }
}
