//! SIGHUP's configuration: read again as the command line, environment and file now give it, and taken as
//! `Config::reloaded` says: what was bound or set up before the workers started keeps its value until a restart
//! (a change to it is logged); an invalid configuration is refused whole.

use std::ffi::OsString;

use crate::config::{self, Config, ConfigError};

use super::error::LOG;

/// The configuration a reload applies; logs each option that changed but takes a restart.
pub(super) fn reread(argv: &[OsString], old: &Config) -> Result<Config, ConfigError> {
    let options = config::load_options(argv.to_vec())?;
    let (new, needs_restart) = old.reloaded(Config::from_options(options)?)?;
    for option in needs_restart {
        tracing::warn!(target: LOG,
            option,
            "this option changed, but it takes a restart to apply; keeping its current value"
        );
    }
    Ok(new)
}
