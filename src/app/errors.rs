//! `wsgi.errors` and Python tracebacks, both into the server's log.

use std::sync::Mutex;

use pyo3::prelude::*;

/// Formats an exception with its traceback, as Python would print it.
pub(crate) fn format_exception(py: Python<'_>, err: &PyErr) -> String {
    let formatted = py
        .import("traceback")
        .and_then(|tb| tb.call_method1("format_exception", (err.get_type(py), err.value(py), err.traceback(py))))
        .and_then(|lines| lines.extract::<Vec<String>>());
    match formatted {
        Ok(lines) => lines.concat().trim_end().to_owned(),
        // Formatting itself failed (a broken __str__, say): the exception's type and value still help.
        Err(_) => err.to_string(),
    }
}

/// `wsgi.errors`: a text stream whose writes go to the log, one record per write (a traceback logged in one
/// call stays one record); a write that does not end its line waits for the rest, or for the request's end.
#[pyclass(module = "ferrule")]
pub(crate) struct ErrorStream {
    /// A line written in several pieces, until its newline arrives.
    partial: Mutex<String>,
}

impl ErrorStream {
    pub(crate) fn new() -> ErrorStream {
        ErrorStream {
            partial: Mutex::new(String::new()),
        }
    }

    fn emit(line: &str) {
        tracing::warn!(target: "ferrule::wsgi_errors", line = %line.trim_end_matches('\r'), "wsgi.errors");
    }
}

#[pymethods]
impl ErrorStream {
    fn write(&self, s: &str) -> usize {
        // A poisoned lock only means another writer panicked mid-line; the text is still usable.
        let mut partial = crate::sync::lock(&self.partial);
        partial.push_str(s);
        if let Some(nl) = partial.rfind('\n') {
            Self::emit(&partial[..nl]);
            partial.drain(..=nl);
        }
        s.chars().count()
    }

    fn writelines(&self, lines: &Bound<'_, PyAny>) -> PyResult<()> {
        for line in lines.try_iter()? {
            self.write(line?.extract::<&str>()?);
        }
        Ok(())
    }

    pub(super) fn flush(&self) {
        let mut partial = crate::sync::lock(&self.partial);
        if !partial.is_empty() {
            Self::emit(&partial);
            partial.clear();
        }
    }

    fn writable(&self) -> bool {
        true
    }
}
