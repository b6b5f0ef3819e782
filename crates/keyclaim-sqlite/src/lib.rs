#![doc = include_str!("../README.md")]

mod checkpoint;
mod ops;
mod reader;
mod schema;
mod writer;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use keyclaim::{
    Algorithm, ChangeNotifier, Changes, ClaimOutcome, ClaimTarget, Device, DeviceSnapshot,
    KeyStore, Limits, OtkCounts, Result, SyncState, Upload, UploadOutcome, UserId, broadcast,
};
use tracing::Instrument as _;

pub use schema::{APPLICATION_ID, SCHEMA_VERSION};

use checkpoint::Checkpointer;
use reader::ReadPool;
use writer::Writer;

/// How hard SQLite works to make a commit durable (`PRAGMA synchronous`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Synchronous {
    /// `synchronous = FULL` (the default): every commit syncs the WAL to the
    /// disk before the operation returns, so a returned write survives a
    /// crash of the process and of the machine (R10.1). Group commit shares
    /// one sync among every operation of a batch.
    #[default]
    Full,
    /// `synchronous = NORMAL`: commits do not wait for the disk; the WAL is
    /// synced at checkpoints. Faster. A returned write still survives a crash
    /// of the process (SIGKILL), but the last commits before a power loss or
    /// an OS crash may be lost (the file stays consistent). **Not durable
    /// across machine crashes**: pick it only if losing a few just-returned
    /// claims or uploads after a power loss is acceptable (a lost claim may
    /// then hand the same key out again).
    Normal,
}

/// Tuning of a [`SqliteStore`]. Build with [`SqliteOptions::new`] (or
/// `default()`) and the setters:
///
/// ```
/// use std::time::Duration;
/// use keyclaim_sqlite::{SqliteOptions, Synchronous};
///
/// let options = SqliteOptions::new()
///     .synchronous(Synchronous::Full)
///     .busy_timeout(Duration::from_secs(10))
///     .read_connections(4)
///     .max_batch(256);
/// assert_eq!(options.get_synchronous(), Synchronous::Full);
/// ```
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    limits: Limits,
    synchronous: Synchronous,
    busy_timeout: Duration,
    read_connections: usize,
    max_batch: usize,
    checkpoint_interval: Option<Duration>,
    wal_size_limit: u64,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            synchronous: Synchronous::Full,
            busy_timeout: Duration::from_secs(10),
            read_connections: 4,
            max_batch: 256,
            checkpoint_interval: Some(Duration::from_millis(100)),
            wal_size_limit: 64 << 20,
        }
    }
}

impl SqliteOptions {
    /// The defaults: [`Limits::default`], [`Synchronous::Full`], a 10 s busy
    /// timeout, 4 read connections, batches of at most 256 operations.
    pub fn new() -> Self {
        Self::default()
    }

    /// The limits the store enforces (SPEC section 8). They are not stored
    /// in the file: every process opening it should pass the same.
    #[must_use]
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Durability of commits; see [`Synchronous`].
    #[must_use]
    pub fn synchronous(mut self, synchronous: Synchronous) -> Self {
        self.synchronous = synchronous;
        self
    }

    /// How long a connection waits for another process's lock before the
    /// operation fails with a retryable [`keyclaim::Error::Storage`].
    #[must_use]
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// How many read connections (and read threads) the store keeps; at
    /// least one.
    #[must_use]
    pub fn read_connections(mut self, n: usize) -> Self {
        self.read_connections = n.max(1);
        self
    }

