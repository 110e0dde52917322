//! The worker table: every worker the master started or had forked, by `WorkerId`, with its pid, generation
//! and state, and the queue of old workers each waiting for a new one to be ready before it stops. A worker
//! stays in the table until its exit is seen, so its pid is never signalled after it could be reused.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::Instant;

use crate::lifecycle::RetireReason;

use super::error::LOG;
use super::ids::{ChildPid, WorkerId};
use super::zygote;

/// Extra time a stopping worker gets beyond the graceful timeout before it is killed.
const KILL_MARGIN: Duration = Duration::from_secs(5);
/// How long a fast stop waits before killing.
const FAST_STOP: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    Starting,
    Ready,
    /// Asked to stop (SIGTERM or SIGQUIT sent); killed if still alive at the deadline.
    Stopping {
        kill_at: Instant,
    },
}

pub(super) struct Worker {
    pub(super) pid: ChildPid,
    /// Forked by a zygote and adopted: this master reaps it itself, when it forgets it (see `forget`).
    pub(super) adopted: bool,
    pub(super) generation: u32,
    pub(super) state: State,
    /// Set when the worker asked to be replaced; it is stopped once its replacement is ready.
    pub(super) retiring: Option<RetireReason>,
    /// The master's end of the worker's control line, for the session-ticket keys when they rotate.
    pub(super) control: Option<std::os::unix::net::UnixStream>,
    /// Under `--reload`: its app did not import, and it answers 503.
    pub(super) unavailable: bool,
}

impl Worker {
    pub(super) fn is_stopping(&self) -> bool {
        matches!(self.state, State::Stopping { .. })
    }
}

pub(super) struct Workers {
    table: HashMap<WorkerId, Worker>,
    next_id: u32,
    /// Workers to stop, oldest first, each as soon as a new worker is ready.
    to_replace: VecDeque<WorkerId>,
}

impl Workers {
    pub(super) fn new() -> Workers {
        Workers {
            table: HashMap::new(),
            next_id: 1,
            to_replace: VecDeque::new(),
        }
    }

    /// The number for the next worker.
    pub(super) fn next_id(&mut self) -> WorkerId {
        let id = WorkerId::new(self.next_id);
        self.next_id += 1;
        id
    }

    pub(super) fn insert(&mut self, id: WorkerId, worker: Worker) {
        self.table.insert(id, worker);
    }

