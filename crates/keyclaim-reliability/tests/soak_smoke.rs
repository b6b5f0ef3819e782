//! A few seconds of the soak per backend, so that CI exercises its
//! machinery (workers killed with SIGKILL, journal replay, in-flight
//! resolution, state verification). The real soak runs for hours, by hand.
// A test: a failed expectation is how it reports.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Command;

use keyclaim_pgserver::Cluster;

/// The cluster's `key=value` string as a store URL, with the store's schema.
fn store_url(cluster: &Cluster, schema: &str) -> String {
    let query: Vec<String> = cluster
        .url()
        .split_whitespace()
        .filter(|pair| pair.starts_with("host=") || pair.starts_with("port="))
        .map(str::to_owned)
        .collect();
    format!(
        "postgresql://postgres@/postgres?{}&keyclaim_schema={schema}",
        query.join("&")
    )
}

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
    let url = store_url(&cluster, "kc_soak");
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

/// What the soak does after killing a PostgreSQL worker: the worker's
/// server session, here one holding an open transaction that created a
/// table, is ended (its work rolled back) and gone from the server before
/// `end_worker_sessions` returns, while a session of another application is
/// left alone. Without this, a killed worker's statement could commit after
/// the soak had resolved the operation in flight as not applied.
#[test]
fn a_killed_workers_sessions_are_ended_before_its_operation_is_resolved() {
    use keyclaim_reliability::soak::{WORKER_APPLICATION, end_worker_sessions};
    use tokio_postgres::NoTls;

    let Some(cluster) = keyclaim_testing::require(
        "soak_smoke::a_killed_workers_sessions_are_ended (needs a private PostgreSQL cluster)",
        Cluster::start(false),
    ) else {
        return;
    };
    keyclaim_reliability::block_on(async {
        let connect = |application: &str| {
            let conn = format!("{} application_name={application}", cluster.url());
            async move {
                let (client, connection) = tokio_postgres::connect(&conn, NoTls).await.unwrap();
                tokio::spawn(connection);
                client
            }
        };
        let worker = connect(WORKER_APPLICATION).await;
        let other = connect("someone-else").await;
        worker
            .batch_execute(
                "BEGIN; CREATE TABLE soak_orphan (x int); INSERT INTO soak_orphan VALUES (1);",
            )
            .await
            .unwrap();
        let sessions = |application: &'static str| {
            let other = &other;
            async move {
                other
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                        &[&application],
                    )
                    .await
                    .unwrap()
                    .get::<_, i64>(0)
            }
        };
        assert_eq!(sessions(WORKER_APPLICATION).await, 1);

        end_worker_sessions(&store_url(&cluster, "kc_unused"))
            .await
            .unwrap();

        assert_eq!(sessions(WORKER_APPLICATION).await, 0);
        assert_eq!(sessions("someone-else").await, 1);
        let table = other
            .query_one("SELECT to_regclass('soak_orphan') IS NULL", &[])
            .await
            .unwrap();
        assert!(
            table.get::<_, bool>(0),
            "the ended session's work was committed"
        );
        assert!(worker.simple_query("SELECT 1").await.is_err());
    })
    .unwrap();
}
