#![doc = include_str!("../README.md")]

mod ops;
mod queue;
mod schema;
mod slot;
mod writer;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use keyclaim::{
    Algorithm, ChangeNotifier, Changes, ClaimOutcome, ClaimTarget, Device, DeviceSnapshot, Error,
    KeyStore, Limits, OtkCounts, Result, SyncState, Upload, UploadOutcome, UserId, broadcast,
};
use redb::{Database, ReadTransaction, ReadableDatabase};
use slot::DbSlot;
use tracing::Instrument as _;

pub use schema::FORMAT_VERSION;

use ops::Fatal;
use writer::{Op, Reply, Writer, WriterConfig};

/// The backend's name in errors and logs.
pub(crate) const BACKEND: &str = "redb";

/// How commits reach the disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedbDurability {
    /// Every commit is durable when it returns (redb's
    /// `Durability::Immediate`, one fsync per batch): an operation that
    /// returned `Ok` survives a crash of the process and of the machine
    /// (R10.1). The default.
    #[default]
    Immediate,
    /// Batches commit without an fsync (redb's `Durability::None`), and an
    /// empty durable commit at least every `flush_every` makes them durable.
    ///
    /// **Not durable:** a crash (even of the process alone) loses the
    /// operations of the last `flush_every`, although they returned `Ok`;
    /// a claimed key can then be handed out again after the restart, which
    /// breaks R4.2 and R10.1. For tests, benchmarks and throw-away data.
    Relaxed {
        /// The longest time a returned operation may stay non-durable.
        flush_every: Duration,
    },
}

impl RedbDurability {
    /// [`RedbDurability::Relaxed`] with a flush every 100 ms.
    pub const fn relaxed() -> Self {
        Self::Relaxed {
            flush_every: writer::DEFAULT_FLUSH_EVERY,
        }
    }
}

/// Settings of a [`RedbStore`]; [`RedbOptions::default`] is durable.
///
/// ```
/// use keyclaim_redb::{RedbDurability, RedbOptions};
/// let options = RedbOptions::new()
///     .durability(RedbDurability::Immediate)
///     .max_batch(256);
/// assert_eq!(options.max_batch, 256);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedbOptions {
    /// The limits the store enforces (SPEC section 8).
    pub limits: Limits,
    /// How commits reach the disk. Default [`RedbDurability::Immediate`].
    pub durability: RedbDurability,
    /// The most operations the writer puts into one write transaction.
    /// Default 256.
    pub max_batch: usize,
    /// redb's page cache in bytes; `None` keeps redb's default (1 GiB, an
    /// upper bound that is only used as the file grows).
    pub cache_size: Option<usize>,
    /// How long the writer may wait for more operations before it starts a
    /// batch, when fewer are queued than the previous batch held (the
    /// callers of the previous batch may be sending their next operation
    /// just then). Default zero, off: a batch is what queued up while the
    /// previous one ran, and an operation that finds the writer idle is
    /// committed at once.
    pub linger: Duration,
}

impl Default for RedbOptions {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            durability: RedbDurability::Immediate,
            max_batch: 256,
            cache_size: None,
            linger: Duration::ZERO,
        }
    }
}

impl RedbOptions {
    /// The defaults: durable, default limits, batches of up to 256.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the limits.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets the durability.
    pub fn durability(mut self, durability: RedbDurability) -> Self {
        self.durability = durability;
        self
    }

    /// Sets the largest batch (at least 1).
    pub fn max_batch(mut self, max_batch: usize) -> Self {
        self.max_batch = max_batch.max(1);
        self
    }

    /// Sets how long the writer may wait to fill a batch (default zero).
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// Sets redb's page cache size in bytes.
    pub fn cache_size(mut self, bytes: usize) -> Self {
        self.cache_size = Some(bytes);
        self
    }
}

/// What the writer thread has done since the store was opened: how well
/// group commit is batching.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriterStats {
    /// Batches run to the end: write transactions committed, or dropped
    /// because none of their operations wrote anything (retried uploads,
    /// claims that found nothing, rejections).
    pub batches: u64,
    /// Operations in those batches (rejected ones included).
    pub operations: u64,
    /// The most operations one batch held.
    pub largest_batch: u64,
    /// Transactions abandoned or whose commit failed (a batch whose
    /// operations were then retried one by one counts once, and each
    /// failing retry once more).
    pub failed_batches: u64,
}

/// The source of the [`Error::Storage`] that [`RedbStore::open`] returns
/// when the file is already open: by another process, or by another store
/// in this process. A redb file has one user at a time (R10.3); close the
/// other store first.
#[derive(Debug)]
pub struct AlreadyOpen {
    /// The file.
    pub path: PathBuf,
    source: redb::DatabaseError,
}

