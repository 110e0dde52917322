//! SIGHUP's configuration: read again as the command line, environment and file now give it, and compared
//! with the running one. What was bound or set up before the workers started keeps its value until a restart
//! (a change to it is logged); an invalid configuration is refused whole.

use std::ffi::OsString;

use crate::config::{self, Config, ConfigError, SocketSpec};

use super::error::LOG;

/// The configuration as the command line, environment and file now give it. What was bound or set up before
/// the workers started (sockets, their mode and backlog, metrics address, user and group, preload) keeps its
/// current value; a change to it is logged as needing a restart.
pub(super) fn reread(argv: &[OsString], old: &Config) -> Result<Config, ConfigError> {
    let options = config::load_options(argv.to_vec())?;
    let mut new = Config::from_options(options)?;
    let fixed = [
        ("socket", new.sockets != old.sockets),
        ("socket_mode", new.socket_mode != old.socket_mode),
        ("listen_backlog", new.listen_backlog != old.listen_backlog),
        ("metrics", new.metrics != old.metrics),
        ("uid", new.uid != old.uid),
        ("gid", new.gid != old.gid),
        ("preload", new.preload != old.preload),
    ];
    for (option, changed) in fixed {
        if changed {
            tracing::warn!(target: LOG,
                option,
                "this option changed, but it takes a restart to apply; keeping its current value"
            );
        }
    }
    new.sockets.clone_from(&old.sockets);
    new.socket_mode = old.socket_mode;
    new.listen_backlog = old.listen_backlog;
    new.metrics.clone_from(&old.metrics);
    new.uid.clone_from(&old.uid);
    new.gid.clone_from(&old.gid);
    new.preload = old.preload;
    // The TLS files go with the sockets kept: a tls:// socket still needs them, and without one they serve
    // nothing (the new settings' sockets are not the ones bound).
    match (&old.tls, &new.tls) {
        (Some(_), None) => {
            let socket = old.sockets.iter().find(|s| matches!(s, SocketSpec::Tls(_)));
            return Err(ConfigError::TlsWithoutFiles(
                socket.map(ToString::to_string).unwrap_or_default(),
            ));
        }
        (None, Some(_)) => new.tls = None,
        _ => {}
    }
    Ok(new)
}
