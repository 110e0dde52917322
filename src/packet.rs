//! The uwsgi wire format: nom parsers for the packet header and its vars block. Pure and zero-copy: no I/O, no pyo3.
//!
//! A request packet is a 4-byte header (`modifier1: u8`, `datasize: u16 LE`, `modifier2: u8`) followed by
//! `datasize` bytes of vars, each `u16 LE` key length, key, `u16 LE` value length, value. The body follows the
//! vars; its length comes only from `CONTENT_LENGTH`, so it is not part of what is parsed here.
//!
//! The header parser is *streaming* (short input is `Incomplete`, which the connection turns into "read more");
//! the vars parser is *complete*: it sees exactly one length-prefixed block and anything short inside it is an error.

use nom::error::{ErrorKind, ParseError};
use nom::number::streaming::{le_u16, u8 as be_byte};
use nom::{IResult, Needed};

/// Length of the fixed packet header.
pub const HEADER_LEN: usize = 4;

/// `modifier1` of a WSGI request (what nginx's `uwsgi_modifier1` defaults to).
pub const MODIFIER_WSGI: u8 = 0;

/// `modifier1` of a uWSGI ping; the answer is the same header with `modifier2 = 1`.
pub const MODIFIER_PING: u8 = 100;

/// The fixed 4-byte packet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketHeader {
    pub modifier1: u8,
    pub datasize: u16,
    pub modifier2: u8,
}

/// One key/value pair of the vars block, borrowed from the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Var<'a> {
    pub key: &'a [u8],
    pub value: &'a [u8],
}

/// A header and its decoded vars block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet<'a> {
    pub header: PacketHeader,
    pub vars: Vec<Var<'a>>,
}

/// Why a packet could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("var length {len} overruns the vars block ({remaining} bytes left)")]
    Overrun { len: usize, remaining: usize },
    #[error("vars block ends inside a length prefix ({remaining} stray bytes)")]
    TruncatedLength { remaining: usize },
    #[error("zero-length var key")]
    ZeroLengthKey,
    #[error("malformed packet ({0:?})")]
    Nom(ErrorKind),
}

impl<I> ParseError<I> for PacketError {
    fn from_error_kind(_input: I, kind: ErrorKind) -> Self {
        PacketError::Nom(kind)
    }

    fn append(_input: I, _kind: ErrorKind, other: Self) -> Self {
        other
    }
}

/// Parses the 4-byte header. Streaming: fewer than 4 bytes is `Incomplete`.
pub fn parse_uwsgi_header(i: &[u8]) -> IResult<&[u8], PacketHeader, PacketError> {
    let (i, modifier1) = be_byte(i)?;
    let (i, datasize) = le_u16(i)?;
    let (i, modifier2) = be_byte(i)?;
    Ok((
        i,
        PacketHeader {
            modifier1,
            datasize,
            modifier2,
        },
    ))
}

/// Takes one `u16 LE` length-prefixed string from inside a complete vars block.
fn parse_length_prefixed(i: &[u8]) -> IResult<&[u8], &[u8], PacketError> {
    let Some((len_bytes, rest)) = i.split_first_chunk::<2>() else {
        return Err(nom::Err::Failure(PacketError::TruncatedLength { remaining: i.len() }));
    };
    let len = usize::from(u16::from_le_bytes(*len_bytes));
    // Check the length against what is left before taking the bytes.
    if len > rest.len() {
        return Err(nom::Err::Failure(PacketError::Overrun {
            len,
            remaining: rest.len(),
        }));
    }
    let (value, rest) = rest.split_at(len);
    Ok((rest, value))
}

/// Parses one var (key and value) from inside a complete vars block.
pub fn parse_uwsgi_var(i: &[u8]) -> IResult<&[u8], Var<'_>, PacketError> {
    let (i, key) = parse_length_prefixed(i)?;
    if key.is_empty() {
        return Err(nom::Err::Failure(PacketError::ZeroLengthKey));
    }
    let (i, value) = parse_length_prefixed(i)?;
    Ok((i, Var { key, value }))
}

/// Parses a whole vars block. Complete: `i` is exactly the block, and the whole of it must be vars.
pub fn parse_uwsgi_vars(mut i: &[u8]) -> IResult<&[u8], Vec<Var<'_>>, PacketError> {
    // A typical nginx packet carries 15 to 30 vars; one allocation covers it.
    let mut vars = Vec::with_capacity(32);
    while !i.is_empty() {
        let (rest, var) = parse_uwsgi_var(i)?;
        vars.push(var);
        i = rest;
    }
    Ok((i, vars))
}

