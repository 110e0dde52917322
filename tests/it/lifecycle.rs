//! Tier-3 tests of ferrule's process lifecycle: a master supervising `--workers N` worker processes behind a
//! real nginx. Worker count, crash replacement, rolling reload under load, graceful and idle stop, request
//! timeouts, recycling by request count and memory, app import failures, SIGTTIN/SIGTTOU, and sockets
//! inherited from systemd or `--socket fd://N`.
//!
//! Every test runs its own ferrule on a Unix socket in a temp dir and its own nginx on a free loopback port;
//! load comes from tests/apps/load.py run as a second process. Run with `cargo test --release --test it lifecycle::`.

mod failover;
mod master_exit;
mod scaling;
mod on_change;
mod rolling_restart;
mod stop_queue;
mod support;

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::harness::ferrule::{Addr, FerruleBuilder, Inherit, apps_dir, temp_dir};
use crate::harness::json::{Json, env_bool, parse_json};
use crate::harness::log::{count, field, worker_lines};
use crate::harness::nginx::Nginx;
use crate::harness::procs::{alive, live_children, poll_until, rss_kib};
use crate::harness::server::{Server, probe_app};
use crate::harness::stack::Stack;
use crate::harness::uwsgi::{nginx_vars, parse_response};
use crate::harness::{LOG_WAIT, WORKER_TIMEOUT, http};
use support::{Load, lifecycle_app, write_version_module};

/// Bound for a load.py run: thousands of requests through nginx on a 2-core box take a few seconds.
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);

fn socket_path(stack: &Stack) -> std::path::PathBuf {
    match &stack.ferrule.addr {
        Addr::Unix(p) => p.clone(),
        other => panic!("expected a Unix socket, got {other:?}"),
    }
}

/// Every load.py request answered 200: prints the whole report otherwise.
fn assert_no_failures(result: &support::LoadResult, total: u64, what: &str) {
    assert!(
        result.failed == 0 && result.ok == total,
        "{what}: {} of {total} requests failed (statuses {:?}, first errors {:?})\nreport: {}",
        result.failed,
        result.statuses,
        result.errors,
        result.raw
    );
}

/// The workers whose `worker started` lines say they belong to `generation`.
fn generation_ids(log: &str, generation: u32) -> Vec<u32> {
    worker_lines(log, "worker started")
        .into_iter()
        .filter(|w| w.generation == Some(generation))
        .map(|w| w.id)
        .collect()
}

/// Waits for the master's `worker ready` line of each worker id in `ids` (all after `offset`); returns their pids.
fn wait_ready_ids(stack: &Stack, offset: usize, ids: &[u32]) -> BTreeSet<u32> {
    let mut pids = BTreeSet::new();
    for id in ids {
        let needle = format!("worker ready worker={id} ");
        stack.expect_count_since(offset, &needle, 1, WORKER_TIMEOUT);
        let log = stack.ferrule.log_since(offset);
        let pid = worker_lines(&log, "worker ready")
            .into_iter()
            .find(|w| w.id == *id)
            .map(|w| w.pid)
            .expect("the line just waited for");
        pids.insert(pid);
    }
    pids
}

/// `--workers 3` gives three worker processes, children of the master, each of which serves requests, and the
/// app sees `wsgi.multiprocess` True.
#[test]
fn three_workers_are_three_serving_processes() {
    let stack = Stack::start_ready(lifecycle_app(3), 3, "");
    let log = stack.ferrule.log();
    let ready: BTreeSet<u32> = worker_lines(&log, "worker ready").iter().map(|w| w.pid).collect();
    assert_eq!(ready.len(), 3, "three `worker ready` lines with distinct pids\n{log}");
    let children = stack.wait_worker_count(3, Duration::from_secs(5));
    assert_eq!(children, ready, "the ready workers are the master's children");
    assert!(!children.contains(&stack.master_pid()));

    // Concurrent slow-ish requests keep each worker busy long enough for the others to win some accepts.
    let total = 300;
    let result = Load::start(stack.port(), "/sleep?s=0.01", total, 12).finish(LOAD_TIMEOUT);
    assert_no_failures(&result, total as u64, "GET /sleep with 3 workers");
    let served = result.pids();
    assert!(
        served.is_subset(&children),
        "served by {served:?}, workers are {children:?}"
    );
    assert_eq!(
        served, children,
        "every worker served some of {total} requests: {}",
        result.raw
    );

    let flags = stack.get("/flags");
    assert_eq!(flags.status, 200, "{}", flags.summary());
    let flags = parse_json(&flags.text()).expect("/flags answers JSON");
    assert_eq!(
        flags.get("multiprocess").and_then(Json::as_bool),
        Some(true),
        "{flags:?}"
    );
    // --threads defaults to 4.
    assert_eq!(
        flags.get("multithread").and_then(Json::as_bool),
        Some(true),
        "{flags:?}"
    );
}

