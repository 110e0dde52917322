//! Tier-3 tests of `--preload`: the master starts a zygote that imports the app once, freezes what the import
//! made, and forks every worker from it. One import for all workers, Python's fork hooks in each worker, a
//! replacement (crash, `--max-requests`, `--timeout`) forked rather than imported again, SIGHUP importing the
//! new code once in a new zygote (and keeping the old workers when it fails), `--reload-on-rss` measuring the
//! private memory a worker does not share with the zygote, the warning about threads started at import, a
//! failed import at start, the JSON log of the zygote's output, and the private-memory gauge of `--metrics`.
//!
//! Each test runs the real `ferrule` binary on tests/apps/preload_app.py over its own Unix socket in a temp
//! dir, and talks uwsgi to it directly (nginx adds nothing here). The app appends one line per import to the
//! file named by PRELOAD_IMPORT_LOG, which is how a test counts imports. Run with
//! `cargo test --release --test it preload::`.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::harness::ferrule::{FerruleBuilder, apps_dir, temp_dir};
use crate::harness::json::{Json, json_log_objects, parse_json};
use crate::harness::log::{count, field, worker_lines};
use crate::harness::procs::{alive, live_children, poll_until, rss_kib};
use crate::harness::response::Response;
use crate::harness::server::Server;
use crate::harness::uwsgi::{self, encode_request, nginx_vars, parse_response};
use crate::harness::{EXIT_TIMEOUT, LOG_WAIT, STOP_TIMEOUT, WORKER_TIMEOUT};

const APP: &str = "preload_app:application";
/// Bound for rounds of concurrent requests to reach the workers a test wants to hear from.
const COLLECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent requests per round when a test wants answers from several workers: more than one worker's
/// threads (4 by default), each request pausing a little so the others get to accept some.
const CONCURRENCY: usize = 12;
/// The pause of each of those requests.
const SPREAD: &str = "/info?s=0.05";

/// The master's line for a zygote it started.
const ZYGOTE_STARTED: &str = "zygote started: importing the app to fork the workers from";
/// The zygote's line once the app is imported and frozen.
const PRELOADED: &str = "app preloaded; forking the workers from it";
/// The zygote's warning about threads alive after the import.
const THREAD_WARNING: &str = "started threads while it was imported";

// ---------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------

/// `preload_app:application` from tests/apps with `--workers N`, counting its imports in `imports.log` in the
/// server's temp dir. Without `--preload`: each test adds it (or FERRULE_PRELOAD) itself.
fn app(workers: u32) -> FerruleBuilder {
    let builder = FerruleBuilder::new(APP)
        .arg("--pythonpath")
        .arg(apps_dir())
        .arg("--workers")
        .arg(workers.to_string());
    let import_log = builder.tempdir().join("imports.log");
    builder.env("PRELOAD_IMPORT_LOG", import_log)
}

/// Writes `preload_version.py` (read by preload_app at import time) into `dir` with this body.
fn write_version_module(dir: &Path, body: &str) {
    let path = dir.join("preload_version.py");
    std::fs::write(&path, body).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A version module whose import raises, so the app's import fails.
const BROKEN_VERSION: &str = "raise RuntimeError(\"preload broken version: this import fails on purpose\")\n";

/// `app(workers)` with `--pythonpath DIR`, DIR a `code` directory in the server's temp dir holding a
/// `preload_version.py` with `body`; returns the builder and DIR.
fn app_with_version(workers: u32, body: &str) -> (FerruleBuilder, PathBuf) {
    let builder = app(workers);
    let code = builder.tempdir().join("code");
    std::fs::create_dir(&code).expect("create the code dir");
    write_version_module(&code, body);
    (builder.arg("--pythonpath").arg(&code), code)
}

/// What `/info` says about the worker that answered.
#[derive(Debug, Clone)]
struct Info {
    pid: u32,
    import_pid: u32,
    ppid: u32,
    after_fork: Vec<u32>,
    freeze_count: u64,
    /// `random.random()` as the app wrote it.
    random: String,
    version: String,
    /// `wsgi.multiprocess` as the worker's environ had it.
    multiprocess: bool,
}

fn parse_info(body: &str) -> Info {
    let v = parse_json(body).unwrap_or_else(|e| panic!("/info did not answer JSON ({e}): {body:?}"));
    let pid = |k: &str| -> u32 {
        v.get(k)
            .and_then(Json::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or_else(|| panic!("no pid {k:?} in {body}"))
    };
    let after_fork = match v.get("after_fork") {
        Some(Json::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .unwrap_or_else(|| panic!("after_fork holds pids: {body}"))
            })
            .collect(),
        _ => panic!("no array \"after_fork\" in {body}"),
    };
    Info {
        pid: pid("pid"),
        import_pid: pid("import_pid"),
        ppid: pid("ppid"),
        after_fork,
        freeze_count: v
            .get("freeze_count")
            .and_then(Json::as_u64)
            .unwrap_or_else(|| panic!("no freeze_count in {body}")),
        random: match v.get("random") {
            Some(Json::Number(n)) => n.clone(),
            _ => panic!("no number \"random\" in {body}"),
        },
        version: v
            .get("version")
            .and_then(Json::as_str)
            .unwrap_or_else(|| panic!("no version in {body}"))
            .to_owned(),
        multiprocess: v
            .get("multiprocess")
            .and_then(Json::as_bool)
            .unwrap_or_else(|| panic!("no boolean multiprocess in {body}")),
    }
}

/// The distinct worker pids among `infos`.
fn pids(infos: &[Info]) -> BTreeSet<u32> {
    infos.iter().map(|i| i.pid).collect()
}

/// The first log line containing `needle`; panics with the log if there is none.
fn line_with<'a>(log: &'a str, needle: &str) -> &'a str {
    log.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?}\n--- log ---\n{log}"))
}

