//! Fuzz target `environ`: arbitrary bytes through the uwsgi decoder and the environ builder; the checks live in
//! fuzz/checks.rs, shared with tests/it/protocol/fuzz_regressions.rs.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::environ(data));
