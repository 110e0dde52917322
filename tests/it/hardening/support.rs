//! Helpers for tests/it/hardening.rs: ferrule running tests/apps/hardening_app.py, a seeded PRNG and packet
//! mutations derived from the captured nginx packets, raw sends that must end in a close, and connections from a
//! chosen loopback address.

use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use crate::harness::STOP_TIMEOUT;
use crate::harness::ferrule::{Addr, Ferrule, FerruleBuilder, Stream, apps_dir};
use crate::harness::procs::poll_until;
use crate::harness::response::Response;
use crate::harness::uwsgi::{self, Raw, Vars, datasize_of, length_offsets, nginx_vars, parse_response, read_to_close};

/// How long a connection the server should close may stay open: generous for a loaded 2-core CI box, but far
/// below --read-timeout, so "closed" means the server decided to, not that a timeout cut it.
pub const CLOSE_WITHIN: Duration = Duration::from_secs(10);

/// ferrule running `hardening_app` and the file the app appends its events to.
pub struct HardeningServer {
    pub ferrule: Ferrule,
    events: PathBuf,
}

/// `hardening_app:application` from tests/apps, events recorded in the process's temp dir.
pub fn hardening_app() -> (FerruleBuilder, PathBuf) {
    let builder = FerruleBuilder::new("hardening_app:application")
        .arg("--pythonpath")
        .arg(apps_dir());
    let events = builder.tempdir().join("events.log");
    let builder = builder.env("HARDENING_EVENT_LOG", &events);
    (builder, events)
}

impl HardeningServer {
    /// Starts `hardening_app` with extra options; `tcp` listens on 127.0.0.1:0 instead of a Unix socket.
    pub fn start(args: &[&str], tcp: bool) -> HardeningServer {
        let (mut builder, events) = hardening_app();
        if tcp {
            builder = builder.tcp();
        }
        for a in args {
            builder = builder.arg(a);
        }
        HardeningServer {
            ferrule: builder.spawn(),
            events,
        }
    }

    pub fn connect(&self) -> Stream {
        self.ferrule.connect()
    }

    /// Lines the app wrote to the event log so far.
    pub fn events(&self) -> Vec<String> {
        fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Waits (bounded) for the app to record `event`; the file has no notification to wait on, so this polls.
    pub fn wait_event(&self, event: &str, timeout: Duration) -> bool {
        poll_until(timeout, || self.events().iter().any(|e| e == event))
    }

    /// One GET with nginx-like vars; panics unless the server closes cleanly with a whole response.
    pub fn get(&self, uri: &str) -> Response {
        self.request("GET", uri, b"")
    }

    pub fn request(&self, method: &str, uri: &str, body: &[u8]) -> Response {
        let mut s = self.connect();
        parse_response(&uwsgi::request(&mut s, nginx_vars(method, uri, body).as_slice(), body))
    }

    /// The server still answers an ordinary request with 200 `ok`; `after` names what came before, for the
    /// failure message.
    pub fn assert_healthy(&self, after: &str) {
        let r = self.get("/ok");
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "ok"),
            "after {after}: a valid request did not get 200 ok\n--- log ---\n{}",
            self.ferrule.log()
        );
    }

    /// The worker process answering requests (one worker: the same pid while nothing crashed).
    pub fn worker_pid(&self) -> u32 {
        let r = self.get("/pid");
        assert_eq!(r.status, 200, "GET /pid: {r:?}");
        r.text().trim().parse().expect("pid in the body")
    }

    /// No panic, no worker death: the log a hardening test must end with.
    pub fn assert_no_crash(&self) {
        let log = self.ferrule.log();
        for bad in ["panicked", "worker died", "workers keep dying", "SIGSEGV", "SIGABRT"] {
            assert!(!log.contains(bad), "the log contains {bad:?}\n--- log ---\n{log}");
        }
    }

    /// Sends `bytes`, half-closes, and reads until the server closes; panics (with the log) if it does not
    /// within `CLOSE_WITHIN`.
    pub fn send_and_close(&self, bytes: &[u8]) -> Raw {
        let mut s = self.connect();
        s.set_read_timeout(Some(CLOSE_WITHIN));
        if let Err(e) = s.write_all(bytes).and_then(|()| s.flush()) {
            assert!(uwsgi::is_reset_error(&e), "write failed: {e}");
        }
        s.shutdown_write();
        read_to_close(&mut s)
    }
}

impl Drop for HardeningServer {
    /// A fast stop (SIGINT) so the worker is reaped with its master; the harness kills what is left.
    fn drop(&mut self) {
        self.ferrule.stop_fast(STOP_TIMEOUT);
    }
}

