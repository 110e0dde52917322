//! The TLS side of the tier-3 harness: a test PKI made with rcgen and written to a temp dir (a CA, ferrule's
//! certificate for `localhost` and 127.0.0.1, nginx's client certificates from that CA and from another one, an
//! expired and a renewed server certificate), and a rustls client that speaks uwsgi to a `tls://` socket
//! directly and tells a response ended by close_notify from an aborted one.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, HandshakeKind, RootCertStore, StreamOwned};
use tempfile::TempDir;

/// Read/write timeouts of the direct TLS client: a server that hangs fails the test instead of CI.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The certificates and keys of one test, as PEM files in a temp dir that lives as long as the `Pki`. Every
/// test makes its own (ECDSA P-256 keys: a few milliseconds), so no test can see another's files change.
pub struct Pki {
    dir: TempDir,
    /// The CA that signed ferrule's certificates and nginx's client certificate.
    pub ca: PathBuf,
    /// ferrule's certificate (SANs `localhost` and 127.0.0.1), then the CA: a leaf and its chain.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// A client certificate (for nginx's `uwsgi_ssl_certificate`) from the same CA.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Another CA, and a client certificate from it: a certificate ferrule's `--tls-client-ca` must refuse.
    pub other_ca: PathBuf,
    pub other_client_cert: PathBuf,
    pub other_client_key: PathBuf,
    /// A client certificate from the CA that expired in 2021, with its own key.
    pub expired_client_cert: PathBuf,
    pub expired_client_key: PathBuf,
    /// A server certificate from the same CA that expired in 2021, with its own key.
    pub expired_cert: PathBuf,
    pub expired_key: PathBuf,
    /// The renewal of `server_cert`: same CA and names, a new key.
    pub renewed_cert: PathBuf,
    pub renewed_key: PathBuf,
    /// DER of the two leaves, to tell which one a server presents.
    pub server_der: Vec<u8>,
    pub renewed_der: Vec<u8>,
}

/// A CA certificate (PEM) and the issuer that signs with its key.
fn make_ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().expect("generate a CA key");
    let cert = params.self_signed(&key).expect("self-sign the CA");
    (cert.pem(), Issuer::new(params, key))
}

/// A leaf signed by `issuer`: (certificate PEM, its DER, key PEM).
fn make_leaf(
    issuer: &Issuer<'_, KeyPair>,
    name: &str,
    sans: &[&str],
    usage: ExtendedKeyUsagePurpose,
    expired: bool,
) -> (String, Vec<u8>, String) {
    let mut params =
        CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).expect("leaf params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![usage];
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().expect("generate a leaf key");
    let cert = params.signed_by(&key, issuer).expect("sign the leaf");
    (cert.pem(), cert.der().to_vec(), key.serialize_pem())
}

impl Pki {
    /// Makes every certificate and key and writes them under a new temp dir in /tmp.
    pub fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("ferrule-pki-")
            .tempdir_in("/tmp")
            .expect("create the PKI temp dir");
        let write = |name: &str, text: &str| -> PathBuf {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            path
        };
        let server_sans = ["localhost", "127.0.0.1"];
        let (ca_pem, ca) = make_ca("ferrule test CA");
        let (other_ca_pem, other_ca) = make_ca("some other CA");
        let server = make_leaf(
            &ca,
            "localhost",
            &server_sans,
            ExtendedKeyUsagePurpose::ServerAuth,
            false,
        );
        let renewed = make_leaf(
            &ca,
            "localhost",
            &server_sans,
            ExtendedKeyUsagePurpose::ServerAuth,
            false,
        );
        let expired = make_leaf(
            &ca,
            "localhost",
            &server_sans,
            ExtendedKeyUsagePurpose::ServerAuth,
            true,
        );
        let client = make_leaf(&ca, "nginx", &[], ExtendedKeyUsagePurpose::ClientAuth, false);
        let other_client = make_leaf(&other_ca, "nginx", &[], ExtendedKeyUsagePurpose::ClientAuth, false);
        let expired_client = make_leaf(&ca, "nginx", &[], ExtendedKeyUsagePurpose::ClientAuth, true);
        Pki {
            ca: write("ca.pem", &ca_pem),
            server_cert: write("server.pem", &format!("{}{ca_pem}", server.0)),
            server_key: write("server-key.pem", &server.2),
            client_cert: write("client.pem", &client.0),
            client_key: write("client-key.pem", &client.2),
            other_ca: write("other-ca.pem", &other_ca_pem),
            other_client_cert: write("other-client.pem", &other_client.0),
            other_client_key: write("other-client-key.pem", &other_client.2),
            expired_client_cert: write("expired-client.pem", &expired_client.0),
            expired_client_key: write("expired-client-key.pem", &expired_client.2),
            expired_cert: write("expired.pem", &format!("{}{ca_pem}", expired.0)),
            expired_key: write("expired-key.pem", &expired.2),
            renewed_cert: write("renewed.pem", &format!("{}{ca_pem}", renewed.0)),
            renewed_key: write("renewed-key.pem", &renewed.2),
            server_der: server.1,
            renewed_der: renewed.1,
            dir,
        }
    }

    /// The temp dir holding the files; a test may put its own (a live copy of a certificate) next to them.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A client that trusts this PKI's CA, with nginx's client certificate or without one.
    pub fn client(&self, with_cert: bool) -> Arc<ClientConfig> {
        let cert = with_cert.then_some((self.client_cert.as_path(), self.client_key.as_path()));
        client_config(&self.ca, cert)
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

/// A rustls client (ring, TLS 1.2 and 1.3) trusting the CAs in `ca`, presenting `cert` (certificate file, key
/// file) when given.
pub fn client_config(ca: &Path, cert: Option<(&Path, &Path)>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap_or_else(|e| panic!("read {}: {e}", ca.display())) {
        roots.add(c.expect("a PEM certificate")).expect("add a root");
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(roots);
    let config = match cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .unwrap_or_else(|e| panic!("read {}: {e}", cert.display()))
                .collect::<Result<Vec<_>, _>>()
                .expect("PEM certificates");
            let key = PrivateKeyDer::from_pem_file(key).unwrap_or_else(|e| panic!("read {}: {e}", key.display()));
            builder
                .with_client_auth_cert(chain, key)
                .expect("a usable client certificate")
        }
    };
    Arc::new(config)
}

