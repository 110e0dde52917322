//! The Python boundary: the only module that touches pyo3 (besides the entry module Python calls). It prepares
//! the interpreter, loads the app, and runs requests on a pool of threads that stay attached to the interpreter
//! and hold the GIL only while Python runs.
//!
//! Loading ([`App::load`]) and starting the threads ([`App::start_threads`]) are separate steps, so a process
//! can import the app once and fork before any thread exists. Each app thread takes its requests from a
//! [`RequestSource`] and writes the response through the request's [`ResponseSink`]; both are interfaces this
//! layer defines and the connection implements. No Python object ever leaves these threads.

mod app_error;
mod errors;
mod file_wrapper;
mod input;
mod interpreter;
mod loader;
mod watched;
mod request;
mod sink;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;

use pyo3::prelude::*;

use crate::config::Config;
use request::AppState;

pub(crate) use app_error::AppError;
pub(crate) use sink::{Gone, Request, RequestSource, ResponseSink};
pub(crate) use watched::imported_files;

/// The loaded app, before and after its threads start.
pub(crate) struct App {
    state: Arc<AppState>,
    threads: usize,
}

impl App {
    /// Prepares the interpreter and imports the app. No thread is started: that is [`App::start_threads`].
    pub(crate) fn load(config: &Config) -> Result<App, AppError> {
        interpreter::initialize(config)?;
        let spec = loader::AppSpec::parse(&config.app.callable)?;
        let app = Python::attach(|py| loader::load(py, &spec))?;
        Ok(App {
            state: Arc::new(AppState {
                app,
                multithread: config.workers.threads > 1,
                multiprocess: config.workers.count > 1,
            }),
            threads: config.workers.threads,
        })
    }

    /// Under `--reload`, in place of an app that did not import: answers every request with 503 and says why.
    pub(crate) fn unavailable(config: &Config) -> Result<App, AppError> {
        Ok(App {
            state: Arc::new(AppState {
                app: watched::unavailable_app()?,
                multithread: config.workers.threads > 1,
                multiprocess: config.workers.count > 1,
            }),
            threads: config.workers.threads,
        })
    }

    /// Starts one app thread per source; each runs requests from its source until the source ends or the
    /// process does.
    pub(crate) fn start_threads(&self, sources: Vec<Box<dyn RequestSource>>) -> std::io::Result<()> {
        let stack_size = app_thread_stack_size();
        for (n, source) in sources.into_iter().enumerate() {
            let state = Arc::clone(&self.state);
            thread::Builder::new()
                .name(format!("ferrule-app-{n}"))
                .stack_size(stack_size)
                .spawn(move || request::run_thread(&state, source))?;
        }
        Ok(())
    }

    /// How many app threads to start (`--threads`).
    pub(crate) fn threads(&self) -> usize {
        self.threads
    }
}

impl App {
    /// `wsgi.multiprocess` for a worker forked from a preloaded app, which learns the worker count only then.
    /// Call before the threads start.
    pub(crate) fn set_multiprocess(&mut self, multiprocess: bool) {
        if let Some(state) = Arc::get_mut(&mut self.state) {
            state.multiprocess = multiprocess;
        }
    }

    /// Readies the loaded app to be shared by forked workers: `gc.collect()` clears the garbage the import left
    /// (the collector moves nothing, so this is not to compact but so garbage is not kept for good), then
    /// `gc.freeze()` moves every object into the permanent generation, so a worker's garbage collector never
    /// walks them and never writes to (and so copies) the pages they live on.
    pub(crate) fn freeze(&self) -> Result<(), AppError> {
        Python::attach(|py| -> PyResult<()> {
            let gc = py.import("gc")?;
            gc.call_method0("collect")?;
            gc.call_method0("freeze")?;
            Ok(())
        })
        .map_err(|e| AppError::Interpreter(format!("cannot freeze the preloaded objects: {e}")))
    }
}

/// Forks this process the way `os.fork()` does, so Python's fork hooks run: `os.register_at_fork` handlers
/// (`random` reseeds, `logging` renews its locks) and CPython's own reinitialisation of the child. Returns
/// `None` in the child and the child's pid in the parent. The caller must be the only thread.
pub(crate) fn fork_process() -> std::io::Result<Option<u32>> {
    let pid = Python::attach(|py| -> PyResult<i64> { py.import("os")?.call_method0("fork")?.extract() })
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(match pid {
        0 => None,
        pid => Some(u32::try_from(pid).map_err(|_| std::io::Error::other("os.fork() returned a bad pid"))?),
    })
}

/// After the app failed to load under `--reload`: what to watch for the edit that fixes it: the files imported
/// before the failure, those of its traceback, and the app module's own file.
pub(crate) fn files_after_failure(config: &Config, error: &AppError) -> Vec<PathBuf> {
    let mut files: BTreeSet<PathBuf> = watched::imported_files().into_iter().collect();
    if let AppError::Import { files: involved, .. } = error {
        files.extend(involved.iter().cloned());
    }
    match loader::AppSpec::parse(&config.app.callable).map(|spec| spec.source) {
        Ok(loader::Source::File(path)) => files.extend(std::path::absolute(path)),
        Ok(loader::Source::Module(name)) => files.extend(watched::module_file(&name)),
        Err(_) => {}
    }
    files.into_iter().collect()
}

/// `--check-config`: prepares the interpreter and imports the app exactly as a worker would, without serving.
pub(crate) fn check_app_loads(config: &Config) -> Result<(), AppError> {
    App::load(config).map(drop)
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
pub(crate) fn python_stack(thread_ident: u64) -> Option<String> {
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
pub(crate) fn run_exit_handlers() {
    Python::attach(|py| {
        if let Err(e) = py.import("atexit").and_then(|m| m.call_method0("_run_exitfuncs")) {
            tracing::error!(traceback = %errors::format_exception(py, &e), "atexit handlers failed");
        }
    });
}
