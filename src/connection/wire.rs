//! A connection's socket as the response side uses it: non-blocking writes and sendfile, waiting for room,
//! and the two ways a response ends (consume the rest of the request for an ordinary close, or leave it unread
//! so the close is an error for the peer). [`Takeover`] is what the watchdog gets to answer or cut off a
//! response whose socket the app thread still owns.

use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use nix::poll::PollFlags;
use socket2::{SockRef, Socket};

use crate::listener;

/// Whether an I/O error is the peer going away, an ordinary end that is logged at debug level.
pub(crate) fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof
    )
}

/// The socket of one request's response. Part of the request (at least its last byte) is still queued unread
/// (see the module doc of `connection`).
pub(crate) struct Wire {
    socket: Socket,
    tcp: bool,
    /// Request bytes still queued unread, consumed when the response is complete.
    unread: usize,
}

impl Wire {
    pub(crate) fn new(socket: Socket, tcp: bool, unread: usize) -> Wire {
        Wire { socket, tcp, unread }
    }

    /// One non-blocking writev.
    pub(crate) fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.socket.send_vectored(bufs)
    }

    /// One non-blocking sendfile(2) of up to `count` bytes of `file` from `offset`, which it advances.
    pub(crate) fn send_file(&self, file: &File, offset: &mut u64, count: usize) -> io::Result<usize> {
        listener::sendfile(&self.socket, file, offset, count)
    }

    /// Waits for room to write, at most `timeout`; false when the time ran out.
    pub(crate) fn wait_writable(&self, timeout: Duration) -> io::Result<bool> {
        listener::wait_ready(self.socket.as_fd(), PollFlags::POLLOUT, timeout)
    }

    /// The response is complete: consumes the rest of the request, so the close that follows is an ordinary
    /// end of the response. It was peeked earlier, so it is queued and this returns at once.
    pub(crate) fn finish(&self) -> io::Result<()> {
        listener::discard(&self.socket, self.unread)
    }

    /// Makes the close that follows (dropping the wire) an error for the peer: an RST on TCP, ECONNRESET on a
    /// Unix socket, since the request's last byte is still unread.
    pub(crate) fn reset(&self) {
        if self.tcp {
            let _ = self.socket.set_linger(Some(Duration::ZERO));
        }
    }

    /// What the watchdog needs to answer or cut off this response.
    pub(crate) fn takeover(&self) -> Takeover {
        Takeover {
            fd: self.socket.as_raw_fd(),
            tcp: self.tcp,
            unread: self.unread,
        }
    }
}

/// A handle on a [`Wire`] for another thread (the watchdog) to answer or cut off its response while the app
/// thread owns it. It borrows the wire's descriptor by number, so each use must be known to fall inside the
/// wire's life: its methods are `unsafe`, and the watchdog calls them only under the lock that the app
/// thread takes to end the response.
pub(crate) struct Takeover {
    fd: RawFd,
    tcp: bool,
    unread: usize,
}

impl Takeover {
    /// Sends `answer` (a short server response, when nothing of the response was written yet), consumes the
    /// rest of the request so the close is an ordinary end of the answer, and closes the connection now.
    ///
    /// # Safety
    /// The wire this came from must still be open for the whole call.
    pub(crate) unsafe fn answer_and_close(&self, answer: &[u8]) -> io::Result<()> {
        // SAFETY: the caller guarantees the descriptor is open.
        let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
        let socket = SockRef::from(&fd);
        // Nothing was written yet, so the empty socket buffer takes the short answer whole.
        let _ = socket.send(answer);
        let _ = listener::discard(&socket, self.unread);
        // SAFETY: as above.
        unsafe { self.close_under() }
    }

    /// Closes the connection now as an error for the peer (part of the response was written already).
    ///
    /// # Safety
    /// The wire this came from must still be open for the whole call.
    pub(crate) unsafe fn reset_and_close(&self) -> io::Result<()> {
        if self.tcp {
            // SAFETY: the caller guarantees the descriptor is open.
            let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
            let _ = SockRef::from(&fd).set_linger(Some(Duration::ZERO));
        }
        // SAFETY: as above.
        unsafe { self.close_under() }
    }

    /// Closes the connection while the app thread still holds its descriptor number: the number is pointed at
    /// /dev/null in one atomic dup3, so the connection closes now (a reset if its last byte is unread) and the
    /// wire's own close later cannot hit a descriptor reused by another connection.
    ///
    /// # Safety
    /// The wire this came from must still be open.
    unsafe fn close_under(&self) -> io::Result<()> {
        let null = File::open("/dev/null")?;
        // SAFETY: both descriptors are open (the caller guarantees `fd`); dup3 only rebinds the number `fd`.
        if unsafe { libc::dup3(null.as_raw_fd(), self.fd, libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
