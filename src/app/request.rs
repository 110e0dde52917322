//! One request on an app thread: the environ dict, `start_response` and `write()`, iterating the response
//! and `close()`, written to the connection as the app produces it.

use std::cell::RefCell;
use std::collections::HashMap;

use bytes::Bytes;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList, PyString, PyTuple};

use super::errors::{ErrorStream, format_exception};
use super::file_wrapper::{FileWrapper, SendableFile};
use super::input::Input;
use super::sink::{Gone, Request, RequestSource, ResponseSink};
use crate::body::Body;
use crate::environ::{Environ, UrlScheme};
use crate::response::{self, Chunk, Framing, Headers, NotStarted};

/// How many distinct environ keys a thread keeps as ready Python strings; beyond it keys are made per request,
/// so hostile header names cannot grow the cache without bound.
const KEY_CACHE_LIMIT: usize = 512;

/// What every app thread shares: the app callable and the constant parts of the environ.
pub(super) struct AppState {
    pub(super) app: Py<PyAny>,
    pub(super) multithread: bool,
    pub(super) multiprocess: bool,
}

/// The body of a request thread: take requests from `source` and run them. The GIL is held only while Python
/// runs: accepting, reading and decoding the next request and writing the response happen without it, so with
/// several threads one thread's I/O can overlap another's Python, as in uWSGI. (Measured alone, this was
/// neutral on hello with 4 threads; holding the GIL across a stream's non-blocking writes was neutral too,
/// so the simpler rule stays.)
pub(super) fn run_thread(state: &AppState, mut source: Box<dyn RequestSource>) {
    Python::attach(|py| {
        let ctx = match ThreadContext::new(py, state) {
            Ok(ctx) => ctx,
            Err(e) => {
                tracing::error!(traceback = %format_exception(py, &e), "cannot prepare an app thread");
                return;
            }
        };
        let ident = thread_ident(py);
        while let Some(Request {
            environ,
            body,
            scope,
            sink,
        }) = py.detach(|| source.next())
        {
            sink.running_on(ident);
            let _entered = scope.enter();
            ctx.handle(py, environ, body, sink);
        }
    });
}

/// This thread's `threading.get_ident()`, the key of `sys._current_frames()`.
fn thread_ident(py: Python<'_>) -> u64 {
    py.import("threading")
        .and_then(|t| t.call_method0("get_ident"))
        .and_then(|i| i.extract::<u64>())
        .unwrap_or(0)
}

/// Why a request could not be answered normally.
enum Failure {
    /// The app raised, or one of its calls to start_response/write was refused.
    Python(PyErr),
    /// The app broke a PEP 3333 rule the server noticed itself ("TypeError: ..." style message).
    Protocol(String),
    /// The same, with a traceback-shaped report pointing at the app's code.
    Located(String),
    /// The connection is gone; there is nobody to answer.
    ClientGone,
}

impl From<PyErr> for Failure {
    fn from(e: PyErr) -> Failure {
        Failure::Python(e)
    }
}

impl From<NotStarted> for Failure {
    fn from(e: NotStarted) -> Failure {
        Failure::Protocol(e.to_string())
    }
}

impl From<Gone> for Failure {
    fn from(_: Gone) -> Failure {
        Failure::ClientGone
    }
}

/// Per-thread Python objects, made once.
struct ThreadContext<'py> {
    app: Bound<'py, PyAny>,
    /// The constant part of every environ; each request starts from a copy.
    base: Bound<'py, PyDict>,
    keys: RefCell<HashMap<Bytes, Py<PyString>>>,
    /// The keys of the last request by position: nginx sends the same params in the same order every time,
    /// so a key is nearly always found by one comparison, without hashing it.
    by_position: RefCell<Vec<(Bytes, Py<PyString>)>>,
    /// This thread's `wsgi.errors`, flushed after each request so a last line without a newline is logged.
    errors: Bound<'py, ErrorStream>,
}

