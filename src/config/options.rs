//! The options as the operator gives them: the command-line definition (clap), which also reads the
//! `FERRULE_*` variables, the checks that need no other option, and the defaults that depend on the
//! environment (the activated venv, systemd's sockets).

use std::path::PathBuf;

use clap::Parser;
use clap::builder::BoolishValueParser;

use super::error::ConfigError;
use super::socket::{DEFAULT_SOCKET, systemd_fds};
use super::workers::WorkerCount;

/// Serve a Python WSGI app to nginx over the uwsgi protocol.
///
/// Every option can also come from an environment variable (FERRULE_ and the option's name, e.g.
/// FERRULE_WORKERS=4) or from a TOML file given with --config (keys are the option names, e.g. `workers = 4`,
/// `socket = ["unix:/run/app.sock"]`, `app = "mysite.wsgi"`). The command line wins over the environment,
/// which wins over the file.
#[derive(Debug, Parser, serde::Serialize)]
#[command(name = "ferrule", version, about, max_term_width = 110)]
pub(crate) struct Options {
    /// The WSGI app: `package.module:callable`, `module` (callable `application`, then `app`),
    /// `path/to/file.py[:callable]`, or a factory `module:create_app()`
    #[arg(value_name = "APP", env = "FERRULE_APP")]
    pub(crate) app: Option<String>,

    /// TOML file with options (see above)
    #[arg(short = 'c', long, value_name = "FILE", env = "FERRULE_CONFIG")]
    #[serde(skip)]
    pub(crate) config: Option<PathBuf>,

    /// Validate the configuration and import the app, print the effective settings and exit
    #[arg(long)]
    #[serde(skip)]
    pub(crate) check_config: bool,