impl fmt::Display for AlreadyOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the redb file {} is already open (by another process or another store in this \
             process); a redb store has one user at a time",
            self.path.display()
        )
    }
}

impl std::error::Error for AlreadyOpen {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl AlreadyOpen {
    /// Whether `error` is (or wraps) an [`AlreadyOpen`].
    pub fn is(error: &Error) -> bool {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(e) = source {
            if e.is::<Self>() {
                return true;
            }
            source = e.source();
        }
        false
    }
}

/// Opens (or creates) the file and checks its format; blocking.
pub(crate) fn open_database(path: &Path, options: &RedbOptions) -> Result<Database> {
    if !path.exists() {
        create_atomically(path, options)?;
    }
    let mut builder = redb::Builder::new();
    if let Some(bytes) = options.cache_size {
        builder.set_cache_size(bytes);
    }
    let db = builder.create(path).map_err(|e| {
        if schema::is_already_open(&e) {
            Error::storage(
                BACKEND,
                "open",
                false,
                AlreadyOpen {
                    path: path.to_owned(),
                    source: e,
                },
            )
        } else {
            schema::storage("open")(e)
        }
    })?;
    schema::init_or_check(&db)?;
    Ok(db)
}

/// Creates a new store file under a temporary name beside `path`, writes
/// its format version and tables, and renames it into place, so that a
/// crash (SIGKILL) during creation never leaves a file at `path` that
/// cannot be opened (R10.2): either there is no file yet, or a complete one.
fn create_atomically(path: &Path, options: &RedbOptions) -> Result<()> {
    let io = |e: std::io::Error| Error::storage(BACKEND, "create", true, e);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.creating-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    {
        let mut builder = redb::Builder::new();
        if let Some(bytes) = options.cache_size {
            builder.set_cache_size(bytes);
        }
        let db = builder.create(&tmp).map_err(schema::storage("create"))?;
        schema::init_or_check(&db)?;
    }
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

/// Runs a read transaction on the blocking pool.
pub(crate) async fn read<T, F>(slot: &Arc<DbSlot>, op: &'static str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&ReadTransaction) -> std::result::Result<T, Fatal> + Send + 'static,
{
    let slot = Arc::clone(slot);
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        let _enter = span.enter();
        let db = slot.get(op)?;
        let txn = db.begin_read().map_err(|e| Fatal::from(e).into_error(op))?;
        f(&txn).map_err(|f| f.into_error(op))
    })
    .await
    .map_err(|e| Error::storage(BACKEND, op, false, e))?
}

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
    limits: Limits,
    notifier: ChangeNotifier,
    path: PathBuf,
    options: RedbOptions,
}

