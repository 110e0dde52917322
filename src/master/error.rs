//! Why the master could not run: one error per start-up step that can fail, each saying what to change.

use crate::control;
use crate::listener::ListenError;

/// The target of every log line the master writes, whichever of its files writes it: the one name the master
/// has always logged under, which log filters and readers select on.
pub(super) const LOG: &str = "ferrule::master";

/// Why the master could not run.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MasterError {
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot start a worker with {program}: {error}{hint}")]
    Spawn {
        program: String,
        error: std::io::Error,
        hint: &'static str,
    },
    #[error(
        "the open-file limit is {limit} (soft and hard), too low to run: ferrule needs at least {needed} \
         descriptors for these sockets and threads (raise it with ulimit -n, LimitNOFILE= in systemd, or the \
         container's nofile ulimit)"
    )]
    DescriptorLimit { limit: u64, needed: u64 },
    #[error("the app could not be loaded (see the error above); not starting")]
    AppLoad,
    #[error(transparent)]
    Fork(#[from] control::ForkError),
    #[error("the preloaded app is not ready to fork workers from")]
    NotPreloaded,
    #[error("worker {pid} exited during start-up ({status})")]
    StartupCrash { pid: u32, status: String },
    #[error("cannot switch to {what}: {reason}")]
    Privileges { what: String, reason: String },
    #[error(
        "TLS: {error} (checked as user {user}, the --uid the workers run as: they read the certificate and key \
         themselves, at start-up and on every SIGHUP, so give that user read access, e.g. chown {user} on the \
         key with mode 600)"
    )]
    TlsAsUser { user: String, error: crate::tls::TlsError },
    #[error(
        "--preload: cannot make the master a child subreaper, which it must be to adopt the workers the \
         zygote forks: {0} (a seccomp profile or sandbox may forbid prctl; run without --preload)"
    )]
    Subreaper(std::io::Error),
    #[error("cannot start the master's async runtime: {0} (check the open-file and thread limits)")]
    Runtime(std::io::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
