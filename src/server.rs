//! The accept loop of a worker: accept on every listener, serve each connection as its own task, and on a
//! stop signal (or a retirement that requires it) drain in-flight requests under a time limit.

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::connection::{self, ConnShared};
use crate::listener::{BoundSocket, Listener};
use crate::worker::{Control, RetireReason};

/// How the worker was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM, a timed-out request, or the master gone: finish in-flight requests (up to the graceful timeout).
    Graceful,
    /// SIGINT or SIGQUIT: stop now.
    Fast,
}

/// Serves until told to stop, then drains.
pub async fn run(
    sockets: Vec<BoundSocket>,
    shared: Arc<ConnShared>,
    mut retire_rx: mpsc::UnboundedReceiver<RetireReason>,
    mut control: Control,
) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut quit = signal(SignalKind::quit())?;
    let master_gone = control.master_gone()?;
    tokio::pin!(master_gone);

    let stop_accepting = CancellationToken::new();
    let tracker = TaskTracker::new();
    // Shared by every listener: past the limit, new connections wait in the kernel's listen queue instead of
    // taking memory here.
    let slots = Arc::new(Semaphore::new(shared.config.max_connections));
    for bound in &sockets {
        let listener = Listener::from_bound(bound)?;
        let name = bound.display_addr();
        tokio::spawn(accept_loop(
            listener,
            name,
            Arc::clone(&shared),
            Arc::clone(&slots),
            stop_accepting.clone(),
            tracker.clone(),
        ));
    }
    control.send("ready");
    tracing::info!(threads = shared.pool.threads(), "ready");

    // Counters go to the master once a second, which is plenty for a scrape interval of seconds.
    let mut report = tokio::time::interval(Duration::from_secs(1));
    let stop = loop {
        tokio::select! {
            _ = report.tick() => control.send(&shared.metrics.snapshot().encode()),
            _ = term.recv() => break Stop::Graceful,
            _ = int.recv() => break Stop::Fast,
            _ = quit.recv() => break Stop::Fast,
            () = &mut master_gone => {
                tracing::warn!("the master process went away; stopping");
                break Stop::Graceful;
            }
            Some(reason) = retire_rx.recv() => {
                tracing::info!(reason = reason.as_str(), served = shared.lifecycle.served(), "asking to be replaced");
                control.send(&format!("retire {}", reason.as_str()));
                // A worker with a stuck request is unhealthy: it stops taking connections now. Recycling keeps
                // serving until the master has a replacement ready and sends SIGTERM.
                if reason == RetireReason::Timeout {
                    break Stop::Graceful;
                }
            }
        }
    };
    stop_accepting.cancel();
    // Close our copies of the listening sockets; the master and the other workers keep them open.
    drop(sockets);
    tracker.close();
    let limit = match stop {
        Stop::Graceful => shared.config.graceful_timeout,
        Stop::Fast => Duration::ZERO,
    };
    if !tracker.is_empty() {
        tracing::info!(in_flight = tracker.len(), ?stop, "waiting for in-flight requests");
    }
    if tokio::time::timeout(limit, tracker.wait()).await.is_err() {
        tracing::warn!(cut_off = tracker.len(), timeout = ?limit, "stop cut off requests still in flight");
    }
    control.send(&shared.metrics.snapshot().encode());
    tracing::info!(served = shared.lifecycle.served(), "worker stopped");
    Ok(())
}

async fn accept_loop(
    listener: Listener,
    name: String,
    shared: Arc<ConnShared>,
    slots: Arc<Semaphore>,
    stop: CancellationToken,
    conns: TaskTracker,
) {
    // Warn about a full worker at most every so often, not once per waiting connection.
    let mut last_full_warning: Option<std::time::Instant> = None;
    loop {
        let permit = match Arc::clone(&slots).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if last_full_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    last_full_warning = Some(std::time::Instant::now());
                    tracing::warn!(
                        limit = shared.config.max_connections,
                        "connection limit reached; new connections wait in the listen queue"
                    );
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    permit = Arc::clone(&slots).acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                }
            }
        };
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                if let Some(addr) = peer {
                    let allowed = &shared.config.allow_from;
                    if !allowed.is_empty() && !allowed.iter().any(|net| net.contains(addr.ip())) {
                        tracing::warn!(peer = %addr, listener = %name, "refusing a connection not in --allow-from");
                        continue;
                    }
                }
                let peer = peer.map_or_else(|| "unix".to_owned(), |a| a.to_string());
                let span = tracing::info_span!("conn", %peer, listener = %name);
                let shared = Arc::clone(&shared);
                conns.spawn(
                    async move {
                        connection::serve(stream, shared).await;
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
            Err(error) => {
                // Out of file descriptors or memory: back off instead of spinning on the same error.
                tracing::error!(%error, listener = %name, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
