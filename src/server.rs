//! The accept loop of one process: accept on every listener, serve each connection as its own task, and on a
//! stop signal drain in-flight requests under a time limit before removing socket files.

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::connection::{self, ConnShared};
use crate::listener::{BoundSocket, Listener};

/// How the process was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM: finish in-flight requests (up to the graceful timeout).
    Graceful,
    /// SIGINT or SIGQUIT: stop now.
    Fast,
}

/// Serves until a stop signal, then drains. Takes the sockets so they are closed and removed at the end.
pub async fn run(sockets: Vec<BoundSocket>, shared: Arc<ConnShared>) -> std::io::Result<()> {
    let stop_accepting = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut listeners = Vec::with_capacity(sockets.len());
    for bound in &sockets {
        listeners.push((Listener::from_bound(bound)?, bound.display_addr()));
    }
    for (listener, name) in listeners {
        let token = stop_accepting.clone();
        let shared = Arc::clone(&shared);
        let conns = tracker.clone();
        tokio::spawn(accept_loop(listener, name, shared, token, conns));
    }
    tracing::info!(
        threads = shared.pool.threads(),
        pid = std::process::id(),
        "ready"
    );

    let stop = wait_for_stop().await?;
    stop_accepting.cancel();
    // Remove the socket files first, so nginx fails over to another upstream instead of queueing here.
    for bound in &sockets {
        bound.remove_file();
    }
    drop(sockets);
    tracker.close();
    let in_flight = tracker.len();
    let limit = match stop {
        Stop::Graceful => shared.config.graceful_timeout,
        Stop::Fast => Duration::ZERO,
    };
    if in_flight > 0 {
        tracing::info!(in_flight, ?stop, "waiting for in-flight requests");
    }
    if tokio::time::timeout(limit, tracker.wait()).await.is_err() {
        tracing::warn!(cut_off = tracker.len(), timeout = ?limit, "stop cut off requests still in flight");
    }
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_stop() -> std::io::Result<Stop> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut quit = signal(SignalKind::quit())?;
    let stop = tokio::select! {
        _ = term.recv() => Stop::Graceful,
        _ = int.recv() => Stop::Fast,
        _ = quit.recv() => Stop::Fast,
    };
    tracing::info!(?stop, "stop requested");
    Ok(stop)
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