/// A worker killed with SIGKILL is noticed and replaced, and the service carries on without a failed request.
#[test]
fn sigkilled_worker_is_replaced_and_service_continues() {
    let stack = Stack::start_ready(lifecycle_app(2), 2, "");
    let before = stack.wait_worker_count(2, Duration::from_secs(5));
    let victim = *before.iter().next().expect("two workers");
    let survivor = *before.iter().nth(1).expect("two workers");

    let offset = stack.ferrule.log_offset();
    // SAFETY: kill(2) on a worker pid read from /proc a moment ago; it is the master's child and only the master
    // reaps it, which it has not done yet since the worker is alive.
    assert_eq!(unsafe { libc::kill(victim as libc::pid_t, libc::SIGKILL) }, 0);

    stack.expect_count_since(offset, "worker died; replacing it", 1, WORKER_TIMEOUT);
    stack.expect_count_since(offset, "worker started", 1, WORKER_TIMEOUT);
    let log = stack.ferrule.log_since(offset);
    let died = log
        .lines()
        .find(|l| l.contains("worker died; replacing it"))
        .expect("waited for");
    assert_eq!(field(died, "pid"), Some(victim.to_string().as_str()), "{died}");
    assert!(died.contains("status=killed by SIGKILL"), "{died}");
    let new_id = worker_lines(&log, "worker started")[0].id;
    let new_pids = wait_ready_ids(&stack, offset, &[new_id]);
    let new_pid = *new_pids.iter().next().expect("one");

    let after = stack.wait_worker_count(2, Duration::from_secs(5));
    assert_eq!(
        after,
        BTreeSet::from([survivor, new_pid]),
        "the survivor and the replacement"
    );

    let total = 300;
    let result = Load::start(stack.port(), "/pid", total, 8).finish(LOAD_TIMEOUT);
    assert_no_failures(&result, total as u64, "GET /pid after the crash");
    assert!(result.pids().is_subset(&after), "{} vs workers {after:?}", result.raw);
    assert!(!result.pids().contains(&victim));
    assert!(
        result.pids().contains(&new_pid) || stack.wait_served_by(new_pid, Duration::from_secs(10)),
        "the replacement {new_pid} never answered: {}",
        result.raw
    );
}

/// Three SIGHUPs while load.py keeps 8 requests in flight: no request fails, and the workers afterwards are all
/// new processes. Each HUP waits until the previous generation is ready and has served part of the load.
#[test]
fn rolling_reload_under_load_loses_no_request() {
    let stack = Stack::start_ready(lifecycle_app(2), 2, "");
    let before = stack.wait_worker_count(2, Duration::from_secs(5));
    let start = stack.ferrule.log_offset();

    // /sleep?s=0 logs a marker with the worker's pid for every request, so the test can see the load reach each
    // generation before it sends the next SIGHUP.
    let total = 6000;
    let path = "/sleep?s=0&tag=load";
    let served_by = |pid: u32| format!("sleep-start tag=load pid={pid}");
    let mut load = Load::start(stack.port(), path, total, 8);
    for pid in &before {
        stack.expect_count_since(start, &served_by(*pid), 1, WORKER_TIMEOUT);
    }

    let mut generations = Vec::new();
    for generation in 1..=3 {
        assert!(
            load.is_running(),
            "load.py finished before SIGHUP #{generation}: raise its request count so every reload happens under \
             load"
        );
        let offset = stack.ferrule.log_offset();
        stack.signal(libc::SIGHUP);
        stack.expect_count_since(offset, "worker started", 2, WORKER_TIMEOUT);
        let ids = generation_ids(&stack.ferrule.log_since(offset), generation);
        assert_eq!(
            ids.len(),
            2,
            "two workers of generation {generation}\n{}",
            stack.ferrule.log_since(offset)
        );
        let pids = wait_ready_ids(&stack, offset, &ids);
        for pid in &pids {
            stack.expect_count_since(offset, &served_by(*pid), 1, WORKER_TIMEOUT);
        }
        generations.push(pids);
    }
    assert!(
        load.is_running(),
        "load.py finished during the last reload: raise its request count"
    );
    let result = load.finish(LOAD_TIMEOUT);
    assert_no_failures(&result, total as u64, "GET /sleep?s=0 across three reloads");

    // Every old worker (2 per reload) got SIGTERM once a new one was ready and finished what it was serving.
    stack.expect_count_since(start, "worker exited", 6, WORKER_TIMEOUT);
    let log = stack.ferrule.log_since(start);
    for line in log.lines().filter(|l| l.contains("worker exited")) {
        assert!(
            line.contains("status=exit code 0"),
            "an old worker did not stop cleanly: {line}"
        );
    }
    let after = stack.wait_worker_count(2, Duration::from_secs(10));
    assert_eq!(
        &after,
        generations.last().expect("three generations"),
        "the last generation is what runs"
    );
    assert!(before.is_disjoint(&after), "before {before:?}, after {after:?}");
    let served = result.pids();
    for g in std::iter::once(&before).chain(&generations) {
        assert!(
            g.is_subset(&served),
            "generation {g:?} served part of the load: {}",
            result.raw
        );
    }
}

