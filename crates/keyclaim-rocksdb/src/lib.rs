#![doc = include_str!("../README.md")]

// `engine` holds the `KvEngine` adapter, `options` the settings; this file
// the store: opening a database or sharing one, and the `Backend` impl,
// which hands every operation to the key-value layer.
mod engine;
mod options;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use keyclaim::backend::{Backend, StoreCore, async_trait};
use keyclaim::transfer::DeviceSnapshot;
use keyclaim::{
    Algorithm, Changes, ClaimOutcome, ClaimTarget, Device, DeviceId, Error, FallbackTarget,
    ResetScope, Result, StoredFallback, SyncState, Upload, UploadOutcome, UserId,
};
use keyclaim_kv::{KvStore, WriterStats};
use rocksdb::DB;

pub use engine::RocksEngine;
pub use options::{DEFAULT_PREFIX, RocksOptions};
/// The `rocksdb` crate this backend is built against, for
/// [`RocksStore::with_db`]'s `Arc<rocksdb::DB>`.
pub use rocksdb;

/// The backend's name in errors and logs.
const BACKEND: &str = "rocksdb";

/// A keyclaim store in a RocksDB database: the key-value layer
/// ([`keyclaim_kv::KvStore`]) over [`RocksEngine`].
///
/// - [`RocksStore::open`] opens (or creates) a database of its own in a
///   directory; [`RocksStore::with_db`] shares a database the homeserver
///   already opened, in column families of keyclaim's own.
/// - Writes go through one writer thread per store that groups concurrent
///   operations into one RocksDB write batch, synced by default (group
///   commit: one sync for many claims).
/// - Reads run on tokio's blocking pool; no RocksDB call runs on the async
///   runtime's threads.
/// - Needs a tokio runtime (any flavour). Dropping the store waits for the
///   queued writes; [`RocksStore::close`] does it off the async threads.
///
/// `Send + Sync`; share it as `Arc<RocksStore>` or `Arc<dyn KeyStore>`.
pub struct RocksStore {
    inner: KvStore<RocksEngine>,
    options: RocksOptions,
}

impl fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RocksStore")
            .field("engine", self.inner.engine())
            .field("durable", &self.options.get_durable())
            .field("limits", self.options.get_limits())
            .finish_non_exhaustive()
    }
}

impl RocksStore {
    /// Opens the RocksDB database in the directory `path` with durable
    /// default settings, creating it and keyclaim's column families when
    /// absent, and stamping or checking the layout's format version.
    ///
    /// # Errors
    /// A retryable [`Error::Storage`] when RocksDB fails to open (another
    /// process holds the database's lock, I/O); otherwise as
    /// [`RocksStore::with_db`].
    pub async fn open(path: impl AsRef<Path>) -> Result<RocksStore> {
        Self::open_with(path, RocksOptions::default()).await
    }

    /// Opens the database in `path` with the given options. See
    /// [`RocksStore::open`].
    ///
    /// The database is opened with RocksDB's default options; column
    /// families already in it (the homeserver's, say) are opened too and
    /// left alone.
    ///
    /// # Errors
    /// As [`RocksStore::open`];
    /// [`Error::InvalidConfig`] for column family names that clash.
    pub async fn open_with(path: impl AsRef<Path>, options: RocksOptions) -> Result<RocksStore> {
        options.validate()?;
        let path = path.as_ref().to_owned();
        let db = tokio::task::spawn_blocking(move || open_db(&path))
            .await
            .map_err(|e| Error::storage(BACKEND, "open", false, e))??;
        Self::with_db(Arc::new(db), options).await
    }

    /// Opens a store in a database the homeserver already opened, in the
    /// column families named by `options` (created with default options
    /// when absent). The homeserver's own column families are never read or
    /// written. No other code may write to keyclaim's column families while
    /// the store is open, and only one store may use them at a time.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for column family names that clash; a
    /// retryable [`Error::Storage`] when RocksDB fails (creating a column
    /// family, reading); [`Error::UnsupportedVersion`] for data written by
    /// a newer keyclaim; [`Error::Corrupt`] when the column families hold
    /// data without a format version.
    pub async fn with_db(db: Arc<DB>, options: RocksOptions) -> Result<RocksStore> {
        options.validate()?;
        let names = options.get_column_families().clone();
        let engine = tokio::task::spawn_blocking(move || RocksEngine::new(db, names))
            .await
            .map_err(|e| Error::storage(BACKEND, "open", false, e))?
            .map_err(|e| Error::storage(BACKEND, "open", true, e))?;
        let inner = KvStore::open_with(engine, options.get_kv().clone()).await?;
        Ok(RocksStore { inner, options })
    }

