#![doc = include_str!("../README.md")]

// The same file roles as every backend crate: this file holds the store and
// its `Backend` impl; `options` its settings and URL parsing; `error` every
// mapping to `keyclaim::Error`; `schema` the layout and migrations; `ops` the
// operations, one file per kind; `writer` the group-commit writer thread;
// `reader` the read pool; `checkpoint` the background WAL checkpoints;
// `changes` the change reports across processes.
mod changes;
mod checkpoint;
mod error;
mod ops;
mod options;
mod reader;
mod schema;
mod writer;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use keyclaim::backend::{Backend, StoreCore, async_trait};
use keyclaim::transfer::DeviceSnapshot;
use keyclaim::{
    Algorithm, Changes, ClaimOutcome, ClaimTarget, Device, DeviceId, FallbackTarget, Limits,
    ResetScope, Result, StoredFallback, SyncState, Upload, UploadOutcome, UserId,
};
use tracing::Instrument as _;

pub use options::{SqliteOptions, Synchronous};
pub use schema::{APPLICATION_ID, SCHEMA_VERSION};

use changes::Watcher;
use checkpoint::Checkpointer;
use reader::ReadPool;
use writer::Writer;

/// The backend name used in errors and logs.
pub(crate) const BACKEND: &str = "sqlite";

