//! The table layout and its versioned migrations, applied on connect.
//!
//! Every table lives in the store's schema (the connection's `search_path`,
//! see [`crate::PostgresOptions::schema`]). Text columns that are ordered
//! use `COLLATE "C"`: byte order of the UTF-8 strings (R2.7), whatever the
//! database's locale.
//!
//! Migrations run under a session advisory lock named after the schema, so
//! several workers may start at once: the first creates or upgrades the
//! tables, the others wait and then find them current. A worker waits for
//! the lock by trying it again and again (`pg_try_advisory_lock`), never in
//! a statement, so that it holds no snapshot a concurrent index build
//! would wait for. The lock is held by a connection taken out of the pool,
//! which is closed afterwards: whatever happens, the lock goes with it. A
//! schema written by a newer keyclaim is refused with
//! [`Error::UnsupportedVersion`], never touched.
//!
//! Creating the tables is one transaction. Upgrading a schema that holds
//! data does not block other workers' claims and uploads for longer than a
//! short lock per step (R10.9): version 2 builds its new index with
//! `CREATE INDEX CONCURRENTLY` (no lock that blocks writes; the server's
//! memory is bounded by `maintenance_work_mem`, keyclaim's by nothing it
//! reads), then swaps it in, drops the old indexes and records the version
//! in one short transaction under `lock_timeout`, tried again while the
//! table is busy. Version 3 adds the count table and its triggers in one
//! such short transaction, then counts the existing keys in batches (see
//! [`crate::counts`]); version 4 replaces those triggers in another (see
//! [`crate::counts::V4`]). The version is recorded with the last step.

use std::time::Duration;

use deadpool_postgres::ClientWrapper;
use keyclaim::{Error, Result};
use tokio_postgres::error::SqlState;

use crate::BACKEND;
use crate::counts;
use crate::error::{self, pg};

/// The newest schema version this build knows (and creates).
pub const SCHEMA_VERSION: i64 = 4;

/// Version 1: one-time keys, fallback keys, remembered issued keys.
const V1: &str = r#"
CREATE SEQUENCE otk_seq;
CREATE SEQUENCE issued_seq;

-- One-time keys. `seq` is one value of `otk_seq` per upload (R3.5); claims
-- take the oldest by (seq, key_id) through `otk_claim_order`, which also
-- serves the per-device counts with an index-only scan (R6.4).
CREATE TABLE otk (
    user_id   text COLLATE "C" NOT NULL,
    device_id text COLLATE "C" NOT NULL,
    key_id    text COLLATE "C" NOT NULL,
    algorithm text COLLATE "C" NOT NULL,
    seq       bigint NOT NULL,
    key_json  text NOT NULL,
    digest    bytea NOT NULL,
    PRIMARY KEY (user_id, device_id, key_id)
);
CREATE INDEX otk_claim_order ON otk (user_id, device_id, algorithm, seq, key_id);

-- At most one fallback key per (device, algorithm) (R4.4, R5.1).
CREATE TABLE fallback (
    user_id   text COLLATE "C" NOT NULL,
    device_id text COLLATE "C" NOT NULL,
    algorithm text COLLATE "C" NOT NULL,
    key_id    text COLLATE "C" NOT NULL,
    key_json  text NOT NULL,
    digest    bytea NOT NULL,
    used      boolean NOT NULL DEFAULT false,
    PRIMARY KEY (user_id, device_id, algorithm)
);

