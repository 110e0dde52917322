//! Shared harness for the tier-3 tests: the real `ferrule` binary, a real nginx, a venv of real frameworks; and
//! for every tier, the captured nginx packets and the one uwsgi encoder.
#![allow(dead_code)] // each test binary uses a different subset of the harness

pub mod ferrule;
pub mod fixtures;
pub mod http;
pub mod json;
pub mod log;
pub mod nginx;
pub mod procs;
pub mod stack;
pub mod tls;
pub mod uwsgi;
pub mod venv;
