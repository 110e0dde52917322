//! A running ferrule that a test talks raw uwsgi to, stopped fast (SIGINT to master and workers) when the test
//! ends; and the probe app most tier-3 tests run (tests/apps/probe_app.py: one route per thing a test looks at).

use std::collections::BTreeSet;
use std::ops::{Deref, DerefMut};

use super::ferrule::{Ferrule, FerruleBuilder, apps_dir};
use super::json::{Json, parse_json};
use super::procs::live_children;
use super::response::Response;
use super::uwsgi::{self, Raw, Vars, encode_request, nginx_vars, parse_response};
use super::{READ_WAIT, STOP_TIMEOUT};

/// `probe_app:application` from tests/apps.
pub fn probe_app() -> FerruleBuilder {
    FerruleBuilder::new("probe_app:application")
        .arg("--pythonpath")
        .arg(apps_dir())
}

/// A running ferrule; `Deref`s to the [`Ferrule`] process handle for its log, pid and signals.
pub struct Server(pub Ferrule);

impl Server {
    pub fn spawn(builder: FerruleBuilder) -> Server {
        Server(builder.spawn())
    }

    /// Spawns ferrule and waits for the master's line saying its `workers` first workers are ready.
    pub fn start(builder: FerruleBuilder, workers: usize) -> Server {
        let server = Server::spawn(builder);
        server.wait_master_ready(workers);
        server
    }

    /// Sends `vars` and `body` on a fresh connection and reads to the close (bounded by [`READ_WAIT`]).
    pub fn send(&self, vars: &Vars, body: &[u8]) -> Raw {
        let mut s = self.connect();
        s.set_read_timeout(Some(READ_WAIT));
        uwsgi::send_raw(&mut s, &encode_request(vars.as_slice(), body))
    }

    /// Sends a request and parses the answer; panics (with the log) on a close without an answer.
    pub fn request(&self, vars: &Vars, body: &[u8]) -> Response {
        let raw = self.send(vars, body);
        assert!(
            !raw.bytes.is_empty(),
            "no answer (reset: {}) to {:?}\n--- log ---\n{}",
            raw.reset,
            String::from_utf8_lossy(vars.get("REQUEST_URI").unwrap_or(b"?")),
            self.log()
        );
        parse_response(&raw.bytes)
    }

    pub fn get(&self, uri: &str) -> Response {
        self.request(&nginx_vars("GET", uri, b""), b"")
    }

    /// GET /env of the probe app: the environ the app saw, as JSON.
    pub fn env(&self, vars: &Vars, body: &[u8]) -> Json {
        let r = self.request(vars, body);
        assert_eq!(r.status, 200, "{r:?}\n--- log ---\n{}", self.log());
        parse_json(&r.text()).unwrap_or_else(|e| panic!("/env did not answer JSON ({e}): {r:?}"))
    }

    /// The pid of the worker that answered GET /pid of the probe app.
    pub fn served_pid(&self) -> u32 {
        let r = self.get("/pid");
        assert_eq!(r.status, 200, "GET /pid: {r:?}\n--- log ---\n{}", self.log());
        r.text().trim().parse().unwrap_or_else(|_| panic!("GET /pid: {r:?}"))
    }

    /// The master's live children (the workers, and a zygote under `--preload`).
    pub fn children(&self) -> BTreeSet<u32> {
        live_children(self.pid())
    }
}

impl Deref for Server {
    type Target = Ferrule;
    fn deref(&self) -> &Ferrule {
        &self.0
    }
}

impl DerefMut for Server {
    fn deref_mut(&mut self) -> &mut Ferrule {
        &mut self.0
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.0.stop_fast(STOP_TIMEOUT);
    }
}
