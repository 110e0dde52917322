//! `wsgi.file_wrapper`: an iterable over a file-like object that the server may instead send with sendfile(2).

use std::fs::File;
use std::os::fd::BorrowedFd;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

#[pyclass(module = "ferrule")]
pub(crate) struct FileWrapper {
    filelike: Py<PyAny>,
    blksize: usize,
}

/// A real file the response can be sent from: where to start and how much there is.
pub(crate) struct SendableFile {
    pub(crate) file: File,
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

impl FileWrapper {
    /// A duplicate of the wrapped file's descriptor when it is a regular file, positioned as PEP 3333 asks:
    /// transmission begins at the file's current position.
    pub(crate) fn sendable(&self, py: Python<'_>) -> Option<SendableFile> {
        let filelike = self.filelike.bind(py);
        let fd: i32 = filelike.call_method0("fileno").ok()?.extract().ok()?;
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` was just returned by fileno() of a file object we hold a reference to, so it stays open
        // while it is borrowed here; it is duplicated at once and only the duplicate is kept.
        let file = File::from(unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned().ok()?);
        let meta = file.metadata().ok()?;
        if !meta.is_file() {
            return None;
        }
        // tell() accounts for what a buffered Python file has read ahead; a raw descriptor has no such buffer.
        let offset = filelike
            .call_method0("tell")
            .and_then(|t| t.extract::<u64>())
            .unwrap_or_default();
        Some(SendableFile {
            file,
            offset,
            len: meta.len().saturating_sub(offset),
        })
    }
}

#[pymethods]
impl FileWrapper {
    #[new]
    #[pyo3(signature = (filelike, blksize = 8192))]
    fn new(filelike: Py<PyAny>, blksize: usize) -> FileWrapper {
        FileWrapper {
            filelike,
            blksize: blksize.max(1),
        }
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let chunk = self.filelike.bind(py).call_method1("read", (self.blksize,))?;
        let empty = match chunk.cast::<PyBytes>() {
            Ok(b) => b.as_bytes().is_empty(),
            Err(_) => chunk.is_empty().unwrap_or(true),
        };
        Ok(if empty { None } else { Some(chunk) })
    }

    /// Closes the wrapped file, as PEP 3333 asks of a file wrapper's close().
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let filelike = self.filelike.bind(py);
        if filelike.hasattr("close")? {
            filelike.call_method0("close")?;
        }
        Ok(())
    }
}
