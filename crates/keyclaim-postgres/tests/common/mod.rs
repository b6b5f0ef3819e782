//! Helpers of the race and combiner tests: raw sessions of the test's own.

use std::time::Duration;

/// A raw connection to the server, for a transaction of the test's own.
pub(crate) async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio::time::timeout(
        Duration::from_secs(30),
        tokio_postgres::connect(url, tokio_postgres::NoTls),
    )
    .await
    .expect("raw connection within 30 s")
    .expect("raw connection");
    tokio::spawn(connection);
    client
}

/// How many sessions wait for the session `pid`, as `watcher` sees it (the
/// activity view is read once per transaction: keep `watcher` outside one).
pub(crate) async fn blocked_by(watcher: &tokio_postgres::Client, pid: i32) -> i64 {
    watcher
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY (pg_blocking_pids(pid))",
            &[&pid],
        )
        .await
        .expect("blocked sessions")
        .get(0)
}
