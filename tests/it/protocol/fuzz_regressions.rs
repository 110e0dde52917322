//! Tier-2 regression tests from fuzzing: the checks the cargo-fuzz targets run (fuzz/checks.rs), replayed on
//! stable Rust by `cargo test` for the seed corpus (the captured nginx packets) and for named inputs.
//!
//! Every fuzz crash becomes a named regression test: when `fuzz/run` reports a crash, add a test
//! here named for what the input does (`crash_<target>_<what>`), with the minimized input from
//! fuzz/artifacts/<target>/ as a `#[rustfmt::skip]` array and a comment giving the date and the failed check.
//! No crash has been found so far (packet: 5.0M executions, environ: 2.8M, November 2026); the `edge_` tests
//! below are inputs at the boundaries the fuzzer's coverage pointed at, kept so the checks stay exercised.

#[path = "../../../fuzz/checks.rs"]
mod checks;

use crate::harness::fixtures::FIXTURES;
use crate::harness::uwsgi::{datasize_of, encode_request};
use ferrule::packet::{HEADER_LEN, parse_uwsgi_packet};

/// Both targets' checks on one input.
fn replay(input: &[u8]) {
    checks::packet(input);
    checks::environ(input);
}

/// The seed corpus `fuzz/run` starts from: each captured packet, and each of its prefixes at the points where
/// the parser changes state (inside the header, at the block, inside it, at its end).
#[test]
fn fuzz_checks_hold_for_the_seed_corpus() {
    for (name, bytes) in FIXTURES {
        let datasize = datasize_of(bytes);
        let end = HEADER_LEN + datasize;
        for cut in [0, 1, 3, 4, 5, end / 2, end - 1, end, bytes.len()] {
            let input = &bytes[..cut.min(bytes.len())];
            if std::panic::catch_unwind(|| replay(input)).is_err() {
                panic!("fuzz checks failed on {name} cut at {cut}");
            }
        }
    }
}

#[test]
fn edge_empty_and_header_only_inputs() {
    replay(b"");
    replay(&[0]);
    replay(&[0, 0, 0]);
    // A whole header with an empty vars block: a packet, but no REQUEST_METHOD.
    replay(&[0, 0, 0, 0]);
    // datasize 65535 and nothing after it: Incomplete, never an error.
    replay(&[0, 0xff, 0xff, 0]);
    assert!(matches!(
        parse_uwsgi_packet(&[0, 0xff, 0xff, 0]),
        Err(nom::Err::Incomplete(_))
    ));
    // A ping header.
    replay(&[100, 0, 0, 0]);
}

#[test]
fn edge_block_ending_inside_a_length_prefix() {
    let mut p = encode_request(&[(b"REQUEST_METHOD", b"GET")], b"");
    p.push(7); // one stray byte: half a key length
    p[1] += 1;
    replay(&p);
    assert!(matches!(
        parse_uwsgi_packet(&p),
        Err(nom::Err::Failure(_) | nom::Err::Error(_))
    ));
}

/// A 65535-byte block of thousands of tiny repeated header vars: the environ builder switches from a scan to a
/// hash index above 32 vars and joins repeats; both paths must agree with the reference.
#[test]
fn edge_thousands_of_repeated_header_vars() {
    let mut vars: Vec<(&[u8], &[u8])> = vec![(b"REQUEST_METHOD", b"GET")];
    let keys: [&[u8]; 3] = [b"HTTP_X", b"HTTP_COOKIE", b"SERVER_NAME"];
    for i in 0..4400 {
        vars.push((keys[i % 3], if i % 2 == 0 { b"" } else { b"v" }));
    }
    let p = encode_request(&vars, b"");
    assert!(p.len() <= HEADER_LEN + 65535, "{}", p.len());
    replay(&p);
}

#[test]
fn edge_content_length_limits() {
    for value in [
        &b"18446744073709551615"[..], // u64::MAX: valid
        b"18446744073709551616",      // u64::MAX + 1
        b"000000000000000000001",     // 21 digits: refused, like any length over 20 digits
        b"00000000000000000001",
        b"",
        b"-0",
        b"\xef\xbc\x95", // FULLWIDTH DIGIT FIVE
    ] {
        replay(&encode_request::<&[u8], &[u8]>(
            &[(b"REQUEST_METHOD", b"POST"), (b"CONTENT_LENGTH", value)],
            b"",
        ));
    }
}

#[test]
fn edge_repeated_method_and_odd_hosts() {
    // The later REQUEST_METHOD wins, even when it is empty (then the request has no method).
    replay(&encode_request::<&[u8], &[u8]>(
        &[(b"REQUEST_METHOD", b"GET"), (b"REQUEST_METHOD", b"")],
        b"",
    ));
    for host in [&b"["[..], b"[::1", b"[::1]:", b":", b"a:", b"::::", b"[]:80"] {
        replay(&encode_request::<&[u8], &[u8]>(
            &[(b"REQUEST_METHOD", b"GET"), (b"HTTP_HOST", host)],
            b"",
        ));
    }
    // SCRIPT_NAME longer than the URI and no PATH_INFO: the fallback must not slice past the end.
    replay(&encode_request::<&[u8], &[u8]>(
        &[
            (b"REQUEST_METHOD", b"GET"),
            (b"SCRIPT_NAME", b"/app/long/prefix"),
            (b"REQUEST_URI", b"/app%2"),
        ],
        b"",
    ));
    replay(&encode_request::<&[u8], &[u8]>(
        &[
            (b"REQUEST_METHOD", b"GET"),
            (b"SCRIPT_NAME", b"/"),
            (b"REQUEST_URI", b"/?"),
        ],
        b"",
    ));
}
