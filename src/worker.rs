//! A worker process: takes the listening sockets and the control channel from the master, loads the app,
//! serves, and asks to be replaced when it reaches `--max-requests`, `--reload-on-rss` or a request timeout.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::mpsc;

use crate::app::AppPool;
use crate::config::Config;
use crate::connection::ConnShared;
use crate::listener::{BoundSocket, ListenError};
use crate::metrics::WorkerMetrics;

/// Exit status of a worker that could not load the app: the master stops instead of respawning it.
pub const EXIT_APP_LOAD: i32 = 3;

/// Environment the master sets for a worker.
pub const ENV_WORKER_ID: &str = "FERRULE_WORKER_ID";
pub const ENV_WORKER_FDS: &str = "FERRULE_WORKER_FDS";

/// Why a worker asks to be replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetireReason {
    MaxRequests,
    Memory,
    Timeout,
}

impl RetireReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RetireReason::MaxRequests => "max-requests",
            RetireReason::Memory => "memory",
            RetireReason::Timeout => "timeout",
        }
    }

    pub fn parse(s: &str) -> Option<RetireReason> {
        [RetireReason::MaxRequests, RetireReason::Memory, RetireReason::Timeout]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

/// Per-worker counters that decide when the worker retires.
pub struct Lifecycle {
    served: AtomicU64,
    max_requests: Option<u64>,
    rss_limit: Option<u64>,
    /// Past `rss_limit`: the worker accepts nothing more and waits for its replacement.
    over_memory: AtomicBool,
    retiring: AtomicBool,
    retire_tx: mpsc::UnboundedSender<RetireReason>,
}

impl Lifecycle {
    pub fn new(config: &Config) -> (Lifecycle, mpsc::UnboundedReceiver<RetireReason>) {
        let (retire_tx, retire_rx) = mpsc::unbounded_channel();
        let jitter = match config.max_requests_jitter {
            0 => 0,
            j => random_u64() % (j + 1),
        };
        let lifecycle = Lifecycle {
            served: AtomicU64::new(0),
            max_requests: config.max_requests.map(|m| m.saturating_add(jitter)),
            rss_limit: config.reload_on_rss,
            over_memory: AtomicBool::new(false),
            retiring: AtomicBool::new(false),
            retire_tx,
        };
        (lifecycle, retire_rx)
    }

    /// Called after every request: counts it and checks the recycling limits.
    pub fn request_finished(&self) {
        let served = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        if self.max_requests.is_some_and(|max| served >= max) {
            self.retire(RetireReason::MaxRequests);
        }
    }

    /// Checks `--reload-on-rss` before a response's last bytes go out: once the client has the whole answer it
    /// may send its next request at once, and this worker must have stopped accepting by then.
    pub fn check_memory(&self) {
        if let Some(limit) = self.rss_limit {
            if let Some(rss) = crate::metrics::process_rss(std::process::id()).filter(|&rss| rss > limit) {
                if !self.over_memory.swap(true, Ordering::SeqCst) {
                    tracing::warn!(
                        rss_mib = rss >> 20,
                        limit_mib = limit >> 20,
                        "past --reload-on-rss: taking no new connections; finishing the requests in flight"
                    );
                }
                self.retire(RetireReason::Memory);
            }
        }
    }

    /// Asks for a replacement. Recycling asks once; a timeout always gets through, since it also makes the
    /// worker stop accepting.
    pub fn retire(&self, reason: RetireReason) {
        if reason == RetireReason::Timeout || !self.retiring.swap(true, Ordering::Relaxed) {
            let _ = self.retire_tx.send(reason);
        }
    }

    /// Whether the worker went past `--reload-on-rss` and so takes no new connections.
    pub fn over_memory(&self) -> bool {
        self.over_memory.load(Ordering::Relaxed)
    }

    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

/// A random number without a random crate: std's hasher keys are seeded from the OS per process.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

/// The worker's end of the channel to the master: readiness and retirement go up as text lines; EOF means
/// the master is gone.
pub struct Control {
    stream: std::os::unix::net::UnixStream,
}

impl Control {
    pub fn send(&mut self, line: &str) {
        // Tiny messages on a local socket: a blocking write cannot stall for long.
        if let Err(error) = writeln!(self.stream, "{line}") {
            tracing::warn!(%error, "cannot reach the master");
        }
    }

    /// A future that resolves when the master closes its end (it exited or was killed).
    pub fn master_gone(&self) -> std::io::Result<impl Future<Output = ()> + use<>> {
        let stream = tokio::net::UnixStream::from_std(self.stream.try_clone()?)?;
        Ok(async move {
            let mut buf = [0u8; 64];
            loop {
                let _ = stream.readable().await;
                match stream.try_read(&mut buf) {
                    Ok(0) => return,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
    }
}

/// With JSON logs, the app's own prints and Python's `logging` to stderr become log lines too, so every line
/// on stderr stays valid JSON: stdout and stderr are pointed at a pipe whose lines are logged by a thread.
/// Returns the original stderr, where the log itself is written.
pub fn capture_app_output() -> std::io::Result<std::fs::File> {
    use std::io::BufRead;
    let original = nix::unistd::dup(std::io::stderr())?;
    let (read, write) = nix::unistd::pipe()?;
    nix::unistd::dup2_stdout(&write)?;
    nix::unistd::dup2_stderr(&write)?;
    drop(write);
    std::thread::Builder::new()
        .name("ferrule-output".into())
        .spawn(move || {
            let reader = std::io::BufReader::new(std::fs::File::from(read));
            for line in reader.split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line);
                tracing::info!(target: "ferrule::app_output", line = %line.trim_end_matches('\r'), "app output");
            }
        })?;
    Ok(std::fs::File::from(original))
}

/// Keeps request-sized allocations (a body of up to --body-buffer-size, the bytes Python makes of it) in the
/// malloc heap, where the next request reuses them. By default glibc gives each one fresh pages from mmap and
/// unmaps them on free, so every large request paid page faults and page clearing twice (measured: about 8%
/// of a worker's CPU on the 1 MiB echo). The price is up to `TRIM` bytes of freed heap a worker may keep.
fn keep_large_allocations() {
    const MMAP_THRESHOLD: libc::c_int = 8 << 20;
    const TRIM: libc::c_int = 32 << 20;
    // SAFETY: mallopt only sets allocator tunables; it is called before the app threads start, and glibc
    // applies the values to later allocations only.
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM) == 1
    };
    if !ok {
        tracing::debug!("mallopt refused the heap tunables; large allocations use mmap");
    }
}

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{ENV_WORKER_FDS} is missing or invalid: this process was not started by a ferrule master")]
    NoSockets,
    #[error("cannot read the settings from the master: {0}")]
    Handoff(String),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot start the worker runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// This process's worker number, when a master started it as a worker.
pub fn worker_id() -> Option<u32> {
    std::env::var(ENV_WORKER_ID).ok()?.parse().ok()
}

/// What a worker gets from its master: the validated settings, the listening sockets and the control channel.
pub struct Handoff {
    pub config: Config,
    sockets: Vec<BoundSocket>,
    control: Control,
}

/// How long a new worker waits for its settings; the master writes them right after starting it.
const HANDOFF_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Handoff {
    /// Takes the inherited descriptors (sockets at 3.., the control socket after them) and reads the settings
    /// line the master wrote first on the control socket.
    pub fn receive() -> Result<Handoff, WorkerError> {
        let count: i32 = std::env::var(ENV_WORKER_FDS)
            .ok()
            .and_then(|n| n.parse().ok())
            .filter(|n| (1..=64).contains(n))
            .ok_or(WorkerError::NoSockets)?;
        // The app and whatever it starts must not think they are ferrule workers (a `ferrule --check-config`
        // run from the app would otherwise wait for a master).
        // SAFETY: this runs first thing in main, before any other thread exists, so no thread reads the
        // environment concurrently.
        unsafe {
            std::env::remove_var(ENV_WORKER_ID);
            std::env::remove_var(ENV_WORKER_FDS);
        }
        let sockets = (3..3 + count)
            .map(BoundSocket::inherit)
            .collect::<Result<Vec<_>, _>>()?;
        // SAFETY: the master places the control socket right after the listening sockets and nothing else in
        // this process uses that descriptor; `inherit` above has already checked the ones before it.
        let control = unsafe { OwnedFd::from_raw_fd(3 + count) };
        let mut stream = std::os::unix::net::UnixStream::from(control);
        let line = read_line(&mut stream).map_err(|e| WorkerError::Handoff(e.to_string()))?;
        let config = line
            .strip_prefix("config ")
            .ok_or_else(|| WorkerError::Handoff("the first message is not the settings".into()))
            .and_then(|json| Config::decode(json).map_err(|e| WorkerError::Handoff(e.to_string())))?;
        Ok(Handoff {
            config,
            sockets,
            control: Control { stream },
        })
    }
}

/// Reads the settings line. The master writes nothing after it on this socket (the channel carries the
/// worker's messages up from then on), so reading in chunks cannot consume anything else.
fn read_line(stream: &mut std::os::unix::net::UnixStream) -> std::io::Result<String> {
    use std::io::Read;
    stream.set_read_timeout(Some(HANDOFF_TIMEOUT))?;
    let mut line = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        line.extend_from_slice(&chunk[..n]);
        if line.last() == Some(&b'\n') {
            break;
        }
    }
    stream.set_read_timeout(None)?;
    line.pop();
    String::from_utf8(line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Runs a worker to its end. Does not return on success: the process exits without finalising Python.
pub fn run(handoff: Handoff, id: u32) -> Result<(), WorkerError> {
    let Handoff {
        config,
        sockets,
        control,
    } = handoff;
    let _span = tracing::info_span!("worker", id, pid = std::process::id()).entered();
    keep_large_allocations();
    let pool = match AppPool::start(&config) {
        Ok(pool) => pool,
        Err(error) => {
            tracing::error!("{error}");
            std::process::exit(EXIT_APP_LOAD);
        }
    };
    let (lifecycle, retire_rx) = Lifecycle::new(&config);
    let shared = Arc::new(ConnShared::new(
        Arc::new(config),
        Arc::new(lifecycle),
        Arc::new(WorkerMetrics::default()),
    ));
    // One thread for the async side: the app threads serve most requests end to end, so it only reads slow
    // peers, answers refusals and keeps time; a second runtime thread would compete for the same cores.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(crate::server::run(sockets, &pool, shared, retire_rx, control))?;
    crate::app::run_exit_handlers();
    // The app threads are parked waiting for work; end without finalising the interpreter under them.
    std::process::exit(0);
}
