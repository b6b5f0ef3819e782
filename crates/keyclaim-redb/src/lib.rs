#![doc = include_str!("../README.md")]

// The same file roles as every backend crate: this file holds the store and
// its `Backend` impl; `options` its settings and URL parsing; `error` every
// mapping to `keyclaim::Error`; `schema` the layout, the format version and
// migrations; `ops` the operations, one file per kind; `writer` the
// group-commit writer thread, `queue` its queue and `flush` when it commits
// durably; `slot` opening the file
// and reopening it after an I/O error; `hooks` where the test-only `faults`
// are injected.
mod error;
#[cfg(feature = "fault-injection")]
pub mod faults;
mod flush;
mod hooks;
mod ops;
mod options;
mod queue;
mod schema;
mod slot;
mod writer;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use keyclaim::backend::{Backend, StoreCore, async_trait};
use keyclaim::transfer::DeviceSnapshot;
use keyclaim::{
    Algorithm, Changes, ClaimOutcome, ClaimTarget, Device, DeviceId, FallbackTarget, ResetScope,
    Result, StoredFallback, SyncState, Upload, UploadOutcome, UserId,
};

pub use error::AlreadyOpen;
pub use options::{RedbDurability, RedbOptions};
pub use schema::FORMAT_VERSION;
pub use writer::WriterStats;

use keyclaim::backend::writer::{FromWriteReply, WriteOp};
use ops::read_txn;
use slot::{DbSlot, open_database};
use writer::{Writer, WriterConfig};

/// The backend's name in errors and logs.
pub(crate) const BACKEND: &str = "redb";

/// The redb store.
///
/// - One file, one user: opening a file another process (or another
///   `RedbStore`) holds fails with an [`AlreadyOpen`] error.
/// - Writes go through one writer thread that groups concurrent operations
///   into one durable commit (see the crate docs); reads run read
///   transactions on tokio's blocking pool and never wait for the writer.
///   No redb call runs on the async runtime's threads.
/// - Needs a tokio runtime (any flavour).
/// - Dropping the store waits for the queued writes to finish and closes
///   the file; [`RedbStore::close`] does the same off the async threads.
///
/// `Send + Sync`; share it as `Arc<RedbStore>` or `Arc<dyn KeyStore>`.
pub struct RedbStore {
    // Declared first: dropped (joined) before the database closes.
    writer: Writer,
    slot: Arc<DbSlot>,
    core: StoreCore,
    path: PathBuf,
    options: RedbOptions,
}

impl fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .field("durability", &self.options.get_durability())
            .field("max_batch", &self.options.get_max_batch())
            .field("max_queued", &self.options.get_max_queued())
            .field("limits", self.core.limits())
            .finish_non_exhaustive()
    }
}

impl RedbStore {
    /// Opens the store in the file at `path`, creating it if needed, with
    /// durable default settings.
    ///
    /// # Errors
    /// [`Error::Storage`](keyclaim::Error::Storage) when the file cannot be opened (with an
    /// [`AlreadyOpen`] source when another process or store holds it);
    /// [`Error::UnsupportedVersion`](keyclaim::Error::UnsupportedVersion) when it was written by a newer format.
    pub async fn open(path: impl AsRef<Path>) -> Result<RedbStore> {
        Self::open_with(path, RedbOptions::default()).await
    }

    /// Opens the store with the given options.
    ///
    /// # Errors
    /// As [`RedbStore::open`].
    pub async fn open_with(path: impl AsRef<Path>, options: RedbOptions) -> Result<RedbStore> {
        let path = path.as_ref().to_owned();
        tokio::task::spawn_blocking(move || Self::open_blocking(path, options))
            .await
            .map_err(|e| error::task_failed("open", e))?
    }

    fn open_blocking(path: PathBuf, options: RedbOptions) -> Result<RedbStore> {
        let db = open_database(&path, &options)?;
        let slot = Arc::new(DbSlot::new(path.clone(), options.clone(), db));
        let writer = Writer::start(
            Arc::clone(&slot),
            WriterConfig {
                limits: options.get_limits().clone(),
                durability: options.get_durability(),
                max_batch: options.get_max_batch().max(1),
                max_queued: options.get_max_queued(),
                linger: options.get_linger(),
                hooks: hooks::Hooks::new(&options),
            },
        )?;
        tracing::debug!(path = %path.display(), "opened redb store");
        Ok(RedbStore {
            writer,
            slot,
            core: StoreCore::new(options.get_limits().clone()),
            path,
            options,
        })
    }

