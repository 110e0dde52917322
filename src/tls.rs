//! TLS for `tls://` sockets (what nginx's `uwsgi_pass suwsgi://` speaks): the certificate, key and client-CA
//! files read and checked, with one clear error naming the file and the problem; the rustls server
//! configuration built from them (ring as the crypto provider: no C compiler or system library is needed to
//! build the wheels with zig, and it serves TLS 1.2 and 1.3); session tickets sealed with keys the master makes
//! and hands to every worker, so a session nginx resumes on any worker is accepted; and the name of what made
//! a handshake fail, for the log line and the metrics.

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
/// session tickets sealed with `keys` (the master's, replaced every `rotation` seconds), returned to receive
/// the master's next keys.
pub(crate) fn server_config(
    files: &TlsFiles,
    keys: Vec<TicketKey>,
    rotation: u64,
) -> Result<(Arc<ServerConfig>, Arc<SharedTickets>), TlsError> {
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
    // A resumed session skips client authentication (rustls restores the client's certificates from the
    // ticket): a ticket must open only under the client CAs it was issued under, so a reload that adds or
    // changes --tls-client-ca does not let sessions made before it through.
    let mut policy = ring::digest::Context::new(&ring::digest::SHA256);
    policy.update(b"ferrule session tickets v1\0");
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca_path) => {
            policy.update(&read(ca_path)?);
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
    let mut bound_to = [0u8; 32];
    bound_to.copy_from_slice(policy.finish().as_ref());
    let tickets = Arc::new(SharedTickets::new(keys, bound_to, rotation));
    config.ticketer = Arc::clone(&tickets) as _;
    // nginx keeps one ticket per upstream server: a second one per handshake would be sealed for nothing.
    config.send_tls13_tickets = 1;
    // nginx speaks no ALPN to a uwsgi upstream; nothing to negotiate.
    Ok((Arc::new(config), tickets))
}

/// Checks the files as a worker will use them (the master does this before any worker starts).
pub(crate) fn check_files(files: &TlsFiles) -> Result<(), TlsError> {
    server_config(files, Vec::new(), DEFAULT_TICKET_ROTATION).map(drop)
}

/// How long one ticket key seals new tickets, in seconds, unless `--tls-ticket-rotation` says otherwise; a
/// ticket opens for one more such period after that.
pub(crate) const DEFAULT_TICKET_ROTATION: u64 = 6 * 60 * 60;

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

    /// `PERIOD:HEX`, for the master's line to a worker.
    pub(crate) fn encode(&self) -> String {
        let mut text = format!("{}:", self.period);
        for byte in self.secret {
            text.push_str(&format!("{byte:02x}"));
        }
        text
    }

    /// The inverse of [`TicketKey::encode`]; `None` for anything else.
    pub(crate) fn parse(text: &str) -> Option<TicketKey> {
        let (period, hex) = text.split_once(':')?;
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut secret = [0u8; 32];
        for (i, byte) in secret.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(TicketKey {
            period: period.parse().ok()?,
            secret,
        })
    }
}

/// The current ticket period, for keys replaced every `rotation` seconds.
pub(crate) fn current_period(rotation: u64) -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / rotation.max(1))
}

/// The master's ticket keys: one for the previous period (its tickets still open), the current one (it seals)
/// and the next one (so a worker has it when the period turns, before the master's new keys reach it). Keys of
/// older periods are dropped, and with them the tickets they sealed.
#[derive(Debug, Default)]
pub(crate) struct TicketKeyRing {
    keys: Vec<TicketKey>,
}