impl Server {
    /// GET `uri` (an `/info` one); panics with the log unless it is a 200 with the app's JSON.
    fn info(&self, uri: &str) -> Info {
        let r = self.get(uri);
        assert_eq!(r.status, 200, "GET {uri}: {r:?}\n--- log ---\n{}", self.log());
        parse_info(&r.text())
    }

    /// `n` GETs of `uri` at once, each on its own connection; every one must answer 200 with the app's JSON.
    fn info_round(&self, uri: &str, n: usize) -> Vec<Info> {
        let answers: Vec<thread::Result<Response>> = thread::scope(|s| {
            let handles: Vec<_> = (0..n).map(|_| s.spawn(|| self.get(uri))).collect();
            handles.into_iter().map(|h| h.join()).collect()
        });
        answers
            .into_iter()
            .map(|a| {
                let r =
                    a.unwrap_or_else(|_| panic!("a request thread panicked (see above)\n--- log ---\n{}", self.log()));
                assert_eq!(r.status, 200, "GET {uri}: {r:?}\n--- log ---\n{}", self.log());
                parse_info(&r.text())
            })
            .collect()
    }

    /// Rounds of `CONCURRENCY` concurrent `SPREAD` requests until `done(all answers so far)` holds; panics with
    /// the log if it does not within `COLLECT_TIMEOUT`. Returns every answer.
    fn collect_until(&self, what: &str, mut done: impl FnMut(&[Info]) -> bool) -> Vec<Info> {
        let deadline = Instant::now() + COLLECT_TIMEOUT;
        let mut infos = Vec::new();
        loop {
            infos.extend(self.info_round(SPREAD, CONCURRENCY));
            if done(&infos) {
                return infos;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {COLLECT_TIMEOUT:?}; {} answers came from {:?}\n--- log ---\n{}",
                infos.len(),
                pids(&infos),
                self.log()
            );
        }
    }

    /// `collect_until` the worker `pid` has answered.
    fn collect_until_answered_by(&self, what: &str, pid: u32) -> Vec<Info> {
        self.collect_until(what, |infos| infos.iter().any(|i| i.pid == pid))
    }

    /// The lines of the import log: one per import of the app.
    fn imports(&self) -> Vec<String> {
        let path = self.tempdir().join("imports.log");
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The pids of the zygotes the master started, in log order.
    fn zygotes(&self) -> Vec<u32> {
        self.0
            .log()
            .lines()
            .filter(|l| l.contains(ZYGOTE_STARTED))
            .filter_map(|l| field(l, "pid")?.parse().ok())
            .collect()
    }

    /// The pid of the zygote started with the server; panics with the log if there is none.
    fn first_zygote(&self) -> u32 {
        *self
            .zygotes()
            .first()
            .unwrap_or_else(|| panic!("no {ZYGOTE_STARTED:?} line\n--- log ---\n{}", self.log()))
    }

    /// The workers: the master's live children that are not zygotes.
    fn forked_workers(&self) -> BTreeSet<u32> {
        let zygotes = self.zygotes();
        live_children(self.pid())
            .into_iter()
            .filter(|p| !zygotes.contains(p))
            .collect()
    }

    /// Polls /proc (bounded) until the master has exactly `n` workers besides its zygote; returns them.
    fn wait_workers(&self, n: usize, timeout: Duration) -> BTreeSet<u32> {
        let mut last = BTreeSet::new();
        let ok = poll_until(timeout, || {
            last = self.forked_workers();
            last.len() == n
        });
        assert!(
            ok,
            "expected {n} workers, /proc shows {last:?} (zygotes {:?})\n--- log ---\n{}",
            self.zygotes(),
            self.log()
        );
        last
    }

    /// Waits (bounded) until the log after `offset` holds `n` occurrences of `needle`; panics with the log if not.
    fn expect_count_since(&self, offset: usize, needle: &str, n: usize, timeout: Duration) {
        let got = self.wait_for_count_since(offset, needle, n, timeout);
        assert!(
            got >= n,
            "expected {n} × {needle:?} in the log within {timeout:?}, saw {got}\n--- log since offset ---\n{}",
            self.log_since(offset)
        );
    }

    /// The pid of the first worker started after `offset`, once the master has logged it ready.
    fn replacement_since(&self, offset: usize) -> u32 {
        self.expect_count_since(offset, "worker started", 1, WORKER_TIMEOUT);
        let started = worker_lines(&self.log_since(offset), "worker started")[0].clone();
        self.expect_count_since(
            offset,
            &format!("worker ready worker={} ", started.id),
            1,
            WORKER_TIMEOUT,
        );
        started.pid
    }
}

/// Checks that each answer comes from a fork of the zygote whose pid is `zygote`: another process than the one
/// that imported, a child of the master (re-parented to it), with the imported objects frozen and Python's
/// fork hooks run in the worker itself.
fn assert_forked_from(server: &Server, infos: &[Info], zygote: u32) {
    for info in infos {
        assert_eq!(
            info.import_pid,
            zygote,
            "the app was imported by the zygote, not by the worker: {info:?}\n--- log ---\n{}",
            server.log()
        );
        assert_ne!(
            info.pid, info.import_pid,
            "the worker is not the importing process: {info:?}"
        );
        assert_eq!(
            info.ppid,
            server.pid(),
            "a forked worker is re-parented to the master: {info:?}\n--- log ---\n{}",
            server.log()
        );
        assert!(info.freeze_count > 0, "gc.freeze() ran before the fork: {info:?}");
        assert!(
            info.after_fork.contains(&info.pid),
            "os.register_at_fork(after_in_child=...) ran in the worker with its own pid: {info:?}"
        );
    }
}

/// The samples of one per-worker gauge (`name{worker="N",pid="P"} value`) in an OpenMetrics text, by pid.
fn gauge_by_pid(text: &str, name: &str) -> BTreeMap<u32, f64> {
    let prefix = format!("{name}{{");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|rest| {
            let (labels, value) = rest
                .split_once("} ")
                .unwrap_or_else(|| panic!("bad sample of {name}: {rest:?}"));
            let pid = labels
                .split(',')
                .find_map(|kv| kv.strip_prefix("pid=\""))
                .and_then(|v| v.trim_end_matches('"').parse().ok())
                .unwrap_or_else(|| panic!("no pid label in {name}{{{rest}"));
            let value = value
                .split(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("bad value in {name}{{{rest}"));
            (pid, value)
        })
        .collect()
}

