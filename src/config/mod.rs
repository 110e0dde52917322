//! The options, validated once into a `Config` that the rest of the server reads: the master builds it and hands
//! it to each worker as one line, so a worker never reads the command line, the environment or the file.
//!
//! `options` defines the options (clap), `file` reads them with the `--config` file under them, `socket` parses
//! where to listen. `Config` groups the settings by what they govern, and keeps apart what a reload may change
//! from what was bound or set up before the first worker started (`Fixed`), which takes a restart.

mod error;
mod file;
mod options;
mod socket;
mod workers;
mod watch;

use std::path::PathBuf;
use std::time::Duration;

pub(crate) use error::ConfigError;
pub(crate) use file::load_options;
pub(crate) use options::{LogFormat, Options};
pub(crate) use socket::{Cidr, SocketSpec, parse_socket, systemd_fds};
pub(crate) use watch::Watch;

use options::check_access_log_format;
use socket::parse_metrics_socket;

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

/// The validated configuration, grouped by what each part governs. The master validates it once and hands it to
/// each worker as it is (see [`Config::encode`]). A reload takes every group of the new one but `fixed` (see
/// [`Config::reloaded`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Config {
    /// What the master binds or sets up before the first worker starts: a change takes a restart.
    pub(crate) fixed: Fixed,
    pub(crate) app: App,
    pub(crate) workers: Workers,
    pub(crate) limits: Limits,
    pub(crate) logs: Logs,
    pub(crate) tls: Tls,
    /// What reloads the workers besides SIGHUP: set up once, at start-up.
    pub(crate) watch: Watch,
}

/// Set up once by the master: the sockets and how they are made, the metrics listener, the identity the
/// processes switch to, and whether workers fork from a zygote.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Fixed {
    pub(crate) sockets: Vec<SocketSpec>,
    pub(crate) socket_mode: Option<u32>,
    pub(crate) listen_backlog: i32,
    pub(crate) metrics: Option<SocketSpec>,
    pub(crate) uid: Option<String>,
    pub(crate) gid: Option<String>,
    /// Import the app once and fork the workers from it.
    pub(crate) preload: bool,
}

/// The WSGI app and where its code and packages are.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct App {
    /// `module:callable`, as given.
    pub(crate) callable: String,
    pub(crate) chdir: Option<PathBuf>,
    pub(crate) pythonpath: Vec<PathBuf>,
    pub(crate) virtualenv: Option<PathBuf>,
}

/// How many workers, their app threads, and when a worker is replaced or must have stopped.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Workers {
    /// How many start; with `max`, the fewest there are.
    pub(crate) count: usize,
    /// `--max-workers`: the most there may be, added while requests wait and retired when idle.
    pub(crate) max: Option<usize>,
    pub(crate) scale_up_after: Duration,
    pub(crate) scale_down_after: Duration,
    /// What `auto` found, when `--workers` or `--max-workers` was `auto`.
    pub(crate) auto: Option<crate::resources::Cpus>,
    /// The options given as `auto`: `workers`, `max-workers`.
    pub(crate) auto_options: Vec<String>,
    /// `--workers auto` found this many, more than `--max-workers`, and was lowered to it.
    pub(crate) clamped_from: Option<usize>,
    pub(crate) threads: usize,
    pub(crate) graceful_timeout: Duration,
    pub(crate) max_requests: Option<u64>,
    pub(crate) max_requests_jitter: u64,
    /// Memory limit in bytes: resident memory, or private memory under `preload`.
    pub(crate) reload_on_rss: Option<u64>,
}

/// What a request may be, who may send one, and how long its parts may take.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Limits {
    pub(crate) max_vars_size: usize,
    pub(crate) body_buffer_size: u64,
    pub(crate) read_timeout: Duration,
    /// How long a peer may take nothing of the response (a stalled reader would otherwise hold an app thread).
    pub(crate) write_timeout: Duration,
    /// Per-request time limit.
    pub(crate) timeout: Option<Duration>,
    pub(crate) max_body_size: Option<u64>,
    pub(crate) max_connections: usize,
    /// TCP peers allowed to connect; empty means all.
    pub(crate) allow_from: Vec<Cidr>,
}

