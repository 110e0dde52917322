//! Tier-2 protocol tests: real nginx 1.22 uwsgi packets (tests/fixtures/*.bin) through `ferrule::packet`.
//!
//! The fixtures were recorded by `tests/fixtures/capture.sh` (nginx 1.22.1 from Debian 12 with the
//! stock `/etc/nginx/uwsgi_params`, curl as the client); tests/fixtures/README.md says how to
//! recapture. Every expected var list below is written out in full, in wire order, so a parser that
//! drops, reorders or merges vars (nginx sends repeated headers as repeated vars) fails here.

mod fuzz_regressions;

use std::panic::catch_unwind;

use crate::harness::fixtures::{
    CHUNKED_UPLOAD, FIXTURES, GET_QUERY, LARGE_COOKIE, NON_ASCII_PATH, POST_FORM, REPEATED_HEADERS,
};
use crate::harness::uwsgi::{datasize_of, encode_request, length_offsets};
use ferrule::packet::{Var, parse_uwsgi_header, parse_uwsgi_packet, parse_uwsgi_vars};

/// Names the outcome of a parse without needing `Debug` on the parsed types.
fn outcome<T, E>(result: &Result<T, nom::Err<E>>) -> &'static str {
    match result {
        Ok(_) => "Ok",
        Err(nom::Err::Incomplete(_)) => "Incomplete",
        Err(nom::Err::Error(_)) => "Error",
        Err(nom::Err::Failure(_)) => "Failure",
    }
}

fn is_rejection<T, E>(result: &Result<T, nom::Err<E>>) -> bool {
    matches!(result, Err(nom::Err::Error(_) | nom::Err::Failure(_)))
}

fn show(vars: &[(&[u8], &[u8])]) -> String {
    vars.iter()
        .map(|(k, v)| format!("  {} = {}\n", k.escape_ascii(), v.escape_ascii()))
        .collect()
}

/// Parses a capture three ways (header, vars block alone, whole packet), checks they agree and
/// that the packet's vars are exactly `expected`, then returns the body bytes.
fn check_capture<'a>(name: &str, capture: &'a [u8], expected: &[(&str, &str)]) -> &'a [u8] {
    let datasize = datasize_of(capture);

    let (rest, header) = match parse_uwsgi_header(capture) {
        Ok(ok) => ok,
        Err(e) => panic!("{name}: header parse: {}", outcome::<(), _>(&Err(e))),
    };
    assert_eq!(header.modifier1, 0, "{name}: modifier1");
    assert_eq!(usize::from(header.datasize), datasize, "{name}: datasize");
    assert_eq!(header.modifier2, 0, "{name}: modifier2");
    assert_eq!(rest, &capture[4..], "{name}: header must consume exactly 4 bytes");

    let block = &capture[4..4 + datasize];
    let (rest, block_vars) = match parse_uwsgi_vars(block) {
        Ok(ok) => ok,
        Err(e) => panic!("{name}: vars parse: {}", outcome::<(), _>(&Err(e))),
    };
    assert!(
        rest.is_empty(),
        "{name}: vars parser left {} bytes of the block",
        rest.len()
    );

    let (body, packet) = match parse_uwsgi_packet(capture) {
        Ok(ok) => ok,
        Err(e) => panic!("{name}: packet parse: {}", outcome::<(), _>(&Err(e))),
    };
    assert_eq!(packet.header.modifier1, 0, "{name}: packet modifier1");
    assert_eq!(usize::from(packet.header.datasize), datasize, "{name}: packet datasize");
    assert_eq!(packet.header.modifier2, 0, "{name}: packet modifier2");

    let pairs = |vars: &[Var<'a>]| -> Vec<(&'a [u8], &'a [u8])> { vars.iter().map(|v| (v.key, v.value)).collect() };
    let got = pairs(&packet.vars);
    assert_eq!(got, pairs(&block_vars), "{name}: packet and vars-block parses disagree");
    let want: Vec<(&[u8], &[u8])> = expected.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())).collect();
    assert!(
        got == want,
        "{name}: vars differ\n--- got ({})\n{}--- want ({})\n{}",
        got.len(),
        show(&got),
        want.len(),
        show(&want),
    );

    // Zero-copy: keys and values point into the capture itself.
    let range = capture.as_ptr_range();
    for var in &packet.vars {
        assert!(range.contains(&var.key.as_ptr()), "{name}: key not borrowed from input");
    }

    assert_eq!(
        body,
        &capture[4 + datasize..],
        "{name}: body is everything after the vars"
    );
    body
}

