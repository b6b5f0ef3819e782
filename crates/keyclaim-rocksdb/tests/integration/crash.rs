//! Crash test (R3.1, R4.2, R10.1, R10.2): a child process uploads and claims
//! in a loop on a RocksDB store, reporting every acknowledged result on
//! stdout; the parent SIGKILLs it at a random moment, again and again, and
//! after each kill checks that the database opens cleanly, that no key
//! reported as claimed is ever issued again, that every acknowledged upload
//! not claimed is still there, that unacknowledged uploads are all there or
//! not at all (`keyclaim_testing::crash`), and that `check` finds nothing.
//!
//! The test binary runs itself again for each child
//! (`keyclaim_testing::process`): the test below is the child when started
//! with the child role, and the parent in every other run.
//!
//! `KEYCLAIM_CRASH_ITERATIONS` sets the number of kills (default 20), e.g.
//! `KEYCLAIM_CRASH_ITERATIONS=300 cargo test -p keyclaim-rocksdb --release
//! --test integration crash::`.

use std::path::PathBuf;
use std::sync::Arc;

use keyclaim_rocksdb::{RocksOptions, RocksStore};
use keyclaim_testing::crash::{
    Ledger, child_workload, crash_iterations, crash_limits, kill_at_random_moment,
};

const TEST: &str = "crash::sigkill_at_random_moments_loses_nothing";
const ROLE: &str = "rocksdb-crash";
const DB: &str = "KEYCLAIM_CRASH_DB";
const RUN: &str = "KEYCLAIM_CRASH_RUN";

/// Limits under which the store remembers every issued key.
fn options() -> RocksOptions {
    RocksOptions::new().limits(crash_limits())
}

/// The child's body: uploads and claims until killed.
fn crash_child() {
    let db = PathBuf::from(std::env::var(DB).expect("db path"));
    let run = std::env::var(RUN).expect("run number");
    crate::rt().block_on(async move {
        let store = Arc::new(RocksStore::open_with(&db, options()).await.expect("open"));
        child_workload(store, &run).await;
    });
}

#[test]
fn sigkill_at_random_moments_loses_nothing() {
    if keyclaim_testing::process::is_child(ROLE) {
        return crash_child();
    }
    let dir = keyclaim_testing::temp_dir();
    let db = dir.path().join("crash.rocksdb");
    let rt = crate::rt();
    let mut ledger = Ledger::default();
    let kills = crash_iterations(20);
    for run in 0..kills {
        let env = [(DB, db.display().to_string()), (RUN, run.to_string())];
        ledger.absorb(&kill_at_random_moment(TEST, ROLE, &env, run));
        rt.block_on(async {
            let store = RocksStore::open_with(&db, options())
                .await
                .unwrap_or_else(|e| panic!("run {run}: the database does not open cleanly: {e}"));
            ledger.check(&store, run).await;
            let report = keyclaim::transfer::check_store(&store, 64).await.unwrap();
            assert!(
                report.problems.is_empty(),
                "run {run}: {:?}",
                report.problems
            );
            store.close().await.unwrap();
        });
    }
    eprintln!("{}", ledger.summary(kills));
}
