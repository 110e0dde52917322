//! Sizing and adaptive workers: `--workers auto` in real cgroups the test makes (a CPU quota, a cpuset, a
//! memory limit), and `--max-workers` adding workers while requests wait and retiring them when idle, through
//! a SIGHUP, under `--preload` and with `--max-requests` recycling.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::ferrule::{FerruleBuilder, apps_dir, temp_dir};
use crate::harness::json::env_bool;
use crate::harness::log::{field, worker_lines};
use crate::harness::procs::{poll_until, require_root};
use crate::harness::server::{Server, probe_app};
use crate::harness::stack::Stack;
use crate::harness::uwsgi::{self, encode_request, nginx_vars, parse_response};
use crate::harness::{EXIT_TIMEOUT, LOG_WAIT, WORKER_TIMEOUT};

use super::support::{Load, LoadResult, lifecycle_app};
use super::{LOAD_TIMEOUT, assert_no_failures};

/// A request that holds its app thread 200 ms: one worker of one thread serves five a second.
const SLOW: &str = "/sleep?s=0.2";
const CLIENTS: u32 = 8;
/// Bound for the master to add three workers one at a time, each after a second of waiting requests and an
/// import of the app (slow on a loaded 2-core box).
const SCALE_WAIT: Duration = Duration::from_secs(45);
const SCALED_UP: &str = "scaling up: requests waited";
const SCALED_DOWN: &str = "scaling down: threads idle";

fn rate(result: &LoadResult) -> f64 {
    result.ok as f64 / result.elapsed_s
}

/// A scrape of the `--metrics` socket at `path`; returns the OpenMetrics text.
fn scrape(path: &Path) -> String {
    let mut stream =
        std::os::unix::net::UnixStream::connect(path).unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
    stream.set_read_timeout(Some(LOG_WAIT)).expect("read timeout");
    let raw = uwsgi::send_raw(
        &mut stream,
        &encode_request(nginx_vars("GET", "/metrics", b"").as_slice(), b""),
    );
    let r = parse_response(&raw.bytes);
    assert_eq!(r.status, 200, "{r:?}");
    r.text()
}

/// The ids of the workers named by the `needle` lines of `log` (`worker=N`), in log order.
fn worker_ids(log: &str, needle: &str) -> Vec<u32> {
    log.lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| field(l, "worker")?.parse().ok())
        .collect()
}