/// What is logged, and how.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Logs {
    pub(crate) access_log: bool,
    pub(crate) access_log_format: Option<String>,
    pub(crate) log_format: LogFormat,
    pub(crate) log_level: String,
}

/// The tls:// sockets' files and session tickets.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Tls {
    /// The certificate, key and client CAs, when there is a tls:// socket.
    pub(crate) files: Option<crate::tls::TlsFiles>,
    /// Seconds between the session-ticket key rotations.
    pub(crate) ticket_rotation: u64,
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
        let workers = Workers::from_options(&o)?;
        let limits = Limits::from_options(&o)?;
        let watch = Watch::from_options(&o)?;
        let files = tls_files(&sockets, o.tls_cert, o.tls_key, o.tls_client_ca)?;
        if files.is_none() && o.tls_ticket_rotation.is_some() {
            return Err(ConfigError::TlsFilesWithoutSocket);
        }
        let tls = Tls {
            files,
            ticket_rotation: o.tls_ticket_rotation.unwrap_or(crate::tls::DEFAULT_TICKET_ROTATION),
        };
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
        let fixed = Fixed {
            sockets,
            socket_mode: o.socket_mode,
            listen_backlog: o.listen_backlog.max(1),
            metrics: o
                .metrics
                .as_deref()
                .map(parse_metrics_socket)
                .transpose()
                .map_err(|e| ConfigError::BadMetrics(Box::new(e)))?,
            uid: o.uid,
            gid: o.gid,
            preload: o.preload,
        };
        let app = App {
            callable: o.app.filter(|a| !a.is_empty()).ok_or(ConfigError::NoApp)?,
            chdir,
            pythonpath: o.pythonpath,
            virtualenv,
        };
        let logs = Logs {
            access_log: o.access_log,
            access_log_format: o.access_log_format,
            log_format: o.log_format,
            log_level: o.log_level,
        };
        Ok(Config {
            fixed,
            app,
            workers,
            limits,
            logs,
            tls,
            watch,
        })
    }

    /// What a reload applies when the options now give `new`: every group of `new` but `fixed` and `watch`, which
    /// keep their current value. Returns it with the names of the options in `fixed` that changed, for the master to say
    /// that they take a restart. The TLS files go with the sockets kept: a tls:// socket still needs them
    /// (refused without), and without one they would serve nothing.
    pub(crate) fn reloaded(&self, mut new: Config) -> Result<(Config, Vec<&'static str>), ConfigError> {
        let mut needs_restart = self.fixed.changed_in(&new.fixed);
        new.fixed.clone_from(&self.fixed);
        needs_restart.extend(self.watch.changed_in(&new.watch));
        new.watch.clone_from(&self.watch);
        match (&self.tls.files, &new.tls.files) {
            (Some(_), None) => {
                let socket = self.fixed.sockets.iter().find(|s| matches!(s, SocketSpec::Tls(_)));
                return Err(ConfigError::TlsWithoutFiles(
                    socket.map(ToString::to_string).unwrap_or_default(),
                ));
            }
            (None, Some(_)) => new.tls.files = None,
            _ => {}
        }
        Ok((new, needs_restart))
    }

    /// The form in which the master hands the validated settings to a worker: one line of JSON. It fails only
    /// on a path that is not UTF-8, which `from_options` refuses with the option's name.
    pub(crate) fn encode(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }

    pub(crate) fn decode(line: &str) -> Result<Config, serde_json::Error> {
        serde_json::from_str(line)
    }
}

impl Workers {
    fn from_options(o: &Options) -> Result<Workers, ConfigError> {
        let counts = workers::resolve(o.workers, o.max_workers, crate::resources::usable_cpus)?;
        Ok(Workers {
            count: counts.count,
            max: counts.max,
            scale_up_after: Duration::from_secs(o.scale_up_after),
            scale_down_after: Duration::from_secs(o.scale_down_after),
            auto: counts.auto,
            auto_options: counts.auto_options,
            clamped_from: counts.clamped_from,
            threads: o.threads as usize,
            graceful_timeout: Duration::from_secs(o.graceful_timeout),
            max_requests: (o.max_requests > 0).then_some(o.max_requests),
            max_requests_jitter: o.max_requests_jitter,
            reload_on_rss: (o.reload_on_rss > 0).then(|| o.reload_on_rss.saturating_mul(1 << 20)),
        })
    }

