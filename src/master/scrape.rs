//! `--metrics`: the master answers scrapes itself, on a socket of its own. Any uwsgi request gets the
//! Prometheus (OpenMetrics) text exposition of the counters the workers report, with the accept-queue depth
//! of each TCP socket read at scrape time; a ping gets a pong. A scrape never holds the counters' lock across
//! a wait on the network.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::listener::{self, BoundSocket, Listener, Stream};
use crate::metrics::MasterMetrics;
use crate::sync::lock;

use super::error::LOG;

/// The workers' TCP sockets whose accept queues a scrape reports, as copies of their descriptors. A graceful
/// stop closes them (`close`) with the master's other copies, so that the workers are the last to hold the
/// sockets (see `Bound::close_own`); a scrape after that reports no queue.
#[derive(Clone, Default)]
pub(super) struct Queues(Arc<Mutex<Vec<(String, OwnedFd)>>>);

impl Queues {
    pub(super) fn close(&self) {
        lock(&self.0).clear();
    }

    /// Each queue's depth now (a getsockopt each: no wait, so the lock is held only for that).
    fn depths(&self) -> Vec<(String, u64)> {
        lock(&self.0)
            .iter()
            .filter_map(|(name, fd)| Some((name.clone(), listener::listen_queue_depth(fd)?)))
            .collect()
    }
}

/// Serves `--metrics` on `bound` until the runtime stops; `sockets` are the workers' sockets, whose accept
/// queues each scrape reports (through the `Queues` returned).
pub(super) fn start(
    bound: &BoundSocket,
    sockets: &[BoundSocket],
    metrics: &Arc<Mutex<MasterMetrics>>,
) -> std::io::Result<Queues> {
    let queues = sockets
        .iter()
        .filter(|s| !s.is_unix())
        .map(|s| Ok((s.display_addr(), s.fd.try_clone()?)))
        .collect::<std::io::Result<Vec<_>>>()?;
    let queues = Queues(Arc::new(Mutex::new(queues)));
    tokio::spawn(serve_metrics(
        Listener::from_bound(bound)?,
        Arc::clone(metrics),
        queues.clone(),
    ));
    Ok(queues)
}

async fn serve_metrics(listener: Listener, metrics: Arc<Mutex<MasterMetrics>>, queues: Queues) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(target: LOG, %error, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = Arc::clone(&metrics);
        let queues = queues.clone();
        tokio::spawn(async move {
            let answered = tokio::time::timeout(Duration::from_secs(5), answer_scrape(stream, &metrics, &queues)).await;
            if !matches!(answered, Ok(Ok(()))) {
                tracing::debug!(target: LOG, "metrics: a scrape did not complete");
            }
        });
    }
}

async fn answer_scrape(mut stream: Stream, metrics: &Mutex<MasterMetrics>, queues: &Queues) -> std::io::Result<()> {
    let mut header = [0u8; crate::packet::HEADER_LEN];
    stream.read_exact(&mut header).await?;
    if let Some(proto) = crate::packet::sniff_foreign_protocol(&header) {
        tracing::warn!(target: LOG,
            protocol = proto,
            "metrics: {}",
            crate::packet::foreign_protocol_hint(proto)
        );
        return stream.shutdown().await;
    }
    let Ok((_, header)) = crate::packet::parse_uwsgi_header(&header) else {
        return Ok(());
    };
    let mut vars = vec![0u8; usize::from(header.datasize)];
    stream.read_exact(&mut vars).await?;
    if header.modifier1 == crate::packet::MODIFIER_PING {
        stream.write_all(&crate::packet::PONG).await?;
        return stream.shutdown().await;
    }
    let depths = queues.depths();
    let body = lock(metrics).render(&depths);
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