impl TicketKeyRing {
    /// Brings the ring to `period`, making the keys that are missing; true when the keys changed (the workers
    /// need the new set). A key that cannot be made (no randomness) is left out and tried again next time.
    pub(crate) fn advance(&mut self, period: u64) -> bool {
        let before = self.keys.len();
        let oldest = period.saturating_sub(1);
        self.keys.retain(|k| k.period >= oldest && k.period <= period + 1);
        let mut changed = self.keys.len() != before;
        for wanted in oldest..=period + 1 {
            if self.keys.iter().any(|k| k.period == wanted) {
                continue;
            }
            // A previous period's key made now would open no ticket: only the master's start makes it, so a
            // worker can still tell "too old" from "unknown".
            if wanted < period && !self.keys.is_empty() {
                continue;
            }
            if let Some(key) = TicketKey::generate(wanted) {
                self.keys.push(key);
                changed = true;
            }
        }
        self.keys.sort_by_key(|k| k.period);
        changed
    }

    pub(crate) fn keys(&self) -> &[TicketKey] {
        &self.keys
    }
}

/// Session tickets sealed with keys shared by every worker: the key of the current period seals, it and the
/// previous period's open (a ticket names its key's period in its first 8 bytes). The master replaces the keys
/// as periods pass and an old key is dropped with them, so a ticket stops opening after two periods at most.
pub(crate) struct SharedTickets {
    keys: RwLock<Vec<TicketKey>>,
    random: SystemRandom,
    /// A digest of the client-authentication policy the tickets are sealed under (authenticated with them).
    bound_to: [u8; 32],
    /// Seconds per key period.
    rotation: u64,
}

impl std::fmt::Debug for SharedTickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTickets").finish_non_exhaustive()
    }
}

impl SharedTickets {
    pub(crate) fn new(keys: Vec<TicketKey>, bound_to: [u8; 32], rotation: u64) -> SharedTickets {
        SharedTickets {
            keys: RwLock::new(keys),
            random: SystemRandom::new(),
            bound_to,
            rotation: rotation.max(1),
        }
    }

    /// What a ticket's seal authenticates besides its contents: its period and the policy it was issued under.
    fn aad(&self, period: &[u8; 8]) -> [u8; 40] {
        let mut aad = [0u8; 40];
        aad[..8].copy_from_slice(period);
        aad[8..].copy_from_slice(&self.bound_to);
        aad
    }

    /// Installs the keys the master handed over, replacing the old ones.
    pub(crate) fn set_keys(&self, keys: Vec<TicketKey>) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
    }

    /// Seals with the key of `period`; no ticket (a full handshake next time) without one.
    fn encrypt_in(&self, period: u64, plain: &[u8]) -> Option<Vec<u8>> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let key = keys.iter().find(|k| k.period == period)?;
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).ok()?;
        let sealed_period = key.period.to_be_bytes();
        let mut sealed = plain.to_vec();
        key.aead()?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(self.aad(&sealed_period)),
                &mut sealed,
            )
            .ok()?;
        let mut ticket = Vec::with_capacity(8 + NONCE_LEN + sealed.len());
        ticket.extend_from_slice(&sealed_period);
        ticket.extend_from_slice(&nonce);
        ticket.extend_from_slice(&sealed);
        Some(ticket)
    }

    /// Opens a ticket sealed in `period` or the one before.
    fn decrypt_in(&self, period: u64, cipher: &[u8]) -> Option<Vec<u8>> {
        // Attacker-controlled: every length is checked before it is used, and no path panics.
        let (sealed_period, rest) = cipher.split_first_chunk::<8>()?;
        let (nonce, sealed) = rest.split_first_chunk::<NONCE_LEN>()?;
        let ticket_period = u64::from_be_bytes(*sealed_period);
        if ticket_period > period || ticket_period.saturating_add(1) < period {
            return None;
        }
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let key = keys.iter().find(|k| k.period == ticket_period)?;
        let mut opened = sealed.to_vec();
        let plain_len = key
            .aead()?
            .open_in_place(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(self.aad(sealed_period)),
                &mut opened,
            )
            .ok()?
            .len();
        opened.truncate(plain_len);
        Some(opened)
    }
}

