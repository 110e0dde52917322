//! Binding and accepting on Unix and TCP sockets: stale socket files, socket mode, removal on exit, and the
//! connected `Stream` type the connection reads and writes.

use std::fs;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::net::SocketAddr;

use bytes::BytesMut;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use socket2::{Domain, SockAddr, SockRef, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};

use crate::config::SocketSpec;

/// Why a socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ListenError {
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
    #[error("{0}: cannot give the socket file to the --uid/--gid user and group: {1}")]
    Owner(SocketSpec, io::Error),
    #[error("{0}: the directory {1} does not exist (create it first; with systemd, RuntimeDirectory= does)")]
    NoDirectory(SocketSpec, PathBuf),
    #[error("{0}: not a listening socket")]
    NotListening(SocketSpec),
}

/// A bound, listening socket, not yet registered with a runtime, so a master process can bind it once and
/// hand it to workers.
#[derive(Debug)]
pub(crate) struct BoundSocket {
    pub(crate) spec: SocketSpec,
    pub(crate) fd: OwnedFd,
    /// For a Unix socket we created: its path and inode, so it is removed on exit only while it is still ours.
    pub(crate) unix_file: Option<(PathBuf, u64)>,
}

impl BoundSocket {
    /// The address as the log shows it (with the real port when the spec asked for port 0).
    pub(crate) fn display_addr(&self) -> String {
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

    /// Whether this is a Unix domain socket (decided by the socket itself, so inherited ones work too).
    pub(crate) fn is_unix(&self) -> bool {
        SockRef::from(&self.fd).local_addr().is_ok_and(|a| a.is_unix())
    }

    /// Takes over a listening socket inherited as descriptor `fd` (from the master, systemd or `fd://N`).
    /// The socket file, if any, belongs to whoever made it and is never removed by this process.
    pub(crate) fn inherit(fd: RawFd) -> Result<BoundSocket, ListenError> {
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

    /// The first step of a graceful stop: new connections are turned away while those already queued stay.
    /// A Unix socket's file is removed (a connect then fails at once); a TCP socket this process bound drops
    /// new handshakes (see [`drop_new_handshakes`]). Inherited sockets are left alone: their queue belongs to
    /// the next instance.
    pub(crate) fn refuse_new_connections(&self) {
        match &self.spec {
            SocketSpec::Unix(_) => self.remove_file(),
            SocketSpec::Tcp(_) | SocketSpec::Tls(_) => {
                if let Err(error) = drop_new_handshakes(self.fd.as_fd()) {
                    tracing::warn!(
                        address = %self.display_addr(),
                        %error,
                        "cannot turn new connections away before the stop; one arriving during the drain may be reset"
                    );
                }
            }
            SocketSpec::Fd(_) => {}
        }
    }

    /// Removes the Unix socket file if it still is the one this process created.
    pub(crate) fn remove_file(&self) {
        if let Some((path, ino)) = &self.unix_file {
            if fs::symlink_metadata(path).is_ok_and(|m| m.ino() == *ino) {
                match fs::remove_file(path) {
                    Ok(()) => {}
                    Err(error) if error.kind() == io::ErrorKind::PermissionDenied => tracing::warn!(
                        path = %path.display(),
                        directory = %path.parent().unwrap_or(Path::new("/")).display(),
                        "cannot remove the socket file: this user cannot write its directory"
                    ),
                    Err(error) => tracing::warn!(path = %path.display(), %error, "cannot remove the socket file"),
                }
            }
        }
    }
}

/// `SO_ATTACH_FILTER` (asm-generic/socket.h; the same on x86_64 and aarch64), which the libc crate leaves out
/// for glibc targets.
const SO_ATTACH_FILTER: libc::c_int = 26;

/// Makes a listening TCP socket drop every incoming SYN (a socket filter, shared by every process holding the
/// socket) and let every other segment through, so handshakes already under way complete and join the
/// queue, and nothing new is queued. At a stop this closes the race between the workers' last accept and the
/// last close of the socket, which resets what is queued: a connection that arrives then is not queued at
/// all. Its client sends the SYN again a second later (TCP's initial retransmission time), finds the socket
/// closed and is refused, and nginx tries another server, whatever the method, since nothing was sent.
pub(crate) fn drop_new_handshakes(fd: BorrowedFd<'_>) -> io::Result<()> {
    // The filter sees the segment from its TCP header on; byte 13 holds the flags. SYN without ACK: drop
    // (keep 0 bytes); anything else: keep it whole.
    const TCP_FLAGS: u32 = 13;
    const SYN: u32 = 0x02;
    const ACK: u32 = 0x10;
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let mut program = [
        op(libc::BPF_LD | libc::BPF_B | libc::BPF_ABS, 0, 0, TCP_FLAGS),
        op(libc::BPF_ALU | libc::BPF_AND | libc::BPF_K, 0, 0, SYN | ACK),
        op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 0, 1, SYN),
        op(libc::BPF_RET | libc::BPF_K, 0, 0, 0),
        op(libc::BPF_RET | libc::BPF_K, 0, 0, u32::MAX),
    ];
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: `fprog` points at `program`, which outlives the call (the kernel copies the program), and the
    // length passed is the size of `fprog`.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_FILTER,
            (&raw const fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Connections waiting in a listening TCP socket's accept queue: Linux reports the queue's current length in
/// TCP_INFO's `tcpi_unacked` for a listening socket. Unix sockets have no such report.
pub(crate) fn listen_queue_depth(fd: &impl AsFd) -> Option<u64> {
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

/// Binds and listens on one socket. A Unix socket file gets `mode` and, when given, `owner` (user, group).
pub(crate) fn bind(
    spec: &SocketSpec,
    mode: Option<u32>,
    owner: Option<(Option<u32>, Option<u32>)>,
    backlog: i32,
) -> Result<BoundSocket, ListenError> {
    let err = |e| ListenError::Bind(spec.clone(), e);
    match spec {
        SocketSpec::Fd(fd) => BoundSocket::inherit(*fd),
        SocketSpec::Tcp(addr) | SocketSpec::Tls(addr) => {
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
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
                return Err(ListenError::NoDirectory(spec.clone(), dir.to_path_buf()));
            }
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
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::chown(path, uid, gid).map_err(|e| ListenError::Owner(spec.clone(), e))?;
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

/// Accepts a connection that is already waiting, without blocking and without a runtime (`Ok(None)`: none is
/// waiting). The app threads accept this way, so a request nginx has already sent is read, run and answered by
/// one thread. The socket comes back non-blocking: every wait on it is an explicit, bounded poll.
pub(crate) fn accept_now(listener: &OwnedFd) -> io::Result<Option<(Socket, Option<SocketAddr>)>> {
    loop {
        // SAFETY: accept4 writes at most `len` bytes of address into the zeroed storage socket2 provides, and
        // the descriptor it returns is new, so the OwnedFd is its only owner.
        let accepted = unsafe {
            SockAddr::try_init(|storage, len| {
                let fd = libc::accept4(
                    listener.as_raw_fd(),
                    storage.cast(),
                    len,
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                );
                if fd < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(OwnedFd::from_raw_fd(fd))
                }
            })
        };
        return match accepted {
            Ok((fd, addr)) => {
                let socket = Socket::from(fd);
                let peer = addr.as_socket();
                if peer.is_some() {
                    // Responses are written whole or in deliberate chunks; Nagle would only delay the last one.
                    socket.set_tcp_nodelay(true)?;
                }
                Ok(Some((socket, peer)))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            // A connection reset while queued, or a signal: try the next one.
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted) => continue,
            Err(e) => Err(e),
        };
    }
}

/// Drops this process's hold on a listening socket without freeing its descriptor number: `dup3` puts a new,
/// unconnected socket in its place atomically. Closing the number outright would let the next descriptor this
/// process opens (a connection) take it, and a thread about to accept on the listener would accept there
/// instead; on the placeholder an accept fails at once. The socket itself closes when its last holder does.
pub(crate) fn stop_listening(listener: &OwnedFd) -> io::Result<()> {
    let placeholder = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    // SAFETY: both descriptors are open and this process's (one borrowed, one owned for the call); dup3 only
    // makes `listener`'s number refer to the placeholder's socket, and `listener` still owns that number.
    if unsafe { libc::dup3(placeholder.as_raw_fd(), listener.as_raw_fd(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Peeks at the bytes queued in a non-blocking socket without consuming them (`WouldBlock`: none yet), into
/// the spare capacity of `buf`, whose length becomes what was peeked. No zeroing of the buffer first.
pub(crate) fn peek_now(socket: &Socket, buf: &mut BytesMut) -> io::Result<usize> {
    buf.clear();
    let n = socket.peek(buf.spare_capacity_mut())?;
    // SAFETY: recv(2) initialised the first `n` bytes of the spare capacity, and `n` is at most its length.
    unsafe { buf.set_len(n) };
    Ok(n)
}

/// Reads and drops `len` queued bytes (fewer if the peer closed), without zeroing a buffer for them.
pub(crate) fn discard(socket: &Socket, mut len: usize) -> io::Result<()> {
    let mut scratch = [MaybeUninit::<u8>::uninit(); 8 * 1024];
    while len > 0 {
        let want = len.min(scratch.len());
        match socket.recv(&mut scratch[..want]) {
            Ok(0) => return Ok(()),
            Ok(n) => len -= n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Waits until `fd` is ready for `events` (readable, writable, or closed), at most `timeout`. Returns false when
/// the time ran out. For the app threads, which call it with the GIL released.
pub(crate) fn wait_ready(fd: BorrowedFd<'_>, events: PollFlags, timeout: Duration) -> io::Result<bool> {
    let mut fds = [PollFd::new(fd, events)];
    let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    match nix::poll::poll(&mut fds, timeout) {
        Ok(0) => Ok(false),
        Ok(_) => Ok(true),
        // A signal: report ready, so the caller retries its operation and waits again if needed.
        Err(nix::errno::Errno::EINTR) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// A listening socket registered with the runtime.
pub(crate) enum Listener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

impl Listener {
    /// Registers a bound socket with the current runtime; the fd stays owned by the listener.
    pub(crate) fn from_bound(bound: &BoundSocket) -> io::Result<Listener> {
        let fd = bound.fd.try_clone()?;
        Ok(if bound.is_unix() {
            Listener::Unix(tokio::net::UnixListener::from_std(fd.into())?)
        } else {
            Listener::Tcp(tokio::net::TcpListener::from_std(fd.into())?)
        })
    }

    /// Accepts one connection; the peer address is `None` on a Unix socket.
    pub(crate) async fn accept(&self) -> io::Result<(Stream, Option<std::net::SocketAddr>)> {
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
pub(crate) enum Stream {
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

// The stream as tokio's byte streams, for code that serves plain and TLS connections alike.
impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        each!(self.get_mut(), s => std::pin::Pin::new(s).poll_read(cx, buf))
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        each!(self.get_mut(), s => std::pin::Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        each!(self.get_mut(), s => std::pin::Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        each!(self.get_mut(), s => std::pin::Pin::new(s).poll_shutdown(cx))
    }
}

impl Stream {
    /// Takes over a connection an app thread accepted and passed on (`tcp`: it is a TCP connection). Must be
    /// called inside the runtime, which it registers with.
    pub(crate) fn from_socket(socket: Socket, tcp: bool) -> io::Result<Stream> {
        let fd = OwnedFd::from(socket);
        Ok(if tcp {
            Stream::Tcp(tokio::net::TcpStream::from_std(fd.into())?)
        } else {
            Stream::Unix(tokio::net::UnixStream::from_std(fd.into())?)
        })
    }

    /// Leaves the runtime, for the app thread that will write the response (still non-blocking).
    pub(crate) fn into_socket(self) -> io::Result<Socket> {
        let fd: OwnedFd = match self {
            Stream::Unix(s) => s.into_std()?.into(),
            Stream::Tcp(s) => s.into_std()?.into(),
        };
        Ok(Socket::from(fd))
    }

    /// Peeks at the queued bytes without consuming them, into the capacity of `buf` (whose length becomes what
    /// was peeked; no zeroing first), waiting until more than `have` bytes are queued. Peeks `have` or fewer
    /// when the peer closed before sending more.
    pub(crate) async fn peek_more(&self, buf: &mut Vec<u8>, have: usize) -> io::Result<()> {
        buf.clear();
        loop {
            let ready = each!(self, s => s.ready(Interest::READABLE).await)?;
            let result = each!(self, s => s.try_io(Interest::READABLE, || {
                let n = SockRef::from(s).peek(buf.spare_capacity_mut())?;
                if n > have || n == 0 || ready.is_read_closed() {
                    Ok(n)
                } else {
                    // Nothing new yet: report WouldBlock so the runtime clears readiness and waits for more data.
                    Err(io::ErrorKind::WouldBlock.into())
                }
            }));
            match result {
                Ok(n) => {
                    // SAFETY: recv(2) initialised the first `n` bytes of the spare capacity, and `n` is at most
                    // its length.
                    unsafe { buf.set_len(n) };
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads exactly `buf.len()` bytes; `UnexpectedEof` if the peer closes first.
    pub(crate) async fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        each!(self, s => s.read_exact(buf).await).map(|_| ())
    }

    pub(crate) async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        each!(self, s => s.write_all(buf).await)
    }

    /// Ends our half of the connection with an ordinary FIN.
    pub(crate) async fn shutdown(&mut self) -> io::Result<()> {
        each!(self, s => s.shutdown().await)
    }
}

/// One sendfile(2) call.
pub(crate) fn sendfile(socket: &Socket, file: &fs::File, offset: &mut u64, count: usize) -> io::Result<usize> {
    let mut off = libc::off_t::try_from(*offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: both descriptors are open for the whole call (the caller holds the socket open, the file is a
    // live `File`), and `off` is a valid, exclusive pointer to an off_t.
    let n = unsafe { libc::sendfile(socket.as_raw_fd(), file.as_raw_fd(), &mut off, count) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    *offset = off as u64;
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};
    use std::time::Instant;

    use super::*;

    /// Waits until a non-blocking connect has an outcome: `Some(Ok)` connected, `Some(Err)` refused or failed,
    /// `None` still under way after `wait`.
    fn outcome(client: &Socket, wait: Duration) -> Option<io::Result<()>> {
        if !wait_ready(client.as_fd(), PollFlags::POLLOUT, wait).unwrap() {
            return None;
        }
        Some(match client.take_error().unwrap() {
            Some(error) => Err(error),
            None => Ok(()),
        })
    }

    fn connect_now(addr: SocketAddr) -> Socket {
        let client = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        client.set_nonblocking(true).unwrap();
        match client.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => panic!("connect: {e}"),
        }
        client
    }

    #[test]
    fn a_socket_that_drops_new_handshakes_keeps_its_queue_and_refuses_once_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let queued = TcpStream::connect(addr).unwrap();

        drop_new_handshakes(listener.as_fd()).unwrap();
        let late = connect_now(addr);
        // Its SYN was dropped: not connected, not refused, and not queued.
        assert!(outcome(&late, Duration::from_millis(300)).is_none());
        let (first, _) = listener.accept().expect("the connection queued before stays");
        assert_eq!(first.peer_addr().unwrap(), queued.local_addr().unwrap());
        assert_eq!(listener.accept().unwrap_err().kind(), io::ErrorKind::WouldBlock);

        // Once the socket is closed, the SYN sent again (a second after the first) is refused.
        drop(listener);
        let started = Instant::now();
        let refused = outcome(&late, Duration::from_secs(5)).expect("the retried SYN is answered");
        assert_eq!(refused.unwrap_err().kind(), io::ErrorKind::ConnectionRefused);
        assert!(started.elapsed() < Duration::from_secs(4));
    }
}