    /// The database. Read keyclaim's column families if you like; never
    /// write to them.
    pub fn db(&self) -> &Arc<DB> {
        self.inner.engine().db()
    }

    /// The engine adapter the store runs on.
    pub fn engine(&self) -> &RocksEngine {
        self.inner.engine()
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &RocksOptions {
        &self.options
    }

    /// Counters of the writer thread (batches, operations, largest batch).
    pub fn writer_stats(&self) -> WriterStats {
        self.inner.writer_stats()
    }

    /// Waits for the queued writes, stops the writer thread and releases
    /// the store's reference to the database (closing it when it was the
    /// last), on the blocking pool.
    ///
    /// # Errors
    /// [`Error::Storage`] if the blocking task fails.
    pub async fn close(self) -> Result<()> {
        tokio::task::spawn_blocking(move || drop(self))
            .await
            .map_err(|e| Error::storage(BACKEND, "close", false, e))
    }
}

/// Opens (creating) the database in `path` with every column family it
/// already has. Blocking.
fn open_db(path: &Path) -> Result<DB> {
    let mut options = rocksdb::Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    let existing = if path.join("CURRENT").exists() {
        DB::list_cf(&options, path).map_err(|e| Error::storage(BACKEND, "open", true, e))?
    } else {
        Vec::new()
    };
    DB::open_cf(&options, path, existing).map_err(|e| Error::storage(BACKEND, "open", true, e))
}

#[async_trait]
impl Backend for RocksStore {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn core(&self) -> &StoreCore {
        self.inner.core()
    }

    async fn upload(&self, upload: &Upload) -> Result<UploadOutcome> {
        self.inner.upload(upload).await
    }

    async fn claim(&self, targets: &[ClaimTarget]) -> Result<ClaimOutcome> {
        self.inner.claim(targets).await
    }

    async fn claim_one_time_keys(&self, targets: &[ClaimTarget]) -> Result<ClaimOutcome> {
        self.inner.claim_one_time_keys(targets).await
    }

    async fn claim_fallback_keys(&self, targets: &[FallbackTarget]) -> Result<ClaimOutcome> {
        self.inner.claim_fallback_keys(targets).await
    }

    async fn reset_one_time_keys(
        &self,
        device: &Device,
        scope: &ResetScope,
    ) -> Result<UploadOutcome> {
        self.inner.reset_one_time_keys(device, scope).await
    }

    async fn replace_device(
        &self,
        previous: Option<&DeviceId>,
        upload: &Upload,
    ) -> Result<UploadOutcome> {
        self.inner.replace_device(previous, upload).await
    }

    async fn fallback_keys(&self, device: &Device) -> Result<BTreeMap<Algorithm, StoredFallback>> {
        self.inner.fallback_keys(device).await
    }

    async fn counts_many(&self, devices: &[Device]) -> Result<Vec<SyncState>> {
        self.inner.counts_many(devices).await
    }

    async fn sync_state(&self, device: &Device) -> Result<SyncState> {
        self.inner.sync_state(device).await
    }

    async fn delete_device(&self, device: &Device) -> Result<Changes> {
        self.inner.delete_device(device).await
    }

    async fn delete_user(&self, user: &UserId) -> Result<Changes> {
        self.inner.delete_user(user).await
    }

    async fn export_devices(
        &self,
        after: Option<&Device>,
        limit: usize,
    ) -> Result<Vec<DeviceSnapshot>> {
        self.inner.export_devices(after, limit).await
    }

    async fn import_device(&self, snapshot: &DeviceSnapshot) -> Result<Changes> {
        self.inner.import_device(snapshot).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn store_is_send_and_sync() {
        assert_send_sync::<RocksStore>();
        assert_send_sync::<RocksEngine>();
    }
}
