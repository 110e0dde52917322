//! TLS for `tls://` sockets (what nginx's `uwsgi_pass suwsgi://` speaks), groundwork for issue 14: the
//! certificate, key and client-CA files read and checked once, with one clear error naming the file and the
//! problem; the rustls server configuration built from them (ring as the crypto provider: no C compiler or
//! system library is needed to build the wheels with zig, and it serves TLS 1.2 and 1.3); and session
//! tickets sealed with keys every worker shares, so a session nginx resumes on any worker is accepted.
//!
//! Not wired to a socket yet (see the closing note of the session that wrote it).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ProducesTickets, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig};

/// The files a `tls://` socket needs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct TlsFiles {
    /// PEM, the server's certificate first, then its chain.
    pub(crate) cert: PathBuf,
    /// PEM: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub(crate) key: PathBuf,
    /// PEM CA certificates a client certificate must chain to; without it no client certificate is asked.
    pub(crate) client_ca: Option<PathBuf>,
}

/// Why the TLS files cannot be used; each names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    #[error("{path}: cannot read it: {error}")]
    Unreadable { path: String, error: std::io::Error },
    #[error("{path}: no certificate in it (expected PEM: -----BEGIN CERTIFICATE-----, the server's first)")]
    NoCertificate { path: String },
    #[error("{path}: no private key in it (expected PEM: PKCS#8, PKCS#1 RSA or SEC1 EC)")]
    NoKey { path: String },
    #[error("{path}: not a valid certificate: {reason}")]
    BadCertificate { path: String, reason: String },
    #[error("{path}: the certificate expired on {not_after}: renew it")]
    Expired { path: String, not_after: String },
    #[error("{path}: the certificate is not valid before {not_before}: is the clock right?")]
    NotYetValid { path: String, not_before: String },
    #[error("{key}: this key does not belong to the certificate in {cert}")]
    KeyMismatch { key: String, cert: String },
    #[error("{path}: the key cannot be used: {reason}")]
    BadKey { path: String, reason: String },
    #[error("{path}: the client CAs cannot be used: {reason}")]
    BadClientCa { path: String, reason: String },
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Unreadable {
        path: path.display().to_string(),
        error,
    })
}

/// Every certificate in a PEM file, in order.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let shown = || path.display().to_string();
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate {
            path: shown(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: shown() });
    }
    Ok(certs)
}

/// Checks that the server's certificate is valid now.
fn check_validity(path: &Path, cert: &CertificateDer<'_>) -> Result<(), TlsError> {
    let shown = || path.display().to_string();
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| TlsError::BadCertificate {
        path: shown(),
        reason: e.to_string(),
    })?;
    let validity = parsed.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now > validity.not_after {
        return Err(TlsError::Expired {
            path: shown(),
            not_after: validity.not_after.to_string(),
        });
    }
    if now < validity.not_before {
        return Err(TlsError::NotYetValid {
            path: shown(),
            not_before: validity.not_before.to_string(),
        });
    }
    Ok(())
}

/// Reads and checks the files and builds the server configuration: TLS 1.2 and 1.3 with ring, the
/// certificate and key (which must match), client certificates required when a client CA is given, and
/// tickets sealed by `tickets`.
pub(crate) fn server_config(files: &TlsFiles, tickets: Arc<SharedTickets>) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates(&files.cert)?;
    check_validity(&files.cert, &chain[0])?;
    let key_path = files.key.display().to_string();
    let key =
        PrivateKeyDer::from_pem_slice(&read(&files.key)?).map_err(|_| TlsError::NoKey { path: key_path.clone() })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::BadKey {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca_path) => {
            let shown = || ca_path.display().to_string();
            let mut roots = RootCertStore::empty();
            for ca in certificates(ca_path)? {
                roots.add(ca).map_err(|e| TlsError::BadClientCa {
                    path: shown(),
                    reason: e.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::BadClientCa {
                    path: shown(),
                    reason: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
            key: key_path.clone(),
            cert: files.cert.display().to_string(),
        },
        other => TlsError::BadKey {
            path: key_path.clone(),
            reason: other.to_string(),
        },
    })?;
    config.ticketer = tickets;
    // nginx speaks no ALPN to a uwsgi upstream; nothing to negotiate.
    Ok(Arc::new(config))
}

/// Checks the files as a worker will use them (the master does this before any worker starts).
pub(crate) fn check_files(files: &TlsFiles) -> Result<(), TlsError> {
    server_config(files, Arc::new(SharedTickets::new(Vec::new()))).map(drop)
}

/// How long one ticket key seals new tickets; a ticket opens for one more such period after that.
pub(crate) const TICKET_KEY_PERIOD_SECS: u64 = 6 * 60 * 60;

/// One ticket key: 32 bytes for AES-256-GCM, and the number of the period it seals in.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct TicketKey {
    pub(crate) period: u64,
    pub(crate) secret: [u8; 32],
}

impl std::fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never in a log.
        f.debug_struct("TicketKey")
            .field("period", &self.period)
            .finish_non_exhaustive()
    }
}

