//! A worker's life in counts: when it asks to be replaced (`--max-requests`, `--reload-on-rss`, a timed-out
//! request) and what a stop waits for (work in flight, counted by guards that count themselves out on drop).
//! Below the connection and the server in the flow: both count into it, neither owns it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use tokio::sync::{Notify, mpsc};

use crate::config::Config;

/// Why a worker asks to be replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RetireReason {
    MaxRequests,
    Memory,
    Timeout,
}

impl RetireReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RetireReason::MaxRequests => "max-requests",
            RetireReason::Memory => "memory",
            RetireReason::Timeout => "timeout",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<RetireReason> {
        [RetireReason::MaxRequests, RetireReason::Memory, RetireReason::Timeout]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

/// Per-worker counters that decide when the worker retires.
pub(crate) struct Lifecycle {
    served: AtomicU64,
    max_requests: Option<u64>,
    rss_limit: Option<u64>,
    /// Under `--preload` the limit is on private memory: a freshly forked worker's resident memory already
    /// counts every page it shares with the preloaded app.
    limit_private: bool,
    /// Past `rss_limit`: the worker accepts nothing more and waits for its replacement.
    over_memory: AtomicBool,
    retiring: AtomicBool,
    retire_tx: mpsc::UnboundedSender<RetireReason>,
}

impl Lifecycle {
    pub(crate) fn new(config: &Config) -> (Lifecycle, mpsc::UnboundedReceiver<RetireReason>) {
        let (retire_tx, retire_rx) = mpsc::unbounded_channel();
        let jitter = match config.workers.max_requests_jitter {
            0 => 0,
            j => random_u64() % (j + 1),
        };
        let lifecycle = Lifecycle {
            served: AtomicU64::new(0),
            max_requests: config.workers.max_requests.map(|m| m.saturating_add(jitter)),
            rss_limit: config.workers.reload_on_rss,
            limit_private: config.fixed.preload,
            over_memory: AtomicBool::new(false),
            retiring: AtomicBool::new(false),
            retire_tx,
        };
        (lifecycle, retire_rx)
    }

    /// Called after every request: counts it and checks the recycling limits.
    pub(crate) fn request_finished(&self) {
        let served = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        if self.max_requests.is_some_and(|max| served >= max) {
            self.retire(RetireReason::MaxRequests);
        }
    }

    /// Checks `--reload-on-rss` before a response's last bytes go out: once the client has the whole answer it
    /// may send its next request at once, and this worker must have stopped accepting by then.
    pub(crate) fn check_memory(&self) {
        let Some(limit) = self.rss_limit else { return };
        let pid = std::process::id();
        let rss = crate::metrics::process_rss(pid);
        // Private memory is part of resident memory: below the limit, there is nothing more to read.
        if rss.is_none_or(|rss| rss <= limit) {
            return;
        }
        let (used, measure) = if self.limit_private {
            // Only while resident memory is over the limit: reading smaps_rollup walks the page tables.
            (crate::metrics::process_private(pid), "private memory")
        } else {
            (rss, "resident memory")
        };
        if let Some(used) = used.filter(|&used| used > limit) {
            if !self.over_memory.swap(true, Ordering::SeqCst) {
                tracing::warn!(
                    used_mib = used >> 20,
                    limit_mib = limit >> 20,
                    measure,
                    "past --reload-on-rss: taking no new connections; finishing the requests in flight"
                );
            }
            self.retire(RetireReason::Memory);
        }
    }

    /// Asks for a replacement. Recycling asks once; a timeout always gets through, since it also makes the
    /// worker stop accepting.
    pub(crate) fn retire(&self, reason: RetireReason) {
        if reason == RetireReason::Timeout || !self.retiring.swap(true, Ordering::Relaxed) {
            let _ = self.retire_tx.send(reason);
        }
    }

    /// Whether the worker went past `--reload-on-rss` and so takes no new connections.
    pub(crate) fn over_memory(&self) -> bool {
        self.over_memory.load(Ordering::Relaxed)
    }

    pub(crate) fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

/// A random number without a random crate: std's hasher keys are seeded from the OS per process.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

/// A count of things in progress, each held by an [`InFlightGuard`] that counts itself out when dropped, and
/// a way to wait until none is left: what a stopping worker drains.
#[derive(Default)]
pub(crate) struct InFlight {
    count: AtomicUsize,
    /// Callers of [`InFlight::emptied`] now: a guard that brings the count to zero wakes them only if there are
    /// any, so the request path does not take the notifier's lock for nobody.
    waiting: AtomicUsize,
    emptied: Notify,
}

/// One thing in progress; dropping it counts it out.
pub(crate) struct InFlightGuard(Arc<InFlight>);

impl InFlight {
    /// Counts one more until the guard is dropped.
    pub(crate) fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(Arc::clone(self))
    }

    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Resolves once the count is zero (at once if it is).
    pub(crate) async fn emptied(&self) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        loop {
            let notified = self.emptied.notified();
            tokio::pin!(notified);
            // Registered (and counted as waiting) before the count is read, so a guard dropped in between
            // still wakes this: with both orders SeqCst, either the guard sees the waiter or this sees zero.
            notified.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 && self.0.waiting.load(Ordering::SeqCst) > 0 {
            self.0.emptied.notify_waiters();
        }
    }
}

/// A caller of [`InFlight::emptied`], counted out when it returns or is cancelled.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retire_reasons_round_trip() {
        for r in [RetireReason::MaxRequests, RetireReason::Memory, RetireReason::Timeout] {
            assert_eq!(RetireReason::parse(r.as_str()), Some(r));
        }
        assert_eq!(RetireReason::parse("bored"), None);
    }

    #[test]
    fn guards_count_themselves_out_and_wake_the_waiter() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let in_flight = Arc::new(InFlight::default());
        runtime.block_on(in_flight.emptied());
        let a = in_flight.enter();
        let b = in_flight.enter();
        assert_eq!(in_flight.count(), 2);
        // Dropped on another thread, as app threads do, while the waiter sleeps.
        let dropper = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            drop(a);
            std::thread::sleep(std::time::Duration::from_millis(20));
            drop(b);
        });
        runtime.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(5), in_flight.emptied())
                .await
                .expect("the last guard's drop wakes the waiter");
        });
        assert_eq!(in_flight.count(), 0);
        dropper.join().unwrap();
    }
}
