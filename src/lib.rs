//! ferrule: a WSGI server for Python web apps behind nginx, speaking only the uwsgi protocol.
//!
//! ferrule ships as a Python package: `entry` is the extension module's `main`, which the `ferrule` command
//! and `python -m ferrule` call inside the Python that runs the app.
//!
//! nginx terminates HTTP and forwards each request with `uwsgi_pass`. A master process binds the sockets and
//! supervises worker processes; in each worker a request flows socket -> packet -> environ -> app -> response
//! -> socket. The modules are layered: each imports only those listed before it (`.ci/import_cycles.py`
//! checks that no import runs the other way).
//!
//! 1. The foundation, no sockets and no Python: `packet` (the uwsgi wire format: one `decode` for every read
//!    path), `sync` (locks that a panic does not poison for everyone after it), `log_fields` (the text log's
//!    fields, written without styling when there is no colour), `tls` (reads and checks the files of tls://
//!    sockets, builds the rustls configuration, the shared session tickets), `resources` (the CPUs and memory
//!    this process may use: affinity, cpuset, CPU quota and memory limit), `config` (the
//!    options from the command line, the environment and the `--config` file, validated once and handed to
//!    workers), `environ` (packet vars to the PEP 3333 environ), `body` (the request body, in memory or spooled
//!    to a file), `response` (HTTP/1.1 heads, response framing, the server's own answers), `metrics` (counters,
//!    the memory read from /proc, their exposition), `lifecycle` (when a worker retires, and the count of work
//!    in flight that a stop drains). Pure functions except where a part says it reads a file.
//! 2. `listener`: bind Unix and TCP sockets (or inherit them), accept, peek, sendfile.
//! 3. `control`: the line between the master and a worker, both ends.
//! 4. `app`: the Python boundary: the interpreter, the app, its threads, `start_response`, `wsgi.input`. It
//!    defines what it needs from above: a request source and a response sink.
//! 5. `connection`: one connection: read the request (on the app thread when it is all there, else on the
//!    async side), implement the response sink, the `--timeout` watchdog and the access log.
//! 6. `server`: the worker's intake (app threads accept; the async side reads the rest), the connection limit,
//!    and the drain on stop.
//! 7. `worker`: wires one worker together; `preload`: the `--preload` zygote, which imports the app once and
//!    forks workers from it; `master`: supervision, signals and reload (it never imports the app); `entry`:
//!    the command.

pub mod packet;
pub(crate) mod sync;
pub(crate) mod log_fields;
pub(crate) mod log_scope;
pub(crate) mod tls;
pub(crate) mod resources;
pub(crate) mod config;
pub mod environ;
pub(crate) mod body;
pub(crate) mod response;
pub(crate) mod metrics;
pub(crate) mod lifecycle;
pub(crate) mod listener;
pub(crate) mod control;
pub(crate) mod app;
pub(crate) mod connection;
pub(crate) mod server;
pub(crate) mod worker;
pub(crate) mod preload;
pub(crate) mod master;
mod entry;
