//! A **baseline** claimer for benchmarks: one transaction per claim target,
//! the pattern of the reference homeserver.
//!
//! For each target it takes a connection from its pool and runs
//! `BEGIN IMMEDIATE; SELECT` the oldest OTK of the device and algorithm;
//! `DELETE` it (and count it down in its `otk_queue` row, so that the store
//! sharing the file stays consistent); `COMMIT` — one synced commit per key. By default the pool
//! holds one connection, as the reference homeserver uses with SQLite
//! (concurrent claims queue for it in the process instead of sleeping in
//! SQLite's busy handler); [`BaselineClaimer::with_max_connections`] allows
//! more (they then contend for the file's write lock). It works on the same
//! file and with the same settings ([`SqliteOptions`]) as a [`SqliteStore`],
//! so the two can be measured side by side. It does less than the store does
//! (no fallback keys, no remembering of issued keys, no change events): it is
//! a yardstick, not a backend. It is public so that the command-line benchmark
//! can reuse it.
//!
//! ```no_run
//! # async fn demo() -> keyclaim::Result<()> {
//! use keyclaim_sqlite::{SqliteOptions, SqliteStore, baseline::BaselineClaimer};
//!
//! let store = SqliteStore::open("/tmp/keys.sqlite").await?; // creates the schema
//! let baseline = BaselineClaimer::open(store.path(), store.options().clone());
//! let device = keyclaim::Device::parse("@alice:example.org", "DEV")?;
//! let claimed = baseline
//!     .claim_one(&device, &keyclaim::Algorithm::signed_curve25519())
//!     .await?;
//! # let _ = claimed;
//! # Ok(())
//! # }
//! ```
//!
//! [`SqliteStore`]: crate::SqliteStore

use std::path::{Path, PathBuf};
use std::sync::Arc;

use keyclaim::transfer::KeyDigest;
use keyclaim::{Algorithm, ClaimTarget, ClaimedKey, Device, Error, KeyId, Result};
use parking_lot::{Condvar, Mutex};
use rusqlite::{Connection, OptionalExtension as _, params};

use crate::error::SqlContext as _;
use crate::schema::{self, Role};
use crate::{BACKEND, SqliteOptions};

const SQL_SELECT_OLDEST: &str = "SELECT k.pos, k.key_id, k.key_json, k.digest \
     FROM otk_queue AS q JOIN one_time_key AS k \
     ON k.user_id = q.user_id AND k.device_id = q.device_id AND k.algorithm = q.algorithm \
     AND k.pos >= q.head \
     WHERE q.user_id = ?1 AND q.device_id = ?2 AND q.algorithm = ?3 AND q.stored > 0 \
     ORDER BY k.pos LIMIT 1";
const SQL_DELETE: &str = "DELETE FROM one_time_key \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3 AND pos = ?4";
const SQL_COUNT_DOWN: &str = "UPDATE otk_queue SET stored = stored - 1 \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3";

/// Claims OTKs one transaction per target. Cheap to clone (shared pool).
///
/// Connections are opened on demand, at most `max_connections` (default 1),
/// and kept in a pool. The file must already hold a keyclaim schema (open a
/// [`SqliteStore`](crate::SqliteStore) on it first).
#[derive(Clone, Debug)]
pub struct BaselineClaimer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    options: SqliteOptions,
    max_connections: usize,
    pool: Mutex<Pool>,
    returned: Condvar,
}

#[derive(Debug, Default)]
struct Pool {
    idle: Vec<Connection>,
    open: usize,
}

impl BaselineClaimer {
    /// A claimer on the file at `path` with one connection, opened with
    /// `options` (durability, busy timeout). Opens nothing yet.
    pub fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Self {
        Self::with_max_connections(path, options, 1)
    }

    /// A claimer that opens up to `max_connections` connections (at least
    /// one), so that that many claims run their transactions at once.
    pub fn with_max_connections(
        path: impl AsRef<Path>,
        options: SqliteOptions,
        max_connections: usize,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                path: path.as_ref().to_owned(),
                options,
                max_connections: max_connections.max(1),
                pool: Mutex::new(Pool::default()),
                returned: Condvar::new(),
            }),
        }
    }

    /// Claims the oldest OTK of one device and algorithm in one transaction,
    /// on the calling thread (it blocks for the commit's sync).
    ///
    /// # Errors
    /// [`Error::Storage`] (retryable when the file stayed busy past the busy
    /// timeout).
    pub fn claim_one_blocking(
        &self,
        device: &Device,
        algorithm: &Algorithm,
    ) -> Result<Option<ClaimedKey>> {
        let conn = self.take_connection()?;
        let result = claim_in_transaction(&conn, device, algorithm);
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        self.give_back(conn);
        result
    }

    /// [`Self::claim_one_blocking`] on tokio's blocking pool.
    ///
    /// # Errors
    /// As [`Self::claim_one_blocking`].
    pub async fn claim_one(
        &self,
        device: &Device,
        algorithm: &Algorithm,
    ) -> Result<Option<ClaimedKey>> {
        let this = self.clone();
        let (device, algorithm) = (device.clone(), algorithm.clone());
        tokio::task::spawn_blocking(move || this.claim_one_blocking(&device, &algorithm))
            .await
            .map_err(|e| Error::storage(BACKEND, "baseline_claim", false, e))?
    }

    /// Claims one key per target (the count is ignored), one transaction per
    /// target, in order, on tokio's blocking pool.
    ///
    /// # Errors
    /// As [`Self::claim_one_blocking`]; keys claimed by earlier targets stay
    /// claimed.
    pub async fn claim(&self, targets: &[ClaimTarget]) -> Result<Vec<ClaimedKey>> {
        let this = self.clone();
        let targets = targets.to_vec();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for t in &targets {
                out.extend(this.claim_one_blocking(&t.device, &t.algorithm)?);
            }
            Ok(out)
        })
        .await
        .map_err(|e| Error::storage(BACKEND, "baseline_claim", false, e))?
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
                let opened =
                    schema::open_connection(&self.inner.path, &self.inner.options, Role::Writer);
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

fn claim_in_transaction(
    conn: &Connection,
    device: &Device,
    algorithm: &Algorithm,
) -> Result<Option<ClaimedKey>> {
    const OP: &str = "baseline_claim";
    conn.prepare_cached("BEGIN IMMEDIATE")
        .ctx(OP)?
        .execute([])
        .ctx(OP)?;
    let p = (
        device.user_id.as_str(),
        device.device_id.as_str(),
        algorithm.as_str(),
    );
    let row: Option<(i64, String, String, Vec<u8>)> = conn
        .prepare_cached(SQL_SELECT_OLDEST)
        .ctx(OP)?
        .query_row(params![p.0, p.1, p.2], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()
        .ctx(OP)?;
    let claimed = match row {
        Some((pos, key_id, json, digest)) => {
            conn.prepare_cached(SQL_DELETE)
                .ctx(OP)?
                .execute(params![p.0, p.1, p.2, pos])
                .ctx(OP)?;
            conn.prepare_cached(SQL_COUNT_DOWN)
                .ctx(OP)?
                .execute(params![p.0, p.1, p.2])
                .ctx(OP)?;
            Some(ClaimedKey {
                device: device.clone(),
                key_id: KeyId::parse(key_id)?,
                key_json: keyclaim::backend::decode::key_json_with_digest(
                    json,
                    KeyDigest::from_slice(&digest)?,
                )?,
                fallback: false,
            })
        }
        None => None,
    };
    conn.prepare_cached("COMMIT").ctx(OP)?.execute([]).ctx(OP)?;
    Ok(claimed)
}
