//! Micro-benchmarks of the per-request decode path the server runs: packet bytes -> vars ([`decode`], the one
//! decode every read path uses) -> environ ([`Environ::from_vars`]), on the packets nginx really sends
//! (`tests/fixtures/*.bin`).
//!
//! Run with `cargo bench --bench decode`; Criterion prints the time per iteration, which is the time of one
//! decode. `get_query.bin` is the typical request (about 20 vars); `large_cookie.bin` is the worst case nginx
//! lets through with default buffers. Pass a filter to run one group: `cargo bench --bench decode -- environ`.

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ferrule::environ::Environ;
use ferrule::packet::{Decoded, HEADER_LEN, decode};

/// The vars limit the server decodes with by default (`--buffer-size`, the protocol's maximum).
const MAX_VARS_SIZE: usize = 65535;

/// One captured packet: its file name without `.bin`, and its bytes (header, vars, then any body).
struct Fixture {
    name: String,
    bytes: Bytes,
}

impl Fixture {
    /// Header plus vars block: what the decoders read (the body that follows is not their business).
    fn decoded_len(&self) -> u64 {
        let datasize = u16::from_le_bytes([self.bytes[1], self.bytes[2]]);
        (HEADER_LEN + usize::from(datasize)) as u64
    }
}

/// Every `tests/fixtures/*.bin`, sorted by name, so a new capture is benchmarked without touching this file.
fn fixtures() -> Vec<Fixture> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    let mut out: Vec<Fixture> = entries
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            (path.extension()? == "bin").then_some(path)
        })
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            Fixture {
                name,
                bytes: Bytes::from(bytes),
            }
        })
        .collect();
    assert!(!out.is_empty(), "no captured packets in {}", dir.display());
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn bench_decode(c: &mut Criterion) {
    let fixtures = fixtures();

    let mut group = c.benchmark_group("packet_decode");
    for f in &fixtures {
        group.throughput(Throughput::Bytes(f.decoded_len()));
        group.bench_function(&f.name, |b| {
            b.iter(|| {
                let decoded = decode(black_box(&f.bytes), MAX_VARS_SIZE);
                // Checked, so a packet that stopped parsing cannot pass for a fast one.
                assert!(
                    matches!(decoded, Ok(Decoded::Request { .. })),
                    "{} no longer decodes",
                    f.name
                );
                decoded
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("environ_from_vars");
    for f in &fixtures {
        // The vars borrow from `f.bytes`, as they borrow from the connection's read buffer in the server.
        let Ok(Decoded::Request { packet, .. }) = decode(&f.bytes, MAX_VARS_SIZE) else {
            panic!("{} does not decode", f.name);
        };
        group.throughput(Throughput::Elements(packet.vars.len() as u64));
        group.bench_function(&f.name, |b| {
            b.iter(|| {
                let environ = Environ::from_vars(black_box(&f.bytes), black_box(&packet.vars));
                assert!(environ.is_ok(), "{} no longer builds an environ", f.name);
                environ
            })
        });
    }
    group.finish();

    // Both steps, as a connection runs them for every request.
    let mut group = c.benchmark_group("decode_total");
    for f in &fixtures {
        group.throughput(Throughput::Bytes(f.decoded_len()));
        group.bench_function(&f.name, |b| {
            b.iter(|| {
                let bytes = black_box(&f.bytes);
                let Ok(Decoded::Request { packet, .. }) = decode(bytes, MAX_VARS_SIZE) else {
                    panic!("{} no longer decodes", f.name);
                };
                let environ = Environ::from_vars(bytes, &packet.vars);
                assert!(environ.is_ok(), "{} no longer builds an environ", f.name);
                environ
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Shorter than Criterion's defaults (3 s warm-up, 5 s measurement): each decode takes well under a
    // microsecond, so 2 s still gives millions of iterations, and the 18 benchmarks finish in about a minute.
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2));
    targets = bench_decode
}
criterion_main!(benches);
