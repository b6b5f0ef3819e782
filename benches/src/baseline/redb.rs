//! The redb baseline: the reference homeserver's pattern on a redb file.
//!
//! [`RedbBaseline`] has no writer thread and no group commit. Every upload
//! and every claim runs its own write transaction on tokio's blocking pool,
//! and a claim takes **one write transaction per key**, committed (with its
//! fsync: redb's default `Durability::Immediate`, as the store's default)
//! before the next begins. Concurrent callers queue on redb's single write
//! lock.
//!
//! The keys live in a file of the baseline's own (a redb file has one user
//! at a time), in tables modeled on the reference homeserver's
//! `e2e_one_time_keys_json`:
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | `e2e_one_time_keys_json` | (user, device, algorithm, seq) | (key ID, key JSON) |
//! | `e2e_one_time_keys_json_uniqueness` | (user, device, algorithm, key ID) | seq |
//! | `meta` | `next_seq` | the next seq |
//!
//! `seq` numbers keys in upload order and stands in for the reference
//! homeserver's `ts_added_ms`: the oldest key of a device and algorithm is
//! the first of its range. A claim removes it from both tables.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use keyclaim::{Algorithm, ClaimedKey, Device, Error, KeyId, KeyJson, Result};
use redb::{
    Database, ReadableDatabase as _, ReadableTable as _, TableDefinition, WriteTransaction,
};

use super::Baseline;

const NAME: &str = "redb-baseline";

/// (user, device, algorithm, seq) → (key ID without the algorithm, JSON).
const OTKS: TableDefinition<'_, (&str, &str, &str, u64), (&str, &str)> =
    TableDefinition::new("e2e_one_time_keys_json");
/// (user, device, algorithm, key ID) → seq: the uniqueness constraint.
const OTK_IDS: TableDefinition<'_, (&str, &str, &str, &str), u64> =
    TableDefinition::new("e2e_one_time_keys_json_uniqueness");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
const META_NEXT_SEQ: &str = "next_seq";

/// The one-write-transaction-per-claim baseline on a redb file of its own
/// (see the module docs). Cheap to clone (shared database handle).
#[derive(Clone, Debug)]
pub struct RedbBaseline {
    db: Arc<Database>,
    path: PathBuf,
}

impl RedbBaseline {
    /// Opens (or creates) the baseline's file at `path`.
    ///
    /// # Errors
    /// [`Error::Storage`] when the file cannot be opened (also when another
    /// handle has it open) or its tables not created.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_owned();
        let file = path.clone();
        let db = blocking(
            "open",
            move || -> std::result::Result<Database, redb::Error> {
                let db = Database::create(&file)?;
                let txn = db.begin_write()?;
                txn.open_table(OTKS)?;
                txn.open_table(OTK_IDS)?;
                txn.open_table(META)?;
                txn.commit()?;
                Ok(db)
            },
        )
        .await?;
        Ok(Self {
            db: Arc::new(db),
            path,
        })
    }

    /// The baseline's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in one write transaction of its own on the blocking pool,
    /// and commits it.
    async fn write<T, F>(&self, op: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> std::result::Result<T, redb::Error> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        blocking(op, move || -> std::result::Result<T, redb::Error> {
            let txn = db.begin_write()?;
            let value = f(&txn)?;
            txn.commit()?;
            Ok(value)
        })
        .await
    }
}

#[async_trait]
impl Baseline for RedbBaseline {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn upload(&self, device: &Device, keys: &[(KeyId, KeyJson)]) -> Result<()> {
        let device = device.clone();
        let rows = super::rows(keys);
        self.write("upload", move |txn| {
            let (user, dev) = (device.user_id.as_str(), device.device_id.as_str());
            let mut meta = txn.open_table(META)?;
            let mut otks = txn.open_table(OTKS)?;
            let mut ids = txn.open_table(OTK_IDS)?;
            let mut seq = meta.get(META_NEXT_SEQ)?.map_or(0, |v| v.value());
            for (algorithm, key_id, json) in &rows {
                let id_key = (user, dev, algorithm.as_str(), key_id.as_str());
                if ids.get(id_key)?.is_some() {
                    continue;
                }
                ids.insert(id_key, seq)?;
                otks.insert(
                    (user, dev, algorithm.as_str(), seq),
                    (key_id.as_str(), json.as_str()),
                )?;
                seq += 1;
            }
            meta.insert(META_NEXT_SEQ, seq)?;
            Ok(())
        })
        .await
    }

    async fn claim_one(
        &self,
        device: &Device,
        algorithm: &Algorithm,
    ) -> Result<Option<ClaimedKey>> {
        let (owned_device, owned_algorithm) = (device.clone(), algorithm.clone());
        let row = self
            .write("claim", move |txn| {
                let (user, dev, alg) = (
                    owned_device.user_id.as_str(),
                    owned_device.device_id.as_str(),
                    owned_algorithm.as_str(),
                );
                let mut otks = txn.open_table(OTKS)?;
                let oldest = match otks
                    .range((user, dev, alg, 0)..=(user, dev, alg, u64::MAX))?
                    .next()
                {
                    Some(entry) => {
                        let (key, value) = entry?;
                        let (key_id, json) = value.value();
                        Some((key.value().3, key_id.to_owned(), json.to_owned()))
                    }
                    None => None,
                };
                if let Some((seq, key_id, _)) = &oldest {
                    otks.remove((user, dev, alg, *seq))?;
                    txn.open_table(OTK_IDS)?
                        .remove((user, dev, alg, key_id.as_str()))?;
                }
                Ok(oldest.map(|(_, key_id, json)| (key_id, json)))
            })
            .await?;
        row.map(|(key_id, json)| {
            super::claimed(device.clone(), &format!("{algorithm}:{key_id}"), &json)
        })
        .transpose()
    }

    async fn count(&self, device: &Device, algorithm: &Algorithm) -> Result<u64> {
        let db = Arc::clone(&self.db);
        let (device, algorithm) = (device.clone(), algorithm.clone());
        blocking("count", move || -> std::result::Result<u64, redb::Error> {
            let (user, dev, alg) = (
                device.user_id.as_str(),
                device.device_id.as_str(),
                algorithm.as_str(),
            );
            let txn = db.begin_read()?;
            let otks = txn.open_table(OTKS)?;
            let mut n = 0;
            for entry in otks.range((user, dev, alg, 0)..=(user, dev, alg, u64::MAX))? {
                entry?;
                n += 1;
            }
            Ok(n)
        })
        .await
    }
}

/// Runs `f` on tokio's blocking pool; redb's errors become
/// [`Error::Storage`].
async fn blocking<T, E>(
    op: &'static str,
    f: impl FnOnce() -> std::result::Result<T, E> + Send + 'static,
) -> Result<T>
where
    T: Send + 'static,
    E: Into<redb::Error> + Send + 'static,
{
    super::on_blocking_pool(NAME, op, move || {
        f().map_err(|e| Error::storage(NAME, op, false, Into::<redb::Error>::into(e)))
    })
    .await
}
