//! The worker's serving loop. The app threads accept connections themselves, each only while it is free, so a
//! busy worker leaves new connections in the shared listen queue for an idle one; a request that is already
//! queued in full is run on the spot by the thread that accepted it. This module's runtime takes the
//! connections that need waiting (slow peers, large bodies, refusals) and queues their requests for the next
//! free thread, up to `--max-connections` at a time. On a stop signal (or a retirement that requires it) a
//! cancellation token stops the accepting; a graceful stop then takes every connection still queued on the
//! sockets ferrule bound and closes this worker's copy of them (so no connection is queued where nobody will
//! accept it), and waits, under a time limit, until every request and connection in flight has counted itself
//! out.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use socket2::Socket;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::app::{App, Request, RequestSource};
use crate::connection::{self, Arrival, WorkerContext};
use crate::control::{Message, ToMaster};
use crate::lifecycle::{InFlight, RetireReason};
use crate::listener::{self, BoundSocket};
use crate::log_scope::{self, ConnSpan};
use crate::tls::SharedTickets;

/// How the worker was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// SIGTERM, a timed-out request, or the master gone: finish in-flight requests (up to the graceful timeout).
    Graceful,
    /// SIGINT or SIGQUIT: stop now.
    Fast,
}

/// How often an app thread looks again while the async side holds `--max-connections` connections.
const FULL_RECHECK: Duration = Duration::from_millis(10);
/// How long an idle app thread sleeps before it looks again on its own (it is normally woken well before).
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// How often a worker reports its counters to the master.
const REPORT: Duration = Duration::from_secs(1);
/// How often with `--max-workers`, whose decisions read the in-flight count.
const ADAPTIVE_REPORT: Duration = Duration::from_millis(250);
/// How long an app thread backs off after accept failed (out of descriptors or memory).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves until told to stop, then drains.
pub(crate) async fn run(
    sockets: Vec<BoundSocket>,
    app: &App,
    ctx: Arc<WorkerContext>,
    mut retire_rx: mpsc::UnboundedReceiver<RetireReason>,
    mut control: ToMaster,
    tickets: Option<Arc<SharedTickets>>,
) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut quit = signal(SignalKind::quit())?;
    // The master's lines: new session-ticket keys as they rotate; the end of the line when it is gone.
    let master_gone = control.listen_to_master(tickets)?;
    tokio::pin!(master_gone);

    let acceptor = Arc::new(Acceptor::new(sockets, Arc::clone(&ctx))?);
    let feeds = (0..app.threads())
        .map(|_| AppThreadFeed::new(&acceptor).map(|f| Box::new(f) as Box<dyn RequestSource>))
        .collect::<std::io::Result<Vec<_>>>()?;
    app.start_threads(feeds)?;
    tokio::spawn(connection::watch_timeouts(Arc::clone(&ctx)));
    control.send(&Message::Ready);
    tracing::info!(threads = app.threads(), "ready");

    // Counters go to the master once a second, which is plenty for a scrape interval of seconds; with
    // --max-workers four times a second, so that the master sees requests wait within its 1 s reaction.
    let every = if ctx.config.workers.max.is_some() {
        ADAPTIVE_REPORT
    } else {
        REPORT
    };
    let mut report = tokio::time::interval(every);
    // A worker with a timed-out request stops taking connections at once: its stop takes none from the queue.
    let mut stuck = false;
    let stop = loop {
        tokio::select! {
            _ = report.tick() => control.send(&Message::Stats(Box::new(ctx.metrics.snapshot()))),
            _ = term.recv() => break Stop::Graceful,
            _ = int.recv() => break Stop::Fast,
            _ = quit.recv() => break Stop::Fast,
            () = &mut master_gone => {
                tracing::warn!("the master process went away; stopping");
                break Stop::Graceful;
            }
            Some(reason) = retire_rx.recv() => {
                tracing::info!(reason = reason.as_str(), served = ctx.lifecycle.served(), "asking to be replaced");
                control.send(&Message::Retire(reason));
                // A worker with a stuck request is unhealthy: it stops taking connections now. Recycling keeps
                // serving until the master has a replacement ready and sends SIGTERM.
                if reason == RetireReason::Timeout {
                    stuck = true;
                    break Stop::Graceful;
                }
            }
        }
    };
    acceptor.stop();
    let (limit, taken) = match stop {
        Stop::Graceful => {
            // A worker that already stopped taking connections (a stuck request, over --reload-on-rss) leaves
            // the queue to the others: it only closes its copy.
            let take = !stuck && !ctx.lifecycle.over_memory();
            (ctx.config.workers.graceful_timeout, acceptor.close_listeners(take))
        }
        Stop::Fast => (Duration::ZERO, 0),
    };
    let in_flight = &ctx.in_flight;
    if in_flight.count() > 0 {
        tracing::info!(
            in_flight = in_flight.count(),
            taken_from_queue = taken,
            ?stop,
            "waiting for in-flight requests"
        );
    }
    if tokio::time::timeout(limit, in_flight.emptied()).await.is_err() {
        // `queued`: requests read whole and still waiting for an app thread, closed unanswered with the rest.
        tracing::warn!(
            cut_off = in_flight.count(),
            queued = acceptor.ready_rx.len(),
            timeout = ?limit,
            "stop cut off requests still in flight"
        );
    }
    control.send(&Message::Stats(Box::new(ctx.metrics.snapshot())));
    tracing::info!(served = ctx.lifecycle.served(), "worker stopped");
    Ok(())
}