/// Parses a header and its whole vars block. Streaming: until all `datasize` bytes are there the answer is
/// `Incomplete` with the number of bytes still missing. The remaining input is the body bytes that came along.
pub fn parse_uwsgi_packet(i: &[u8]) -> IResult<&[u8], Packet<'_>, PacketError> {
    let (i, header) = parse_uwsgi_header(i)?;
    let datasize = usize::from(header.datasize);
    if i.len() < datasize {
        return Err(nom::Err::Incomplete(Needed::new(datasize - i.len())));
    }
    let (block, body) = i.split_at(datasize);
    let (_, vars) = parse_uwsgi_vars(block)?;
    Ok((body, Packet { header, vars }))
}

/// The answer to a uWSGI ping, as uWSGI gives it: the ping header back with `modifier2 = 1`.
pub(crate) const PONG: [u8; HEADER_LEN] = [MODIFIER_PING, 0, 0, 1];

/// What the first bytes of a connection are, as far as they go: the one decode every read path uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// Not all there yet: `want` is the length of the whole packet (header and vars) once the header is in.
    Incomplete { want: Option<usize> },
    /// A uWSGI ping (modifier1 100) of `len` bytes, header included: answered with [`PONG`].
    Ping { len: usize },
    /// Not a WSGI request: another modifier1, or another protocol altogether (`protocol`, when recognised by
    /// [`sniff_foreign_protocol`]).
    Unsupported {
        modifier1: u8,
        protocol: Option<&'static str>,
    },
    /// A vars block larger than the limit (`--buffer-size`), refused before its bytes are taken: 431.
    TooLarge { datasize: usize, limit: usize },
    /// A whole WSGI request packet: `len` bytes of header and vars; the body, if any, follows.
    Request { packet: Packet<'a>, len: usize },
}

/// Decodes the start of a connection's bytes: a request packet, a ping, or what else it is. `max_vars_size`
/// is checked against the header's length before the vars are taken. A malformed vars block is an error.
pub fn decode(i: &[u8], max_vars_size: usize) -> Result<Decoded<'_>, PacketError> {
    let header = match parse_uwsgi_header(i) {
        Ok((_, header)) => header,
        Err(nom::Err::Incomplete(_)) => return Ok(Decoded::Incomplete { want: None }),
        Err(nom::Err::Error(e) | nom::Err::Failure(e)) => return Err(e),
    };
    let len = HEADER_LEN + usize::from(header.datasize);
    match header.modifier1 {
        MODIFIER_WSGI => {}
        MODIFIER_PING => return Ok(Decoded::Ping { len }),
        modifier1 => {
            return Ok(Decoded::Unsupported {
                modifier1,
                protocol: sniff_foreign_protocol(i),
            });
        }
    }
    let datasize = usize::from(header.datasize);
    // Check the length against its limit before taking the bytes.
    if datasize > max_vars_size {
        return Ok(Decoded::TooLarge {
            datasize,
            limit: max_vars_size,
        });
    }
    match parse_uwsgi_packet(i) {
        Ok((_, packet)) => Ok(Decoded::Request { packet, len }),
        Err(nom::Err::Incomplete(_)) => Ok(Decoded::Incomplete { want: Some(len) }),
        Err(nom::Err::Error(e) | nom::Err::Failure(e)) => Err(e),
    }
}

/// What a non-uwsgi first few bytes most likely are, for a log line that helps the operator.
pub fn sniff_foreign_protocol(first: &[u8]) -> Option<&'static str> {
    const HTTP_METHODS: [&[u8]; 9] = [
        b"GET ", b"POST", b"HEAD", b"PUT ", b"DELE", b"OPTI", b"PATC", b"CONN", b"TRAC",
    ];
    if first.len() >= 4 && HTTP_METHODS.iter().any(|m| first.starts_with(m)) {
        return Some("HTTP");
    }
    if first.starts_with(b"PRI ") {
        return Some("HTTP/2");
    }
    // A TLS record: handshake content type 0x16, then protocol major version 3.
    if first.len() >= 2 && first[0] == 0x16 && first[1] == 0x03 {
        return Some("TLS");
    }
    None
}

