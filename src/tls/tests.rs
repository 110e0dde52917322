//! Tests of the server configuration built from the files: each bad file named, tickets bound to the
//! client-authentication policy, and the TLS 1.2 ticket rule seen through real handshakes in memory.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::ProducesTickets;
use rustls::{RootCertStore, ServerConfig};

use super::*;

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        Pki {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

fn ca(name: &str) -> (Issuer<'static, KeyPair>, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (Issuer::new(params, key), cert.pem())
}

fn leaf(issuer: &Issuer<'_, KeyPair>, expired: bool) -> (String, KeyPair) {
    let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key)
}

/// A server certificate and key from a new CA, and that CA's PEM.
fn server_files(pki: &Pki) -> (TlsFiles, String) {
    let (issuer, ca_pem) = ca("test CA");
    let (cert, key) = leaf(&issuer, false);
    let files = TlsFiles {
        cert: pki.write("cert.pem", &cert),
        key: pki.write("key.pem", &key.serialize_pem()),
        client_ca: None,
    };
    (files, ca_pem)
}

fn tickets() -> Vec<TicketKey> {
    vec![TicketKey::generate(current_period(DEFAULT_TICKET_ROTATION)).unwrap()]
}

#[test]
fn a_good_certificate_and_key_make_a_config_with_client_auth_when_asked() {
    let pki = Pki::new();
    let (files, ca_pem) = server_files(&pki);
    assert!(server_config(&files, tickets(), DEFAULT_TICKET_ROTATION).is_ok());
    let with_ca = TlsFiles {
        client_ca: Some(pki.write("ca.pem", &ca_pem)),
        ..files
    };
    assert!(server_config(&with_ca, tickets(), DEFAULT_TICKET_ROTATION).is_ok());

    // A ticket issued without client authentication does not open once a client CA is required, nor under
    // another CA: a resumed session would skip the client certificate check.
    let keys = tickets();
    let (_, open) = server_config(
        &TlsFiles {
            client_ca: None,
            ..with_ca.clone()
        },
        keys.clone(),
        DEFAULT_TICKET_ROTATION,
    )
    .unwrap();
    let (_, with_ca_tickets) = server_config(&with_ca, keys.clone(), DEFAULT_TICKET_ROTATION).unwrap();
    let (_, other_ca_tickets) = server_config(
        &TlsFiles {
            client_ca: Some(pki.write("other-ca.pem", &ca("other CA").1)),
            ..with_ca.clone()
        },
        keys,
        DEFAULT_TICKET_ROTATION,
    )
    .unwrap();
    let now = current_period(DEFAULT_TICKET_ROTATION);
    let ticket = open.encrypt_in(now, b"a session without a client certificate").unwrap();
    assert!(open.decrypt_in(now, &ticket).is_some());
    assert_eq!(with_ca_tickets.decrypt_in(now, &ticket), None);
    let ticket = with_ca_tickets
        .encrypt_in(now, b"a session with a client certificate")
        .unwrap();
    assert!(with_ca_tickets.decrypt_in(now, &ticket).is_some());
    assert_eq!(other_ca_tickets.decrypt_in(now, &ticket), None);
}

#[test]
fn each_bad_file_is_named_with_its_problem() {
    let pki = Pki::new();
    let (issuer, _) = ca("test CA");
    let (cert, key) = leaf(&issuer, false);
    let (_, other_key) = leaf(&issuer, false);
    let (expired, expired_key) = leaf(&issuer, true);
    let cert_path = pki.write("cert.pem", &cert);
    let key_path = pki.write("key.pem", &key.serialize_pem());
    let message = |files: TlsFiles| {
        server_config(&files, tickets(), DEFAULT_TICKET_ROTATION)
            .unwrap_err()
            .to_string()
    };

    let missing = message(TlsFiles {
        cert: pki.dir.path().join("nope.pem"),
        key: key_path.clone(),
        client_ca: None,
    });
    assert!(missing.contains("nope.pem: cannot read it"), "{missing}");

    let no_cert = message(TlsFiles {
        cert: key_path.clone(),
        key: key_path.clone(),
        client_ca: None,
    });
    assert!(no_cert.contains("no certificate in it"), "{no_cert}");

    let no_key = message(TlsFiles {
        cert: cert_path.clone(),
        key: cert_path.clone(),
        client_ca: None,
    });
    assert!(no_key.contains("cert.pem: no private key in it"), "{no_key}");

    let mismatch = message(TlsFiles {
        cert: cert_path.clone(),
        key: pki.write("other.pem", &other_key.serialize_pem()),
        client_ca: None,
    });
    assert!(
        mismatch.contains("other.pem: this key does not belong to the certificate in"),
        "{mismatch}"
    );

    let old = message(TlsFiles {
        cert: pki.write("expired.pem", &expired),
        key: pki.write("expired-key.pem", &expired_key.serialize_pem()),
        client_ca: None,
    });
    assert!(old.contains("expired.pem: the certificate expired on"), "{old}");
}

