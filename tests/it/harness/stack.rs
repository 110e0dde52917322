//! The one ferrule-behind-nginx of the test harness: a `Stack` is a running ferrule (master and workers) with a
//! real nginx in front of it, and what the tests ask of both.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::ferrule::{Ferrule, FerruleBuilder};
use super::http::Client;
use super::nginx::Nginx;
use super::procs::{live_children, poll_until};
use super::response::Response;

/// How long the fast stop (SIGINT) at the end of a test may take before the harness kills the master.
const FAST_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// ferrule and the nginx in front of it. Dropping it stops nginx, so it never sees its upstream vanish under
/// it, then stops the master fast, so its workers are reaped with it rather than left to notice it is gone.
pub struct Stack {
    pub nginx: Nginx,
    pub ferrule: Ferrule,
}

impl Stack {
    /// Spawns ferrule, then starts nginx with `location_conf` added inside `location /`.
    pub fn start(builder: FerruleBuilder, location_conf: &str) -> Stack {
        let ferrule = builder.spawn();
        let nginx = Nginx::start(&ferrule.addr.nginx_upstream(), location_conf);
        Stack { nginx, ferrule }
    }

    /// Spawns ferrule, waits for the master's line saying all `workers` first-generation workers are ready, then
    /// starts nginx with `location_conf` added inside `location /`.
    pub fn start_ready(builder: FerruleBuilder, workers: usize, location_conf: &str) -> Stack {
        let ferrule = builder.spawn();
        ferrule.wait_master_ready(workers);
        let nginx = Nginx::start(&ferrule.addr.nginx_upstream(), location_conf);
        Stack { nginx, ferrule }
    }

    pub fn port(&self) -> u16 {
        self.nginx.port()
    }

    /// A client of nginx with an empty cookie jar.
    pub fn client(&self) -> Client {
        Client::new(self.nginx.port())
    }

    pub fn get(&self, path: &str) -> Response {
        self.client().get(path)
    }

    /// Both logs, for assertion messages.
    pub fn logs(&self) -> String {
        format!(
            "--- ferrule log ---\n{}\n{}",
            self.ferrule.log(),
            self.nginx.error_log()
        )
    }

    pub fn master_pid(&self) -> u32 {
        self.ferrule.pid()
    }

    /// Sends a signal to the master.
    pub fn signal(&self, sig: i32) {
        self.ferrule.signal(sig);
    }

    /// GET /pid through nginx; panics (with the log) unless it is a 200 with a pid.
    pub fn served_pid(&self) -> u32 {
        let r = self.get("/pid");
        assert_eq!(r.status, 200, "GET /pid: {}\n{}", r.summary(), self.ferrule.log());
        r.text()
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("GET /pid: {}", r.summary()))
    }

    /// Sequential GET /pid until `pid` answers; false if it did not within `timeout`.
    pub fn wait_served_by(&self, pid: u32, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.served_pid() == pid {
                return true;
            }
        }
        false
    }

    /// Workers the master has now: live (not zombie) child processes of the master pid.
    pub fn worker_pids(&self) -> BTreeSet<u32> {
        live_children(self.master_pid())
    }

    /// Polls /proc (bounded) until the master has exactly `n` live children; returns them.
    pub fn wait_worker_count(&self, n: usize, timeout: Duration) -> BTreeSet<u32> {
        let mut last = BTreeSet::new();
        let ok = poll_until(timeout, || {
            last = self.worker_pids();
            last.len() == n
        });
        assert!(
            ok,
            "expected {n} worker processes, /proc shows {last:?}\n--- log ---\n{}",
            self.ferrule.log()
        );
        last
    }

    /// Waits (bounded) until the log after `offset` holds `n` occurrences of `needle`; panics with the log if not.
    pub fn expect_count_since(&self, offset: usize, needle: &str, n: usize, timeout: Duration) {
        let got = self.ferrule.wait_for_count_since(offset, needle, n, timeout);
        assert!(
            got >= n,
            "expected {n} × {needle:?} in the log within {timeout:?}, saw {got}\n--- log since offset ---\n{}",
            self.ferrule.log_since(offset)
        );
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.nginx.stop();
        self.ferrule.stop_fast(FAST_STOP_TIMEOUT);
    }
}
