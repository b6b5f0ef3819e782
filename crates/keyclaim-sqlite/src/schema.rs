//! The file's layout, its migrations (`PRAGMA user_version`), and how a
//! connection is opened and tuned.
//!
//! # Tables (schema version 3)
//!
//! - `one_time_key`: one row per one-time key of a (device, algorithm), in
//!   claim order by `pos`, a store-wide position counter taken in (upload
//!   sequence, key ID) order (R3.5, R4.2). The key at the queue's head and
//!   every later one is stored; the keys before the head were issued and are
//!   the remembered issued keys (R3.4). The table is clustered by (user,
//!   device, algorithm, pos) (`WITHOUT ROWID`), so a claim's read is one
//!   B-tree seek. `one_time_key_id` on (user, device, key ID, digest) finds
//!   the rows of a key ID for the retry, conflict and remembered-key checks
//!   (R3.2, R3.4).
//! - `otk_queue`: one small row per (device, algorithm): `head` (the position
//!   of the oldest stored key), `stored` (how many keys are stored) and
//!   `issued` (how many remembered keys lie before the head). A claim rewrites
//!   this row only, one page of the file, instead of deleting a key from a
//!   table and two indexes and inserting it into two more; counts are read
//!   from it alone (R6.4).
//! - `fallback_key`: at most one row per (device, algorithm), with its `used`
//!   flag (R4.4, R5.1); `fallback_unused` answers the unused fallback types
//!   from the index alone (R6.3, R6.4).
//! - `store_meta`: the store-wide upload sequence and position counters. They
//!   live in the file, are read and incremented inside the write transaction,
//!   and so stay monotonic across processes and restarts (R3.5: never a wall
//!   clock).
//! - `change_log`: one row per batch that changed devices, naming them, for
//!   the other processes' subscribers (R11.2); pruned after a few seconds
//!   (see the `changes` module).
//!
//! Version 1 kept stored keys in `otk` (deleted on claim) and the remembered
//! issued keys in `issued_key`; migration 2 ([`to_v2`]) moves both into the
//! version 2 tables, issued keys before the stored ones of their queue.
//!
//! Migrations run on open, all in one `BEGIN IMMEDIATE` transaction (atomic:
//! a crash leaves the old version, and the next open starts over), with
//! memory that does not grow with the store (R10.9): no step sorts or
//! collects rows, and SQLite writes dirty pages out to the WAL when its page
//! cache fills.
//!
//! Every text column uses SQLite's `BINARY` collation (memcmp of the UTF-8
//! bytes), which is the byte order the contract asks for (R2.7).

use std::path::Path;
use std::time::Duration;

use keyclaim::{Error, Result};
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags};

use crate::error::{self, SqlContext as _};
use crate::{BACKEND, SqliteOptions, Synchronous};

mod to_v2;

/// The newest schema version this build knows. A file with a higher
/// `PRAGMA user_version` is refused with [`Error::UnsupportedVersion`].
pub const SCHEMA_VERSION: i64 = 3;

/// `PRAGMA application_id` of a keyclaim file ("kclm"), so that a file of
/// another application is not taken for an empty store.
pub const APPLICATION_ID: i64 = 0x6b63_6c6d;

/// With the background checkpointer on, the writer still checkpoints by
/// itself once the WAL holds this many pages (about 32 MiB).
const BACKSTOP_CHECKPOINT_PAGES: i64 = 8192;

