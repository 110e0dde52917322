//! Command-line options, validated once into a `Config` that the rest of the server reads.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use std::ffi::OsString;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser, parser::ValueSource};

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

    /// Worker processes, supervised by a master process that holds the sockets
    #[arg(short = 'w', long, visible_alias = "processes", value_name = "N", env = "FERRULE_WORKERS",
          default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub(crate) workers: u32,

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

/// Where ferrule listens when no socket is given anywhere (uWSGI's customary port).
pub(crate) const DEFAULT_SOCKET: &str = "127.0.0.1:3031";

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum SocketSpec {
    Unix(PathBuf),
    Tcp(SocketAddr),
    /// uwsgi over TLS (nginx's `suwsgi://`) on a TCP address.
    Tls(SocketAddr),
    /// An already listening socket inherited from whoever started ferrule (`fd://N`, systemd).
    Fd(i32),
}

impl std::fmt::Display for SocketSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SocketSpec::Unix(p) => write!(f, "unix:{}", p.display()),
            SocketSpec::Tcp(a) => write!(f, "{a}"),
            SocketSpec::Tls(a) => write!(f, "tls://{a}"),
            SocketSpec::Fd(n) => write!(f, "fd://{n}"),
        }
    }
}

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
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// Parses the command line and the environment, then fills in what neither set from the `--config` file.
/// Precedence: command line, then environment, then file, then defaults.
pub(crate) fn load_options(args: Vec<OsString>) -> Result<Options, ConfigError> {
    let matches = Options::command().get_matches_from(&args);
    let Some(file) = matches.get_one::<PathBuf>("config").cloned() else {
        // Cannot fail: these matches were just produced from the same definition.
        return Options::from_arg_matches(&matches)
            .map_err(|e| ConfigError::File {
                file: PathBuf::new(),
                error: e.to_string(),
            })
            .map(Options::with_ambient_virtualenv);
    };
    let text = std::fs::read_to_string(&file).map_err(|e| ConfigError::File {
        file: file.clone(),
        error: e.to_string(),
    })?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::File {
        file: file.clone(),
        error: e.to_string(),
    })?;
    let cmd = Options::command();
    let mut injected: Vec<OsString> = Vec::new();
    let mut app_from_file = None;
    for (key, value) in &table {
        let id = key.replace('-', "_");
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id() == id.as_str() || a.get_long() == Some(key.replace('_', "-").as_str()))
            .filter(|a| !matches!(a.get_id().as_str(), "config" | "check_config"))
            .ok_or_else(|| ConfigError::UnknownKey {
                file: file.clone(),
                key: key.clone(),
            })?;
        let arg_id = arg.get_id().as_str();
        // Set on the command line or in the environment: those win over the file.
        if matches!(
            matches.value_source(arg_id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let bad = |error: String| ConfigError::BadValue {
            file: file.clone(),
            key: key.clone(),
            error,
        };
        let values: Vec<String> = match value {
            toml::Value::Array(items) => items.iter().map(scalar).collect::<Result<_, _>>().map_err(bad)?,
            // TOML reads both 660 and 0o660 as integers; only the literal tells which one was meant.
            toml::Value::Integer(mode) if arg_id == "socket_mode" => match integer_literal(&text, key) {
                Some(literal) if literal.starts_with("0o") => vec![format!("{mode:o}")],
                _ => {
                    return Err(bad(format!(
                        "{mode} is ambiguous for a file mode: write it as an octal number, socket_mode = 0o660, \
                         or as a string, socket_mode = \"660\""
                    )));
                }
            },
            other => vec![scalar(other).map_err(bad)?],
        };
        let Some(long) = arg.get_long() else {
            app_from_file = values.into_iter().next();
            continue;
        };
        let mut these: Vec<OsString> = Vec::new();
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            match value {
                toml::Value::Boolean(true) => these.push(format!("--{long}").into()),
                toml::Value::Boolean(false) => {}
                _ => return Err(bad("expected true or false".into())),
            }
        } else {
            for v in values {
                these.push(format!("--{long}={v}").into());
            }
        }
        // Check each key alone, so an error names the key in the file rather than a command-line flag.
        let mut probe: Vec<OsString> = vec!["ferrule".into()];
        probe.extend(these.iter().cloned());
        probe.push("app".into());
        Options::command()
            .try_get_matches_from(probe)
            .map_err(|e| bad(e.kind().to_string() + ": " + &first_line(&e.to_string())))?;
        injected.extend(these);
    }
    let mut merged: Vec<OsString> = args.iter().take(1).cloned().collect();
    merged.extend(injected);
    merged.extend(args.iter().skip(1).cloned());
    if matches.get_one::<String>("app").is_none() {
        merged.extend(app_from_file.map(OsString::from));
    }
    let matches = Options::command()
        .try_get_matches_from(merged)
        .map_err(|e| ConfigError::File {
            file: file.clone(),
            error: first_line(&e.to_string()),
        })?;
    Options::from_arg_matches(&matches)
        .map_err(|e| ConfigError::File {
            file,
            error: e.to_string(),
        })
        .map(Options::with_ambient_virtualenv)
}

