//! Tier 3, failover: two ferrule instances behind one nginx upstream; one is SIGKILLed (master and workers,
//! as when its machine or container dies) while GET traffic flows, and no client request may fail.
//!
//! This pins the advice in nginx/upstream.conf: `uwsgi_next_upstream error timeout;` makes nginx retry a GET
//! on the next server when a connection is refused or cut before the response head, so a dead instance costs
//! latency, not errors. nginx balances over an `upstream` group of the two instances.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::harness::ferrule::{Addr, Ferrule, FerruleBuilder, apps_dir};
use crate::harness::http::Client;
use crate::harness::nginx::Nginx;
use crate::harness::procs::{live_children, poll_until};

/// Every wait in this test is bounded by one of these (and nginx's start and stop by the harness's bounds).
const KILL_TAKES_EFFECT: Duration = Duration::from_secs(10);
const PHASE: Duration = Duration::from_secs(60);
/// Client threads; each sends one request at a time, so this many requests are in flight at once.
const CLIENTS: usize = 4;
/// Requests each instance must have answered before the kill: proof that nginx balanced over both.
const BEFORE_KILL_EACH: usize = 25;
/// Requests that must complete after the kill, all of them answered by the survivor or by a retry.
const AFTER_KILL: usize = 300;
/// Hard cap on the whole run, so a stuck phase cannot loop forever.
const MAX_REQUESTS: usize = 5_000;
/// The app sleeps this long per request, so requests are in flight on the victim when it dies.
const PATH: &str = "/sleep?s=0.005";

/// One finished GET as the client saw it.
struct Outcome {
    /// nginx's `$upstream_addr`: one address, or several separated by ", " when nginx retried.
    upstream: String,
    ok: bool,
    summary: String,
    after_kill: bool,
}

