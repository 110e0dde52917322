//! How many workers, said at start-up and at each reload: what `--workers auto` and `--max-workers auto` found
//! (and a floor lowered to the ceiling), and, once the first worker is ready, whether that many workers of its
//! size fit in the cgroup's memory limit.

use crate::config::Config;

use super::error::LOG;

/// Says how an `auto` count was found: `workers=auto → 2 (cpu quota 200000/100000)`.
pub(super) fn log_counts(config: &Config) {
    let workers = &config.workers;
    let Some(cpus) = &workers.auto else { return };
    for option in &workers.auto_options {
        let count = match option.as_str() {
            "workers" => workers.clamped_from.unwrap_or(workers.count),
            _ => workers.max.unwrap_or(workers.count),
        };
        tracing::info!(target: LOG, option, count, source = cpus.source.as_str(), "{option}=auto → {count} ({})", cpus.source);
    }
    if let Some(found) = workers.clamped_from {
        tracing::warn!(target: LOG,
            found,
            max_workers = workers.count,
            "--workers auto found more CPUs than --max-workers allows; starting --max-workers workers"
        );
    }
}

/// Warns when `workers` workers the size of the first one (`pid`) would not fit in the cgroup's memory limit.
/// Under `--preload` what a worker shares with the preloaded app is counted once.
pub(super) fn check_memory(pid: u32, workers: usize, preload: bool) {
    let Some(limit) = crate::resources::memory_limit() else {
        return;
    };
    let Some(rss) = crate::metrics::process_rss(pid) else {
        return;
    };
    let private = if preload {
        crate::metrics::process_private(pid).unwrap_or(rss)
    } else {
        rss
    };
    let needed = needed_memory(rss, private, workers);
    if needed > limit {
        tracing::warn!(target: LOG,
            workers,
            worker_mib = rss >> 20,
            needed_mib = needed >> 20,
            limit_mib = limit >> 20,
            "the workers may not fit in the cgroup's memory limit: lower --workers (or --max-workers) or raise the limit"
        );
    }
}

/// `workers` workers of `rss` bytes resident, of which `private` are their own (the rest shared by all).
fn needed_memory(rss: u64, private: u64, workers: usize) -> u64 {
    let shared = rss.saturating_sub(private);
    shared.saturating_add(private.saturating_mul(workers as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_counts_once() {
        assert_eq!(needed_memory(100, 100, 4), 400);
        assert_eq!(needed_memory(100, 20, 4), 80 + 80);
        assert_eq!(
            needed_memory(100, 200, 2),
            400,
            "private memory above resident: all private"
        );
    }
}