/// The text after `key =` on the line that sets `key` at the top of a TOML file.
fn integer_literal<'t>(text: &'t str, key: &str) -> Option<&'t str> {
    text.lines().find_map(|line| {
        let rest = line.trim_start().strip_prefix(key)?.trim_start().strip_prefix('=')?;
        rest.split('#').next().map(str::trim)
    })
}

/// The `{field}`s a text access-log line may use.
pub(crate) const ACCESS_LOG_FIELDS: [&str; 8] = [
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
fn check_access_log_format(format: &str) -> Result<(), ConfigError> {
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
    fn require_utf8_paths(&self) -> Result<(), ConfigError> {
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
            .chain(self.pythonpath.iter().map(|path| ("--pythonpath", path)));
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
    fn with_ambient_virtualenv(mut self) -> Options {
        if self.virtualenv.is_none() {
            self.virtualenv = std::env::var_os("VIRTUAL_ENV")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from);
        }
        self
    }
}

fn scalar(v: &toml::Value) -> Result<String, String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        _ => Err("expected a string, number, boolean or a list of them".into()),
    }
}

fn first_line(s: &str) -> String {
    s.lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_owned()
}

/// A network in CIDR notation, for `--allow-from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub(crate) fn parse(s: &str) -> Result<Cidr, ConfigError> {
        let bad = || ConfigError::BadCidr(s.to_owned());
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { addr, prefix })
    }

    /// Whether `ip` is inside this network; an IPv4-mapped IPv6 peer matches IPv4 networks.
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Parses one `--socket` value.
pub(crate) fn parse_socket(s: &str) -> Result<SocketSpec, ConfigError> {
    if let Some(addr) = s.strip_prefix("tls://") {
        return match parse_socket(addr)? {
            SocketSpec::Tcp(addr) => Ok(SocketSpec::Tls(addr)),
            _ => Err(ConfigError::BadSocket(s.to_owned())),
        };
    }
    if let Some(fd) = s.strip_prefix("fd://") {
        return match fd.parse::<i32>() {
            Ok(n) if n >= 0 => Ok(SocketSpec::Fd(n)),
            _ => Err(ConfigError::BadSocket(s.to_owned())),
        };
    }
    if let Some(path) = s.strip_prefix("unix:") {
        return if path.starts_with('/') {
            Ok(SocketSpec::Unix(PathBuf::from(path)))
        } else {
            Err(ConfigError::RelativeUnixPath(s.to_owned()))
        };
    }
    if s.starts_with('/') {
        return Ok(SocketSpec::Unix(PathBuf::from(s)));
    }
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(SocketSpec::Tcp(addr));
    }
    // A host name such as localhost:3031: resolve once, at start-up.
    match s.to_socket_addrs().ok().and_then(|mut a| a.next()) {
        Some(addr) if s.contains(':') => Ok(SocketSpec::Tcp(addr)),
        _ => Err(ConfigError::BadSocket(s.to_owned())),
    }
}

/// The `--metrics` socket: like `--socket`, but it speaks plain uwsgi only.
fn parse_metrics_socket(s: &str) -> Result<SocketSpec, ConfigError> {
    match parse_socket(s)? {
        SocketSpec::Tls(_) => Err(ConfigError::MetricsOverTls(s.to_owned())),
        spec => Ok(spec),
    }
}

/// The TLS files when a tls:// socket is given, checked now (readable, a certificate valid today, the key
/// that matches it, usable client CAs), so a bad file stops start-up (and `--check-config`) with its name.
fn tls_files(
    sockets: &[SocketSpec],
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
) -> Result<Option<crate::tls::TlsFiles>, ConfigError> {
    let tls_socket = sockets.iter().find(|s| matches!(s, SocketSpec::Tls(_)));
    let Some(socket) = tls_socket else {
        return match (&cert, &key, &client_ca) {
            (None, None, None) => Ok(None),
            _ => Err(ConfigError::TlsFilesWithoutSocket),
        };
    };
    let (Some(cert), Some(key)) = (cert, key) else {
        return Err(ConfigError::TlsWithoutFiles(socket.to_string()));
    };
    let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    let files = crate::tls::TlsFiles {
        cert: absolute(cert),
        key: absolute(key),
        client_ca: client_ca.map(absolute),
    };
    crate::tls::check_files(&files)?;
    Ok(Some(files))
}