/// A listening socket, with the name the log uses for it.
struct Listening {
    fd: OwnedFd,
    name: Arc<str>,
    tls: bool,
    /// Whether ferrule bound it (a graceful stop takes its queue and closes it) or it was inherited from
    /// systemd or `fd://` (left alone: its queue belongs to the next instance).
    bound_by_ferrule: bool,
    /// The span of every connection on a Unix socket: their fields (`peer="unix"`, the listener) are all the
    /// same, so one span, made at the first connection, serves them all, and a connection costs a reference to
    /// it instead of a new span with its fields formatted.
    unix_span: OnceLock<Arc<tracing::Span>>,
}

impl Listening {
    /// The span of a connection from `peer` (none: a Unix socket's peer).
    fn span_for(&self, peer: Option<std::net::SocketAddr>) -> ConnSpan {
        match peer {
            // A TCP peer's own span, made only if a line is written for its connection.
            Some(peer) => ConnSpan::Tcp {
                peer,
                listener: Arc::clone(&self.name),
            },
            None => ConnSpan::Made(Arc::clone(
                self.unix_span
                    .get_or_init(|| Arc::new(log_scope::conn_span(None, &self.name))),
            )),
        }
    }
}

/// The worker's intake, shared by the app threads and the async side: the listeners, the requests the async
/// side has read for the next free app thread, the connection limit and the stop.
struct Acceptor {
    /// The listening sockets.
    listeners: Vec<Listening>,
    ctx: Arc<WorkerContext>,
    /// Requests the async side has read, waiting for an app thread.
    ready_tx: crossbeam_channel::Sender<Request>,
    ready_rx: crossbeam_channel::Receiver<Request>,
    /// One count per queued request (a semaphore eventfd), so each wakes one idle app thread.
    ready_signal: EventFd,
    /// Readable once the worker stops: wakes every idle app thread.
    stop_signal: EventFd,
    /// Cancelled when the worker stops: the app threads accept no more.
    stop: CancellationToken,
    /// Connections the async side is reading: what `--max-connections` limits.
    reading: Arc<InFlight>,
    runtime: tokio::runtime::Handle,
    /// When the app threads last warned that --max-connections was reached.
    full_warned: std::sync::Mutex<Option<Instant>>,
    /// Failed accepts since the last one that worked: the first is logged, the rest counted, so running out
    /// of descriptors is one line (and one when it clears), not one per thread every backoff.
    accept_failures: AtomicU64,
}

impl Acceptor {
    fn new(sockets: Vec<BoundSocket>, ctx: Arc<WorkerContext>) -> std::io::Result<Acceptor> {
        // The sockets come in the order of the configured ones (systemd's after them): that says which are TLS,
        // and which the master bound.
        let listeners = sockets
            .into_iter()
            .enumerate()
            .map(|(i, b)| {
                let spec = ctx.config.fixed.sockets.get(i);
                let tls = matches!(spec, Some(crate::config::SocketSpec::Tls(_)));
                let bound_by_ferrule = !matches!(spec, None | Some(crate::config::SocketSpec::Fd(_)));
                let name = if tls {
                    format!("tls://{}", b.display_addr())
                } else {
                    b.display_addr()
                };
                Listening {
                    fd: b.fd,
                    name: name.into(),
                    tls,
                    bound_by_ferrule,
                    unix_span: OnceLock::new(),
                }
            })
            .collect();
        let (ready_tx, ready_rx) = crossbeam_channel::unbounded();
        let flags = EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK;
        Ok(Acceptor {
            listeners,
            ctx,
            ready_tx,
            ready_rx,
            ready_signal: EventFd::from_flags(flags | EfdFlags::EFD_SEMAPHORE)?,
            stop_signal: EventFd::from_flags(flags)?,
            stop: CancellationToken::new(),
            reading: Arc::new(InFlight::default()),
            runtime: tokio::runtime::Handle::current(),
            full_warned: std::sync::Mutex::new(None),
            accept_failures: AtomicU64::new(0),
        })
    }

