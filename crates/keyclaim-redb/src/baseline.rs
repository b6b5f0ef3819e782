//! The baseline the benchmarks compare [`RedbStore`](crate::RedbStore)
//! with: the reference homeserver's pattern on the same redb file format.
//!
//! [`BaselineStore`] has no writer thread and no group commit. Every
//! mutating call runs its own write transaction on tokio's blocking pool,
//! and a claim runs **one write transaction per target**, each committed
//! (with its fsync, under the durable default) before the next begins.
//! Concurrent callers queue on redb's single write lock.
//!
//! It keeps the whole contract (it shares the operations and the layout
//! with `RedbStore`, so either can open the other's file); only its
//! throughput differs. A claim is atomic per target here, not as a whole,
//! which is what the reference homeserver does and why it is only a
//! baseline. Use it to measure, not to serve.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::Fatal;
use crate::ops::{self, WriteTables, read_txn as read};
use crate::slot::{DbSlot, open_database};
use crate::{BACKEND, RedbDurability, RedbOptions, schema};
use async_trait::async_trait;
use keyclaim::backend::ChangeNotifier;
use keyclaim::transfer::DeviceSnapshot;
use keyclaim::{
    Algorithm, Changes, ClaimOutcome, ClaimTarget, Device, Error, KeyStore, Limits, OtkCounts,
    Result, SyncState, Upload, UploadOutcome, UserId, broadcast,
};

/// The one-transaction-per-claim-target store (see the module docs).
pub struct BaselineStore {
    slot: Arc<DbSlot>,
    limits: Limits,
    durability: RedbDurability,
    notifier: ChangeNotifier,
    path: PathBuf,
}

impl fmt::Debug for BaselineStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BaselineStore")
            .field("path", &self.path)
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

impl BaselineStore {
    /// Opens (or creates) the file with durable default settings.
    ///
    /// # Errors
    /// As [`RedbStore::open`](crate::RedbStore::open).
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, RedbOptions::default()).await
    }

    /// Opens (or creates) the file with the given options. `max_batch` is
    /// ignored; [`RedbDurability::Relaxed`] commits every transaction
    /// without an fsync and never flushes (close the store to flush).
    ///
    /// # Errors
    /// As [`RedbStore::open`](crate::RedbStore::open).
    pub async fn open_with(path: impl AsRef<Path>, options: RedbOptions) -> Result<Self> {
        let path = path.as_ref().to_owned();
        tokio::task::spawn_blocking(move || {
            let db = open_database(&path, &options)?;
            Ok(Self {
                slot: Arc::new(DbSlot::new(path.clone(), options.clone(), db)),
                limits: options.get_limits().clone(),
                durability: options.get_durability(),
                notifier: ChangeNotifier::new(),
                path,
            })
        })
        .await
        .map_err(|e| Error::storage(BACKEND, "open", false, e))?
    }

    /// A baseline on the file a [`RedbStore`](crate::RedbStore) has open,
    /// sharing its database handle (a redb file has one user at a time, so
    /// a second open would fail), with the same limits and durability. Its
    /// write transactions queue on redb's write lock together with the
    /// store's writer thread; change notifications are its own. The file
    /// stays open until both are dropped.
    pub fn sharing(store: &crate::RedbStore) -> Self {
        Self {
            slot: Arc::clone(&store.slot),
            limits: store.options.get_limits().clone(),
            durability: store.options.get_durability(),
            notifier: ChangeNotifier::new(),
            path: store.path.clone(),
        }
    }

    /// The file the store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Closes the file on the blocking pool.
    ///
    /// # Errors
    /// [`Error::Storage`] if the blocking task fails.
    pub async fn close(self) -> Result<()> {
        tokio::task::spawn_blocking(move || drop(self))
            .await
            .map_err(|e| Error::storage(BACKEND, "close", false, e))
    }

    /// Runs `f` in one write transaction of its own, on the blocking pool.
    async fn write<T, F>(&self, op: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut WriteTables<'_>, &Limits) -> std::result::Result<Result<T>, Fatal>
            + Send
            + 'static,
    {
        let slot = Arc::clone(&self.slot);
        let limits = self.limits.clone();
        let durable = self.durability == RedbDurability::Immediate;
        tokio::task::spawn_blocking(move || -> std::result::Result<Result<T>, Fatal> {
            let db = slot.get(op).map_err(Fatal::Other)?;
            let mut txn = db.begin_write()?;
            if !durable {
                txn.set_durability(redb::Durability::None)?;
            }
            let result = {
                let mut tables = WriteTables::open(&txn)?;
                let result = f(&mut tables, &limits)?;
                tables.finish()?;
                result
            };
            if result.is_ok() {
                txn.commit()?;
            }
            Ok(result)
        })
        .await
        .map_err(|e| Error::storage(BACKEND, op, false, e))?
        .map_err(|f| f.into_error(op))?
    }
}

