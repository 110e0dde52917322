//! The two numbers the master keeps for a child, as types of their own so one is never taken for the other:
//! `WorkerId`, the master's number for a worker (`FERRULE_WORKER_ID`, the `worker` field of log lines), and
//! `ChildPid`, the pid of a process the master started or adopted.

use nix::sys::signal::{Signal, kill};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct WorkerId(u32);

impl WorkerId {
    pub(super) fn new(id: u32) -> WorkerId {
        WorkerId(id)
    }

    pub(super) fn get(self) -> u32 {
        self.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct ChildPid(u32);

impl ChildPid {
    pub(super) fn new(pid: u32) -> ChildPid {
        ChildPid(pid)
    }

    pub(super) fn get(self) -> u32 {
        self.0
    }

    /// Sends `sig`. The caller knows the process is not reaped yet, so the pid is still this child's.
    pub(super) fn signal(self, sig: Signal) {
        let _ = kill(nix::unistd::Pid::from_raw(self.0 as i32), sig);
    }
}
