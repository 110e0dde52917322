//! Reading a request's body on the async side, through either transport: all of the request but its last
//! byte is read, and the last byte is taken through [`Transport::last_byte`] (peeked on a plain socket, so an
//! aborted response still closes with it unread). Bodies up to `--body-buffer-size` stay in memory; larger
//! ones are spooled to an unlinked temporary file.

use std::io;

use bytes::{BufMut, Bytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::open::ConnError;
use super::transport::{Transport, held};
use crate::body::Body;

/// Read size while spooling a large body to its file.
const SPOOL_CHUNK: usize = 256 * 1024;

/// Reads the body of the request whose packet (`packet_len` bytes) and body make `total` bytes, `seen` being
/// what the transport showed of them while the packet was decoded.
pub(super) async fn read_body<T: Transport>(
    transport: &mut T,
    seen: &Bytes,
    packet_len: usize,
    total: u64,
    body_buffer_size: u64,
) -> Result<Body, ConnError> {
    if total - packet_len as u64 <= body_buffer_size {
        in_memory(transport, seen, packet_len, total).await
    } else {
        spool(transport, seen, packet_len, total).await
    }
}

/// One buffer for packet and body: a small POST is one read, and the body is a slice of it.
async fn in_memory<T: Transport>(
    transport: &mut T,
    seen: &Bytes,
    packet_len: usize,
    total: u64,
) -> Result<Body, ConnError> {
    let total = usize::try_from(total).map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
    // Filled by the reads without being zeroed first (a 1 MiB body would otherwise be written twice).
    let mut all = Vec::with_capacity(total);
    // What showing the packet already consumed (through TLS; nothing on a plain socket).
    all.extend_from_slice(&seen[..held::<T>(seen).min(total)]);
    if all.len() < total {
        while all.len() < total - 1 {
            let want = total - 1 - all.len();
            if transport.read_buf(&mut (&mut all).limit(want)).await? == 0 {
                return Err(ConnError::Truncated(all.len()));
            }
        }
        let last = match seen.get(total - 1) {
            // A plain socket's first peek already saw the last byte: one syscall fewer for most requests.
            Some(&byte) => byte,
            None => last_byte(transport, total - 1).await?,
        };
        all.push(last);
    }
    Ok(Body::Memory(Bytes::from(all).slice(packet_len..)))
}

/// The body into an unlinked temporary file (a write that fails is [`ConnError::Spool`]).
async fn spool<T: Transport>(
    transport: &mut T,
    seen: &Bytes,
    packet_len: usize,
    total: u64,
) -> Result<Body, ConnError> {
    let held = held::<T>(seen);
    let mut scratch = vec![0u8; packet_len.max(SPOOL_CHUNK)];
    // The packet's bytes still queued (all of them on a plain socket) are consumed: the environ has them.
    consume(transport, &mut scratch, packet_len.saturating_sub(held)).await?;
    // Made with the current thread's blocking call: creating an unlinked file is one quick syscall. Unlinked,
    // it leaves nothing behind whatever happens to this request.
    let mut file = tokio::fs::File::from_std(tempfile::tempfile().map_err(ConnError::Spool)?);
    // Body bytes read along with the packet (through TLS). The body is CONTENT_LENGTH bytes, whatever follows.
    let end = u64::try_from(held).map_or(total, |held| held.min(total));
    let in_hand = usize::try_from(end).ok().and_then(|end| seen.get(packet_len..end));
    file.write_all(in_hand.unwrap_or_default())
        .await
        .map_err(ConnError::Spool)?;
    let mut at = end.max(packet_len as u64);
    if at < total {
        while at < total - 1 {
            let want = usize::try_from(total - 1 - at).unwrap_or(usize::MAX).min(SPOOL_CHUNK);
            let n = transport.read(&mut scratch[..want]).await?;
            if n == 0 {
                return Err(ConnError::Truncated(at as usize));
            }
            file.write_all(&scratch[..n]).await.map_err(ConnError::Spool)?;
            at += n as u64;
        }
        let last = last_byte(transport, at as usize).await?;
        file.write_all(&[last]).await.map_err(ConnError::Spool)?;
    }
    file.flush().await.map_err(ConnError::Spool)?;
    Ok(Body::Spooled {
        file: file.into_std().await,
        len: total - packet_len as u64,
    })
}

/// Reads and drops `len` bytes, through `scratch` (at least that long).
pub(super) async fn consume<T: Transport>(transport: &mut T, scratch: &mut [u8], len: usize) -> Result<(), ConnError> {
    let mut got = 0;
    while got < len {
        let n = transport.read(&mut scratch[got..len]).await?;
        if n == 0 {
            return Err(ConnError::Truncated(got));
        }
        got += n;
    }
    Ok(())
}

/// The request's last byte, after the `got` bytes before it.
async fn last_byte<T: Transport>(transport: &mut T, got: usize) -> Result<u8, ConnError> {
    transport.last_byte().await?.ok_or(ConnError::Truncated(got))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use tokio::io::DuplexStream;

    /// A transport that reads what it shows, as a TLS session does, over an in-memory pipe.
    impl Transport for DuplexStream {
        const PEEKS: bool = false;

        async fn show_more(&mut self, seen: &mut Vec<u8>) -> io::Result<()> {
            self.read_buf(seen).await.map(drop)
        }

        async fn last_byte(&mut self) -> io::Result<Option<u8>> {
            let mut one = [0u8; 1];
            Ok((self.read(&mut one).await? == 1).then_some(one[0]))
        }

        fn into_wire(self) -> io::Result<crate::connection::wire::Wire> {
            Err(io::Error::other("no socket under an in-memory pipe"))
        }
    }

    const PACKET: &[u8] = b"PACKET";

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// Reads a body of `body.len()` bytes after `PACKET`, the transport having read `seen` already, with
    /// `rest` still to come, then the pipe closed.
    fn read(seen: &[u8], rest: &[u8], body_len: usize, buffer: u64) -> Result<Body, ConnError> {
        run(async {
            let (mut ours, mut theirs) = tokio::io::duplex(1 << 20);
            theirs.write_all(rest).await.unwrap();
            drop(theirs);
            let total = (PACKET.len() + body_len) as u64;
            read_body(&mut ours, &Bytes::copy_from_slice(seen), PACKET.len(), total, buffer).await
        })
    }

    fn bytes_of(body: Body) -> Vec<u8> {
        match body {
            Body::Memory(bytes) => bytes.to_vec(),
            Body::Spooled { file, len } => {
                let mut got = vec![0u8; usize::try_from(len).unwrap()];
                file.read_exact_at(&mut got, 0).unwrap();
                got
            }
        }
    }

    #[test]
    fn a_body_read_partly_with_the_packet_is_whole_in_memory_and_spooled() {
        let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut seen = PACKET.to_vec();
        seen.extend_from_slice(&body[..1000]);
        for buffer in [1 << 20, 0] {
            let got = read(&seen, &body[1000..], body.len(), buffer).unwrap();
            assert_eq!(matches!(got, Body::Spooled { .. }), buffer == 0);
            assert!(
                bytes_of(got) == body,
                "buffer {buffer}: the body arrives whole, in order"
            );
        }
    }

    #[test]
    fn bytes_past_content_length_read_with_the_packet_are_not_body() {
        let mut seen = PACKET.to_vec();
        seen.extend_from_slice(b"bodyNEXT");
        for buffer in [1 << 20, 0] {
            let got = read(&seen, b"", 4, buffer).unwrap();
            assert_eq!(bytes_of(got), b"body", "buffer {buffer}");
        }
    }

    #[test]
    fn a_body_cut_short_is_truncated_in_memory_and_spooled() {
        let mut seen = PACKET.to_vec();
        seen.extend_from_slice(b"ab");
        for buffer in [1 << 20, 0] {
            let got = read(&seen, b"cd", 10, buffer);
            assert!(matches!(got, Err(ConnError::Truncated(_))), "buffer {buffer}: {got:?}");
        }
    }
}