/// A scrape of the `--metrics` socket at `path`: one uwsgi request, any path; returns the OpenMetrics text.
fn scrape(path: &Path) -> String {
    let mut stream = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
    stream.set_read_timeout(Some(LOG_WAIT)).expect("read timeout");
    let raw = uwsgi::send_raw(
        &mut stream,
        &encode_request(nginx_vars("GET", "/metrics", b"").as_slice(), b""),
    );
    let r = parse_response(&raw.bytes);
    assert_eq!(r.status, 200, "{r:?}");
    r.text()
}

// ---------------------------------------------------------------------------------------------------------
// One import, many forks
// ---------------------------------------------------------------------------------------------------------

/// `--workers 3 --preload`: the app is imported once, by the zygote, and every worker is a fork of it: another
/// pid than the importer's, the master's child, the imported objects frozen (`gc.freeze()`), Python's fork
/// hooks run with the worker's own pid, and `random` reseeded in each (no two workers draw the same numbers).
/// An app that starts no thread at import gets no warning about threads.
#[test]
fn preload_imports_once_and_every_worker_is_a_fork_of_it() {
    let server = Server::start(app(3).arg("--preload"), 3);
    let zygotes = server.zygotes();
    assert_eq!(zygotes.len(), 1, "one zygote\n{}", server.log());
    let zygote = zygotes[0];
    let log = server.log();
    assert!(log.contains(PRELOADED), "no {PRELOADED:?} line\n{log}");
    assert!(
        !log.contains(THREAD_WARNING),
        "a warning about threads the app never started\n{log}"
    );

    let imports = server.imports();
    assert_eq!(
        imports,
        [format!("import pid={zygote}")],
        "one import, in the zygote\n--- log ---\n{log}"
    );
    let workers = server.wait_workers(3, WORKER_TIMEOUT);
    assert!(alive(zygote), "the zygote stays to fork replacements\n{}", server.log());

    let infos = server.collect_until("answers from two workers", |infos| pids(infos).len() >= 2);
    assert!(
        pids(&infos).is_subset(&workers),
        "served by {:?}, workers are {workers:?}",
        pids(&infos)
    );
    assert_forked_from(&server, &infos, zygote);
    for info in &infos {
        assert_eq!(info.version, "none", "{info:?}");
    }

    // Without the reseed in the fork hook every worker would draw the same sequence of numbers.
    let mut draws: BTreeMap<u32, BTreeSet<&str>> = BTreeMap::new();
    for info in &infos {
        draws.entry(info.pid).or_default().insert(&info.random);
    }
    let all: Vec<(&u32, &BTreeSet<&str>)> = draws.iter().collect();
    for (i, (a, a_draws)) in all.iter().enumerate() {
        for (b, b_draws) in &all[i + 1..] {
            assert!(
                a_draws.is_disjoint(b_draws),
                "workers {a} and {b} drew the same random numbers: {a_draws:?} / {b_draws:?}"
            );
        }
    }
    assert_eq!(server.imports().len(), 1, "serving imported nothing more");
}

/// The control case, without `--preload`: each of the 3 workers imports the app itself (one import-log line
/// per worker, from the worker's own pid), and no zygote is started.
#[test]
fn without_preload_every_worker_imports_the_app_itself() {
    let server = Server::start(app(3), 3);
    let log = server.log();
    assert!(!log.contains(ZYGOTE_STARTED), "a zygote without --preload\n{log}");
    assert!(!log.contains(PRELOADED), "{log}");
    let workers = server.wait_workers(3, WORKER_TIMEOUT);
    let imported: BTreeSet<u32> = server
        .imports()
        .iter()
        .map(|l| {
            l.strip_prefix("import pid=")
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("bad import-log line {l:?}"))
        })
        .collect();
    assert_eq!(
        server.imports().len(),
        3,
        "one import per worker: {:?}\n{log}",
        server.imports()
    );
    assert_eq!(imported, workers, "each worker imported the app\n{log}");

    let infos = server.collect_until("answers from two workers", |infos| pids(infos).len() >= 2);
    for info in &infos {
        assert_eq!(
            info.import_pid, info.pid,
            "the worker imported the app itself: {info:?}"
        );
        assert_eq!(info.ppid, server.pid(), "{info:?}");
        assert!(info.after_fork.is_empty(), "no fork after the import: {info:?}");
    }
}

