//! The redb backend's tests, in one binary (to keep build times down):
//! the conformance suite, opening rules, batch-mate isolation, the
//! operations of sections 12 to 16 against the reference store, the
//! SIGKILL crash tests, and the writer thread under injected faults.

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

/// Calls `op` until it succeeds, as long as it fails retryably (within
/// [`within`]'s bound).
async fn retrying<T, F: std::future::Future<Output = keyclaim::Result<T>>>(
    what: &str,
    mut op: impl FnMut() -> F,
) -> T {
    within(what, async {
        loop {
            match op().await {
                Ok(value) => return value,
                Err(e) if e.is_retryable() => {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
                Err(e) => panic!("{what}: {e:?}"),
            }
        }
    })
    .await
}
