//! Storage faults against the persistent backends (see
//! `keyclaim_reliability::faults` for the mechanism and the scenario).
//!
//! The full-disk mechanism mounts a small tmpfs and so needs root. Where it
//! is unavailable the tests are skipped, loudly (on stderr, past the output
//! capture); under `CI=true`, where CI runs as root on a machine where
//! mounting works, an unavailable mechanism is a failure instead.
// A test: a failed expectation is how it reports.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::Write as _;
use std::path::Path;

use keyclaim_reliability::backends::Backend;
use keyclaim_reliability::faults::{Fault, ScenarioReport, run_scenario};
use keyclaim_testing::DiskFull;

/// A full disk as the scenario's fault.
struct FullDisk(DiskFull);

impl Fault for FullDisk {
    fn name(&self) -> &str {
        "disk full (tmpfs size=, ENOSPC)"
    }

    fn dir(&self) -> &Path {
        self.0.dir()
    }

    fn inject(&mut self) -> std::io::Result<()> {
        self.0.fill()
    }

    fn clear(&mut self) -> std::io::Result<()> {
        self.0.clear()
    }
}

/// Runs the scenario for `backend` over an 8 MiB disk that fills up, or
/// `None` after a loud skip where the disk cannot be mounted.
fn over_a_full_disk(what: &str, backend: Backend, seed: u64) -> Option<ScenarioReport> {
    let disk = keyclaim_testing::require(what, DiskFull::mount(8 << 20))?;
    let mut fault = FullDisk(disk);
    let report = keyclaim_testing::runtime(2)
        .block_on(run_scenario(backend, &mut fault, seed))
        .unwrap_or_else(|v| panic!("{backend} over a full disk: {v}"));
    let _ = writeln!(std::io::stderr(), "keyclaim-reliability: {report:?}");
    Some(report)
}

#[test]
fn sqlite_disk_full() {
    over_a_full_disk("sqlite_disk_full", Backend::Sqlite, 1);
}

#[test]
fn redb_disk_full() {
    over_a_full_disk("redb_disk_full", Backend::Redb, 1);
}

#[cfg(feature = "rocksdb")]
#[test]
fn rocksdb_disk_full() {
    over_a_full_disk("rocksdb_disk_full", Backend::Rocksdb, 1);
}

/// The stricter promise: once the fault clears, the *same handle* works
/// again, without a reopen (a homeserver would otherwise answer 500 until it
/// restarts).
fn same_handle_recovers(what: &str, backend: Backend) {
    if let Some(report) = over_a_full_disk(what, backend, 2) {
        assert!(
            !report.needed_reopen,
            "{backend}: after the disk-full fault cleared, the same handle still fails: {:?}",
            report.same_handle_error
        );
    }
}

#[test]
fn redb_same_handle_recovers_after_disk_full() {
    same_handle_recovers("redb_same_handle_recovers_after_disk_full", Backend::Redb);
}

#[test]
fn sqlite_same_handle_recovers_after_disk_full() {
    same_handle_recovers(
        "sqlite_same_handle_recovers_after_disk_full",
        Backend::Sqlite,
    );
}
