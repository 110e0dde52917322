//! The checks behind the fuzz targets, shared with tests/it/protocol/fuzz_regressions.rs so the seed corpus (the captured
//! nginx packets) and every crash input, kept there as a named test, replay on stable Rust under `cargo test`.
//!
//! `packet` drives the uwsgi decoder (`ferrule::packet`), the first stage after the socket; `environ` drives the
//! decoder and then the environ builder (`ferrule::environ`). Beyond "never panics" they check what those stages
//! promise: the header parser is streaming, a parsed vars block re-encodes to exactly the bytes it came from, a
//! short packet is `Incomplete` and never an error (the connection turns `Incomplete` into "read more"), and the
//! environ follows the PEP 3333 rules the builder implements, against a small reference written here.
#![allow(dead_code)] // each fuzz target uses one of the two entry points

use bytes::Bytes;
use ferrule::environ::{Environ, EnvironError};
use ferrule::packet::{
    Decoded, HEADER_LEN, MODIFIER_PING, MODIFIER_WSGI, Var, decode, parse_uwsgi_header, parse_uwsgi_packet,
    parse_uwsgi_vars, sniff_foreign_protocol,
};

/// Fuzz target `packet`: arbitrary bytes as a packet and as a bare vars block.
pub fn packet(data: &[u8]) {
    let _ = sniff_foreign_protocol(data);

    match parse_uwsgi_header(data) {
        Ok((rest, h)) => {
            assert!(data.len() >= HEADER_LEN);
            assert_eq!(rest.len(), data.len() - HEADER_LEN);
            assert_eq!([h.modifier1, h.modifier2], [data[0], data[3]]);
            assert_eq!(h.datasize, u16::from_le_bytes([data[1], data[2]]));
        }
        Err(nom::Err::Incomplete(_)) => assert!(data.len() < HEADER_LEN, "a whole header was Incomplete"),
        Err(_) => panic!(
            "the header parser rejected {} bytes: any 4 bytes are a header",
            data.len()
        ),
    }

    // The input as a bare vars block.
    check_block(data);

    // The input as the start of a connection, through the decode every read path of the server runs.
    check_decode(data);

    // The input as a packet.
    let want = (data.len() >= HEADER_LEN).then(|| HEADER_LEN + usize::from(u16::from_le_bytes([data[1], data[2]])));
    match parse_uwsgi_packet(data) {
        Ok((body, packet)) => {
            let end = want.expect("a parsed packet has a header");
            assert!(data.len() >= end);
            assert_eq!(
                body.len(),
                data.len() - end,
                "the body is not what follows the vars block"
            );
            let block = &data[HEADER_LEN..end];
            assert_eq!(
                encode(&packet.vars),
                block,
                "packet vars do not re-encode to its vars block"
            );
            check_block(block);
            // Streaming: every strict prefix of a good packet is Incomplete. A few cut points keep this cheap.
            let cuts = [0, 1, HEADER_LEN - 1, HEADER_LEN, end / 2, end.saturating_sub(1)];
            for cut in cuts.into_iter().filter(|&c| c < end) {
                match parse_uwsgi_packet(&data[..cut]) {
                    Err(nom::Err::Incomplete(_)) => {}
                    Ok(_) => panic!("a {cut}-byte prefix of a {end}-byte packet parsed as a whole packet"),
                    Err(_) => panic!("a {cut}-byte prefix of a good {end}-byte packet was rejected"),
                }
            }
        }
        Err(nom::Err::Incomplete(_)) => {
            assert!(
                want.is_none_or(|end| data.len() < end),
                "a packet with its whole vars block was Incomplete"
            );
        }
        Err(nom::Err::Error(_) | nom::Err::Failure(_)) => {
            let end = want.expect("a rejected packet has a header");
            assert!(data.len() >= end, "a short packet was rejected instead of Incomplete");
            assert!(
                parse_uwsgi_vars(&data[HEADER_LEN..end]).is_err(),
                "the packet was rejected but its vars block alone parses"
            );
        }
    }
}

