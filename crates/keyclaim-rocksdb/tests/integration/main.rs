//! The RocksDB backend's tests, in one binary (one link of RocksDB): the
//! engine contract on the adapter, the conformance suite, sharing a
//! database with the homeserver's own column families, data keyclaim did
//! not write, and the SIGKILL crash test.

// Tests: a failed assertion or unwrap is how they report.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

mod conformance;
mod corrupt;
mod crash;
mod engine;
mod shared;

/// The tests' usual runtime: two workers, as on the 2-core CI machine.
fn rt() -> tokio::runtime::Runtime {
    keyclaim_testing::runtime(2)
}