    /// The most workers there may be at once: what `wsgi.multiprocess` is about.
    pub(crate) fn most(&self) -> usize {
        self.count.max(self.max.unwrap_or(0))
    }

    /// `--check-config`'s TOML with each `auto` count followed by what it found: `workers = "auto" # → 2 (cpu
    /// quota 200000/100000)`.
    pub(crate) fn annotate_auto(&self, toml: &str) -> String {
        let Some(cpus) = &self.auto else { return toml.to_owned() };
        let found = |key: &str| match key {
            "workers" => Some(self.clamped_from.map_or(self.count.to_string(), |found| {
                format!("{found}, lowered to --max-workers {}", self.count)
            })),
            "max_workers" => self.max.map(|max| max.to_string()),
            _ => None,
        };
        let mut out = String::with_capacity(toml.len() + 80);
        for line in toml.lines() {
            out.push_str(line);
            let key = line.strip_suffix(" = \"auto\"");
            if let Some(count) = key.and_then(found) {
                out.push_str(&format!(" # → {count} ({})", cpus.source));
            }
            out.push('\n');
        }
        out
    }
}

impl Limits {
    fn from_options(o: &Options) -> Result<Limits, ConfigError> {
        Ok(Limits {
            max_vars_size: o.buffer_size as usize,
            body_buffer_size: o.body_buffer_size,
            read_timeout: Duration::from_secs(o.read_timeout.max(1)),
            write_timeout: Duration::from_secs(o.write_timeout.unwrap_or(o.read_timeout).max(1)),
            timeout: (o.timeout > 0).then(|| Duration::from_secs(o.timeout)),
            max_body_size: (o.max_body_size > 0).then_some(o.max_body_size),
            max_connections: o.max_connections as usize,
            allow_from: o
                .allow_from
                .iter()
                .filter(|c| !c.trim().is_empty())
                .map(|c| Cidr::parse(c))
                .collect::<Result<_, _>>()?,
        })
    }
}

impl Fixed {
    /// The option names (as an operator writes them) whose value differs in `new`.
    fn changed_in(&self, new: &Fixed) -> Vec<&'static str> {
        // Destructured, so that a field added to `Fixed` must be named here.
        let Fixed {
            sockets,
            socket_mode,
            listen_backlog,
            metrics,
            uid,
            gid,
            preload,
        } = self;
        [
            ("socket", *sockets != new.sockets),
            ("socket_mode", *socket_mode != new.socket_mode),
            ("listen_backlog", *listen_backlog != new.listen_backlog),
            ("metrics", *metrics != new.metrics),
            ("uid", *uid != new.uid),
            ("gid", *gid != new.gid),
            ("preload", *preload != new.preload),
        ]
        .into_iter()
        .filter_map(|(option, changed)| changed.then_some(option))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use super::*;

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
    fn a_reload_takes_every_group_but_the_fixed_one_and_names_what_needs_a_restart() {
        let config = |args: &[&str]| {
            let mut argv = vec!["ferrule".to_owned(), "app:application".to_owned()];
            argv.extend(args.iter().map(|a| a.to_string()));
            Config::from_options(load_options(argv.into_iter().map(OsString::from).collect()).unwrap()).unwrap()
        };
        let old = config(&["--socket", "127.0.0.1:3031", "--workers", "2", "--uid", "nobody"]);
        let same = config(&["--socket", "127.0.0.1:3031", "--workers", "3", "--uid", "nobody"]);
        let (taken, restart) = old.reloaded(same).unwrap();
        assert_eq!(taken.workers.count, 3);
        assert!(restart.is_empty(), "{restart:?}");

        let moved = config(&[
            "--socket",
            "127.0.0.1:4041",
            "--workers",
            "3",
            "--preload",
            "--timeout",
            "9",
        ]);
        let (taken, restart) = old.reloaded(moved).unwrap();
        assert_eq!(restart, ["socket", "uid", "preload"]);
        assert_eq!(taken.fixed, old.fixed, "the fixed group keeps its current value");
        assert_eq!(
            taken.limits.timeout,
            Some(Duration::from_secs(9)),
            "the other groups are the new ones"
        );
        assert_eq!(taken.workers.count, 3);
    }
}
