//! The key-value layer's tests, in one binary (to keep build times down):
//! the conformance suite on `MemoryEngine` (directly and as
//! `Arc<dyn KeyStore>`), opening and format versions, data keyclaim did not
//! write, engine faults, and the writer's queue.

// Tests: a failed assertion or unwrap is how they report.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

mod conformance;
mod corrupt;
mod faults;
mod open;
mod remembered;
mod writer;

/// The tests' usual runtime: two workers, as on the 2-core CI machine.
fn rt() -> tokio::runtime::Runtime {
    keyclaim_testing::runtime(2)
}

/// Awaits `fut`, failing the test if it does not finish: a bound that only
/// keeps a store that hangs from hanging the test, never a timing assertion.
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(30), fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: the store never answered"))
}
