//! What the master checks and settles before and around binding: who the workers run as (`--uid`/`--gid`),
//! the open-file limit, the socket directories it must be able to clean up, and sockets exposed beyond
//! loopback. Each check either refuses to start with an actionable error or warns once at start-up.

use crate::config::{Config, SocketSpec};
use crate::listener::BoundSocket;

use super::error::LOG;
use super::error::MasterError;

/// Who the workers run as: `--uid`/`--gid` resolved once, before binding, so the socket files ferrule creates
/// can be given to that user and group (nginx then reaches them through `--socket-mode`).
pub(super) struct Identity {
    user: Option<nix::unistd::User>,
    gid: Option<nix::unistd::Gid>,
}

fn privileges_error(what: &str, reason: String) -> MasterError {
    MasterError::Privileges {
        what: what.to_owned(),
        reason,
    }
}

impl Identity {
    pub(super) fn resolve(config: &Config) -> Result<Identity, MasterError> {
        use nix::unistd::{Gid, Group, Uid, User};
        let user = match &config.fixed.uid {
            Some(u) => {
                let found = match u.parse::<u32>() {
                    Ok(n) => User::from_uid(Uid::from_raw(n)),
                    Err(_) => User::from_name(u),
                };
                Some(
                    found
                        .map_err(|e| privileges_error(&format!("user {u}"), e.to_string()))?
                        .ok_or_else(|| privileges_error(&format!("user {u}"), "no such user".into()))?,
                )
            }
            None => None,
        };
        let gid = match &config.fixed.gid {
            Some(g) => {
                let found = match g.parse::<u32>() {
                    Ok(n) => Group::from_gid(Gid::from_raw(n)),
                    Err(_) => Group::from_name(g),
                };
                Some(
                    found
                        .map_err(|e| privileges_error(&format!("group {g}"), e.to_string()))?
                        .ok_or_else(|| privileges_error(&format!("group {g}"), "no such group".into()))?
                        .gid,
                )
            }
            None => user.as_ref().map(|u| u.gid),
        };
        Ok(Identity { user, gid })
    }

    /// The owner for socket files: only root can give a file away, and only when a user or group is set.
    pub(super) fn socket_owner(&self) -> Option<(Option<u32>, Option<u32>)> {
        let uid = self.user.as_ref().map(|u| u.uid.as_raw());
        let gid = self.gid.map(|g| g.as_raw());
        (nix::unistd::geteuid().is_root() && (uid.is_some() || gid.is_some())).then_some((uid, gid))
    }

    /// Started as root, switch to `--uid`/`--gid` now that the sockets are bound; workers inherit the identity.
    pub(super) fn switch_to(&self) -> Result<(), MasterError> {
        use nix::unistd::{getuid, setgid, setgroups, setuid};
        let fail = privileges_error;
        if !getuid().is_root() {
            if self.user.as_ref().is_some_and(|u| u.uid != getuid()) {
                return Err(fail("another user", "only root can change user".into()));
            }
            return Ok(());
        }
        let Some(gid) = self.gid else {
            tracing::warn!(target: LOG, "running as root: pass --uid and --gid so the app does not run with root's privileges");
            return Ok(());
        };
        // Group first: once the user changes, changing groups is no longer allowed.
        setgroups(&[gid]).map_err(|e| fail("supplementary groups", e.to_string()))?;
        setgid(gid).map_err(|e| fail(&format!("gid {gid}"), e.to_string()))?;
        if let Some(user) = &self.user {
            setuid(user.uid).map_err(|e| fail(&format!("user {}", user.name), e.to_string()))?;
        }
        tracing::info!(target: LOG, uid = %getuid(), gid = %gid, "dropped privileges");
        Ok(())
    }

    /// The TLS files were checked as whoever started ferrule; the workers read them as `--uid`, so once the
    /// identity is switched they are checked again as that user.
    pub(super) fn check_tls_files(&self, config: &Config) -> Result<(), MasterError> {
        let (Some(files), Some(user)) = (&config.tls.files, &self.user) else {
            return Ok(());
        };
        crate::tls::check_files(files).map_err(|error| MasterError::TlsAsUser {
            user: user.name.clone(),
            error,
        })
    }
}

