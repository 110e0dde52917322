//! ferrule: a WSGI server for Python web apps behind nginx, speaking only the uwsgi protocol.
//!
//! ferrule ships as a Python package: `entry` is the extension module's `main`, which the `ferrule` command
//! and `python -m ferrule` call inside the Python that runs the app.
//!
//! nginx terminates HTTP and forwards each request with `uwsgi_pass`. A master process ([`master`]) binds the
//! sockets and supervises worker processes ([`worker`]); in each worker a request flows through these stages,
//! one module each, in this order:
//!
//! 1. [`listener`]: bind Unix and TCP sockets (or inherit them), accept connections.
//! 2. [`server`]: the accept loop, connection tasks, graceful stop.
//! 3. [`connection`]: one connection: read the packet and the body, hand the request over, write the response.
//! 4. [`packet`]: the uwsgi wire format (pure nom parsers).
//! 5. [`environ`]: packet vars to the PEP 3333 environ (pure).
//! 6. [`app`]: the Python boundary: the interpreter, the app, the thread pool, `start_response`, `wsgi.input`.
//! 7. [`response`]: status and headers to HTTP/1.1 bytes, and the server's own error answers.
//!
//! [`config`] validates the options once; [`body`] is the request body type passed from connection to app.

mod entry;
pub mod config;
pub mod metrics;
pub mod master;
pub mod worker;
pub mod listener;
pub mod server;
pub mod connection;
pub mod packet;
pub mod environ;
pub mod body;
pub mod app;
pub mod response;
