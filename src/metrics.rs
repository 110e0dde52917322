//! Prometheus metrics. Each worker counts its own requests in atomics and reports a snapshot to the master
//! every second over the control channel; the master adds them up (keeping what exited workers counted, so
//! counters never go backwards), adds what only it knows (restarts, memory per worker, listen queues), and
//! serves the text exposition on `--metrics` over the uwsgi protocol.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::tls::HandshakeFailure;

/// Upper bounds of the request duration histogram, in seconds (the last bucket, +Inf, is implicit).
pub(crate) const DURATION_BUCKETS: [f64; 12] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const NBUCKETS: usize = DURATION_BUCKETS.len() + 1;
/// Reasons a TLS handshake fails, counted apart.
const NFAILURES: usize = HandshakeFailure::ALL.len();

/// A worker's own counters.
#[derive(Debug, Default)]
pub(crate) struct WorkerMetrics {
    /// Requests by status class: 1xx to 5xx.
    requests: [AtomicU64; 5],
    in_flight: AtomicI64,
    /// Non-cumulative bucket counts, the last one for durations above every bound.
    buckets: [AtomicU64; NBUCKETS],
    duration_sum_us: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    timeouts: AtomicU64,
    /// TLS handshakes done: full, resumed.
    tls_handshakes: [AtomicU64; 2],
    /// TLS handshakes failed, by [`HandshakeFailure`].
    tls_failures: [AtomicU64; NFAILURES],
}

