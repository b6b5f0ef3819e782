//! The key-value layer over an engine whose batch writes fail on demand, as
//! an engine's do on `EIO` (R10.8): [`FaultyEngine`] wraps a
//! [`MemoryEngine`], [`KvOnEngine`] opens (and reopens) a store on it, and
//! [`KvWriteFault`] is the scenario's [`Fault`]. Reopening the store on the
//! same engine checks that what the layer keeps in memory (queue heads,
//! counts) did not drift from what the engine holds.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use keyclaim::Limits;
use keyclaim_kv::{
    EngineError, EngineResult, KvEngine, KvOptions, KvStore, MemoryEngine, Space, Visitor,
    WriteBatch,
};

use crate::backends::Persistent;
use crate::differential::BoxFuture;
use crate::faults::{Fault, Opener};

/// A [`MemoryEngine`] whose batch writes fail with `EIO` while the fault is
/// on; a failed batch applies nothing (the engine contract's rule 2).
#[derive(Debug, Default)]
pub struct FaultyEngine {
    inner: MemoryEngine,
    fail_writes: AtomicBool,
    failed: AtomicU64,
}

impl FaultyEngine {
    /// How many batch writes failed.
    pub fn failed_writes(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }
}

impl KvEngine for FaultyEngine {
    fn get(&self, space: Space, key: &[u8]) -> EngineResult<Option<Vec<u8>>> {
        self.inner.get(space, key)
    }

    fn scan(
        &self,
        space: Space,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut Visitor<'_>,
    ) -> EngineResult<()> {
        self.inner.scan(space, start, end, visit)
    }

    fn write(&self, batch: &WriteBatch, durable: bool) -> EngineResult<()> {
        if self.fail_writes.load(Ordering::SeqCst) {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(EngineError::new(io::Error::from_raw_os_error(5)));
        }
        self.inner.write(batch, durable)
    }
}

/// Opens a [`KvStore`] on one shared [`FaultyEngine`]; every open after the
/// first is a reopen on the same data.
#[derive(Debug, Clone, Default)]
pub struct KvOnEngine {
    engine: Arc<FaultyEngine>,
}

impl KvOnEngine {
    /// A new, empty engine.
    pub fn new() -> Self {
        Self::default()
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<FaultyEngine> {
        &self.engine
    }

    /// The fault that switches this engine's write failures, reporting
    /// `dir` as its directory (the engine has none).
    pub fn fault(&self, dir: &Path) -> KvWriteFault {
        KvWriteFault {
            engine: Arc::clone(&self.engine),
            dir: dir.to_owned(),
        }
    }
}

impl Opener for KvOnEngine {
    fn name(&self) -> &'static str {
        "kv"
    }

    fn open(&self, limits: Limits) -> BoxFuture<'_, keyclaim::Result<Persistent>> {
        Box::pin(async move {
            let options = KvOptions::new().limits(limits);
            let store = KvStore::open_with(Arc::clone(&self.engine), options).await?;
            Ok(Persistent::new("kv", Arc::new(store)))
        })
    }
}

/// Batch writes of a [`FaultyEngine`] fail while on.
#[derive(Debug)]
pub struct KvWriteFault {
    engine: Arc<FaultyEngine>,
    dir: std::path::PathBuf,
}

impl Fault for KvWriteFault {
    fn name(&self) -> &str {
        "failing engine batch writes (EIO)"
    }

    fn dir(&self) -> &Path {
        &self.dir
    }

    fn inject(&mut self) -> io::Result<()> {
        self.engine.fail_writes.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn clear(&mut self) -> io::Result<()> {
        self.engine.fail_writes.store(false, Ordering::SeqCst);
        Ok(())
    }

    fn retryable(&self) -> bool {
        true
    }
}
