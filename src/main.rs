//! The `ferrule` command: parse options, set up logging, start the app and serve; exit codes.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use ferrule::app::AppPool;
use ferrule::config::{Config, Options};
use ferrule::connection::ConnShared;
use ferrule::listener;

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
    let config = Arc::new(Config::from_options(options)?);
    if config.workers > 1 {
        tracing::warn!(
            workers = config.workers,
            "--workers is not supported yet; serving from one process"
        );
    }
    let mut sockets = Vec::with_capacity(config.sockets.len());
    for spec in &config.sockets {
        let bound = match listener::bind(spec, config.socket_mode, config.listen_backlog) {
            Ok(b) => b,
            Err(e) => {
                sockets.iter().for_each(listener::BoundSocket::remove_file);
                return Err(e.into());
            }
        };
        tracing::info!(address = %bound.display_addr(), "listening");
        sockets.push(bound);
    }
    let pool = match AppPool::start(&config) {
        Ok(pool) => pool,
        Err(e) => {
            sockets.iter().for_each(listener::BoundSocket::remove_file);
            return Err(e.into());
        }
    };
    let shared = Arc::new(ConnShared {
        config: Arc::clone(&config),
        pool: Arc::new(pool),
    });
    // One thread for all I/O: Python runs on the pool, so the async side is mostly syscalls and a second
    // runtime thread would only compete with the app threads for the same cores.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(ferrule::server::run(sockets, shared))?;
    // The app threads are parked waiting for work; end the process without finalising the interpreter under them.
    std::process::exit(0);
}
