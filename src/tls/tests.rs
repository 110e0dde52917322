//! Tests of the server configuration built from the files: each bad file named, tickets bound to the
//! client-authentication policy, the TLS 1.2 ticket rule seen through real handshakes in memory, and version 1
//! certificates: served as the server's, refused from a client.

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
    try_handshake(server, client).unwrap()
}

/// One handshake in memory: how it went, or the first error either side saw (the server's, when it refuses).
fn try_handshake(
    server: &Arc<ServerConfig>,
    client: &Arc<rustls::ClientConfig>,
) -> Result<rustls::HandshakeKind, rustls::Error> {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut c = rustls::ClientConnection::new(Arc::clone(client), name).unwrap();
    let mut s = rustls::ServerConnection::new(Arc::clone(server)).unwrap();
    for _ in 0..10 {
        pump(&mut c, &mut s)?;
        pump(&mut s, &mut c)?;
        if !c.is_handshaking() && !s.is_handshaking() && !s.wants_write() {
            break;
        }
    }
    Ok(s.handshake_kind().unwrap())
}

/// Moves what one side has to send to the other, which processes it.
fn pump<A, B>(
    from: &mut rustls::ConnectionCommon<A>,
    to: &mut rustls::ConnectionCommon<B>,
) -> Result<(), rustls::Error> {
    let mut wire = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut wire).unwrap();
    }
    let mut bytes = &wire[..];
    while !bytes.is_empty() {
        to.read_tls(&mut bytes).unwrap();
    }
    to.process_new_packets().map(drop)
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