#[test]
fn traffic_survives_sigkill_of_one_upstream_instance() {
    let victim = wsgi_cases().arg("--workers").arg("2").spawn();
    let survivor = wsgi_cases().arg("--workers").arg("2").spawn();
    let victim_addr = victim.addr.nginx_upstream();
    let survivor_addr = survivor.addr.nginx_upstream();
    let nginx = balancer(&[&victim_addr, &survivor_addr]);

    let outcomes = Arc::new(Mutex::new(Vec::<Outcome>::new()));
    let killed = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (outcomes, killed, stop) = (Arc::clone(&outcomes), Arc::clone(&killed), Arc::clone(&stop));
            let port = nginx.port();
            thread::spawn(move || {
                let mut client = Client::new(port);
                while !stop.load(Ordering::SeqCst) && outcomes.lock().unwrap().len() < MAX_REQUESTS {
                    // Read before sending: a request counts as "after the kill" only if it started after it.
                    let after_kill = killed.load(Ordering::SeqCst);
                    let r = client.get(PATH);
                    let outcome = Outcome {
                        upstream: r.header("X-Upstream").unwrap_or("").to_owned(),
                        ok: r.status == 200 && r.is_complete() && r.body == b"slept",
                        summary: r.summary(),
                        after_kill,
                    };
                    outcomes.lock().unwrap().push(outcome);
                }
            })
        })
        .collect();

    // Phase 1: both instances take traffic.
    let served_by = |addr: &str| {
        let outcomes = outcomes.lock().unwrap();
        outcomes.iter().filter(|o| o.ok && o.upstream == addr).count()
    };
    let both_served = poll_until(PHASE, || {
        served_by(&victim_addr) >= BEFORE_KILL_EACH && served_by(&survivor_addr) >= BEFORE_KILL_EACH
    });
    let before = (served_by(&victim_addr), served_by(&survivor_addr));

    // Phase 2: the victim dies at once, workers included, with no chance to drain.
    let victim_pids = if both_served {
        let pids = sigkill_instance(&victim);
        let refused = poll_until(
            KILL_TAKES_EFFECT,
            || matches!(&victim.addr, Addr::Unix(path) if UnixStream::connect(path).is_err()),
        );
        assert!(refused, "the victim's socket still accepts after SIGKILL of {pids:?}");
        // Only now is the victim gone: kill(2) returns before the processes die, and a loaded machine may let
        // them answer a few more requests in between, which must not count as answered after the kill.
        killed.store(true, Ordering::SeqCst);
        pids
    } else {
        Vec::new()
    };
    let after_done = |outcomes: &Vec<Outcome>| outcomes.iter().filter(|o| o.after_kill).count();
    let enough_after = both_served && poll_until(PHASE, || after_done(&outcomes.lock().unwrap()) >= AFTER_KILL);
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().expect("a client thread panicked (see its message above)");
    }

    let outcomes = outcomes.lock().unwrap();
    let failures: Vec<&Outcome> = outcomes.iter().filter(|o| !o.ok).collect();
    let retried = outcomes.iter().filter(|o| o.upstream.contains(", ")).count();
    let after: Vec<&Outcome> = outcomes.iter().filter(|o| o.after_kill).collect();
    let after_on_victim_only = after.iter().filter(|o| o.upstream == victim_addr).count();
    let report = format!(
        "{} requests, {} failed, {retried} retried by nginx on the other server; before the kill: victim {}, \
         survivor {}; victim pids {victim_pids:?}; {} requests started after the kill, {after_on_victim_only} \
         answered by the victim alone\n{}",
        outcomes.len(),
        failures.len(),
        before.0,
        before.1,
        after.len(),
        error_log_tail(&nginx),
    );
    eprintln!("{report}");

    assert!(both_served, "both instances must serve before the kill: {report}");
    assert!(enough_after, "too few requests completed after the kill: {report}");
    assert!(
        failures.is_empty(),
        "client-visible failures:\n{}\n{report}",
        failures
            .iter()
            .take(5)
            .map(|o| o.summary.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(after_on_victim_only, 0, "a dead instance cannot answer: {report}");

    // The survivor still stops cleanly once the load is gone.
    drop(nginx);
    let mut survivor = survivor;
    survivor.signal(libc::SIGTERM);
    let status = survivor.wait_exit(Duration::from_secs(40));
    assert!(
        status.is_some_and(|s| s.success()),
        "survivor exit after SIGTERM: {status:?}\n{}",
        survivor.log()
    );
}

fn wsgi_cases() -> FerruleBuilder {
    let app = apps_dir().join("wsgi_cases.py");
    FerruleBuilder::new(&format!("{}:application", app.display()))
}

/// SIGKILLs a ferrule master and every worker it started; returns the pids killed (master first).
///
/// The harness's drop kills only the master, whose workers would then drain gracefully; a crash does
/// not drain. The master was started by this test process without a group of its own, so a group
/// kill would hit the test too: the workers are found by their parent pid instead.
fn sigkill_instance(ferrule: &Ferrule) -> Vec<i32> {
    let master = i32::try_from(ferrule.pid()).expect("pid fits in i32");
    let workers: Vec<i32> = live_children(ferrule.pid())
        .into_iter()
        .map(|pid| i32::try_from(pid).expect("pid fits in i32"))
        .collect();
    assert!(!workers.is_empty(), "no worker processes found under master {master}");
    let mut pids = vec![master];
    pids.extend(workers);
    for &pid in &pids {
        // SAFETY: kill(2) on the master (our unreaped child) and on its workers, whose parent is alive
        // until this very loop, so none of these pids can have been reused by an unrelated process.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    pids
}

/// nginx with one `upstream` group of the ferrule sockets `servers`, on a free loopback port.
fn balancer(servers: &[&str]) -> Nginx {
    // max_fails/fail_timeout: after one failure nginx stops choosing the dead server for a while, so
    // most requests go straight to the survivor instead of paying for a refused connect first.
    Nginx::start_group(
        servers,
        "max_fails=1 fail_timeout=30s",
        // The behaviour under test: a refused connect or a connection cut before the response
        // head is retried on the next server (for idempotent methods only, as nginx does by default).
        "            uwsgi_next_upstream error timeout;
            uwsgi_connect_timeout 2s;
            uwsgi_read_timeout 10s;
            add_header X-Upstream $upstream_addr always;",
    )
}

/// The end of nginx's error log, where its upstream errors and retries are recorded.
fn error_log_tail(nginx: &Nginx) -> String {
    let log = std::fs::read_to_string(nginx.dir().join("error.log")).unwrap_or_default();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("upstream") || l.contains("emerg"))
        .collect();
    let tail = &lines[lines.len().saturating_sub(8)..];
    format!(
        "--- nginx error.log (upstream lines, last {}) ---\n{}",
        tail.len(),
        tail.join("\n")
    )
}