impl ProducesTickets for SharedTickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(self.rotation).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        if resumes_tls12_session(plain) {
            // No ticket is an empty one: the client keeps the ticket it resumed with.
            return None;
        }
        self.encrypt_in(current_period(self.rotation), plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let plain = self.decrypt_in(current_period(self.rotation), cipher)?;
        remember_tls12_session(&plain);
        Some(plain)
    }
}

// A TLS 1.2 session resumed from a ticket gets no new ticket. rustls would send one, and OpenSSL as a client
// (nginx) then marks the session it resumed with as spent, but nginx saves only sessions of full handshakes:
// every other connection would be a full handshake. OpenSSL servers, uWSGI's among them, send none either.
// rustls offers no setting for it, so the ticketer tells: in a TLS 1.2 resumption it is asked to seal the very
// session it just opened (the same master secret, in the same call on this thread). TLS 1.3 derives a fresh
// secret for every ticket, so its tickets are never mistaken for one.
thread_local! {
    /// A digest of the master secret of the TLS 1.2 session this thread last opened a ticket for.
    static OPENED_TLS12: std::cell::Cell<Option<[u8; 32]>> = const { std::cell::Cell::new(None) };
}

/// The TLS version and master secret of a session as rustls encodes it for a ticket (its stable persisted
/// form: an SNI flag and name, the version, the cipher suite, then the secret with a one-byte length). `None`
/// when the bytes do not read that way, and then nothing is left out.
fn session_secret(plain: &[u8]) -> Option<(u16, &[u8])> {
    let rest = match plain.split_first()? {
        (0, rest) => rest,
        (1, rest) => {
            let (&len, rest) = rest.split_first()?;
            rest.get(usize::from(len)..)?
        }
        _ => return None,
    };
    let (version, rest) = rest.split_first_chunk::<2>()?;
    let (_suite, rest) = rest.split_first_chunk::<2>()?;
    let (&len, rest) = rest.split_first()?;
    Some((u16::from_be_bytes(*version), rest.get(..usize::from(len))?))
}

const TLS12: u16 = 0x0303;

fn secret_digest(secret: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn remember_tls12_session(plain: &[u8]) {
    let opened = session_secret(plain)
        .filter(|(version, _)| *version == TLS12)
        .map(|(_, secret)| secret_digest(secret));
    OPENED_TLS12.set(opened);
}

fn resumes_tls12_session(plain: &[u8]) -> bool {
    let Some(opened) = OPENED_TLS12.take() else {
        return false;
    };
    session_secret(plain).is_some_and(|(version, secret)| version == TLS12 && secret_digest(secret) == opened)
}

/// Why a handshake on a tls:// socket failed, as the log line and `ferrule_tls_handshake_failures_total`
/// name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandshakeFailure {
    /// `--tls-client-ca` is set and the client sent no certificate.
    NoClientCertificate,
    /// The client's certificate does not chain to a `--tls-client-ca` CA.
    UnknownCa,
    /// The client's certificate chains, but is expired, not yet valid, revoked or not for client use.
    BadCertificate,
    /// The client refused this server's certificate (it sent an alert: wrong name, unknown CA, expired).
    RejectedByClient,
    /// A plain uwsgi packet: nginx has `uwsgi_pass` where `suwsgi://` is needed.
    PlainUwsgi,
    /// HTTP sent to the socket.
    Http,
    /// Neither TLS nor anything recognised.
    NotTls,
    /// The handshake did not end within `--read-timeout`.
    Timeout,
    /// The client closed or reset the connection during the handshake.
    Closed,
    /// Any other TLS protocol error (no common version or cipher, a malformed message).
    Protocol,
}

