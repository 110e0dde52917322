//! The master process: binds the sockets once, starts workers that inherit them, supervises them, and handles
//! the operator's signals: SIGHUP rolling reload, SIGTERM graceful stop, SIGINT/SIGQUIT fast stop,
//! SIGTTIN/SIGTTOU one worker more/fewer.
//!
//! Workers are the same Python started again as `python -u -m ferrule` (fork and exec, never a bare fork of a
//! process that may hold threads) with the sockets at descriptors 3.. and a control socket after them, whose
//! first line hands them the validated settings. A worker says `ready` once its app imported, and
//! `retire REASON` when it wants a replacement; the master answers with signals.
//!
//! This file is the face of the master: `run` goes through the start-up steps in order; each step, and each
//! piece of state the supervision keeps, has its own file (see ARCHITECTURE.md).

mod backoff;
mod binding;
mod error;
mod events;
mod ids;
mod preflight;
mod reload;
mod scaling;
mod scrape;
mod sizing;
mod spawn;
mod supervise;
mod tickets;
mod watch;
mod workers;
mod zygote;

use crate::config::Config;

pub(crate) use error::MasterError;
pub(crate) use spawn::Launch;

/// Binds every socket, runs the workers until a stop signal, and removes the socket files: they go with
/// `bound`, whose drop removes them on every way out of this function, errors included.
pub(crate) fn run(config: Config, launch: Launch) -> Result<(), MasterError> {
    preflight::check_descriptor_limit(&config)?;
    let identity = preflight::Identity::resolve(&config)?;
    let mut bound = binding::Bound::bind(&config, identity.socket_owner())?;
    identity.switch_to()?;
    identity.check_tls_files(&config)?;
    preflight::check_socket_dirs_writable(&bound.sockets);
    if config.fixed.preload {
        zygote::become_subreaper()?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(MasterError::Runtime)?;
    runtime.block_on(supervise::run(config, launch, &mut bound))
}