-- Issued OTKs remembered per (device, algorithm) (R3.4), in issue order
-- (issued_txn: one `issued_seq` value per claim statement; issued_pos: the
-- key's place in that claim). Uploads prune it to the configured number.
CREATE TABLE issued (
    user_id    text COLLATE "C" NOT NULL,
    device_id  text COLLATE "C" NOT NULL,
    algorithm  text COLLATE "C" NOT NULL,
    key_id     text COLLATE "C" NOT NULL,
    digest     bytea NOT NULL,
    issued_txn bigint NOT NULL,
    issued_pos bigint NOT NULL,
    PRIMARY KEY (user_id, device_id, key_id, digest)
);
CREATE INDEX issued_order ON issued (user_id, device_id, algorithm, issued_txn, issued_pos);
"#;

/// Version 2: the issued memory keeps one index instead of two. This SQL
/// runs only on the empty tables version 1 has just created; a schema with
/// data is upgraded by [`migrate_v2`], with the same result.
///
/// Every claimed key is remembered with one `INSERT` into `issued`; with a
/// primary key on `(user_id, device_id, key_id, digest)` plus the
/// `issued_order` index, and `ON CONFLICT DO NOTHING` for the primary key,
/// that insert was half the server time of a 1,000-device claim (measured
/// for 1,000 rows: 23 ms as it was, 10 ms as a plain insert with one
/// index). Now the claim order is the primary key: `(issued_txn,
/// issued_pos)` is unique (one `issued_seq` value per claim or import
/// statement, and a distinct position inside it), so claims insert without
/// a conflict check. Looking up uploaded key IDs among the remembered keys
/// walks the device's remembered keys through the key's prefix instead of
/// probing by key ID: about the same time at 1,000 remembered keys (0.4
/// ms), and an upload is rare next to the claims that feed the memory. The
/// same key remembered twice (never written by keyclaim; harmless) is no
/// longer refused. Duplicate claim positions cannot exist (see above); any
/// are dropped first all the same, so that the new key can be built.
const V2: &str = r#"
DELETE FROM issued a USING issued b
 WHERE a.user_id = b.user_id AND a.device_id = b.device_id AND a.algorithm = b.algorithm
   AND a.issued_txn = b.issued_txn AND a.issued_pos = b.issued_pos AND a.ctid < b.ctid;
ALTER TABLE issued DROP CONSTRAINT issued_pkey;
DROP INDEX issued_order;
ALTER TABLE issued ADD CONSTRAINT issued_pkey
    PRIMARY KEY (user_id, device_id, algorithm, issued_txn, issued_pos);
"#;

/// The index version 2 builds concurrently, then makes the primary key.
const V2_INDEX: &str = "issued_v2_key";

/// A leftover of an interrupted build: `CREATE INDEX CONCURRENTLY` that
/// fails leaves an invalid index behind.
const V2_INDEX_INVALID: &str = "SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
    WHERE c.relname = 'issued_v2_key' AND c.relnamespace = current_schema()::regnamespace
      AND NOT i.indisvalid";

const V2_BUILD: &str = "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS issued_v2_key
    ON issued (user_id, device_id, algorithm, issued_txn, issued_pos)";

const V2_DROP_INVALID: &str = "DROP INDEX CONCURRENTLY IF EXISTS issued_v2_key";

/// Duplicate claim positions cannot exist (see [`V2`]); if some do, the
/// unique build fails, and this removes them before it is tried again,
/// keeping of each position the row stored first (the lowest `ctid`). One
/// statement that locks only the rows it deletes.
const V2_DEDUP: &str = "
DELETE FROM issued a USING issued b
 WHERE a.user_id = b.user_id AND a.device_id = b.device_id AND a.algorithm = b.algorithm
   AND a.issued_txn = b.issued_txn AND a.issued_pos = b.issued_pos AND a.ctid > b.ctid";

/// The swap, in one short transaction: the built index becomes the primary
/// key, the old indexes go, the version is recorded.
const V2_SWAP: &str = "
ALTER TABLE issued DROP CONSTRAINT issued_pkey;
DROP INDEX issued_order;
ALTER TABLE issued ADD CONSTRAINT issued_pkey PRIMARY KEY USING INDEX issued_v2_key;";

/// How long the swap waits for its lock, while it blocks the writers that
/// queue behind it (R10.9), before it lets them go and tries again.
const SWAP_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '500ms'";

/// How often the swap is tried before the migration fails (retryable; the
/// next connect goes on from the built index).
const SWAP_ATTEMPTS: u32 = 40;

/// The transactional migrations of a new schema, in order: (the version it
/// leads to, its SQL). A schema that holds data runs [`migrate_v2`] and
/// [`migrate_v3`] instead.
const MIGRATIONS: &[(i64, &str)] = &[(1, V1), (2, V2), (3, counts::V3), (4, counts::V4)];

/// The advisory lock of migrations that hold it for the transaction,
/// taken inside the transactions (keyclaim before this layout took only
/// this one).
const MIGRATE_LOCK: &str =
    "SELECT pg_advisory_xact_lock(hashtextextended('keyclaim/migrate/' || $1::text, 0))";
/// The session lock of the whole migration (see the module docs).
const MIGRATE_SESSION_LOCK: &str =
    "SELECT pg_try_advisory_lock(hashtextextended('keyclaim/migrate/' || $1::text, 1))";
const SCHEMA_EXISTS: &str = "SELECT 1 FROM pg_namespace WHERE nspname = $1::text";
const CREATE_META: &str = "CREATE TABLE IF NOT EXISTS keyclaim_meta (
    id      int PRIMARY KEY CHECK (id = 1),
    version bigint NOT NULL
)";
const READ_VERSION: &str = "SELECT version FROM keyclaim_meta WHERE id = 1";
const WRITE_VERSION: &str = "INSERT INTO keyclaim_meta (id, version) VALUES (1, $1)
    ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version";

