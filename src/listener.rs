//! Binding and accepting on Unix and TCP sockets: stale socket files, socket mode, removal on exit, and the
//! connected `Stream` type the connection reads and writes.

use std::fs;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use socket2::{Domain, SockAddr, SockRef, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};

use crate::config::SocketSpec;

/// Why a socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("{0}: {1}")]
    Bind(SocketSpec, io::Error),
    #[error("{0}: another process is listening on this socket")]
    InUse(SocketSpec),
    #[error("{0}: the path exists and is not a socket")]
    NotASocket(SocketSpec),
    #[error("{0}: cannot remove the stale socket file: {1}")]
    Stale(SocketSpec, io::Error),
    #[error("{0}: cannot set the socket mode: {1}")]
    Mode(SocketSpec, io::Error),
    #[error("{0}: not a listening socket")]
    NotListening(SocketSpec),
}

/// A bound, listening socket, not yet registered with a runtime, so a master process can bind it once and
/// hand it to workers.
#[derive(Debug)]
pub struct BoundSocket {
    pub spec: SocketSpec,
    pub fd: OwnedFd,
    /// For a Unix socket we created: its path and inode, so it is removed on exit only while it is still ours.
    pub unix_file: Option<(PathBuf, u64)>,
}

impl BoundSocket {
    /// The address as the log shows it (with the real port when the spec asked for port 0).
    pub fn display_addr(&self) -> String {
        if let SocketSpec::Unix(p) = &self.spec {
            return format!("unix:{}", p.display());
        }
        match SockRef::from(&self.fd).local_addr() {
            Ok(addr) => match (addr.as_socket(), addr.as_pathname()) {
                (Some(inet), _) => inet.to_string(),
                (None, Some(path)) => format!("unix:{}", path.display()),
                (None, None) => self.spec.to_string(),
            },
            Err(_) => self.spec.to_string(),
        }
    }

    /// Connections waiting in the accept queue, where the OS reports it (see [`listen_queue_depth`]).
    pub fn listen_queue_depth(&self) -> Option<u64> {
        if self.is_unix() {
            None
        } else {
            listen_queue_depth(&self.fd)
        }
    }

    /// Whether this is a Unix domain socket (decided by the socket itself, so inherited ones work too).
    pub fn is_unix(&self) -> bool {
        SockRef::from(&self.fd).local_addr().is_ok_and(|a| a.is_unix())
    }

    /// Takes over a listening socket inherited as descriptor `fd` (from the master, systemd or `fd://N`).
    /// The socket file, if any, belongs to whoever made it and is never removed by this process.
    pub fn inherit(fd: RawFd) -> Result<BoundSocket, ListenError> {
        let spec = SocketSpec::Fd(fd);
        // SAFETY: fcntl(F_GETFD) only inspects the descriptor table; it fails cleanly on a closed descriptor.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(ListenError::Bind(spec, io::Error::last_os_error()));
        }
        // SAFETY: the descriptor was handed to this process for it to own (by LISTEN_FDS, the master's
        // FERRULE_WORKER_FDS or the operator's fd://N), it is open (checked above), and nothing else in the
        // process uses it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let socket = SockRef::from(&owned);
        if !socket.is_listener().unwrap_or(false) {
            return Err(ListenError::NotListening(spec));
        }
        socket
            .set_nonblocking(true)
            .map_err(|e| ListenError::Bind(spec.clone(), e))?;
        socket
            .set_cloexec(true)
            .map_err(|e| ListenError::Bind(spec.clone(), e))?;
        Ok(BoundSocket {
            spec,
            fd: owned,
            unix_file: None,
        })
    }

    /// Removes the Unix socket file if it still is the one this process created.
    pub fn remove_file(&self) {
        if let Some((path, ino)) = &self.unix_file {
            if fs::symlink_metadata(path).is_ok_and(|m| m.ino() == *ino) {
                if let Err(error) = fs::remove_file(path) {
                    tracing::warn!(path = %path.display(), %error, "cannot remove socket file");
                }
            }
        }
    }
}