/// SIGHUP imports the app afresh: a module read at import time is changed on disk, and after the reload every
/// answer shows the new value.
#[test]
fn reload_reimports_the_app() {
    let builder = lifecycle_app(2);
    let code_dir = builder.tempdir().join("code");
    std::fs::create_dir(&code_dir).expect("create code dir");
    write_version_module(&code_dir, "one");
    let builder = builder.arg("--pythonpath").arg(&code_dir);
    let stack = Stack::start_ready(builder, 2, "");

    let r = stack.get("/version");
    assert_eq!(r.status, 200, "{}", r.summary());
    assert!(r.text().starts_with("one "), "{}", r.summary());

    write_version_module(&code_dir, "two");
    let offset = stack.ferrule.log_offset();
    stack.signal(libc::SIGHUP);
    stack.expect_count_since(offset, "worker ready", 2, WORKER_TIMEOUT);
    stack.expect_count_since(offset, "worker exited", 2, WORKER_TIMEOUT);
    for _ in 0..20 {
        let r = stack.get("/version");
        assert_eq!(r.status, 200, "{}", r.summary());
        assert!(
            r.text().starts_with("two "),
            "still the old code after the reload: {}",
            r.summary()
        );
    }
}

/// SIGTERM while a 2 s request is running: the request still gets its 200 through nginx, then the master exits
/// 0 and removes its socket file.
#[test]
fn sigterm_lets_the_in_flight_request_finish() {
    let mut stack = Stack::start_ready(lifecycle_app(2), 2, "");
    let socket = socket_path(&stack);
    let port = stack.port();
    let slow = thread::spawn(move || http::get(port, "/sleep?s=2&tag=term"));
    assert!(
        stack
            .ferrule
            .wait_for_log("lifecycle-marker sleep-start tag=term", Duration::from_secs(10)),
        "the slow request never reached the app\n{}",
        stack.ferrule.log()
    );

    let sent = Instant::now();
    stack.signal(libc::SIGTERM);
    let r = slow.join().expect("request thread");
    assert_eq!(r.status, 200, "the in-flight request was cut off: {}", r.summary());
    assert!(r.is_complete(), "{}", r.summary());

    let status = stack.ferrule.wait_exit(Duration::from_secs(10));
    let elapsed = sent.elapsed();
    let status = status.unwrap_or_else(|| panic!("master still running 10 s after SIGTERM\n{}", stack.ferrule.log()));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status:?}\n{}",
        stack.ferrule.log()
    );
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    assert!(!socket.exists(), "socket file {} left behind", socket.display());
    let log = stack.ferrule.log();
    assert_eq!(
        count(&log, "status=exit code 0"),
        2,
        "both workers stopped cleanly\n{log}"
    );
}

/// An idle server stops at once on SIGTERM.
#[test]
fn idle_server_exits_promptly_on_sigterm() {
    let builder = lifecycle_app(2);
    let socket = builder.tempdir().join("ferrule.sock");
    let mut ferrule = builder.spawn();
    ferrule.wait_master_ready(2);
    let workers = live_children(ferrule.pid());
    assert_eq!(workers.len(), 2, "{workers:?}");

    let sent = Instant::now();
    ferrule.signal(libc::SIGTERM);
    let status = ferrule.wait_exit(Duration::from_secs(5));
    let elapsed = sent.elapsed();
    let status = status.unwrap_or_else(|| panic!("idle master still running 5 s after SIGTERM\n{}", ferrule.log()));
    assert_eq!(status.code(), Some(0), "{status:?}\n{}", ferrule.log());
    assert!(
        elapsed < Duration::from_millis(1500),
        "an idle stop took {elapsed:?}\n{}",
        ferrule.log()
    );
    assert!(!socket.exists(), "socket file left behind");
    for pid in workers {
        assert!(!alive(pid), "worker {pid} outlived the master");
    }
}

