//! Shared harness for the tier-3 tests: the real `ferrule` binary, a real nginx, a venv of real frameworks.
#![allow(dead_code)] // each test binary uses a different subset of the harness

pub mod ferrule;
pub mod http;
pub mod nginx;
pub mod procs;
pub mod uwsgi;
pub mod venv;