/// One worker of one thread, a ceiling of four, eight clients each waiting 200 ms per request: the master adds
/// a worker at a time up to four, a SIGHUP in the middle keeps four, not one request fails, the throughput
/// follows, and once idle the newest workers are retired one period apart, back to one. Metrics count it all.
#[test]
fn adaptive_workers_follow_the_load_through_a_sighup_and_back() {
    // The throughput of one worker of one thread, for the report.
    let single = {
        let stack = Stack::start_ready(lifecycle_app(1).args(["--threads", "1"]), 1, "");
        let result = Load::start(stack.port(), SLOW, 24, CLIENTS).finish(LOAD_TIMEOUT);
        assert_no_failures(&result, 24, "one worker, no --max-workers");
        assert!(
            !stack.ferrule.log().contains("scaling"),
            "no scaling without --max-workers\n{}",
            stack.ferrule.log()
        );
        rate(&result)
    };

    let dir = temp_dir();
    let metrics = dir.path().join("metrics.sock");
    let builder = lifecycle_app(1)
        .args(["--threads", "1", "--max-workers", "4", "--scale-down-after", "2"])
        .arg("--metrics")
        .arg(format!("unix:{}", metrics.display()));
    let stack = Stack::start_ready(builder, 1, "");
    let offset = stack.ferrule.log_offset();
    let total = 300;
    let load = Load::start(stack.port(), SLOW, total, CLIENTS);
    stack.expect_count_since(offset, SCALED_UP, 3, SCALE_WAIT);
    stack.expect_count_since(offset, "worker ready", 3, WORKER_TIMEOUT);
    stack.wait_worker_count(4, WORKER_TIMEOUT);
    let log = stack.ferrule.log_since(offset);
    assert!(log.contains(&format!("{SCALED_UP} workers=4 ")), "{log}");

    let hup = stack.ferrule.log_offset();
    stack.signal(libc::SIGHUP);
    stack.expect_count_since(hup, "SIGHUP: reloading generation=1 workers=4", 1, LOG_WAIT);
    stack.expect_count_since(hup, "worker ready", 4, WORKER_TIMEOUT);
    let result = load.finish(LOAD_TIMEOUT);
    assert_no_failures(&result, total as u64, "scaling up under load, with a SIGHUP");
    // Right after the first run, before two idle seconds pass: the four workers serve it.
    let steady = Load::start(stack.port(), SLOW, 80, CLIENTS).finish(LOAD_TIMEOUT);
    assert_no_failures(&steady, 80, "four workers");
    let log = stack.ferrule.log_since(offset);
    assert_eq!(log.matches(SCALED_UP).count(), 3, "never above the ceiling\n{log}");
    assert!(!log.contains(SCALED_DOWN), "no worker retired under load\n{log}");
    assert_eq!(steady.pids().len(), 4, "four workers served: {}", steady.raw);
    println!(
        "throughput: one worker {single:.1} requests/s, scaled to four {:.1} requests/s ({:.1}×); \
         first run {} requests in {:.1} s",
        rate(&steady),
        rate(&steady) / single,
        result.ok,
        result.elapsed_s
    );

    let idle = stack.ferrule.log_offset();
    stack.expect_count_since(idle, SCALED_DOWN, 3, Duration::from_secs(30));
    stack.wait_worker_count(1, WORKER_TIMEOUT);
    let retired = worker_ids(&stack.ferrule.log_since(idle), SCALED_DOWN);
    let mut newest_first = retired.clone();
    newest_first.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(retired, newest_first, "the newest worker goes first");
    let new_generation: Vec<u32> = worker_lines(&stack.ferrule.log_since(hup), "worker started")
        .into_iter()
        .map(|w| w.id)
        .collect();
    let kept = new_generation.iter().copied().min().expect("a new generation");
    assert!(
        !retired.contains(&kept),
        "the oldest worker stays: {retired:?} of {new_generation:?}"
    );

    // A retired worker leaves /proc's live children when it exits, a moment before the master reaps it and
    // counts it gone: scrape until the master has caught up (bounded).
    let samples = [
        "ferrule_worker_scalings_total{direction=\"up\"} 3\n",
        "ferrule_worker_scalings_total{direction=\"down\"} 3\n",
        "ferrule_workers 1\n",
    ];
    let mut text = String::new();
    poll_until(LOG_WAIT, || {
        text = scrape(&metrics);
        samples.iter().all(|sample| text.contains(sample))
    });
    for sample in samples {
        assert!(text.contains(sample), "no {sample:?} in\n{text}");
    }
}

/// Under `--preload` the added workers are forks of the zygote (the app is imported once), `--max-requests`
/// recycles workers while scaled up without a failed request, and the count still returns to the floor.
#[test]
fn adaptive_workers_under_preload_fork_and_recycle() {
    let builder = lifecycle_app(1).args([
        "--preload",
        "--threads",
        "1",
        "--max-workers",
        "3",
        "--scale-down-after",
        "2",
        "--max-requests",
        "25",
    ]);
    let stack = Stack::start_ready(builder, 1, "");
    let offset = stack.ferrule.log_offset();
    let total = 240;
    let load = Load::start(stack.port(), "/sleep?s=0.1", total, CLIENTS);
    stack.expect_count_since(offset, SCALED_UP, 2, SCALE_WAIT);
    let result = load.finish(LOAD_TIMEOUT);
    assert_no_failures(&result, total as u64, "scaling up under --preload with --max-requests");
    let log = stack.ferrule.log_since(offset);
    assert!(
        log.matches("replacing worker").count() >= 3,
        "--max-requests 25 recycled workers while scaled up\n{log}"
    );
    assert_eq!(
        stack
            .ferrule
            .log()
            .matches("app preloaded; forking the workers from it")
            .count(),
        1,
        "one import: every worker, added or replacing, is a fork\n{}",
        stack.ferrule.log()
    );
    let idle = stack.ferrule.log_offset();
    stack.expect_count_since(idle, SCALED_DOWN, 2, Duration::from_secs(30));
    // The master's children under --preload: the zygote and the one worker left.
    stack.wait_worker_count(2, WORKER_TIMEOUT);
    assert_eq!(
        stack.ferrule.log_since(offset).matches(SCALED_UP).count(),
        2,
        "never above the ceiling\n{}",
        stack.ferrule.log()
    );
}