    pub(super) fn get_mut(&mut self, id: WorkerId) -> Option<&mut Worker> {
        self.table.get_mut(&id)
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (&WorkerId, &mut Worker)> {
        self.table.iter_mut()
    }

    pub(super) fn len(&self) -> usize {
        self.table.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    pub(super) fn any_starting(&self) -> bool {
        self.table.values().any(|w| w.state == State::Starting)
    }

    pub(super) fn knows_pid(&self, pid: ChildPid) -> bool {
        self.table.values().any(|w| w.pid == pid)
    }

    /// Whether a worker of a generation before `generation` is still here (a reload is under way).
    pub(super) fn any_older_than(&self, generation: u32) -> bool {
        self.table.values().any(|w| w.generation < generation)
    }

    /// Whether a worker of a generation before `generation` serves the app (not stopping, not answering 503
    /// for an app that did not import).
    pub(super) fn any_serving_older_than(&self, generation: u32) -> bool {
        self.table
            .values()
            .any(|w| w.generation < generation && !w.is_stopping() && !w.unavailable)
    }

    /// Workers serving or starting, not counting those on their way out.
    pub(super) fn active(&self) -> usize {
        self.table
            .values()
            .filter(|w| !w.is_stopping() && w.retiring.is_none())
            .count()
    }

    /// Removes an exited worker. An adopted one is reaped only now: its exit was seen without reaping it
    /// (`WNOWAIT`), so until here its pid could not be reused, and signalling it was safe.
    pub(super) fn forget(&mut self, id: WorkerId) -> Option<Worker> {
        let w = self.table.remove(&id)?;
        self.to_replace.retain(|&old| old != id);
        if w.adopted {
            zygote::reap(w.pid);
        }
        Some(w)
    }

    /// Queues `id` to stop once a new worker is ready.
    pub(super) fn replace_later(&mut self, id: WorkerId) {
        self.to_replace.push_back(id);
    }

    /// Queues every worker not already stopping, oldest generation first; returns how many.
    pub(super) fn replace_all_later(&mut self) -> usize {
        let mut old: Vec<(u32, WorkerId)> = self
            .table
            .iter()
            .filter(|(_, w)| !w.is_stopping())
            .map(|(id, w)| (w.generation, *id))
            .collect();
        old.sort();
        let count = old.len();
        self.to_replace.extend(old.into_iter().map(|(_, id)| id));
        count
    }

    /// A new worker is ready: the oldest one waiting for a replacement, if any is still here.
    pub(super) fn next_to_replace(&mut self) -> Option<WorkerId> {
        while let Some(old) = self.to_replace.pop_front() {
            if self.table.contains_key(&old) {
                return Some(old);
            }
        }
        None
    }

    /// A reload failed: the old workers waiting for a replacement stay; the new ones still starting are
    /// returned, to be killed.
    pub(super) fn cancel_generation(&mut self, generation: u32) -> Vec<WorkerId> {
        self.to_replace.clear();
        self.table
            .iter()
            .filter(|(_, w)| w.generation == generation && w.state == State::Starting)
            .map(|(id, _)| *id)
            .collect()
    }

    /// The most recently started worker that is not stopping.
    pub(super) fn newest_active(&self) -> Option<WorkerId> {
        self.table
            .iter()
            .filter(|(_, w)| !w.is_stopping())
            .map(|(id, _)| *id)
            .max()
    }

    /// The workers serving now: ready, and neither stopping nor retiring.
    pub(super) fn serving(&self) -> Vec<WorkerId> {
        self.table
            .iter()
            .filter(|(_, w)| w.state == State::Ready && w.retiring.is_none())
            .map(|(id, _)| *id)
            .collect()
    }

    pub(super) fn ids(&self) -> Vec<WorkerId> {
        self.table.keys().copied().collect()
    }

    /// Asks a worker to stop, unless it already is stopping (SIGKILL goes through regardless).
    pub(super) fn stop(&mut self, id: WorkerId, sig: Signal, graceful_timeout: Duration) {
        let stopping = self.table.get(&id).is_some_and(Worker::is_stopping);
        if !stopping || sig == Signal::SIGKILL {
            self.signal(id, sig, graceful_timeout);
        }
    }

    /// Sends `sig` to a worker and gives it until a deadline to exit: the graceful timeout and a margin for
    /// SIGTERM, a few seconds otherwise.
    pub(super) fn signal(&mut self, id: WorkerId, sig: Signal, graceful_timeout: Duration) {
        let grace = match sig {
            Signal::SIGTERM => graceful_timeout + KILL_MARGIN,
            _ => FAST_STOP,
        };
        if let Some(w) = self.table.get_mut(&id) {
            w.state = State::Stopping {
                kill_at: Instant::now() + grace,
            };
            // The worker is reaped only by its own wait task, so its pid cannot have been reused yet.
            w.pid.signal(sig);
        }
    }

    /// A worker that did not stop within its time is killed.
    pub(super) fn kill_overdue(&mut self) {
        let now = Instant::now();
        for (id, w) in &mut self.table {
            if let State::Stopping { kill_at } = w.state {
                if now >= kill_at {
                    tracing::warn!(target: LOG,
                        worker = id.get(),
                        pid = w.pid.get(),
                        "worker did not stop in time; killing it"
                    );
                    w.pid.signal(Signal::SIGKILL);
                    w.state = State::Stopping {
                        kill_at: now + Duration::from_secs(3600),
                    };
                }
            }
        }
    }
}
