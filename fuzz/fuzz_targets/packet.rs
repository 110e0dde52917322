//! Fuzz target `packet`: arbitrary bytes through the uwsgi decoder; the checks live in fuzz/checks.rs, shared
//! with tests/it/protocol/fuzz_regressions.rs.
#![no_main]

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::packet(data));
