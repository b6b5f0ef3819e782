//! [`RocksEngine`]: the [`KvEngine`] adapter over a RocksDB database, one
//! column family per key space.

use std::fmt;
use std::sync::Arc;

use keyclaim_kv::{BatchOp, EngineError, EngineResult, KvEngine, Space, Visitor, WriteBatch};
use rocksdb::{BoundColumnFamily, DB, ReadOptions, WriteOptions};

/// A [`KvEngine`] over a shared RocksDB database: each [`Space`] is a
/// column family of its own (names from
/// [`RocksOptions`](crate::RocksOptions)), a batch is one RocksDB write
/// batch across them (atomic, and with `durable` a synced write-ahead log
/// write), scans are forward iterations in RocksDB's default bytewise
/// order.
///
/// The column families must exist ([`RocksEngine::new`] creates them).
/// Every method is blocking; [`KvStore`](keyclaim_kv::KvStore) calls them
/// from its writer thread and from tokio's blocking pool.
pub struct RocksEngine {
    db: Arc<DB>,
    names: [String; Space::COUNT],
}

impl fmt::Debug for RocksEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RocksEngine")
            .field("path", &self.db.path())
            .field("column_families", &self.names)
            .finish()
    }
}

impl RocksEngine {
    /// An engine over `db` with the column families `names` (indexed by
    /// [`Space::index`]), creating those that do not exist yet with
    /// default options. Blocking.
    ///
    /// # Errors
    /// When RocksDB fails to create a column family.
    pub fn new(db: Arc<DB>, names: [String; Space::COUNT]) -> EngineResult<RocksEngine> {
        for name in &names {
            if db.cf_handle(name).is_some() {
                continue;
            }
            if let Err(e) = db.create_cf(name, &rocksdb::Options::default()) {
                // Another opener may have created it in the meantime.
                if db.cf_handle(name).is_none() {
                    return Err(EngineError::new(e));
                }
            }
        }
        Ok(RocksEngine { db, names })
    }

    /// The database.
    pub fn db(&self) -> &Arc<DB> {
        &self.db
    }

    /// The column family that holds `space`.
    pub fn column_family_name(&self, space: Space) -> &str {
        &self.names[space.index()]
    }

    fn cf(&self, space: Space) -> EngineResult<Arc<BoundColumnFamily<'_>>> {
        let name = self.column_family_name(space);
        self.db.cf_handle(name).ok_or_else(|| {
            EngineError::new(format!(
                "the column family {name} of keyclaim's {space} space was dropped"
            ))
        })
    }
}

impl KvEngine for RocksEngine {
    fn get(&self, space: Space, key: &[u8]) -> EngineResult<Option<Vec<u8>>> {
        let cf = self.cf(space)?;
        self.db.get_cf(&cf, key).map_err(EngineError::new)
    }

    fn get_many(&self, space: Space, keys: &[&[u8]]) -> EngineResult<Vec<Option<Vec<u8>>>> {
        let cf = self.cf(space)?;
        self.db
            .batched_multi_get_cf(&cf, keys.iter().copied(), false)
            .into_iter()
            .map(|value| {
                value
                    .map(|v| v.map(|v| v.to_vec()))
                    .map_err(EngineError::new)
            })
            .collect()
    }

    fn scan(
        &self,
        space: Space,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut Visitor<'_>,
    ) -> EngineResult<()> {
        if end.is_some_and(|end| end <= start) {
            return Ok(());
        }
        let cf = self.cf(space)?;
        let mut read = ReadOptions::default();
        if let Some(end) = end {
            read.set_iterate_upper_bound(end);
        }
        let mut iter = self.db.raw_iterator_cf_opt(&cf, read);
        iter.seek(start);
        while let Some((key, value)) = iter.item() {
            if visit(key, value).is_break() {
                return Ok(());
            }
            iter.next();
        }
        iter.status().map_err(EngineError::new)
    }

    fn write(&self, batch: &WriteBatch, durable: bool) -> EngineResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut cfs = Vec::with_capacity(Space::COUNT);
        for space in Space::ALL {
            cfs.push(self.cf(space)?);
        }
        let mut rocks = rocksdb::WriteBatch::default();
        for op in batch.ops() {
            match op {
                BatchOp::Put { space, key, value } => {
                    rocks.put_cf(&cfs[space.index()], key, value);
                }
                BatchOp::Delete { space, key } => rocks.delete_cf(&cfs[space.index()], key),
            }
        }
        let mut options = WriteOptions::default();
        options.set_sync(durable);
        self.db.write_opt(rocks, &options).map_err(EngineError::new)
    }
}