fn post_form_body() -> &'static [u8] {
    b"name=Ada+Lovelace&email=ada%40example.test&topic=analytical+engine\
      &message=The+engine+might+compose+elaborate+and+scientific+pieces+of+music\
      +of+any+degree+of+complexity+or+extent.+%E2%80%94+notes%2C+1843\
      &tags=math&tags=history&tags=computing&subscribe=on&page=1&csrf=0123456789abcdef0123456789abcdef"
}

// Captured with: curl -H 'Host: example.test' 'http://127.0.0.1:PORT/search?q=rust&lang=en'
// Debian's uwsgi_params sends HTTP_HOST as $host, so the client's Host line is not repeated.
#[test]
fn get_query_capture() {
    let body = check_capture(
        "get_query",
        GET_QUERY,
        &[
            ("QUERY_STRING", "q=rust&lang=en"),
            ("REQUEST_METHOD", "GET"),
            ("CONTENT_TYPE", ""),
            ("CONTENT_LENGTH", ""),
            ("REQUEST_URI", "/search?q=rust&lang=en"),
            ("PATH_INFO", "/search"),
            ("DOCUMENT_ROOT", "/srv/www"),
            ("SERVER_PROTOCOL", "HTTP/1.1"),
            ("REQUEST_SCHEME", "http"),
            ("REMOTE_ADDR", "127.0.0.1"),
            ("REMOTE_PORT", "33956"),
            ("SERVER_PORT", "60837"),
            ("SERVER_NAME", "localhost"),
            ("HTTP_HOST", "example.test"),
            ("HTTP_USER_AGENT", "ferrule-capture"),
            ("HTTP_ACCEPT", "*/*"),
        ],
    );
    assert_eq!(GET_QUERY.len(), 385);
    assert!(body.is_empty());
}

// Captured with: curl -H 'X-Dup: one' -H 'X-Dup: two' -H 'Cookie: a=1' -H 'Cookie: b=2' http://127.0.0.1:PORT/
// nginx 1.22 forwards repeated headers as repeated vars (HTTP_COOKIE too); joining is environ's job.
#[test]
fn repeated_headers_capture() {
    let body = check_capture(
        "repeated_headers",
        REPEATED_HEADERS,
        &[
            ("QUERY_STRING", ""),
            ("REQUEST_METHOD", "GET"),
            ("CONTENT_TYPE", ""),
            ("CONTENT_LENGTH", ""),
            ("REQUEST_URI", "/"),
            ("PATH_INFO", "/"),
            ("DOCUMENT_ROOT", "/srv/www"),
            ("SERVER_PROTOCOL", "HTTP/1.1"),
            ("REQUEST_SCHEME", "http"),
            ("REMOTE_ADDR", "127.0.0.1"),
            ("REMOTE_PORT", "33960"),
            ("SERVER_PORT", "60837"),
            ("SERVER_NAME", "localhost"),
            ("HTTP_HOST", "127.0.0.1"),
            ("HTTP_USER_AGENT", "ferrule-capture"),
            ("HTTP_ACCEPT", "*/*"),
            ("HTTP_X_DUP", "one"),
            ("HTTP_X_DUP", "two"),
            ("HTTP_COOKIE", "a=1"),
            ("HTTP_COOKIE", "b=2"),
        ],
    );
    assert!(body.is_empty());
}

// Captured with: curl -H 'Content-Type: application/x-www-form-urlencoded' --data-binary @form
//   http://127.0.0.1:PORT/submit (form: the 299 bytes in post_form_body())
// nginx also forwards the headers as HTTP_CONTENT_TYPE / HTTP_CONTENT_LENGTH.
#[test]
fn post_form_capture() {
    let body = check_capture(
        "post_form",
        POST_FORM,
        &[
            ("QUERY_STRING", ""),
            ("REQUEST_METHOD", "POST"),
            ("CONTENT_TYPE", "application/x-www-form-urlencoded"),
            ("CONTENT_LENGTH", "299"),
            ("REQUEST_URI", "/submit"),
            ("PATH_INFO", "/submit"),
            ("DOCUMENT_ROOT", "/srv/www"),
            ("SERVER_PROTOCOL", "HTTP/1.1"),
            ("REQUEST_SCHEME", "http"),
            ("REMOTE_ADDR", "127.0.0.1"),
            ("REMOTE_PORT", "33962"),
            ("SERVER_PORT", "60837"),
            ("SERVER_NAME", "localhost"),
            ("HTTP_HOST", "127.0.0.1"),
            ("HTTP_USER_AGENT", "ferrule-capture"),
            ("HTTP_ACCEPT", "*/*"),
            ("HTTP_CONTENT_TYPE", "application/x-www-form-urlencoded"),
            ("HTTP_CONTENT_LENGTH", "299"),
        ],
    );
    assert_eq!(body.len(), 299);
    assert_eq!(body, post_form_body());
}

