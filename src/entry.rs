//! The entry point Python calls: `ferrule._ferrule.main(sys.argv)`, behind the `ferrule` command and
//! `python -m ferrule`. Reads the options, sets up logging, then runs the master or (when a master started this
//! process) a worker, and ends the process with its exit status: it never returns into Python, which would
//! finalise the interpreter under the app threads. Besides `app`, the one module that touches pyo3.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;

use pyo3::prelude::*;
use tracing_subscriber::EnvFilter;

use crate::config::{self, Config, LogFormat, Options};
use crate::control::{self, Handoff};
use crate::log_scope::Deferring;
use crate::master::{self, Launch};
use crate::{preload, worker};

/// Exit status for a bad command line or configuration, as clap uses.
const EXIT_USAGE: i32 = 2;
/// Exit status after a panic (what Rust itself uses when a panic ends `main`).
const EXIT_PANIC: i32 = 101;

#[pymodule]
#[pyo3(name = "_ferrule")]
fn extension_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(main, m)?)?;
    Ok(())
}

/// Runs ferrule with this command line (`sys.argv`) and exits the process.
#[pyfunction]
fn main(py: Python<'_>, argv: Vec<OsString>) -> PyResult<()> {
    // The venv's interpreter as it was started (`sys.executable` keeps the venv's bin/python; resolving the
    // symlink would lose the venv): workers are started with it.
    let python: PathBuf = py.import("sys")?.getattr("executable")?.extract()?;
    // Everything below runs without the GIL: app threads take it when they run Python. A panic ends the
    // process here (the hook has printed it): back in Python, the interpreter's shutdown would wait for the
    // app's non-daemon threads, for ever.
    let code = py.detach(move || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(argv, python))).unwrap_or(EXIT_PANIC)
    });
    std::process::exit(code)
}

fn run(mut argv: Vec<OsString>, python: PathBuf) -> i32 {
    // A worker takes its settings from the master, already validated, never from argv, environment or file.
    if let Some(id) = control::worker_id() {
        return run_worker(id);
    }
    if control::is_zygote() {
        return run_zygote();
    }
    // argv[0] is the script or __main__.py: usage and errors say `ferrule`.
    match argv.first_mut() {
        Some(first) => *first = OsString::from("ferrule"),
        None => argv.push(OsString::from("ferrule")),
    }
    let options = match config::load_options(argv.clone()) {
        Ok(o) => o,
        Err(e) => {
            // Logging is not set up yet: the options that configure it are what failed.
            eprintln!("ferrule: {e}");
            return EXIT_USAGE;
        }
    };
    if let Err(msg) = init_logging(&options.log_level, options.log_format, Role::Master) {
        eprintln!("ferrule: {msg}");
        return EXIT_USAGE;
    }
    if options.check_config {
        return check_config(options);
    }
    let launch = Launch {
        argv,
        worker_program: python,
        worker_args: ["-u", "-m", "ferrule"].map(OsString::from).to_vec(),
    };
    let result = Config::from_options(options)
        .map_err(anyhow::Error::from)
        .and_then(|config| master::run(config, launch).map_err(anyhow::Error::from));
    match result {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("{e:#}");
            1
        }
    }
}

fn run_worker(id: u32) -> i32 {
    let handoff = match Handoff::receive() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("ferrule: {e}");
            return EXIT_USAGE;
        }
    };
    if let Err(msg) = init_logging(
        &handoff.config.logs.log_level,
        handoff.config.logs.log_format,
        Role::Worker,
    ) {
        eprintln!("ferrule: {msg}");
        return EXIT_USAGE;
    }
    match worker::run(handoff, id) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("{e:#}");
            1
        }
    }
}

/// The `--preload` zygote: imports the app, then forks workers (see `preload`); a forked worker returns here
/// too, with its exit status.
fn run_zygote() -> i32 {
    let handoff = match Handoff::receive() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("ferrule: {e}");
            return EXIT_USAGE;
        }
    };
    let format = handoff.config.logs.log_format;
    if let Err(msg) = init_logging(&handoff.config.logs.log_level, format, Role::Zygote) {
        eprintln!("ferrule: {msg}");
        return EXIT_USAGE;
    }
    preload::run(handoff, format == LogFormat::Json)
}

/// Which process the log is for: with JSON logs, a worker wraps what the app prints into log lines with a
/// capture thread; the zygote, which must not have threads, writes its log to a copy of stderr, so the
/// workers forked from it can point stderr at their capture later.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Master,
    Worker,
    Zygote,
}

/// Makes a subscriber the process's log, wrapped so that a request's span is made only when a line is written
/// in it ([`Deferring`]).
trait Install {
    fn install(self);
}

impl<S: tracing::Subscriber + Send + Sync + 'static> Install for S {
    fn install(self) {
        use tracing_subscriber::util::SubscriberInitExt;
        Deferring::new(self).init();
    }
}

fn init_logging(level: &str, format: LogFormat, role: Role) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => EnvFilter::try_new(spec),
        _ => EnvFilter::try_new(level),
    }
    .map_err(|e| format!("invalid log level {level:?}: {e}"))?;
    // A log line that cannot be written (whoever read stderr is gone) is lost, silently: tracing-subscriber's
    // report of it would go to that same stderr with eprintln!, whose failure panics, and a worker that panics
    // on its way out hangs in Python's shutdown instead of exiting.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder
            .fmt_fields(crate::log_fields::PlainFields)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .finish()
            .install(),
        // One JSON object per line: serde escapes whatever a request put in a path, a header or a traceback,
        // and in a worker what the app prints is wrapped too.
        LogFormat::Json => {
            let builder = builder.json().flatten_event(true).with_current_span(true);
            match role {
                Role::Worker => {
                    let stderr = worker::capture_app_output().map_err(|e| format!("cannot capture app output: {e}"))?;
                    builder.with_writer(std::sync::Arc::new(stderr)).finish().install();
                }
                Role::Zygote => {
                    let stderr = nix::unistd::dup(std::io::stderr()).map_err(|e| format!("cannot copy stderr: {e}"))?;
                    builder
                        .with_writer(std::sync::Arc::new(std::fs::File::from(stderr)))
                        .finish()
                        .install();
                }
                Role::Master => builder.with_writer(std::io::stderr).finish().install(),
            }
        }
    }
    Ok(())
}

/// `--check-config`: validate, import the app as a worker would (so an import error shows now, not at the
/// first start), then print the effective settings as TOML.
fn check_config(mut options: Options) -> i32 {
    options.sockets = options.effective_sockets();
    let shown = toml::to_string(&options);
    let config = match Config::from_options(options) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ferrule: {e}");
            return EXIT_USAGE;
        }
    };
    if let Err(error) = crate::app::check_app_loads(&config) {
        tracing::error!("{error}");
        return EXIT_USAGE;
    }
    match shown.map(|text| config.workers.annotate_auto(&text)) {
        Ok(text) => {
            use std::io::Write;
            print!("{text}");
            // The process ends with exit(), which flushes nothing.
            let _ = std::io::stdout().flush();
        }
        Err(e) => eprintln!("ferrule: cannot print the configuration: {e}"),
    }
    0
}
