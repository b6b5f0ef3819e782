//! Synapse's PostgreSQL database, through one session that only runs
//! read-only transactions.

use async_trait::async_trait;
use keyclaim::transfer::{SourceFallback, SourceOtk, SourceRow};
use keyclaim::{Error, Result};
use tokio::task::JoinHandle;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row, Statement};

use super::sql::{FALLBACK_TABLE, OTK_TABLE, Queries};
use crate::merge::{KeyTables, Position};

const SOURCE: &str = "synapse-postgres";

fn pg(op: &'static str) -> impl Fn(tokio_postgres::Error) -> Error {
    move |e| {
        let retryable = e.is_closed();
        Error::storage(SOURCE, op, retryable, e)
    }
}

/// The database: one connection and the six prepared queries.
pub(super) struct PostgresTables {
    client: Client,
    connection: JoinHandle<()>,
    otk: [Statement; 3],
    fallback: [Statement; 3],
}

impl Drop for PostgresTables {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl PostgresTables {
    /// Connects, makes the session read-only, checks that the key tables
    /// are there (in the session's search path) and prepares the queries.
    pub(super) async fn connect(url: &str) -> Result<Self> {
        let (client, connection) = tokio_postgres::connect(url, NoTls)
            .await
            .map_err(pg("connect"))?;
        let connection = tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::warn!(%error, "connection to the Synapse database ended");
            }
        });
        // Every transaction of this session is read-only: the source cannot
        // be changed through it.
        client
            .batch_execute("SET default_transaction_read_only = on")
            .await
            .map_err(pg("connect"))?;
        let row = client
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL, to_regclass($2) IS NOT NULL, \
                 (SELECT datcollate FROM pg_database WHERE datname = current_database())",
                &[&OTK_TABLE, &FALLBACK_TABLE],
            )
            .await
            .map_err(pg("connect"))?;
        let (otks, fallbacks, collation): (bool, bool, String) = (
            row.try_get(0).map_err(pg("connect"))?,
            row.try_get(1).map_err(pg("connect"))?,
            row.try_get(2).map_err(pg("connect"))?,
        );
        for (found, table) in [(otks, OTK_TABLE), (fallbacks, FALLBACK_TABLE)] {
            if !found {
                return Err(Error::invalid_config(format!(
                    "no table {table} in the database's search path; not a Synapse database?"
                )));
            }
        }
        // Synapse requires a database with C collation, where the default
        // order is already byte order and the indexes serve the queries; on
        // any other, order by bytes explicitly (R2.7).
        let collate = if matches!(collation.as_str(), "C" | "POSIX") {
            ""
        } else {
            " COLLATE \"C\""
        };
        let queries = Queries::new(|n| format!("${n}"), collate);
        let positions = [
            Position::Start,
            Position::AfterDevice(String::new(), String::new()),
            Position::AfterOtk(String::new(), String::new(), String::new(), String::new()),
        ];
        let mut otk = Vec::with_capacity(3);
        let mut fallback = Vec::with_capacity(3);
        for at in &positions {
            otk.push(
                client
                    .prepare(queries.otk(at))
                    .await
                    .map_err(pg("prepare"))?,
            );
            fallback.push(
                client
                    .prepare(queries.fallback(at))
                    .await
                    .map_err(pg("prepare"))?,
            );
        }
        let three = |v: Vec<Statement>| {
            <[Statement; 3]>::try_from(v)
                .map_err(|_| Error::invalid_config("three queries per table expected"))
        };
        Ok(Self {
            client,
            connection,
            otk: three(otk)?,
            fallback: three(fallback)?,
        })
    }

    async fn page(
        &self,
        statements: &[Statement; 3],
        at: &Position,
        limit: usize,
        read: fn(&Row) -> std::result::Result<SourceRow, tokio_postgres::Error>,
    ) -> Result<Vec<SourceRow>> {
        let statement = match at {
            Position::Start => &statements[0],
            Position::AfterDevice(..) => &statements[1],
            Position::AfterOtk(..) | Position::AfterFallback(..) => &statements[2],
        };
        let values = at.values();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut params: Vec<&(dyn ToSql + Sync)> =
            values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        params.push(&limit);
        let rows = self
            .client
            .query(statement, &params)
            .await
            .map_err(pg("read"))?;
        rows.iter().map(|r| read(r).map_err(pg("read"))).collect()
    }
}

fn read_otk(r: &Row) -> std::result::Result<SourceRow, tokio_postgres::Error> {
    Ok(SourceRow::OneTimeKey(SourceOtk {
        user_id: r.try_get(0)?,
        device_id: r.try_get(1)?,
        algorithm: r.try_get(2)?,
        key_id: r.try_get(3)?,
        ts_added_ms: r.try_get(4)?,
        key_json: r.try_get(5)?,
    }))
}

fn read_fallback(r: &Row) -> std::result::Result<SourceRow, tokio_postgres::Error> {
    Ok(SourceRow::Fallback(SourceFallback {
        user_id: r.try_get(0)?,
        device_id: r.try_get(1)?,
        algorithm: r.try_get(2)?,
        key_id: r.try_get(3)?,
        key_json: r.try_get(4)?,
        used: r.try_get(5)?,
    }))
}

#[async_trait]
impl KeyTables for PostgresTables {
    async fn one_time_keys(&self, at: &Position, limit: usize) -> Result<Vec<SourceRow>> {
        self.page(&self.otk, at, limit, read_otk).await
    }

    async fn fallback_keys(&self, at: &Position, limit: usize) -> Result<Vec<SourceRow>> {
        self.page(&self.fallback, at, limit, read_fallback).await
    }
}