impl<'py> ThreadContext<'py> {
    fn new(py: Python<'py>, state: &AppState) -> PyResult<ThreadContext<'py>> {
        let base = PyDict::new(py);
        let errors = Bound::new(py, ErrorStream::new())?;
        base.set_item("wsgi.version", (1, 0))?;
        base.set_item("wsgi.errors", &errors)?;
        base.set_item("wsgi.multithread", state.multithread)?;
        base.set_item("wsgi.multiprocess", state.multiprocess)?;
        base.set_item("wsgi.run_once", false)?;
        base.set_item("wsgi.file_wrapper", py.get_type::<FileWrapper>())?;
        base.set_item("wsgi.input_terminated", true)?;
        Ok(ThreadContext {
            app: state.app.bind(py).clone(),
            base,
            keys: RefCell::new(HashMap::new()),
            by_position: RefCell::new(Vec::new()),
            errors,
        })
    }

    fn handle(&self, py: Python<'py>, environ: Environ, body: Body, sink: Box<dyn ResponseSink>) {
        let state = ResponseState::new(sink, &environ.method[..] == b"HEAD");
        let start_response = match Bound::new(py, StartResponse { state }) {
            Ok(sr) => sr,
            Err(e) => {
                tracing::error!(error = %e, "cannot create start_response");
                return;
            }
        };
        if let Err(failure) = self.run(py, &environ, body, &start_response) {
            fail(py, &start_response, failure);
        }
        self.errors.borrow().flush();
    }

    fn run(
        &self,
        py: Python<'py>,
        environ: &Environ,
        body: Body,
        sr: &Bound<'py, StartResponse>,
    ) -> Result<(), Failure> {
        let env = self.environ_dict(py, environ, body)?;
        let result = self.app.call1((env, sr))?;
        let sent = respond(py, sr, &result).map_err(|failure| match failure {
            Failure::Protocol(msg) => Failure::Located(located_traceback(&result, &self.app, &msg)),
            other => other,
        });
        // PEP 3333: close() is called whatever happened, including errors and client aborts.
        close_iterable(py, &result);
        sent
    }

    fn environ_dict(&self, py: Python<'py>, environ: &Environ, body: Body) -> PyResult<Bound<'py, PyDict>> {
        let env = self.base.copy()?;
        for (at, (key, value)) in environ.iter().enumerate() {
            env.set_item(self.key_at(py, at, key)?, latin1(py, value)?)?;
        }
        let scheme = match environ.url_scheme {
            UrlScheme::Http => intern!(py, "http"),
            UrlScheme::Https => intern!(py, "https"),
        };
        env.set_item(intern!(py, "wsgi.url_scheme"), scheme)?;
        env.set_item(intern!(py, "wsgi.input"), Bound::new(py, Input::new(body))?)?;
        Ok(env)
    }

    /// The key at position `at` of this request's vars: the last request's key at the same place when it is the
    /// same, else [`Self::key`], which then takes that place.
    fn key_at(&self, py: Python<'py>, at: usize, key: &[u8]) -> PyResult<Bound<'py, PyString>> {
        let mut by_position = self.by_position.borrow_mut();
        if let Some((known, k)) = by_position.get(at) {
            if known == key {
                return Ok(k.bind(py).clone());
            }
        }
        let k = self.key(py, key)?;
        // A copy, so the cache does not hold on to the buffer of the request the key came in.
        let entry = (Bytes::copy_from_slice(key), k.clone().unbind());
        if let Some(slot) = by_position.get_mut(at) {
            *slot = entry;
        } else if at == by_position.len() && at < KEY_CACHE_LIMIT {
            by_position.push(entry);
        }
        Ok(k)
    }

    /// Environ keys repeat on every request: keep them as ready Python strings.
    fn key(&self, py: Python<'py>, key: &[u8]) -> PyResult<Bound<'py, PyString>> {
        let mut keys = self.keys.borrow_mut();
        if let Some(k) = keys.get(key) {
            return Ok(k.bind(py).clone());
        }
        let k = latin1(py, key)?;
        if keys.len() < KEY_CACHE_LIMIT {
            keys.insert(Bytes::copy_from_slice(key), k.clone().unbind());
        }
        Ok(k)
    }
}

/// PEP 3333 "native strings": every byte becomes the code point of the same number (latin-1). CPython's own
/// latin-1 decoder makes the string in one pass (ASCII, the usual case, is a copy).
fn latin1<'py>(py: Python<'py>, bytes: &[u8]) -> PyResult<Bound<'py, PyString>> {
    let len = pyo3::ffi::Py_ssize_t::try_from(bytes.len())
        .map_err(|_| pyo3::exceptions::PyOverflowError::new_err("environ value too long"))?;
    // SAFETY: the pointer and length describe `bytes`, which outlives the call; a NULL errors argument is
    // "strict", and latin-1 decodes every byte, so the call fails only when out of memory, which is returned
    // as the Python exception it set.
    unsafe {
        let s = pyo3::ffi::PyUnicode_DecodeLatin1(bytes.as_ptr().cast(), len, std::ptr::null());
        Ok(Bound::from_owned_ptr_or_err(py, s)?.cast_into_unchecked())
    }
}

/// Sends the app's response iterable.
fn respond<'py>(py: Python<'py>, sr: &Bound<'py, StartResponse>, result: &Bound<'py, PyAny>) -> Result<(), Failure> {
    if let Ok(wrapper) = result.cast::<FileWrapper>() {
        if let Some(file) = wrapper.borrow().sendable(py) {
            return sr.borrow_mut().state.send_file(py, file);
        }
    }
    // PEP 3333 wants an iterable of bytes, but uWSGI sends a bare bytes object as the body and apps written
    // for it rely on that: it is served as `[body]`. A bytearray is copied first, since another thread could
    // resize it while it is written without the GIL.
    if let Ok(bytes) = result.cast::<PyBytes>() {
        warn_bare_body("bytes");
        return sr.borrow_mut().state.send_whole(py, &[bytes.as_bytes()]);
    }
    if let Ok(array) = result.cast::<PyByteArray>() {
        warn_bare_body("bytearray");
        let copy = array.to_vec();
        return sr.borrow_mut().state.send_whole(py, &[&copy[..]]);
    }
    // A list or tuple is the whole body at once: one write, with a Content-Length.
    if let Ok(list) = result.cast::<PyList>() {
        return send_whole(py, sr, list.iter());
    }
    if let Ok(tuple) = result.cast::<PyTuple>() {
        return send_whole(py, sr, tuple.iter());
    }
    for item in result.try_iter()? {
        let item = item?;
        let chunk = as_bytes(&item)?;
        sr.borrow_mut().state.send_chunk(py, chunk.as_bytes())?;
    }
    sr.borrow_mut().state.finish(py)
}

/// Says once per worker that the app returns a bare bytes object, which other servers may reject.
fn warn_bare_body(kind: &str) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            kind,
            "the app returned a bare {kind} object, served as its whole body; PEP 3333 requires an iterable of \
             bytes (return [body]; wsgiref.validate rejects this) (said once per worker)"
        );
    }
}

