//! A TLS connection as the response side drives it: rustls over the connection's non-blocking socket, written
//! by the app thread without the GIL like a plain `Wire`. Plaintext goes into rustls, which seals it into
//! records; records go to the socket as it takes them. A complete response ends with close_notify; an aborted
//! one with a fatal alert and no close_notify, so nginx sees the truncation: nginx with OpenSSL 3 takes a reset
//! or a bare end of a TLS upstream for a clean end, and would finish a chunked response as if it were whole.

use std::io::{self, IoSlice, Write};
use std::os::fd::AsFd;
use std::time::Duration;

use nix::poll::PollFlags;
use socket2::Socket;

/// `io::Write` for rustls's `write_tls`, over the socket without needing `&mut Socket`.
struct SocketSink<'a>(&'a Socket);

impl Write for SocketSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.send_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Sends sealed records until none is pending or the socket is full (`WouldBlock`).
pub(crate) fn push_records(conn: &mut rustls::ServerConnection, socket: &Socket) -> io::Result<()> {
    while conn.wants_write() {
        conn.write_tls(&mut SocketSink(socket))?;
    }
    Ok(())
}

/// Gives rustls as much of `bufs` as it takes (its buffer is bounded), and sends records: the number of
/// plaintext bytes taken, or `WouldBlock` when the socket is full and rustls takes nothing more, so the caller
/// waits for room (as for a plain socket) and tries again.
pub(crate) fn write_vectored(
    conn: &mut rustls::ServerConnection,
    socket: &Socket,
    bufs: &[IoSlice<'_>],
) -> io::Result<usize> {
    match push_records(conn, socket) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        other => other?,
    }
    let taken = conn.writer().write_vectored(bufs)?;
    match push_records(conn, socket) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        other => other?,
    }
    let wanted: usize = bufs.iter().map(|b| b.len()).sum();
    if taken == 0 && wanted > 0 {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    Ok(taken)
}

/// Sends what is pending and then close_notify, waiting up to `stall` each time the socket is full: the
/// ordinary end of a complete response.
pub(crate) fn finish(conn: &mut rustls::ServerConnection, socket: &Socket, stall: Duration) -> io::Result<()> {
    conn.send_close_notify();
    flush(conn, socket, stall)
}

/// Sends every pending record, waiting up to `stall` each time the socket is full (`TimedOut` past that).
fn flush(conn: &mut rustls::ServerConnection, socket: &Socket, stall: Duration) -> io::Result<()> {
    loop {
        match push_records(conn, socket) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !crate::listener::wait_ready(socket.as_fd(), PollFlags::POLLOUT, stall)? {
                    return Err(io::ErrorKind::TimedOut.into());
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// A TLS application-data record rustls cannot open (32 zero bytes: no valid tag).
const UNOPENABLE_RECORD: [u8; 37] = {
    let mut record = [0u8; 37];
    record[0] = 0x17;
    record[1] = 0x03;
    record[2] = 0x03;
    record[4] = 32;
    record
};

/// Fails the session: queues a fatal alert behind the records still pending. rustls has no call to send an
/// alert of one's choosing, but a record it cannot open makes it send `bad_record_mac`, sealed like the rest,
/// and refuse the session from then on. nginx logs it as `SSL_read() failed (... alert bad record mac ...)
/// while reading upstream` and treats the response as failed.
pub(crate) fn queue_fatal_alert(conn: &mut rustls::ServerConnection) {
    let mut record = &UNOPENABLE_RECORD[..];
    let _ = conn.read_tls(&mut record);
    let _ = conn.process_new_packets();
}

/// The end of an aborted response: the pending records and a fatal alert, waiting up to `stall` each time the
/// socket is full. `Ok` when the socket took everything: the close that follows may then be an ordinary one (a
/// reset would throw away what the socket has not sent yet, the alert included).
pub(crate) fn fail(conn: &mut rustls::ServerConnection, socket: &Socket, stall: Duration) -> io::Result<()> {
    queue_fatal_alert(conn);
    flush(conn, socket, stall)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::sync::Arc;

    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    /// A server config and a client config that trusts it, for 127.0.0.1.
    fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::from_pem_slice(leaf_key.serialize_pem().as_bytes()).unwrap(),
            )
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_cert.pem().as_bytes()).unwrap())
            .unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// The client thread: what it read, and how the stream ended.
    type Client = std::thread::JoinHandle<(Vec<u8>, io::Result<()>)>;

    /// A connected pair after the handshake: the server side as a non-blocking `TlsWire` with a small send
    /// buffer (so writes fill it and have to wait), and a client thread reading everything, slowly at first.
    /// The server side of a test connection.
    struct TlsWire {
        socket: Socket,
        conn: rustls::ServerConnection,
    }

    fn pair(body_len: usize) -> (TlsWire, Client) {
        let (server_config, client_config) = configs();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::thread::spawn(move || {
            let conn =
                rustls::ClientConnection::new(client_config, ServerName::try_from("127.0.0.1").unwrap()).unwrap();
            let tcp = TcpStream::connect(addr).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            std::thread::sleep(Duration::from_millis(50));
            let mut got = Vec::with_capacity(body_len);
            let end = tls.read_to_end(&mut got).map(drop);
            (got, end)
        });
        let (tcp, _) = listener.accept().unwrap();
        let mut conn = rustls::ServerConnection::new(server_config).unwrap();
        let mut tcp = tcp;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).unwrap();
        }
        let socket = Socket::from(tcp);
        socket.set_send_buffer_size(16 * 1024).unwrap();
        socket.set_nonblocking(true).unwrap();
        (TlsWire { socket, conn }, client)
    }

    fn wait_writable(socket: &Socket) -> io::Result<bool> {
        crate::listener::wait_ready(socket.as_fd(), PollFlags::POLLOUT, Duration::from_secs(5))
    }

    /// Writes all of `body` the way the responder does: write, and wait for room on `WouldBlock`.
    fn write_all(wire: &mut TlsWire, body: &[u8]) {
        let mut rest = body;
        while !rest.is_empty() {
            match write_vectored(
                &mut wire.conn,
                &wire.socket,
                &[IoSlice::new(&rest[..rest.len().min(100_000)])],
            ) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(wait_writable(&wire.socket).unwrap(), "no room within 5 s");
                }
                Err(e) => panic!("write: {e}"),
            }
        }
    }

    #[test]
    fn a_complete_response_arrives_whole_and_ends_with_close_notify() {
        let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let (mut wire, client) = pair(body.len());
        write_all(&mut wire, &body);
        finish(&mut wire.conn, &wire.socket, Duration::from_secs(5)).unwrap();
        assert!(!wire.conn.wants_write());
        drop(wire);
        let (got, end) = client.join().unwrap();
        end.expect("a clean end: close_notify, then EOF");
        assert_eq!(got.len(), body.len());
        assert!(got == body, "the bytes arrive in order, unchanged");
    }

    #[test]
    fn an_aborted_response_ends_with_a_fatal_alert_the_client_sees_as_an_error() {
        let (mut wire, client) = pair(1000);
        write_all(&mut wire, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial");
        fail(&mut wire.conn, &wire.socket, Duration::from_secs(5)).unwrap();
        // An ordinary close after the alert: the alert, not a reset, tells the client.
        drop(wire);
        let (got, end) = client.join().unwrap();
        // A rustls client may report the alert before handing over the records ahead of it; OpenSSL (nginx)
        // hands them over first.
        assert!(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial".starts_with(&got));
        let error = end.expect_err("the client must see an error, not a clean close");
        let text = error.to_string();
        assert!(text.contains("BadRecordMac"), "a fatal alert from the server: {text}");
    }
}
