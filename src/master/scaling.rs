//! Adaptive workers (`--max-workers`): the floor and the ceiling of the worker count, the load each serving
//! worker last reported, and the decision, at each tick, to add a worker (requests have waited
//! `--scale-up-after`), to retire one (a worker's worth of app threads has been idle `--scale-down-after`), or
//! neither. It decides; the supervision loop starts and stops the workers.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Config;

use super::ids::WorkerId;

/// A change of the worker count, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Change {
    /// Requests waited: every app thread busy (`busy` of `threads`), or connections in a listen queue.
    Up { busy: usize, threads: usize, queued: u64 },
    /// A worker's worth of app threads (`idle` of `threads`) was idle for the whole period.
    Down { idle: usize, threads: usize },
}

/// What the loop sees at a tick.
pub(super) struct Sight<'a> {
    /// The workers serving now (ready, not stopping, not retiring).
    pub(super) serving: &'a [WorkerId],
    /// Whether a worker is still starting: no decision is taken until it serves (one change at a time).
    pub(super) starting: bool,
    /// Connections waiting in the listen queues the kernel reports (TCP sockets).
    pub(super) queued: u64,
}

pub(super) struct Scaling {
    /// The fewest workers (`--workers`, moved by SIGTTIN/SIGTTOU).
    floor: usize,
    /// The most (`--max-workers`); `None` without adaptive workers.
    ceiling: Option<usize>,
    threads: usize,
    up_after: Duration,
    down_after: Duration,
    /// Requests in flight in each worker at its last report (app threads busy, or requests queued for one).
    in_flight: HashMap<WorkerId, usize>,
    waiting_since: Option<Instant>,
    idle_since: Option<Instant>,
}

impl Scaling {
    pub(super) fn new(config: &Config) -> Scaling {
        let mut scaling = Scaling {
            floor: config.workers.count,
            ceiling: None,
            threads: 1,
            up_after: Duration::ZERO,
            down_after: Duration::ZERO,
            in_flight: HashMap::new(),
            waiting_since: None,
            idle_since: None,
        };
        scaling.configure(config);
        scaling
    }

    /// Takes a reloaded configuration's ceiling and periods; the floor too when `--workers` changed (a floor
    /// moved by a signal survives a reload that leaves `--workers` as it was).
    pub(super) fn reconfigure(&mut self, old: &Config, new: &Config) {
        if old.workers.count != new.workers.count {
            self.floor = new.workers.count;
        }
        self.configure(new);
    }

    fn configure(&mut self, config: &Config) {
        self.ceiling = config.workers.max;
        self.threads = config.workers.threads.max(1);
        self.up_after = config.workers.scale_up_after;
        self.down_after = config.workers.scale_down_after;
        if let Some(ceiling) = self.ceiling {
            self.floor = self.floor.clamp(1, ceiling);
        }
        self.waiting_since = None;
        self.idle_since = None;
    }

    pub(super) fn floor(&self) -> usize {
        self.floor
    }

    /// Whether a ceiling bounds the count (`--max-workers` was given).
    pub(super) fn bounded(&self) -> bool {
        self.ceiling.is_some()
    }

    /// The count a reload keeps: the current one, within the new floor and ceiling.
    pub(super) fn keep(&self, current: usize) -> usize {
        current.clamp(self.floor, self.ceiling.unwrap_or(usize::MAX).max(self.floor))
    }

    /// SIGTTIN: the floor one higher, up to the ceiling; `false` if it is already there.
    pub(super) fn raise_floor(&mut self) -> bool {
        if self.ceiling.is_some_and(|c| self.floor >= c) {
            return false;
        }
        self.floor += 1;
        true
    }

    /// SIGTTOU: the floor one lower, down to 1; `false` if it is already there.
    pub(super) fn lower_floor(&mut self) -> bool {
        if self.floor <= 1 {
            return false;
        }
        self.floor -= 1;
        true
    }

    /// A worker's report.
    pub(super) fn reported(&mut self, id: WorkerId, in_flight: i64) {
        self.in_flight.insert(id, usize::try_from(in_flight).unwrap_or(0));
    }

    /// A worker stopped serving (stopping, retiring or gone): its load no longer counts.
    pub(super) fn forget(&mut self, id: WorkerId) {
        self.in_flight.remove(&id);
    }