// Captured with: curl -H 'Transfer-Encoding: chunked' -H 'Content-Type: text/plain'
//   --data-binary @upload http://127.0.0.1:PORT/upload (upload: 200 numbered 54-byte lines)
// nginx buffers and de-chunks the body and sets CONTENT_LENGTH, yet still forwards
// HTTP_TRANSFER_ENCODING: the body must be read by CONTENT_LENGTH, never de-chunked again.
#[test]
fn chunked_upload_capture() {
    let body = check_capture(
        "chunked_upload",
        CHUNKED_UPLOAD,
        &[
            ("QUERY_STRING", ""),
            ("REQUEST_METHOD", "POST"),
            ("CONTENT_TYPE", "text/plain"),
            ("CONTENT_LENGTH", "10800"),
            ("REQUEST_URI", "/upload"),
            ("PATH_INFO", "/upload"),
            ("DOCUMENT_ROOT", "/srv/www"),
            ("SERVER_PROTOCOL", "HTTP/1.1"),
            ("REQUEST_SCHEME", "http"),
            ("REMOTE_ADDR", "127.0.0.1"),
            ("REMOTE_PORT", "33966"),
            ("SERVER_PORT", "60837"),
            ("SERVER_NAME", "localhost"),
            ("HTTP_HOST", "127.0.0.1"),
            ("HTTP_USER_AGENT", "ferrule-capture"),
            ("HTTP_ACCEPT", "*/*"),
            ("HTTP_TRANSFER_ENCODING", "chunked"),
            ("HTTP_CONTENT_TYPE", "text/plain"),
        ],
    );
    let want: String = (1..=200)
        .map(|i| format!("line {i:03}: the quick brown fox jumps over the lazy dog\n"))
        .collect();
    assert_eq!(body.len(), 10800);
    assert!(
        body == want.as_bytes(),
        "chunked_upload: body differs from the uploaded file"
    );
}

// Captured with: curl -H "Cookie: k000=vvv...; k001=vvv...; ...; k639=vvv..." http://127.0.0.1:PORT/
// (640 crumbs with 40-byte values, 30078 bytes; nginx ran with large_client_header_buffers 4 64k).
// The vars block is 30430 bytes: well past one 8 KB read, still under the 65535 default limit.
#[test]
fn large_cookie_capture() {
    let crumb = "v".repeat(40);
    let cookie = (0..640)
        .map(|i| format!("k{i:03}={crumb}"))
        .collect::<Vec<_>>()
        .join("; ");
    assert_eq!(cookie.len(), 30078);
    let body = check_capture(
        "large_cookie",
        LARGE_COOKIE,
        &[
            ("QUERY_STRING", ""),
            ("REQUEST_METHOD", "GET"),
            ("CONTENT_TYPE", ""),
            ("CONTENT_LENGTH", ""),
            ("REQUEST_URI", "/"),
            ("PATH_INFO", "/"),
            ("DOCUMENT_ROOT", "/srv/www"),
            ("SERVER_PROTOCOL", "HTTP/1.1"),
            ("REQUEST_SCHEME", "http"),
            ("REMOTE_ADDR", "127.0.0.1"),
            ("REMOTE_PORT", "33972"),
            ("SERVER_PORT", "60837"),
            ("SERVER_NAME", "localhost"),
            ("HTTP_HOST", "127.0.0.1"),
            ("HTTP_USER_AGENT", "ferrule-capture"),
            ("HTTP_ACCEPT", "*/*"),
            ("HTTP_COOKIE", &cookie),
        ],
    );
    assert_eq!(datasize_of(LARGE_COOKIE), 30430);
    assert!(body.is_empty());
}

