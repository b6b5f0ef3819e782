//! Crash test (R3.1, R4.2, R10.1, R10.2): a child process uploads and claims
//! in a loop, reporting every acknowledged result on stdout; the parent
//! SIGKILLs it at a random moment, again and again, and after each kill
//! checks that the file opens cleanly (and passes SQLite's integrity
//! check), that no key reported as claimed is ever issued again, that every
//! acknowledged upload not claimed is still there, and that unacknowledged
//! uploads are all there or not at all (`keyclaim_testing::crash`).
//!
//! The test binary runs itself again for each child
//! (`keyclaim_testing::process`): the test below is the child when started
//! with a child role, and the parent in every other run.
//!
//! `KEYCLAIM_CRASH_ITERATIONS` sets the number of kills (default 25), e.g.
//! `KEYCLAIM_CRASH_ITERATIONS=500 cargo test -p keyclaim-sqlite --release --test crash`.

// A test: a failed expectation is how it reports.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::{crash_iterations, kill_at_random_moment};
use keyclaim_sqlite::{SqliteOptions, SqliteStore};
use keyclaim_testing::crash::{Ledger, child_workload, crash_limits};

const DB: &str = "KEYCLAIM_CRASH_DB";
const RUN: &str = "KEYCLAIM_CRASH_RUN";

/// Limits under which the store remembers every issued key.
fn options() -> SqliteOptions {
    SqliteOptions::new().limits(crash_limits())
}

/// The child's body: uploads and claims until killed.
fn crash_child() {
    let db = PathBuf::from(std::env::var(DB).expect("db path"));
    let run = std::env::var(RUN).expect("run number");
    keyclaim_testing::runtime(2).block_on(async move {
        let store = Arc::new(SqliteStore::open_with(&db, options()).await.expect("open"));
        child_workload(store, &run).await;
    });
}

#[test]
fn sigkill_at_random_moments_loses_nothing() {
    if keyclaim_testing::process::is_child("crash") {
        return crash_child();
    }
    let dir = keyclaim_testing::temp_dir();
    let db = dir.path().join("crash.sqlite");
    let rt = keyclaim_testing::runtime(2);
    let mut ledger = Ledger::default();
    for run in 0..crash_iterations() {
        let output = kill_at_random_moment(
            "sigkill_at_random_moments_loses_nothing",
            "crash",
            &[(DB, db.display().to_string()), (RUN, run.to_string())],
            run,
        );
        ledger.absorb(&output);
        assert!(
            common::integrity_ok(&db),
            "run {run}: integrity_check failed"
        );
        rt.block_on(async {
            let store = SqliteStore::open_with(&db, options())
                .await
                .unwrap_or_else(|e| panic!("run {run}: the file does not open cleanly: {e}"));
            ledger.check(&store, run).await;
        });
    }
    assert!(common::integrity_ok(&db));
    eprintln!("{}", ledger.summary(crash_iterations()));
}