fn as_bytes<'a, 'py>(item: &'a Bound<'py, PyAny>) -> Result<&'a Bound<'py, PyBytes>, Failure> {
    item.cast::<PyBytes>().map_err(|_| {
        let kind = item.get_type().name().map(|n| n.to_string()).unwrap_or_default();
        Failure::Protocol(format!(
            "the response iterable yielded {kind}, but PEP 3333 requires bytes"
        ))
    })
}

fn send_whole<'py>(
    py: Python<'py>,
    sr: &Bound<'py, StartResponse>,
    items: impl Iterator<Item = Bound<'py, PyAny>>,
) -> Result<(), Failure> {
    let items: Vec<Bound<'py, PyAny>> = items.collect();
    let mut chunks = Vec::with_capacity(items.len());
    for item in &items {
        chunks.push(as_bytes(item)?.as_bytes());
    }
    sr.borrow_mut().state.send_whole(py, &chunks)
}

fn close_iterable(py: Python<'_>, result: &Bound<'_, PyAny>) {
    // Lists and tuples have no close(); skip the failing attribute lookup on the hot path.
    if result.is_exact_instance_of::<PyList>() || result.is_exact_instance_of::<PyTuple>() {
        return;
    }
    if let Ok(close) = result.getattr(intern!(py, "close")) {
        if let Err(e) = close.call0() {
            tracing::error!(traceback = %format_exception(py, &e), "close() of the response iterable raised");
        }
    }
}

/// A traceback-shaped report for a PEP 3333 violation the server detected itself, so no Python frame raised
/// it: it points at the generator where it is suspended, else at the app callable.
fn located_traceback(result: &Bound<'_, PyAny>, app: &Bound<'_, PyAny>, msg: &str) -> String {
    let mut out = String::from("Traceback (most recent call last):\n");
    if let Some((file, line, name)) = generator_location(result).or_else(|| callable_location(app)) {
        out.push_str(&format!("  File \"{file}\", line {line}, in {name}\n"));
    }
    out.push_str(msg);
    out
}

type Location = (String, u32, String);

/// The suspended generator's current line.
fn generator_location(obj: &Bound<'_, PyAny>) -> Option<Location> {
    let frame = obj.getattr("gi_frame").ok().filter(|f| !f.is_none())?;
    code_location(&frame.getattr("f_code").ok()?, &frame.getattr("f_lineno").ok()?)
}

