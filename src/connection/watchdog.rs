//! `--timeout`: a request still running past it is answered by the server (504 if nothing was sent yet, else
//! a reset), the stuck thread's Python stack is logged, and the worker asks to be replaced, since that thread
//! stays busy until the app returns.
//!
//! The app thread owns the connection, so the watchdog and the thread agree through a lock: every write is
//! made under it, and the watchdog steps in only between writes of a response that has not ended.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use socket2::SockRef;

use super::ConnShared;
use super::access::{RequestInfo, record};
use crate::listener;
use crate::response;
use crate::worker::RetireReason;

/// How long a timed-out request's stack dump may wait for the GIL.
const STACK_DUMP_LIMIT: Duration = Duration::from_secs(5);

/// The requests in flight under a `--timeout`.
pub struct Watchdog {
    limit: Duration,
    watched: Mutex<Vec<Weak<Watch>>>,
}

/// One request, as the watchdog sees it.
pub(super) struct Watch {
    state: Mutex<WatchState>,
}

struct WatchState {
    /// The connection's descriptor, owned by the request's `Responder`; open until `ended`.
    fd: RawFd,
    tcp: bool,
    /// Request bytes still unread in the socket.
    unread: usize,
    started: Instant,
    request: RequestInfo,
    span: tracing::Span,
    /// `threading.get_ident()` of the app thread running the request.
    thread: u64,
    /// Some of the response was written, so a 504 can no longer be sent.
    wrote: bool,
    ended: bool,
    timed_out: bool,
}

/// A lock that survives a panic elsewhere: the state is plain flags, valid at every step.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Watch {
    pub(super) fn running_on(&self, thread: u64) {
        lock(&self.state).thread = thread;
    }

    /// Runs one write unless the request has timed out (`None`). The watchdog waits for the lock meanwhile, so
    /// it never answers in the middle of a write.
    pub(super) fn write_on_time(&self, op: impl FnOnce() -> io::Result<usize>) -> Option<io::Result<usize>> {
        let mut state = lock(&self.state);
        if state.timed_out {
            return None;
        }
        let result = op();
        if matches!(result, Ok(n) if n > 0) {
            state.wrote = true;
        }
        Some(result)
    }

    /// The response is over; false if the watchdog answered it already.
    pub(super) fn end(&self) -> bool {
        let mut state = lock(&self.state);
        state.ended = true;
        !state.timed_out
    }
}

impl Watchdog {
    pub fn new(limit: Duration) -> Watchdog {
        Watchdog {
            limit,
            watched: Mutex::new(Vec::new()),
        }
    }

    pub(super) fn watch(
        &self,
        fd: RawFd,
        tcp: bool,
        unread: usize,
        started: Instant,
        request: RequestInfo,
        span: tracing::Span,
    ) -> Arc<Watch> {
        let watch = Arc::new(Watch {
            state: Mutex::new(WatchState {
                fd,
                tcp,
                unread,
                started,
                request,
                span,
                thread: 0,
                wrote: false,
                ended: false,
                timed_out: false,
            }),
        });
        lock(&self.watched).push(Arc::downgrade(&watch));
        watch
    }

    /// The requests past the limit; forgets those that have ended.
    fn expired(&self) -> Vec<Arc<Watch>> {
        let mut watched = lock(&self.watched);
        watched.retain(|w| w.strong_count() > 0);
        watched
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|w| lock(&w.state).started.elapsed() >= self.limit)
            .collect()
    }
}

/// Checks the requests in flight for the life of the worker (with a `--timeout`; returns at once without).
pub async fn run(shared: Arc<ConnShared>) {
    let Some(watchdog) = &shared.watchdog else { return };
    // A request is answered at most a tenth of the limit late.
    let period = (watchdog.limit / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        for watch in watchdog.expired() {
            time_out(&shared, watchdog.limit, &watch).await;
        }
    }
}

/// Answers a request that ran past the limit, if it has not ended meanwhile.
async fn time_out(shared: &ConnShared, limit: Duration, watch: &Watch) {
    let (thread, span) = {
        let mut state = lock(&watch.state);
        if state.ended || state.timed_out {
            return;
        }
        // `active` keeps counting this request until its stack is logged below: the retirement makes the worker
        // drain and exit, and with nothing else in flight it would exit before the dump ran.
        state.timed_out = true;
        let _entered = state.span.enter();
        tracing::error!(timeout = ?limit, "request timed out");
        // SAFETY: the response has not ended, so its Responder still owns the descriptor, and it cannot close
        // it meanwhile: ending takes the lock held here.
        let fd = unsafe { BorrowedFd::borrow_raw(state.fd) };
        let socket = SockRef::from(&fd);
        if state.wrote {
            if state.tcp {
                let _ = socket.set_linger(Some(Duration::ZERO));
            }
        } else {
            let (bytes, body_len) = response::server_response(504);
            // Nothing was written yet, so the empty socket buffer takes the short answer whole.
            let _ = socket.send(&bytes);
            // The rest of the request, so the close that follows is an ordinary end of the 504.
            let _ = listener::discard(&socket, state.unread);
            record(shared, &state.request, 504, body_len, state.started);
        }
        if let Err(error) = close_under(state.fd) {
            tracing::error!(%error, "cannot close the timed-out connection");
        }
        (state.thread, state.span.clone())
    };
    shared.metrics.timed_out();
    shared.lifecycle.retire(RetireReason::Timeout);
    // Taking the stack needs the GIL, which the stuck thread may hold for a while: never on the I/O thread,
    // and bounded, since the worker waits for this before it exits.
    let dump = tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        match crate::app::python_stack(thread) {
            Some(stack) => tracing::error!(thread, stack = %stack, "stuck request's Python stack"),
            None => tracing::error!(thread, "the stuck request's Python stack is not available"),
        }
    });
    if tokio::time::timeout(STACK_DUMP_LIMIT, dump).await.is_err() {
        tracing::error!("could not take the stuck request's Python stack: the app held the GIL");
    }
    shared.active.fetch_sub(1, Ordering::SeqCst);
}

/// Closes a connection whose descriptor number the stuck app thread still holds: the number is pointed at
/// /dev/null in one atomic dup3, so the connection closes now (a reset if its last byte is unread) and the
/// thread's own close later cannot hit a descriptor reused by another connection.
fn close_under(fd: RawFd) -> io::Result<()> {
    let null = std::fs::File::open("/dev/null")?;
    // SAFETY: both descriptors are open (see the caller for `fd`); dup3 only rebinds the number `fd`.
    if unsafe { libc::dup3(null.as_raw_fd(), fd, libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