/// Records what the ticketer was asked to seal and whether it made a ticket.
#[derive(Debug)]
struct Recording {
    inner: Arc<SharedTickets>,
    sealed: std::sync::Mutex<Vec<bool>>,
}

impl ProducesTickets for Recording {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.inner.lifetime()
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let ticket = self.inner.encrypt(plain);
        self.sealed.lock().unwrap().push(ticket.is_some());
        ticket
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.inner.decrypt(cipher)
    }
}

/// One handshake in memory; how it went.
fn handshake(server: &Arc<ServerConfig>, client: &Arc<rustls::ClientConfig>) -> rustls::HandshakeKind {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut c = rustls::ClientConnection::new(Arc::clone(client), name).unwrap();
    let mut s = rustls::ServerConnection::new(Arc::clone(server)).unwrap();
    for _ in 0..10 {
        pump(&mut c, &mut s);
        pump(&mut s, &mut c);
        if !c.is_handshaking() && !s.is_handshaking() && !s.wants_write() {
            break;
        }
    }
    s.handshake_kind().unwrap()
}

/// Moves what one side has to send to the other, which processes it.
fn pump<A, B>(from: &mut rustls::ConnectionCommon<A>, to: &mut rustls::ConnectionCommon<B>) {
    let mut wire = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut wire).unwrap();
    }
    let mut bytes = &wire[..];
    while !bytes.is_empty() {
        to.read_tls(&mut bytes).unwrap();
    }
    to.process_new_packets().unwrap();
}

/// The TLS 1.2 rule reads the session the way rustls encodes it for a ticket: with the rustls built here, a
/// TLS 1.2 resumption asks for a ticket and gets none (so OpenSSL keeps the session it resumed), a full
/// handshake gets one, and TLS 1.3 gets one either way.
#[test]
fn a_tls12_resumption_gets_no_new_ticket_and_everything_else_does() {
    let pki = Pki::new();
    let (files, ca_pem) = server_files(&pki);
    let (config, tickets) = server_config(&files, tickets(), DEFAULT_TICKET_ROTATION).unwrap();
    let recording = Arc::new(Recording {
        inner: tickets,
        sealed: std::sync::Mutex::new(Vec::new()),
    });
    let mut with_recording = (*config).clone();
    with_recording.ticketer = Arc::clone(&recording) as _;
    let server = Arc::new(with_recording);
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let roots = Arc::new(roots);
    let client = |version: &'static rustls::SupportedProtocolVersion| {
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(Arc::clone(&roots))
                .with_no_client_auth(),
        )
    };
    use rustls::HandshakeKind::{Full, Resumed};
    let tls12 = client(&rustls::version::TLS12);
    let kinds: Vec<_> = (0..3).map(|_| handshake(&server, &tls12)).collect();
    assert_eq!(kinds, [Full, Resumed, Resumed]);
    assert_eq!(
        *recording.sealed.lock().unwrap(),
        [true, false, false],
        "TLS 1.2: a ticket for the full handshake only"
    );
    recording.sealed.lock().unwrap().clear();
    let tls13 = client(&rustls::version::TLS13);
    let kinds: Vec<_> = (0..3).map(|_| handshake(&server, &tls13)).collect();
    assert_eq!(kinds, [Full, Resumed, Resumed]);
    assert_eq!(
        *recording.sealed.lock().unwrap(),
        [true, true, true],
        "TLS 1.3: one ticket per handshake"
    );
}
