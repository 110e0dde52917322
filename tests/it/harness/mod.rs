//! Shared harness for the tier-3 tests: the real `ferrule` binary, a real nginx, a venv of real frameworks; and
//! for every tier, the captured nginx packets and the one uwsgi encoder.

use std::time::Duration;

pub mod ferrule;
pub mod fixtures;
pub mod http;
pub mod json;
pub mod log;
pub mod netns;
pub mod nginx;
pub mod procs;
pub mod response;
pub mod server;
pub mod stack;
pub mod tls;
pub mod tmpfs;
pub mod uwsgi;
pub mod venv;

/// Bound for a log line the server writes in reaction to something the test just did.
pub const LOG_WAIT: Duration = Duration::from_secs(10);
/// Bound for a worker to start (a fork, or an import of CPython and the app) on a loaded 2-core box.
pub const WORKER_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound for a run that should exit by itself (`--check-config`, a refused start).
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound for reading one direct answer to its close.
pub const READ_WAIT: Duration = Duration::from_secs(30);
/// How long a fast stop at the end of a test may take before the harness kills the process.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);
