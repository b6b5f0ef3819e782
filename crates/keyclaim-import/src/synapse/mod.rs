//! Synapse's database: the tables `e2e_one_time_keys_json` (`user_id`,
//! `device_id`, `algorithm`, `key_id`, `ts_added_ms`, `key_json`) and
//! `e2e_fallback_keys_json` (`user_id`, `device_id`, `algorithm`, `key_id`,
//! `key_json`, `used`), as created by Synapse's schema
//! (`synapse/storage/schema/main/delta/21/end_to_end_keys.sql`,
//! `synapse/storage/schema/main/delta/58/11fallback.sql`) and written by
//! `synapse/storage/databases/main/end_to_end_keys.py`.
//!
//! The source is only read: SQLite is opened read-only, PostgreSQL sessions
//! are set to read-only transactions.

mod postgres;
mod sql;
mod sqlite;

use std::path::Path;

use keyclaim::{KeyStore, Result};

use crate::run::{ImportOptions, ImportReport, run};

/// Imports every device's one-time and fallback keys from a Synapse SQLite
/// database file (opened read-only) into `store`, then checks the target
/// and compares per-device counts with the source.
///
/// # Errors
/// [`keyclaim::Error::InvalidConfig`] when the file is not a Synapse
/// database (no key tables); the source's, the store's and the checkpoint
/// file's errors. What was imported before an error stays, and the
/// checkpoint (if any) says where a new run resumes.
pub async fn import_sqlite<S: KeyStore + ?Sized>(
    path: impl AsRef<Path>,
    store: &S,
    options: &ImportOptions,
) -> Result<ImportReport> {
    let tables = sqlite::SqliteTables::open(path.as_ref()).await?;
    run(&tables, store, options).await
}

/// Imports every device's one-time and fallback keys from a Synapse
/// PostgreSQL database (a libpq URL or key=value string, without TLS) into
/// `store`, then checks the target and compares per-device counts with the
/// source. The session only runs read-only transactions.
///
/// # Errors
/// As [`import_sqlite`], and the connection's errors.
pub async fn import_postgres<S: KeyStore + ?Sized>(
    url: &str,
    store: &S,
    options: &ImportOptions,
) -> Result<ImportReport> {
    let tables = postgres::PostgresTables::connect(url).await?;
    run(&tables, store, options).await
}
