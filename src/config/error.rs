//! What can be wrong with the options: each error names the option (or the file and key) so the operator can
//! fix it.

use std::path::PathBuf;

/// A bad option, named so the operator can fix it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("--socket {0:?}: expected unix:/path, /abs/path, HOST:PORT or [v6]:PORT")]
    BadSocket(String),
    #[error("--socket {0:?}: a Unix socket path must be absolute")]
    RelativeUnixPath(String),
    #[error("--chdir {0}: {1}")]
    BadChdir(PathBuf, std::io::Error),
    #[error(
        "{option} {}: the path is not valid UTF-8, and the master hands the settings to its workers as UTF-8 \
         text: rename it, or give a path through a symlink whose name is UTF-8",
        path.display()
    )]
    NotUtf8Path { option: &'static str, path: PathBuf },
    #[error("--virtualenv {0}: not a virtualenv (no pyvenv.cfg)")]
    BadVirtualenv(PathBuf),
    #[error("--allow-from {0:?}: expected a network like 10.0.0.0/8, 127.0.0.1 or ::1/128")]
    BadCidr(String),
    #[error("--access-log-format: unknown field {{{field}}}; the known ones are {known}")]
    UnknownLogField { field: String, known: String },
    #[error("no APP given: name it on the command line, in FERRULE_APP, or as `app` in the config file")]
    NoApp,
    #[error("--metrics: {0}")]
    BadMetrics(Box<ConfigError>),
    #[error(
        "{0}: the metrics socket speaks plain uwsgi, not TLS: give it a Unix socket or a loopback address for \
         an nginx on the same machine, or a private address with --allow-from (see nginx/metrics.conf)"
    )]
    MetricsOverTls(String),
    #[error("config file {file}: {error}")]
    File { file: PathBuf, error: String },
    #[error("config file {file}: unknown key `{key}`")]
    UnknownKey { file: PathBuf, key: String },
    #[error("config file {file}: key `{key}`: {error}")]
    BadValue { file: PathBuf, key: String, error: String },
    #[error("--socket {0}: a tls:// socket needs --tls-cert and --tls-key")]
    TlsWithoutFiles(String),
    #[error(
        "--tls-cert, --tls-key, --tls-client-ca and --tls-ticket-rotation are for tls:// sockets, and no --socket \
         is one"
    )]
    TlsFilesWithoutSocket,
    #[error(
        "--max-workers {max} is below --workers {workers}: --workers is the fewest workers and --max-workers the \
         most; raise --max-workers or lower --workers"
    )]
    MaxWorkersBelowWorkers { max: String, workers: usize },
    #[error("{0} is for --reload: add --reload, or drop {0}")]
    WatchWithoutReload(&'static str),
    #[error("--reload-poll changes how --reload and --touch-reload watch their files, and neither is given")]
    PollWithoutWatch,
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
}
