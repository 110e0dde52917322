//! TLS for `tls://` sockets (what nginx's `uwsgi_pass suwsgi://` speaks): the certificate, key and client-CA
//! files read and checked, with one clear error naming the file and the problem; the rustls server
//! configuration built from them (ring as the crypto provider: no C compiler or system library is needed to
//! build the wheels with zig, and it serves TLS 1.2 and 1.3); session tickets sealed with keys the master makes
//! and hands to every worker, so a session nginx resumes on any worker is accepted; and the name of what made
//! a handshake fail, for the log line and the metrics.
//!
//! `files` reads and checks the files, this module builds the server configuration from them, `tickets` seals
//! and opens the session tickets, and `failures` names what made a handshake fail.

mod failures;
mod files;
mod tickets;

use std::sync::{Arc, Mutex};

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::SingleCertAndKey;

pub(crate) use failures::HandshakeFailure;
pub(crate) use files::{TlsError, TlsFiles};
pub(crate) use tickets::{DEFAULT_TICKET_ROTATION, SharedTickets, TicketKey, TicketKeyRing, current_period};

use files::{ServerIdentity, client_roots, read, reason, server_identity};

/// Reads and checks the files and builds the server configuration: TLS 1.2 and 1.3 with ring, the
/// certificate and key (which must match), client certificates required when a client CA is given, and
/// session tickets sealed with `keys` (the master's, replaced every `rotation` seconds), returned to receive
/// the master's next keys.
pub(crate) fn server_config(
    files: &TlsFiles,
    keys: Vec<TicketKey>,
    rotation: u64,
) -> Result<(Arc<ServerConfig>, Arc<SharedTickets>), TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let identity = server_identity(files, &provider)?;
    configure(files, identity, provider, keys, rotation)
}

/// Checks the files as a worker will use them (the master does this before any worker starts, for
/// `--check-config` and on SIGHUP), and says when the certificate is X.509 version 1.
pub(crate) fn check_files(files: &TlsFiles) -> Result<(), TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let identity = server_identity(files, &provider)?;
    let version_one = identity.version_one_common_name().map(str::to_owned);
    // Never empty: reading the chain refuses a file without a certificate.
    let der = identity.certified.cert[0].to_vec();
    configure(files, identity, provider, Vec::new(), DEFAULT_TICKET_ROTATION)?;
    if let Some(common_name) = version_one {
        warn_version_one(files, &common_name, der);
    }
    Ok(())
}

/// One warning line per version 1 certificate: the master checks the files again as `--uid` and on every
/// SIGHUP, and the same certificate need not be explained twice.
fn warn_version_one(files: &TlsFiles, common_name: &str, der: Vec<u8>) {
    static WARNED: Mutex<Vec<u8>> = Mutex::new(Vec::new());
    let mut warned = crate::sync::lock(&WARNED);
    if *warned == der {
        return;
    }
    *warned = der;
    tracing::warn!(
        cert = %files.cert.display(),
        common_name,
        "the certificate is X.509 version 1, without subjectAltName: nginx with uwsgi_ssl_verify on checks \
         uwsgi_ssl_name against its common name"
    );
}

/// The configuration around a checked certificate and key.
fn configure(
    files: &TlsFiles,
    identity: ServerIdentity,
    provider: Arc<CryptoProvider>,
    keys: Vec<TicketKey>,
    rotation: u64,
) -> Result<(Arc<ServerConfig>, Arc<SharedTickets>), TlsError> {
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::BadKey {
            path: files.key.display().to_string(),
            reason: reason(e),
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
            // webpki's rules for a client certificate stay: a version 1 one is refused (see HandshakeFailure).
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(client_roots(ca_path)?), provider)
                .build()
                .map_err(|e| TlsError::BadClientCa {
                    path: ca_path.display().to_string(),
                    reason: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(identity.certified)));
    let mut bound_to = [0u8; 32];
    bound_to.copy_from_slice(policy.finish().as_ref());
    let tickets = Arc::new(SharedTickets::new(keys, bound_to, rotation));
    config.ticketer = Arc::clone(&tickets) as _;
    // nginx keeps one ticket per upstream server: a second one per handshake would be sealed for nothing.
    config.send_tls13_tickets = 1;
    // nginx speaks no ALPN to a uwsgi upstream; nothing to negotiate.
    Ok((Arc::new(config), tickets))
}

#[cfg(test)]
mod tests;
