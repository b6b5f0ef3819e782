//! A crash (SIGKILL) while a store is being created for the first time must
//! leave a file that opens (R10.2: after a crash the store opens cleanly).
//!
//! The soak's worker is started on a fresh path and killed after 0 to 90 ms,
//! then the store is opened. Every backend passes. redb used to leave a file
//! without its magic number ("Not a redb database: magic number mismatch")
//! in 9 of 30 kills; `RedbStore::open` now creates a new file under a
//! temporary name and renames it into place.
// A test: a failed expectation is how it reports.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use keyclaim_reliability::backends::Backend;
use keyclaim_reliability::chain;

fn kill_during_create(backend: Backend, rounds: u64) {
    let dir = keyclaim_testing::temp_dir();
    let runtime = keyclaim_testing::current_thread_runtime();
    let mut failures = Vec::new();
    for round in 0..rounds {
        let store = dir.path().join(format!("{round}-{}", backend.file_name()));
        let journal = dir.path().join(format!("{round}.log"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_soak"))
            .arg("worker")
            .arg(backend.name())
            .arg(&store)
            .arg(&journal)
            .args(["1", "1"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start a worker");
        std::thread::sleep(Duration::from_millis((round * 7) % 90));
        let _ = child.kill();
        let _ = child.wait();
        let opened = runtime.block_on(async {
            let s = backend.open(&store, keyclaim::Limits::default()).await?;
            s.close().await
        });
        if let Err(e) = opened {
            let size = std::fs::metadata(&store).map(|m| m.len()).unwrap_or(0);
            failures.push(format!("round {round}: {size}-byte file: {}", chain(&e)));
        }
    }
    assert!(
        failures.is_empty(),
        "{backend}: {} of {rounds} kills during creation left a store that does not open:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn sqlite_opens_after_a_kill_during_creation() {
    kill_during_create(Backend::Sqlite, 30);
}

#[test]
fn redb_opens_after_a_kill_during_creation() {
    kill_during_create(Backend::Redb, 30);
}

#[cfg(feature = "rocksdb")]
#[test]
fn rocksdb_opens_after_a_kill_during_creation() {
    kill_during_create(Backend::Rocksdb, 30);
}
