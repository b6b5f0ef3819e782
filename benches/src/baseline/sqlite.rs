//! The SQLite baseline: one transaction per claim, the pattern of the
//! reference homeserver on SQLite.
//!
//! Each claim takes a connection from the baseline's pool and runs
//! `BEGIN IMMEDIATE; SELECT` the oldest key of the device and algorithm;
//! `DELETE` it; `COMMIT` — one synced commit per key. By default the pool
//! holds one connection, as the reference homeserver uses with SQLite
//! (concurrent claims queue for it in the process instead of sleeping in
//! SQLite's busy handler, which would flatter keyclaim's ratio);
//! [`SqliteBaseline::open_with_connections`] allows more (they then contend
//! for the file's write lock).
//!
//! The keys live in a file of the baseline's own, in WAL mode, committed
//! with `synchronous = FULL` (every commit synced, as the store's default)
//! or `NORMAL`, as the store under comparison commits, in one table modeled
//! on the reference homeserver's:
//!
//! ```sql
//! e2e_one_time_keys_json (seq, user_id, device_id, algorithm, key_id, key_json)
//!     UNIQUE (user_id, device_id, algorithm, key_id)
//!     INDEX (user_id, device_id, algorithm, seq)
//! ```
//!
//! `seq` (the row ID, in upload order) stands in for the reference
//! homeserver's `ts_added_ms`, so that two uploads within one millisecond
//! keep their order.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keyclaim::{Algorithm, ClaimedKey, Device, Error, KeyId, KeyJson, Result};
use parking_lot::{Condvar, Mutex};
use rusqlite::{Connection, OpenFlags, OptionalExtension as _, params};

use super::Baseline;

const NAME: &str = "sqlite-baseline";

/// How long a connection waits for another's write lock (only reached with
/// more than one connection).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

const SQL_CREATE: &str = create_e2e_one_time_keys_json!("INTEGER PRIMARY KEY");
const SQL_INSERT: &str = "INSERT OR IGNORE INTO e2e_one_time_keys_json \
     (user_id, device_id, algorithm, key_id, key_json) VALUES (?1, ?2, ?3, ?4, ?5)";
const SQL_SELECT_OLDEST: &str = "SELECT key_id, key_json FROM e2e_one_time_keys_json \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3 ORDER BY seq LIMIT 1";
const SQL_COUNT: &str = "SELECT count(*) FROM e2e_one_time_keys_json \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3";
const SQL_DELETE: &str = "DELETE FROM e2e_one_time_keys_json \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3 AND key_id = ?4";

/// The one-transaction-per-claim baseline on a SQLite file of its own (see
/// the module docs). Cheap to clone (shared pool).
#[derive(Clone, Debug)]
pub struct SqliteBaseline {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    full_sync: bool,
    max_connections: usize,
    pool: Mutex<Pool>,
    returned: Condvar,
}

#[derive(Debug, Default)]
struct Pool {
    idle: Vec<Connection>,
    open: usize,
}

impl SqliteBaseline {
    /// Opens (or creates) the baseline's file at `path`, with one
    /// connection. `full_sync`: commits with `synchronous = FULL` (each
    /// synced before it returns), else `NORMAL`.
    ///
    /// # Errors
    /// [`Error::Storage`] when the file cannot be opened or its table not
    /// created.
    pub async fn open(path: impl AsRef<Path>, full_sync: bool) -> Result<Self> {
        Self::open_with_connections(path, full_sync, 1).await
    }

    /// [`Self::open`] with up to `max_connections` connections (at least
    /// one), so that that many claims run their transactions at once.
    ///
    /// # Errors
    /// As [`Self::open`].
    pub async fn open_with_connections(
        path: impl AsRef<Path>,
        full_sync: bool,
        max_connections: usize,
    ) -> Result<Self> {
        let this = Self {
            inner: Arc::new(Inner {
                path: path.as_ref().to_owned(),
                full_sync,
                max_connections: max_connections.max(1),
                pool: Mutex::new(Pool::default()),
                returned: Condvar::new(),
            }),
        };
        let init = this.clone();
        blocking("open", move || {
            let conn = init.take_connection()?;
            let created = conn.execute_batch(SQL_CREATE).map_err(storage("open"));
            init.give_back(conn);
            created
        })
        .await?;
        Ok(this)
    }

