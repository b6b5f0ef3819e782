#![doc = include_str!("../README.md")]

// The same file roles as every backend crate: this file holds the store and
// its `Backend` impl; `options` its settings; `error` every mapping to
// `keyclaim::Error`; `schema` the key layout, the format version and
// opening; `ops` the operations, one file per kind; `writer` the
// group-commit writer thread. Besides: `engine` the trait an engine
// implements, `engine_suite` its tests, `memory` the in-memory engine and
// `txn` the writer's view of the engine through a batch's pending writes.
pub mod engine;
pub mod engine_suite;
mod error;
mod memory;
mod ops;
mod options;
mod schema;
mod txn;
mod writer;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use keyclaim::backend::{Backend, StoreCore, async_trait};
use keyclaim::transfer::DeviceSnapshot;
use keyclaim::{
    Algorithm, Changes, ClaimOutcome, ClaimTarget, Device, DeviceId, FallbackTarget, ResetScope,
    Result, StoredFallback, SyncState, Upload, UploadOutcome, UserId,
};
use parking_lot::RwLock;

pub use engine::{BatchOp, EngineError, EngineResult, KvEngine, Space, Visitor, WriteBatch};
pub use memory::MemoryEngine;
pub use options::KvOptions;
pub use schema::FORMAT_VERSION;
pub use writer::WriterStats;

use keyclaim::backend::writer::{FromWriteReply, WriteOp};
use txn::Direct;
use writer::{Writer, WriterConfig};

/// The examples of `docs/adapter-guide.md`, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/adapter-guide.md")]
pub struct AdapterGuide;

/// The backend's name in errors and logs.
pub(crate) const BACKEND: &str = "kv";

/// What the writer thread and the readers share: the engine, and the gate
/// that keeps multi-read operations (exports) from seeing a batch applied
/// half-way through them (see [`writer`]).
pub(crate) struct Shared<E> {
    pub(crate) engine: E,
    pub(crate) gate: RwLock<()>,
}

/// A keyclaim store over a [`KvEngine`].
///
/// - Writes go through one writer thread per store that groups concurrent
///   operations into one engine batch (group commit), durable by default.
/// - Reads run on tokio's blocking pool: one point read per device for
///   counts, sync state and fallback keys; no engine call runs on the async
///   runtime's threads.
/// - One store per engine's key spaces at a time: the store assumes it is
///   their only writer (see [`KvEngine`]).
/// - Needs a tokio runtime (any flavour).
/// - Dropping the store waits for the queued writes to finish;
///   [`KvStore::close`] does the same off the async threads.
///
/// `Send + Sync`; share it as `Arc<KvStore<E>>` or `Arc<dyn KeyStore>`.
pub struct KvStore<E: KvEngine> {
    // Declared first: dropped (joined) before the engine.
    writer: Writer,
    shared: Arc<Shared<E>>,
    core: StoreCore,
    options: KvOptions,
}

impl<E: KvEngine> fmt::Debug for KvStore<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvStore")
            .field("engine", &std::any::type_name::<E>())
            .field("durable", &self.options.get_durable())
            .field("max_batch", &self.options.get_max_batch())
            .field("max_queued", &self.options.get_max_queued())
            .field("limits", self.core.limits())
            .finish_non_exhaustive()
    }
}

impl<E: KvEngine> KvStore<E> {
    /// Opens a store over `engine` with durable default settings: stamps
    /// the format version into an empty engine, or checks it.
    ///
    /// # Errors
    /// [`Error::UnsupportedVersion`](keyclaim::Error::UnsupportedVersion)
    /// when the data was written by a newer format;
    /// [`Error::Corrupt`](keyclaim::Error::Corrupt) when the key spaces
    /// hold data without a format version; a retryable
    /// [`Error::Storage`](keyclaim::Error::Storage) when the engine fails.
    pub async fn open(engine: E) -> Result<KvStore<E>> {
        Self::open_with(engine, KvOptions::default()).await
    }

