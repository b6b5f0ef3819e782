//! Synapse's SQLite database, opened read-only; every query runs on the
//! blocking pool.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use keyclaim::transfer::{SourceFallback, SourceOtk, SourceRow};
use keyclaim::{Error, Result};
use parking_lot::Mutex;
use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, ErrorCode, OpenFlags, Row, params_from_iter};

use super::sql::{FALLBACK_TABLE, OTK_TABLE, Queries};
use crate::blocking::blocking;
use crate::merge::{KeyTables, Position};

const SOURCE: &str = "synapse-sqlite";

fn sqlite(op: &'static str) -> impl Fn(rusqlite::Error) -> Error {
    move |e| {
        let retryable = matches!(
            e.sqlite_error_code(),
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
        );
        Error::storage(SOURCE, op, retryable, e)
    }
}

/// The database: one read-only connection (reads are sequential).
pub(super) struct SqliteTables {
    conn: Arc<Mutex<Connection>>,
    queries: Arc<Queries>,
}

impl SqliteTables {
    /// Opens `path` read-only (never creating it) and checks that it holds
    /// Synapse's key tables.
    pub(super) async fn open(path: &Path) -> Result<Self> {
        let path: PathBuf = path.to_owned();
        let conn = blocking(SOURCE, "open", move || {
            let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
            let conn = Connection::open_with_flags(&path, flags).map_err(sqlite("open"))?;
            for table in [OTK_TABLE, FALLBACK_TABLE] {
                let found: i64 = conn
                    .query_row(
                        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                        [table],
                        |r| r.get(0),
                    )
                    .map_err(sqlite("open"))?;
                if found == 0 {
                    return Err(Error::invalid_config(format!(
                        "{}: no table {table}; not a Synapse database?",
                        path.display()
                    )));
                }
            }
            Ok(conn)
        })
        .await?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            queries: Arc::new(Queries::new(|n| format!("?{n}"), "")),
        })
    }

    async fn page(
        &self,
        otk: bool,
        at: &Position,
        limit: usize,
        read: fn(&Row<'_>) -> rusqlite::Result<SourceRow>,
    ) -> Result<Vec<SourceRow>> {
        let conn = Arc::clone(&self.conn);
        let queries = Arc::clone(&self.queries);
        let at = at.clone();
        blocking(SOURCE, "read", move || {
            let sql = if otk {
                queries.otk(&at)
            } else {
                queries.fallback(&at)
            };
            let mut params: Vec<Value> = at
                .values()
                .into_iter()
                .map(|v| Value::Text(v.to_owned()))
                .collect();
            params.push(Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));
            let conn = conn.lock();
            let mut stmt = conn.prepare_cached(sql).map_err(sqlite("read"))?;
            let rows = stmt
                .query_map(params_from_iter(params), read)
                .map_err(sqlite("read"))?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
                .map_err(sqlite("read"))
        })
        .await
    }
}

fn read_otk(r: &Row<'_>) -> rusqlite::Result<SourceRow> {
    Ok(SourceRow::OneTimeKey(SourceOtk {
        user_id: r.get(0)?,
        device_id: r.get(1)?,
        algorithm: r.get(2)?,
        key_id: r.get(3)?,
        ts_added_ms: r.get(4)?,
        key_json: r.get(5)?,
    }))
}

fn read_fallback(r: &Row<'_>) -> rusqlite::Result<SourceRow> {
    // Synapse writes Python booleans, which SQLite keeps as 0 and 1.
    let used = match r.get_ref(5)? {
        ValueRef::Integer(n) => n != 0,
        ValueRef::Text(t) => matches!(t, b"1" | b"t" | b"true" | b"TRUE"),
        other => {
            return Err(rusqlite::Error::InvalidColumnType(
                5,
                "used".into(),
                other.data_type(),
            ));
        }
    };
    Ok(SourceRow::Fallback(SourceFallback {
        user_id: r.get(0)?,
        device_id: r.get(1)?,
        algorithm: r.get(2)?,
        key_id: r.get(3)?,
        key_json: r.get(4)?,
        used,
    }))
}

#[async_trait]
impl KeyTables for SqliteTables {
    async fn one_time_keys(&self, at: &Position, limit: usize) -> Result<Vec<SourceRow>> {
        self.page(true, at, limit, read_otk).await
    }

    async fn fallback_keys(&self, at: &Position, limit: usize) -> Result<Vec<SourceRow>> {
        self.page(false, at, limit, read_fallback).await
    }
}