// ---------------------------------------------------------------------------------------------------------
// Replacements are forks
// ---------------------------------------------------------------------------------------------------------

/// A preloaded worker killed with SIGKILL: the master logs its pid and `killed by SIGKILL` and forks a
/// replacement from the zygote (a new pid, the same importing pid, no second import, no new zygote).
#[test]
fn a_sigkilled_preloaded_worker_is_replaced_by_a_fork() {
    let server = Server::start(app(2).arg("--preload"), 2);
    let zygote = server.first_zygote();
    let before = server.wait_workers(2, WORKER_TIMEOUT);
    let victim = *before.iter().next().expect("two workers");
    let survivor = *before.iter().nth(1).expect("two workers");

    let offset = server.log_offset();
    crate::harness::procs::signal(victim, libc::SIGKILL);
    server.expect_count_since(offset, "worker died; replacing it", 1, WORKER_TIMEOUT);
    let since = server.log_since(offset);
    let died = line_with(&since, "worker died; replacing it");
    assert_eq!(field(died, "pid"), Some(victim.to_string().as_str()), "{died}");
    assert!(died.contains("status=killed by SIGKILL"), "{died}");

    let new_pid = server.replacement_since(offset);
    assert!(!before.contains(&new_pid), "{new_pid} is a new process");
    let after = server.wait_workers(2, WORKER_TIMEOUT);
    assert_eq!(
        after,
        BTreeSet::from([survivor, new_pid]),
        "the survivor and the replacement"
    );
    assert!(
        !server.log_since(offset).contains(ZYGOTE_STARTED),
        "the replacement came from a new zygote, not a fork of the running one\n{}",
        server.log_since(offset)
    );

    let infos = server.collect_until_answered_by("an answer from the replacement", new_pid);
    assert!(!pids(&infos).contains(&victim), "the killed worker answered: {infos:?}");
    assert_forked_from(&server, &infos, zygote);
    assert_eq!(
        server.imports().len(),
        1,
        "the replacement did not import the app: {:?}",
        server.imports()
    );
}

/// `--max-requests 5` under `--preload`: workers are recycled as they reach their count, each replacement a
/// fork of the zygote (no second import), and not one request fails while they come and go.
#[test]
fn max_requests_under_preload_recycles_into_forks() {
    let server = Server::start(app(2).arg("--preload").arg("--max-requests").arg("5"), 2);
    let zygote = server.first_zygote();
    let first = server.wait_workers(2, WORKER_TIMEOUT);
    let infos = server.collect_until("answers from two recycled workers", |infos| {
        pids(infos).difference(&first).count() >= 2
    });
    assert_forked_from(&server, &infos, zygote);
    let log = server.log();
    assert!(
        count(&log, "reason=\"max-requests\"") >= 2,
        "workers were recycled for --max-requests\n{log}"
    );
    assert!(!log.contains("worker died"), "{log}");
    assert_eq!(server.zygotes().len(), 1, "no new zygote\n{log}");
    assert_eq!(
        server.imports().len(),
        1,
        "recycling imported nothing: {:?}\n{log}",
        server.imports()
    );
}

/// `--timeout 2` under preload (switched on by `FERRULE_PRELOAD=1`, the environment's spelling): a request
/// that sleeps 30 s gets its 504 after about 2 s and its worker is replaced by a fork of the zygote.
#[test]
fn a_timed_out_preloaded_worker_is_replaced_by_a_fork() {
    let server = Server::start(app(1).env("FERRULE_PRELOAD", "1").arg("--timeout").arg("2"), 1);
    assert!(
        server.log().contains(PRELOADED),
        "FERRULE_PRELOAD=1 preloads\n{}",
        server.log()
    );
    let zygote = server.first_zygote();
    let worker = *server
        .wait_workers(1, WORKER_TIMEOUT)
        .iter()
        .next()
        .expect("one worker");

    let offset = server.log_offset();
    let started = Instant::now();
    let r = server.get("/sleep?s=30");
    let took = started.elapsed();
    assert_eq!(r.status, 504, "{r:?}\n--- log ---\n{}", server.log());
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(10),
        "504 after {took:?}, expected 2 s plus a margin"
    );
    server.expect_count_since(
        offset,
        &format!("replacing worker worker=1 pid={worker} reason=\"timeout\""),
        1,
        WORKER_TIMEOUT,
    );
    let new_pid = server.replacement_since(offset);
    assert_ne!(new_pid, worker);
    let infos = server.collect_until_answered_by("an answer from the replacement", new_pid);
    assert!(
        !pids(&infos).contains(&worker),
        "the timed-out worker took new requests: {infos:?}"
    );
    assert_forked_from(&server, &infos, zygote);
    assert!(!server.log_since(offset).contains(ZYGOTE_STARTED), "{}", server.log());
    assert_eq!(server.imports().len(), 1, "{:?}", server.imports());
}