/// Where the app callable (a function, or an object with `__call__`) is defined.
fn callable_location(app: &Bound<'_, PyAny>) -> Option<Location> {
    let code = app
        .getattr("__code__")
        .or_else(|_| app.getattr("__call__").and_then(|c| c.getattr("__code__")))
        .ok()?;
    code_location(&code, &code.getattr("co_firstlineno").ok()?)
}

fn code_location(code: &Bound<'_, PyAny>, line: &Bound<'_, PyAny>) -> Option<Location> {
    Some((
        code.getattr("co_filename").ok()?.extract().ok()?,
        line.extract().ok()?,
        code.getattr("co_name").ok()?.extract().ok()?,
    ))
}

/// Logs the failure and gives nginx the right answer: a 500 if nothing was sent yet, else a reset.
fn fail(py: Python<'_>, sr: &Bound<'_, StartResponse>, failure: Failure) {
    match &failure {
        Failure::ClientGone => {
            tracing::debug!("client went away during the response");
            return;
        }
        Failure::Python(e) => {
            tracing::error!(traceback = %format_exception(py, e), "application error")
        }
        Failure::Protocol(msg) => tracing::error!(error = %msg, "application error"),
        Failure::Located(traceback) => tracing::error!(traceback = %traceback, "application error"),
    }
    let mut sr = sr.borrow_mut();
    let r = &mut sr.state;
    if r.framing.head_sent() {
        let status = r.framing.status_code();
        let body_bytes = r.framing.body_bytes();
        let _ = r.end(py, &[], status, body_bytes, false);
    } else {
        let answer = r.framing.server_error();
        let body_bytes = r.framing.body_bytes();
        let _ = r.end(py, &[&answer], 500, body_bytes, true);
    }
}

/// One response on its way: its framing (what start_response recorded and what has been sent) and the sink it
/// goes to, until the response is completed or aborted.
struct ResponseState {
    framing: Framing,
    sink: Option<Box<dyn ResponseSink>>,
}

impl ResponseState {
    fn new(sink: Box<dyn ResponseSink>, is_head: bool) -> ResponseState {
        ResponseState {
            framing: Framing::new(is_head),
            sink: Some(sink),
        }
    }

    /// Writes `bufs` before returning, without the GIL and straight from the app's bytes objects (no copy:
    /// they are immutable and referenced by the caller until this returns).
    fn write(&mut self, py: Python<'_>, bufs: &[&[u8]]) -> Result<(), Failure> {
        let sink = self.sink.as_mut().ok_or(Failure::ClientGone)?;
        Ok(py.detach(|| sink.send(bufs))?)
    }

    /// Writes the response's last bytes and ends it, complete or aborted, all in one release of the GIL.
    fn end(
        &mut self,
        py: Python<'_>,
        last: &[&[u8]],
        status: u16,
        body_bytes: u64,
        complete: bool,
    ) -> Result<(), Failure> {
        let sink = self.sink.take().ok_or(Failure::ClientGone)?;
        let ended = py.detach(move || {
            if complete {
                sink.complete(last, status, body_bytes)
            } else {
                sink.abort(last, status, body_bytes)
            }
        });
        Ok(ended?)
    }

    /// A body known in full (a list or tuple): head and chunks in one writev, with a Content-Length.
    fn send_whole(&mut self, py: Python<'_>, chunks: &[&[u8]]) -> Result<(), Failure> {
        if self.framing.head_sent() {
            // The app already streamed part of the body through write(): the rest follows as plain chunks.
            for chunk in chunks {
                self.send_chunk(py, chunk)?;
            }
            return self.finish(py);
        }
        let (head, body) = self.framing.whole(chunks)?;
        let mut parts: Vec<&[u8]> = Vec::with_capacity(body.len() + 1);
        parts.push(&head);
        parts.extend(body);
        self.finish_with(py, &parts)
    }

    fn send_chunk(&mut self, py: Python<'_>, data: &[u8]) -> Result<(), Failure> {
        match self.framing.chunk(data)? {
            None => Ok(()),
            // The head and the first chunk go out in one writev.
            Some(Chunk { head: Some(head), data }) => self.write(py, &[&head, data]),
            Some(Chunk { head: None, data }) => self.write(py, &[data]),
        }
    }

    fn send_file(&mut self, py: Python<'_>, file: SendableFile) -> Result<(), Failure> {
        let (head, len) = self.framing.file(file.len)?;
        self.write(py, &[&head])?;
        if len > 0 {
            let sink = self.sink.as_mut().ok_or(Failure::ClientGone)?;
            py.detach(|| sink.send_file(&file.file, file.offset, len))?;
        }
        self.finish(py)
    }

