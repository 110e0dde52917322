//! The stream the async read path reads a request from, plain or TLS. A plain socket is peeked: the bytes it
//! shows stay queued, and the request's last byte stays unread until the response is complete (see the module
//! doc of `connection`). Nothing can be peeked through TLS, so a TLS session shows bytes by reading them.

use std::io;
use std::os::fd::OwnedFd;

use socket2::Socket;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use crate::connection::wire::Wire;
use crate::listener::Stream;

/// A TLS session after its handshake, over the connection's TCP socket.
pub(super) type TlsStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// A connection's byte stream as the async read path uses it: [`show_more`](Transport::show_more) to look at
/// the start of the request, `AsyncRead` for the rest, `AsyncWrite` for the server's own answers.
pub(super) trait Transport: AsyncRead + AsyncWrite + Unpin {
    /// Whether the bytes shown stay queued (peeked), to be read again; otherwise showing them consumed them.
    const PEEKS: bool;

    /// Shows more of the connection's first bytes in `seen`, which holds those shown so far and whose capacity
    /// is how far to look, waiting until there are more. Shows no more (the length of `seen` does not grow)
    /// when the peer closed.
    async fn show_more(&mut self, seen: &mut Vec<u8>) -> io::Result<()>;

    /// The request's last byte, once it arrives, after all the others were read: peeked on a plain socket, so
    /// it stays queued; read through TLS. `None` when the peer closed first.
    async fn last_byte(&mut self) -> io::Result<Option<u8>>;

    /// The connection as the response side writes it, once the request was read.
    fn into_wire(self) -> io::Result<Wire>;
}

/// How many of the bytes in `seen` the transport has consumed: none when it peeks, all when it reads.
pub(super) fn held<T: Transport>(seen: &[u8]) -> usize {
    if T::PEEKS { 0 } else { seen.len() }
}

impl Transport for Stream {
    const PEEKS: bool = true;

    async fn show_more(&mut self, seen: &mut Vec<u8>) -> io::Result<()> {
        let have = seen.len();
        self.peek_more(seen, have).await
    }

    async fn last_byte(&mut self) -> io::Result<Option<u8>> {
        let mut one = Vec::with_capacity(1);
        self.peek_more(&mut one, 0).await?;
        Ok(one.first().copied())
    }

    fn into_wire(self) -> io::Result<Wire> {
        let tcp = matches!(self, Stream::Tcp(_));
        // The last byte of the request is still queued: consumed when the response is complete.
        Ok(Wire::new(self.into_socket()?, tcp, 1))
    }
}

impl Transport for TlsStream {
    const PEEKS: bool = false;

    async fn show_more(&mut self, seen: &mut Vec<u8>) -> io::Result<()> {
        self.read_buf(seen).await.map(drop)
    }

    async fn last_byte(&mut self) -> io::Result<Option<u8>> {
        let mut one = [0u8; 1];
        Ok((self.read(&mut one).await? == 1).then_some(one[0]))
    }

    fn into_wire(self) -> io::Result<Wire> {
        let (tcp, conn) = self.into_inner();
        let socket = Socket::from(OwnedFd::from(tcp.into_std()?));
        Ok(Wire::tls(socket, conn))
    }
}
