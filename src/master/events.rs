//! What the children and the master's own timers tell the supervision loop, over one channel.

use std::process::ExitStatus;

use crate::lifecycle::RetireReason;
use crate::metrics::Snapshot;

use super::ids::{ChildPid, WorkerId};

pub(super) enum Event {
    Ready(WorkerId),
    Stats(WorkerId, Box<Snapshot>),
    Retire(WorkerId, RetireReason),
    Exited(WorkerId, ExitStatus),
    /// The crash back-off is over: start the missing workers.
    Respawn,
    /// The zygote with this pid imported the app.
    ZygoteReady(ChildPid),
    ZygoteExited(ChildPid, ExitStatus),
    /// Time to start the zygote again after it died.
    RestartZygote,
}

pub(super) type Events = tokio::sync::mpsc::UnboundedSender<Event>;