/// A TCP connection to `addr` from the local address `from` (any 127.0.0.0/8 address is local on Linux), so a
/// test can be a peer that --allow-from lists or does not.
pub fn connect_from(from: [u8; 4], addr: &Addr) -> Stream {
    let Addr::Tcp(to) = addr else {
        panic!("connect_from needs a TCP listener, not {addr:?}")
    };
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::from((from, 0)).into())
        .unwrap_or_else(|e| panic!("bind {from:?}: {e}"));
    socket
        .connect_timeout(&(*to).into(), CLOSE_WITHIN)
        .unwrap_or_else(|e| panic!("connect {to} from {from:?}: {e}"));
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(CLOSE_WITHIN)).expect("read timeout");
    stream.set_write_timeout(Some(CLOSE_WITHIN)).expect("write timeout");
    Stream::Tcp(stream)
}

/// A small, seeded PRNG (SplitMix64), so the random packets are the same on every run and a failure names
/// the case that reproduces it.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0); the modulo bias is irrelevant here.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

/// Offsets in a well-formed packet of every u16 length field: the datasize at 1, then each key and value length
/// of the vars block (the targets of the length-field corruptions).
pub fn packet_length_offsets(packet: &[u8]) -> Vec<usize> {
    let block = &packet[4..4 + datasize_of(packet)];
    std::iter::once(1)
        .chain(length_offsets(block).into_iter().map(|at| 4 + at))
        .collect()
}

/// One of several corruptions of a good packet, chosen by the PRNG; returns the bytes and what was done.
pub fn mutate(rng: &mut Rng, good: &[u8]) -> (Vec<u8>, String) {
    let mut p = good.to_vec();
    match rng.below(5) {
        0 | 1 => {
            let flips = 1 + rng.below(4);
            let mut at = Vec::new();
            for _ in 0..flips {
                let bit = rng.below(p.len() * 8);
                p[bit / 8] ^= 1 << (bit % 8);
                at.push(bit);
            }
            (p, format!("bits {at:?} flipped"))
        }
        2 => {
            // A flip in a length field: the interesting corruption for a length-prefixed format.
            let offsets = packet_length_offsets(&p);
            let at = offsets[rng.below(offsets.len())] + rng.below(2);
            let bit = rng.below(8);
            p[at] ^= 1 << bit;
            (p, format!("bit {bit} of the length byte at {at} flipped"))
        }
        3 => {
            let at = rng.below(p.len());
            let n = 1 + rng.below(16.min(p.len() - at));
            for b in &mut p[at..at + n] {
                *b = rng.byte();
            }
            (p, format!("{n} bytes at {at} overwritten"))
        }
        _ => {
            let at = rng.below(p.len() + 1);
            if rng.below(2) == 0 {
                let n = 1 + rng.below(32);
                let junk = rng.bytes(n);
                p.splice(at..at, junk);
                (p, format!("{n} random bytes inserted at {at}"))
            } else {
                let n = rng.below(32.min(p.len() - at) + 1);
                p.drain(at..at + n);
                (p, format!("{n} bytes removed at {at}"))
            }
        }
    }
}

/// The first bytes of `bytes` as hex, for a failure message that lets the case be replayed by hand.
pub fn hex_head(bytes: &[u8]) -> String {
    let shown: Vec<String> = bytes.iter().take(64).map(|b| format!("{b:02x}")).collect();
    format!("{} ({} bytes)", shown.join(" "), bytes.len())
}

/// What a server may answer to a corrupted packet: nothing (it closed), the ping answer (a flip made it a
/// ping), or a whole HTTP/1.1 response with a status the server or the app gives. Returns which, for a summary.
pub fn assert_sane_answer(raw: &Raw, case: &str) -> String {
    if raw.bytes.is_empty() {
        return "closed without an answer".to_owned();
    }
    if raw.bytes == [100, 0, 0, 1] {
        return "ping answer".to_owned();
    }
    let r = parse_response(&raw.bytes);
    assert!(
        matches!(r.status, 200 | 400 | 404 | 413 | 431 | 500),
        "{case}: unexpected answer {:?}",
        r.status_line
    );
    format!("HTTP {}", r.status)
}

/// A minimal vars list for a request to `uri` with `CONTENT_LENGTH` set verbatim.
pub fn vars_with_length(uri: &str, content_length: &str) -> Vars {
    nginx_vars("POST", uri, b"").set("CONTENT_LENGTH", content_length)
}