impl TicketKey {
    /// A fresh random key for `period`: the master makes them and hands them to every worker.
    pub(crate) fn generate(period: u64) -> Option<TicketKey> {
        let mut secret = [0u8; 32];
        SystemRandom::new().fill(&mut secret).ok()?;
        Some(TicketKey { period, secret })
    }

    fn aead(&self) -> Option<LessSafeKey> {
        Some(LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.secret).ok()?))
    }
}

/// The current ticket period.
pub(crate) fn current_period() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / TICKET_KEY_PERIOD_SECS)
}

/// Session tickets sealed with keys shared by every worker: the newest key seals, it and the one before open
/// (a ticket names its key's period in its first 8 bytes). The keys are replaced as periods pass, and erased
/// with them, so an old ticket stops opening: tickets do not weaken forward secrecy beyond two periods.
pub(crate) struct SharedTickets {
    keys: RwLock<Vec<TicketKey>>,
    random: SystemRandom,
}

impl std::fmt::Debug for SharedTickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTickets").finish_non_exhaustive()
    }
}

impl SharedTickets {
    pub(crate) fn new(keys: Vec<TicketKey>) -> SharedTickets {
        SharedTickets {
            keys: RwLock::new(keys),
            random: SystemRandom::new(),
        }
    }

    /// Installs the keys the master handed over, newest last; only the two newest are kept.
    pub(crate) fn set_keys(&self, mut keys: Vec<TicketKey>) {
        keys.sort_by_key(|k| k.period);
        let keep = keys.len().saturating_sub(2);
        let mut current = self.keys.write().unwrap_or_else(|e| e.into_inner());
        *current = keys.split_off(keep);
    }
}

impl ProducesTickets for SharedTickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        TICKET_KEY_PERIOD_SECS as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let key = keys.last()?;
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).ok()?;
        let period = key.period.to_be_bytes();
        let mut sealed = plain.to_vec();
        key.aead()?
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(period), &mut sealed)
            .ok()?;
        let mut ticket = Vec::with_capacity(8 + NONCE_LEN + sealed.len());
        ticket.extend_from_slice(&period);
        ticket.extend_from_slice(&nonce);
        ticket.extend_from_slice(&sealed);
        Some(ticket)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        // Attacker-controlled: every length is checked before it is used, and no path panics.
        let (period, rest) = cipher.split_first_chunk::<8>()?;
        let (nonce, sealed) = rest.split_first_chunk::<NONCE_LEN>()?;
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let key = keys.iter().find(|k| k.period.to_be_bytes() == *period)?;
        let mut opened = sealed.to_vec();
        let plain_len = key
            .aead()?
            .open_in_place(Nonce::assume_unique_for_key(*nonce), Aad::from(*period), &mut opened)
            .ok()?
            .len();
        opened.truncate(plain_len);
        Some(opened)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

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

    fn tickets() -> Arc<SharedTickets> {
        Arc::new(SharedTickets::new(vec![TicketKey::generate(current_period()).unwrap()]))
    }

    #[test]
    fn a_good_certificate_and_key_make_a_config_with_client_auth_when_asked() {
        let pki = Pki::new();
        let (issuer, ca_pem) = ca("test CA");
        let (cert, key) = leaf(&issuer, false);
        let files = TlsFiles {
            cert: pki.write("cert.pem", &cert),
            key: pki.write("key.pem", &key.serialize_pem()),
            client_ca: None,
        };
        assert!(server_config(&files, tickets()).is_ok());
        let with_ca = TlsFiles {
            client_ca: Some(pki.write("ca.pem", &ca_pem)),
            ..files
        };
        assert!(server_config(&with_ca, tickets()).is_ok());
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
        let message = |files: TlsFiles| server_config(&files, tickets()).unwrap_err().to_string();

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

    #[test]
    fn tickets_open_on_another_worker_with_the_same_keys_and_not_with_others() {
        let key = TicketKey::generate(current_period()).unwrap();
        let sealer = SharedTickets::new(vec![key.clone()]);
        let other_worker = SharedTickets::new(vec![key.clone()]);
        let stranger = SharedTickets::new(vec![TicketKey::generate(current_period()).unwrap()]);
        let ticket = sealer.encrypt(b"session state").unwrap();
        assert_eq!(other_worker.decrypt(&ticket).as_deref(), Some(&b"session state"[..]));
        assert_eq!(stranger.decrypt(&ticket), None);
        let mut tampered = ticket.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(other_worker.decrypt(&tampered), None);
        for cut in 0..ticket.len() {
            assert_eq!(other_worker.decrypt(&ticket[..cut]), None, "cut at {cut}");
        }

        // A new period's key seals from now on; the previous one still opens, the one before it no longer.
        let next = TicketKey::generate(key.period + 1).unwrap();
        let after = TicketKey::generate(key.period + 2).unwrap();
        other_worker.set_keys(vec![key.clone(), next.clone()]);
        assert!(other_worker.decrypt(&ticket).is_some());
        other_worker.set_keys(vec![key, next, after]);
        assert_eq!(other_worker.decrypt(&ticket), None);
    }
}