/// The validated configuration. The master validates it once and hands it to each worker as it is (see
/// [`Config::encode`]), so a worker never reads the command line, the environment or the file itself.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Config {
    pub(crate) app: String,
    pub(crate) sockets: Vec<SocketSpec>,
    /// The certificate, key and client CAs of the tls:// sockets, when there are any.
    pub(crate) tls: Option<crate::tls::TlsFiles>,
    /// Seconds between the session-ticket key rotations of tls:// sockets.
    pub(crate) tls_ticket_rotation: u64,
    pub(crate) socket_mode: Option<u32>,
    pub(crate) threads: usize,
    pub(crate) workers: usize,
    pub(crate) chdir: Option<PathBuf>,
    pub(crate) pythonpath: Vec<PathBuf>,
    pub(crate) virtualenv: Option<PathBuf>,
    pub(crate) max_vars_size: usize,
    pub(crate) body_buffer_size: u64,
    pub(crate) read_timeout: Duration,
    /// How long a peer may take nothing of the response (a stalled reader would otherwise hold an app thread).
    pub(crate) write_timeout: Duration,
    pub(crate) graceful_timeout: Duration,
    pub(crate) listen_backlog: i32,
    pub(crate) access_log: bool,
    /// Per-request time limit.
    pub(crate) timeout: Option<Duration>,
    pub(crate) max_body_size: Option<u64>,
    pub(crate) max_connections: usize,
    /// TCP peers allowed to connect; empty means all.
    pub(crate) allow_from: Vec<Cidr>,
    pub(crate) uid: Option<String>,
    pub(crate) gid: Option<String>,
    pub(crate) metrics: Option<SocketSpec>,
    pub(crate) access_log_format: Option<String>,
    pub(crate) log_format: LogFormat,
    pub(crate) log_level: String,
    pub(crate) max_requests: Option<u64>,
    pub(crate) max_requests_jitter: u64,
    /// Memory limit in bytes: resident memory, or private memory under `preload`.
    pub(crate) reload_on_rss: Option<u64>,
    /// Import the app once and fork the workers from it.
    pub(crate) preload: bool,
}

impl Config {
    pub(crate) fn from_options(o: Options) -> Result<Config, ConfigError> {
        o.require_utf8_paths()?;
        let sockets = o
            .effective_sockets()
            .iter()
            .map(|s| parse_socket(s))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(format) = &o.access_log_format {
            check_access_log_format(format)?;
        }
        let tls = tls_files(&sockets, o.tls_cert, o.tls_key, o.tls_client_ca)?;
        if tls.is_none() && o.tls_ticket_rotation.is_some() {
            return Err(ConfigError::TlsFilesWithoutSocket);
        }
        let tls_ticket_rotation = o.tls_ticket_rotation.unwrap_or(crate::tls::DEFAULT_TICKET_ROTATION);
        let chdir = match o.chdir {
            Some(dir) => Some(dir.canonicalize().map_err(|e| ConfigError::BadChdir(dir, e))?),
            None => None,
        };
        let virtualenv = match o.virtualenv.filter(|v| !v.as_os_str().is_empty()) {
            Some(venv) if !venv.join("pyvenv.cfg").is_file() => {
                return Err(ConfigError::BadVirtualenv(venv));
            }
            Some(venv) => Some(std::path::absolute(&venv).unwrap_or(venv)),
            None => None,
        };
        Ok(Config {
            app: o.app.filter(|a| !a.is_empty()).ok_or(ConfigError::NoApp)?,
            metrics: o
                .metrics
                .as_deref()
                .map(parse_metrics_socket)
                .transpose()
                .map_err(|e| ConfigError::BadMetrics(Box::new(e)))?,
            access_log_format: o.access_log_format,
            log_format: o.log_format,
            log_level: o.log_level,
            sockets,
            tls,
            tls_ticket_rotation,
            socket_mode: o.socket_mode,
            threads: o.threads as usize,
            workers: o.workers as usize,
            chdir,
            pythonpath: o.pythonpath,
            virtualenv,
            max_vars_size: o.buffer_size as usize,
            body_buffer_size: o.body_buffer_size,
            read_timeout: Duration::from_secs(o.read_timeout.max(1)),
            write_timeout: Duration::from_secs(o.write_timeout.unwrap_or(o.read_timeout).max(1)),
            graceful_timeout: Duration::from_secs(o.graceful_timeout),
            listen_backlog: o.listen_backlog.max(1),
            access_log: o.access_log,
            timeout: (o.timeout > 0).then(|| Duration::from_secs(o.timeout)),
            max_body_size: (o.max_body_size > 0).then_some(o.max_body_size),
            max_connections: o.max_connections as usize,
            allow_from: o
                .allow_from
                .iter()
                .filter(|c| !c.trim().is_empty())
                .map(|c| Cidr::parse(c))
                .collect::<Result<_, _>>()?,
            uid: o.uid,
            gid: o.gid,
            max_requests: (o.max_requests > 0).then_some(o.max_requests),
            max_requests_jitter: o.max_requests_jitter,
            reload_on_rss: (o.reload_on_rss > 0).then(|| o.reload_on_rss.saturating_mul(1 << 20)),
            preload: o.preload,
        })
    }
}

