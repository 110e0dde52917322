//! The `ferrule` command: read options, set up logging, then run as the master or (when the master started
//! this process) as a worker; exit codes.

use std::io::IsTerminal;
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

use ferrule::config::{self, Config, LogFormat, Options};
use ferrule::{master, worker};

fn main() -> ExitCode {
    let options = match config::load_options(std::env::args_os().collect()) {
        Ok(o) => o,
        Err(e) => {
            // Logging is not set up yet: the options that configure it are what failed.
            eprintln!("ferrule: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(msg) = init_logging(&options) {
        eprintln!("ferrule: {msg}");
        return ExitCode::from(2);
    }
    if options.check_config {
        return check_config(options);
    }
    match run(options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(options: &Options) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => EnvFilter::try_new(spec),
        _ => EnvFilter::try_new(&options.log_level),
    }
    .map_err(|e| format!("invalid log level {:?}: {e}", options.log_level))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match options.log_format {
        LogFormat::Text => builder
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .init(),
        // One JSON object per line: serde escapes whatever a request put in a path, a header or a traceback,
        // and in a worker what the app prints is wrapped too.
        LogFormat::Json => {
            let builder = builder.json().flatten_event(true).with_current_span(true);
            if std::env::var_os(worker::ENV_WORKER_ID).is_some() {
                let stderr = worker::capture_app_output().map_err(|e| format!("cannot capture app output: {e}"))?;
                builder.with_writer(std::sync::Arc::new(stderr)).init();
            } else {
                builder.with_writer(std::io::stderr).init();
            }
        }
    }
    Ok(())
}

/// `--check-config`: validate, then print the effective settings as TOML.
fn check_config(options: Options) -> ExitCode {
    let shown = toml::to_string(&options);
    match Config::from_options(options) {
        Ok(_) => {
            match shown {
                Ok(text) => print!("{text}"),
                Err(e) => eprintln!("ferrule: cannot print the configuration: {e}"),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferrule: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(options: Options) -> anyhow::Result<()> {
    let config = Config::from_options(options)?;
    match std::env::var(worker::ENV_WORKER_ID)
        .ok()
        .and_then(|id| id.parse::<u32>().ok())
    {
        Some(id) => worker::run(config, id)?,
        None => master::run(config)?,
    }
    Ok(())
}
