#![doc = include_str!("../README.md")]
// Scaffolding for tests: a set-up step that cannot be done (no temp dir, no
// runtime) is a test failure, and panicking is how a test reports one.
#![allow(clippy::expect_used, clippy::panic)]

pub mod crash;
mod disk;
pub mod postgres;
pub mod process;

use std::fmt::Display;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

pub use disk::DiskFull;

/// Whether this run is under CI (`CI=true` or `CI=1`). There a test that
/// cannot reach what it needs (a PostgreSQL server, `mount`) fails instead
/// of skipping: CI is set up to have it.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Skips the test `what` loudly: a message on the process's stderr, past
/// the test harness's output capture, so that a skip is never silent.
///
/// # Panics
/// Under CI ([`in_ci`]): there a skip is a failure.
pub fn skip(what: &str, reason: &str) {
    assert!(
        !in_ci(),
        "{what}: cannot run under CI=true, where it must: {reason}"
    );
    let _ = writeln!(
        std::io::stderr(),
        "\n!!!!!!!! keyclaim-testing: SKIPPED {what}: {reason}\n"
    );
}

/// What a test needs, or `None` after [`skip`] when it cannot be had.
///
/// # Panics
/// Under CI when `needed` is an error (see [`skip`]).
pub fn require<T, E: Display>(what: &str, needed: Result<T, E>) -> Option<T> {
    match needed {
        Ok(value) => Some(value),
        Err(reason) => {
            skip(what, &reason.to_string());
            None
        }
    }
}

/// A multi-threaded tokio runtime with `workers` worker threads and every
/// driver enabled, for a test's blocking entry point.
pub fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("build a multi-threaded tokio runtime")
}

/// A current-thread tokio runtime with every driver enabled.
pub fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a current-thread tokio runtime")
}

/// A fresh temp dir (prefix `keyclaim-test-`), removed when dropped.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("keyclaim-test-")
        .tempdir()
        .expect("create a temp dir")
}

/// A temp dir that hands out fresh file paths, for store factories: each
/// store of a test gets a file of its own, and all of them go with the dir.
#[derive(Debug)]
pub struct TempFiles {
    dir: tempfile::TempDir,
    next: AtomicUsize,
}

impl TempFiles {
    /// A new, empty temp dir.
    pub fn new() -> Self {
        Self {
            dir: temp_dir(),
            next: AtomicUsize::new(0),
        }
    }

    /// A path in the dir no earlier call returned: `{stem}-{n}.{extension}`.
    pub fn path(&self, stem: &str, extension: &str) -> PathBuf {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.dir.path().join(format!("{stem}-{n}.{extension}"))
    }

    /// The dir itself.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for TempFiles {
    fn default() -> Self {
        Self::new()
    }
}

/// Waits until `condition` holds, checking it every 10 ms.
///
/// `limit` is a generous bound for a condition that should hold soon: it is
/// not a timing assertion, it only keeps a broken test from hanging.
///
/// # Panics
/// When `condition` still does not hold after `limit`.
pub async fn wait_until(
    what: &str,
    limit: std::time::Duration,
    mut condition: impl FnMut() -> bool,
) {
    let deadline = tokio::time::Instant::now() + limit;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {limit:?} in vain for: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
