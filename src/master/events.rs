//! What the children and the master's own timers tell the supervision loop, over one channel.

use std::path::PathBuf;
use std::process::ExitStatus;

use crate::lifecycle::RetireReason;
use crate::metrics::Snapshot;

use super::ids::{ChildPid, WorkerId};

pub(super) enum Event {
    Ready(WorkerId),
    Stats(WorkerId, Box<Snapshot>),
    Retire(WorkerId, RetireReason),
    Exited(WorkerId, ExitStatus),
    /// Under `--reload`, a worker whose app did not import (it answers 503).
    Unavailable(WorkerId),
    /// Under `--reload`, some files a worker's (or the zygote's) app imported; `FilesDone` ends a report.
    Files(Vec<PathBuf>),
    FilesDone,
    /// A watched file changed (`--reload`, `--touch-reload`): `others` more changed with it.
    Changed {
        file: PathBuf,
        others: usize,
    },
    /// The crash back-off is over: start the missing workers.
    Respawn,
    /// The zygote with this pid imported the app.
    ZygoteReady(ChildPid),
    /// Under `--reload`, the zygote with this pid could not import the app (its workers would answer 503).
    ZygoteUnavailable(ChildPid),
    ZygoteExited(ChildPid, ExitStatus),
    /// Time to start the zygote again after it died.
    RestartZygote,
}

pub(super) type Events = tokio::sync::mpsc::UnboundedSender<Event>;
