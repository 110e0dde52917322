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

use std::sync::Arc;

use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

pub(crate) use failures::HandshakeFailure;
pub(crate) use files::{TlsError, TlsFiles};
pub(crate) use tickets::{DEFAULT_TICKET_ROTATION, SharedTickets, TicketKey, TicketKeyRing, current_period};

use files::{certificates, check_validity, read};

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
#[cfg(test)]
mod tests;
