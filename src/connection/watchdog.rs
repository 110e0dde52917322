//! `--timeout`: a request still running past it is answered by the server (504 if nothing was sent yet, else
//! a reset), the stuck thread's Python stack is logged, and the worker asks to be replaced, since that thread
//! stays busy until the app returns.
//!
//! The app thread owns the connection, so the watchdog and the thread agree through a lock: every write is
//! made under it, and the watchdog steps in only between writes of a response that has not ended.

use std::io;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::access::{RequestInfo, record};
use super::wire::Takeover;
use crate::config::Config;
use crate::lifecycle::{InFlightGuard, Lifecycle, RetireReason};
use crate::metrics::WorkerMetrics;
use crate::response;
use crate::sync::lock;

/// How long a timed-out request's stack dump may wait for the GIL.
const STACK_DUMP_LIMIT: Duration = Duration::from_secs(5);

/// The requests in flight under a `--timeout`.
pub(crate) struct Watchdog {
    limit: Duration,
    watched: Mutex<Vec<Weak<Watch>>>,
}

/// One request, as the watchdog sees it.
pub(crate) struct Watch {
    state: Mutex<WatchState>,
}

struct WatchState {
    /// The response's connection, owned by the request's `Responder`; open until `ended`.
    takeover: Takeover,
    started: Instant,
    request: RequestInfo,
    span: tracing::Span,
    /// `threading.get_ident()` of the app thread running the request.
    thread: u64,
    /// Some of the response was written, so a 504 can no longer be sent.
    wrote: bool,
    ended: bool,
    timed_out: bool,
    /// The request's place in the worker's count of work in flight: let go when the responder drops this watch
    /// (after closing the connection), or after a timed-out request's stack is logged, since the worker's exit
    /// waits for that.
    in_flight: Option<InFlightGuard>,
}

impl Watch {
    pub(crate) fn running_on(&self, thread: u64) {
        lock(&self.state).thread = thread;
    }

    /// Runs one write unless the request has timed out (`None`). The watchdog waits for the lock meanwhile, so
    /// it never answers in the middle of a write.
    pub(crate) fn write_on_time(&self, op: impl FnOnce() -> io::Result<usize>) -> Option<io::Result<usize>> {
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
    pub(crate) fn end(&self) -> bool {
        let mut state = lock(&self.state);
        state.ended = true;
        !state.timed_out
    }
}

impl Watchdog {
    pub(crate) fn new(limit: Duration) -> Watchdog {
        Watchdog {
            limit,
            watched: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn watch(
        &self,
        takeover: Takeover,
        started: Instant,
        request: RequestInfo,
        span: tracing::Span,
        in_flight: InFlightGuard,
    ) -> Arc<Watch> {
        let watch = Arc::new(Watch {
            state: Mutex::new(WatchState {
                takeover,
                started,
                request,
                span,
                thread: 0,
                wrote: false,
                ended: false,
                timed_out: false,
                in_flight: Some(in_flight),
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

/// Checks the requests in flight for the life of the worker.
pub(crate) async fn run(watchdog: &Watchdog, config: &Config, metrics: &WorkerMetrics, lifecycle: &Lifecycle) {
    // A request is answered at most a tenth of the limit late.
    let period = (watchdog.limit / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        for watch in watchdog.expired() {
            time_out(config, metrics, lifecycle, watchdog.limit, &watch).await;
        }
    }
}

/// Answers a request that ran past the limit, if it has not ended meanwhile.
async fn time_out(config: &Config, metrics: &WorkerMetrics, lifecycle: &Lifecycle, limit: Duration, watch: &Watch) {
    let (thread, span, in_flight) = {
        let mut state = lock(&watch.state);
        if state.ended || state.timed_out {
            return;
        }
        // The request keeps counting as in flight until its stack is logged below: the retirement makes the
        // worker drain and exit, and with nothing else in flight it would exit before the dump ran.
        state.timed_out = true;
        let span = state.span.clone();
        let _entered = span.enter();
        tracing::error!(timeout = ?limit, "request timed out");
        // SAFETY (both calls): the response has not ended, so its Responder still owns the connection, and it
        // cannot close it meanwhile: ending takes the lock held here.
        let closed = if state.wrote {
            unsafe { state.takeover.reset_and_close() }
        } else {
            let (bytes, body_len) = response::server_response(504);
            let closed = unsafe { state.takeover.answer_and_close(&bytes) };
            record(config, metrics, &state.request, 504, body_len, state.started);
            closed
        };
        if let Err(error) = closed {
            tracing::error!(%error, "cannot close the timed-out connection");
        }
        (state.thread, span.clone(), state.in_flight.take())
    };
    metrics.timed_out();
    lifecycle.retire(RetireReason::Timeout);
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
    drop(in_flight);
}