/// One step of [`MIGRATIONS`], run inside the migration's transaction.
enum Migration {
    /// Statements run as they are.
    Sql(&'static str),
    /// Code: for a step that SQL alone would do with memory growing with
    /// the store (R10.9).
    Code(fn(&Connection) -> Result<()>),
}

impl Migration {
    fn apply(&self, conn: &Connection) -> Result<()> {
        match self {
            Self::Sql(sql) => conn.execute_batch(sql).ctx("migrate"),
            Self::Code(step) => step(conn),
        }
    }
}

/// Migration `i` brings a file from version `i` to version `i + 1`.
const MIGRATIONS: &[Migration] = &[
    // Version 1: the initial layout.
    Migration::Sql(
        "
    CREATE TABLE store_meta (
        id       INTEGER PRIMARY KEY CHECK (id = 1),
        next_seq INTEGER NOT NULL
    );
    INSERT INTO store_meta (id, next_seq) VALUES (1, 1);

    CREATE TABLE otk (
        id        INTEGER PRIMARY KEY,
        user_id   TEXT    NOT NULL COLLATE BINARY,
        device_id TEXT    NOT NULL COLLATE BINARY,
        algorithm TEXT    NOT NULL COLLATE BINARY,
        key_id    TEXT    NOT NULL COLLATE BINARY,
        seq       INTEGER NOT NULL,
        digest    BLOB    NOT NULL,
        key_json  TEXT    NOT NULL
    );
    CREATE INDEX otk_claim_order ON otk (user_id, device_id, algorithm, seq, key_id);
    CREATE UNIQUE INDEX otk_key_id ON otk (user_id, device_id, key_id);

    CREATE TABLE fallback_key (
        user_id   TEXT    NOT NULL COLLATE BINARY,
        device_id TEXT    NOT NULL COLLATE BINARY,
        algorithm TEXT    NOT NULL COLLATE BINARY,
        key_id    TEXT    NOT NULL COLLATE BINARY,
        digest    BLOB    NOT NULL,
        key_json  TEXT    NOT NULL,
        used      INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (user_id, device_id, algorithm)
    );
    CREATE INDEX fallback_unused ON fallback_key (user_id, device_id, used, algorithm);

    CREATE TABLE issued_key (
        user_id   TEXT    NOT NULL COLLATE BINARY,
        device_id TEXT    NOT NULL COLLATE BINARY,
        algorithm TEXT    NOT NULL COLLATE BINARY,
        n         INTEGER NOT NULL,
        key_id    TEXT    NOT NULL COLLATE BINARY,
        digest    BLOB    NOT NULL,
        PRIMARY KEY (user_id, device_id, algorithm, n)
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX issued_key_id ON issued_key (user_id, device_id, algorithm, key_id, digest);
    ",
    ),
    // Version 2: keys stay in one table after a claim; a per-(device,
    // algorithm) queue row says which are stored and which were issued.
    Migration::Code(to_v2::migrate),
    // Version 3: the change log read by the other processes (R11.2).
    Migration::Sql(
        "
    CREATE TABLE change_log (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        origin  INTEGER NOT NULL,
        at_ms   INTEGER NOT NULL,
        devices TEXT    NOT NULL
    );
    ",
    ),
];

/// Which job a connection has; decides its flags and pragmas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// The one connection that writes (the writer thread's); may create
    /// the file.
    Writer,
    /// A read-pool connection; never writes (`query_only`).
    Reader,
    /// The background checkpoint connection.
    Checkpointer,
}

/// Opens and tunes one connection. Does not migrate.
pub(crate) fn open_connection(
    path: &Path,
    options: &SqliteOptions,
    role: Role,
) -> Result<Connection> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if role == Role::Writer {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let conn = Connection::open_with_flags(path, flags).ctx("open")?;
    conn.busy_timeout(options.get_busy_timeout()).ctx("open")?;
    conn.set_prepared_statement_cache_capacity(64);
    // Every statement is prepared once and cached. Without the query planner
    // stability guarantee, SQLite (built with STAT4) re-prepares a cached
    // statement whenever a new value is bound to a parameter in a range
    // constraint (`n <= ?`, `LIMIT ?`), which cost more than running it.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .ctx("open")?;
    let synchronous = match options.get_synchronous() {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", synchronous)
        .ctx("open")?;
    conn.pragma_update(None, "foreign_keys", false)
        .ctx("open")?;
    // Savepoints' journals (the writer's batches) stay in memory; they hold
    // at most a batch's worth of pages.
    conn.pragma_update(None, "temp_store", "MEMORY")
        .ctx("open")?;
    conn.pragma_update(
        None,
        "journal_size_limit",
        i64::try_from(options.get_wal_size_limit()).unwrap_or(i64::MAX),
    )
    .ctx("open")?;
    match role {
        Role::Reader => conn.pragma_update(None, "query_only", true).ctx("open")?,
        Role::Writer if options.get_checkpoint_interval().is_some() => {
            // The background checkpointer does the work; this is a backstop.
            conn.pragma_update(None, "wal_autocheckpoint", BACKSTOP_CHECKPOINT_PAGES)
                .ctx("open")?;
        }
        Role::Writer | Role::Checkpointer => {}
    }
    Ok(conn)
}

/// Puts the file into WAL mode and brings its schema to [`SCHEMA_VERSION`],
/// inside one `BEGIN IMMEDIATE` transaction so that several processes opening
/// the same new file migrate it once.
///
/// # Errors
/// [`Error::UnsupportedVersion`] for a file written by a newer version,
/// [`Error::Corrupt`] for a file of another application,
/// [`Error::Storage`] otherwise.
pub(crate) fn migrate(conn: &Connection, busy_timeout: Duration) -> Result<()> {
    let _span = tracing::debug_span!("keyclaim.sqlite.migrate").entered();
    set_wal(conn, busy_timeout)?;
    conn.execute_batch("BEGIN IMMEDIATE").ctx("migrate")?;
    let outcome = migrate_in_transaction(conn);
    match outcome {
        Ok(()) => conn.execute_batch("COMMIT").ctx("migrate"),
        Err(e) => {
            // Best effort: the error to report is the migration's.
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

fn migrate_in_transaction(conn: &Connection) -> Result<()> {
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .ctx("migrate")?;
    let app_id: i64 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .ctx("migrate")?;
    if version > SCHEMA_VERSION {
        return Err(Error::UnsupportedVersion {
            backend: BACKEND,
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    if app_id != 0 && app_id != APPLICATION_ID {
        return Err(Error::corrupt(format!(
            "the SQLite file belongs to another application (application_id {app_id:#x})"
        )));
    }
    if version == 0 {
        let tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE type = 'table'",
                [],
                |r| r.get(0),
            )
            .ctx("migrate")?;
        if tables > 0 {
            return Err(Error::corrupt(
                "the SQLite file has tables but no keyclaim schema version",
            ));
        }
    }
    let start = usize::try_from(version).unwrap_or(0);
    for (i, step) in MIGRATIONS.iter().enumerate().skip(start) {
        step.apply(conn)?;
        tracing::info!(to_version = i + 1, "keyclaim-sqlite: migrated schema");
    }
    if version < SCHEMA_VERSION {
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .ctx("migrate")?;
        conn.pragma_update(None, "application_id", APPLICATION_ID)
            .ctx("migrate")?;
    }
    Ok(())
}

/// Switches to WAL mode (a property of the file, kept across opens). Changing
/// the mode needs the file to itself, so a concurrent opener may see busy
/// for a moment; retry until the busy timeout.
fn set_wal(conn: &Connection, busy_timeout: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + busy_timeout;
    loop {
        let mode =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0));
        match mode {
            Ok(mode) if mode.eq_ignore_ascii_case("wal") => return Ok(()),
            Ok(mode) => return Err(error::wal_refused(&mode)),
            Err(e) if error::is_busy(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(error::sql_error("open", e)),
        }
    }
}

/// A file of an older `version`, as that version left it (tests).
#[cfg(test)]
fn file_at(path: &Path, version: usize) -> Connection {
    #![allow(clippy::unwrap_used)]
    let conn = open_connection(path, &SqliteOptions::default(), Role::Writer).unwrap();
    for step in &MIGRATIONS[..version] {
        step.apply(&conn).unwrap();
    }
    conn.pragma_update(None, "user_version", i64::try_from(version).unwrap())
        .unwrap();
    conn.pragma_update(None, "application_id", APPLICATION_ID)
        .unwrap();
    conn
}

/// The file's schema version (tests).
#[cfg(test)]
fn user_version(conn: &Connection) -> i64 {
    #![allow(clippy::unwrap_used)]
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    use keyclaim::{ClaimTarget, Device, KeyId, KeyJson, Limits, Upload};
    use rusqlite::params;

    use crate::ops;

    fn json(k: &str) -> KeyJson {
        KeyJson::from_value(&serde_json::json!({"key": k, "signatures": {}})).unwrap()
    }

    fn device(d: &str) -> Device {
        Device::parse("@alice:example.org", d).unwrap()
    }

    /// Migration 3 adds the change log (R11.2) to a version 2 file and
    /// leaves its keys as they were.
    #[test]
    fn version_2_files_gain_the_change_log() {
        let dir = tempfile::tempdir().unwrap();
        let conn = file_at(&dir.path().join("v2.sqlite"), 2);
        let limits = Limits::default();
        let up = Upload::from_keys(
            device("A"),
            [(KeyId::parse("signed_curve25519:a").unwrap(), json("a"))],
            [],
        )
        .unwrap();
        ops::upload(&conn, &up, &limits).unwrap();
        migrate(&conn, Duration::from_secs(1)).unwrap();
        assert_eq!(user_version(&conn), 3);
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM change_log", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0);
        assert_eq!(ops::otk_counts(&conn, &device("A")).unwrap().total(), 1);
    }

    /// A version 1 file with stored and remembered keys keeps every rule's
    /// state through migration 2: counts, claim order, remembered keys,
    /// fallback keys, and the counters.
    #[test]
    fn version_1_files_are_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteOptions::default();
        let conn = file_at(&dir.path().join("v1.sqlite"), 1);
        conn.execute("UPDATE store_meta SET next_seq = 10", [])
            .unwrap();
        let alg = "signed_curve25519";
        let otk = |d: &str, id: &str, seq: i64| {
            let j = json(id);
            conn.execute(
                "INSERT INTO otk (user_id, device_id, algorithm, key_id, seq, digest, key_json) \
                 VALUES ('@alice:example.org', ?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    d,
                    alg,
                    format!("{alg}:{id}"),
                    seq,
                    &j.digest().as_bytes()[..],
                    j.canonical()
                ],
            )
            .unwrap();
        };
        let issued = |d: &str, id: &str, n: i64| {
            conn.execute(
                "INSERT INTO issued_key (user_id, device_id, algorithm, n, key_id, digest) \
                 VALUES ('@alice:example.org', ?1, ?2, ?3, ?4, ?5)",
                params![
                    d,
                    alg,
                    n,
                    format!("{alg}:{id}"),
                    &json(id).digest().as_bytes()[..]
                ],
            )
            .unwrap();
        };
        otk("A", "k3", 5);
        otk("A", "k1", 7);
        otk("A", "k2", 5);
        issued("A", "x1", 1);
        issued("A", "x2", 2);
        issued("B", "y1", 1);
        let f = json("fb");
        conn.execute(
            "INSERT INTO fallback_key (user_id, device_id, algorithm, key_id, digest, key_json, used) \
             VALUES ('@alice:example.org', 'C', ?1, ?2, ?3, ?4, 1)",
            params![alg, format!("{alg}:fb"), &f.digest().as_bytes()[..], f.canonical()],
        )
        .unwrap();

        migrate(&conn, options.get_busy_timeout()).unwrap();
        assert_eq!(user_version(&conn), SCHEMA_VERSION);

        let limits = Limits::default();
        assert_eq!(ops::otk_counts(&conn, &device("A")).unwrap().total(), 3);
        assert_eq!(ops::otk_counts(&conn, &device("B")).unwrap().total(), 0);
        let snaps = ops::export_devices(&conn, None, 10, &limits).unwrap();
        let names: Vec<&str> = snaps.iter().map(|s| s.device.device_id.as_str()).collect();
        assert_eq!(names, ["A", "B", "C"]);
        let a = &snaps[0];
        let order: Vec<&str> = a.one_time_keys.iter().map(|k| k.key_id.as_str()).collect();
        assert_eq!(
            order,
            [
                "signed_curve25519:k2",
                "signed_curve25519:k3",
                "signed_curve25519:k1"
            ]
        );
        let remembered: Vec<&str> = a
            .issued
            .values()
            .flatten()
            .map(|k| k.key_id.as_str())
            .collect();
        assert_eq!(remembered, ["signed_curve25519:x1", "signed_curve25519:x2"]);
        assert!(snaps[2].fallback_keys.values().all(|f| f.used));

        // Claim order survives: (sequence, key ID).
        let target = ClaimTarget::one(device("A"), alg.parse().unwrap());
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        let out = ops::claim(&conn, &[target], true).unwrap();
        assert_eq!(out.keys[0].key_id.as_str(), "signed_curve25519:k2");
        assert_eq!(out.keys[0].key_json, json("k2"));
        // A remembered key is still refused on re-upload (R3.4); a new key
        // gets a sequence number past the migrated ones.
        let up = Upload::from_keys(
            device("A"),
            [
                (KeyId::parse("signed_curve25519:x1").unwrap(), json("x1")),
                (KeyId::parse("signed_curve25519:new").unwrap(), json("new")),
            ],
            [],
        )
        .unwrap();
        let outcome = ops::upload(&conn, &up, &limits).unwrap();
        assert_eq!(outcome.counts.total(), 3, "k3, k1 and new; not x1");
        conn.execute_batch("COMMIT").unwrap();
        let snap = ops::export_devices(&conn, None, 1, &limits)
            .unwrap()
            .remove(0);
        let last = snap.one_time_keys.last().unwrap();
        assert_eq!(last.key_id.as_str(), "signed_curve25519:new");
        assert_eq!(last.seq, 10);
    }
}
