//! A connection's socket as the response side uses it: non-blocking writes and sendfile, waiting for room,
//! and the two ways a response ends (consume the rest of the request for an ordinary close, or leave it unread
//! so the close is an error for the peer). [`Takeover`] is what the watchdog gets to answer or cut off a
//! response whose socket the app thread still owns.

use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::{Arc, Mutex};
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
    /// On a tls:// socket, the session the response is sealed by (shared with the watchdog's takeover).
    tls: Option<Tls>,
}

/// A TLS session, locked for each write.
pub(crate) type Tls = Arc<Mutex<rustls::ServerConnection>>;

/// Most plaintext read from a file per write through TLS (no sendfile through TLS).
const TLS_FILE_CHUNK: usize = 64 * 1024;

impl Wire {
    pub(crate) fn new(socket: Socket, tcp: bool, unread: usize) -> Wire {
        Wire {
            socket,
            tcp,
            unread,
            tls: None,
        }
    }

    /// A TLS connection whose handshake and request reading are done: everything was read (nothing is left
    /// to peek), and the response is sealed by `conn`.
    pub(crate) fn tls(socket: Socket, conn: rustls::ServerConnection) -> Wire {
        Wire {
            socket,
            tcp: true,
            unread: 0,
            tls: Some(Arc::new(Mutex::new(conn))),
        }
    }

    /// Whether the response goes through TLS.
    pub(crate) fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    fn session(tls: &Tls) -> std::sync::MutexGuard<'_, rustls::ServerConnection> {
        crate::sync::lock(tls)
    }

    /// One non-blocking writev (through TLS: the plaintext taken).
    pub(crate) fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match &self.tls {
            None => self.socket.send_vectored(bufs),
            Some(tls) => super::tls_wire::write_vectored(&mut Self::session(tls), &self.socket, bufs),
        }
    }

    /// One non-blocking sendfile(2) of up to `count` bytes of `file` from `offset`, which it advances. Through
    /// TLS the bytes must pass through this process: up to `TLS_FILE_CHUNK` is read and sealed.
    pub(crate) fn send_file(&self, file: &File, offset: &mut u64, count: usize) -> io::Result<usize> {
        let Some(tls) = &self.tls else {
            return listener::sendfile(&self.socket, file, offset, count);
        };
        use std::os::unix::fs::FileExt;
        let mut conn = Self::session(tls);
        // Records still waiting for a full socket: wait for room before reading more of the file.
        super::tls_wire::push_records(&mut conn, &self.socket)?;
        thread_local! {
            /// The app thread's buffer for file chunks on their way into TLS.
            static CHUNK: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        CHUNK.with_borrow_mut(|chunk| {
            chunk.resize(TLS_FILE_CHUNK, 0);
            let want = count.min(TLS_FILE_CHUNK);
            let read = file.read_at(&mut chunk[..want], *offset)?;
            if read == 0 {
                return Ok(0);
            }
            let taken = super::tls_wire::write_vectored(&mut conn, &self.socket, &[IoSlice::new(&chunk[..read])])?;
            *offset += taken as u64;
            Ok(taken)
        })
    }

    /// Waits for room to write, at most `timeout`; false when the time ran out.
    pub(crate) fn wait_writable(&self, timeout: Duration) -> io::Result<bool> {
        listener::wait_ready(self.socket.as_fd(), PollFlags::POLLOUT, timeout)
    }

    /// The response is complete: consumes the rest of the request, so the close that follows is an ordinary
    /// end of the response. It was peeked earlier, so it is queued and this returns at once.
    pub(crate) fn finish(&self, stall: Duration) -> io::Result<()> {
        match &self.tls {
            None => listener::discard(&self.socket, self.unread),
            // Through TLS: the sealed records still pending, then close_notify.
            Some(tls) => super::tls_wire::finish(&mut Self::session(tls), &self.socket, stall),
        }
    }

    /// Makes the close that follows (dropping the wire) an error for the peer: an RST on TCP, ECONNRESET on a
    /// Unix socket, since the request's last byte is still unread. Through TLS: a fatal alert after what was
    /// sent, waiting up to `stall` for room (a reset only when it cannot be sent), since nginx takes a reset of
    /// a TLS upstream for a clean end.
    pub(crate) fn reset(&self, stall: Duration) {
        if let Some(tls) = &self.tls {
            if super::tls_wire::fail(&mut Self::session(tls), &self.socket, stall).is_ok() {
                return;
            }
        }
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
            tls: self.tls.clone(),
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
    tls: Option<Tls>,
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
        match &self.tls {
            // Nothing was written yet, so the empty socket buffer takes the short answer whole.
            None => {
                let _ = socket.send(answer);
                let _ = listener::discard(&socket, self.unread);
            }
            // Sealed, then close_notify, as far as the socket takes them now (they are small).
            Some(tls) => {
                let mut conn = Wire::session(tls);
                let _ = std::io::Write::write_all(&mut conn.writer(), answer);
                conn.send_close_notify();
                let _ = super::tls_wire::push_records(&mut conn, &socket);
            }
        }
        // SAFETY: as above.
        unsafe { self.close_under() }
    }

    /// Closes the connection now as an error for the peer (part of the response was written already).
    ///
    /// # Safety
    /// The wire this came from must still be open for the whole call.
    pub(crate) unsafe fn reset_and_close(&self) -> io::Result<()> {
        // SAFETY: the caller guarantees the descriptor is open.
        let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
        let socket = SockRef::from(&fd);
        // Through TLS, a fatal alert as far as the socket takes it now; a reset only when it did not.
        let mut alerted = false;
        if let Some(tls) = &self.tls {
            let mut conn = Wire::session(tls);
            super::tls_wire::queue_fatal_alert(&mut conn);
            alerted = super::tls_wire::push_records(&mut conn, &socket).is_ok();
        }
        if self.tcp && !alerted {
            let _ = socket.set_linger(Some(Duration::ZERO));
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
