//! A worker process, wired together: the hand-off from the master (settings, sockets, control line), the app,
//! the worker's context for its connections, and the server that runs them. It asks to be replaced when it
//! reaches `--max-requests`, `--reload-on-rss` or a request timeout (see `lifecycle`).

use std::sync::Arc;

use crate::app::{self, App};
use crate::config::Config;
use crate::connection::WorkerContext;
use crate::control::{EXIT_APP_LOAD, Handoff, Message, ToMaster};
use crate::lifecycle::Lifecycle;
use crate::listener::BoundSocket;

/// With JSON logs, the app's own prints and Python's `logging` to stderr become log lines too, so every line
/// on stderr stays valid JSON: stdout and stderr are pointed at a pipe whose lines are logged by a thread.
/// Returns the original stderr, where the log itself is written.
pub(crate) fn capture_app_output() -> std::io::Result<std::fs::File> {
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

/// Runs `f` with stdout and stderr pointed at an unlinked temporary file, then logs what it wrote as app
/// output lines: [`capture_app_output`] for the `--preload` zygote, which must not start a thread of its own
/// (it forks). The log itself is written to a copy of stderr taken before.
pub(crate) fn log_app_output_of<T>(f: impl FnOnce() -> T) -> T {
    use std::io::{BufRead, Seek};
    let saved = (nix::unistd::dup(std::io::stdout()), nix::unistd::dup(std::io::stderr()));
    let (Ok(stdout), Ok(stderr), Ok(mut file)) = (saved.0, saved.1, tempfile::tempfile()) else {
        return f();
    };
    let redirected = nix::unistd::dup2_stdout(&file).is_ok() && nix::unistd::dup2_stderr(&file).is_ok();
    let result = f();
    // What C code wrote with stdio is still in libc's buffers: out to the file before it is read, or every
    // forked worker would flush a copy of it.
    // SAFETY: fflush(NULL) flushes every open stdio stream; this process has one thread.
    unsafe { libc::fflush(std::ptr::null_mut()) };
    let _ = nix::unistd::dup2_stdout(&stdout);
    let _ = nix::unistd::dup2_stderr(&stderr);
    if redirected && file.rewind().is_ok() {
        for line in std::io::BufReader::new(file).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line);
            tracing::info!(target: "ferrule::app_output", line = %line.trim_end_matches('\r'), "app output");
        }
    }
    result
}

/// Tunes glibc's malloc for a worker, before its threads start.
///
/// Keeps request-sized allocations (a body of up to --body-buffer-size, the bytes Python makes of it) in the
/// malloc heap, where the next request reuses them. By default glibc gives each one fresh pages from mmap and
/// unmaps them on free, so every large request paid page faults and page clearing twice (measured: about 8%
/// of a worker's CPU on the 1 MiB echo). The price is up to `TRIM` bytes of freed heap a worker may keep.
///
/// Caps malloc arenas at `ARENAS`: glibc gives each new thread its own arena (up to 8 per core), and each
/// keeps its own free pages, about 2 MiB per app thread once the app has run. The app threads take turns on
/// the GIL, and Python allocates most of its objects with its own allocator, so they hardly contend for an
/// arena. `MALLOC_ARENA_MAX` in the environment, when set, is left to glibc.
fn tune_malloc() {
    const MMAP_THRESHOLD: libc::c_int = 8 << 20;
    const TRIM: libc::c_int = 32 << 20;
    const ARENAS: libc::c_int = 2;
    // SAFETY: mallopt only sets allocator tunables; it is called before the app threads start, and glibc
    // applies the values to later allocations only.
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM) == 1
    };
    if !ok {
        tracing::debug!("mallopt refused the heap tunables; large allocations use mmap");
    }
    // SAFETY: as above.
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() && unsafe { libc::mallopt(libc::M_ARENA_MAX, ARENAS) } != 1 {
        tracing::debug!("mallopt refused the arena limit");
    }
}

/// Why a worker could not run.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WorkerError {
    #[error("cannot start the worker runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// Runs a worker to its end: loads the app, then serves it (see [`serve`]). Does not return on success.
pub(crate) fn run(handoff: Handoff, id: u32) -> Result<(), WorkerError> {
    let _span = tracing::info_span!("worker", id, pid = std::process::id()).entered();
    let mut control = handoff.control;
    let app = match load_for_reload(&handoff.config, &mut control) {
        Ok(app) => app,
        Err(error) => {
            tracing::error!("{error}");
            std::process::exit(EXIT_APP_LOAD);
        }
    };
    serve(app, handoff.config, handoff.sockets, control)
}

/// Loads the app; under `--reload` also tells the master the files to watch, and when the app does not import
/// returns the stand-in that answers 503 (after `unavailable`), so the edit that fixes it is awaited, not a
/// crash loop. Used by a worker and by the `--preload` zygote.
pub(crate) fn load_for_reload(config: &Config, control: &mut ToMaster) -> Result<App, app::AppError> {
    let loaded = App::load(config);
    if !config.watch.on_change {
        return loaded;
    }
    match loaded {
        Ok(app) => {
            control.send_files(&app::imported_files());
            Ok(app)
        }
        Err(error) => {
            tracing::error!("{error}");
            control.send_files(&app::files_after_failure(config, &error));
            let app = App::unavailable(config)?;
            tracing::warn!("the app could not be imported; answering 503 until a watched file changes");
            control.send(&Message::Unavailable);
            Ok(app)
        }
    }
}

/// Serves a loaded app (imported here, or by the zygote this process was forked from): starts the app threads
/// and the async side, and serves until told to stop. The caller has entered the worker's span. Does not return on success: the process exits without
/// finalising Python.
pub(crate) fn serve(
    app: App,
    config: Config,
    sockets: Vec<BoundSocket>,
    mut control: ToMaster,
) -> Result<(), WorkerError> {
    tune_malloc();
    let (lifecycle, retire_rx) = Lifecycle::new(&config);
    // The files were checked by the master; each worker loads them itself, so one started by a reload uses the
    // renewed certificate. The session-ticket keys are the master's, the same in every worker.
    let (tls, tickets) = match &config.tls.files {
        None => (None, None),
        Some(files) => {
            match crate::tls::server_config(files, control.receive_ticket_keys()?, config.tls.ticket_rotation) {
                Ok((tls, tickets)) => (Some(tls), Some(tickets)),
                Err(error) => {
                    tracing::error!("{error}");
                    std::process::exit(EXIT_APP_LOAD);
                }
            }
        }
    };
    let ctx = Arc::new(WorkerContext::new(config, lifecycle, tls));
    // One thread for the async side: the app threads serve most requests end to end, so it only reads slow
    // peers, answers refusals and keeps time; a second runtime thread would compete for the same cores.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(crate::server::run(sockets, &app, ctx, retire_rx, control, tickets))?;
    app::run_exit_handlers();
    // The app threads are parked waiting for work; end without finalising the interpreter under them.
    std::process::exit(0);
}