    /// Stops the accepting and wakes every idle app thread.
    fn stop(&self) {
        self.stop.cancel();
        // Pairs with the fence in `AppThreadFeed::next`: a thread that counted itself in before this either
        // sees the stop, or the drain that follows sees its count.
        fence(Ordering::SeqCst);
        let _ = self.stop_signal.write(1);
    }

    /// The graceful stop's intake, after `stop`: takes every connection already queued on the sockets ferrule
    /// bound (if `take`), for the async side to read and the app threads (which now take only queued requests)
    /// to run, then closes this worker's copy of each socket. The last process to close a listening socket
    /// resets what is still queued on it, and nginx may not retry a POST it has sent; at a stop the master
    /// closed its copies first, so the workers are the last. The master also turned new connections away
    /// first (`BoundSocket::refuse_new_connections`): on a Unix socket nothing new arrives; on TCP only a
    /// handshake already under way then can join the queue after the last accept, and is lost. A worker
    /// replaced while the others serve on (a reload, recycling) takes a few connections it serves itself.
    /// Bounded by the listen backlog. Returns how many connections were taken.
    fn close_listeners(self: &Arc<Self>, take: bool) -> usize {
        let mut taken = 0;
        for Listening { fd, name, tls, .. } in self.listeners.iter().filter(|l| l.bound_by_ferrule) {
            if take {
                taken += self.accept_queue(fd, name, *tls);
            }
            if let Err(error) = listener::stop_listening(fd) {
                tracing::error!(%error, listener = &**name, "cannot close the listening socket");
            }
        }
        taken
    }

    /// Accepts every connection queued on one listener and hands each to the async side; returns how many.
    fn accept_queue(self: &Arc<Self>, fd: &OwnedFd, name: &str, tls: bool) -> usize {
        let mut taken = 0;
        loop {
            let (socket, peer) = match listener::accept_now(fd) {
                Ok(Some(accepted)) => accepted,
                Ok(None) => return taken,
                Err(error) => {
                    tracing::error!(%error, listener = name, "cannot take the queued connections");
                    return taken;
                }
            };
            taken += 1;
            if !self.allowed(peer, name) {
                continue;
            }
            let span = log_scope::conn_span(peer, name);
            if tls {
                self.read_later_tls(socket, span);
            } else {
                self.read_later(socket, peer.is_some(), span);
            }
        }
    }

    fn stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Queues a request the async side has read.
    fn queue(&self, request: Request) {
        // The receiver lives as long as the acceptor, which owns it.
        let _ = self.ready_tx.send(request);
        let _ = self.ready_signal.write(1);
    }

    /// A queued request, if there is one for this thread.
    fn take_queued(&self) -> Option<Request> {
        if self.ready_rx.is_empty() {
            return None;
        }
        // Each count was added after its request was queued, so taking a count guarantees a request.
        self.ready_signal.read().ok()?;
        self.ready_rx.try_recv().ok()
    }

    /// Hands a connection whose request is not (all) there yet to the async side. It counts as in flight, and
    /// against the connection limit, until its request is queued (the request then counts itself).
    fn read_later(self: &Arc<Self>, socket: Socket, tcp: bool, span: tracing::Span) {
        let acceptor = Arc::clone(self);
        let in_flight = self.ctx.in_flight.enter();
        let reading = self.reading.enter();
        let read = async move {
            if let Some(request) = connection::read_pending(socket, tcp, Arc::clone(&acceptor.ctx)).await {
                acceptor.queue(request);
            }
            drop((reading, in_flight));
        };
        self.runtime.spawn(read.instrument(span));
    }