// Captured with: curl 'http://127.0.0.1:PORT/caf%C3%A9/%E2%82%AC?q=%C3%BC'
// nginx percent-decodes PATH_INFO ($document_uri) to raw UTF-8 bytes; REQUEST_URI and
// QUERY_STRING stay encoded.
#[test]
fn non_ascii_path_capture() {
    let body = check_capture(
        "non_ascii_path",
        NON_ASCII_PATH,
        &[
            ("QUERY_STRING", "q=%C3%BC"),
            ("REQUEST_METHOD", "GET"),
            ("CONTENT_TYPE", ""),
            ("CONTENT_LENGTH", ""),
            ("REQUEST_URI", "/caf%C3%A9/%E2%82%AC?q=%C3%BC"),
            ("PATH_INFO", "/café/€"),
            ("DOCUMENT_ROOT", "/srv/www"),
            ("SERVER_PROTOCOL", "HTTP/1.1"),
            ("REQUEST_SCHEME", "http"),
            ("REMOTE_ADDR", "127.0.0.1"),
            ("REMOTE_PORT", "33974"),
            ("SERVER_PORT", "60837"),
            ("SERVER_NAME", "localhost"),
            ("HTTP_HOST", "127.0.0.1"),
            ("HTTP_USER_AGENT", "ferrule-capture"),
            ("HTTP_ACCEPT", "*/*"),
        ],
    );
    assert!(body.is_empty());
    // The same PATH_INFO spelled as the bytes on the wire, so no editor or encoding can blur it.
    let (_, packet) = parse_uwsgi_packet(NON_ASCII_PATH).ok().unwrap();
    let path_info = packet.vars.iter().find(|v| v.key == b"PATH_INFO").unwrap();
    assert_eq!(path_info.value, b"/caf\xc3\xa9/\xe2\x82\xac");
}

/// Every prefix of every capture: short of header + vars it is `Incomplete` (the connection reads
/// more), from there on it is `Ok` with whatever body bytes came along. Never an error, never a panic.
#[test]
fn truncated_captures_are_incomplete_until_the_vars_end() {
    for (name, capture) in FIXTURES {
        let frame = 4 + datasize_of(capture);
        for n in 0..=capture.len() {
            let input = &capture[..n];
            let result = catch_unwind(|| parse_uwsgi_packet(input).map(|(rest, p)| (rest, p.vars.len())))
                .unwrap_or_else(|_| panic!("{name}: parse_uwsgi_packet panicked on the first {n} bytes"));
            match result {
                Err(nom::Err::Incomplete(_)) if n < frame => {}
                Ok((rest, _)) if n >= frame => {
                    assert_eq!(rest, &capture[frame..n], "{name}: body bytes after {n} bytes");
                }
                other => panic!(
                    "{name}: first {n} of {} bytes (frame ends at {frame}): got {}",
                    capture.len(),
                    outcome(&other)
                ),
            }

            let header = catch_unwind(|| outcome(&parse_uwsgi_header(input)))
                .unwrap_or_else(|_| panic!("{name}: parse_uwsgi_header panicked on {n} bytes"));
            let want = if n < 4 { "Incomplete" } else { "Ok" };
            assert_eq!(header, want, "{name}: header of the first {n} bytes");
        }
    }
}

/// The vars parser works on a complete, length-delimited block: cutting it short is either a
/// shorter valid block (cut on a var boundary) or an error, never `Incomplete`, never a panic.
#[test]
fn truncated_vars_blocks_are_errors_except_on_var_boundaries() {
    for (name, capture) in FIXTURES {
        let block = &capture[4..4 + datasize_of(capture)];
        let offsets = length_offsets(block);
        // A var starts at every other length prefix (keys); the block end is a boundary too.
        let boundaries: Vec<usize> = offsets.iter().step_by(2).copied().chain([block.len()]).collect();
        for n in 0..block.len() {
            let result = catch_unwind(|| parse_uwsgi_vars(&block[..n]).map(|(rest, v)| (rest.len(), v.len())))
                .unwrap_or_else(|_| panic!("{name}: parse_uwsgi_vars panicked on {n} block bytes"));
            match result {
                Ok((0, count)) if boundaries.contains(&n) => {
                    let want = boundaries.iter().position(|&b| b == n).unwrap();
                    assert_eq!(count, want, "{name}: vars in the first {n} block bytes");
                }
                Err(nom::Err::Error(_) | nom::Err::Failure(_)) => {}
                other => panic!("{name}: first {n} block bytes: got {}", outcome(&other)),
            }
        }
    }
}

/// Setting the high byte of any key or value length to 0xff makes it overrun the block
/// (every capture's block is under 0xff00 bytes): an error for both parsers, not `Incomplete`
/// (the whole block is there) and not a panic.
#[test]
fn corrupt_length_byte_is_an_error() {
    for (name, capture) in FIXTURES {
        let datasize = datasize_of(capture);
        assert!(datasize < 0xff00);
        for offset in length_offsets(&capture[4..4 + datasize]) {
            let mut bad = capture.to_vec();
            bad[4 + offset + 1] = 0xff;
            let packet = catch_unwind(|| outcome(&parse_uwsgi_packet(&bad)))
                .unwrap_or_else(|_| panic!("{name}: packet parser panicked, length at {offset}"));
            assert!(
                packet == "Error" || packet == "Failure",
                "{name}: length at block offset {offset} set to overrun: packet parse gave {packet}"
            );
            let vars = catch_unwind(|| outcome(&parse_uwsgi_vars(&bad[4..4 + datasize])))
                .unwrap_or_else(|_| panic!("{name}: vars parser panicked, length at {offset}"));
            assert!(
                vars == "Error" || vars == "Failure",
                "{name}: length at block offset {offset} set to overrun: vars parse gave {vars}"
            );
        }
    }
}