/// What to tell the operator when [`sniff_foreign_protocol`] recognised something that is not uwsgi.
pub(crate) fn foreign_protocol_hint(protocol: &str) -> String {
    let advice = match protocol {
        "TLS" => {
            "this socket speaks plain uwsgi: point nginx at it with uwsgi_pass host:port (an suwsgi:// upstream sends TLS)"
        }
        _ => "point nginx at it with uwsgi_pass, not proxy_pass",
    };
    format!("this looks like {protocol} sent to a uwsgi socket: {advice}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(vars: &[(&[u8], &[u8])], body: &[u8]) -> Vec<u8> {
        let mut block = Vec::new();
        for (k, v) in vars {
            block.extend_from_slice(&(k.len() as u16).to_le_bytes());
            block.extend_from_slice(k);
            block.extend_from_slice(&(v.len() as u16).to_le_bytes());
            block.extend_from_slice(v);
        }
        let mut out = vec![0];
        out.extend_from_slice(&(block.len() as u16).to_le_bytes());
        out.push(0);
        out.extend_from_slice(&block);
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn parses_vars_and_keeps_body_bytes() {
        let p = packet(&[(b"REQUEST_METHOD", b"POST"), (b"EMPTY", b"")], b"abc");
        let (body, pkt) = parse_uwsgi_packet(&p).unwrap();
        assert_eq!(body, b"abc");
        assert_eq!(pkt.vars.len(), 2);
        assert_eq!(pkt.vars[0].key, b"REQUEST_METHOD");
        assert_eq!(pkt.vars[0].value, b"POST");
        assert_eq!(pkt.vars[1].value, b"");
    }

    #[test]
    fn short_input_is_incomplete_never_an_error() {
        let p = packet(&[(b"A", b"1"), (b"B", b"22")], b"");
        for cut in 0..p.len() {
            match parse_uwsgi_packet(&p[..cut]) {
                Err(nom::Err::Incomplete(_)) => {}
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
        assert!(parse_uwsgi_packet(&p).is_ok());
    }

    #[test]
    fn overrunning_length_is_an_error() {
        let mut p = packet(&[(b"KEY", b"value")], b"");
        // Value length byte: header(4) + keylen(2) + key(3).
        p[4 + 2 + 3] = 200;
        assert_eq!(
            parse_uwsgi_packet(&p).unwrap_err(),
            nom::Err::Failure(PacketError::Overrun { len: 200, remaining: 5 })
        );
    }

    #[test]
    fn zero_length_key_is_an_error() {
        let p = packet(&[(b"", b"x")], b"");
        assert_eq!(
            parse_uwsgi_packet(&p).unwrap_err(),
            nom::Err::Failure(PacketError::ZeroLengthKey)
        );
    }

    #[test]
    fn stray_byte_after_last_var_is_an_error() {
        let mut p = packet(&[(b"K", b"v")], b"");
        p.push(7);
        p[1] += 1; // datasize now covers the stray byte
        assert_eq!(
            parse_uwsgi_packet(&p).unwrap_err(),
            nom::Err::Failure(PacketError::TruncatedLength { remaining: 1 })
        );
    }

    #[test]
    fn sniffs_http_and_tls() {
        assert_eq!(sniff_foreign_protocol(b"GET / HTTP/1.1\r\n"), Some("HTTP"));
        assert_eq!(sniff_foreign_protocol(&[0x16, 0x03, 0x01, 0x02]), Some("TLS"));
        assert_eq!(sniff_foreign_protocol(&[0, 10, 0, 0]), None);
    }

    #[test]
    fn decode_says_what_the_bytes_are() {
        let p = packet(&[(b"REQUEST_METHOD", b"GET")], b"body");
        let len = p.len() - 4;
        match decode(&p, 4096) {
            Ok(Decoded::Request { packet, len: l }) => {
                assert_eq!(l, len);
                assert_eq!(packet.vars[0].value, b"GET");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(decode(&p[..3], 4096), Ok(Decoded::Incomplete { want: None }));
        assert_eq!(decode(&p[..len - 1], 4096), Ok(Decoded::Incomplete { want: Some(len) }));
        assert_eq!(
            decode(&p, 8),
            Ok(Decoded::TooLarge {
                datasize: len - HEADER_LEN,
                limit: 8
            })
        );
        assert_eq!(decode(&[MODIFIER_PING, 0, 0, 0], 4096), Ok(Decoded::Ping { len: 4 }));
        assert_eq!(
            decode(b"GET / HTTP/1.1\r\n", 4096),
            Ok(Decoded::Unsupported {
                modifier1: b'G',
                protocol: Some("HTTP")
            })
        );
        assert_eq!(
            decode(&[5, 0, 0, 0], 4096),
            Ok(Decoded::Unsupported {
                modifier1: 5,
                protocol: None
            })
        );
        let mut bad = packet(&[(b"KEY", b"value")], b"");
        bad[4 + 2 + 3] = 200;
        assert!(decode(&bad, 4096).is_err());
    }
}
