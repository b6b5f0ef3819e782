//! The redb backend's tests, in one binary (to keep build times down):
//! the conformance suite, opening rules, batch-mate isolation, the
//! operations of sections 12 to 16 against the reference store, and the
//! SIGKILL crash tests.

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
mod reference;
mod remembered;

/// The tests' usual runtime: two workers, as on the 2-core CI machine.
fn rt() -> tokio::runtime::Runtime {
    keyclaim_testing::runtime(2)
}