/// `decode` against the parsers it is built on, with vars limits below, at and above the packet's own size:
/// a short header needs more with no length known; a ping or another modifier1 is said to be one whatever
/// follows; a vars block over the limit is refused before it is parsed; otherwise `decode` agrees with
/// `parse_uwsgi_packet`, needing exactly the packet's length when it is short.
fn check_decode(data: &[u8]) {
    let own = (data.len() >= HEADER_LEN).then(|| usize::from(u16::from_le_bytes([data[1], data[2]])));
    let limits = [0, 64, 4096, usize::from(u16::MAX)]
        .into_iter()
        .chain(own.into_iter().flat_map(|n| [n.saturating_sub(1), n]));
    for limit in limits {
        let decoded = decode(data, limit);
        let Ok((_, header)) = parse_uwsgi_header(data) else {
            assert_eq!(decoded, Ok(Decoded::Incomplete { want: None }), "a short header");
            continue;
        };
        let len = HEADER_LEN + usize::from(header.datasize);
        match header.modifier1 {
            MODIFIER_WSGI => {}
            MODIFIER_PING => {
                assert_eq!(decoded, Ok(Decoded::Ping { len }));
                continue;
            }
            modifier1 => {
                let protocol = sniff_foreign_protocol(data);
                assert_eq!(decoded, Ok(Decoded::Unsupported { modifier1, protocol }));
                continue;
            }
        }
        let datasize = usize::from(header.datasize);
        if datasize > limit {
            assert_eq!(
                decoded,
                Ok(Decoded::TooLarge { datasize, limit }),
                "refused before parsing"
            );
            continue;
        }
        match (decoded, parse_uwsgi_packet(data)) {
            (Ok(Decoded::Request { packet, len: got }), Ok((_, parsed))) => {
                assert_eq!(got, len, "a request's length is its header and vars block");
                assert_eq!(packet, parsed);
            }
            (Ok(Decoded::Incomplete { want }), Err(nom::Err::Incomplete(_))) => {
                assert_eq!(want, Some(len), "a short packet needs exactly its length");
            }
            (Err(e), Err(nom::Err::Error(p) | nom::Err::Failure(p))) => assert_eq!(e, p),
            (d, p) => panic!("decode gave {d:?} where the packet parser gave {p:?}"),
        }
    }
}

/// Fuzz target `environ`: arbitrary bytes through the decoder, then the environ builder.
pub fn environ(data: &[u8]) {
    // As a whole packet, the way the connection does it: the vars borrow from one shared buffer.
    if let Ok((_, packet)) = parse_uwsgi_packet(data) {
        let end = HEADER_LEN + usize::from(packet.header.datasize);
        let buf = Bytes::copy_from_slice(&data[..end]);
        let (_, vars) = parse_uwsgi_vars(&buf[HEADER_LEN..]).expect("the same block parsed a moment ago");
        check(&buf, &vars);
        return;
    }
    // Otherwise as a bare vars block, so inputs without a consistent header still reach the builder.
    let buf = Bytes::copy_from_slice(data);
    if let Ok((_, vars)) = parse_uwsgi_vars(&buf) {
        check(&buf, &vars);
    }
}

/// The vars block as the wire format spells it, written independently of the parser under test.
fn encode(vars: &[Var<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for var in vars {
        for part in [var.key, var.value] {
            let len = u16::try_from(part.len()).expect("a parsed var part came from a u16 length");
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(part);
        }
    }
    out
}

/// Whether `inner` is a sub-slice of `outer` (zero-copy: vars must borrow from the input, not from a copy).
fn within(outer: &[u8], inner: &[u8]) -> bool {
    let (o, i) = (outer.as_ptr() as usize, inner.as_ptr() as usize);
    inner.is_empty() || (i >= o && i + inner.len() <= o + outer.len())
}

/// A complete vars block: `Ok` means every byte was a var and the vars re-encode to the block.
fn check_block(block: &[u8]) {
    match parse_uwsgi_vars(block) {
        Ok((rest, vars)) => {
            assert!(
                rest.is_empty(),
                "vars parser left {} bytes of a complete block",
                rest.len()
            );
            for var in &vars {
                assert!(!var.key.is_empty(), "zero-length key accepted");
                assert!(
                    within(block, var.key) && within(block, var.value),
                    "var does not borrow from the block"
                );
            }
            assert_eq!(
                encode(&vars),
                block,
                "parsed vars do not re-encode to the block they came from"
            );
        }
        // A complete parser over a whole length-prefixed block must decide, never ask for more.
        Err(nom::Err::Incomplete(needed)) => panic!("complete vars parser returned Incomplete({needed:?})"),
        Err(nom::Err::Error(_) | nom::Err::Failure(_)) => {}
    }
}

/// The last value of a non-`HTTP_` var: a param set twice in the nginx config, the later one wins.
fn last<'a>(vars: &[Var<'a>], key: &[u8]) -> Option<&'a [u8]> {
    vars.iter().rev().find(|v| v.key == key).map(|v| v.value)
}

