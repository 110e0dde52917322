//! The worker's serving loop. The app threads accept connections themselves, each only while it is free, so a
//! busy worker leaves new connections in the shared listen queue for an idle one; a request that is already
//! queued in full is run on the spot by the thread that accepted it. This module's runtime takes the
//! connections that need waiting (slow peers, large bodies, refusals) and queues their requests for the next
//! free thread. On a stop signal (or a retirement that requires it) the threads stop accepting and the requests
//! in flight are drained under a time limit.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use socket2::Socket;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::app::{AppPool, Job, JobSource};
use crate::connection::{self, ConnShared, Queued};
use crate::listener::{self, BoundSocket};
use crate::worker::{Control, RetireReason};

/// How the worker was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM, a timed-out request, or the master gone: finish in-flight requests (up to the graceful timeout).
    Graceful,
    /// SIGINT or SIGQUIT: stop now.
    Fast,
}

/// How often a stopping worker checks whether its requests have drained.
const DRAIN_POLL: Duration = Duration::from_millis(10);
/// How long an idle app thread sleeps before it looks again on its own (it is normally woken well before).
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// How long an app thread backs off after accept failed (out of descriptors or memory).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves until told to stop, then drains.
pub async fn run(
    sockets: Vec<BoundSocket>,
    pool: &AppPool,
    shared: Arc<ConnShared>,
    mut retire_rx: mpsc::UnboundedReceiver<RetireReason>,
    mut control: Control,
) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut quit = signal(SignalKind::quit())?;
    let master_gone = control.master_gone()?;
    tokio::pin!(master_gone);

    let hub = Arc::new(Hub::new(sockets, Arc::clone(&shared))?);
    let intakes = (0..pool.threads())
        .map(|_| Intake::new(&hub).map(|i| Box::new(i) as Box<dyn JobSource>))
        .collect::<std::io::Result<Vec<_>>>()?;
    pool.run(intakes)?;
    tokio::spawn(connection::watch_timeouts(Arc::clone(&shared)));
    control.send("ready");
    tracing::info!(threads = pool.threads(), "ready");

    // Counters go to the master once a second, which is plenty for a scrape interval of seconds.
    let mut report = tokio::time::interval(Duration::from_secs(1));
    let stop = loop {
        tokio::select! {
            _ = report.tick() => control.send(&shared.metrics.snapshot().encode()),
            _ = term.recv() => break Stop::Graceful,
            _ = int.recv() => break Stop::Fast,
            _ = quit.recv() => break Stop::Fast,
            () = &mut master_gone => {
                tracing::warn!("the master process went away; stopping");
                break Stop::Graceful;
            }
            Some(reason) = retire_rx.recv() => {
                tracing::info!(reason = reason.as_str(), served = shared.lifecycle.served(), "asking to be replaced");
                control.send(&format!("retire {}", reason.as_str()));
                // A worker with a stuck request is unhealthy: it stops taking connections now. Recycling keeps
                // serving until the master has a replacement ready and sends SIGTERM.
                if reason == RetireReason::Timeout {
                    break Stop::Graceful;
                }
            }
        }
    };
    hub.stop();
    let limit = match stop {
        Stop::Graceful => shared.config.graceful_timeout,
        Stop::Fast => Duration::ZERO,
    };
    if hub.in_flight() > 0 {
        tracing::info!(in_flight = hub.in_flight(), ?stop, "waiting for in-flight requests");
    }
    let deadline = Instant::now() + limit;
    while hub.in_flight() > 0 {
        if Instant::now() >= deadline {
            tracing::warn!(cut_off = hub.in_flight(), timeout = ?limit, "stop cut off requests still in flight");
            break;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
    control.send(&shared.metrics.snapshot().encode());
    tracing::info!(served = shared.lifecycle.served(), "worker stopped");
    Ok(())
}

/// What the app threads and the async side share.
struct Hub {
    /// The listening sockets, with the names the log uses for them.
    listeners: Vec<(OwnedFd, String)>,
    shared: Arc<ConnShared>,
    /// Requests the async side has read, waiting for an app thread.
    ready_tx: crossbeam_channel::Sender<Job>,
    ready_rx: crossbeam_channel::Receiver<Job>,
    /// One count per queued request (a semaphore eventfd), so each wakes one idle app thread.
    ready_signal: EventFd,
    /// Readable once the worker stops: wakes every idle app thread.
    stop_signal: EventFd,
    stopping: AtomicBool,
    /// App threads between accepting a connection and handing it on: a stop waits for them, so a connection
    /// accepted just as the stop began is still served.
    accepting: AtomicUsize,
    /// Connections the async side is reading.
    reading: TaskTracker,
    runtime: tokio::runtime::Handle,
    /// When the app threads last warned that --max-connections was reached.
    full_warned: std::sync::Mutex<Option<Instant>>,
    /// Failed accepts since the last one that worked: the first is logged, the rest counted, so running out
    /// of descriptors is one line (and one when it clears), not one per thread every backoff.
    accept_failures: std::sync::atomic::AtomicU64,
}

impl Hub {
    fn new(sockets: Vec<BoundSocket>, shared: Arc<ConnShared>) -> std::io::Result<Hub> {
        let listeners = sockets
            .into_iter()
            .map(|b| {
                let name = b.display_addr();
                (b.fd, name)
            })
            .collect();
        let (ready_tx, ready_rx) = crossbeam_channel::unbounded();
        let flags = EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK;
        Ok(Hub {
            listeners,
            shared,
            ready_tx,
            ready_rx,
            ready_signal: EventFd::from_flags(flags | EfdFlags::EFD_SEMAPHORE)?,
            stop_signal: EventFd::from_flags(flags)?,
            stopping: AtomicBool::new(false),
            accepting: AtomicUsize::new(0),
            reading: TaskTracker::new(),
            runtime: tokio::runtime::Handle::current(),
            full_warned: std::sync::Mutex::new(None),
            accept_failures: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.stop_signal.write(1);
        self.reading.close();
    }

    /// Connections being accepted or read, requests queued, and requests running that have not timed out.
    fn in_flight(&self) -> usize {
        self.accepting.load(Ordering::SeqCst)
            + self.reading.len()
            + self.ready_rx.len()
            + self.shared.active.load(Ordering::SeqCst)
    }

    /// Queues a request the async side has read.
    fn queue(&self, job: Job) {
        // The receiver lives as long as the hub, which owns it.
        let _ = self.ready_tx.send(job);
        let _ = self.ready_signal.write(1);
    }

    /// A queued request, if there is one for this thread.
    fn take_queued(&self) -> Option<Job> {
        if self.ready_rx.is_empty() {
            return None;
        }
        // Each count was added after its request was queued, so taking a count guarantees a request.
        self.ready_signal.read().ok()?;
        self.ready_rx.try_recv().ok()
    }

    /// Passes a connection whose request is not (all) there yet to the async side.
    fn pass_on(self: &Arc<Self>, socket: Socket, tcp: bool, span: tracing::Span) {
        let hub = Arc::clone(self);
        let read = async move {
            if let Some(job) = connection::serve(socket, tcp, Arc::clone(&hub.shared)).await {
                hub.queue(job);
            }
        };
        self.reading.spawn_on(read.instrument(span), &self.runtime);
    }

    fn accept_failed(&self, error: &std::io::Error, listener: &str) {
        if self.accept_failures.fetch_add(1, Ordering::SeqCst) > 0 {
            return;
        }
        if error.raw_os_error() == Some(libc::EMFILE) || error.raw_os_error() == Some(libc::ENFILE) {
            tracing::error!(
                %error,
                listener,
                "accept failed: out of file descriptors; new connections wait in the listen queue until some \
                 close (raise the open-file limit, LimitNOFILE= or ulimit -n, or lower --max-connections)"
            );
        } else {
            tracing::error!(%error, listener, "accept failed; retrying");
        }
    }

    fn accept_worked(&self) {
        if self.accept_failures.load(Ordering::Relaxed) == 0 {
            return;
        }
        let failed = self.accept_failures.swap(0, Ordering::SeqCst);
        if failed > 0 {
            tracing::warn!(failed_attempts = failed, "accepting connections again");
        }
    }

    fn allowed(&self, peer: Option<std::net::SocketAddr>, listener: &str) -> bool {
        let (Some(addr), allowed) = (peer, &self.shared.config.allow_from) else {
            return true;
        };
        if allowed.is_empty() || allowed.iter().any(|net| net.contains(addr.ip())) {
            return true;
        }
        tracing::warn!(peer = %addr, listener, "refusing a connection not in --allow-from");
        false
    }

    /// Whether the async side holds as many connections as --max-connections allows.
    fn full(&self) -> bool {
        let limit = self.shared.config.max_connections;
        if self.reading.len() < limit {
            return false;
        }
        let mut warned = self.full_warned.lock().unwrap_or_else(|e| e.into_inner());
        if warned.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            *warned = Some(Instant::now());
            tracing::warn!(
                limit,
                "connection limit reached; new connections wait in the listen queue"
            );
        }
        true
    }
}

/// One app thread's way to its next request.
struct Intake {
    hub: Arc<Hub>,
    /// Wakes this thread for a new connection (one thread per connection: EPOLLEXCLUSIVE), a queued request,
    /// or the stop. Dropped once the worker stops, so wake-ups go to threads that still accept.
    epoll: Option<Epoll>,
    /// The last wait reported a listener ready, so accepting is worth a try. After a request the thread waits
    /// first: epoll answers at once when a connection is queued, and most of the time none is, which an
    /// accept would only find out with a failed syscall.
    listener_ready: bool,
}

/// Epoll tags: which of the registered descriptors is ready.
const LISTENER_EVENT: u64 = 0;
const OTHER_EVENT: u64 = 1;

/// What one round of accepting gave.
// Made once per connection and taken apart at once: boxing the request would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Accepted {
    Job(Job),
    /// A connection was dealt with (passed on or refused): look again before waiting.
    Handled,
    Nothing,
}

impl Intake {
    fn new(hub: &Arc<Hub>) -> std::io::Result<Intake> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let one = EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE;
        for (fd, _) in &hub.listeners {
            epoll.add(fd, EpollEvent::new(one, LISTENER_EVENT))?;
        }
        epoll.add(&hub.ready_signal, EpollEvent::new(one, OTHER_EVENT))?;
        epoll.add(&hub.stop_signal, EpollEvent::new(EpollFlags::EPOLLIN, OTHER_EVENT))?;
        Ok(Intake {
            hub: Arc::clone(hub),
            epoll: Some(epoll),
            listener_ready: true,
        })
    }

    /// Accepts on each listener until one gives a connection.
    fn accept(&self) -> Accepted {
        let hub = &self.hub;
        for (fd, name) in &hub.listeners {
            let (socket, peer) = match listener::accept_now(fd) {
                Ok(Some(accepted)) => accepted,
                Ok(None) => continue,
                Err(error) => {
                    hub.accept_failed(&error, name);
                    std::thread::sleep(ACCEPT_BACKOFF);
                    return Accepted::Handled;
                }
            };
            hub.accept_worked();
            if !hub.allowed(peer, name) {
                return Accepted::Handled;
            }
            let span = connection::conn_span(peer, name);
            let tcp = peer.is_some();
            return match connection::read_queued(socket, tcp, span.clone(), &hub.shared) {
                Queued::Job(job) => Accepted::Job(job),
                Queued::PassOn(socket) => {
                    hub.pass_on(socket, tcp, span);
                    Accepted::Handled
                }
            };
        }
        Accepted::Nothing
    }

    /// Waits for a queued request only (the worker is stopping, or the async side is full).
    fn wait_queued(&self, timeout: Duration) -> Option<Job> {
        let hub = &self.hub;
        let job = hub.ready_rx.recv_timeout(timeout).ok();
        if job.is_some() {
            let _ = hub.ready_signal.read();
        }
        job
    }
}