// ---------------------------------------------------------------------------------------------------------
// --workers auto in real cgroups (v1 controllers, as these machines mount them)
// ---------------------------------------------------------------------------------------------------------

/// A v1 cgroup the test makes under one controller's hierarchy, removed on drop once its processes are gone.
struct Cgroup {
    dir: PathBuf,
}

impl Cgroup {
    /// `/sys/fs/cgroup/CONTROLLER/ferrule-test-PID-NAME` with these files written, in order.
    fn make(controller: &str, name: &str, files: &[(&str, &str)]) -> Cgroup {
        require_root("making a cgroup");
        let hierarchy = Path::new("/sys/fs/cgroup").join(controller);
        assert!(
            hierarchy.join("cgroup.procs").exists(),
            "no cgroup v1 {controller} hierarchy at {}: these tests need the v1 controllers mounted",
            hierarchy.display()
        );
        let dir = hierarchy.join(format!("ferrule-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let cgroup = Cgroup { dir };
        for (file, value) in files {
            let path = cgroup.dir.join(file);
            std::fs::write(&path, value).unwrap_or_else(|e| panic!("write {value:?} to {}: {e}", path.display()));
        }
        cgroup
    }

    fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The processes were killed before: rmdir succeeds once the kernel has let them all go.
        poll_until(Duration::from_secs(10), || std::fs::remove_dir(&self.dir).is_ok());
    }
}

/// The lifecycle app with one thread per worker and `workers` (a number or `auto`).
fn app_with(workers: &str) -> FerruleBuilder {
    FerruleBuilder::new("lifecycle_app:application")
        .arg("--pythonpath")
        .arg(apps_dir())
        .args(["--workers", workers, "--threads", "1"])
}

/// `--check-config` in the cgroup: `workers = "auto"` with what it found.
fn check_config_in(cgroup: &Cgroup, args: &[&str]) -> String {
    let out = FerruleBuilder::new("lifecycle_app:application")
        .no_default_socket()
        .arg("--check-config")
        .arg("--pythonpath")
        .arg(apps_dir())
        .args(args)
        .in_cgroup(&cgroup.procs())
        .run(EXIT_TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    out.stdout
}

/// A CPU quota of one CPU (100 ms per 100 ms) gives one worker, and the start-up line says so; the
/// `--check-config` line shows `auto` and the number; a SIGHUP resolves it again.
#[test]
fn workers_auto_follows_a_cgroup_cpu_quota() {
    let cgroup = Cgroup::make(
        "cpu",
        "quota",
        &[("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", "100000")],
    );
    let stack = Stack::start_ready(app_with("auto").in_cgroup(&cgroup.procs()), 1, "");
    let log = stack.ferrule.log();
    assert!(log.contains("workers=auto → 1 (cpu quota 100000/100000)"), "{log}");
    assert!(!log.contains("may not fit"), "no memory limit here\n{log}");
    stack.wait_worker_count(1, WORKER_TIMEOUT);

    // Two CPUs' worth now: a reload finds it (the machine has at least two CPUs, or the affinity line says
    // fewer).
    std::fs::write(cgroup.dir.join("cpu.cfs_quota_us"), "200000").expect("raise the quota");
    let offset = stack.ferrule.log_offset();
    stack.signal(libc::SIGHUP);
    stack.expect_count_since(offset, "SIGHUP: reloading", 1, LOG_WAIT);
    let after = stack.ferrule.log_since(offset);
    assert!(
        after.contains("workers=auto → 2 (cpu quota 200000/100000)") || after.contains("workers=auto → 1 (affinity"),
        "{after}"
    );

    let shown = check_config_in(&cgroup, &["--workers", "auto", "--max-workers", "auto"]);
    assert!(
        shown.contains("workers = \"auto\" # → "),
        "--check-config shows auto and the number\n{shown}"
    );
    let table: toml::Table = shown.parse().unwrap_or_else(|e| panic!("not TOML ({e}):\n{shown}"));
    assert_eq!(table.get("workers").and_then(|v| v.as_str()), Some("auto"));
    assert_eq!(table.get("max_workers").and_then(|v| v.as_str()), Some("auto"));
    drop(stack);
}

/// A cpuset of one CPU gives one worker, from `FERRULE_WORKERS=auto`.
#[test]
fn workers_auto_follows_a_cgroup_cpuset() {
    let cgroup = Cgroup::make("cpuset", "one-cpu", &[("cpuset.mems", "0"), ("cpuset.cpus", "0")]);
    let stack = Stack::start_ready(
        FerruleBuilder::new("lifecycle_app:application")
            .arg("--pythonpath")
            .arg(apps_dir())
            .env("FERRULE_WORKERS", "auto")
            .in_cgroup(&cgroup.procs()),
        1,
        "",
    );
    let log = stack.ferrule.log();
    // The affinity mask follows the cpuset, and a cpuset is named first among equals.
    assert!(log.contains("workers=auto → 1 (cpuset 0)"), "{log}");
    stack.wait_worker_count(1, WORKER_TIMEOUT);
    drop(stack);
}

/// A memory limit the workers would not fit in: a warning at start-up, once the first worker is ready, with
/// the numbers; `--max-workers` counts, since that many may run.
#[test]
fn a_memory_limit_too_small_for_the_workers_is_warned_about() {
    let cgroup = Cgroup::make("memory", "small", &[("memory.limit_in_bytes", "268435456")]);
    let stack = Stack::start_ready(
        app_with("1").args(["--max-workers", "64"]).in_cgroup(&cgroup.procs()),
        1,
        "",
    );
    assert!(
        stack
            .ferrule
            .wait_for_log("the workers may not fit in the cgroup's memory limit", LOG_WAIT),
        "{}",
        stack.ferrule.log()
    );
    let log = stack.ferrule.log();
    let line = log.lines().find(|l| l.contains("may not fit")).expect("waited for");
    assert_eq!(field(line, "workers"), Some("64"), "{line}");
    assert_eq!(field(line, "limit_mib"), Some("256"), "{line}");
    drop(stack);
}

// ---------------------------------------------------------------------------------------------------------
// The options and the signals
// ---------------------------------------------------------------------------------------------------------

/// `--check-config` of the probe app with these options (and environment); returns its output.
fn check(args: &[&str], envs: &[(&str, &str)], config: Option<&str>) -> crate::harness::ferrule::Output {
    let dir = temp_dir();
    let mut builder = probe_app()
        .no_default_socket()
        .current_dir(dir.path())
        .arg("--check-config")
        .args(args)
        .envs(envs);
    if let Some(text) = config {
        let path = dir.path().join("ferrule.toml");
        std::fs::write(&path, text).expect("write the config file");
        builder = builder.arg("--config").arg(path);
    }
    builder.run(EXIT_TIMEOUT)
}

/// `auto` comes from the command line, `FERRULE_WORKERS` and the file alike; a ceiling below the floor and a
/// count that is neither a number nor `auto` are refused with one line that says what to do.
#[test]
fn worker_counts_are_numbers_or_auto_and_the_ceiling_is_not_below_the_floor() {
    let from_file = check(
        &[],
        &[],
        Some("workers = \"auto\"\nmax_workers = 8\nscale_down_after = 5\n"),
    );
    assert!(from_file.status.success(), "{}", from_file.describe());
    let table: toml::Table = from_file.stdout.parse().expect("TOML");
    assert_eq!(
        table.get("workers").and_then(|v| v.as_str()),
        Some("auto"),
        "{}",
        from_file.stdout
    );
    assert_eq!(table.get("max_workers").and_then(|v| v.as_integer()), Some(8));
    assert_eq!(table.get("scale_down_after").and_then(|v| v.as_integer()), Some(5));
    assert_eq!(table.get("scale_up_after").and_then(|v| v.as_integer()), Some(1));
    assert!(
        from_file.stdout.contains("workers = \"auto\" # → "),
        "{}",
        from_file.stdout
    );

    let from_env = check(&[], &[("FERRULE_WORKERS", "auto")], None);
    assert!(from_env.status.success(), "{}", from_env.describe());
    assert!(
        from_env.stdout.contains("workers = \"auto\" # → "),
        "{}",
        from_env.stdout
    );

    let below = check(&["--workers", "4", "--max-workers", "2"], &[], None);
    assert_eq!(below.status.code(), Some(2), "{}", below.describe());
    assert!(
        below.stderr.contains("--max-workers 2 is below --workers 4") && below.stderr.trim().lines().count() == 1,
        "{}",
        below.describe()
    );
    for bad in [["--workers", "many"], ["--max-workers", "0"]] {
        let out = check(&bad, &[], None);
        assert_eq!(out.status.code(), Some(2), "{}", out.describe());
        assert!(
            out.stderr.contains("give a number from 1 to 1024, or auto"),
            "{}",
            out.describe()
        );
    }
    let out = check(&[], &[], Some("max_workers = \"lots\"\n"));
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(
        out.stderr.contains("max_workers"),
        "the file's key is named\n{}",
        out.describe()
    );
}

/// With `--max-workers`, SIGTTIN and SIGTTOU move the floor within 1 and the ceiling, and every worker sees
/// `wsgi.multiprocess` true, since the ceiling allows more than one.
#[test]
fn signals_move_the_floor_within_the_ceiling_and_workers_know_they_may_be_several() {
    let server = Server::start(probe_app().args(["--workers", "1", "--max-workers", "2"]), 1);
    let env = server.env(&nginx_vars("GET", "/env", b""), b"");
    assert_eq!(env_bool(&env, "wsgi.multiprocess"), Some(true), "{env:?}");

    let offset = server.log_offset();
    server.signal(libc::SIGTTIN);
    assert_eq!(
        server.wait_for_count_since(offset, "worker ready", 1, WORKER_TIMEOUT),
        1,
        "{}",
        server.log()
    );
    assert!(
        server.log_since(offset).contains("SIGTTIN: one worker more workers=2"),
        "{}",
        server.log()
    );
    let offset = server.log_offset();
    server.signal(libc::SIGTTIN);
    assert!(
        server.wait_for_log_since(offset, "SIGTTIN: already at --max-workers", LOG_WAIT),
        "{}",
        server.log()
    );
    let offset = server.log_offset();
    server.signal(libc::SIGTTOU);
    assert_eq!(
        server.wait_for_count_since(offset, "worker exited", 1, WORKER_TIMEOUT),
        1,
        "{}",
        server.log()
    );
    assert!(
        server.log_since(offset).contains("SIGTTOU: one worker fewer workers=1"),
        "{}",
        server.log()
    );
    let offset = server.log_offset();
    server.signal(libc::SIGTTOU);
    assert!(
        server.wait_for_log_since(offset, "SIGTTOU: already at one worker", LOG_WAIT),
        "{}",
        server.log()
    );
    assert!(
        poll_until(WORKER_TIMEOUT, || server.children().len() == 1),
        "{}",
        server.log()
    );
}