/// Connections waiting in a listening TCP socket's accept queue: Linux reports the queue's current length in
/// TCP_INFO's `tcpi_unacked` for a listening socket. Unix sockets have no such report.
pub fn listen_queue_depth(fd: &impl AsFd) -> Option<u64> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is that large and zero-initialised; the
    // descriptor is borrowed, so it is open for the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: zero-initialised and then filled by the kernel: every field is a plain integer.
    let info = unsafe { info.assume_init() };
    Some(u64::from(info.tcpi_unacked))
}

/// Binds and listens on one socket.
pub fn bind(spec: &SocketSpec, mode: Option<u32>, backlog: i32) -> Result<BoundSocket, ListenError> {
    let err = |e| ListenError::Bind(spec.clone(), e);
    match spec {
        SocketSpec::Fd(fd) => BoundSocket::inherit(*fd),
        SocketSpec::Tcp(addr) => {
            let socket = Socket::new(Domain::for_address(*addr), Type::STREAM, None).map_err(err)?;
            // Restarting must not wait out TIME_WAIT connections of the previous process.
            socket.set_reuse_address(true).map_err(err)?;
            socket.bind(&SockAddr::from(*addr)).map_err(err)?;
            socket.listen(backlog).map_err(err)?;
            socket.set_nonblocking(true).map_err(err)?;
            Ok(BoundSocket {
                spec: spec.clone(),
                fd: socket.into(),
                unix_file: None,
            })
        }
        SocketSpec::Unix(path) => {
            remove_stale_socket(spec, path)?;
            let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(err)?;
            socket.bind(&SockAddr::unix(path).map_err(err)?).map_err(err)?;
            let ino = fs::symlink_metadata(path).map_err(err)?.ino();
            let bound = BoundSocket {
                spec: spec.clone(),
                fd: socket.into(),
                unix_file: Some((path.clone(), ino)),
            };
            // From here on, a failure removes the file we just made.
            let finish = || -> Result<(), ListenError> {
                if let Some(mode) = mode {
                    fs::set_permissions(path, fs::Permissions::from_mode(mode))
                        .map_err(|e| ListenError::Mode(spec.clone(), e))?;
                }
                let socket = SockRef::from(&bound.fd);
                socket.listen(backlog).map_err(err)?;
                socket.set_nonblocking(true).map_err(err)
            };
            match finish() {
                Ok(()) => Ok(bound),
                Err(e) => {
                    bound.remove_file();
                    Err(e)
                }
            }
        }
    }
}

/// A socket file left by a dead process is replaced; a live one is an error.
fn remove_stale_socket(spec: &SocketSpec, path: &Path) -> Result<(), ListenError> {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(ListenError::NotASocket(spec.clone()));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ListenError::InUse(spec.clone())),
        Err(_) => {
            tracing::info!(path = %path.display(), "replacing stale socket file");
            match fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(ListenError::Stale(spec.clone(), e)),
            }
        }
    }
}

/// A listening socket registered with the runtime.
pub enum Listener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

impl Listener {
    /// Registers a bound socket with the current runtime; the fd stays owned by the listener.
    pub fn from_bound(bound: &BoundSocket) -> io::Result<Listener> {
        let fd = bound.fd.try_clone()?;
        Ok(if bound.is_unix() {
            Listener::Unix(tokio::net::UnixListener::from_std(fd.into())?)
        } else {
            Listener::Tcp(tokio::net::TcpListener::from_std(fd.into())?)
        })
    }

    /// Accepts one connection; the peer address is `None` on a Unix socket.
    pub async fn accept(&self) -> io::Result<(Stream, Option<std::net::SocketAddr>)> {
        match self {
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                Ok((Stream::Unix(s), None))
            }
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                // Responses are written whole or in deliberate chunks; Nagle would only delay the last one.
                s.set_nodelay(true)?;
                Ok((Stream::Tcp(s), Some(peer)))
            }
        }
    }
}

/// A connection from nginx (or whoever connected).
pub enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

macro_rules! each {
    ($self:expr, $s:ident => $body:expr) => {
        match $self {
            Stream::Unix($s) => $body,
            Stream::Tcp($s) => $body,
        }
    };
}