/// `--timeout 2`: a stuck request gets 504 after about 2 s, its Python stack is logged, and its worker is
/// replaced; a neighbour request running on the same worker when the timeout fires still completes.
#[test]
fn stuck_request_times_out_and_its_worker_is_replaced() {
    let builder = lifecycle_app(1).arg("--threads").arg("4").arg("--timeout").arg("2");
    let stack = Stack::start_ready(builder, 1, "");
    let worker = *stack
        .wait_worker_count(1, Duration::from_secs(5))
        .iter()
        .next()
        .expect("one");

    // One worker with 4 threads: multithreaded but not multiprocess.
    let flags = parse_json(&stack.get("/flags").text()).expect("/flags answers JSON");
    assert_eq!(
        flags.get("multiprocess").and_then(Json::as_bool),
        Some(false),
        "{flags:?}"
    );
    assert_eq!(
        flags.get("multithread").and_then(Json::as_bool),
        Some(true),
        "{flags:?}"
    );

    let port = stack.port();
    let stuck = thread::spawn(move || {
        let t = Instant::now();
        let r = http::get(port, "/stuck");
        (r, t.elapsed())
    });
    assert!(
        stack
            .ferrule
            .wait_for_log("lifecycle-marker stuck-start", Duration::from_secs(10)),
        "the stuck request never reached the app\n{}",
        stack.ferrule.log()
    );
    // The neighbour starts when the stuck request has run 1 s and sleeps 1.5 s: it is in flight when the 2 s limit
    // of the stuck request fires (and the worker starts to retire), and well within its own limit.
    assert!(
        stack
            .ferrule
            .wait_for_log("lifecycle-marker stuck-1s", Duration::from_secs(10)),
        "no stuck-1s marker\n{}",
        stack.ferrule.log()
    );
    let neighbour = thread::spawn(move || http::get(port, "/sleep?s=1.5&tag=neighbour"));

    let (r, took) = stuck.join().expect("stuck request thread");
    assert_eq!(r.status, 504, "{}", r.summary());
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(4500),
        "504 after {took:?}, expected 2 s plus a margin"
    );
    let n = neighbour.join().expect("neighbour thread");
    assert_eq!(n.status, 200, "the neighbour request was cut off: {}", n.summary());
    assert_eq!(
        n.text().trim(),
        worker.to_string(),
        "the neighbour ran on the same worker"
    );

    // The answer can reach the client before the log reader has the app's last line.
    stack
        .ferrule
        .wait_for_log("lifecycle-marker sleep-end tag=neighbour", LOG_WAIT);
    let log = stack.ferrule.log();
    let timed_out = log
        .find("request timed out")
        .unwrap_or_else(|| panic!("no `request timed out`\n{log}"));
    let neighbour_started = log.find("sleep-start tag=neighbour").expect("it answered");
    let neighbour_ended = log.find("sleep-end tag=neighbour").expect("it answered");
    assert!(
        neighbour_started < timed_out && timed_out < neighbour_ended,
        "the neighbour must be in flight when the timeout fires\n{log}"
    );
    let timed_out_line = log[timed_out..].lines().next().unwrap_or("");
    let line_start = log[..timed_out].rfind('\n').map_or(0, |i| i + 1);
    let whole_line = &log[line_start..timed_out + timed_out_line.len()];
    assert!(whole_line.contains("ERROR"), "not an ERROR line: {whole_line}");
    assert!(
        whole_line.contains("path=/stuck"),
        "the wrong request timed out: {whole_line}"
    );
    assert_eq!(
        count(&log, "request timed out"),
        1,
        "only the stuck request times out\n{log}"
    );
    let stack_at = log
        .find("stuck request's Python stack")
        .unwrap_or_else(|| panic!("no `stuck request's Python stack`\n{log}"));
    let dump = &log[stack_at..(stack_at + 4000).min(log.len())];
    assert!(dump.contains("stack="), "{dump}");
    assert!(
        dump.contains("File \"") && dump.contains(", line "),
        "no traceback-style frames:\n{dump}"
    );
    assert!(
        dump.contains("in lifecycle_stuck_in_here"),
        "the stuck function is not in the stack:\n{dump}"
    );

    stack.expect_count_since(
        0,
        &format!("replacing worker worker=1 pid={worker} reason=\"timeout\""),
        1,
        WORKER_TIMEOUT,
    );
    let new_id = worker_lines(&stack.ferrule.log(), "worker started")
        .iter()
        .map(|w| w.id)
        .find(|&id| id != 1)
        .unwrap_or_else(|| panic!("no replacement started\n{}", stack.ferrule.log()));
    let new_pid = *wait_ready_ids(&stack, 0, &[new_id]).iter().next().expect("one");
    assert_ne!(new_pid, worker);
    // The timed-out worker stops accepting, finishes its neighbour, and leaves.
    stack.expect_count_since(0, &format!("exited worker=1 pid={worker} "), 1, WORKER_TIMEOUT);
    assert_eq!(stack.served_pid(), new_pid, "the replacement serves");
    stack.wait_worker_count(1, Duration::from_secs(5));
}

/// `--max-requests 50 --max-requests-jitter 10` under 1000 requests: workers are recycled while the load runs
/// and not one request fails.
#[test]
fn max_requests_recycles_workers_without_failures() {
    let builder = lifecycle_app(2)
        .arg("--max-requests")
        .arg("50")
        .arg("--max-requests-jitter")
        .arg("10");
    let stack = Stack::start_ready(builder, 2, "");
    // 10 ms per request over 2 workers × 4 threads: the load lasts at least 1.25 s, longer than a replacement
    // takes to start on a busy machine, so replacements serve part of it. (A retiring worker keeps serving until
    // its replacement is ready, so with instant requests the whole load could go to the first two workers.)
    let total = 1000;
    let result = Load::start(stack.port(), "/sleep?s=0.01", total, 8).finish(LOAD_TIMEOUT);
    assert_no_failures(&result, total as u64, "GET /sleep with --max-requests 50");

    let log = stack.ferrule.log();
    let recycled = count(&log, "reason=\"max-requests\"");
    assert!(
        recycled >= 2,
        "only {recycled} `reason=\"max-requests\"` lines for {total} requests\n{log}"
    );
    let served = result.pids();
    let ready: BTreeSet<u32> = worker_lines(&log, "worker ready").iter().map(|w| w.pid).collect();
    assert!(served.is_subset(&ready), "{} vs ready workers {ready:?}", result.raw);
    assert!(
        served.len() >= 3,
        "only {} distinct workers served: {}",
        served.len(),
        result.raw
    );
    // Every retired worker leaves once its replacement is ready; two workers remain.
    let retired = count(&log, "replacing worker");
    stack.expect_count_since(0, "worker exited", retired, WORKER_TIMEOUT);
    let log = stack.ferrule.log();
    for line in log.lines().filter(|l| l.contains("worker exited")) {
        assert!(
            line.contains("status=exit code 0"),
            "a recycled worker did not stop cleanly: {line}"
        );
    }
    stack.wait_worker_count(2, Duration::from_secs(10));
}