impl fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .field("durability", &self.options.durability)
            .field("max_batch", &self.options.max_batch)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl RedbStore {
    /// Opens the store in the file at `path`, creating it if needed, with
    /// durable default settings.
    ///
    /// # Errors
    /// [`Error::Storage`] when the file cannot be opened (with an
    /// [`AlreadyOpen`] source when another process or store holds it);
    /// [`Error::UnsupportedVersion`] when it was written by a newer format.
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
            .map_err(|e| Error::storage(BACKEND, "open", false, e))?
    }

    fn open_blocking(path: PathBuf, options: RedbOptions) -> Result<RedbStore> {
        let db = open_database(&path, &options)?;
        let slot = Arc::new(DbSlot::new(path.clone(), options.clone(), db));
        let notifier = ChangeNotifier::new();
        let writer = Writer::start(
            Arc::clone(&slot),
            WriterConfig {
                limits: options.limits.clone(),
                durability: options.durability,
                max_batch: options.max_batch.max(1),
                linger: options.linger,
            },
            notifier.clone(),
        )?;
        tracing::debug!(path = %path.display(), "opened redb store");
        Ok(RedbStore {
            writer,
            slot,
            limits: options.limits.clone(),
            notifier,
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
    /// [`Error::Storage`] if the blocking task fails.
    pub async fn close(self) -> Result<()> {
        tokio::task::spawn_blocking(move || drop(self))
            .await
            .map_err(|e| Error::storage(BACKEND, "close", false, e))
    }

    /// Counters of the writer thread (batches, operations, largest batch).
    pub fn writer_stats(&self) -> WriterStats {
        self.writer.stats()
    }

    async fn submit(&self, op: Op) -> Result<Reply> {
        self.writer.submit(op).await
    }
}

fn wrong_reply(op: &'static str) -> Error {
    Error::storage(BACKEND, op, false, "the writer answered another operation")
}

#[async_trait]
impl KeyStore for RedbStore {
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
        let span = tracing::debug_span!(
            "keyclaim_redb.upload",
            device = %upload.device,
            otks = upload.one_time_keys.len(),
            fallbacks = upload.fallback_keys.len(),
            changed = tracing::field::Empty,
        );
        async {
            self.limits.check_upload(upload)?;
            match self.submit(Op::Upload(upload.clone())).await? {
                Reply::Upload(outcome) => {
                    tracing::Span::current().record("changed", !outcome.changes.is_empty());
                    Ok(outcome)
                }
                _ => Err(wrong_reply("upload")),
            }
        }
        .instrument(span)
        .await
    }

    async fn claim(&self, targets: &[ClaimTarget]) -> Result<ClaimOutcome> {
        let span = tracing::debug_span!(
            "keyclaim_redb.claim",
            targets = targets.len(),
            issued = tracing::field::Empty,
        );
        async {
            self.limits.check_claim(targets)?;
            // Shared with the writer: no second copy of a big claim.
            let targets: Arc<[ClaimTarget]> = targets
                .iter()
                .filter(|t| self.limits.clamp_count(t.count) > 0)
                .cloned()
                .collect();
            if targets.is_empty() {
                return Ok(ClaimOutcome::default());
            }
            match self.submit(Op::Claim(Arc::clone(&targets))).await? {
                Reply::Claim(raw) => {
                    let outcome = raw.into_outcome(&targets)?;
                    tracing::Span::current().record("issued", outcome.keys.len());
                    Ok(outcome)
                }
                _ => Err(wrong_reply("claim")),
            }
        }
        .instrument(span)
        .await
    }

    async fn otk_counts(&self, device: &Device) -> Result<OtkCounts> {
        let span = tracing::trace_span!("keyclaim_redb.otk_counts", device = %device);
        let device = device.clone();
        read(&self.slot, "otk_counts", move |txn| {
            let table = txn.open_table(schema::OTK_QUEUE)?;
            ops::counts(&table, device.user_id.as_str(), device.device_id.as_str())
        })
        .instrument(span)
        .await
    }

    async fn unused_fallback_types(&self, device: &Device) -> Result<Vec<Algorithm>> {
        let span = tracing::trace_span!("keyclaim_redb.unused_fallback_types", device = %device);
        let device = device.clone();
        read(&self.slot, "unused_fallback_types", move |txn| {
            let table = txn.open_table(schema::FALLBACKS)?;
            ops::unused_fallback_types(&table, device.user_id.as_str(), device.device_id.as_str())
        })
        .instrument(span)
        .await
    }

    async fn sync_state(&self, device: &Device) -> Result<SyncState> {
        let span = tracing::trace_span!("keyclaim_redb.sync_state", device = %device);
        let device = device.clone();
        read(&self.slot, "sync_state", move |txn| {
            ops::sync_state(txn, &device)
        })
        .instrument(span)
        .await
    }

    async fn delete_device(&self, device: &Device) -> Result<Changes> {
        let span = tracing::debug_span!("keyclaim_redb.delete_device", device = %device);
        async {
            match self.submit(Op::DeleteDevice(device.clone())).await? {
                Reply::Changes(changes) => Ok(changes),
                _ => Err(wrong_reply("delete_device")),
            }
        }
        .instrument(span)
        .await
    }

    async fn delete_user(&self, user: &UserId) -> Result<Changes> {
        let span = tracing::debug_span!(
            "keyclaim_redb.delete_user",
            user = %user,
            devices = tracing::field::Empty,
        );
        async {
            match self.submit(Op::DeleteUser(user.clone())).await? {
                Reply::Changes(changes) => {
                    tracing::Span::current().record("devices", changes.devices().len());
                    Ok(changes)
                }
                _ => Err(wrong_reply("delete_user")),
            }
        }
        .instrument(span)
        .await
    }

    async fn export_devices(
        &self,
        after: Option<&Device>,
        limit: usize,
    ) -> Result<Vec<DeviceSnapshot>> {
        let span = tracing::debug_span!("keyclaim_redb.export_devices", limit);
        let after = after.cloned();
        let limits = self.limits.clone();
        read(&self.slot, "export_devices", move |txn| {
            ops::export_devices(txn, after.as_ref(), limit, &limits)
        })
        .instrument(span)
        .await
    }

    async fn import_device(&self, snapshot: &DeviceSnapshot) -> Result<Changes> {
        let span = tracing::debug_span!(
            "keyclaim_redb.import_device",
            device = %snapshot.device,
            otks = snapshot.one_time_keys.len(),
            fallbacks = snapshot.fallback_keys.len(),
        );
        async {
            match self.submit(Op::Import(snapshot.clone())).await? {
                Reply::Changes(changes) => Ok(changes),
                _ => Err(wrong_reply("import_device")),
            }
        }
        .instrument(span)
        .await
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