impl Stream {
    /// Peeks at the queued bytes without consuming them, waiting until more than `have` bytes are queued.
    /// Returns `have` or fewer when the peer closed before sending more.
    pub async fn peek_more(&self, buf: &mut [u8], have: usize) -> io::Result<usize> {
        // SAFETY: viewing initialised bytes as MaybeUninit is sound as long as nothing writes uninitialised
        // bytes through the view; recv(2) (via socket2's peek) only ever writes received bytes.
        let buf: &mut [MaybeUninit<u8>] = unsafe { &mut *(buf as *mut [u8] as *mut [MaybeUninit<u8>]) };
        loop {
            let ready = each!(self, s => s.ready(Interest::READABLE).await)?;
            let result = each!(self, s => s.try_io(Interest::READABLE, || {
                let n = SockRef::from(s).peek(buf)?;
                if n > have || n == 0 || ready.is_read_closed() {
                    Ok(n)
                } else {
                    // Nothing new yet: report WouldBlock so the runtime clears readiness and waits for more data.
                    Err(io::ErrorKind::WouldBlock.into())
                }
            }));
            match result {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads (consumes) up to `buf.len()` bytes.
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        each!(self, s => s.read(buf).await)
    }

    pub async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        each!(self, s => s.write_all(buf).await)
    }

    /// Writes all of `buf`; fails with `TimedOut` if the peer takes nothing for `stall` (progress resets it).
    pub async fn write_all_within(&mut self, mut buf: &[u8], stall: Duration) -> io::Result<()> {
        while !buf.is_empty() {
            let n = each!(self, s => tokio::time::timeout(stall, s.write(buf)).await)
                .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Writes every buffer, in order, with as few writev calls as the socket allows; fails with `TimedOut` if
    /// the peer takes nothing for `stall`.
    pub async fn write_all_vectored(&mut self, mut bufs: Vec<bytes::Bytes>, stall: Duration) -> io::Result<()> {
        if bufs.len() == 1 {
            return self.write_all_within(&bufs[0], stall).await;
        }
        let mut first = 0;
        while first < bufs.len() {
            let slices: Vec<io::IoSlice<'_>> = bufs[first..].iter().map(|b| io::IoSlice::new(b)).collect();
            let mut n = each!(self, s => tokio::time::timeout(stall, s.write_vectored(&slices)).await)
                .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            while n > 0 {
                let len = bufs[first].len();
                if n >= len {
                    n -= len;
                    first += 1;
                } else {
                    bytes::Buf::advance(&mut bufs[first], n);
                    n = 0;
                }
            }
        }
        Ok(())
    }

    /// Ends our half of the connection with an ordinary FIN.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        each!(self, s => s.shutdown().await)
    }

    /// Writes `len` bytes of `file` from `offset` with sendfile(2): the bytes go from the page cache to the
    /// socket without passing through this process.
    /// Fails with `TimedOut` if the socket accepts nothing for `stall`.
    pub async fn sendfile(&self, file: &fs::File, mut offset: u64, len: u64, stall: Duration) -> io::Result<u64> {
        let end = offset.saturating_add(len);
        let mut sent = 0;
        while offset < end {
            // Big enough to keep the socket buffer full, small enough to interleave with other connections.
            let count = (end - offset).min(1 << 20) as usize;
            let n = each!(self, s => {
                tokio::time::timeout(stall, s.writable())
                    .await
                    .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
                s.try_io(Interest::WRITABLE, || sendfile(s.as_fd().as_raw_fd(), file, &mut offset, count))
            });
            match n {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "file shorter than announced",
                    ));
                }
                Ok(n) => sent += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(sent)
    }

    /// Closes so that the peer sees an error instead of a clean end of the response: an RST on TCP, and on a
    /// Unix socket ECONNRESET, which Linux reports when a socket is closed with unread data in its queue (the
    /// connection keeps the request's last byte unread until the response is complete for this reason).
    pub fn abort(self) {
        if let Stream::Tcp(s) = &self {
            let _ = SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
        }
        drop(self);
    }
}

/// One sendfile(2) call.
fn sendfile(socket: std::os::fd::RawFd, file: &fs::File, offset: &mut u64, count: usize) -> io::Result<usize> {
    let mut off = libc::off_t::try_from(*offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: both descriptors are open for the whole call (the socket is borrowed from a live stream, the
    // file from a live `File`), and `off` is a valid, exclusive pointer to an off_t.
    let n = unsafe { libc::sendfile(socket, file.as_raw_fd(), &mut off, count) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    *offset = off as u64;
    Ok(n as usize)
}
