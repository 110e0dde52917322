//! The files a tls:// socket is given (certificate chain, key, client CAs): read and checked, each problem
//! named with its file and what to do, before the configuration in `tls` is built from them.

use std::path::{Path, PathBuf};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

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

/// Checks that the server's certificate is valid now.
pub(super) fn check_validity(path: &Path, cert: &CertificateDer<'_>) -> Result<(), TlsError> {
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
