//! The `ferrule` command: parse options, set up logging, start the app and serve; exit codes.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use ferrule::config::{Config, Options};
use ferrule::{master, worker};

fn main() -> ExitCode {
    let options = Options::parse();
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => EnvFilter::try_new(spec),
        _ => EnvFilter::try_new(&options.log_level),
    };
    let filter = match filter {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ferrule: invalid log level {:?}: {e}", options.log_level);
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    match run(options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
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
