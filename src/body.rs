//! A request body as the connection read it: in memory, or spooled to an unlinked temporary file when it is
//! larger than `--body-buffer-size`, so large uploads never have to sit whole in memory.

use std::fs::File;

use bytes::Bytes;

#[derive(Debug)]
pub(crate) enum Body {
    Memory(Bytes),
    /// An unlinked temporary file holding exactly `len` bytes.
    Spooled {
        file: File,
        len: u64,
    },
}

impl Body {
    pub(crate) fn len(&self) -> u64 {
        match self {
            Body::Memory(b) => b.len() as u64,
            Body::Spooled { len, .. } => *len,
        }
    }
}
