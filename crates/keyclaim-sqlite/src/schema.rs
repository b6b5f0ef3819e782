//! The file's layout, its migrations (`PRAGMA user_version`), and how a
//! connection is opened and tuned.
//!
//! # Tables
//!
//! - `otk`: one row per stored one-time key, with its upload sequence number
//!   (R3.5). The index `otk_claim_order` on (user, device, algorithm, seq,
//!   key ID) is the claim order (R4.2) and also answers the per-device counts
//!   without touching the table (R6.4); `otk_key_id` finds a stored key by ID
//!   for the retry and conflict checks (R3.2).
//! - `fallback_key`: at most one row per (device, algorithm), with its `used`
//!   flag (R4.4, R5.1); `fallback_unused` answers the unused fallback types
//!   from the index alone (R6.3, R6.4).
//! - `issued_key`: the remembered issued OTKs (R3.4), numbered per (device,
//!   algorithm) in issue order `n` so that pruning to the newest
//!   [`Limits::remembered_issued_keys`](keyclaim::Limits) is one range delete.
//! - `store_meta`: the store-wide upload sequence counter. It lives in the
//!   file, is read and incremented inside the write transaction, and so stays
//!   monotonic across processes and restarts (R3.5: never a wall clock).
//!
//! Every text column uses SQLite's `BINARY` collation (memcmp of the UTF-8
//! bytes), which is the byte order the contract asks for (R2.7).

use std::path::Path;
use std::time::Duration;

use keyclaim::{Error, Result};
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags};

use crate::ops::{BACKEND, SqlContext as _};
use crate::{SqliteOptions, Synchronous};

/// The newest schema version this build knows. A file with a higher
/// `PRAGMA user_version` is refused with [`Error::UnsupportedVersion`].
pub const SCHEMA_VERSION: i64 = 1;

/// `PRAGMA application_id` of a keyclaim file ("kclm"), so that a file of
/// another application is not taken for an empty store.
pub const APPLICATION_ID: i64 = 0x6b63_6c6d;

/// With the background checkpointer on, the writer still checkpoints by
/// itself once the WAL holds this many pages (about 32 MiB).
const BACKSTOP_CHECKPOINT_PAGES: i64 = 8192;

/// Migration `i` brings a file from version `i` to version `i + 1`.
const MIGRATIONS: &[&str] = &[
    // Version 1: the initial layout.
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
];

/// Which job a connection has; decides its flags and pragmas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// The one connection that writes (the writer thread, or a baseline
    /// connection); may create the file.
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
    conn.busy_timeout(options.busy_timeout).ctx("open")?;
    conn.set_prepared_statement_cache_capacity(64);
    // Every statement is prepared once and cached. Without the query planner
    // stability guarantee, SQLite (built with STAT4) re-prepares a cached
    // statement whenever a new value is bound to a parameter in a range
    // constraint (`n <= ?`, `LIMIT ?`), which cost more than running it.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .ctx("open")?;
    let synchronous = match options.synchronous {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", synchronous)
        .ctx("open")?;
    conn.pragma_update(None, "foreign_keys", false)
        .ctx("open")?;
    match role {
        Role::Reader => conn.pragma_update(None, "query_only", true).ctx("open")?,
        Role::Writer if options.checkpoint_interval.is_some() => {
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
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(start) {
        conn.execute_batch(sql).ctx("migrate")?;
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
            Ok(mode) => {
                return Err(Error::storage(
                    BACKEND,
                    "open",
                    false,
                    format!("the file refuses WAL mode (journal_mode is {mode})"),
                ));
            }
            Err(e) if crate::ops::is_busy(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(crate::ops::sql_error("open", e)),
        }
    }
}