/// Creates the schema and tables, or upgrades them, on a connection of the
/// pool taken out of it (closed when done, see the module docs), whose
/// `search_path` is `schema` (already validated).
#[tracing::instrument(name = "keyclaim.postgres.migrate", skip_all, fields(schema = %schema))]
pub(crate) async fn migrate(mut client: ClientWrapper, schema: &str) -> Result<()> {
    let op = "migrate";
    let mut pause = Duration::from_millis(20);
    loop {
        let row = client
            .query_one(MIGRATE_SESSION_LOCK, &[&schema])
            .await
            .map_err(pg(op))?;
        if row.try_get::<_, bool>(0).map_err(pg(op))? {
            break;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
    // Unlocked by closing the connection when `client` is dropped. The
    // index build may take long, and must not be cancelled half-way by a
    // statement or lock timeout of the store's options or the role.
    client
        .batch_execute("SET statement_timeout = 0; SET lock_timeout = 0")
        .await
        .map_err(pg(op))?;
    let found = migrate_tables(&mut client, schema).await?;
    if found == 1 {
        migrate_v2(&mut client, schema).await?;
    }
    if found == 1 || found == 2 {
        migrate_v3(&mut client, schema).await?;
    }
    if (1..=3).contains(&found) {
        migrate_v4(&mut client, schema).await?;
    }
    Ok(())
}

/// Creates the schema and the tables, or upgrades them with the
/// transactional migrations, in one transaction; answers the version found
/// (versions 1 to 3 are left to [`migrate_v2`], [`migrate_v3`] and
/// [`migrate_v4`]).
async fn migrate_tables(client: &mut ClientWrapper, schema: &str) -> Result<i64> {
    let op = "migrate";
    let tx = client.transaction().await.map_err(pg(op))?;
    tx.execute(MIGRATE_LOCK, &[&schema]).await.map_err(pg(op))?;
    if tx
        .query_opt(SCHEMA_EXISTS, &[&schema])
        .await
        .map_err(pg(op))?
        .is_none()
    {
        // Built once per connect from a validated name, never per operation.
        tx.batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .map_err(pg(op))?;
    }
    tx.batch_execute(CREATE_META).await.map_err(pg(op))?;
    let found: i64 = match tx.query_opt(READ_VERSION, &[]).await.map_err(pg(op))? {
        Some(row) => row.try_get(0).map_err(pg(op))?,
        None => 0,
    };
    if found > SCHEMA_VERSION {
        return Err(Error::UnsupportedVersion {
            backend: BACKEND,
            found,
            supported: SCHEMA_VERSION,
        });
    }
    if found > 0 {
        // Tables with data: the later versions run without blocking
        // (migrate_v2, migrate_v3).
        return Ok(found);
    }
    for (version, sql) in MIGRATIONS {
        // Versions 2 to 4 here only right after version 1 created the
        // (empty) tables, where rebuilding a key or counting is instant.
        tracing::info!(schema, version, "applying keyclaim migration");
        tx.batch_execute(sql).await.map_err(pg(op))?;
        tx.execute(WRITE_VERSION, &[version])
            .await
            .map_err(pg(op))?;
    }
    tx.commit().await.map_err(pg(op))?;
    Ok(found)
}

/// Version 1 to 2 on tables that may hold data, without blocking other
/// workers for longer than a short lock (R10.9, see the module docs):
/// build the new key concurrently, then swap it in with the version.
async fn migrate_v2(client: &mut ClientWrapper, schema: &str) -> Result<()> {
    let op = "migrate";
    tracing::info!(
        schema,
        version = 2,
        "applying keyclaim migration (index built concurrently)"
    );
    let mut deduplicated = false;
    loop {
        if client
            .query_opt(V2_INDEX_INVALID, &[])
            .await
            .map_err(pg(op))?
            .is_some()
        {
            client
                .batch_execute(V2_DROP_INVALID)
                .await
                .map_err(pg(op))?;
        }
        match client.batch_execute(V2_BUILD).await {
            Ok(()) => break,
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) && !deduplicated => {
                tracing::warn!(schema, "duplicate issued-key positions; removing them");
                client
                    .batch_execute(V2_DROP_INVALID)
                    .await
                    .map_err(pg(op))?;
                client.batch_execute(V2_DEDUP).await.map_err(pg(op))?;
                deduplicated = true;
            }
            Err(e) => return Err(pg(op)(e)),
        }
    }
    short_lock_tx(client, V2_SWAP, Some(2)).await?;
    tracing::info!(schema, index = V2_INDEX, "keyclaim migration 2 applied");
    Ok(())
}

/// Version 2 to 3 on tables that may hold data, without blocking other
/// workers for longer than a short lock (R10.9): the count table and its
/// triggers in one short transaction, then the existing keys counted in
/// batches, then the version (see [`counts`]). Version 4 follows at once
/// ([`migrate_v4`]).
async fn migrate_v3(client: &mut ClientWrapper, schema: &str) -> Result<()> {
    let op = "migrate";
    tracing::info!(
        schema,
        version = 3,
        "applying keyclaim migration (counts backfilled in batches)"
    );
    short_lock_tx(client, counts::V3, None).await?;
    let batches = counts::backfill(client).await?;
    client
        .execute(WRITE_VERSION, &[&3_i64])
        .await
        .map_err(pg(op))?;
    tracing::info!(schema, batches, "keyclaim migration 3 applied");
    Ok(())
}

/// Version 3 to 4 (R10.9): the row-level trigger for other writers in
/// place of the statement-level ones, and the version, in one short
/// transaction (see [`counts::V4`]). Workers of the previous version that
/// still run are counted by the new trigger (their sessions lack
/// `keyclaim.counted`); this version's workers count themselves and serve
/// only once the migration is done.
async fn migrate_v4(client: &mut ClientWrapper, schema: &str) -> Result<()> {
    tracing::info!(schema, version = 4, "applying keyclaim migration");
    short_lock_tx(client, counts::V4, Some(4)).await?;
    tracing::info!(schema, "keyclaim migration 4 applied");
    Ok(())
}

/// Runs `sql` (and records `version`) in one transaction under a short
/// lock timeout, tried again while the tables are busy: the writers that
/// queue behind a waiting DDL lock are held up for no longer than the
/// timeout at a time (R10.9).
async fn short_lock_tx(client: &mut ClientWrapper, sql: &str, version: Option<i64>) -> Result<()> {
    let op = "migrate";
    let mut pause = Duration::from_millis(50);
    for attempt in 1..=SWAP_ATTEMPTS {
        match try_short_lock_tx(client, sql, version).await {
            Ok(()) => return Ok(()),
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                tracing::debug!(attempt, "tables busy; trying the migration step again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(pg(op)(e)),
        }
    }
    Err(error::migration_busy())
}

/// One attempt of [`short_lock_tx`].
async fn try_short_lock_tx(
    client: &mut ClientWrapper,
    sql: &str,
    version: Option<i64>,
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.batch_execute(SWAP_LOCK_TIMEOUT).await?;
    tx.batch_execute(sql).await?;
    if let Some(version) = version {
        tx.execute(WRITE_VERSION, &[&version]).await?;
    }
    tx.commit().await
}
