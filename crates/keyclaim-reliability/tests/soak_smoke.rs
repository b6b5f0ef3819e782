//! A few seconds of the soak per backend, so that CI exercises its
//! machinery (workers killed with SIGKILL, journal replay, in-flight
//! resolution, state verification). The real soak runs for hours, by hand.
// A test: a failed expectation is how it reports.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Command;

use keyclaim_pgserver::Cluster;

fn smoke(backend: &str) {
    let summary = soak(&[
        "--backend",
        backend,
        "--seconds",
        "4",
        "--kill-ms",
        "100..500",
        "--seed",
        "7",
    ]);
    assert!(
        !summary.contains(" 0 crashes survived"),
        "no crash happened: {summary}"
    );
}

/// Runs the soak binary with `args`; answers its summary line after
/// checking that it found no violation.
fn soak(args: &[&str]) -> String {
    let backend = args.get(1).copied().unwrap_or_default();
    let out = Command::new(env!("CARGO_BIN_EXE_soak"))
        .args(args)
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
    eprintln!("{summary}");
    assert!(summary.contains("violations: 0"), "{summary}");
    summary.to_owned()
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

/// PostgreSQL: the worker's connections dropped by SIGKILL, and the server
/// itself crashed (`pg_ctl restart -m immediate`) every second generation
/// while the worker works: every acknowledged operation survives, an
/// operation the crash fails fails with a retryable error and is applied
/// whole or not at all (R10.5).
#[test]
fn soak_postgres_with_server_restarts_a_few_seconds() {
    let Some(cluster) = keyclaim_testing::require(
        "soak_smoke::soak_postgres_with_server_restarts (needs a private PostgreSQL cluster)",
        Cluster::start(true),
    ) else {
        return;
    };
    let pg_ctl = cluster.bin_dir().join("pg_ctl");
    let as_postgres = if Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
    {
        "runuser -u postgres -- "
    } else {
        ""
    };
    let restart = format!(
        "{as_postgres}'{}' -D '{}/data' -l '{}/server.log' -m immediate -w -t 60 restart",
        pg_ctl.display(),
        cluster.dir().display(),
        cluster.dir().display()
    );
    // The cluster's `key=value` string as a URL, with the store's schema.
    let query: Vec<String> = cluster
        .url()
        .split_whitespace()
        .filter(|pair| pair.starts_with("host=") || pair.starts_with("port="))
        .map(str::to_owned)
        .collect();
    let url = format!(
        "postgresql://postgres@/postgres?{}&keyclaim_schema=kc_soak",
        query.join("&")
    );
    let summary = soak(&[
        "--backend",
        "postgres",
        "--url",
        &url,
        "--restart-cmd",
        &restart,
        "--restart-every",
        "2",
        "--seconds",
        "8",
        "--kill-ms",
        "300..900",
        "--seed",
        "7",
    ]);
    assert!(
        !summary.contains(" 0 crashes survived") && summary.contains("server restarts survived"),
        "no crash or no server restart happened: {summary}"
    );
}