/// SIGTTIN under `--preload` adds a worker forked from the zygote (no import), SIGTTOU takes one away.
#[test]
fn sigttin_and_sigttou_under_preload_fork_and_stop_workers() {
    let server = Server::start(app(1).arg("--preload"), 1);
    let zygote = server.first_zygote();
    let first = server.wait_workers(1, WORKER_TIMEOUT);

    let offset = server.log_offset();
    server.signal(libc::SIGTTIN);
    server.expect_count_since(offset, "SIGTTIN: one worker more", 1, LOG_WAIT);
    let added = server.replacement_since(offset);
    let two = server.wait_workers(2, WORKER_TIMEOUT);
    assert_eq!(
        two,
        &first | &BTreeSet::from([added]),
        "the first worker and the added one"
    );
    let infos = server.collect_until_answered_by("an answer from the added worker", added);
    assert_forked_from(&server, &infos, zygote);
    assert_eq!(
        server.imports().len(),
        1,
        "the added worker is a fork: {:?}",
        server.imports()
    );

    let offset = server.log_offset();
    server.signal(libc::SIGTTOU);
    server.expect_count_since(offset, "SIGTTOU: one worker fewer", 1, LOG_WAIT);
    server.expect_count_since(offset, "worker exited", 1, WORKER_TIMEOUT);
    let one = server.wait_workers(1, WORKER_TIMEOUT);
    assert!(one.is_subset(&two), "{one:?} is one of {two:?}");
    assert!(alive(zygote), "the zygote stays\n{}", server.log());
}

/// The zygote killed while the workers serve: the master logs it and starts a new zygote, which imports the
/// app again; the workers serve on untouched, and a worker lost afterwards is forked from the new zygote.
#[test]
fn a_killed_zygote_is_started_again_and_the_workers_serve_on() {
    let server = Server::start(app(2).arg("--preload"), 2);
    let first_zygote = server.first_zygote();
    let workers = server.wait_workers(2, WORKER_TIMEOUT);

    let offset = server.log_offset();
    crate::harness::procs::signal(first_zygote, libc::SIGKILL);
    server.expect_count_since(offset, "the zygote died; starting it again", 1, WORKER_TIMEOUT);
    let since = server.log_since(offset);
    let died = line_with(&since, "the zygote died; starting it again");
    assert_eq!(field(died, "pid"), Some(first_zygote.to_string().as_str()), "{died}");
    assert!(died.contains("status=killed by SIGKILL"), "{died}");
    server.expect_count_since(offset, "the app is preloaded again", 1, WORKER_TIMEOUT);
    let zygotes = server.zygotes();
    assert_eq!(zygotes.len(), 2, "one new zygote\n{}", server.log());
    let second_zygote = zygotes[1];
    assert_eq!(
        server.imports(),
        [
            format!("import pid={first_zygote}"),
            format!("import pid={second_zygote}")
        ],
        "the new zygote imported the app once\n--- log ---\n{}",
        server.log()
    );
    assert!(
        !server.log_since(offset).contains("worker started"),
        "{}",
        server.log_since(offset)
    );
    assert_eq!(
        server.wait_workers(2, WORKER_TIMEOUT),
        workers,
        "the workers serve on untouched"
    );
    let infos = server.info_round(SPREAD, CONCURRENCY);
    assert!(pids(&infos).is_subset(&workers), "{infos:?}");
    assert_forked_from(&server, &infos, first_zygote);

    let victim = *workers.iter().next().expect("two workers");
    let offset = server.log_offset();
    crate::harness::procs::signal(victim, libc::SIGKILL);
    let new_pid = server.replacement_since(offset);
    let infos = server.collect_until_answered_by("an answer from the replacement", new_pid);
    let replacement: Vec<Info> = infos.into_iter().filter(|i| i.pid == new_pid).collect();
    assert_forked_from(&server, &replacement, second_zygote);
    assert_eq!(server.imports().len(), 2, "{:?}", server.imports());
}

/// The zygote ignores stop signals: a service manager signals the whole group at once (systemd's
/// `KillMode=control-group`), and a zygote killed before the master handled its own SIGTERM would be taken for
/// a crash and started again in the middle of the stop. SIGTERM to the zygote alone leaves it running and
/// logs nothing; SIGTERM to the master then stops everything with exit 0 and no "zygote died" line, the zygote
/// exiting when its channel closes.
#[test]
fn the_zygote_ignores_stop_signals_and_ends_with_the_master() {
    let mut server = Server::start(app(2).arg("--preload"), 2);
    let zygote = server.first_zygote();
    let workers = server.wait_workers(2, WORKER_TIMEOUT);
    let offset = server.log_offset();
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        crate::harness::procs::signal(zygote, sig);
    }
    // A worker answer after the signals: had they been delivered, the zygote would be gone by now.
    let infos = server.info_round(SPREAD, CONCURRENCY);
    assert!(pids(&infos).is_subset(&workers), "{infos:?}");
    assert!(
        crate::harness::procs::alive(zygote),
        "the zygote died of a stop signal\n--- log ---\n{}",
        server.log()
    );
    assert!(
        !server.log_since(offset).contains("zygote died"),
        "{}",
        server.log_since(offset)
    );

    server.0.signal(libc::SIGTERM);
    let status = server.0.wait_exit(STOP_TIMEOUT);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "--- log ---\n{}", server.log());
    assert!(
        !server.log_since(offset).contains("zygote died"),
        "{}",
        server.log_since(offset)
    );
    assert!(
        poll_until(STOP_TIMEOUT, || !crate::harness::procs::alive(zygote)),
        "the zygote outlived the master"
    );
}

/// A worker forked for SIGTTIN sees `wsgi.multiprocess` true, as a worker started afresh would: the zygote
/// imported the app when there was one worker, and each fork learns the count then.
#[test]
fn a_worker_forked_for_sigttin_sees_wsgi_multiprocess() {
    let server = Server::start(app(1).arg("--preload"), 1);
    let first = server.info("/info");
    assert!(
        !first.multiprocess,
        "one worker: wsgi.multiprocess is false\n{}",
        server.log()
    );
    let offset = server.log_offset();
    server.signal(libc::SIGTTIN);
    let added = server.replacement_since(offset);
    let infos = server.collect_until_answered_by("an answer from the worker SIGTTIN added", added);
    let from_added: Vec<&Info> = infos.iter().filter(|i| i.pid == added).collect();
    assert!(
        from_added.iter().all(|i| i.multiprocess),
        "{from_added:?}\n--- log ---\n{}",
        server.log()
    );
    assert_eq!(server.imports().len(), 1, "{:?}", server.imports());
}