    /// Opens a store with the given options.
    ///
    /// # Errors
    /// As [`KvStore::open`].
    pub async fn open_with(engine: E, options: KvOptions) -> Result<KvStore<E>> {
        tokio::task::spawn_blocking(move || Self::open_blocking(engine, options))
            .await
            .map_err(|e| error::task_failed("open", e))?
    }

    fn open_blocking(engine: E, options: KvOptions) -> Result<KvStore<E>> {
        schema::init_or_check(&engine)?;
        let shared = Arc::new(Shared {
            engine,
            gate: RwLock::new(()),
        });
        let writer = Writer::start(
            Arc::clone(&shared),
            WriterConfig {
                limits: options.get_limits().clone(),
                durable: options.get_durable(),
                max_batch: options.get_max_batch(),
                max_queued: options.get_max_queued(),
            },
        )?;
        tracing::debug!(
            engine = std::any::type_name::<E>(),
            "opened a key-value store"
        );
        Ok(KvStore {
            writer,
            core: StoreCore::new(options.get_limits().clone()),
            shared,
            options,
        })
    }

    /// The engine the store runs on. Read it if you like; never write to
    /// keyclaim's key spaces.
    pub fn engine(&self) -> &E {
        &self.shared.engine
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &KvOptions {
        &self.options
    }

    /// Counters of the writer thread (batches, operations, largest batch).
    pub fn writer_stats(&self) -> WriterStats {
        self.writer.stats()
    }

    /// Waits for the queued writes and stops the writer thread, on the
    /// blocking pool.
    ///
    /// # Errors
    /// [`Error::Storage`](keyclaim::Error::Storage) if the blocking task
    /// fails.
    pub async fn close(self) -> Result<()> {
        tokio::task::spawn_blocking(move || drop(self))
            .await
            .map_err(|e| error::task_failed("close", e))
    }

    /// Runs a mutation on the writer thread and answers its outcome.
    async fn submit<T: FromWriteReply>(&self, op: WriteOp) -> Result<T> {
        self.writer.submit(op).await
    }

    /// Runs a read on the blocking pool, in the caller's span.
    async fn read<T, F>(&self, op: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Shared<E>) -> Result<T> + Send + 'static,
    {
        let shared = Arc::clone(&self.shared);
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _enter = span.enter();
            f(&shared)
        })
        .await
        .map_err(|e| error::task_failed(op, e))?
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
impl<E: KvEngine> Backend for KvStore<E> {
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
        self.submit(WriteOp::Replace {
            previous: previous.cloned(),
            upload: upload.clone(),
        })
        .await
    }

    async fn fallback_keys(&self, device: &Device) -> Result<BTreeMap<Algorithm, StoredFallback>> {
        let device = device.clone();
        self.read("fallback_keys", move |shared| {
            let src = Direct {
                engine: &shared.engine,
                op: "fallback_keys",
            };
            ops::fallback_keys(&src, &device)
        })
        .await
    }

    async fn counts_many(&self, devices: &[Device]) -> Result<Vec<SyncState>> {
        let devices = devices.to_vec();
        self.read("counts_many", move |shared| {
            ops::counts_many(&shared.engine, &devices)
        })
        .await
    }

    async fn sync_state(&self, device: &Device) -> Result<SyncState> {
        let device = device.clone();
        self.read("sync_state", move |shared| {
            let src = Direct {
                engine: &shared.engine,
                op: "sync_state",
            };
            ops::sync_state(&src, &device)
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
        self.read("export_devices", move |shared| {
            // No batch is applied while the page is read (see `Shared`).
            let _gate = shared.gate.read();
            ops::export_devices(&shared.engine, after.as_ref(), limit, &limits)
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
        assert_send_sync::<KvStore<MemoryEngine>>();
        assert_send_sync::<KvStore<Arc<dyn KvEngine>>>();
    }

    mod engine_contract {
        crate::engine_tests!(crate::MemoryEngine::new());
    }
}