// An X.509 version 1 certificate (no extensions) and its key, made with OpenSSL 3.0 as nginx's uwsgi_ssl tests
// make theirs, from a config holding only `[req]` (`default_bits = 2048`, `encrypt_key = no`,
// `distinguished_name = req_distinguished_name`) and an empty `[req_distinguished_name]`:
// `openssl req -x509 -new -config F -subj /CN=x/ -days 36500 -out cert.pem -keyout key.pem`. rcgen makes
// only version 3. Test material only: the key protects nothing.
const V1_CERT: &str = "\
-----BEGIN CERTIFICATE-----
MIICoTCCAYkCFBCVy8sWMarCMNlprWO97hpKFSOpMA0GCSqGSIb3DQEBCwUAMAwx
CjAIBgNVBAMMAXgwIBcNMjYxMjA3MDYzNzQyWhgPMjEyNjExMTMwNjM3NDJaMAwx
CjAIBgNVBAMMAXgwggEiMA0GCSqGSIb3DQEBAQUAA4IBDwAwggEKAoIBAQDFwBUC
rCMEVpiz+oALU2bCLICaVtDoeOKFwNIJGlOWO4H5nVMPAsEpwJGWyr5KTQGSdNOZ
sOymKoAVb9NitsR5LUZFFzrrCcMAGkF645JivW7QngO6OgBFt/BcEU0CaYZB3xnO
2kwW+j9M7DAoBYZa6MIyonl+r0cGvCjcyEvm9wV/0sDLDppl9idwrcmye7xM4wdu
xztKzxDb0gEokwt5pOElLH6/F6F/hHBEHf3hmpO4otpRdDC3Lm1qhjR4/PkcdTWO
wY2jCpf8jbf8hJJeJhEtYJeA9rvQXVarUEyEDP17Q2lLK/I07D7oNlOFlZSGxoI9
xRdtu6U4catJ+dD5AgMBAAEwDQYJKoZIhvcNAQELBQADggEBALmOxvKROq7+aNWZ
WbMDKuHaXFunZ/+KaLa++i04dWjXhzAseTRW4RFGuu+xBC9kkXNx4i6PNOvXcpHi
Jmh1LiwUY1mWr111vI/YFtDpdgUzXPQ94MKHr1eiOO6ZvrlVdxiD2+rNQ8EjKl+m
nrJ9n3t17izRg3/JChGWt9n0UfLKE4Zg8sIWsc9Iovfv7AUNd1S26/s7P1I1J6vO
6LumBhEKEWuuVzsM85OWBn+tCKH08F8MzWVthuZ37FkKKuxsQgT4HOgGnYuG0hfm
MRZcn7jawAvpdAUzUBDvFuAUAG/0si33hHKz/SWVilLDS8hn63VVzLqUMHZcSfLb
ypxGP0M=
-----END CERTIFICATE-----";
const V1_KEY: &str = "\
-----BEGIN PRIVATE KEY-----
MIIEuwIBADANBgkqhkiG9w0BAQEFAASCBKUwggShAgEAAoIBAQDFwBUCrCMEVpiz
+oALU2bCLICaVtDoeOKFwNIJGlOWO4H5nVMPAsEpwJGWyr5KTQGSdNOZsOymKoAV
b9NitsR5LUZFFzrrCcMAGkF645JivW7QngO6OgBFt/BcEU0CaYZB3xnO2kwW+j9M
7DAoBYZa6MIyonl+r0cGvCjcyEvm9wV/0sDLDppl9idwrcmye7xM4wduxztKzxDb
0gEokwt5pOElLH6/F6F/hHBEHf3hmpO4otpRdDC3Lm1qhjR4/PkcdTWOwY2jCpf8
jbf8hJJeJhEtYJeA9rvQXVarUEyEDP17Q2lLK/I07D7oNlOFlZSGxoI9xRdtu6U4
catJ+dD5AgMBAAECgf9xaLoGblSwm+9ovrS1U/WYTd6kfaCvPBroZDlLtU/w1lJj
CQqb3YnHr42oDTbK1xUl4cuCpU//LUf9yDpS1khwBTDnpPdAT33NU7ehRQ6FDUtH
ozBAELmmByieGqaSIIF08ezihefnO7/bs925FiNIv8MCS/WhlsuO8UGH5v55YAIN
pmrPWUp4mYB9KWBS8FKWu0x/RnZ7/8pJm+I5vWbdW4kHGE44C9b/Zdr6cwI5bh0T
IoA12mJVcEnU7doLaeqp31WbAmLY5CsmKUgHUoQv6ULB/DUTrKOD6tg767+mB00Q
9oVYXuHvDkxqguK3FC2naqRLpP/1ouNutkdH2GECgYEA9/Gy/HKAuFMUzFxsoD7q
2CyFZ5wNISk0ILgREUTN/qp0pjsTv8aYtgGXwvKaih1Zfs031Uev6tQTwUNnCJmV
yNiAKeg9C/nTkPIVpbHozK3Ep0YCo66SQqSmnOGpQFE78K/e7+cZeRs/l9eMz/cq
dLK9FE33jMLFszh1hL7fxCECgYEAzCzkA5cDXvnWn1AxXmPX7K3pB0GJ1eB8Ou+R
wsJf2KtTi88pUQZ4Aqt3M9R2FC7KnF0T31VNAKt/qLa6lzzYtizAhW1IYadBftjv
731P/s+bmUIYSJVJFl+S47T4PfTNWUiLAFs5dZF9tIKVXyXtf33UCKcGhG8R6GyN
2SF6cdkCgYEAj6ePL2rcH2+rhjgqi7HIeVVaOcyVYtgvpqFe6iV2QI3cJg/mgl97
TUChAEd1uH4Gw0v9hGoTh7g2dewqfzYVLZgasa0n6Y9mv/0zA5yPqD8pyEzs7I8R
mOEy04R/fo9SbkJHpbG89YkPEFfH8xpek9yXZnNB8WFMEGmu1SmOFmECgYAhenLg
y9A3sIuqj8GokoKDQnjlQa/SK/7ywvmJj8mbg2wtjohdysu+1FK1Yu8BnDKItRJf
GmOH6pcCGQQ7bDS0ml3vAt5NdNlebT/aaxfE1lHTLW1B6YiUbJNvVuslbZCGRUjV
hB/F0VdlU8weT9/DeeRcjtaYvIWZMMOJiN3E8QKBgGTHeShm7D46roE8xoIIqe1/
JO935ZnR9KKiNY1ZfrfzTMW3HxRajW/qCxDUQZ9tg9RBvoqBio3qvgfifz5KCyk/
d2uMLsQFVShBPaneTEpuk/8uL0RJyA1KclqRwmKGq0DL8Nas3QCHoq8b2oYG6srW
6u+O5XfUi2NSnjDwk6bq
-----END PRIVATE KEY-----";