/// The SQLite key store: one file, shareable by several processes.
///
/// `Send + Sync`; share it as `Arc<SqliteStore>` or `Arc<dyn KeyStore>`.
/// Mutating operations go to a writer thread that commits them in groups;
/// reads go to a pool of read threads. No SQLite call runs on the caller's
/// (async runtime's) threads. Dropping the store finishes the queued writes,
/// then closes every connection and joins the threads.
///
/// Dropping a call's future before the writer (or a reader) started it
/// means it is not run (R10.6); once started, it is applied (as when an
/// HTTP response is lost). Each queue holds at most
/// [`SqliteOptions::max_queued`] operations; past that, calls fail at once
/// with a retryable error.
pub struct SqliteStore {
    path: PathBuf,
    options: SqliteOptions,
    core: StoreCore,
    // Declared before `writer`, so readers close before the writer does; the
    // last connection to close checkpoints the WAL.
    readers: ReadPool,
    _checkpointer: Option<Checkpointer>,
    _watcher: Option<Watcher>,
    writer: Writer,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating it if needed) the store at `path` with the default
    /// [`SqliteOptions`]: durable commits, default limits. Migrates an older
    /// file.
    ///
    /// # Errors
    /// [`keyclaim::Error::UnsupportedVersion`] for a file written by a newer
    /// version, [`keyclaim::Error::Corrupt`] for a file that is not a keyclaim
    /// store, [`keyclaim::Error::Storage`] when the file cannot be opened.
    pub async fn open(path: impl AsRef<Path>) -> Result<SqliteStore> {
        Self::open_with(path, SqliteOptions::default()).await
    }

    /// Opens the store at `path` with the given options. See [`Self::open`].
    ///
    /// # Errors
    /// As [`Self::open`].
    pub async fn open_with(path: impl AsRef<Path>, options: SqliteOptions) -> Result<SqliteStore> {
        let path = path.as_ref().to_owned();
        let span = tracing::debug_span!("keyclaim.sqlite.open", path = %path.display());
        async {
            // This handle's changes in `change_log` carry its origin, so that
            // its watcher skips them (R11.2).
            let origin = changes::new_origin();
            let core = StoreCore::new(options.get_limits().clone());
            let writer = Writer::start(path.clone(), options.clone(), origin).await?;
            let readers = ReadPool::start(&path, &options).await?;
            let checkpointer = options
                .get_checkpoint_interval()
                .map(|every| Checkpointer::start(&path, &options, every))
                .transpose()?;
            let watcher = match options.get_change_poll_interval() {
                Some(every) => {
                    Some(Watcher::start(&path, &options, every, origin, core.clone()).await?)
                }
                None => None,
            };
            Ok(SqliteStore {
                path,
                core,
                options,
                readers,
                _checkpointer: checkpointer,
                _watcher: watcher,
                writer,
            })
        }
        .instrument(span)
        .await
    }

    /// The path of the store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &SqliteOptions {
        &self.options
    }

    async fn write<T, F>(&self, op: &'static str, f: F) -> Result<T>
    where
        T: writer::Answer,
        F: Fn(&rusqlite::Connection, &Limits) -> Result<T> + Send + 'static,
    {
        self.writer.submit(op, writer::Fallible::OnInput, f).await
    }

    /// Queues a write that fails only when storage does (its input was
    /// checked by core): it runs without a savepoint of its own in a batch.
    async fn write_infallible<T, F>(&self, op: &'static str, f: F) -> Result<T>
    where
        T: writer::Answer,
        F: Fn(&rusqlite::Connection, &Limits) -> Result<T> + Send + 'static,
    {
        self.writer
            .submit(op, writer::Fallible::OnStorageOnly, f)
            .await
    }

    /// A one-step claim (`fall_back`, section 4) or the one-time step of a
    /// split claim (R12.1): the same writer job and the same code.
    async fn claim_targets(
        &self,
        targets: &[ClaimTarget],
        fall_back: bool,
    ) -> Result<ClaimOutcome> {
        let owned = targets.to_vec();
        let op = if fall_back {
            "claim"
        } else {
            "claim_one_time_keys"
        };
        // Decoded inside the transaction (R10.7).
        self.write_infallible(op, move |conn, _| ops::claim(conn, &owned, fall_back))
            .await
    }
}

#[async_trait]
impl Backend for SqliteStore {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn core(&self) -> &StoreCore {
        &self.core
    }

    async fn upload(&self, upload: &Upload) -> Result<UploadOutcome> {
        let owned = upload.clone();
        self.write("upload", move |conn, limits| {
            ops::upload(conn, &owned, limits)
        })
        .await
    }

    async fn claim(&self, targets: &[ClaimTarget]) -> Result<ClaimOutcome> {
        // Core checked the targets: a claim fails only when storage does,
        // and runs without a savepoint of its own.
        self.claim_targets(targets, true).await
    }

    async fn sync_state(&self, device: &Device) -> Result<SyncState> {
        let device = device.clone();
        self.readers
            .run(move |conn| ops::sync_state(conn, &device))
            .await
    }

    async fn delete_device(&self, device: &Device) -> Result<Changes> {
        let owned = device.clone();
        self.write("delete_device", move |conn, _| {
            ops::delete_device(conn, &owned)
        })
        .await
    }

    async fn delete_user(&self, user: &UserId) -> Result<Changes> {
        let owned = user.clone();
        self.write("delete_user", move |conn, _| ops::delete_user(conn, &owned))
            .await
    }

    async fn export_devices(
        &self,
        after: Option<&Device>,
        limit: usize,
    ) -> Result<Vec<DeviceSnapshot>> {
        let after = after.cloned();
        let limits = self.options.get_limits().clone();
        self.readers
            .run(move |conn| ops::export_devices(conn, after.as_ref(), limit, &limits))
            .await
    }

    async fn import_device(&self, snapshot: &DeviceSnapshot) -> Result<Changes> {
        let owned = snapshot.clone();
        self.write("import_device", move |conn, _| {
            ops::import_device(conn, &owned)
        })
        .await
    }

    async fn claim_one_time_keys(&self, targets: &[ClaimTarget]) -> Result<ClaimOutcome> {
        self.claim_targets(targets, false).await
    }

    async fn claim_fallback_keys(&self, targets: &[FallbackTarget]) -> Result<ClaimOutcome> {
        let owned = targets.to_vec();
        // One writer job for all targets: one atomic step, group-committed
        // with its batch-mates (R12.2, R4.7), decoded before it commits
        // (R10.7).
        self.write_infallible("claim_fallback_keys", move |conn, _| {
            ops::claim_fallback_keys(conn, &owned)
        })
        .await
    }

    async fn reset_one_time_keys(
        &self,
        device: &Device,
        scope: &ResetScope,
    ) -> Result<UploadOutcome> {
        let (device, scope) = (device.clone(), scope.clone());
        self.write_infallible("reset_one_time_keys", move |conn, _| {
            ops::reset_one_time_keys(conn, &device, &scope)
        })
        .await
    }

    async fn replace_device(
        &self,
        previous: Option<&DeviceId>,
        upload: &Upload,
    ) -> Result<UploadOutcome> {
        let (previous, upload) = (previous.cloned(), upload.clone());
        // One job: the removal and the upload share its savepoint, so a
        // failing upload undoes the removal (R14.1).
        self.write("replace_device", move |conn, limits| {
            ops::replace_device(conn, previous.as_ref(), &upload, limits)
        })
        .await
    }

    async fn fallback_keys(&self, device: &Device) -> Result<BTreeMap<Algorithm, StoredFallback>> {
        let device = device.clone();
        self.readers
            .run(move |conn| ops::fallback_keys(conn, &device, "fallback_keys"))
            .await
    }

    async fn counts_many(&self, devices: &[Device]) -> Result<Vec<SyncState>> {
        let devices = devices.to_vec();
        // One job on the read pool, one read transaction (R16.1).
        self.readers
            .run(move |conn| ops::counts_many(conn, &devices))
            .await
    }
}
