//! What `--reload` needs from the Python side: the files the app imported from outside the standard library
//! and site-packages (the app's own code, wherever it lives), for the master to watch; the files a failed
//! import went through; and the stand-in app a worker serves, answering 503, while the app does not import.

use std::ffi::CString;
use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyModule;

use super::app_error::AppError;

/// The Python half: which files are the app's own (not under the standard library's or any site-packages
/// directory), the files of a failed import's traceback, and the 503 app.
const HELPERS: &str = r#"
import os, site, sys, sysconfig

def _library_dirs():
    paths = sysconfig.get_paths()
    dirs = [paths.get(key) for key in ("stdlib", "platstdlib", "purelib", "platlib")]
    try:
        dirs.extend(site.getsitepackages())
    except Exception:
        pass
    try:
        dirs.append(site.getusersitepackages())
    except Exception:
        pass
    found = set()
    for d in dirs:
        if d:
            found.add(os.path.join(os.path.abspath(d), ""))
            found.add(os.path.join(os.path.realpath(d), ""))
    return tuple(found)

def own_files(candidates):
    library = _library_dirs()
    files = set()
    for f in candidates:
        if not isinstance(f, str) or not f or f.startswith("<"):
            continue
        f = os.path.abspath(f)
        if f.startswith(library) or os.path.realpath(f).startswith(library):
            continue
        files.add(f)
    return sorted(files)

def imported():
    return own_files(getattr(m, "__file__", None) for m in list(sys.modules.values()))

def of_error(exc):
    files = []
    if isinstance(exc, SyntaxError) and exc.filename:
        files.append(exc.filename)
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        # Where the missing module would be found once it is written.
        relative = exc.name.replace(".", os.sep)
        for d in sys.path:
            d = os.path.abspath(d or ".")
            if os.path.isdir(d):
                files.append(os.path.join(d, relative + ".py"))
                files.append(os.path.join(d, relative, "__init__.py"))
    tb = exc.__traceback__
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    return own_files(files)

def module_file(name):
    import importlib.util
    try:
        spec = importlib.util.find_spec(name)
    except Exception:
        return []
    origin = getattr(spec, "origin", None)
    return own_files([origin]) if spec is not None and getattr(spec, "has_location", False) else []

_BODY = (b"503 Service Unavailable: the app could not be imported (the traceback is in the server's log); "
         b"ferrule imports it again when a watched file changes\n")

def unavailable(environ, start_response):
    start_response("503 Service Unavailable", [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(_BODY))),
        ("Retry-After", "1"),
    ])
    return [_BODY]
"#;

fn helpers(py: Python<'_>) -> PyResult<Bound<'_, PyModule>> {
    // The text above has no NUL byte.
    let code = CString::new(HELPERS).map_err(|e| pyo3::exceptions::PyValueError::new_err(e.to_string()))?;
    PyModule::from_code(py, &code, c"<ferrule-reload>", c"_ferrule_reload")
}

/// The files the app imported so far (every module in `sys.modules` with a `__file__`), absolute, but those
/// of the standard library and site-packages. Empty, with a log line, if Python cannot say.
pub(crate) fn imported_files() -> Vec<PathBuf> {
    Python::attach(|py| helpers(py)?.call_method0("imported")?.extract::<Vec<PathBuf>>()).unwrap_or_else(|error| {
        tracing::warn!(%error, "cannot list the app's imported files; --reload will not see edits to them");
        Vec::new()
    })
}

/// Files of the traceback of a failed import (the one with a syntax error too, and where a missing module
/// would be found once written), for the error's `files`.
pub(super) fn files_of_error(py: Python<'_>, error: &PyErr) -> Vec<PathBuf> {
    helpers(py)
        .and_then(|h| h.call_method1("of_error", (error.value(py),))?.extract())
        .unwrap_or_default()
}

/// The file of the module `name` would be imported from, if it is the app's own; none if it cannot be found.
pub(super) fn module_file(name: &str) -> Vec<PathBuf> {
    Python::attach(|py| {
        helpers(py)?
            .call_method1("module_file", (name,))?
            .extract::<Vec<PathBuf>>()
    })
    .unwrap_or_default()
}

/// Under `--reload`, in place of an app that did not import: a WSGI callable that answers every request with
/// 503 and says why. The interpreter is ready (the failed import ran in it).
pub(super) fn unavailable_app() -> Result<Py<PyAny>, AppError> {
    Python::attach(|py| -> PyResult<Py<PyAny>> { Ok(helpers(py)?.getattr("unavailable")?.unbind()) })
        .map_err(|e| AppError::Interpreter(format!("cannot make the 503 stand-in app: {e}")))
}
