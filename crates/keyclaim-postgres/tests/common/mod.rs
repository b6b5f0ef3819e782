//! What several test files of this crate share: taking a schema back to
//! an older layout, and checking the count table against the keys.

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

/// Takes a version-3 schema (the session's `search_path`) back to the
/// version-2 layout: no count table, no triggers.
pub const BACK_TO_V2: &str = "
DROP TRIGGER otk_count_insert ON otk;
DROP TRIGGER otk_count_delete ON otk;
DROP TRIGGER otk_count_update ON otk;
DROP TRIGGER otk_count_truncate ON otk;
DROP FUNCTION otk_count_follow();
DROP TABLE otk_count;
UPDATE keyclaim_meta SET version = 2;";

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
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("raw connection");
    tokio::spawn(connection);
    client
        .batch_execute(&format!("SET search_path = {schema}"))
        .await
        .expect("search_path");
    client
}
