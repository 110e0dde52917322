//! What made a handshake on a tls:// socket fail: the name the log line and the metrics give it, and the
//! log line's account of it (what happened and what to check).

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
