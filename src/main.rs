//! The `ferrule` command: read options, set up logging, then run as the master or (when the master started
//! this process) as a worker; exit codes.

use std::io::IsTerminal;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

use ferrule::config::{self, Config, LogFormat, Options};
use ferrule::{master, worker};

fn main() -> ExitCode {
    // A worker takes its settings from the master, already validated, never from argv, environment or file.
    if let Some(id) = worker::worker_id() {
        return run_worker(id);
    }
    let options = match config::load_options(std::env::args_os().collect()) {
        Ok(o) => o,
        Err(e) => {
            // Logging is not set up yet: the options that configure it are what failed.
            eprintln!("ferrule: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(msg) = init_logging(&options.log_level, options.log_format, false) {
        eprintln!("ferrule: {msg}");
        return ExitCode::from(2);
    }
    if options.check_config {
        return check_config(options);
    }
    let result = Config::from_options(options)
        .map_err(anyhow::Error::from)
        .and_then(|config| master::run(config).map_err(anyhow::Error::from));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_worker(id: u32) -> ExitCode {
    let handoff = match worker::Handoff::receive() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("ferrule: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(msg) = init_logging(&handoff.config.log_level, handoff.config.log_format, true) {
        eprintln!("ferrule: {msg}");
        return ExitCode::from(2);
    }
    match worker::run(handoff, id) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(level: &str, format: LogFormat, in_worker: bool) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => EnvFilter::try_new(spec),
        _ => EnvFilter::try_new(level),
    }
    .map_err(|e| format!("invalid log level {level:?}: {e}"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .init(),
        // One JSON object per line: serde escapes whatever a request put in a path, a header or a traceback,
        // and in a worker what the app prints is wrapped too.
        LogFormat::Json => {
            let builder = builder.json().flatten_event(true).with_current_span(true);
            if in_worker {
                let stderr = worker::capture_app_output().map_err(|e| format!("cannot capture app output: {e}"))?;
                builder.with_writer(std::sync::Arc::new(stderr)).init();
            } else {
                builder.with_writer(std::io::stderr).init();
            }
        }
    }
    Ok(())
}

/// `--check-config`: validate, import the app as a worker would (so an import error shows now, not at the
/// first start), then print the effective settings as TOML.
fn check_config(mut options: Options) -> ExitCode {
    options.sockets = options.effective_sockets();
    let shown = toml::to_string(&options);
    let config = match Config::from_options(options) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ferrule: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(error) = ferrule::app::check_app_loads(&config) {
        tracing::error!("{error}");
        return ExitCode::from(2);
    }
    match shown {
        Ok(text) => print!("{text}"),
        Err(e) => eprintln!("ferrule: cannot print the configuration: {e}"),
    }
    ExitCode::SUCCESS
}