/// If the master dies outright (SIGKILL: no chance to close anything), its zygote dies with it, even in the
/// middle of importing the app (it ignores stop signals, so only the kernel's parent-death signal ends it), and
/// its workers stop once they see their master gone; nothing is left holding the sockets.
#[test]
fn a_killed_master_takes_its_zygote_and_workers_with_it() {
    // Ready first: the zygote waits on its channel, the workers serve.
    let mut server = Server::start(app(2).arg("--preload"), 2);
    let zygote = server.first_zygote();
    let workers = server.wait_workers(2, WORKER_TIMEOUT);
    server.0.signal(libc::SIGKILL);
    let _ = server.0.wait_exit(STOP_TIMEOUT);
    for pid in std::iter::once(zygote).chain(workers.iter().copied()) {
        assert!(
            poll_until(WORKER_TIMEOUT, || !alive(pid)),
            "process {pid} outlived the killed master\n--- log ---\n{}",
            server.log()
        );
    }

    // Still importing: the zygote sleeps in the import. (Started by hand: the harness's spawn waits for ready.)
    let dir = temp_dir();
    let log_path = dir.path().join("ferrule.log");
    let log = std::fs::File::create(&log_path).expect("create the log file");
    let apps = apps_dir();
    let mut master = std::process::Command::new(crate::harness::ferrule::bin())
        .args(["--socket", &format!("unix:{}", dir.path().join("app.sock").display())])
        .args([
            "--pythonpath",
            &apps.display().to_string(),
            "--workers",
            "2",
            "--preload",
        ])
        .arg("preload_app:application")
        .env("PRELOAD_IMPORT_SLEEP", "60")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start ferrule");
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let mut zygote = None;
    let started = poll_until(WORKER_TIMEOUT, || {
        zygote = read_log()
            .lines()
            .find(|l| l.contains(ZYGOTE_STARTED))
            .and_then(|l| field(l, "pid")?.parse::<u32>().ok());
        zygote.is_some()
    });
    let killed = master.kill();
    let _ = master.wait();
    assert!(started, "no zygote started\n--- log ---\n{}", read_log());
    killed.expect("SIGKILL the master");
    let zygote = zygote.unwrap_or_default();
    assert!(
        poll_until(WORKER_TIMEOUT, || !alive(zygote)),
        "the importing zygote outlived the killed master\n--- log ---\n{}",
        read_log()
    );
}

// ---------------------------------------------------------------------------------------------------------
// Reloading
// ---------------------------------------------------------------------------------------------------------

/// SIGHUP under `--preload` imports the new code once, in a new zygote, then replaces every worker with a fork
/// of it (new pids, the new version, the old zygote gone). A second SIGHUP with code that cannot be imported
/// logs that the reload failed, with the Python error, and the same workers keep answering the previous
/// version; a worker lost after that is still replaced from the previous zygote.
#[test]
fn sighup_under_preload_imports_once_and_survives_broken_code() {
    let (builder, code) = app_with_version(2, "VERSION = \"v1\"\n");
    let server = Server::start(builder.arg("--preload"), 2);
    let first_zygote = server.first_zygote();
    let first = server.wait_workers(2, WORKER_TIMEOUT);
    let v1 = server.info("/info");
    assert_eq!(v1.version, "v1", "{v1:?}");

    // A version of another length: even a stale bytecode cache could not pass for it.
    write_version_module(&code, "VERSION = \"v22\"\n");
    let offset = server.log_offset();
    server.signal(libc::SIGHUP);
    server.expect_count_since(
        offset,
        "SIGHUP: reloading; importing the new code in a new zygote",
        1,
        LOG_WAIT,
    );
    server.expect_count_since(
        offset,
        "the new code is preloaded; replacing the workers",
        1,
        WORKER_TIMEOUT,
    );
    server.expect_count_since(offset, "worker ready", 2, WORKER_TIMEOUT);
    server.expect_count_since(offset, "worker exited", 2, WORKER_TIMEOUT);
    let zygotes = server.zygotes();
    assert_eq!(zygotes.len(), 2, "one new zygote\n{}", server.log());
    let second_zygote = zygotes[1];
    assert_eq!(
        server.imports(),
        [
            format!("import pid={first_zygote}"),
            format!("import pid={second_zygote}")
        ],
        "the reload imported the code once, in the new zygote\n--- log ---\n{}",
        server.log()
    );
    let second = server.wait_workers(2, WORKER_TIMEOUT);
    assert!(first.is_disjoint(&second), "before {first:?}, after {second:?}");
    assert!(
        poll_until(WORKER_TIMEOUT, || !alive(first_zygote)),
        "the previous zygote {first_zygote} outlived the reload\n{}",
        server.log()
    );
    let infos = server.collect_until("answers from both new workers", |infos| second.is_subset(&pids(infos)));
    assert_eq!(pids(&infos), second, "only the new workers answer after the reload");
    assert_forked_from(&server, &infos, second_zygote);
    for info in &infos {
        assert_eq!(info.version, "v22", "the old code answered after the reload: {info:?}");
    }

    // Code that raises at import: the reload fails and nothing changes.
    write_version_module(&code, BROKEN_VERSION);
    let offset = server.log_offset();
    server.signal(libc::SIGHUP);
    server.expect_count_since(
        offset,
        "reload failed: the new code could not be loaded; the previous workers keep serving",
        1,
        WORKER_TIMEOUT,
    );
    let since = server.log_since(offset);
    assert!(
        since.contains("RuntimeError: preload broken version: this import fails on purpose"),
        "the Python error is in the log\n{since}"
    );
    assert!(
        !since.contains("worker started"),
        "no worker was started for broken code\n{since}"
    );
    assert_eq!(
        server.imports().len(),
        3,
        "the failed import was tried once: {:?}",
        server.imports()
    );
    assert_eq!(
        server.wait_workers(2, WORKER_TIMEOUT),
        second,
        "the same workers serve on"
    );
    let infos = server.info_round(SPREAD, CONCURRENCY);
    for info in &infos {
        assert!(second.contains(&info.pid), "{info:?} is not one of {second:?}");
        assert_eq!(info.version, "v22", "{info:?}");
    }

    // The previous zygote is still the one replacements come from.
    let victim = *second.iter().next().expect("two workers");
    let offset = server.log_offset();
    crate::harness::procs::signal(victim, libc::SIGKILL);
    let new_pid = server.replacement_since(offset);
    let infos = server.collect_until_answered_by("an answer from the replacement", new_pid);
    assert_forked_from(&server, &infos, second_zygote);
    for info in &infos {
        assert_eq!(info.version, "v22", "{info:?}");
    }
    assert_eq!(server.imports().len(), 3, "{:?}", server.imports());
}