    /// The change to make now with `current` workers, if any. After a change the period starts again.
    pub(super) fn decide(&mut self, now: Instant, current: usize, sight: &Sight<'_>) -> Option<Change> {
        let ceiling = self.ceiling?;
        if sight.starting || sight.serving.is_empty() {
            self.waiting_since = None;
            self.idle_since = None;
            return None;
        }
        let threads = self.threads * sight.serving.len();
        let busy: usize = sight
            .serving
            .iter()
            .map(|id| self.in_flight.get(id).copied().unwrap_or(0).min(self.threads))
            .sum();
        let waiting = busy >= threads || sight.queued > 0;
        let idle = threads - busy;
        if waiting {
            self.idle_since = None;
            let since = *self.waiting_since.get_or_insert(now);
            if current < ceiling && now.duration_since(since) >= self.up_after {
                self.waiting_since = None;
                return Some(Change::Up {
                    busy,
                    threads,
                    queued: sight.queued,
                });
            }
            return None;
        }
        self.waiting_since = None;
        if idle < self.threads {
            self.idle_since = None;
            return None;
        }
        let since = *self.idle_since.get_or_insert(now);
        if current > self.floor && now.duration_since(since) >= self.down_after {
            // The next retirement waits a whole period again.
            self.idle_since = Some(now);
            return Some(Change::Down { idle, threads });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scaling(floor: usize, ceiling: usize, threads: usize) -> Scaling {
        Scaling {
            floor,
            ceiling: Some(ceiling),
            threads,
            up_after: Duration::from_secs(1),
            down_after: Duration::from_secs(30),
            in_flight: HashMap::new(),
            waiting_since: None,
            idle_since: None,
        }
    }

    fn ids(n: u32) -> Vec<WorkerId> {
        (1..=n).map(WorkerId::new).collect()
    }

    fn sight(serving: &[WorkerId]) -> Sight<'_> {
        Sight {
            serving,
            starting: false,
            queued: 0,
        }
    }

    #[test]
    fn requests_waiting_for_the_period_add_one_worker_then_the_period_starts_again() {
        let mut s = scaling(1, 3, 2);
        let one = ids(1);
        let t0 = Instant::now();
        s.reported(one[0], 2);
        assert_eq!(s.decide(t0, 1, &sight(&one)), None, "waiting starts now");
        assert_eq!(s.decide(t0 + Duration::from_millis(500), 1, &sight(&one)), None);
        assert_eq!(
            s.decide(t0 + Duration::from_secs(1), 1, &sight(&one)),
            Some(Change::Up {
                busy: 2,
                threads: 2,
                queued: 0
            })
        );
        assert_eq!(
            s.decide(t0 + Duration::from_millis(1250), 1, &sight(&one)),
            None,
            "a new period"
        );
        let starting = Sight {
            starting: true,
            ..sight(&one)
        };
        assert_eq!(
            s.decide(t0 + Duration::from_secs(5), 2, &starting),
            None,
            "one change at a time"
        );
    }

    #[test]
    fn a_free_thread_resets_the_wait_and_a_listen_queue_counts_as_waiting() {
        let mut s = scaling(1, 3, 2);
        let two = ids(2);
        let t0 = Instant::now();
        s.reported(two[0], 2);
        s.reported(two[1], 2);
        assert_eq!(s.decide(t0, 2, &sight(&two)), None);
        s.reported(two[1], 1);
        assert_eq!(s.decide(t0 + Duration::from_millis(900), 2, &sight(&two)), None);
        s.reported(two[1], 2);
        assert_eq!(
            s.decide(t0 + Duration::from_secs(1), 2, &sight(&two)),
            None,
            "the wait began again"
        );
        s.reported(two[1], 0);
        let queued = Sight {
            queued: 3,
            ..sight(&two)
        };
        assert_eq!(
            s.decide(t0 + Duration::from_secs(2), 2, &queued),
            Some(Change::Up {
                busy: 2,
                threads: 4,
                queued: 3
            }),
            "a free thread, but connections wait in the listen queue"
        );
        assert_eq!(
            s.decide(t0 + Duration::from_secs(9), 3, &queued),
            None,
            "not above the ceiling"
        );
    }

    #[test]
    fn idle_for_the_period_retires_one_then_waits_the_period_again_down_to_the_floor() {
        let mut s = scaling(1, 4, 2);
        let three = ids(3);
        let t0 = Instant::now();
        s.reported(three[0], 1);
        s.reported(three[1], 1);
        assert_eq!(
            s.decide(t0, 3, &sight(&three)),
            None,
            "2 idle threads of 6: one worker's worth"
        );
        assert_eq!(s.decide(t0 + Duration::from_secs(29), 3, &sight(&three)), None);
        assert_eq!(
            s.decide(t0 + Duration::from_secs(30), 3, &sight(&three)),
            Some(Change::Down { idle: 4, threads: 6 })
        );
        assert_eq!(s.decide(t0 + Duration::from_secs(31), 2, &sight(&three[..2])), None);
        assert_eq!(
            s.decide(t0 + Duration::from_secs(60), 2, &sight(&three[..2])),
            Some(Change::Down { idle: 2, threads: 4 })
        );
        assert_eq!(
            s.decide(t0 + Duration::from_secs(200), 1, &sight(&three[..1])),
            None,
            "the floor"
        );
    }

    #[test]
    fn less_than_a_workers_worth_of_idle_threads_keeps_the_count() {
        let mut s = scaling(1, 4, 4);
        let two = ids(2);
        let t0 = Instant::now();
        s.reported(two[0], 4);
        s.reported(two[1], 1);
        assert_eq!(s.decide(t0, 2, &sight(&two)), None);
        assert_eq!(
            s.decide(t0 + Duration::from_secs(100), 2, &sight(&two)),
            None,
            "3 idle of 8"
        );
    }

    #[test]
    fn the_floor_moves_within_one_and_the_ceiling_and_a_reload_keeps_the_count() {
        let mut s = scaling(1, 2, 1);
        assert!(!s.lower_floor());
        assert!(s.raise_floor());
        assert_eq!(s.floor(), 2);
        assert!(!s.raise_floor(), "the ceiling");
        assert_eq!(s.keep(1), 2);
        assert_eq!(s.keep(3), 2);
        let mut fixed = scaling(1, 1, 1);
        fixed.ceiling = None;
        assert!(
            fixed.raise_floor() && fixed.raise_floor(),
            "without a ceiling, SIGTTIN has no bound"
        );
        assert_eq!(
            fixed.decide(Instant::now(), 3, &sight(&ids(3))),
            None,
            "and nothing scales"
        );
    }
}
