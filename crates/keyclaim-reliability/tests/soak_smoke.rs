//! A few seconds of the soak per backend, so that CI exercises its
//! machinery (workers killed with SIGKILL, journal replay, in-flight
//! resolution, state verification). The real soak runs for hours, by hand.
// A test: a failed expectation is how it reports.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Command;

fn smoke(backend: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_soak"))
        .args([
            "--backend",
            backend,
            "--seconds",
            "4",
            "--kill-ms",
            "100..500",
            "--seed",
            "7",
        ])
        .output()
        .expect("run the soak binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "soak {backend} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(summary.contains("violations: 0"), "{summary}");
    assert!(
        !summary.contains(" 0 crashes survived"),
        "no crash happened: {summary}"
    );
}

#[test]
fn soak_sqlite_a_few_seconds() {
    smoke("sqlite");
}

#[test]
fn soak_redb_a_few_seconds() {
    smoke("redb");
}

#[cfg(feature = "rocksdb")]
#[test]
fn soak_rocksdb_a_few_seconds() {
    smoke("rocksdb");
}