    /// Where to listen (repeatable): `unix:/path`, `/abs/path`, `HOST:PORT`, `[v6]:PORT` or an inherited
    /// `fd://N` [default: 127.0.0.1:3031, or the sockets systemd passes in LISTEN_FDS]
    #[arg(
        short = 'b',
        long = "socket",
        visible_alias = "bind",
        value_name = "ADDR",
        env = "FERRULE_SOCKET",
        value_delimiter = ','
    )]
    #[serde(rename = "socket")]
    pub(crate) sockets: Vec<String>,

    /// File mode of Unix sockets, in octal (nginx usually runs as another user: 660 with a shared group)
    #[arg(long, visible_alias = "chmod-socket", value_name = "OCTAL", env = "FERRULE_SOCKET_MODE",
          value_parser = parse_octal_mode)]
    #[serde(serialize_with = "octal")]
    pub(crate) socket_mode: Option<u32>,

    /// Threads that run the app in each worker
    #[arg(long, value_name = "N", env = "FERRULE_THREADS", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub(crate) threads: u32,

    /// Worker processes, supervised by a master process that holds the sockets; `auto`: one per CPU this
    /// process may use (affinity, cpuset, CPU quota). With --max-workers, the fewest
    #[arg(short = 'w', long, visible_alias = "processes", value_name = "N|auto", env = "FERRULE_WORKERS",
          default_value = "1", value_parser = WorkerCount::parse)]
    pub(crate) workers: WorkerCount,

    /// Add workers while requests wait, one at a time, up to this many (N or auto); retire them when idle
    #[arg(long, value_name = "M|auto", env = "FERRULE_MAX_WORKERS", value_parser = WorkerCount::parse)]
    pub(crate) max_workers: Option<WorkerCount>,

    /// With --max-workers: seconds requests must wait (every app thread busy, or a TCP listen queue) before a
    /// worker is added
    #[arg(long, value_name = "SECS", env = "FERRULE_SCALE_UP_AFTER", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub(crate) scale_up_after: u64,

    /// With --max-workers: seconds with a worker's worth of idle app threads before the newest worker is
    /// retired, and between two retirements
    #[arg(long, value_name = "SECS", env = "FERRULE_SCALE_DOWN_AFTER", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub(crate) scale_down_after: u64,

    /// Change to this directory before loading the app
    #[arg(long, value_name = "DIR", env = "FERRULE_CHDIR")]
    pub(crate) chdir: Option<PathBuf>,

    /// Add a directory to the front of sys.path (repeatable)
    #[arg(long, value_name = "DIR", env = "FERRULE_PYTHONPATH", value_delimiter = ',')]
    pub(crate) pythonpath: Vec<PathBuf>,

    /// Virtualenv whose packages the app imports [default: $VIRTUAL_ENV]
    #[arg(long, value_name = "DIR", env = "FERRULE_VIRTUALENV")]
    pub(crate) virtualenv: Option<PathBuf>,

    /// Largest uwsgi vars block accepted, in bytes (the protocol's maximum is 65535)
    #[arg(long, value_name = "BYTES", env = "FERRULE_BUFFER_SIZE", default_value_t = 65535,
          value_parser = clap::value_parser!(u32).range(64..=65535))]
    pub(crate) buffer_size: u32,

    /// Request bodies larger than this are spooled to a temporary file instead of memory
    #[arg(long, value_name = "BYTES", env = "FERRULE_BODY_BUFFER_SIZE", default_value_t = 1 << 20)]
    pub(crate) body_buffer_size: u64,

    /// Seconds a peer may take to send its whole request before it is dropped
    #[arg(long, value_name = "SECS", env = "FERRULE_READ_TIMEOUT", default_value_t = 30)]
    pub(crate) read_timeout: u64,

    /// Seconds a peer may take nothing of the response before it is dropped [default: --read-timeout]
    #[arg(long, value_name = "SECS", env = "FERRULE_WRITE_TIMEOUT")]
    pub(crate) write_timeout: Option<u64>,

    /// Largest request body accepted, in bytes; a larger CONTENT_LENGTH gets 413 before the app runs (0: no limit)
    #[arg(long, value_name = "BYTES", env = "FERRULE_MAX_BODY_SIZE", default_value_t = 0)]
    pub(crate) max_body_size: u64,

    /// Connections one worker serves at once; more wait in the listen queue
    #[arg(long, value_name = "N", env = "FERRULE_MAX_CONNECTIONS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) max_connections: u32,

    /// Accept TCP connections only from these networks (comma-separated CIDRs, repeatable)
    #[arg(long, value_name = "CIDR,...", env = "FERRULE_ALLOW_FROM", value_delimiter = ',')]
    pub(crate) allow_from: Vec<String>,

    /// Run as this user (name or uid) after binding the sockets, when started as root
    #[arg(long, value_name = "USER", env = "FERRULE_UID")]
    pub(crate) uid: Option<String>,

    /// Run as this group (name or gid) after binding the sockets, when started as root
    #[arg(long, value_name = "GROUP", env = "FERRULE_GID")]
    pub(crate) gid: Option<String>,

    /// Seconds in-flight requests get to finish on SIGTERM
    #[arg(long, value_name = "SECS", env = "FERRULE_GRACEFUL_TIMEOUT", default_value_t = 30)]
    pub(crate) graceful_timeout: u64,

    /// Seconds a request may run before it is answered with 504 and its worker replaced (0: no limit)
    #[arg(short = 't', long, value_name = "SECS", env = "FERRULE_TIMEOUT", default_value_t = 0)]
    pub(crate) timeout: u64,

    /// Replace a worker after it served this many requests (0: never)
    #[arg(long, value_name = "N", env = "FERRULE_MAX_REQUESTS", default_value_t = 0)]
    pub(crate) max_requests: u64,

    /// Add a random 0..=M to --max-requests per worker, so workers do not all restart at once
    #[arg(long, value_name = "M", env = "FERRULE_MAX_REQUESTS_JITTER", default_value_t = 0)]
    pub(crate) max_requests_jitter: u64,

    /// Replace a worker whose resident memory passes this many MiB after a request (0: never); with --preload,
    /// its private memory (what it does not share with the preloaded app)
    #[arg(long, value_name = "MIB", env = "FERRULE_RELOAD_ON_RSS", default_value_t = 0)]
    pub(crate) reload_on_rss: u64,

    /// Import the app once, then fork the workers from it, so they share its memory (gc.freeze()d first)
    #[arg(long, env = "FERRULE_PRELOAD", value_parser = BoolishValueParser::new())]
    pub(crate) preload: bool,

    /// Development: reload (as SIGHUP does) when a Python file the app imported from outside the standard
    /// library and site-packages, the --config file or a --reload-extra-file changes; an app that does not
    /// import answers 503 until an edit fixes it
    #[arg(long, env = "FERRULE_RELOAD", value_parser = BoolishValueParser::new())]
    pub(crate) reload: bool,

    /// Another file whose change reloads under --reload (repeatable: templates, data the app reads at import)
    #[arg(long, value_name = "FILE", env = "FERRULE_RELOAD_EXTRA_FILE", value_delimiter = ',')]
    pub(crate) reload_extra_file: Vec<PathBuf>,

    /// Watch the files of --reload and --touch-reload by looking at them every second instead of inotify
    /// (NFS, a bind mount from another OS: where inotify sees no change)
    #[arg(long, env = "FERRULE_RELOAD_POLL", value_parser = BoolishValueParser::new())]
    pub(crate) reload_poll: bool,

    /// Reload (as SIGHUP does) when this file's modification time changes, or it is replaced (a rename, a
    /// symlink swap); it and its directory may not exist yet (repeatable)
    #[arg(long, value_name = "FILE", env = "FERRULE_TOUCH_RELOAD", value_delimiter = ',')]
    pub(crate) touch_reload: Vec<PathBuf>,

    /// Length of the listen queue of each socket
    #[arg(long, value_name = "N", env = "FERRULE_LISTEN_BACKLOG", default_value_t = 4096)]
    pub(crate) listen_backlog: i32,

    /// Certificate for tls:// sockets: PEM, the server's first, then its chain
    #[arg(long, value_name = "FILE", env = "FERRULE_TLS_CERT")]
    pub(crate) tls_cert: Option<PathBuf>,

    /// Private key for tls:// sockets: PEM (PKCS#8, PKCS#1 RSA or SEC1 EC), readable by the --uid user
    #[arg(long, value_name = "FILE", env = "FERRULE_TLS_KEY")]
    pub(crate) tls_key: Option<PathBuf>,

    /// On tls:// sockets, require a client certificate from one of these CAs (PEM)
    #[arg(long, value_name = "FILE", env = "FERRULE_TLS_CLIENT_CA")]
    pub(crate) tls_client_ca: Option<PathBuf>,

    /// On tls:// sockets, replace the session-ticket keys every SECS seconds (a ticket opens for up to twice
    /// that) [default: 21600]
    #[arg(long, value_name = "SECS", env = "FERRULE_TLS_TICKET_ROTATION",
          value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub(crate) tls_ticket_rotation: Option<u64>,

    /// Serve Prometheus metrics on this address (uwsgi protocol, like the app; expose it through nginx)
    #[arg(long, value_name = "ADDR", env = "FERRULE_METRICS")]
    pub(crate) metrics: Option<String>,

    /// Log one line per request
    #[arg(long, env = "FERRULE_ACCESS_LOG", value_parser = BoolishValueParser::new())]
    pub(crate) access_log: bool,

    /// Text access-log line, with {method} {path} {status} {bytes} {duration_us} {pid} {request_id} {remote_addr}
    #[arg(long, value_name = "FORMAT", env = "FERRULE_ACCESS_LOG_FORMAT")]
    pub(crate) access_log_format: Option<String>,

    /// Log format: human-readable text or one JSON object per line
    #[arg(long, value_name = "FORMAT", env = "FERRULE_LOG_FORMAT", default_value = "text")]
    pub(crate) log_format: LogFormat,

    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it
    #[arg(long, value_name = "LEVEL", env = "FERRULE_LOG_LEVEL", default_value = "info")]
    pub(crate) log_level: String,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    Text,
    Json,
}

