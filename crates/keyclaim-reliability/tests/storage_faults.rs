//! Storage faults against the persistent backends (see
//! `keyclaim_reliability::faults` for the mechanisms and the scenario): a
//! full disk, `EIO` on write and on sync (SQLite and redb, through an
//! `LD_PRELOAD` shim, in a child process), and failing engine batches under
//! the key-value layer.
//!
//! The full-disk mechanism mounts a small tmpfs and so needs root; the `EIO`
//! shim needs a C compiler (`cc`). Where a mechanism is unavailable the tests
//! are skipped, loudly (on stderr, past the output capture); under
//! `CI=true`, where CI runs as root on a machine where mounting works and a
//! C compiler is installed, an unavailable mechanism is a failure instead.
// A test: a failed expectation is how it reports.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::Write as _;
use std::path::Path;

use keyclaim_reliability::backends::Backend;
use keyclaim_reliability::eio;
use keyclaim_reliability::faults::{Fault, ScenarioReport, run_scenario, run_scenario_with};
use keyclaim_reliability::kv_fault::KvOnEngine;
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

/// Runs the `eio` binary (the scenario with `EIO` on `mode`) for `backend`
/// with the shim preloaded; `None` after a loud skip where no C compiler
/// builds the shim (a failure under `CI=true`).
fn with_eio(what: &str, backend: &str, mode: &str) -> Option<String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let shim = keyclaim_testing::require(what, eio::build_shim(dir.path()))?;
    let control = dir.path().join("control");
    let count = dir.path().join("count");
    let lost = dir.path().join("lost");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_eio"))
        .args([backend, mode, "1"])
        .env("LD_PRELOAD", &shim)
        .env(eio::CONTROL_ENV, &control)
        .env(eio::COUNT_ENV, &count)
        .env(eio::LOST_ENV, &lost)
        .output()
        .expect("run the eio binary");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{backend} with EIO on {mode}: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let injected = std::fs::metadata(&count).map_or(0, |m| m.len());
    assert!(injected > 0, "the shim injected no failure: {stdout}");
    let lost = std::fs::metadata(&lost).map_or(0, |m| m.len());
    if mode == "sync" {
        assert!(lost > 0, "no failed sync lost a write: {stdout}");
    }
    let _ = writeln!(
        std::io::stderr(),
        "keyclaim-reliability: {injected} injected, {lost} writes lost; {stdout}"
    );
    Some(stdout)
}

#[test]
fn sqlite_eio_on_write() {
    with_eio("sqlite_eio_on_write", "sqlite", "write");
}

#[test]
fn sqlite_eio_on_sync() {
    with_eio("sqlite_eio_on_sync", "sqlite", "sync");
}

#[test]
fn redb_eio_on_write() {
    with_eio("redb_eio_on_write", "redb", "write");
}

#[test]
fn redb_eio_on_sync() {
    with_eio("redb_eio_on_sync", "redb", "sync");
}

/// The key-value layer over an engine whose batch writes fail: failed
/// operations are retryable and applied nowhere, the same handle recovers,
/// and a store reopened on the same engine holds exactly what was
/// acknowledged (the layer's in-memory state did not drift from the
/// engine's).
#[test]
fn kv_failing_engine_writes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let opener = KvOnEngine::new();
    let mut fault = opener.fault(dir.path());
    let report = keyclaim_testing::runtime(2)
        .block_on(run_scenario_with(&opener, &mut fault, 1))
        .unwrap_or_else(|v| panic!("kv over failing engine writes: {v}"));
    assert!(opener.engine().failed_writes() > 0);
    assert!(
        !report.needed_reopen,
        "kv: after the fault cleared, the same handle still fails: {:?}",
        report.same_handle_error
    );
    assert_eq!(
        report.failed_but_applied, 0,
        "a failed batch was applied: {report:?}"
    );
    let _ = writeln!(std::io::stderr(), "keyclaim-reliability: {report:?}");
}
