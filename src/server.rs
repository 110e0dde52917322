//! The accept loop of a worker: accept on every listener, serve each connection as its own task, and on a
//! stop signal (or a retirement that requires it) drain in-flight requests under a time limit.

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
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
    for bound in &sockets {
        let listener = Listener::from_bound(bound)?;
        let name = bound.display_addr();
        tokio::spawn(accept_loop(
            listener,
            name,
            Arc::clone(&shared),
            stop_accepting.clone(),
            tracker.clone(),
        ));
    }
    control.send("ready");
    tracing::info!(threads = shared.pool.threads(), "ready");

    let stop = loop {
        tokio::select! {
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
    tracing::info!(served = shared.lifecycle.served(), "worker stopped");
    Ok(())
}

async fn accept_loop(
    listener: Listener,
    name: String,
    shared: Arc<ConnShared>,
    stop: CancellationToken,
    conns: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let span = tracing::info_span!("conn", %peer, listener = %name);
                conns.spawn(connection::serve(stream, Arc::clone(&shared)).instrument(span));
            }
            Err(error) => {
                // Out of file descriptors or memory: back off instead of spinning on the same error.
                tracing::error!(%error, listener = %name, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