fn octal<S: serde::Serializer>(mode: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
    match mode {
        Some(m) => s.serialize_str(&format!("{m:o}")),
        None => s.serialize_none(),
    }
}

fn parse_octal_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(format!("{s:?} is not an octal file mode like 660")),
    }
}

/// The `{field}`s a text access-log line may use.
const ACCESS_LOG_FIELDS: [&str; 8] = [
    "method",
    "path",
    "status",
    "bytes",
    "duration_us",
    "pid",
    "request_id",
    "remote_addr",
];

/// Refuses a `--access-log-format` naming a field that does not exist (a typo would otherwise be logged
/// verbatim on every request). A brace that does not enclose a name is literal text.
pub(super) fn check_access_log_format(format: &str) -> Result<(), ConfigError> {
    let mut rest = format;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        rest = after;
        let Some(close) = after.find('}') else { break };
        let name = &after[..close];
        let is_name = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if is_name && !ACCESS_LOG_FIELDS.contains(&name) {
            return Err(ConfigError::UnknownLogField {
                field: name.to_owned(),
                known: ACCESS_LOG_FIELDS.map(|f| format!("{{{f}}}")).join(" "),
            });
        }
    }
    Ok(())
}

impl Options {
    /// Refuses a path option that is not UTF-8, naming the option: the settings travel to the workers as JSON,
    /// which holds only UTF-8 text.
    pub(super) fn require_utf8_paths(&self) -> Result<(), ConfigError> {
        let single = [
            ("--chdir", &self.chdir),
            ("--virtualenv", &self.virtualenv),
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
            ("--tls-client-ca", &self.tls_client_ca),
        ];
        let paths = single
            .into_iter()
            .filter_map(|(option, path)| Some((option, path.as_ref()?)))
            .chain(self.pythonpath.iter().map(|path| ("--pythonpath", path)))
            .chain(self.reload_extra_file.iter().map(|path| ("--reload-extra-file", path)))
            .chain(self.touch_reload.iter().map(|path| ("--touch-reload", path)));
        for (option, path) in paths {
            if path.to_str().is_none() {
                return Err(ConfigError::NotUtf8Path {
                    option,
                    path: path.clone(),
                });
            }
        }
        Ok(())
    }

    /// The sockets to bind: those given, else systemd's, else the default `127.0.0.1:3031`.
    pub(crate) fn effective_sockets(&self) -> Vec<String> {
        if self.sockets.is_empty() && systemd_fds().is_empty() {
            return vec![DEFAULT_SOCKET.to_owned()];
        }
        self.sockets.clone()
    }

    /// Without --virtualenv from the command line, FERRULE_VIRTUALENV or the file, an activated venv
    /// (`$VIRTUAL_ENV`) is the one the app uses, as with uWSGI.
    pub(super) fn with_ambient_virtualenv(mut self) -> Options {
        if self.virtualenv.is_none() {
            self.virtualenv = std::env::var_os("VIRTUAL_ENV")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn octal_modes() {
        assert_eq!(parse_octal_mode("660"), Ok(0o660));
        assert_eq!(parse_octal_mode("0666"), Ok(0o666));
        assert!(parse_octal_mode("999").is_err());
        assert!(parse_octal_mode("7777").is_err());
    }
}
