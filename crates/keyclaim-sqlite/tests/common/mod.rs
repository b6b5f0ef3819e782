//! Helpers for the tests that run child processes: the test binary runs
//! itself again as a child (see `keyclaim_testing::process`); the shared
//! ones come from `keyclaim_testing::crash`.

#![allow(dead_code, unreachable_pub, unused_imports)]

use std::path::Path;

pub use keyclaim_testing::crash::{
    MARK, collect_stdout, device, key, kill_at_random_moment, report, result_lines, spawn_child,
};

/// How many times a crash test kills its child: `KEYCLAIM_CRASH_ITERATIONS`,
/// 25 unless set.
pub fn crash_iterations() -> usize {
    keyclaim_testing::crash::crash_iterations(25)
}

/// Whether the file at `path` passes SQLite's `PRAGMA integrity_check`.
pub fn integrity_ok(path: &Path) -> bool {
    let conn = rusqlite::Connection::open(path).expect("open for integrity_check");
    let verdict: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    verdict == "ok"
}
