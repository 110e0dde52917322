//! Session tickets for tls:// sockets: keys the master makes and rotates (`TicketKeyRing`), handed to every
//! worker, whose rustls configuration seals and opens tickets with them (`SharedTickets`), so a session nginx
//! resumes on any worker is accepted; and the memory that keeps a resumed TLS 1.2 session from getting a new
//! ticket.

use std::sync::RwLock;
use std::time::{SystemTime, UNIX_EPOCH};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;

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
        *crate::sync::write(&self.keys) = keys;
    }

    /// Seals with the key of `period`; no ticket (a full handshake next time) without one.
    pub(super) fn encrypt_in(&self, period: u64, plain: &[u8]) -> Option<Vec<u8>> {
        let keys = crate::sync::read(&self.keys);
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
    pub(super) fn decrypt_in(&self, period: u64, cipher: &[u8]) -> Option<Vec<u8>> {
        // Attacker-controlled: every length is checked before it is used, and no path panics.
        let (sealed_period, rest) = cipher.split_first_chunk::<8>()?;
        let (nonce, sealed) = rest.split_first_chunk::<NONCE_LEN>()?;
        let ticket_period = u64::from_be_bytes(*sealed_period);
        if ticket_period > period || ticket_period.saturating_add(1) < period {
            return None;
        }
        let keys = crate::sync::read(&self.keys);
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
#[cfg(test)]
mod tests {
    use super::*;

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
}