fn version_one_files(pki: &Pki) -> TlsFiles {
    TlsFiles {
        cert: pki.write("v1-cert.pem", V1_CERT),
        key: pki.write("v1-key.pem", V1_KEY),
        client_ca: None,
    }
}

/// nginx accepts a version 1 server certificate, and uWSGI serves one: so does ferrule. webpki's end-entity
/// rules (a client's, for its peer) refused it with "invalid peer certificate: ...UnsupportedCertVersion".
#[test]
fn a_version_1_server_certificate_is_served_with_a_warning_about_its_name() {
    let pki = Pki::new();
    let files = version_one_files(&pki);
    assert!(server_config(&files, tickets(), DEFAULT_TICKET_ROTATION).is_ok());
    check_files(&files).unwrap();
    let provider = rustls::crypto::ring::default_provider();
    let identity = server_identity(&files, &provider).unwrap();
    assert_eq!(identity.version_one_common_name(), Some("x"));

    let (v3, _) = server_files(&pki);
    assert_eq!(server_identity(&v3, &provider).unwrap().version_one_common_name(), None);
}

/// The key check that replaces rustls's still refuses a key that is not the certificate's (an EC key against
/// this RSA certificate; each_bad_file_is_named_with_its_problem has two EC keys).
#[test]
fn a_key_that_is_not_the_version_1_certificates_is_refused() {
    let pki = Pki::new();
    let files = TlsFiles {
        key: pki.write("other-key.pem", &KeyPair::generate().unwrap().serialize_pem()),
        ..version_one_files(&pki)
    };
    let message = server_config(&files, tickets(), DEFAULT_TICKET_ROTATION)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("other-key.pem: this key does not belong to the certificate in")
            && message.contains("v1-cert.pem"),
        "{message}"
    );
}

/// Messages about ferrule's own files never call them the peer's, as rustls's wording for a certificate does.
#[test]
fn a_bad_client_ca_is_named_without_calling_it_a_peer() {
    let pki = Pki::new();
    let (files, _) = server_files(&pki);
    let garbage = "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n";
    let message = server_config(
        &TlsFiles {
            client_ca: Some(pki.write("bad-ca.pem", garbage)),
            ..files.clone()
        },
        tickets(),
        DEFAULT_TICKET_ROTATION,
    )
    .unwrap_err()
    .to_string();
    assert!(
        message.contains("bad-ca.pem: the client CAs cannot be used"),
        "{message}"
    );
    assert!(!message.contains("peer"), "{message}");
    let message = server_config(
        &TlsFiles {
            cert: pki.write("bad-cert.pem", garbage),
            ..files
        },
        tickets(),
        DEFAULT_TICKET_ROTATION,
    )
    .unwrap_err()
    .to_string();
    assert!(message.contains("bad-cert.pem: not a valid certificate"), "{message}");
    assert!(!message.contains("peer"), "{message}");
}

/// A client certificate keeps webpki's rules: a version 1 one is refused, and the log line says to reissue it.
#[test]
fn a_version_1_client_certificate_is_still_refused_and_the_log_says_why() {
    let pki = Pki::new();
    let (files, ca_pem) = server_files(&pki);
    let with_ca = TlsFiles {
        client_ca: Some(pki.write("v1-ca.pem", V1_CERT)),
        ..files
    };
    let (server, _) = server_config(&with_ca, tickets(), DEFAULT_TICKET_ROTATION).unwrap();
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // rustls's client refuses to load a version 1 certificate of its own (the check this server no longer
    // makes on its own): hand it over without that check, as OpenSSL in nginx would send it.
    let v1 = rustls::sign::CertifiedKey::new(
        vec![CertificateDer::from_pem_slice(V1_CERT.as_bytes()).unwrap()],
        provider
            .key_provider
            .load_private_key(rustls::pki_types::PrivateKeyDer::from_pem_slice(V1_KEY.as_bytes()).unwrap())
            .unwrap(),
    );
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(v1)));
    let refused = try_handshake(&server, &Arc::new(client)).unwrap_err();
    let error = std::io::Error::new(std::io::ErrorKind::InvalidData, refused);
    assert_eq!(HandshakeFailure::of(&error), HandshakeFailure::BadCertificate);
    let explained = HandshakeFailure::explain(&error);
    assert!(
        explained.contains("X.509 version 1") && explained.contains("issue a version 3 certificate"),
        "{explained}"
    );
}
