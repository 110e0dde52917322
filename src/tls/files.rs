//! The files a tls:// socket is given (certificate chain, key, client CAs): read and checked, each problem
//! named with its file and what to do, before the configuration in `tls` is built from them.

use std::path::{Path, PathBuf};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use x509_parser::certificate::X509Certificate;
use x509_parser::x509::X509Version;

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

pub(super) fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Unreadable {
        path: path.display().to_string(),
        error,
    })
}

/// Every certificate in a PEM file, in order.
pub(super) fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
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

/// The server's certificate chain and the key that signs for it, checked: the certificate parses, is valid
/// now, and names the key's public key.
pub(super) struct ServerIdentity {
    pub(super) certified: CertifiedKey,
    /// The certificate's common name when it is X.509 version 1 (see
    /// [`ServerIdentity::version_one_common_name`]).
    version_one_name: Option<String>,
}

/// Reads the certificate chain and key, and checks them as ferrule's own: not with webpki's end-entity rules,
/// which are a client's rules for a peer and refuse a version 1 certificate that nginx and uWSGI accept.
pub(super) fn server_identity(files: &TlsFiles, provider: &CryptoProvider) -> Result<ServerIdentity, TlsError> {
    let chain = certificates(&files.cert)?;
    let cert_path = || files.cert.display().to_string();
    let key_path = || files.key.display().to_string();
    let (_, parsed) = x509_parser::parse_x509_certificate(&chain[0]).map_err(|e| TlsError::BadCertificate {
        path: cert_path(),
        reason: e.to_string(),
    })?;
    check_validity(&files.cert, &parsed)?;
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?).map_err(|_| TlsError::NoKey { path: key_path() })?;
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::BadKey {
            path: key_path(),
            reason: reason(e),
        })?;
    // The public key derived from the private key, against the certificate's, byte for byte as DER
    // SubjectPublicKeyInfo (what rustls's own check compares, after parsing the certificate with webpki). A key
    // that cannot say its public key (none with ring) is taken as rustls takes it.
    if key
        .public_key()
        .is_some_and(|spki| spki.as_ref() != parsed.public_key().raw)
    {
        return Err(TlsError::KeyMismatch {
            key: key_path(),
            cert: cert_path(),
        });
    }
    let version_one_name = (parsed.version() == X509Version::V1).then(|| {
        let cn = parsed.subject().iter_common_name().next();
        cn.and_then(|cn| cn.as_str().ok()).unwrap_or("").to_owned()
    });
    Ok(ServerIdentity {
        certified: CertifiedKey::new(chain, key),
        version_one_name,
    })
}

impl ServerIdentity {
    /// For a version 1 certificate, its common name (empty when it has none): it has no subjectAltName, so
    /// nginx with `uwsgi_ssl_verify on` checks `uwsgi_ssl_name` against the common name, as OpenSSL does.
    pub(super) fn version_one_common_name(&self) -> Option<&str> {
        self.version_one_name.as_deref()
    }
}

/// Checks that the server's certificate is valid now.
fn check_validity(path: &Path, cert: &X509Certificate<'_>) -> Result<(), TlsError> {
    let shown = || path.display().to_string();
    let validity = cert.validity();
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

/// The client CAs, as trust anchors for the client certificates (a version 1 CA certificate is one too).
pub(super) fn client_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in certificates(path)? {
        roots.add(ca).map_err(|e| TlsError::BadClientCa {
            path: path.display().to_string(),
            reason: reason(e),
        })?;
    }
    Ok(roots)
}

/// A rustls error about one of ferrule's own files, worded for it: rustls words a certificate's problem for
/// the peer that sent it ("invalid peer certificate").
pub(super) fn reason(error: rustls::Error) -> String {
    match error {
        rustls::Error::InvalidCertificate(problem) => problem.to_string(),
        other => other.to_string(),
    }
}
