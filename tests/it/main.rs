//! ferrule's integration tests: one binary, one module per feature (what is tested, not when a bug was found).
//!
//! Tier 2 feeds captured nginx packets to the library's decoder; tier 3 runs the real `ferrule` command, most
//! often behind a real nginx the test starts on loopback, with real frameworks from PyPI. Every test starts its
//! own servers on temp sockets or free ports, so tests share no state and run in parallel; every wait is bounded.
//! Some tests need root (tmpfs mounts, `--uid`, descriptor limits): CI runs as root, and they fail, not skip,
//! without it.
//!
//! Run one feature with `cargo test --release --test it MODULE::` (for example `tls::`).

mod harness;

/// The uwsgi wire format: captured packets through the decoder, and the fuzz targets' regressions.
mod protocol;
/// One request through a worker: raw uwsgi in, raw HTTP out; through nginx; real frameworks.
mod request_path;
/// The processes: workers, crashes, reloads, stops, timeouts, recycling, signals, failover behind nginx.
mod lifecycle;
/// `--preload`: the zygote, forked workers, its reload and its memory.
mod preload;
/// `tls://` sockets behind nginx's `suwsgi://`.
mod tls;
/// What an operator touches besides the app: options, the config file, logs, metrics, identity, the socket.
mod operations;
/// Hostile and broken peers, faulty apps and the resource limits a server meets.
mod hardening;
/// ferrule as users install it: a Python package in a venv.
mod packaging;