impl HandshakeFailure {
    pub(crate) const ALL: [HandshakeFailure; 10] = [
        HandshakeFailure::NoClientCertificate,
        HandshakeFailure::UnknownCa,
        HandshakeFailure::BadCertificate,
        HandshakeFailure::RejectedByClient,
        HandshakeFailure::PlainUwsgi,
        HandshakeFailure::Http,
        HandshakeFailure::NotTls,
        HandshakeFailure::Timeout,
        HandshakeFailure::Closed,
        HandshakeFailure::Protocol,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::NoClientCertificate => "no-client-certificate",
            HandshakeFailure::UnknownCa => "unknown-ca",
            HandshakeFailure::BadCertificate => "bad-certificate",
            HandshakeFailure::RejectedByClient => "rejected-by-client",
            HandshakeFailure::PlainUwsgi => "plain-uwsgi",
            HandshakeFailure::Http => "http",
            HandshakeFailure::NotTls => "not-tls",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Closed => "closed",
            HandshakeFailure::Protocol => "protocol",
        }
    }

    /// Its position in [`HandshakeFailure::ALL`], for counting.
    pub(crate) fn index(self) -> usize {
        Self::ALL.iter().position(|&f| f == self).unwrap_or(Self::ALL.len() - 1)
    }

    /// What made the handshake (as tokio-rustls reports it) fail.
    pub(crate) fn of(error: &std::io::Error) -> HandshakeFailure {
        use rustls::{CertificateError, Error};
        let Some(tls) = error.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
            return HandshakeFailure::Closed;
        };
        match tls {
            Error::NoCertificatesPresented => HandshakeFailure::NoClientCertificate,
            Error::InvalidCertificate(CertificateError::UnknownIssuer) => HandshakeFailure::UnknownCa,
            Error::InvalidCertificate(_) => HandshakeFailure::BadCertificate,
            Error::AlertReceived(_) => HandshakeFailure::RejectedByClient,
            _ => HandshakeFailure::Protocol,
        }
    }

    /// The log line's account of a failed handshake: what happened and what to check.
    pub(crate) fn explain(error: &std::io::Error) -> String {
        use rustls::{CertificateError, Error, OtherError};
        let Some(tls) = error.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
            return format!("the client went away: {error}");
        };
        match tls {
            Error::NoCertificatesPresented => "the client sent no certificate, and --tls-client-ca requires one \
                 (nginx: uwsgi_ssl_certificate and uwsgi_ssl_certificate_key)"
                .to_owned(),
            Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
                "the client's certificate is not issued by a CA in --tls-client-ca".to_owned()
            }
            Error::InvalidCertificate(CertificateError::Other(OtherError(other)))
                if other.to_string().contains("UnsupportedCertVersion") =>
            {
                "the client's certificate is X.509 version 1 (made without extensions, as `openssl x509 -req` \
                 does without -extfile): issue a version 3 certificate"
                    .to_owned()
            }
            Error::InvalidCertificate(reason) => format!("the client's certificate is refused: {reason:?}"),
            Error::AlertReceived(alert) => format!(
                "the client refused this server's certificate ({alert:?}): check nginx's \
                 uwsgi_ssl_trusted_certificate and uwsgi_ssl_name against --tls-cert"
            ),
            other => other.to_string(),
        }
    }

    /// What a connection that does not start with a TLS handshake record sent, from its first bytes.
    pub(crate) fn of_first_bytes(first: &[u8]) -> Option<HandshakeFailure> {
        // A handshake record starts 0x16 0x03; one byte of it is all a slow client may have sent yet.
        if first.is_empty() || first == [0x16] || first.starts_with(&[0x16, 0x03]) {
            return None;
        }
        Some(match crate::packet::sniff_foreign_protocol(first) {
            Some("HTTP" | "HTTP/2") => HandshakeFailure::Http,
            Some(_) => HandshakeFailure::NotTls,
            None if first[0] == crate::packet::MODIFIER_WSGI => HandshakeFailure::PlainUwsgi,
            None => HandshakeFailure::NotTls,
        })
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

    #[test]
    fn tickets_open_on_another_worker_with_the_same_keys_and_not_with_others() {
        let now = 1000;
        let mut ring = TicketKeyRing::default();
        assert!(ring.advance(now));
        let sealer = SharedTickets::new(ring.keys().to_vec(), [7; 32], DEFAULT_TICKET_ROTATION);
        let other_worker = SharedTickets::new(ring.keys().to_vec(), [7; 32], DEFAULT_TICKET_ROTATION);
        let mut stranger_ring = TicketKeyRing::default();
        stranger_ring.advance(now);
        let stranger = SharedTickets::new(stranger_ring.keys().to_vec(), [7; 32], DEFAULT_TICKET_ROTATION);
        let ticket = sealer.encrypt_in(now, b"session state").unwrap();
        assert_eq!(
            other_worker.decrypt_in(now, &ticket).as_deref(),
            Some(&b"session state"[..])
        );
        assert_eq!(stranger.decrypt_in(now, &ticket), None);
        let mut tampered = ticket.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(other_worker.decrypt_in(now, &tampered), None);
        for cut in 0..ticket.len() {
            assert_eq!(other_worker.decrypt_in(now, &ticket[..cut]), None, "cut at {cut}");
        }

        // The period turns before the master's new keys arrive: the next key is already there, and the ticket
        // sealed in the previous period still opens.
        assert!(sealer.encrypt_in(now + 1, b"x").is_some());
        assert!(other_worker.decrypt_in(now + 1, &ticket).is_some());
        // The master's keys for the period after: the first ticket's key is gone, and it would be too old anyway.
        assert!(ring.advance(now + 2));
        assert_eq!(
            ring.keys().iter().map(|k| k.period).collect::<Vec<_>>(),
            [now + 1, now + 2, now + 3]
        );
        other_worker.set_keys(ring.keys().to_vec());
        assert_eq!(other_worker.decrypt_in(now + 2, &ticket), None);
        assert_eq!(sealer.decrypt_in(now + 2, &ticket), None, "two periods old");
        assert!(!ring.advance(now + 2), "nothing new within a period");
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

    #[test]
    fn ticket_keys_cross_the_control_line_intact_and_garbage_does_not() {
        let key = TicketKey::generate(123_456).unwrap();
        let line = key.encode();
        assert_eq!(TicketKey::parse(&line), Some(key.clone()));
        assert!(
            !format!("{key:?}").contains(&line[7..]),
            "the secret never reaches a log"
        );
        for bad in [
            "",
            "1:",
            "x:00",
            &line[..line.len() - 1],
            &format!("{line}0"),
            &line.replace(':', ""),
        ] {
            assert_eq!(TicketKey::parse(bad), None, "{bad:?}");
        }
        assert_eq!(TicketKey::parse(&format!("1:{}", "é".repeat(32))), None);
    }

    #[test]
    fn first_bytes_say_what_a_non_tls_client_sent() {
        let of = HandshakeFailure::of_first_bytes;
        assert_eq!(of(&[0x16, 0x03, 0x01, 0x02]), None);
        assert_eq!(of(&[0x16]), None);
        assert_eq!(of(b""), None);
        assert_eq!(of(b"GET / HTTP/1.1\r\n"), Some(HandshakeFailure::Http));
        assert_eq!(of(b"PRI * HTTP/2.0"), Some(HandshakeFailure::Http));
        assert_eq!(of(&[0, 20, 0, 0, 14, 0]), Some(HandshakeFailure::PlainUwsgi));
        assert_eq!(of(b"\xff\xfe garbage"), Some(HandshakeFailure::NotTls));
        let names: std::collections::HashSet<_> = HandshakeFailure::ALL.iter().map(|f| f.as_str()).collect();
        assert_eq!(names.len(), HandshakeFailure::ALL.len());
        for (i, f) in HandshakeFailure::ALL.iter().enumerate() {
            assert_eq!(f.index(), i);
        }
    }
}