/// The smallest overrun: the last value's length one past the end of the block.
#[test]
fn last_value_one_byte_too_long_is_an_error() {
    for (name, capture) in FIXTURES {
        let datasize = datasize_of(capture);
        let last = *length_offsets(&capture[4..4 + datasize]).last().unwrap();
        let mut bad = capture.to_vec();
        let at = 4 + last;
        let len = u16::from_le_bytes([bad[at], bad[at + 1]]) + 1;
        bad[at..at + 2].copy_from_slice(&len.to_le_bytes());
        assert!(
            is_rejection(&parse_uwsgi_packet(&bad)),
            "{name}: packet parse accepted it"
        );
        assert!(
            is_rejection(&parse_uwsgi_vars(&bad[4..4 + datasize])),
            "{name}: vars parse accepted it"
        );
    }
}

/// datasize one short cuts the last value inside the block: an error, whatever follows.
#[test]
fn datasize_one_short_is_an_error() {
    for (name, capture) in FIXTURES {
        let mut bad = capture.to_vec();
        let datasize = u16::try_from(datasize_of(capture) - 1).unwrap();
        bad[1..3].copy_from_slice(&datasize.to_le_bytes());
        assert!(
            is_rejection(&parse_uwsgi_packet(&bad)),
            "{name}: packet parse accepted it"
        );
    }
}

/// datasize one long on a bodiless request: the block is not all here yet, so read more.
#[test]
fn datasize_past_the_input_is_incomplete() {
    let mut bad = GET_QUERY.to_vec();
    let datasize = u16::try_from(datasize_of(GET_QUERY) + 1).unwrap();
    bad[1..3].copy_from_slice(&datasize.to_le_bytes());
    assert_eq!(outcome(&parse_uwsgi_packet(&bad)), "Incomplete");
}

#[test]
fn zero_length_key_is_an_error() {
    let alone = encode_request(&[(b"", b"value")], b"");
    assert!(is_rejection(&parse_uwsgi_packet(&alone)), "lone empty key accepted");
    assert!(
        is_rejection(&parse_uwsgi_vars(&alone[4..])),
        "lone empty key accepted by vars parser"
    );

    let empty_both = encode_request(&[(b"", b"")], b"");
    assert!(
        is_rejection(&parse_uwsgi_packet(&empty_both)),
        "empty key with empty value accepted"
    );

    let between =
        encode_request::<&[u8], &[u8]>(&[(b"REQUEST_METHOD", b"GET"), (b"", b"x"), (b"PATH_INFO", b"/")], b"");
    assert!(
        is_rejection(&parse_uwsgi_packet(&between)),
        "empty key between good vars accepted"
    );
    assert!(
        is_rejection(&parse_uwsgi_vars(&between[4..])),
        "empty key accepted by vars parser"
    );
}

/// Control for the hand-made cases: the encoder itself produces packets the parser accepts,
/// so the rejections above are about the empty key and nothing else.
#[test]
fn hand_made_packet_parses() {
    let packet = encode_request::<&[u8], &[u8]>(&[(b"REQUEST_METHOD", b"GET"), (b"PATH_INFO", b"/")], b"body");
    let (body, parsed) = parse_uwsgi_packet(&packet).ok().unwrap();
    assert_eq!(body, b"body");
    let got: Vec<(&[u8], &[u8])> = parsed.vars.iter().map(|v| (v.key, v.value)).collect();
    let want: [(&[u8], &[u8]); 2] = [(b"REQUEST_METHOD", b"GET"), (b"PATH_INFO", b"/")];
    assert_eq!(got, want);
}

/// uwsgi ping (modifier1 100, no vars) has a well-formed header; answering it is the connection's job.
#[test]
fn ping_header_parses() {
    let (rest, header) = parse_uwsgi_header(&[100, 0, 0, 0]).ok().unwrap();
    assert!(rest.is_empty());
    assert_eq!((header.modifier1, header.datasize, header.modifier2), (100, 0, 0));
}