/// `--reload-on-rss`: a worker whose memory passes the limit after a request is replaced, without a failed
/// request, and the replacement serves.
#[test]
fn reload_on_rss_replaces_a_grown_worker() {
    const LIMIT_MIB: u64 = 96;
    let builder = lifecycle_app(2).arg("--reload-on-rss").arg(LIMIT_MIB.to_string());
    let stack = Stack::start_ready(builder, 2, "");
    let before = stack.wait_worker_count(2, Duration::from_secs(5));
    for pid in &before {
        let rss = rss_kib(*pid).expect("worker RSS") / 1024;
        assert!(
            rss + 40 < LIMIT_MIB,
            "an idle worker already uses {rss} MiB; raise LIMIT_MIB"
        );
    }

    // Each /grow keeps 8 MiB more: a worker passes 96 MiB within about ten requests. (A retiring worker keeps
    // serving, and growing, until its replacement is ready: the total bounds what the test can allocate.)
    let total = 40;
    let result = Load::start(stack.port(), "/grow?mb=8", total, 2).finish(LOAD_TIMEOUT);
    assert_no_failures(&result, total as u64, "GET /grow with --reload-on-rss");
    stack.expect_count_since(0, "reason=\"memory\"", 1, WORKER_TIMEOUT);

    let log = stack.ferrule.log();
    let replaced_at = log.find("replacing worker").expect("waited for");
    let new_id = worker_lines(&log[replaced_at..], "worker started")
        .first()
        .map(|w| w.id)
        .unwrap_or_else(|| panic!("no replacement started\n{log}"));
    let new_pid = *wait_ready_ids(&stack, replaced_at, &[new_id])
        .iter()
        .next()
        .expect("one");
    assert!(!before.contains(&new_pid));
    assert!(
        result.pids().contains(&new_pid) || stack.wait_served_by(new_pid, Duration::from_secs(10)),
        "the replacement {new_pid} never answered: {}",
        result.raw
    );
    let retired = count(&stack.ferrule.log(), "replacing worker");
    stack.expect_count_since(0, "worker exited", retired, WORKER_TIMEOUT);
    stack.wait_worker_count(2, Duration::from_secs(10));
}