    /// The most operations one group-commit transaction takes; at least one.
    /// One operation per transaction (1) turns group commit off.
    #[must_use]
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n.max(1);
        self
    }

    /// Checkpoint the WAL from a background thread at this interval
    /// (default 100 ms), so that commits never wait for a checkpoint; `None`
    /// leaves checkpoints to SQLite's automatic ones, run by the commit that
    /// fills the WAL past 1000 pages.
    #[must_use]
    pub fn checkpoint_interval(mut self, interval: Option<Duration>) -> Self {
        self.checkpoint_interval = interval;
        self
    }

    /// The size in bytes the WAL file is cut back to whenever SQLite starts
    /// it over after a complete checkpoint (default 64 MiB;
    /// `PRAGMA journal_size_limit`). Without it, the WAL file keeps the size
    /// of the largest burst of writes between two checkpoints forever.
    #[must_use]
    pub fn wal_size_limit(mut self, bytes: u64) -> Self {
        self.wal_size_limit = bytes;
        self
    }

    /// The configured WAL size limit in bytes.
    pub fn get_wal_size_limit(&self) -> u64 {
        self.wal_size_limit
    }

    /// The configured checkpoint interval.
    pub fn get_checkpoint_interval(&self) -> Option<Duration> {
        self.checkpoint_interval
    }

    /// The configured limits.
    pub fn get_limits(&self) -> &Limits {
        &self.limits
    }

    /// The configured durability.
    pub fn get_synchronous(&self) -> Synchronous {
        self.synchronous
    }

    /// The configured busy timeout.
    pub fn get_busy_timeout(&self) -> Duration {
        self.busy_timeout
    }

    /// The configured number of read connections.
    pub fn get_read_connections(&self) -> usize {
        self.read_connections
    }

    /// The configured largest batch.
    pub fn get_max_batch(&self) -> usize {
        self.max_batch
    }
}

