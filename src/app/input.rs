//! `wsgi.input`: the request body as a file-like object that never reads past `CONTENT_LENGTH`.

use std::fs::File;
use std::os::unix::fs::FileExt;

use bytes::Bytes;
use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use crate::body::Body;

/// Block size for reading a spooled body; large enough that readline() on it makes few syscalls.
const FILE_BLOCK: usize = 64 * 1024;

enum Source {
    Memory(Bytes),
    File { file: File, block: Vec<u8>, block_at: u64 },
}

#[pyclass(module = "ferrule")]
pub(crate) struct Input {
    source: Source,
    pos: u64,
    len: u64,
}

impl Input {
    pub(crate) fn new(body: Body) -> Input {
        let len = body.len();
        let source = match body {
            Body::Memory(b) => Source::Memory(b),
            Body::Spooled { file, .. } => Source::File {
                file,
                block: Vec::new(),
                block_at: 0,
            },
        };
        Input { source, pos: 0, len }
    }

    fn remaining(&self) -> u64 {
        self.len - self.pos
    }

    /// How many bytes a `size` argument asks for: negative or None means all that is left.
    fn wanted(&self, size: Option<i64>) -> usize {
        let left = self.remaining();
        let n = match size {
            Some(n) if n >= 0 => (n as u64).min(left),
            _ => left,
        };
        usize::try_from(n).unwrap_or(usize::MAX)
    }

    /// The bytes available at the current position without another read (at most `max`).
    fn window(&mut self, max: usize) -> std::io::Result<&[u8]> {
        let pos = self.pos;
        match &mut self.source {
            Source::Memory(b) => {
                let start = pos as usize;
                Ok(&b[start..start + max.min(b.len() - start)])
            }
            Source::File { file, block, block_at } => {
                let in_block = pos >= *block_at && pos < *block_at + block.len() as u64;
                if !in_block {
                    let want = FILE_BLOCK.min((self.len - pos) as usize);
                    block.resize(want, 0);
                    file.read_exact_at(block, pos)?;
                    *block_at = pos;
                }
                let start = (pos - *block_at) as usize;
                Ok(&block[start..start + max.min(block.len() - start)])
            }
        }
    }

    fn read_bytes<'py>(&mut self, py: Python<'py>, n: usize) -> PyResult<Bound<'py, PyBytes>> {
        if let Source::File { file, .. } = &self.source {
            if n > FILE_BLOCK {
                // A big read from disk: do it without the GIL, then make the bytes object.
                let pos = self.pos;
                let mut buf = vec![0u8; n];
                py.detach(|| file.read_exact_at(&mut buf, pos))
                    .map_err(|e| PyOSError::new_err(format!("cannot read the spooled request body: {e}")))?;
                self.pos += n as u64;
                return Ok(PyBytes::new(py, &buf));
            }
        }
        let mut out: Vec<u8> = Vec::new();
        let mut left = n;
        while left > 0 {
            let chunk = self.window(left).map_err(spool_error)?;
            if left == n && chunk.len() == n {
                // The common case: one slice covers the read, so no intermediate copy.
                let bytes = PyBytes::new(py, chunk);
                self.pos += n as u64;
                return Ok(bytes);
            }
            out.extend_from_slice(chunk);
            let got = chunk.len();
            self.pos += got as u64;
            left -= got;
        }
        Ok(PyBytes::new(py, &out))
    }

    fn read_line<'py>(&mut self, py: Python<'py>, limit: usize) -> PyResult<Bound<'py, PyBytes>> {
        let mut out: Vec<u8> = Vec::new();
        let mut left = limit;
        while left > 0 {
            let chunk = self.window(left).map_err(spool_error)?;
            let (take, done) = match memchr_newline(chunk) {
                Some(i) => (i + 1, true),
                None => (chunk.len(), false),
            };
            if out.is_empty() && (done || take == left) {
                let bytes = PyBytes::new(py, &chunk[..take]);
                self.pos += take as u64;
                return Ok(bytes);
            }
            out.extend_from_slice(&chunk[..take]);
            self.pos += take as u64;
            left -= take;
            if done {
                break;
            }
        }
        Ok(PyBytes::new(py, &out))
    }
}

fn memchr_newline(s: &[u8]) -> Option<usize> {
    s.iter().position(|&b| b == b'\n')
}

fn spool_error(e: std::io::Error) -> PyErr {
    PyOSError::new_err(format!("cannot read the spooled request body: {e}"))
}

#[pymethods]
impl Input {
    /// read(size=-1): up to `size` bytes, all that is left when negative or omitted; b"" at the end.
    #[pyo3(signature = (size = None))]
    fn read<'py>(&mut self, py: Python<'py>, size: Option<i64>) -> PyResult<Bound<'py, PyBytes>> {
        let n = self.wanted(size);
        self.read_bytes(py, n)
    }

    /// readline(size=-1): one line including its newline, at most `size` bytes.
    #[pyo3(signature = (size = None))]
    fn readline<'py>(&mut self, py: Python<'py>, size: Option<i64>) -> PyResult<Bound<'py, PyBytes>> {
        let n = self.wanted(size);
        self.read_line(py, n)
    }

    /// readlines(hint=-1): the remaining lines; stops once `hint` bytes were read when it is positive.
    #[pyo3(signature = (hint = None))]
    fn readlines<'py>(&mut self, py: Python<'py>, hint: Option<i64>) -> PyResult<Bound<'py, PyList>> {
        let lines = PyList::empty(py);
        let mut total = 0u64;
        while self.remaining() > 0 {
            let line = self.read_line(py, self.wanted(None))?;
            total += line.as_bytes().len() as u64;
            lines.append(line)?;
            if matches!(hint, Some(h) if h > 0 && total >= h as u64) {
                break;
            }
        }
        Ok(lines)
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        if self.remaining() == 0 {
            return Ok(None);
        }
        let n = self.wanted(None);
        self.read_line(py, n).map(Some)
    }

    fn readable(&self) -> bool {
        true
    }
}
