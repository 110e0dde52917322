//! What every connection of a worker uses: the settings, the worker's lifecycle and metrics, the `--timeout`
//! watchdog, and the count of requests in flight that a stop drains. Built once per worker.

use std::sync::Arc;

use super::watchdog::Watchdog;
use crate::config::Config;
use crate::lifecycle::{InFlight, Lifecycle};
use crate::metrics::WorkerMetrics;

pub(crate) struct WorkerContext {
    pub(crate) config: Config,
    pub(crate) lifecycle: Lifecycle,
    pub(crate) metrics: WorkerMetrics,
    /// Answers requests that run past `--timeout`; `None` without one.
    pub(crate) watchdog: Option<Watchdog>,
    /// Requests and connections in progress: each counts itself out when it ends, and a stop waits for none
    /// to be left.
    pub(crate) in_flight: Arc<InFlight>,
    /// For tls:// sockets: the server configuration (certificate, key, client CAs, tickets).
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
}

impl WorkerContext {
    pub(crate) fn new(config: Config, lifecycle: Lifecycle, tls: Option<Arc<rustls::ServerConfig>>) -> WorkerContext {
        WorkerContext {
            tls,
            watchdog: config.limits.timeout.map(Watchdog::new),
            config,
            lifecycle,
            metrics: WorkerMetrics::default(),
            in_flight: Arc::new(InFlight::default()),
        }
    }
}