/// The SQLite key store: one file, shareable by several processes.
///
/// `Send + Sync`; share it as `Arc<SqliteStore>` or `Arc<dyn KeyStore>`.
/// Mutating operations go to a writer thread that commits them in groups;
/// reads go to a pool of read threads. No SQLite call runs on the caller's
/// (async runtime's) threads. Dropping the store finishes the queued writes,
/// then closes every connection and joins the threads.
///
/// Dropping a mutating call's future after it started does not cancel the
/// operation: it may still be applied (as when an HTTP response is lost).
pub struct SqliteStore {
    path: PathBuf,
    options: SqliteOptions,
    notifier: ChangeNotifier,
    // Declared before `writer`, so readers close before the writer does; the
    // last connection to close checkpoints the WAL.
    readers: ReadPool,
    _checkpointer: Option<Checkpointer>,
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
        let span = tracing::debug_span!("keyclaim_sqlite.open", path = %path.display());
        async {
            let writer = Writer::start(path.clone(), options.clone()).await?;
            let readers = ReadPool::start(&path, &options).await?;
            let checkpointer = options
                .checkpoint_interval
                .map(|every| Checkpointer::start(&path, &options, every))
                .transpose()?;
            Ok(SqliteStore {
                path,
                options,
                notifier: ChangeNotifier::new(),
                readers,
                _checkpointer: checkpointer,
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
        T: Send + 'static,
        F: Fn(&rusqlite::Connection, &Limits) -> Result<T> + Send + 'static,
    {
        self.writer.submit(op, writer::Fallible::OnInput, f).await
    }
}

#[async_trait]
impl KeyStore for SqliteStore {
    fn backend_name(&self) -> &'static str {
        ops::BACKEND
    }

    fn limits(&self) -> &Limits {
        &self.options.limits
    }

    fn subscribe(&self) -> broadcast::Receiver<Changes> {
        self.notifier.subscribe()
    }

    async fn upload(&self, upload: &Upload) -> Result<UploadOutcome> {
        let span = tracing::debug_span!(
            "keyclaim_sqlite.upload",
            device = %upload.device,
            otks = upload.one_time_keys.len(),
            fallbacks = upload.fallback_keys.len(),
        );
        async {
            self.options.limits.check_upload(upload)?;
            let owned = upload.clone();
            let outcome = self
                .write("upload", move |conn, limits| {
                    ops::upload(conn, &owned, limits)
                })
                .await?;
            self.notifier.notify(&outcome.changes);
            tracing::debug!(
                changed = !outcome.changes.is_empty(),
                stored = outcome.counts.total(),
                "upload done"
            );
            Ok(outcome)
        }
        .instrument(span)
        .await
    }

    async fn claim(&self, targets: &[ClaimTarget]) -> Result<ClaimOutcome> {
        let span = tracing::debug_span!("keyclaim_sqlite.claim", targets = targets.len());
        async {
            self.options.limits.check_claim(targets)?;
            let owned = targets.to_vec();
            // The targets were checked above: a claim fails only when
            // storage does, and runs without a savepoint of its own.
            let raw = self
                .writer
                .submit(
                    "claim",
                    writer::Fallible::OnStorageOnly,
                    move |conn, limits| ops::claim(conn, &owned, limits),
                )
                .await?;
            // Committed: the changes happened even if a stored key turns out
            // unreadable, so notify first.
            let outcome = raw.into_outcome(targets);
            if let Ok(outcome) = &outcome {
                self.notifier.notify(&outcome.changes);
            }
            let outcome = outcome?;
            tracing::debug!(
                issued = outcome.keys.len(),
                devices_changed = outcome.changes.devices().len(),
                "claim done"
            );
            Ok(outcome)
        }
        .instrument(span)
        .await
    }

    async fn otk_counts(&self, device: &Device) -> Result<OtkCounts> {
        let span = tracing::trace_span!("keyclaim_sqlite.otk_counts", %device);
        let device = device.clone();
        self.readers
            .run(move |conn| ops::otk_counts(conn, &device))
            .instrument(span)
            .await
    }

    async fn unused_fallback_types(&self, device: &Device) -> Result<Vec<Algorithm>> {
        let span = tracing::trace_span!("keyclaim_sqlite.unused_fallback_types", %device);
        let device = device.clone();
        self.readers
            .run(move |conn| ops::unused_fallback_types(conn, &device))
            .instrument(span)
            .await
    }

    async fn sync_state(&self, device: &Device) -> Result<SyncState> {
        let span = tracing::trace_span!("keyclaim_sqlite.sync_state", %device);
        let device = device.clone();
        self.readers
            .run(move |conn| ops::sync_state(conn, &device))
            .instrument(span)
            .await
    }

    async fn delete_device(&self, device: &Device) -> Result<Changes> {
        let span = tracing::debug_span!("keyclaim_sqlite.delete_device", %device);
        let owned = device.clone();
        let changes = self
            .write("delete_device", move |conn, _| {
                ops::delete_device(conn, &owned)
            })
            .instrument(span)
            .await?;
        self.notifier.notify(&changes);
        Ok(changes)
    }

    async fn delete_user(&self, user: &UserId) -> Result<Changes> {
        let span = tracing::debug_span!("keyclaim_sqlite.delete_user", %user);
        let owned = user.clone();
        let changes = self
            .write("delete_user", move |conn, _| ops::delete_user(conn, &owned))
            .instrument(span)
            .await?;
        self.notifier.notify(&changes);
        Ok(changes)
    }

    async fn export_devices(
        &self,
        after: Option<&Device>,
        limit: usize,
    ) -> Result<Vec<DeviceSnapshot>> {
        let span = tracing::debug_span!("keyclaim_sqlite.export_devices", limit);
        let after = after.cloned();
        let limits = self.options.limits.clone();
        self.readers
            .run(move |conn| ops::export_devices(conn, after.as_ref(), limit, &limits))
            .instrument(span)
            .await
    }

    async fn import_device(&self, snapshot: &DeviceSnapshot) -> Result<Changes> {
        let span = tracing::debug_span!(
            "keyclaim_sqlite.import_device",
            device = %snapshot.device,
            otks = snapshot.one_time_keys.len(),
        );
        let owned = snapshot.clone();
        let changes = self
            .write("import_device", move |conn, _| {
                ops::import_device(conn, &owned)
            })
            .instrument(span)
            .await?;
        self.notifier.notify(&changes);
        Ok(changes)
    }
}