/// An app whose import raises: the workers exit with the app-load code and the master stops non-zero within
/// seconds, with the Python traceback and the exception message in the log.
#[test]
fn broken_app_stops_the_master_with_the_traceback() {
    let dir = temp_dir();
    let socket = dir.path().join("broken.sock");
    let started = Instant::now();
    let (status, log) = FerruleBuilder::new("broken_app:application")
        .unix_at(&socket)
        .arg("--pythonpath")
        .arg(apps_dir())
        .arg("--workers")
        .arg("2")
        .spawn_expect_exit(Duration::from_secs(10));
    let took = started.elapsed();
    assert!(
        status.code().is_some_and(|c| c != 0),
        "exit {status:?} (signal {:?})\n{log}",
        status.signal()
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(log.contains("Traceback (most recent call last)"), "{log}");
    assert!(log.contains("in _fail_while_importing"), "{log}");
    assert!(
        log.contains("RuntimeError: lifecycle broken app: this import fails on purpose"),
        "{log}"
    );
    assert!(log.contains("the app could not be loaded"), "{log}");
    assert!(!socket.exists(), "socket file left behind");
    for w in worker_lines(&log, "worker started") {
        assert!(!alive(w.pid), "worker {} outlived the master", w.pid);
    }
}

/// Same for an app module that does not exist: the exception line names the module.
#[test]
fn missing_app_module_stops_the_master() {
    let started = Instant::now();
    let (status, log) = FerruleBuilder::new("no_such_module_for_lifecycle_tests:application")
        .arg("--pythonpath")
        .arg(apps_dir())
        .arg("--workers")
        .arg("2")
        .spawn_expect_exit(Duration::from_secs(10));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(status.code().is_some_and(|c| c != 0), "exit {status:?}\n{log}");
    assert!(
        log.contains("ModuleNotFoundError: No module named 'no_such_module_for_lifecycle_tests'"),
        "{log}"
    );
    assert!(log.contains("the app could not be loaded"), "{log}");
}

/// SIGTTIN adds a worker, SIGTTOU removes one; /proc and the served pids agree.
#[test]
fn sigttin_and_sigttou_change_the_worker_count() {
    let stack = Stack::start_ready(lifecycle_app(1), 1, "");
    stack.wait_worker_count(1, Duration::from_secs(5));

    for (n, want) in [(1, 2), (2, 3)] {
        let offset = stack.ferrule.log_offset();
        stack.signal(libc::SIGTTIN);
        stack.expect_count_since(offset, "SIGTTIN: one worker more", 1, WORKER_TIMEOUT);
        stack.expect_count_since(offset, "worker ready", 1, WORKER_TIMEOUT);
        let pids = stack.wait_worker_count(want, Duration::from_secs(10));
        assert_eq!(pids.len(), n + 1);
    }
    let three = stack.worker_pids();
    let total = 300;
    let result = Load::start(stack.port(), "/sleep?s=0.01", total, 12).finish(LOAD_TIMEOUT);
    assert_no_failures(&result, total as u64, "GET /sleep with 3 workers");
    assert!(result.pids().is_subset(&three), "{} vs {three:?}", result.raw);

    for want in [2, 1] {
        let offset = stack.ferrule.log_offset();
        stack.signal(libc::SIGTTOU);
        stack.expect_count_since(offset, "SIGTTOU: one worker fewer", 1, WORKER_TIMEOUT);
        stack.expect_count_since(offset, "worker exited", 1, WORKER_TIMEOUT);
        stack.wait_worker_count(want, Duration::from_secs(10));
    }
    let last = *stack.worker_pids().iter().next().expect("one worker");
    assert_eq!(stack.served_pid(), last);
}

/// A listening Unix socket bound by the test and handed over as ferrule would get it from a supervisor.
fn test_listener(name: &str) -> (tempfile::TempDir, std::path::PathBuf, UnixListener) {
    let dir = temp_dir();
    let path = dir.path().join(name);
    let listener = UnixListener::bind(&path).expect("bind test listener");
    (dir, path, listener)
}

/// Serves through an inherited socket: the master logs it, 2 workers serve it through nginx, SIGTERM exits 0 and
/// leaves the socket file, which belongs to whoever made it, in place.
fn serve_inherited(how: Inherit, name: &str) {
    let (_dir, path, listener) = test_listener(name);
    let mut ferrule = lifecycle_app(2).inherit_socket(listener.as_raw_fd(), how).spawn();
    assert!(
        ferrule.wait_for_log("ready workers=2 ", Duration::from_secs(30)),
        "not ready\n{}",
        ferrule.log()
    );
    let log = ferrule.log();
    assert!(
        log.contains(&format!("listening address=unix:{}", path.display())),
        "the inherited socket is not the one listening\n{log}"
    );
    assert_eq!(count(&log, "listening address="), 1, "only the inherited socket\n{log}");

    let nginx = Nginx::start(&format!("unix:{}", path.display()), "");
    let workers = live_children(ferrule.pid());
    let total = 200;
    let result = Load::start(nginx.port(), "/pid", total, 8).finish(LOAD_TIMEOUT);
    assert_no_failures(&result, total as u64, "GET /pid through the inherited socket");
    assert!(
        !result.pids().is_empty() && result.pids().is_subset(&workers),
        "{} vs {workers:?}",
        result.raw
    );

    ferrule.signal(libc::SIGTERM);
    let status = ferrule.wait_exit(Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{status:?}\n{}", ferrule.log());
    assert!(path.exists(), "ferrule removed a socket file it did not create");
}

/// systemd socket activation: the socket at fd 3, `LISTEN_FDS=1`, `LISTEN_PID` = ferrule's pid, no `--socket`.
#[test]
fn systemd_socket_activation() {
    serve_inherited(Inherit::Systemd, "systemd.sock");
}

/// `--socket fd://9`: a listening socket inherited at descriptor 9.
#[test]
fn socket_from_inherited_fd() {
    serve_inherited(Inherit::FdArg(9), "fd.sock");
}

/// Whoever read ferrule's output is gone and the master is killed: the workers still stop and exit. Every log
/// line then fails to be written (EPIPE); tracing-subscriber used to report that with `eprintln!`, whose own
/// failure panicked, and a worker that panicked on its way out hung in Python's shutdown for ever.
#[test]
fn workers_exit_when_the_master_dies_after_their_log_reader() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    // Like many apps (a scheduler, a metrics pusher), it keeps a non-daemon thread: Python's own shutdown waits
    // for it, so only an exit that skips that shutdown ends the process.
    let dir = temp_dir();
    std::fs::write(
        dir.path().join("threaded_app.py"),
        "import threading\n\
         threading.Thread(target=threading.Event().wait, name='background', daemon=False).start()\n\
         def application(environ, start_response):\n    \
             start_response('200 OK', [('Content-Type', 'text/plain')])\n    \
             return [b'ok']\n",
    )
    .expect("write the app");
    let mut child = Command::new(crate::harness::venv::installed_ferrule())
        .args(["--pythonpath", &dir.path().display().to_string(), "--workers", "2"])
        .args(["--socket", "127.0.0.1:0", "threaded_app:application"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferrule");
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut log = String::new();
    while Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        log.push_str(&line);
        log.push('\n');
        if line.contains("ready") && line.contains("workers=2") {
            break;
        }
    }
    let master = child.id();
    let workers = live_children(master);
    assert_eq!(workers.len(), 2, "two workers\n{log}");
    // The reader goes first, then the master.
    drop(lines);
    child.kill().expect("SIGKILL the master");
    child.wait().expect("reap the master");
    let gone = crate::harness::procs::poll_until(Duration::from_secs(15), || workers.iter().all(|&w| !alive(w)));
    let stuck: Vec<_> = workers.iter().filter(|&&w| alive(w)).collect();
    for &&w in &stuck {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(w as i32), nix::sys::signal::Signal::SIGKILL);
    }
    assert!(
        gone,
        "workers {stuck:?} did not exit after the master and their log reader went away"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Request timeouts, again and again
// ---------------------------------------------------------------------------------------------------------

/// `--timeout 1` five times in a row on one worker: every stuck request gets its 504 within the limit plus 1 s
/// and every one has its Python stack logged (gunicorn logs the stuck worker's traceback on each timeout); each
/// timeout retires the worker, and the master's replacement must behave as well as the first.
#[test]
fn every_timeout_answers_504_in_time_and_logs_the_stuck_stack() {
    const ROUNDS: usize = 5;
    let server = Server::spawn(probe_app().arg("--timeout").arg("1"));
    server.wait_master_ready(1);
    for round in 1..=ROUNDS {
        let offset = server.log_offset();
        let started = Instant::now();
        let raw = server.send(&nginx_vars("GET", "/stuck", b""), b"");
        let took = started.elapsed();
        assert!(
            !raw.bytes.is_empty(),
            "round {round}: no answer after {took:?} (reset: {})\n--- log ---\n{}",
            raw.reset,
            server.log_since(offset)
        );
        let r = parse_response(&raw.bytes);
        assert_eq!(r.status, 504, "round {round}: {r:?}");
        assert!(
            took < Duration::from_secs(2),
            "round {round}: the 504 came after {took:?}, want within --timeout 1 s + 1 s"
        );
        assert!(
            server.wait_for_log_since(offset, "in stuck_view_marker", LOG_WAIT),
            "round {round}: no logged stack with stuck_view_marker\n--- log since the request ---\n{}",
            server.log_since(offset)
        );
        let log = server.log_since(offset);
        let dump = log
            .find("Python stack")
            .unwrap_or_else(|| panic!("round {round}: no `Python stack` line\n--- log since the request ---\n{log}"));
        assert!(
            log[dump..].contains("in stuck_view_marker"),
            "round {round}: the stack does not follow the `Python stack` line\n{log}"
        );
        // The replacement must be up before the next round, or the next request waits for it.
        let ready = server.wait_for_count_since(offset, "worker ready", 1, WORKER_TIMEOUT);
        assert_eq!(
            ready,
            1,
            "round {round}: no replacement worker became ready\n{}",
            server.log_since(offset)
        );
    }
    let log = server.log();
    assert_eq!(count(&log, "Python stack"), ROUNDS, "one stack dump per timeout\n{log}");
    assert_eq!(
        count(&log, "in stuck_view_marker"),
        ROUNDS,
        "one stuck frame per timeout\n{log}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Reloading a config file
// ---------------------------------------------------------------------------------------------------------

/// A config file with a socket in a temp dir, and the server started from it.
struct FromFile {
    server: Server,
    file: PathBuf,
    socket: PathBuf,
}

impl FromFile {
    fn start(workers: usize) -> FromFile {
        let builder = probe_app().no_default_socket();
        let file = builder.tempdir().join("ferrule.toml");
        let socket = builder.tempdir().join("app.sock");
        std::fs::write(&file, Self::text(&socket, workers, "")).expect("write config");
        let server = Server::spawn(builder.arg("--config").arg(&file));
        server.wait_master_ready(workers);
        FromFile { server, file, socket }
    }

    fn text(socket: &Path, workers: usize, extra: &str) -> String {
        format!(
            "workers = {workers}\nsocket = [\"unix:{}\"]\n{extra}\n",
            socket.display()
        )
    }

    fn rewrite(&self, text: &str) {
        std::fs::write(&self.file, text).expect("rewrite config");
    }
}

/// SIGHUP re-reads the config file before touching a worker: an invalid value is refused with an error naming
/// the file and key, and the running workers (same pids) keep serving, instead of new workers failing to start
/// in a loop. A valid change is then applied with fresh workers (uWSGI and gunicorn re-read theirs on HUP).
#[test]
fn sighup_with_an_invalid_config_file_keeps_the_old_workers() {
    let ff = FromFile::start(2);
    let server = &ff.server;
    let old = server.children();
    assert_eq!(old.len(), 2, "{old:?}");

    ff.rewrite(&FromFile::text(&ff.socket, 2, "threads = \"lots\""));
    let offset = server.log_offset();
    server.signal(libc::SIGHUP);
    assert!(
        server.wait_for_log_since(offset, "reload refused", LOG_WAIT),
        "no `reload refused` after SIGHUP with an invalid file\n--- log since SIGHUP ---\n{}",
        server.log_since(offset)
    );
    let log = server.log_since(offset);
    let refused = log.lines().find(|l| l.contains("reload refused")).expect("waited for");
    assert!(
        refused.contains("threads") || log.contains("`threads`"),
        "the error does not name the key\n{log}"
    );
    assert!(
        log.contains(&ff.file.display().to_string()),
        "the error does not name the file\n{log}"
    );
    for _ in 0..20 {
        let pid = server.served_pid();
        assert!(
            old.contains(&pid),
            "served by {pid}, not one of the old workers {old:?}"
        );
    }
    let log = server.log_since(offset);
    for bad in ["worker died", "worker started"] {
        assert!(!log.contains(bad), "{bad:?} after a refused reload\n{log}");
    }
    assert_eq!(server.children(), old, "the old workers are still the workers");

    // A valid change reloads.
    ff.rewrite(&FromFile::text(&ff.socket, 2, "max_requests = 1000"));
    let offset = server.log_offset();
    server.signal(libc::SIGHUP);
    let ready = server.wait_for_count_since(offset, "worker ready", 2, WORKER_TIMEOUT);
    assert_eq!(
        ready,
        2,
        "two new workers after a valid reload\n{}",
        server.log_since(offset)
    );
    let new: BTreeSet<u32> = worker_lines(&server.log_since(offset), "worker ready")
        .iter()
        .map(|w| w.pid)
        .collect();
    assert!(new.is_disjoint(&old), "new {new:?} old {old:?}");
    assert!(
        poll_until(WORKER_TIMEOUT, || server.children() == new),
        "the old workers did not leave: /proc shows {:?}, new {new:?}\n{}",
        server.children(),
        server.log_since(offset)
    );
    for _ in 0..10 {
        let pid = server.served_pid();
        assert!(new.contains(&pid), "served by {pid}, not a new worker {new:?}");
    }
    assert!(!server.log().contains("worker died"), "{}", server.log());
}

/// A `socket` changed in the file cannot be applied by a reload (the master holds the bound sockets): SIGHUP
/// says a restart is needed, and the old socket keeps serving.
#[test]
fn sighup_with_a_changed_socket_says_a_restart_is_needed() {
    let ff = FromFile::start(1);
    let server = &ff.server;
    let moved = ff.socket.with_file_name("moved.sock");
    ff.rewrite(&FromFile::text(&moved, 1, ""));
    let offset = server.log_offset();
    server.signal(libc::SIGHUP);
    assert!(
        server.wait_for_log_since(offset, "restart", LOG_WAIT),
        "no line saying the socket change needs a restart\n--- log since SIGHUP ---\n{}",
        server.log_since(offset)
    );
    assert_eq!(server.get("/pid").status, 200, "the old socket still serves");
    assert!(!server.log().contains("worker died"), "{}", server.log());
}

/// SIGTTIN takes one worker to two: the new worker is one of several processes, so its environ says
/// `wsgi.multiprocess` True (PEP 3333: true if an equivalent app object may be invoked by another process).
#[test]
fn a_worker_added_by_sigttin_sees_wsgi_multiprocess() {
    let server = Server::spawn(probe_app().arg("--workers").arg("1"));
    server.wait_master_ready(1);
    let offset = server.log_offset();
    server.signal(libc::SIGTTIN);
    assert_eq!(
        server.wait_for_count_since(offset, "worker ready", 1, WORKER_TIMEOUT),
        1,
        "no new worker after SIGTTIN\n{}",
        server.log_since(offset)
    );
    let new = worker_lines(&server.log_since(offset), "worker ready")[0].pid;
    let deadline = Instant::now() + WORKER_TIMEOUT;
    let env = loop {
        let env = server.env(&nginx_vars("GET", "/env", b""), b"");
        if env.get("pid").and_then(Json::as_u64) == Some(u64::from(new)) {
            break env;
        }
        assert!(
            Instant::now() < deadline,
            "the new worker {new} never answered\n{}",
            server.log()
        );
    };
    assert_eq!(env_bool(&env, "wsgi.multiprocess"), Some(true), "{env:?}");
}

// ---------------------------------------------------------------------------------------------------------
// Recycling by memory
// ---------------------------------------------------------------------------------------------------------

/// `--reload-on-rss 100`: once a request leaves a worker above the limit it accepts no new connection (uWSGI's
/// reload-on-rss stops the worker after that request), while the other worker and the replacement serve every
/// following request without a failure.
#[test]
fn a_worker_over_reload_on_rss_stops_accepting_at_once() {
    let server = Server::spawn(probe_app().arg("--workers").arg("2").arg("--reload-on-rss").arg("100"));
    server.wait_master_ready(2);
    for pid in server.children() {
        let rss = rss_kib(pid).expect("worker RSS") / 1024;
        assert!(rss < 60, "an idle worker already uses {rss} MiB");
    }
    let nginx = Nginx::start(&server.addr.nginx_upstream(), "");
    let grown = http::get(nginx.port(), "/grow?mb=150");
    assert_eq!(grown.status, 200, "{}", grown.summary());
    let big: u32 = grown.text().trim().parse().expect("pid");
    let mut served = Vec::new();
    for i in 0..40 {
        let r = http::get(nginx.port(), "/pid");
        assert_eq!(
            r.status,
            200,
            "request {i} after the big one: {}\n{}",
            r.summary(),
            server.log()
        );
        served.push(r.text().trim().parse::<u32>().expect("pid"));
    }
    assert!(
        !served.contains(&big),
        "the worker {big} over --reload-on-rss served again: {served:?}\n{}",
        server.log()
    );
    assert!(
        poll_until(WORKER_TIMEOUT, || !alive(big)),
        "the grown worker {big} did not leave\n{}",
        server.log()
    );
}
