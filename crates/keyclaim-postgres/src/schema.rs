//! The table layout and its versioned migrations, applied on connect.
//!
//! Every table lives in the store's schema (the connection's `search_path`,
//! see [`crate::PostgresOptions::schema`]). Text columns that are ordered
//! use `COLLATE "C"`: byte order of the UTF-8 strings (R2.7), whatever the
//! database's locale.
//!
//! Migrations run in one transaction under an advisory lock named after the
//! schema, so several workers may start at once: the first creates or
//! upgrades the tables, the others wait and then find them current. A
//! schema written by a newer keyclaim is refused with
//! [`Error::UnsupportedVersion`], never touched.

use deadpool_postgres::Object;
use keyclaim::{Error, Result};

use crate::BACKEND;
use crate::error::pg;

/// The newest schema version this build knows (and creates).
pub const SCHEMA_VERSION: i64 = 2;

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

/// Version 2: the issued memory keeps one index instead of two.
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

/// Every migration, in order: (the version it leads to, its SQL).
const MIGRATIONS: &[(i64, &str)] = &[(1, V1), (2, V2)];

const MIGRATE_LOCK: &str =
    "SELECT pg_advisory_xact_lock(hashtextextended('keyclaim/migrate/' || $1::text, 0))";
const SCHEMA_EXISTS: &str = "SELECT 1 FROM pg_namespace WHERE nspname = $1::text";
const CREATE_META: &str = "CREATE TABLE IF NOT EXISTS keyclaim_meta (
    id      int PRIMARY KEY CHECK (id = 1),
    version bigint NOT NULL
)";
const READ_VERSION: &str = "SELECT version FROM keyclaim_meta WHERE id = 1";
const WRITE_VERSION: &str = "INSERT INTO keyclaim_meta (id, version) VALUES (1, $1)
    ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version";

/// Creates the schema and tables, or upgrades them, on a connection whose
/// `search_path` is `schema` (already validated).
#[tracing::instrument(name = "keyclaim.postgres.migrate", skip_all, fields(schema = %schema))]
pub(crate) async fn migrate(client: &mut Object, schema: &str) -> Result<()> {
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
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
        tracing::info!(schema, version, "applying keyclaim migration");
        tx.batch_execute(sql).await.map_err(pg(op))?;
        tx.execute(WRITE_VERSION, &[version])
            .await
            .map_err(pg(op))?;
    }
    tx.commit().await.map_err(pg(op))?;
    Ok(())
}