    /// The baseline's file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Claims the oldest key of one device and algorithm in one
    /// transaction, on the calling thread (it blocks for the commit's sync).
    ///
    /// # Errors
    /// As [`Baseline::claim_one`] (retryable when the file stayed busy past
    /// the busy timeout).
    pub fn claim_one_blocking(
        &self,
        device: &Device,
        algorithm: &Algorithm,
    ) -> Result<Option<ClaimedKey>> {
        self.in_transaction("claim", |conn| {
            let p = (
                device.user_id.as_str(),
                device.device_id.as_str(),
                algorithm.as_str(),
            );
            let row: Option<(String, String)> = conn
                .prepare_cached(SQL_SELECT_OLDEST)?
                .query_row(params![p.0, p.1, p.2], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            if let Some((key_id, _)) = &row {
                conn.prepare_cached(SQL_DELETE)?
                    .execute(params![p.0, p.1, p.2, key_id])?;
            }
            Ok(row)
        })?
        .map(|(key_id, json)| {
            super::claimed(device.clone(), &format!("{algorithm}:{key_id}"), &json)
        })
        .transpose()
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction on a pooled
    /// connection; commits if it succeeds, rolls back otherwise.
    fn in_transaction<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T> {
        let conn = self.take_connection()?;
        let result = conn
            .prepare_cached("BEGIN IMMEDIATE")
            .and_then(|mut s| s.execute([]))
            .and_then(|_| f(&conn))
            .and_then(|value| {
                conn.prepare_cached("COMMIT")?.execute([])?;
                Ok(value)
            });
        if !conn.is_autocommit() {
            // Best effort: the error to report is the transaction's.
            let _ = conn.execute_batch("ROLLBACK");
        }
        self.give_back(conn);
        result.map_err(storage(op))
    }

    fn take_connection(&self) -> Result<Connection> {
        let mut pool = self.inner.pool.lock();
        loop {
            if let Some(conn) = pool.idle.pop() {
                return Ok(conn);
            }
            if pool.open < self.inner.max_connections {
                pool.open += 1;
                drop(pool);
                let opened = open_connection(&self.inner.path, self.inner.full_sync);
                if opened.is_err() {
                    self.inner.pool.lock().open -= 1;
                    self.inner.returned.notify_one();
                }
                return opened;
            }
            self.inner.returned.wait(&mut pool);
        }
    }

    fn give_back(&self, conn: Connection) {
        self.inner.pool.lock().idle.push(conn);
        self.inner.returned.notify_one();
    }
}

#[async_trait]
impl Baseline for SqliteBaseline {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn upload(&self, device: &Device, keys: &[(KeyId, KeyJson)]) -> Result<()> {
        let this = self.clone();
        let device = device.clone();
        let rows = super::rows(keys);
        blocking("upload", move || {
            this.in_transaction("upload", |conn| {
                let mut insert = conn.prepare_cached(SQL_INSERT)?;
                for (algorithm, key_id, json) in &rows {
                    insert.execute(params![
                        device.user_id.as_str(),
                        device.device_id.as_str(),
                        algorithm,
                        key_id,
                        json
                    ])?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn claim_one(
        &self,
        device: &Device,
        algorithm: &Algorithm,
    ) -> Result<Option<ClaimedKey>> {
        let this = self.clone();
        let (device, algorithm) = (device.clone(), algorithm.clone());
        blocking("claim", move || {
            this.claim_one_blocking(&device, &algorithm)
        })
        .await
    }

    async fn count(&self, device: &Device, algorithm: &Algorithm) -> Result<u64> {
        let this = self.clone();
        let (device, algorithm) = (device.clone(), algorithm.clone());
        blocking("count", move || {
            let conn = this.take_connection()?;
            let n = conn.prepare_cached(SQL_COUNT).and_then(|mut s| {
                s.query_row(
                    params![
                        device.user_id.as_str(),
                        device.device_id.as_str(),
                        algorithm.as_str()
                    ],
                    |r| r.get::<_, i64>(0),
                )
            });
            this.give_back(conn);
            Ok(u64::try_from(n.map_err(storage("count"))?).unwrap_or(0))
        })
        .await
    }
}

/// Opens one connection: WAL mode, `synchronous = FULL` or `NORMAL`,
/// statements cached.
fn open_connection(path: &Path, full_sync: bool) -> Result<Connection> {
    let open = storage("open");
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(open)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open)?;
    conn.set_prepared_statement_cache_capacity(16);
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(open)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::storage(
            NAME,
            "open",
            false,
            format!("the file refuses WAL mode (journal_mode is {mode})"),
        ));
    }
    let synchronous = if full_sync { "FULL" } else { "NORMAL" };
    conn.pragma_update(None, "synchronous", synchronous)
        .map_err(open)?;
    Ok(conn)
}

/// Runs `f` on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    op: &'static str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    super::on_blocking_pool(NAME, op, f).await
}

/// Maps a SQLite error to [`Error::Storage`], retryable when the file was
/// busy or locked.
fn storage(op: &'static str) -> impl Fn(rusqlite::Error) -> Error + Copy {
    move |e| {
        let retryable = matches!(
            e.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        );
        Error::storage(NAME, op, retryable, e)
    }
}
