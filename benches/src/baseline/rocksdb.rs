//! The RocksDB baseline: how the conduwuit family of homeservers (conduit,
//! conduwuit, tuwunel, continuwuity) claims one-time keys from RocksDB
//! today.
//!
//! Their `onetimekeyid_onetimekeys` map holds one row per key under
//! `user 0xff device 0xff algorithm ":" key ID`; a claim reads the first
//! key of the device's `user 0xff device 0xff algorithm ":"` prefix and
//! deletes it, with no lock between the read and the delete. So
//! [`RocksBaseline`] has no writer thread, no group commit and no lock:
//! every claim of a key is a prefix seek and one synced write of its own
//! (`WriteOptions::set_sync(true)`, as keyclaim's durable default), on
//! tokio's blocking pool. Two concurrent claims of one device can read the
//! same first key and both hand it out: this is the pattern keyclaim exists
//! to replace; the benchmark only measures its speed (its races use
//! distinct devices per claimer, where it is correct).
//!
//! The keys live in a database of the baseline's own, in its default
//! column family; a key's row is `user 0xff device 0xff key ID` (the key ID
//! starts with its algorithm) to its canonical JSON. The order is key ID
//! order, as in those homeservers, not upload order.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use keyclaim::{Algorithm, ClaimedKey, Device, Error, KeyId, KeyJson, Result};
use rocksdb::{DB, Direction, IteratorMode, WriteBatch, WriteOptions};

use super::Baseline;

const NAME: &str = "rocksdb-baseline";

/// A row: its key and value.
type Row = (Vec<u8>, Vec<u8>);

/// The read-first-then-delete baseline on a RocksDB database of its own
/// (see the module docs). Cheap to clone (shared database handle).
#[derive(Clone, Debug)]
pub struct RocksBaseline {
    db: Arc<DB>,
    path: PathBuf,
}

/// `user 0xff device 0xff`, then what follows.
fn prefix(device: &Device, rest: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(device.user_id.as_str().len() + rest.len() + 32);
    key.extend_from_slice(device.user_id.as_str().as_bytes());
    key.push(0xff);
    key.extend_from_slice(device.device_id.as_str().as_bytes());
    key.push(0xff);
    key.extend_from_slice(rest.as_bytes());
    key
}

fn synced() -> WriteOptions {
    let mut options = WriteOptions::default();
    options.set_sync(true);
    options
}

impl RocksBaseline {
    /// Opens (or creates) the baseline's database in the directory `path`.
    ///
    /// # Errors
    /// [`Error::Storage`] when the database cannot be opened (also when
    /// another handle has it open).
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_owned();
        let dir = path.clone();
        let db = blocking("open", move || {
            let mut options = rocksdb::Options::default();
            options.create_if_missing(true);
            DB::open(&options, &dir)
        })
        .await?;
        Ok(Self {
            db: Arc::new(db),
            path,
        })
    }

    /// The baseline's database directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The first row of `prefix` and its value, if any.
    fn first(db: &DB, prefix: &[u8]) -> std::result::Result<Option<Row>, rocksdb::Error> {
        let mut iter = db.iterator(IteratorMode::From(prefix, Direction::Forward));
        match iter.next() {
            Some(Ok((key, value))) if key.starts_with(prefix) => {
                Ok(Some((key.to_vec(), value.to_vec())))
            }
            Some(Err(e)) => Err(e),
            _ => Ok(None),
        }
    }
}

#[async_trait]
impl Baseline for RocksBaseline {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn upload(&self, device: &Device, keys: &[(KeyId, KeyJson)]) -> Result<()> {
        let db = Arc::clone(&self.db);
        let rows: Vec<(Vec<u8>, String)> = keys
            .iter()
            .map(|(id, json)| (prefix(device, id.as_str()), json.canonical().to_owned()))
            .collect();
        blocking("upload", move || {
            let mut batch = WriteBatch::default();
            for (key, json) in &rows {
                // The uniqueness of a key ID: a key the device holds stays.
                if db.get_pinned(key)?.is_none() {
                    batch.put(key, json);
                }
            }
            db.write_opt(batch, &synced())
        })
        .await
    }

    async fn claim_one(
        &self,
        device: &Device,
        algorithm: &Algorithm,
    ) -> Result<Option<ClaimedKey>> {
        let db = Arc::clone(&self.db);
        let start = prefix(device, &format!("{algorithm}:"));
        let row = blocking("claim", move || {
            let first = Self::first(&db, &start)?;
            if let Some((key, _)) = &first {
                db.delete_opt(key, &synced())?;
            }
            Ok(first)
        })
        .await?;
        let Some((key, json)) = row else {
            return Ok(None);
        };
        let head = prefix(device, "").len();
        let key_id = std::str::from_utf8(&key[head..])
            .map_err(|e| Error::corrupt(format!("{NAME}: stored key ID: {e}")))?;
        let json = std::str::from_utf8(&json)
            .map_err(|e| Error::corrupt(format!("{NAME}: stored key JSON: {e}")))?;
        super::claimed(device.clone(), key_id, json).map(Some)
    }

    async fn count(&self, device: &Device, algorithm: &Algorithm) -> Result<u64> {
        let db = Arc::clone(&self.db);
        let start = prefix(device, &format!("{algorithm}:"));
        blocking("count", move || {
            let mut n = 0;
            for item in db.iterator(IteratorMode::From(&start, Direction::Forward)) {
                let (key, _) = item?;
                if !key.starts_with(&start) {
                    break;
                }
                n += 1;
            }
            Ok(n)
        })
        .await
    }
}

/// Runs `f` on tokio's blocking pool; RocksDB's errors become
/// [`Error::Storage`].
async fn blocking<T: Send + 'static>(
    op: &'static str,
    f: impl FnOnce() -> std::result::Result<T, rocksdb::Error> + Send + 'static,
) -> Result<T> {
    super::on_blocking_pool(NAME, op, move || {
        f().map_err(|e| Error::storage(NAME, op, true, e))
    })
    .await
}
