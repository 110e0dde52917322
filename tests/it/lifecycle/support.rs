//! Helpers for tests/it/lifecycle.rs: the lifecycle app with N workers, a load generator run as a second process,
//! and the app module a reload test rewrites.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use crate::harness::ferrule::{FerruleBuilder, apps_dir};
use crate::harness::json::{Json, parse_json};
use crate::harness::venv::PYTHON;

/// `lifecycle_app:application` from tests/apps with `--workers N`.
pub fn lifecycle_app(workers: u32) -> FerruleBuilder {
    FerruleBuilder::new("lifecycle_app:application")
        .arg("--pythonpath")
        .arg(apps_dir())
        .arg("--workers")
        .arg(workers.to_string())
}

// --- load generator ----------------------------------------------------------------------------------------

/// tests/apps/load.py running as its own process.
pub struct Load {
    child: Option<Child>,
    output: mpsc::Receiver<String>,
    describe: String,
}

/// What load.py reported.
#[derive(Debug, Clone)]
pub struct LoadResult {
    pub ok: u64,
    pub failed: u64,
    pub statuses: BTreeMap<String, u64>,
    pub errors: Vec<String>,
    /// Distinct response bodies and how often each came back.
    pub bodies: BTreeMap<String, u64>,
    /// Seconds from the first request to the last answer.
    pub elapsed_s: f64,
    pub raw: String,
}

impl LoadResult {
    /// The bodies that are pids (routes /pid, /sleep and /grow answer with the worker's pid).
    pub fn pids(&self) -> BTreeSet<u32> {
        self.bodies.keys().filter_map(|b| b.trim().parse().ok()).collect()
    }
}

impl Load {
    /// Starts `load.py PORT PATH TOTAL CONCURRENCY`.
    pub fn start(port: u16, path: &str, total: u32, concurrency: u32) -> Load {
        let script = apps_dir().join("load.py");
        let describe = format!("{PYTHON} {} {port} {path} {total} {concurrency}", script.display());
        let mut child = Command::new(PYTHON)
            .arg(&script)
            .arg(port.to_string())
            .arg(path)
            .arg(total.to_string())
            .arg(concurrency.to_string())
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {describe}: {e}"));
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let (tx, output) = mpsc::channel();
        // Both pipes are read to EOF off the test thread, so neither can fill up and block load.py.
        thread::spawn(move || {
            let err = thread::spawn(move || {
                let mut s = String::new();
                let _ = stderr.read_to_string(&mut s);
                s
            });
            let mut out = String::new();
            let _ = stdout.read_to_string(&mut out);
            let err = err.join().unwrap_or_default();
            let _ = tx.send(if err.is_empty() {
                out
            } else {
                format!("{out}\n--- load.py stderr ---\n{err}")
            });
        });
        Load {
            child: Some(child),
            output,
            describe,
        }
    }

    /// Whether load.py is still sending requests.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Waits (bounded) for load.py to finish and parses its JSON line; panics if it hangs or prints nonsense.
    pub fn finish(mut self, timeout: Duration) -> LoadResult {
        let text = match self.output.recv_timeout(timeout) {
            Ok(text) => text,
            Err(_) => panic!("{} did not finish within {timeout:?}", self.describe),
        };
        let mut child = self.child.take().expect("finish is called once");
        let status = child.wait().expect("reap load.py");
        assert!(status.success(), "{} failed ({status}):\n{text}", self.describe);
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with('{'))
            .unwrap_or_else(|| panic!("{} printed no JSON line:\n{text}", self.describe));
        let value = parse_json(line).unwrap_or_else(|e| panic!("{}: bad JSON ({e}): {line}", self.describe));
        let int = |k: &str| {
            value
                .get(k)
                .and_then(Json::as_u64)
                .unwrap_or_else(|| panic!("no {k:?} in {line}"))
        };
        let map = |k: &str| -> BTreeMap<String, u64> {
            match value.get(k) {
                Some(Json::Object(m)) => m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_u64()?))).collect(),
                _ => panic!("no object {k:?} in {line}"),
            }
        };
        let errors = match value.get("errors") {
            Some(Json::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Json::String(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .collect(),
            _ => panic!("no array \"errors\" in {line}"),
        };
        LoadResult {
            ok: int("ok"),
            failed: int("failed"),
            statuses: map("statuses"),
            errors,
            bodies: map("bodies"),
            elapsed_s: elapsed_s(line).unwrap_or_else(|| panic!("no number \"elapsed_s\" in {line}")),
            raw: line.to_owned(),
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Writes `lifecycle_version.py` (imported by lifecycle_app at import time) into `dir`.
pub fn write_version_module(dir: &Path, version: &str) -> PathBuf {
    let path = dir.join("lifecycle_version.py");
    std::fs::write(&path, format!("VERSION = {version:?}\n")).expect("write lifecycle_version.py");
    path
}

/// load.py's `"elapsed_s": S` (a float, which the test JSON reader does not read).
fn elapsed_s(line: &str) -> Option<f64> {
    let rest = &line[line.find("\"elapsed_s\":")? + "\"elapsed_s\":".len()..];
    let number: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    number.parse().ok()
}