/// The ClientHello `config` sends first, as bytes on the wire: for peers that stop in the middle of it.
pub fn client_hello(config: Arc<ClientConfig>) -> Vec<u8> {
    let mut conn = ClientConnection::new(config, localhost()).expect("a client connection");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write to a Vec");
    }
    assert!(
        out.len() > 100 && out[0] == 0x16,
        "not a ClientHello record: {out:02x?}"
    );
    out
}

fn localhost() -> ServerName<'static> {
    ServerName::try_from("localhost").expect("a valid DNS name")
}

/// How the server ended a response read by [`tls_request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsEnd {
    /// close_notify, then the close: the response is complete.
    CloseNotify,
    /// The TCP connection closed without close_notify.
    UncleanEof,
    /// The connection was reset.
    Reset,
    /// Anything else: a TLS alert or a protocol error, with its description.
    Error(String),
}

/// What a direct TLS client got for one uwsgi request.
#[derive(Debug)]
pub struct TlsAnswer {
    /// The plaintext the server sent (an HTTP/1.1 response, as ferrule writes it to nginx).
    pub bytes: Vec<u8>,
    pub end: TlsEnd,
    /// The leaf certificate the server presented (DER).
    pub peer_leaf: Vec<u8>,
    /// Whether the handshake was full or resumed.
    pub handshake: Option<HandshakeKind>,
}

/// Connects to the `tls://` socket at `addr` as nginx's `suwsgi://` would, sends `request` (a whole uwsgi packet
/// and its body) and reads until the server ends the session. A failed handshake is an `Err`.
pub fn tls_request(addr: SocketAddr, config: Arc<ClientConfig>, request: &[u8]) -> io::Result<TlsAnswer> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(IO_TIMEOUT))?;
    tcp.set_write_timeout(Some(IO_TIMEOUT))?;
    tcp.set_nodelay(true)?;
    let conn = ClientConnection::new(config, localhost()).map_err(io::Error::other)?;
    let mut tls = StreamOwned::new(conn, tcp);
    // The first write drives the handshake; a refused one fails here (or, in TLS 1.3, where the server's
    // verdict on a client certificate arrives: at the first read).
    tls.write_all(request)?;
    tls.flush()?;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    let end = loop {
        match tls.read(&mut buf) {
            Ok(0) => break TlsEnd::CloseNotify,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break TlsEnd::UncleanEof,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                ) =>
            {
                break TlsEnd::Reset;
            }
            Err(e) if bytes.is_empty() && tls.conn.peer_certificates().is_none() => return Err(e),
            Err(e) => break TlsEnd::Error(e.to_string()),
        }
    };
    let peer_leaf = tls
        .conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    Ok(TlsAnswer {
        bytes,
        end,
        peer_leaf,
        handshake: tls.conn.handshake_kind(),
    })
}