impl WorkerMetrics {
    pub(crate) fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// Pairs with `request_started`, however the request ended.
    pub(crate) fn request_ended(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Records an answer, including those the server made itself (400, 413, 431, 504).
    pub(crate) fn answered(&self, status: u16, body_bytes: u64, elapsed: Duration) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[class].fetch_add(1, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        let bucket = DURATION_BUCKETS.iter().position(|&b| secs <= b).unwrap_or(NBUCKETS - 1);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.duration_sum_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        self.bytes_out.fetch_add(body_bytes, Ordering::Relaxed);
    }

    pub(crate) fn received(&self, bytes: u64) {
        self.bytes_in.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn timed_out(&self) {
        self.timeouts.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn tls_handshake_done(&self, resumed: bool) {
        self.tls_handshakes[usize::from(resumed)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn tls_handshake_failed(&self, why: HandshakeFailure) {
        self.tls_failures[why.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            requests: self.requests.each_ref().map(load),
            in_flight: self.in_flight.load(Ordering::Relaxed).max(0),
            buckets: self.buckets.each_ref().map(load),
            duration_sum_us: load(&self.duration_sum_us),
            bytes_in: load(&self.bytes_in),
            bytes_out: load(&self.bytes_out),
            timeouts: load(&self.timeouts),
            tls_handshakes: self.tls_handshakes.each_ref().map(load),
            tls_failures: self.tls_failures.each_ref().map(load),
        }
    }
}

/// A worker's counters at one moment, as sent to the master.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) requests: [u64; 5],
    pub(crate) in_flight: i64,
    pub(crate) buckets: [u64; NBUCKETS],
    pub(crate) duration_sum_us: u64,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    pub(crate) timeouts: u64,
    pub(crate) tls_handshakes: [u64; 2],
    pub(crate) tls_failures: [u64; NFAILURES],
}

impl Snapshot {
    /// The control-channel line: `stats` and the numbers in a fixed order.
    pub(crate) fn encode(&self) -> String {
        let mut parts: Vec<String> = vec!["stats".into()];
        parts.extend(self.requests.iter().map(u64::to_string));
        parts.push(self.in_flight.to_string());
        parts.extend(self.buckets.iter().map(u64::to_string));
        for n in [self.duration_sum_us, self.bytes_in, self.bytes_out, self.timeouts] {
            parts.push(n.to_string());
        }
        parts.extend(self.tls_handshakes.iter().map(u64::to_string));
        parts.extend(self.tls_failures.iter().map(u64::to_string));
        parts.join(" ")
    }

    /// Parses the numbers after `stats`.
    pub(crate) fn parse(numbers: &str) -> Option<Snapshot> {
        let n: Vec<i64> = numbers.split(' ').map(|x| x.parse().ok()).collect::<Option<_>>()?;
        if n.len() != 5 + 1 + NBUCKETS + 4 + 2 + NFAILURES || n.iter().any(|&x| x < 0) {
            return None;
        }
        let u = |i: usize| n[i] as u64;
        let mut s = Snapshot {
            in_flight: n[5],
            ..Snapshot::default()
        };
        for i in 0..5 {
            s.requests[i] = u(i);
        }
        for i in 0..NBUCKETS {
            s.buckets[i] = u(6 + i);
        }
        let rest = 6 + NBUCKETS;
        s.duration_sum_us = u(rest);
        s.bytes_in = u(rest + 1);
        s.bytes_out = u(rest + 2);
        s.timeouts = u(rest + 3);
        for i in 0..2 {
            s.tls_handshakes[i] = u(rest + 4 + i);
        }
        for i in 0..NFAILURES {
            s.tls_failures[i] = u(rest + 6 + i);
        }
        Some(s)
    }

    /// Adds counters (not the in-flight gauge, which only live workers have).
    fn add_counters(&mut self, other: &Snapshot) {
        for i in 0..5 {
            self.requests[i] += other.requests[i];
        }
        for i in 0..NBUCKETS {
            self.buckets[i] += other.buckets[i];
        }
        self.duration_sum_us += other.duration_sum_us;
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.timeouts += other.timeouts;
        for i in 0..2 {
            self.tls_handshakes[i] += other.tls_handshakes[i];
        }
        for i in 0..NFAILURES {
            self.tls_failures[i] += other.tls_failures[i];
        }
    }
}

/// What the master knows: the last snapshot of each live worker, the sum of exited ones, and restarts.
#[derive(Debug, Default)]
pub(crate) struct MasterMetrics {
    live: HashMap<u32, (u32, Snapshot)>,
    exited: Snapshot,
    restarts: BTreeMap<&'static str, u64>,
    /// Workers added and retired by `--max-workers`.
    scaled_up: u64,
    scaled_down: u64,
}

/// Why the master replaced a worker, for `ferrule_worker_restarts_total`.
pub(crate) const RESTART_REASONS: [&str; 5] = ["crash", "timeout", "max-requests", "memory", "reload"];

impl MasterMetrics {
    pub(crate) fn worker_started(&mut self, id: u32, pid: u32) {
        self.live.insert(id, (pid, Snapshot::default()));
    }

    pub(crate) fn update(&mut self, id: u32, snapshot: Snapshot) {
        if let Some(entry) = self.live.get_mut(&id) {
            entry.1 = snapshot;
        }
    }

    /// Keeps what an exited worker counted, so the totals never go backwards.
    pub(crate) fn worker_exited(&mut self, id: u32) {
        if let Some((_, last)) = self.live.remove(&id) {
            self.exited.add_counters(&last);
        }
    }

    /// `--max-workers` added (`up`) or retired a worker.
    pub(crate) fn scaled(&mut self, up: bool) {
        if up {
            self.scaled_up += 1;
        } else {
            self.scaled_down += 1;
        }
    }

    pub(crate) fn restarted(&mut self, reason: &'static str, count: u64) {
        *self.restarts.entry(reason).or_default() += count;
    }

    /// The Prometheus text exposition. `queues` are listen queue depths by socket, where the OS reports them.
    pub(crate) fn render(&self, queues: &[(String, u64)]) -> String {
        let mut total = self.exited;
        let mut in_flight = 0;
        for (_, snap) in self.live.values() {
            total.add_counters(snap);
            in_flight += snap.in_flight;
        }
        let mut registry = Registry::with_prefix("ferrule");
        let requests = (1..)
            .zip(total.requests)
            .map(|(i, n)| (label("status_class", format!("{i}xx")), n));
        registry.register("requests", "Requests answered, by status class", counters(requests));
        registry.register("requests_in_flight", "Requests being served now", gauge(in_flight));
        registry.register(
            "request_duration_seconds",
            "Time from the request's first byte to the response's last",
            FixedHistogram::of(&total),
        );
        let totals = [
            (
                "request_bytes",
                "Request bytes received (packet and body)",
                total.bytes_in,
            ),
            ("response_bytes", "Response body bytes sent", total.bytes_out),
            (
                "request_timeouts",
                "Requests answered 504 after --timeout",
                total.timeouts,
            ),
        ];
        for (name, help, n) in totals {
            registry.register(name, help, counter(n));
        }
        let handshakes = ["full", "resumed"].into_iter().zip(total.tls_handshakes);
        registry.register(
            "tls_handshakes",
            "TLS handshakes done on tls:// sockets: full, or resumed from a session ticket",
            counters(handshakes.map(|(kind, n)| (label("kind", kind), n))),
        );
        let failures = HandshakeFailure::ALL.into_iter().zip(total.tls_failures);
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed on tls:// sockets, by reason",
            counters(failures.map(|(why, n)| (label("reason", why.as_str()), n))),
        );
        let restarts = RESTART_REASONS.map(|r| (label("reason", r), self.restarts.get(r).copied().unwrap_or(0)));
        registry.register("worker_restarts", "Workers replaced, by reason", counters(restarts));
        registry.register("workers", "Live worker processes", gauge(self.live.len() as i64));
        let scaled = [("up", self.scaled_up), ("down", self.scaled_down)];
        registry.register(
            "worker_scalings",
            "Workers added while requests waited (up) and retired while idle (down), with --max-workers",
            counters(scaled.map(|(direction, n)| (label("direction", direction), n))),
        );
        registry.register(
            "worker_resident_memory_bytes",
            "Resident memory of each worker",
            self.per_worker(process_rss),
        );
        registry.register(
            "worker_private_memory_bytes",
            "Memory of each worker that no other process shares (with --preload, what it does not share with the \
             preloaded app)",
            self.per_worker(process_private),
        );
        let depths = queues
            .iter()
            .map(|(socket, depth)| (label("socket", socket), *depth as i64));
        registry.register(
            "listen_queue_depth",
            "Connections waiting to be accepted (TCP sockets; Linux does not report it for Unix sockets)",
            gauges(depths),
        );
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    /// A gauge per live worker (labelled with its number and pid) from what `measure` reads of its pid; a
    /// worker it cannot read (it just exited) is left out.
    fn per_worker(&self, measure: fn(u32) -> Option<u64>) -> Family<Labels, Gauge> {
        gauges(self.live.iter().filter_map(|(id, (pid, _))| {
            let labels = vec![("worker".into(), id.to_string()), ("pid".into(), pid.to_string())];
            Some((labels, measure(*pid)? as i64))
        }))
    }
}

/// The labels of one sample.
type Labels = Vec<(String, String)>;

fn label(name: &str, value: impl Into<String>) -> Labels {
    vec![(name.to_owned(), value.into())]
}

/// A family of counters, one per label set.
fn counters(samples: impl IntoIterator<Item = (Labels, u64)>) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    for (labels, n) in samples {
        family.get_or_create(&labels).inc_by(n);
    }
    family
}

/// A family of gauges, one per label set.
fn gauges(samples: impl IntoIterator<Item = (Labels, i64)>) -> Family<Labels, Gauge> {
    let family = Family::<Labels, Gauge>::default();
    for (labels, v) in samples {
        family.get_or_create(&labels).set(v);
    }
    family
}

fn counter(n: u64) -> Counter {
    let c = Counter::<u64>::default();
    c.inc_by(n);
    c
}

fn gauge(v: i64) -> Gauge {
    let g = Gauge::<i64>::default();
    g.set(v);
    g
}

/// A histogram whose buckets were counted elsewhere (in the workers).
#[derive(Debug)]
struct FixedHistogram {
    sum: f64,
    count: u64,
    /// (upper bound, count in this bucket alone); the encoder makes them cumulative.
    buckets: Vec<(f64, u64)>,
}

impl FixedHistogram {
    /// The request durations the workers counted.
    fn of(total: &Snapshot) -> FixedHistogram {
        let bounds = DURATION_BUCKETS.iter().copied().chain([f64::INFINITY]);
        FixedHistogram {
            sum: total.duration_sum_us as f64 / 1e6,
            count: total.buckets.iter().sum(),
            buckets: bounds.zip(total.buckets).collect(),
        }
    }
}

impl EncodeMetric for FixedHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Resident memory of another process, from /proc.
pub(crate) fn process_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// Memory only this process maps (private clean and dirty pages; `/proc/PID/smaps_rollup`), in bytes. Pages
/// shared with the process it was forked from, and not written since, are not in it.
pub(crate) fn process_private(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    private_of_rollup(&rollup)
}

fn private_of_rollup(rollup: &str) -> Option<u64> {
    let field = |name: &str| -> Option<u64> {
        let line = rollup.lines().find(|l| l.starts_with(name))?;
        line[name.len()..].split_whitespace().next()?.parse::<u64>().ok()
    };
    Some((field("Private_Clean:")? + field("Private_Dirty:")?) * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_memory_is_clean_plus_dirty_private_pages() {
        let rollup = "55d0c000-7ffc000 ---p 00000000 00:00 0                          [rollup]\n\
                      Rss:               30000 kB\nPss:               12000 kB\nShared_Clean:      20000 kB\n\
                      Shared_Dirty:       1000 kB\nPrivate_Clean:       500 kB\nPrivate_Dirty:      8500 kB\n";
        assert_eq!(private_of_rollup(rollup), Some(9000 * 1024));
        assert_eq!(private_of_rollup("Rss: 1 kB\n"), None);
        assert!(process_private(std::process::id()).is_some_and(|b| b > 0));
    }

    #[test]
    fn snapshot_round_trip() {
        let m = WorkerMetrics::default();
        m.request_started();
        m.answered(200, 11, Duration::from_millis(3));
        m.request_ended();
        m.answered(413, 5, Duration::from_secs(20));
        m.received(100);
        m.timed_out();
        m.tls_handshake_done(false);
        m.tls_handshake_done(true);
        m.tls_handshake_done(true);
        m.tls_handshake_failed(HandshakeFailure::UnknownCa);
        let snap = m.snapshot();
        let line = snap.encode();
        let parsed = Snapshot::parse(line.strip_prefix("stats ").unwrap()).unwrap();
        assert_eq!(parsed, snap);
        assert_eq!(snap.requests, [0, 1, 0, 1, 0]);
        assert_eq!(snap.buckets[1], 1); // 3 ms is in the 5 ms bucket
        assert_eq!(snap.buckets[NBUCKETS - 1], 1); // 20 s is past every bound
        assert_eq!(snap.tls_handshakes, [1, 2]);
        assert_eq!(snap.tls_failures[HandshakeFailure::UnknownCa.index()], 1);
        assert!(Snapshot::parse("1 2 3").is_none());
        let mut master = MasterMetrics::default();
        master.worker_started(1, 100);
        master.update(1, snap);
        let text = master.render(&[]);
        assert!(
            text.contains("ferrule_tls_handshakes_total{kind=\"resumed\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("ferrule_tls_handshake_failures_total{reason=\"unknown-ca\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ferrule_tls_handshake_failures_total{reason=\"timeout\"} 0"),
            "{text}"
        );
    }

    /// The exposition with the samples of each labelled family sorted: a family keeps its samples in a hash
    /// map, so their order within the family changes from run to run, and only that. The histogram's lines
    /// keep their order.
    fn sorted_within_families(text: &str) -> String {
        let mut out = Vec::new();
        let mut samples: Vec<&str> = Vec::new();
        let mut histogram = false;
        for line in text.lines() {
            if line.starts_with('#') {
                samples.sort_unstable();
                out.append(&mut samples);
                out.push(line);
                histogram = line.starts_with("# TYPE") && line.ends_with(" histogram");
            } else if histogram {
                out.push(line);
            } else {
                samples.push(line);
            }
        }
        samples.sort_unstable();
        out.append(&mut samples);
        out.join("\n") + "\n"
    }

    #[test]
    fn full_render() {
        let mut master = MasterMetrics::default();
        // Pids that cannot exist, so the memory families stay empty and the text does not depend on this process.
        master.worker_started(1, 4_000_000_001);
        master.worker_started(2, 4_000_000_002);
        master.scaled(true);
        master.scaled(true);
        master.scaled(false);
        let mut buckets = [0; NBUCKETS];
        (buckets[0], buckets[5], buckets[NBUCKETS - 1]) = (2, 7, 1);
        let mut tls_failures = [0; NFAILURES];
        tls_failures[0] = 1;
        let snap = Snapshot {
            requests: [1, 20, 3, 4, 5],
            in_flight: 3,
            buckets,
            duration_sum_us: 1_234_567,
            bytes_in: 1000,
            bytes_out: 2000,
            timeouts: 2,
            tls_handshakes: [5, 6],
            tls_failures,
        };
        master.update(1, snap);
        master.update(2, snap);
        master.worker_exited(2);
        master.restarted("crash", 2);
        master.restarted("reload", 3);
        let text = master.render(&[("127.0.0.1:3031".into(), 4), ("[::1]:3032".into(), 0)]);
        assert_eq!(sorted_within_families(&text), FULL_RENDER, "{text}");
    }

    const FULL_RENDER: &str = "\
        # HELP ferrule_requests Requests answered, by status class.\n\
        # TYPE ferrule_requests counter\n\
        ferrule_requests_total{status_class=\"1xx\"} 2\n\
        ferrule_requests_total{status_class=\"2xx\"} 40\n\
        ferrule_requests_total{status_class=\"3xx\"} 6\n\
        ferrule_requests_total{status_class=\"4xx\"} 8\n\
        ferrule_requests_total{status_class=\"5xx\"} 10\n\
        # HELP ferrule_requests_in_flight Requests being served now.\n\
        # TYPE ferrule_requests_in_flight gauge\n\
        ferrule_requests_in_flight 3\n\
        # HELP ferrule_request_duration_seconds Time from the request's first byte to the response's last.\n\
        # TYPE ferrule_request_duration_seconds histogram\n\
        ferrule_request_duration_seconds_sum 2.469134\n\
        ferrule_request_duration_seconds_count 20\n\
        ferrule_request_duration_seconds_bucket{le=\"0.001\"} 4\n\
        ferrule_request_duration_seconds_bucket{le=\"0.005\"} 4\n\
        ferrule_request_duration_seconds_bucket{le=\"0.01\"} 4\n\
        ferrule_request_duration_seconds_bucket{le=\"0.025\"} 4\n\
        ferrule_request_duration_seconds_bucket{le=\"0.05\"} 4\n\
        ferrule_request_duration_seconds_bucket{le=\"0.1\"} 18\n\
        ferrule_request_duration_seconds_bucket{le=\"0.25\"} 18\n\
        ferrule_request_duration_seconds_bucket{le=\"0.5\"} 18\n\
        ferrule_request_duration_seconds_bucket{le=\"1.0\"} 18\n\
        ferrule_request_duration_seconds_bucket{le=\"2.5\"} 18\n\
        ferrule_request_duration_seconds_bucket{le=\"5.0\"} 18\n\
        ferrule_request_duration_seconds_bucket{le=\"10.0\"} 18\n\
        ferrule_request_duration_seconds_bucket{le=\"+Inf\"} 20\n\
        # HELP ferrule_request_bytes Request bytes received (packet and body).\n\
        # TYPE ferrule_request_bytes counter\n\
        ferrule_request_bytes_total 2000\n\
        # HELP ferrule_response_bytes Response body bytes sent.\n\
        # TYPE ferrule_response_bytes counter\n\
        ferrule_response_bytes_total 4000\n\
        # HELP ferrule_request_timeouts Requests answered 504 after --timeout.\n\
        # TYPE ferrule_request_timeouts counter\n\
        ferrule_request_timeouts_total 4\n\
        # HELP ferrule_tls_handshakes TLS handshakes done on tls:// sockets: full, or resumed from a session ticket.\n\
        # TYPE ferrule_tls_handshakes counter\n\
        ferrule_tls_handshakes_total{kind=\"full\"} 10\n\
        ferrule_tls_handshakes_total{kind=\"resumed\"} 12\n\
        # HELP ferrule_tls_handshake_failures TLS handshakes that failed on tls:// sockets, by reason.\n\
        # TYPE ferrule_tls_handshake_failures counter\n\
        ferrule_tls_handshake_failures_total{reason=\"bad-certificate\"} 0\n\
        ferrule_tls_handshake_failures_total{reason=\"closed\"} 0\n\
        ferrule_tls_handshake_failures_total{reason=\"http\"} 0\n\
        ferrule_tls_handshake_failures_total{reason=\"no-client-certificate\"} 2\n\
        ferrule_tls_handshake_failures_total{reason=\"not-tls\"} 0\n\
        ferrule_tls_handshake_failures_total{reason=\"plain-uwsgi\"} 0\n\
        ferrule_tls_handshake_failures_total{reason=\"protocol\"} 0\n\
        ferrule_tls_handshake_failures_total{reason=\"rejected-by-client\"} 0\n\
        ferrule_tls_handshake_failures_total{reason=\"timeout\"} 0\n\
        ferrule_tls_handshake_failures_total{reason=\"unknown-ca\"} 0\n\
        # HELP ferrule_worker_restarts Workers replaced, by reason.\n\
        # TYPE ferrule_worker_restarts counter\n\
        ferrule_worker_restarts_total{reason=\"crash\"} 2\n\
        ferrule_worker_restarts_total{reason=\"max-requests\"} 0\n\
        ferrule_worker_restarts_total{reason=\"memory\"} 0\n\
        ferrule_worker_restarts_total{reason=\"reload\"} 3\n\
        ferrule_worker_restarts_total{reason=\"timeout\"} 0\n\
        # HELP ferrule_workers Live worker processes.\n\
        # TYPE ferrule_workers gauge\n\
        ferrule_workers 1\n\
        # HELP ferrule_worker_scalings Workers added while requests waited (up) and retired while idle (down), with --max-workers.\n\
        # TYPE ferrule_worker_scalings counter\n\
        ferrule_worker_scalings_total{direction=\"down\"} 1\n\
        ferrule_worker_scalings_total{direction=\"up\"} 2\n\
        # HELP ferrule_listen_queue_depth Connections waiting to be accepted (TCP sockets; Linux does not report it for Unix sockets).\n\
        # TYPE ferrule_listen_queue_depth gauge\n\
        ferrule_listen_queue_depth{socket=\"127.0.0.1:3031\"} 4\n\
        ferrule_listen_queue_depth{socket=\"[::1]:3032\"} 0\n\
        # EOF\n\
";

    #[test]
    fn memory_families_label_each_worker_with_its_number_and_pid() {
        let mut master = MasterMetrics::default();
        let pid = std::process::id();
        master.worker_started(7, pid);
        let text = master.render(&[]);
        for family in ["worker_resident_memory_bytes", "worker_private_memory_bytes"] {
            let sample = format!("ferrule_{family}{{worker=\"7\",pid=\"{pid}\"}} ");
            assert!(text.contains(&sample), "no {sample:?} in\n{text}");
        }
    }

    #[test]
    fn exited_workers_keep_their_counts() {
        let mut master = MasterMetrics::default();
        master.worker_started(1, 100);
        let mut snap = Snapshot::default();
        snap.requests[1] = 7;
        snap.in_flight = 2;
        master.update(1, snap);
        master.worker_exited(1);
        master.restarted("crash", 1);
        let text = master.render(&[("127.0.0.1:3031".into(), 4)]);
        assert!(
            text.contains("ferrule_requests_total{status_class=\"2xx\"} 7"),
            "{text}"
        );
        assert!(text.contains("ferrule_requests_in_flight 0"), "{text}");
        assert!(
            text.contains("ferrule_worker_restarts_total{reason=\"crash\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ferrule_listen_queue_depth{socket=\"127.0.0.1:3031\"} 4"),
            "{text}"
        );
        assert!(
            text.contains("ferrule_request_duration_seconds_bucket{le=\"+Inf\"} 0"),
            "{text}"
        );
    }
}
