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

use keyclaim_reliability::backends::Backend;
use keyclaim_reliability::faults::{DiskFull, run_scenario, under_ci};

fn disk_full_case(backend: Backend, seed: u64) {
    let mut fault = match DiskFull::new(8 << 20) {
        Ok(f) => f,
        Err(why) => {
            assert!(
                !under_ci(),
                "CI=true but the full-disk mechanism is unavailable: {}",
                why.0
            );
            let _ = writeln!(
                std::io::stderr(),
                "keyclaim-reliability: SKIPPED disk-full fault test for {backend}: {} (needs root and mount)",
                why.0
            );
            return;
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let report = runtime
        .block_on(run_scenario(backend, &mut fault, seed))
        .unwrap_or_else(|v| panic!("{backend} over a full disk: {v}"));
    let _ = writeln!(std::io::stderr(), "keyclaim-reliability: {report:?}");
}

#[test]
fn sqlite_disk_full() {
    disk_full_case(Backend::Sqlite, 1);
}

#[test]
fn redb_disk_full() {
    disk_full_case(Backend::Redb, 1);
}

/// The stricter promise: once the fault clears, the *same handle* works
/// again, without a reopen (a homeserver would otherwise answer 500 until it
/// restarts). SQLite keeps it; redb does not yet (its handle keeps failing
/// after the first I/O error), so this runs on demand:
/// `cargo test -p keyclaim-reliability --test storage_faults -- --ignored`.
#[test]
#[ignore = "redb handles stay failed after an I/O error: reported, see the README"]
fn redb_same_handle_recovers_after_disk_full() {
    same_handle_recovers(Backend::Redb);
}

#[test]
fn sqlite_same_handle_recovers_after_disk_full() {
    same_handle_recovers(Backend::Sqlite);
}

fn same_handle_recovers(backend: Backend) {
    let Ok(mut fault) = DiskFull::new(8 << 20) else {
        assert!(
            !under_ci(),
            "CI=true but the full-disk mechanism is unavailable"
        );
        let _ = writeln!(
            std::io::stderr(),
            "keyclaim-reliability: SKIPPED same-handle recovery for {backend} (needs root and mount)"
        );
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let report = runtime
        .block_on(run_scenario(backend, &mut fault, 2))
        .unwrap_or_else(|v| panic!("{backend} over a full disk: {v}"));
    assert!(
        !report.needed_reopen,
        "{backend}: after the disk-full fault cleared, the same handle still fails: {:?}",
        report.same_handle_error
    );
}
