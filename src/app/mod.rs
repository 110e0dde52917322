//! The Python boundary: the only module that touches pyo3. It starts the interpreter, loads the app, and runs
//! requests on a pool of threads that stay attached to the interpreter and hold the GIL only while Python runs.
//!
//! Each app thread takes its requests from a [`JobSource`] (the server's accept loop) and writes the response
//! through the request's `Responder`; no Python object ever leaves these threads.

mod errors;
mod file_wrapper;
mod input;
mod interpreter;
mod loader;
mod request;

use std::sync::Arc;
use std::thread;

use pyo3::prelude::*;

use crate::body::Body;
use crate::config::Config;
use crate::connection::Responder;
use crate::environ::Environ;

pub use loader::AppSpec;

/// One request for an app thread.
pub struct Job {
    pub environ: Environ,
    pub body: Body,
    /// Writes the response to the request's connection.
    pub responder: Responder,
    /// The request's span, entered on the app thread so its log lines carry the request's fields.
    pub span: tracing::Span,
}

/// Where an app thread gets its requests.
pub trait JobSource: Send {
    /// The next request to run, waiting for one as long as it takes. Called without the GIL.
    fn next(&mut self) -> Option<Job>;
}

/// Why the app could not be started.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot prepare Python for the app: {0}")]
    Interpreter(String),
    #[error(
        "virtualenv {venv} was made with Python {found}, but ferrule runs on Python {running} ({executable}): \
         install ferrule into that venv (pip install ferrule) and run its bin/ferrule, or make the venv with \
         Python {running}"
    )]
    VirtualenvVersion {
        venv: String,
        found: String,
        running: String,
        executable: String,
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

/// What every request thread shares.
struct Shared {
    app: Py<PyAny>,
    multithread: bool,
    multiprocess: bool,
}

/// The loaded app and the threads that run it.
pub struct AppPool {
    shared: Arc<Shared>,
    threads: usize,
}

impl AppPool {
    /// Starts the interpreter and imports the app; the threads start with [`AppPool::run`].
    pub fn start(config: &Config) -> Result<AppPool, AppError> {
        interpreter::initialize(config)?;
        let spec = AppSpec::parse(&config.app)?;
        let app = Python::attach(|py| loader::load(py, &spec))?;
        let shared = Arc::new(Shared {
            app,
            multithread: config.threads > 1,
            multiprocess: config.workers > 1,
        });
        Ok(AppPool {
            shared,
            threads: config.threads,
        })
    }

    /// Starts one app thread per source; each runs requests from its source until the process ends.
    pub fn run(&self, sources: Vec<Box<dyn JobSource>>) -> std::io::Result<()> {
        let stack_size = app_thread_stack_size();
        for (n, source) in sources.into_iter().enumerate() {
            let shared = Arc::clone(&self.shared);
            thread::Builder::new()
                .name(format!("ferrule-app-{n}"))
                .stack_size(stack_size)
                .spawn(move || request::run_thread(&shared, source))?;
        }
        Ok(())
    }

    pub fn threads(&self) -> usize {
        self.threads
    }
}

/// `--check-config`: starts the interpreter and imports the app exactly as a worker would, without serving.
pub fn check_app_loads(config: &Config) -> Result<(), AppError> {
    AppPool::start(config).map(drop)
}

/// The stack an app thread gets: what a process's main thread gets (`RLIMIT_STACK`, 8 MiB by default), since
/// Python code that recurses through C (`map`, `sorted` with a key, C extensions) uses the C stack, and an
/// overflow kills the whole worker; uWSGI runs apps on a main thread and serves such recursion 10000 deep.
/// Untouched stack pages cost no memory. Unlimited falls back to 8 MiB; below 2 MiB (the Rust default) or above 1 GiB it is clamped.
fn app_thread_stack_size() -> usize {
    const DEFAULT: usize = 8 << 20;
    const MAX: usize = 1 << 30;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_STACK, &mut limit) } != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
        return DEFAULT;
    }
    usize::try_from(limit.rlim_cur).map_or(DEFAULT, |n| n.clamp(2 << 20, MAX))
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