impl Config {
    /// The form in which the master hands the validated settings to a worker: one line of JSON. It fails only
    /// on a path that is not UTF-8, which `from_options` refuses with the option's name.
    pub(crate) fn encode(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }

    pub(crate) fn decode(line: &str) -> Result<Config, serde_json::Error> {
        serde_json::from_str(line)
    }
}

/// Sockets passed by systemd socket activation: fds 3.. when LISTEN_PID names this process.
pub(crate) fn systemd_fds() -> Vec<SocketSpec> {
    let for_us = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    if !for_us || count <= 0 {
        return Vec::new();
    }
    (3..3 + count.min(64)).map(SocketSpec::Fd).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_forms() {
        assert_eq!(
            parse_socket("unix:/run/a.sock").unwrap(),
            SocketSpec::Unix("/run/a.sock".into())
        );
        assert_eq!(
            parse_socket("/run/a.sock").unwrap(),
            SocketSpec::Unix("/run/a.sock".into())
        );
        assert_eq!(
            parse_socket("127.0.0.1:3031").unwrap(),
            SocketSpec::Tcp("127.0.0.1:3031".parse().unwrap())
        );
        assert_eq!(
            parse_socket("[::1]:3031").unwrap(),
            SocketSpec::Tcp("[::1]:3031".parse().unwrap())
        );
        assert!(parse_socket("unix:relative.sock").is_err());
        assert!(parse_socket("nonsense").is_err());
        assert!(parse_socket("127.0.0.1").is_err());
        assert_eq!(parse_socket("fd://3").unwrap(), SocketSpec::Fd(3));
        assert!(parse_socket("fd://x").is_err());
    }

    #[test]
    fn cidrs() {
        let net = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.2.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.9.9".parse().unwrap()));
        let one = Cidr::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        assert!(Cidr::parse("fd00::/8").unwrap().contains("fd12::1".parse().unwrap()));
        assert!(!Cidr::parse("fd00::/8").unwrap().contains("10.0.0.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "nope", "::1/129", "1.2.3.4/x"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tls_sockets_need_their_files_and_the_files_need_a_tls_socket() {
        assert_eq!(
            parse_socket("tls://127.0.0.1:3443").unwrap(),
            SocketSpec::Tls("127.0.0.1:3443".parse().unwrap())
        );
        assert_eq!(
            parse_socket("tls://127.0.0.1:3443").unwrap().to_string(),
            "tls://127.0.0.1:3443"
        );
        assert!(
            parse_socket("tls:///run/a.sock").is_err(),
            "TLS over a Unix socket is not a thing nginx does"
        );
        let options = |args: &[&str]| {
            let mut argv = vec!["ferrule".to_owned(), "app:application".to_owned()];
            argv.extend(args.iter().map(|a| a.to_string()));
            load_options(argv.into_iter().map(OsString::from).collect()).unwrap()
        };
        let err = Config::from_options(options(&["--metrics", "tls://127.0.0.1:9191"])).unwrap_err();
        assert!(
            err.to_string().contains("the metrics socket speaks plain uwsgi"),
            "{err}"
        );
        let err = Config::from_options(options(&["--socket", "tls://127.0.0.1:3443"])).unwrap_err();
        assert!(err.to_string().contains("needs --tls-cert and --tls-key"), "{err}");
        let err = Config::from_options(options(&["--socket", "127.0.0.1:3031", "--tls-cert", "/x.pem"])).unwrap_err();
        assert!(matches!(err, ConfigError::TlsFilesWithoutSocket), "{err}");
        let err = Config::from_options(options(&[
            "--socket",
            "tls://127.0.0.1:3443",
            "--tls-cert",
            "/nonexistent/cert.pem",
            "--tls-key",
            "/nonexistent/key.pem",
        ]))
        .unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/cert.pem: cannot read it"),
            "{err}"
        );
    }

    #[test]
    fn octal_modes() {
        assert_eq!(parse_octal_mode("660"), Ok(0o660));
        assert_eq!(parse_octal_mode("0666"), Ok(0o666));
        assert!(parse_octal_mode("999").is_err());
        assert!(parse_octal_mode("7777").is_err());
    }
}
