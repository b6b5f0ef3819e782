//! What several test files of this crate share: taking a schema back to
//! an older layout, checking the count table against the keys, and raw
//! sessions of the test's own.

// Each test file uses a part.
#![allow(dead_code, unreachable_pub)]

use keyclaim_postgres::PostgresOptions;

/// The options of a test store in `schema`: a small pool, and the test
/// servers' `fsync = off` allowed (they run so for speed).
pub fn options(schema: &str) -> PostgresOptions {
    PostgresOptions::new()
        .schema(schema)
        .pool_size(4)
        .allow_unsafe_server(true)
}

/// Takes a current schema (the session's `search_path`) back to the
/// version-2 layout: no count table, no triggers.
pub const BACK_TO_V2: &str = "
DROP TRIGGER otk_count_row ON otk;
DROP TRIGGER otk_count_truncate ON otk;
DROP FUNCTION otk_count_row();
DROP FUNCTION otk_count_follow();
DROP TABLE otk_count;
UPDATE keyclaim_meta SET version = 2;";

/// Takes a current schema (the session's `search_path`) back to the
/// version-3 layout: the statement-level count triggers (whose function
/// version 4 keeps for truncation) instead of the row-level one.
pub const BACK_TO_V3: &str = "
DROP TRIGGER otk_count_row ON otk;
DROP FUNCTION otk_count_row();
CREATE TRIGGER otk_count_insert AFTER INSERT ON otk
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION otk_count_follow();
CREATE TRIGGER otk_count_delete AFTER DELETE ON otk
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION otk_count_follow();
CREATE TRIGGER otk_count_update AFTER UPDATE ON otk
    REFERENCING OLD TABLE AS gone NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION otk_count_follow();
UPDATE keyclaim_meta SET version = 3;";

/// The schema version recorded in the schema of `client`'s `search_path`.
pub async fn schema_version(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT version FROM keyclaim_meta", &[])
        .await
        .expect("version")
        .get(0)
}

/// The triggers on `otk` of the schema of `client`'s `search_path`, by
/// name.
pub async fn otk_triggers(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query(
            "SELECT tgname::text FROM pg_trigger
              WHERE tgrelid = 'otk'::regclass AND NOT tgisinternal ORDER BY 1",
            &[],
        )
        .await
        .expect("the triggers on otk")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The (user, device, algorithm, keys stored, count kept) of every pair
/// whose kept count (the sum of its `otk_count` rows) is not the number of
/// its keys: empty when the counts are exact (R6.2). `client`'s
/// `search_path` is the store's schema.
pub async fn count_mismatches(
    client: &tokio_postgres::Client,
) -> Vec<(String, String, String, Option<i64>, Option<i64>)> {
    client
        .query(
            "SELECT user_id, device_id, algorithm, o.n, c.n
               FROM (SELECT user_id, device_id, algorithm, count(*) AS n
                       FROM otk GROUP BY 1, 2, 3) o
               FULL JOIN (SELECT user_id, device_id, algorithm, sum(n)::int8 AS n
                            FROM otk_count GROUP BY 1, 2, 3 HAVING sum(n) <> 0) c
              USING (user_id, device_id, algorithm)
              WHERE o.n IS DISTINCT FROM c.n",
            &[],
        )
        .await
        .expect("compare the counts")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

/// A raw session on `url` whose `search_path` is `schema`.
pub async fn raw_session(url: &str, schema: &str) -> tokio_postgres::Client {
    let client = raw(url).await;
    client
        .batch_execute(&format!("SET search_path = {schema}"))
        .await
        .expect("search_path");
    client
}

/// A raw connection to the server, for a transaction of the test's own.
pub async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio::time::timeout(
        std::time::Duration::from_secs(30),
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
pub async fn blocked_by(watcher: &tokio_postgres::Client, pid: i32) -> i64 {
    watcher
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY (pg_blocking_pids(pid))",
            &[&pid],
        )
        .await
        .expect("blocked sessions")
        .get(0)
}

/// `url` (a URL or a key=value connection string, as the test server's may
/// be either) with a libpq parameter added.
pub fn with_param(url: &str, key: &str, value: &str) -> String {
    if url.starts_with("postgres") {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}{key}={value}")
    } else {
        format!("{url} {key}={value}")
    }
}