    /// Hands a tls:// connection to the async side: handshake, then the request, within --read-timeout.
    fn read_later_tls(self: &Arc<Self>, socket: Socket, span: tracing::Span) {
        let acceptor = Arc::clone(self);
        let in_flight = self.ctx.in_flight.enter();
        let reading = self.reading.enter();
        let read = async move {
            if let Some(request) = connection::read_pending_tls(socket, Arc::clone(&acceptor.ctx)).await {
                acceptor.queue(request);
            }
            drop((reading, in_flight));
        };
        self.runtime.spawn(read.instrument(span));
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
        let (Some(addr), allowed) = (peer, &self.ctx.config.limits.allow_from) else {
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
        let limit = self.ctx.config.limits.max_connections;
        if self.reading.count() < limit {
            return false;
        }
        let mut warned = crate::sync::lock(&self.full_warned);
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

/// One app thread's way to its next request: a queued one, or a connection it accepts itself.
struct AppThreadFeed {
    acceptor: Arc<Acceptor>,
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
    Request(Request),
    /// A connection was dealt with (passed on or refused): look again before waiting.
    Handled,
    Nothing,
}

impl AppThreadFeed {
    fn new(acceptor: &Arc<Acceptor>) -> std::io::Result<AppThreadFeed> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let one = EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE;
        for listening in &acceptor.listeners {
            epoll.add(&listening.fd, EpollEvent::new(one, LISTENER_EVENT))?;
        }
        epoll.add(&acceptor.ready_signal, EpollEvent::new(one, OTHER_EVENT))?;
        epoll.add(&acceptor.stop_signal, EpollEvent::new(EpollFlags::EPOLLIN, OTHER_EVENT))?;
        Ok(AppThreadFeed {
            acceptor: Arc::clone(acceptor),
            epoll: Some(epoll),
            listener_ready: true,
        })
    }

    /// Accepts on each listener until one gives a connection.
    fn accept(&self) -> Accepted {
        let acceptor = &self.acceptor;
        for listening in &acceptor.listeners {
            let Listening { fd, name, tls, .. } = listening;
            let (socket, peer) = match listener::accept_now(fd) {
                Ok(Some(accepted)) => accepted,
                Ok(None) => continue,
                // The stop closed the listener under this thread (see `close_listeners`).
                Err(_) if acceptor.stopping() => return Accepted::Nothing,
                Err(error) => {
                    acceptor.accept_failed(&error, name);
                    std::thread::sleep(ACCEPT_BACKOFF);
                    return Accepted::Handled;
                }
            };
            acceptor.accept_worked();
            if !acceptor.allowed(peer, name) {
                return Accepted::Handled;
            }
            let span = listening.span_for(peer);
            let tcp = peer.is_some();
            // No peek-and-run for TLS: the handshake and the request are read on the async side.
            if *tls {
                acceptor.read_later_tls(socket, span.span());
                return Accepted::Handled;
            }
            return match connection::read_if_whole(socket, tcp, span, &acceptor.ctx) {
                Arrival::Whole(request) => Accepted::Request(request),
                Arrival::Pending(socket, span) => {
                    acceptor.read_later(socket, tcp, span.span());
                    Accepted::Handled
                }
            };
        }
        Accepted::Nothing
    }

    /// Waits for a queued request only (the worker is stopping, or the async side is full).
    fn wait_queued(&self, timeout: Duration) -> Option<Request> {
        let acceptor = &self.acceptor;
        let request = acceptor.ready_rx.recv_timeout(timeout).ok();
        if request.is_some() {
            let _ = acceptor.ready_signal.read();
        }
        request
    }
}

impl RequestSource for AppThreadFeed {
    fn next(&mut self) -> Option<Request> {
        loop {
            let acceptor = &self.acceptor;
            if let Some(request) = acceptor.take_queued() {
                return Some(request);
            }
            // Counted in before the stop is read: a stop that begins now waits for this thread to hand on
            // whatever it accepts.
            let accepting = acceptor.ctx.in_flight.enter();
            fence(Ordering::SeqCst);
            // A worker over --reload-on-rss takes no new connections either: they go to the other workers and
            // its replacement, while its requests in flight and queued finish.
            if acceptor.stopping() || acceptor.ctx.lifecycle.over_memory() {
                drop(accepting);
                self.epoll = None;
                if let Some(request) = self.wait_queued(IDLE_WAIT) {
                    return Some(request);
                }
                continue;
            }
            if acceptor.full() {
                drop(accepting);
                if let Some(request) = self.wait_queued(FULL_RECHECK) {
                    return Some(request);
                }
                continue;
            }
            let accepted = if self.listener_ready {
                self.accept()
            } else {
                Accepted::Nothing
            };
            drop(accepting);
            match accepted {
                Accepted::Request(request) => {
                    self.listener_ready = false;
                    return Some(request);
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
