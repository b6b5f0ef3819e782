//! The redb backend's tests, in one binary (to keep build times down):
//! the conformance suite, opening rules, batch-mate isolation and the
//! SIGKILL crash test.

// Tests: a failed assertion or unwrap is how they report.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

mod batch;
mod conformance;
mod crash;
mod faults;
mod open;
mod remembered;

/// A multi-threaded runtime with `threads` workers, for the tests' blocking
/// entry points.
fn runtime(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The tests' usual runtime: two workers, as on the 2-core CI machine.
fn rt() -> tokio::runtime::Runtime {
    runtime(2)
}