    /// The file the store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &RedbOptions {
        &self.options
    }

    /// Waits for the queued writes, stops the writer thread and closes the
    /// file, on the blocking pool. Afterwards the file can be opened again.
    ///
    /// # Errors
    /// [`Error::Storage`](keyclaim::Error::Storage) if the blocking task fails.
    pub async fn close(self) -> Result<()> {
        tokio::task::spawn_blocking(move || drop(self))
            .await
            .map_err(|e| error::task_failed("close", e))
    }

    /// Counters of the writer thread (batches, operations, largest batch).
    pub fn writer_stats(&self) -> WriterStats {
        self.writer.stats()
    }

    /// Runs a mutation on the writer thread and answers its outcome.
    async fn submit<T: FromWriteReply>(&self, op: WriteOp) -> Result<T> {
        self.writer.submit(op).await
    }

    /// A claim with the fallback step (section 4) or without it (R12.1).
    async fn claim_targets(
        &self,
        targets: &[ClaimTarget],
        fall_back: bool,
    ) -> Result<ClaimOutcome> {
        self.submit(WriteOp::Claim {
            targets: targets.into(),
            fall_back,
        })
        .await
    }
}

#[async_trait]
impl Backend for RedbStore {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn core(&self) -> &StoreCore {
        &self.core
    }

    async fn upload(&self, upload: &Upload) -> Result<UploadOutcome> {
        self.submit(WriteOp::Upload(upload.clone())).await
    }

    async fn claim(&self, targets: &[ClaimTarget]) -> Result<ClaimOutcome> {
        self.claim_targets(targets, true).await
    }

    async fn claim_one_time_keys(&self, targets: &[ClaimTarget]) -> Result<ClaimOutcome> {
        self.claim_targets(targets, false).await
    }

    async fn claim_fallback_keys(&self, targets: &[FallbackTarget]) -> Result<ClaimOutcome> {
        self.submit(WriteOp::ClaimFallbacks(targets.into())).await
    }

    async fn reset_one_time_keys(
        &self,
        device: &Device,
        scope: &ResetScope,
    ) -> Result<UploadOutcome> {
        self.submit(WriteOp::Reset(device.clone(), scope.clone()))
            .await
    }

    async fn replace_device(
        &self,
        previous: Option<&DeviceId>,
        upload: &Upload,
    ) -> Result<UploadOutcome> {
        let op = WriteOp::Replace {
            previous: previous.cloned(),
            upload: upload.clone(),
        };
        self.submit(op).await
    }

    async fn fallback_keys(&self, device: &Device) -> Result<BTreeMap<Algorithm, StoredFallback>> {
        let device = device.clone();
        read_txn(&self.slot, "fallback_keys", move |txn| {
            ops::read_fallback_keys(txn, &device)
        })
        .await
    }

    async fn counts_many(&self, devices: &[Device]) -> Result<Vec<SyncState>> {
        let devices = devices.to_vec();
        read_txn(&self.slot, "counts_many", move |txn| {
            ops::counts_many(txn, &devices)
        })
        .await
    }

    async fn sync_state(&self, device: &Device) -> Result<SyncState> {
        let device = device.clone();
        read_txn(&self.slot, "sync_state", move |txn| {
            ops::sync_state(txn, &device)
        })
        .await
    }

    async fn delete_device(&self, device: &Device) -> Result<Changes> {
        self.submit(WriteOp::DeleteDevice(device.clone())).await
    }

    async fn delete_user(&self, user: &UserId) -> Result<Changes> {
        self.submit(WriteOp::DeleteUser(user.clone())).await
    }

    async fn export_devices(
        &self,
        after: Option<&Device>,
        limit: usize,
    ) -> Result<Vec<DeviceSnapshot>> {
        let after = after.cloned();
        let limits = self.core.limits().clone();
        read_txn(&self.slot, "export_devices", move |txn| {
            ops::export_devices(txn, after.as_ref(), limit, &limits)
        })
        .await
    }

    async fn import_device(&self, snapshot: &DeviceSnapshot) -> Result<Changes> {
        self.submit(WriteOp::Import(snapshot.clone())).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn store_is_send_and_sync() {
        assert_send_sync::<RedbStore>();
    }
}