// ---------------------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------------------

/// Under `--preload`, `--reload-on-rss 100` limits the worker's private memory, not its resident memory: with
/// 150 MiB made at import (resident in every worker, but shared with the zygote) 30 requests recycle nothing;
/// a request that keeps 160 MiB of its own makes that worker be replaced, and the warning names the measure.
#[test]
fn reload_on_rss_under_preload_measures_private_memory() {
    let builder = app(2)
        .arg("--preload")
        .arg("--reload-on-rss")
        .arg("100")
        .env("PRELOAD_IMPORT_MIB", "150");
    let server = Server::start(builder, 2);
    let workers = server.wait_workers(2, WORKER_TIMEOUT);
    for pid in &workers {
        let rss = rss_kib(*pid).expect("worker RSS") / 1024;
        assert!(
            rss > 100,
            "a worker's resident memory counts the 150 MiB it shares with the zygote (or this test proves \
             nothing), yet it is {rss} MiB"
        );
    }

    let infos: Vec<Info> = (0..3).flat_map(|_| server.info_round("/info", 10)).collect();
    assert_eq!(infos.len(), 30);
    assert!(pids(&infos).is_subset(&workers), "{infos:?} vs {workers:?}");
    assert_eq!(
        server.forked_workers(),
        workers,
        "nothing was recycled\n{}",
        server.log()
    );

    let offset = server.log_offset();
    let r = server.get("/grow?mib=160");
    assert_eq!(r.status, 200, "{r:?}\n--- log ---\n{}", server.log());
    let grown: u32 = r.text().trim().parse().expect("/grow answers the pid");
    server.expect_count_since(offset, "past --reload-on-rss", 1, LOG_WAIT);
    let log = server.log();
    // Lines are written in the order they happen: had a request of the 30 tripped the limit, its line would
    // be here before this one.
    assert_eq!(
        count(&log, "past --reload-on-rss"),
        1,
        "only the grown worker went past the limit\n{log}"
    );
    let warning = line_with(&log, "past --reload-on-rss");
    assert!(warning.contains("WARN"), "{warning}");
    assert!(
        warning.contains("path=/grow?mib=160"),
        "the warning is the grown request's: {warning}"
    );
    assert_eq!(field(warning, "measure"), Some("private memory"), "{warning}");
    server.expect_count_since(offset, &format!(" pid={grown} reason=\"memory\""), 1, WORKER_TIMEOUT);
    let replacement = server.replacement_since(offset);
    assert!(
        poll_until(WORKER_TIMEOUT, || !alive(grown)),
        "the grown worker {grown} did not leave\n{}",
        server.log()
    );
    let after = server.wait_workers(2, WORKER_TIMEOUT);
    assert!(after.contains(&replacement) && !after.contains(&grown), "{after:?}");
    assert_eq!(
        server.imports().len(),
        1,
        "the replacement is a fork: {:?}",
        server.imports()
    );
}

/// `--metrics` under `--preload` gives each worker's private memory next to its resident memory; with 64 MiB
/// made at import and shared with the zygote, the private figure leaves those pages out.
#[test]
fn metrics_under_preload_show_each_workers_private_memory() {
    let builder = app(2).arg("--preload").env("PRELOAD_IMPORT_MIB", "64");
    let metrics = builder.tempdir().join("metrics.sock");
    let server = Server::start(builder.arg("--metrics").arg(format!("unix:{}", metrics.display())), 2);
    let workers = server.wait_workers(2, WORKER_TIMEOUT);
    assert_eq!(server.info("/info").import_pid, server.first_zygote());

    let mut text = String::new();
    let complete = poll_until(LOG_WAIT, || {
        text = scrape(&metrics);
        let private: BTreeSet<u32> = gauge_by_pid(&text, "ferrule_worker_private_memory_bytes")
            .into_keys()
            .collect();
        let resident: BTreeSet<u32> = gauge_by_pid(&text, "ferrule_worker_resident_memory_bytes")
            .into_keys()
            .collect();
        private == workers && resident == workers
    });
    assert!(
        complete,
        "one private and one resident memory sample for each of the workers {workers:?}\n--- scrape ---\n{text}\n--- log ---\n{}",
        server.log()
    );
    assert!(
        text.contains("# TYPE ferrule_worker_private_memory_bytes gauge"),
        "{text}"
    );
    let private = gauge_by_pid(&text, "ferrule_worker_private_memory_bytes");
    let resident = gauge_by_pid(&text, "ferrule_worker_resident_memory_bytes");
    const MIB: f64 = (1u64 << 20) as f64;
    for pid in &workers {
        let (p, r) = (private[pid], resident[pid]);
        assert!(
            p > 0.0,
            "worker {pid}: a running worker has some memory of its own: {p}\n{text}"
        );
        assert!(
            p + 48.0 * MIB <= r,
            "worker {pid}: the 64 MiB shared with the zygote are resident but not private (private {p}, \
             resident {r})\n{text}"
        );
    }
}

