//! The sockets the master binds, and the one place their files are removed: `Bound` owns every socket bound
//! for the workers and for `--metrics`, and its drop removes the Unix socket files among them, so each way
//! out of `master::run` (a stop, an error, a failed start-up step) cleans up without saying so. A graceful
//! stop turns new connections away and closes the master's copies earlier, before the workers drain
//! (`refuse_new_connections`, `close_own`).

use crate::config::{Config, SocketSpec, systemd_fds};
use crate::listener::{self, BoundSocket};

use super::error::LOG;
use super::error::MasterError;
use super::preflight;

/// Every socket the master bound; dropping it removes the socket files (see `Drop`).
pub(super) struct Bound {
    /// The workers' sockets, in the order they are placed at descriptors 3...
    pub(super) sockets: Vec<BoundSocket>,
    /// `--metrics`, served by the master itself.
    pub(super) metrics: Option<BoundSocket>,
    /// The process that bound the sockets, the only one that may remove their files (see `Drop`).
    master: nix::unistd::Pid,
}

impl Bound {
    /// Binds the workers' sockets (the configured ones, then any systemd passed), warns about those reachable
    /// beyond loopback, then binds `--metrics`. On an error, what was bound so far is removed again.
    pub(super) fn bind(config: &Config, owner: Option<(Option<u32>, Option<u32>)>) -> Result<Bound, MasterError> {
        let mut bound = Bound {
            sockets: Vec::new(),
            metrics: None,
            master: nix::unistd::getpid(),
        };
        let mut specs = config.fixed.sockets.clone();
        specs.extend(systemd_fds());
        for spec in &specs {
            let socket = listener::bind(spec, config.fixed.socket_mode, owner, config.fixed.listen_backlog)?;
            tracing::info!(target: LOG, address = %socket.display_addr(), "listening");
            bound.sockets.push(socket);
        }
        preflight::warn_exposed(config, &bound.sockets);
        if let Some(spec) = &config.fixed.metrics {
            let socket = listener::bind(spec, config.fixed.socket_mode, owner, config.fixed.listen_backlog)?;
            tracing::info!(target: LOG, address = %socket.display_addr(), "serving metrics");
            bound.metrics = Some(socket);
        }
        Ok(bound)
    }

    /// The first step of a graceful stop: turns new connections away from the sockets this master made while
    /// the workers still serve what is queued: a Unix socket's file is removed, so a new connection fails at
    /// once, and a TCP socket drops new handshakes, so its client is refused a second later (nginx then tries
    /// another server, whatever the method). A reload never does this: the sockets stay for the new workers.
    pub(super) fn refuse_new_connections(&self) {
        self.sockets.iter().for_each(BoundSocket::refuse_new_connections);
    }

    /// Closes the master's copies of the sockets it bound itself, once no other process but the workers holds
    /// them (the zygotes are gone): the last close of a listening socket resets the connections still queued
    /// on it, so the last holders must be the workers, which take every queued connection before they close
    /// theirs. Inherited sockets (systemd, `fd://`) are kept: their queue belongs to the next instance. After
    /// this no worker can be started, so only a stop calls it.
    pub(super) fn close_own(&mut self) {
        self.sockets.retain(|s| matches!(s.spec, SocketSpec::Fd(_)));
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        // Only the master removes the files. Its children are started by fork and exec (or forked by the
        // zygote, a process of its own), so none should ever return through this frame; but a forked copy of
        // this value that did unwind (a panic between fork and exec, a future change forking without exec)
        // would otherwise delete the sockets the running master still serves on.
        if nix::unistd::getpid() != self.master {
            return;
        }
        self.sockets
            .iter()
            .chain(self.metrics.as_ref())
            .for_each(BoundSocket::remove_file);
    }
}