    /// The body is complete: send the head if no chunk carried it, then end the response.
    fn finish(&mut self, py: Python<'_>) -> Result<(), Failure> {
        self.finish_with(py, &[])
    }

    /// Writes `last`, the response's final bytes (after the head, if no chunk carried it), and ends the
    /// response: complete, or reset if the app sent less than its Content-Length.
    fn finish_with(&mut self, py: Python<'_>, last: &[&[u8]]) -> Result<(), Failure> {
        let (head, ending) = self.framing.finish()?;
        let body_bytes = self.framing.body_bytes();
        match head {
            Some(head) => self.end(py, &[&head], ending.status, body_bytes, ending.complete),
            None => self.end(py, last, ending.status, body_bytes, ending.complete),
        }
    }
}

/// The `start_response` callable handed to the app; its `write` method is the PEP 3333 write() callable.
#[pyclass(module = "ferrule")]
pub(crate) struct StartResponse {
    state: ResponseState,
}

#[pymethods]
impl StartResponse {
    #[pyo3(signature = (status, headers, exc_info = None))]
    fn __call__<'py>(
        slf: &Bound<'py, Self>,
        status: &Bound<'py, PyAny>,
        headers: &Bound<'py, PyAny>,
        exc_info: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        {
            let mut this = slf.borrow_mut();
            let r = &mut this.state;
            match exc_info.filter(|e| !e.is_none()) {
                // PEP 3333: once the headers are out, start_response with exc_info re-raises the exception.
                Some(exc) if r.framing.head_sent() => return Err(PyErr::from_value(exc.get_item(1)?)),
                Some(_) => {}
                None if r.framing.is_started() => {
                    return Err(PyRuntimeError::new_err(
                        "start_response() was called a second time without exc_info",
                    ));
                }
                None => {}
            }
            let status: String = status
                .cast::<PyString>()
                .map_err(|_| PyTypeError::new_err("status must be a str such as '200 OK'"))?
                .to_str()?
                .to_owned();
            let code = response::parse_status(&status).map_err(|e| PyValueError::new_err(e.to_string()))?;
            let (headers, declared_length) = parse_headers(headers)?;
            r.framing.start(status, code, headers, declared_length);
        }
        slf.getattr(intern!(slf.py(), "write"))
    }

    /// The write() callable: sends the headers if needed, then `data`, before returning.
    fn write(&mut self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let chunk = data
            .cast::<PyBytes>()
            .map_err(|_| PyTypeError::new_err("write() takes bytes"))?;
        if !self.state.framing.is_started() {
            return Err(PyRuntimeError::new_err("write() was called before start_response()"));
        }
        match self.state.send_chunk(py, chunk.as_bytes()) {
            Ok(()) => Ok(()),
            Err(Failure::ClientGone) => Err(PyOSError::new_err("the client disconnected")),
            Err(Failure::Python(e)) => Err(e),
            Err(Failure::Protocol(msg) | Failure::Located(msg)) => Err(PyRuntimeError::new_err(msg)),
        }
    }
}

/// Checks the app's header list: (str, str) pairs, latin-1, no CR/LF/NUL, no hop-by-hop headers; returns them
/// with the declared Content-Length.
fn parse_headers(headers: &Bound<'_, PyAny>) -> PyResult<(Headers, Option<u64>)> {
    if !(headers.is_instance_of::<PyList>() || headers.is_instance_of::<PyTuple>()) {
        return Err(PyTypeError::new_err(
            "response headers must be a list of (name, value) tuples",
        ));
    }
    let mut out = Vec::with_capacity(headers.len()?);
    let mut declared = None;
    for item in headers.try_iter()? {
        let item = item?;
        let pair = || PyTypeError::new_err("each response header must be a (str, str) tuple");
        if item.len().map_err(|_| pair())? != 2 {
            return Err(pair());
        }
        let name = item.get_item(0)?;
        let value = item.get_item(1)?;
        let name = name.cast::<PyString>().map_err(|_| pair())?.to_str()?.to_owned();
        let value = value.cast::<PyString>().map_err(|_| pair())?.to_str()?.to_owned();
        response::check_header(&name, &value).map_err(|e| PyValueError::new_err(e.to_string()))?;
        if name.eq_ignore_ascii_case("content-length") {
            let parsed = value
                .trim()
                .parse::<u64>()
                .map_err(|_| PyValueError::new_err(format!("invalid Content-Length header {value:?}")))?;
            declared = Some(parsed);
        }
        out.push((name, value));
    }
    Ok((out, declared))
}