/// CONTENT_LENGTH as the contract states it: empty or missing is 0; plain decimal digits that fit a u64 (the
/// server refuses more than 20 digits outright, so that is the reference too); anything else is invalid.
fn reference_content_length(value: Option<&[u8]>) -> Option<u64> {
    match value {
        None | Some(b"") => Some(0),
        Some(v) if v.len() <= 20 && v.iter().all(u8::is_ascii_digit) => std::str::from_utf8(v).ok()?.parse().ok(),
        Some(_) => None,
    }
}

fn check(buf: &Bytes, vars: &[Var<'_>]) {
    // A packet with vars but no REQUEST_METHOD at all is taken as GET (as uWSGI and gunicorn do).
    let method = match last(vars, b"REQUEST_METHOD") {
        None if !vars.is_empty() => Some(&b"GET"[..]),
        m => m.filter(|m| !m.is_empty()),
    };
    let lengths: Vec<&[u8]> = vars
        .iter()
        .filter(|v| v.key == b"CONTENT_LENGTH")
        .map(|v| v.value)
        .collect();
    let lengths_agree = lengths.windows(2).all(|w| w[0] == w[1]);
    let content_length = reference_content_length(last(vars, b"CONTENT_LENGTH"));
    match Environ::from_vars(buf, vars) {
        Ok(env) => {
            assert!(lengths_agree, "conflicting CONTENT_LENGTH values were accepted");
            assert_eq!(Some(&env.method[..]), method, "method is not the last REQUEST_METHOD");
            assert_eq!(
                Some(env.content_length),
                content_length,
                "content_length disagrees with CONTENT_LENGTH"
            );
            let keys: Vec<&[u8]> = env.iter().map(|(key, _)| key).collect();
            for (i, &key) in keys.iter().enumerate() {
                assert!(!key.is_empty(), "empty key in the environ");
                assert!(
                    key != b"HTTP_CONTENT_LENGTH" && key != b"HTTP_CONTENT_TYPE",
                    "PEP 3333: {} has no HTTP_ twin",
                    String::from_utf8_lossy(key)
                );
                assert!(
                    !keys[..i].contains(&key),
                    "key {:?} appears twice in the environ",
                    String::from_utf8_lossy(key)
                );
            }
            for key in [
                "SCRIPT_NAME",
                "PATH_INFO",
                "QUERY_STRING",
                "SERVER_NAME",
                "SERVER_PORT",
                "SERVER_PROTOCOL",
            ] {
                assert!(env.get(key.as_bytes()).is_some(), "PEP 3333: {key} is missing");
            }
            assert_ne!(
                env.get(b"SCRIPT_NAME"),
                Some(&b"/"[..]),
                "SCRIPT_NAME \"/\" is the root: \"\""
            );
            for key in ["SERVER_NAME", "SERVER_PORT", "SERVER_PROTOCOL"] {
                assert!(env.get(key.as_bytes()).is_some_and(|v| !v.is_empty()), "{key} is empty");
            }
            // Every HTTP_ value is the given values joined, so it is at least as long as the last of them.
            for var in vars
                .iter()
                .filter(|v| v.key.starts_with(b"HTTP_") && !v.key.starts_with(b"HTTP_CONTENT_"))
            {
                let got = env.get(var.key).expect("an HTTP_ var was dropped");
                if var.key == b"HTTP_HOST" {
                    // A repeated Host comes from the nginx config overriding uwsgi_params: the last one wins.
                    assert_eq!(got, last_http(vars, var.key), "HTTP_HOST is not the last value");
                    continue;
                }
                assert!(got.len() >= var.value.len() && got.ends_with(last_http(vars, var.key)));
            }
        }
        Err(EnvironError::MissingMethod) => assert!(method.is_none(), "refused as missing REQUEST_METHOD"),
        Err(EnvironError::ConflictingContentLength(..)) => {
            assert!(
                !lengths_agree,
                "CONTENT_LENGTH values that agree were refused as conflicting"
            )
        }
        Err(EnvironError::InvalidContentLength(_)) => {
            assert!(
                method.is_some(),
                "a request without a method should be refused for that first"
            );
            assert!(content_length.is_none(), "a valid CONTENT_LENGTH was refused");
        }
    }
}

/// The last value given for a repeated `HTTP_` var: joined values end with it.
fn last_http<'a>(vars: &[Var<'a>], key: &[u8]) -> &'a [u8] {
    last(vars, key).unwrap_or_default()
}