impl JobSource for Intake {
    fn next(&mut self) -> Option<Job> {
        loop {
            let hub = &self.hub;
            if let Some(job) = hub.take_queued() {
                return Some(job);
            }
            // Counted before the stop flag is read: a stop that begins now waits for this thread to hand on
            // whatever it accepts.
            hub.accepting.fetch_add(1, Ordering::SeqCst);
            // A worker over --reload-on-rss takes no new connections either: they go to the other workers and
            // its replacement, while its requests in flight and queued finish.
            if hub.stopping.load(Ordering::SeqCst) || hub.shared.lifecycle.over_memory() {
                hub.accepting.fetch_sub(1, Ordering::SeqCst);
                self.epoll = None;
                if let Some(job) = self.wait_queued(IDLE_WAIT) {
                    return Some(job);
                }
                continue;
            }
            if hub.full() {
                hub.accepting.fetch_sub(1, Ordering::SeqCst);
                if let Some(job) = self.wait_queued(DRAIN_POLL) {
                    return Some(job);
                }
                continue;
            }
            let accepted = if self.listener_ready {
                self.accept()
            } else {
                Accepted::Nothing
            };
            hub.accepting.fetch_sub(1, Ordering::SeqCst);
            match accepted {
                Accepted::Job(job) => {
                    self.listener_ready = false;
                    return Some(job);
                }
                Accepted::Handled => continue,
                Accepted::Nothing => {}
            }
            if let Some(epoll) = &self.epoll {
                let mut events = [EpollEvent::empty(); 4];
                let timeout = EpollTimeout::try_from(IDLE_WAIT).unwrap_or(EpollTimeout::MAX);
                self.listener_ready = match epoll.wait(&mut events, timeout) {
                    Ok(n) if n > 0 => events[..n].iter().any(|e| e.data() == LISTENER_EVENT),
                    // A timeout, or interrupted: look at everything again.
                    _ => true,
                };
            }
        }
    }
}