#[async_trait]
impl KeyStore for BaselineStore {
    fn backend_name(&self) -> &'static str {
        BACKEND
    }

    fn limits(&self) -> &Limits {
        &self.limits
    }

    fn subscribe(&self) -> broadcast::Receiver<Changes> {
        self.notifier.subscribe()
    }

    async fn upload(&self, upload: &Upload) -> Result<UploadOutcome> {
        self.limits.check_upload(upload)?;
        let owned = upload.clone();
        let outcome = self
            .write("upload", move |t, limits| ops::upload(t, &owned, limits))
            .await?;
        self.notifier.notify(&outcome.changes);
        Ok(outcome)
    }

    async fn claim(&self, targets: &[ClaimTarget]) -> Result<ClaimOutcome> {
        self.limits.check_claim(targets)?;
        let mut keys = Vec::new();
        let mut changed = Vec::new();
        for target in targets {
            if self.limits.clamp_count(target.count) == 0 {
                continue;
            }
            let owned = ClaimTarget {
                count: self.limits.clamp_count(target.count),
                ..target.clone()
            };
            let raw = self
                .write("claim", move |t, _| {
                    Ok(Ok(ops::claim(t, std::slice::from_ref(&owned))?))
                })
                .await?;
            let outcome = raw.decode(std::slice::from_ref(target))?;
            self.notifier.notify(&outcome.changes);
            keys.extend(outcome.keys);
            changed.extend(outcome.changes.devices().iter().cloned());
        }
        Ok(ClaimOutcome {
            keys,
            changes: Changes::from_devices(changed),
        })
    }

    async fn otk_counts(&self, device: &Device) -> Result<OtkCounts> {
        let device = device.clone();
        read(&self.slot, "otk_counts", move |txn| {
            let table = txn.open_table(schema::OTK_QUEUE)?;
            ops::counts(&table, device.user_id.as_str(), device.device_id.as_str())
        })
        .await
    }

    async fn unused_fallback_types(&self, device: &Device) -> Result<Vec<Algorithm>> {
        let device = device.clone();
        read(&self.slot, "unused_fallback_types", move |txn| {
            let table = txn.open_table(schema::FALLBACKS)?;
            ops::unused_fallback_types(&table, device.user_id.as_str(), device.device_id.as_str())
        })
        .await
    }

    async fn sync_state(&self, device: &Device) -> Result<SyncState> {
        let device = device.clone();
        read(&self.slot, "sync_state", move |txn| {
            ops::sync_state(txn, &device)
        })
        .await
    }

    async fn delete_device(&self, device: &Device) -> Result<Changes> {
        let device = device.clone();
        let changes = self
            .write("delete_device", move |t, _| {
                Ok(Ok(ops::delete_device(t, &device)?))
            })
            .await?;
        self.notifier.notify(&changes);
        Ok(changes)
    }

    async fn delete_user(&self, user: &UserId) -> Result<Changes> {
        let user = user.clone();
        let changes = self
            .write("delete_user", move |t, _| {
                Ok(Ok(ops::delete_user(t, &user)?))
            })
            .await?;
        self.notifier.notify(&changes);
        Ok(changes)
    }

    async fn export_devices(
        &self,
        after: Option<&Device>,
        limit: usize,
    ) -> Result<Vec<DeviceSnapshot>> {
        let after = after.cloned();
        let limits = self.limits.clone();
        read(&self.slot, "export_devices", move |txn| {
            ops::export_devices(txn, after.as_ref(), limit, &limits)
        })
        .await
    }

    async fn import_device(&self, snapshot: &DeviceSnapshot) -> Result<Changes> {
        let snapshot = snapshot.clone();
        let changes = self
            .write("import_device", move |t, _| {
                Ok(Ok(ops::import_device(t, &snapshot)?))
            })
            .await?;
        self.notifier.notify(&changes);
        Ok(changes)
    }
}