/// Warns at start-up when this user cannot remove a socket file on exit (its directory is not writable), so
/// the leftover file is no surprise; the next start replaces a stale file anyway.
pub(super) fn check_socket_dirs_writable(sockets: &[BoundSocket]) {
    for socket in sockets {
        let Some((path, _)) = &socket.unix_file else { continue };
        let Some(dir) = path.parent() else { continue };
        if nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_err() {
            tracing::warn!(target: LOG,
                directory = %dir.display(),
                uid = %nix::unistd::getuid(),
                "this user cannot write the socket's directory, so the socket file will not be removed on exit; \
                 give the directory to this user (systemd: RuntimeDirectory=) to have it cleaned up"
            );
        }
    }
}

/// Warns about each socket reachable beyond loopback: the uwsgi protocol has no authentication of its own.
pub(super) fn warn_exposed(config: &Config, sockets: &[BoundSocket]) {
    let is_tls = |s: &BoundSocket| matches!(s.spec, SocketSpec::Tls(_));
    let client_ca = config.tls.files.as_ref().is_some_and(|t| t.client_ca.is_some());
    for socket in sockets.iter().filter(|s| !s.is_unix() && !is_loopback(s)) {
        let address = socket.display_addr();
        if !is_tls(socket) {
            tracing::warn!(target: LOG,
                %address,
                "listening beyond loopback: the uwsgi protocol has no authentication, so anyone who can reach \
                 this address can send requests as any client (a tls:// socket with --tls-client-ca can require \
                 nginx's certificate)"
            );
        } else if !client_ca {
            tracing::warn!(target: LOG,
                %address,
                "a tls:// socket beyond loopback without --tls-client-ca: traffic is encrypted, but any client \
                 may connect and send requests as any client; give nginx a certificate and ferrule its CA"
            );
        }
    }
}

fn is_loopback(socket: &BoundSocket) -> bool {
    socket2::SockRef::from(&socket.fd)
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .is_some_and(|a| a.ip().is_loopback())
}

/// Descriptors a worker needs besides its connections: stdio, the sockets and the control channel, one epoll per
/// app thread, the runtime's own, the log pipe and what importing Python and the app opens.
fn descriptors_needed(config: &Config, sockets: usize) -> u64 {
    const BASE: u64 = 32;
    BASE + sockets as u64 + 1 + config.workers.threads as u64 * 2
}

/// Raises the soft open-file limit to the hard limit, as servers commonly do (container and shell defaults can
/// be as low as 64 or 1024 while the hard limit allows far more); workers inherit it. Refuses to start when
/// even that leaves no room to work, and warns when --max-connections cannot be reached.
pub(super) fn check_descriptor_limit(config: &Config) -> Result<(), MasterError> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return Ok(());
    };
    let soft = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                tracing::debug!(target: LOG, from = soft, to = hard, "raised the open-file limit");
                hard
            }
            Err(_) => soft,
        }
    } else {
        soft
    };
    let sockets = config.fixed.sockets.len().max(1) + usize::from(config.fixed.metrics.is_some());
    let needed = descriptors_needed(config, sockets);
    if soft < needed + 8 {
        return Err(MasterError::DescriptorLimit {
            limit: soft,
            needed: needed + 8,
        });
    }
    let per_worker = needed + config.limits.max_connections as u64 * 2;
    if per_worker > soft {
        tracing::warn!(target: LOG,
            limit = soft,
            max_connections = config.limits.max_connections,
            workers = config.workers.count,
            "the open-file limit is too low for --max-connections: each of the workers needs up to {per_worker} \
             descriptors (a connection can take two, with a spooled body) but may open {soft}; raise the limit \
             (LimitNOFILE=, ulimit -n) or lower --max-connections to {}",
            soft.saturating_sub(needed) / 2
        );
    }
    Ok(())
}