// ---------------------------------------------------------------------------------------------------------
// What the zygote says
// ---------------------------------------------------------------------------------------------------------

/// An app that starts a thread while it is imported is warned about under `--preload` (a forked worker gets
/// none of the zygote's threads), and it is still served.
#[test]
fn a_thread_started_at_import_is_warned_about() {
    let server = Server::start(app(1).arg("--preload").env("PRELOAD_START_THREAD", "1"), 1);
    let log = server.log();
    assert_eq!(count(&log, THREAD_WARNING), 1, "one warning, from the zygote\n{log}");
    let warning = line_with(&log, THREAD_WARNING);
    assert!(warning.contains("WARN"), "{warning}");
    let info = server.info("/info");
    assert_forked_from(&server, &[info], server.first_zygote());
}

/// An app that cannot be imported stops the master under `--preload` as without it: a non-zero exit within
/// seconds, the Python traceback in the log, one import tried, no worker forked, the socket file removed and
/// the zygote gone.
#[test]
fn an_app_that_fails_to_import_stops_the_master_under_preload() {
    // The server's temp dir is gone once it has exited: the socket and the import log live in one of ours.
    let dir = temp_dir();
    let socket = dir.path().join("preload.sock");
    let import_log = dir.path().join("imports.log");
    let (builder, _code) = app_with_version(2, BROKEN_VERSION);
    let started = Instant::now();
    let (status, log) = builder
        .unix_at(&socket)
        .env("PRELOAD_IMPORT_LOG", &import_log)
        .arg("--preload")
        .spawn_expect_exit(EXIT_TIMEOUT);
    assert!(
        status.code().is_some_and(|c| c != 0),
        "exit {status:?} (signal {:?})\n{log}",
        status.signal()
    );
    assert!(started.elapsed() < EXIT_TIMEOUT);
    assert!(log.contains("Traceback (most recent call last)"), "{log}");
    assert!(
        log.contains("RuntimeError: preload broken version: this import fails on purpose"),
        "{log}"
    );
    assert!(log.contains("the app could not be loaded"), "{log}");
    assert!(log.contains(ZYGOTE_STARTED), "{log}");
    assert!(
        !log.contains("worker started"),
        "no worker is forked from a failed import\n{log}"
    );
    let imports = std::fs::read_to_string(&import_log).unwrap_or_default();
    assert_eq!(imports.lines().count(), 1, "one import tried: {imports:?}\n{log}");
    assert!(!socket.exists(), "socket file left behind\n{log}");
    let zygote: u32 = field(line_with(&log, ZYGOTE_STARTED), "pid")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no zygote pid\n{log}"));
    assert!(!alive(zygote), "the zygote {zygote} outlived the master");
}

/// `--log-format json` under `--preload`: every line on stderr is one JSON object, what the app prints while
/// the zygote imports it included (one `ferrule::app_output` record per line, logged once, not once per
/// forked worker), from start to a SIGTERM stop.
#[test]
fn json_log_under_preload_wraps_the_zygotes_output() {
    let builder = app(2)
        .arg("--preload")
        .arg("--log-format")
        .arg("json")
        .env("PRELOAD_PRINT", "1");
    let mut server = Server::start(builder, 2);
    let zygote = server.info("/info").import_pid;
    server.info_round(SPREAD, 4);

    server.0.signal(libc::SIGTERM);
    let status = server
        .0
        .wait_exit(LOG_WAIT)
        .unwrap_or_else(|| panic!("still running 10 s after SIGTERM\n{}", server.log()));
    assert_eq!(status.code(), Some(0), "{status:?}\n{}", server.log());
    assert!(
        server.wait_for_log("\"message\":\"stopped\"", LOG_WAIT),
        "no `stopped` record\n{}",
        server.log()
    );

    let log = server.log();
    let objects = json_log_objects(&log);

    let str_of = |o: &Json, k: &str| o.get(k).and_then(Json::as_str).map(str::to_owned);
    for stream in ["stdout", "stderr"] {
        let printed = format!("preload-import-print {stream} pid={zygote}");
        let records: Vec<&Json> = objects
            .iter()
            .filter(|o| str_of(o, "line").as_deref() == Some(printed.as_str()))
            .collect();
        assert_eq!(records.len(), 1, "one record of {printed:?}\n--- log ---\n{log}");
        assert_eq!(
            str_of(records[0], "target").as_deref(),
            Some("ferrule::app_output"),
            "{:?}",
            records[0]
        );
    }
    assert!(
        objects
            .iter()
            .any(|o| str_of(o, "message").as_deref() == Some(PRELOADED)),
        "the zygote's own line is a JSON record too\n{log}"
    );
}
