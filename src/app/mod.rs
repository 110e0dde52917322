//! The Python boundary: the only module that touches pyo3. It starts the interpreter, loads the app, and runs
//! requests on a pool of threads that stay attached to the interpreter and hold the GIL only while Python runs.
//!
//! The async side hands a `Job` over a channel and gets `Reply` messages back over another; no Python object
//! ever crosses to the async side.

mod errors;
mod file_wrapper;
mod input;
mod interpreter;
mod loader;
mod request;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::thread;

use pyo3::prelude::*;
use tokio::sync::mpsc;

use crate::body::Body;
use crate::config::Config;
use crate::environ::Environ;
use crate::response::Reply;

pub use loader::AppSpec;

/// One request for the pool.
pub struct Job {
    pub environ: Environ,
    pub body: Body,
    /// Where the response goes, in order; dropped by the connection when the client went away.
    pub reply: mpsc::Sender<Reply>,
    /// The request's span, entered on the app thread so its log lines carry the request's fields.
    pub span: tracing::Span,
    /// Set by the app thread that takes the job: its Python thread id, so a timed-out request's stack can be
    /// found.
    pub running_on: Arc<AtomicU64>,
}

/// Why the app could not be started.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot start the Python interpreter: {0}")]
    Interpreter(String),
    #[error("virtualenv {venv}: it was made with Python {found}, but ferrule embeds Python {embedded}")]
    VirtualenvVersion {
        venv: String,
        found: String,
        embedded: String,
    },
    #[error("invalid APP {0:?}: expected module:callable, module, path/to/file.py[:callable] or module:factory()")]
    BadSpec(String),
    #[error("cannot import the app from {target}: {error}")]
    Import { target: String, error: String },
    #[error("module {module:?} has no {tried} (name the callable: {module}:NAME)")]
    NoCallable { module: String, tried: String },
    #[error("{name} in {module:?} is not callable (it is a {kind})")]
    NotCallable { module: String, name: String, kind: String },
    #[error("the app factory {name} failed: {error}")]
    Factory { name: String, error: String },
}

/// Every app thread has stopped (they only stop when the process is going away).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the app threads have stopped")]
pub struct PoolStopped;

/// What every request thread shares.
struct Shared {
    app: Py<PyAny>,
    multithread: bool,
    multiprocess: bool,
}

/// The threads that run the app.
pub struct AppPool {
    jobs: crossbeam_channel::Sender<Job>,
    threads: usize,
}

impl AppPool {
    /// Starts the interpreter, imports the app and starts `config.threads` request threads.
    pub fn start(config: &Config) -> Result<AppPool, AppError> {
        interpreter::initialize(config)?;
        let spec = AppSpec::parse(&config.app)?;
        let app = Python::attach(|py| loader::load(py, &spec))?;
        let shared = Arc::new(Shared {
            app,
            multithread: config.threads > 1,
            multiprocess: config.workers > 1,
        });
        let (jobs, queue) = crossbeam_channel::unbounded::<Job>();
        for n in 0..config.threads {
            let shared = Arc::clone(&shared);
            let queue = queue.clone();
            thread::Builder::new()
                .name(format!("ferrule-app-{n}"))
                .spawn(move || request::run_thread(&shared, &queue))
                .map_err(|e| AppError::Interpreter(format!("cannot start app thread: {e}")))?;
        }
        Ok(AppPool {
            jobs,
            threads: config.threads,
        })
    }

    /// Queues a request; fails only if every app thread has stopped.
    pub fn submit(&self, job: Job) -> Result<(), PoolStopped> {
        self.jobs.send(job).map_err(|_| PoolStopped)
    }

    /// Requests queued but not yet picked up by a thread.
    pub fn queued(&self) -> usize {
        self.jobs.len()
    }

    pub fn threads(&self) -> usize {
        self.threads
    }
}

/// The current Python stack of the thread with this `threading.get_ident()`, formatted like a traceback.
pub fn python_stack(thread_ident: u64) -> Option<String> {
    Python::attach(|py| -> PyResult<Option<String>> {
        let frames = py.import("sys")?.call_method0("_current_frames")?;
        let Ok(frame) = frames.get_item(thread_ident) else {
            return Ok(None);
        };
        let lines: Vec<String> = py
            .import("traceback")?
            .call_method1("format_stack", (frame,))?
            .extract()?;
        Ok(Some(lines.concat().trim_end().to_owned()))
    })
    .ok()
    .flatten()
}

/// Runs the app's `atexit` handlers before a worker exits. The interpreter itself is not finalised (the app
/// threads are parked inside it), so this is where an app's clean-up at exit gets to run.
pub fn run_exit_handlers() {
    Python::attach(|py| {
        if let Err(e) = py.import("atexit").and_then(|m| m.call_method0("_run_exitfuncs")) {
            tracing::error!(traceback = %errors::format_exception(py, &e), "atexit handlers failed");
        }
    });
}
