//! The engine trait: what an ordered byte-keyed storage engine gives the
//! layer, and nothing more.
//!
//! An engine is an ordered map of byte keys to byte values per [`Space`],
//! with point reads, forward scans in unsigned byte order, and atomic write
//! batches that span every space. It needs no transactions, locks, snapshots
//! or isolation: [`KvStore`](crate::KvStore) brings those (one writer per
//! store, consistent reads). See [`KvEngine`] for the contract an adapter
//! keeps, and [`crate::engine_suite`] for the tests that check it.

use std::fmt;
use std::ops::ControlFlow;
use std::sync::Arc;

use keyclaim::BoxError;

/// One of the fixed key spaces (tables) the layer uses.
///
/// An adapter maps each space to a separate ordered map: a RocksDB column
/// family, a tree, a key prefix of its own. Keys of different spaces never
/// meet: a scan of one space never returns keys of another, and the same
/// key may exist in two spaces with different values. One
/// [`WriteBatch`] spans every space atomically.
///
/// The set is fixed by the layout's format version ([`crate::FORMAT_VERSION`]);
/// an adapter handles every space of [`Space::ALL`] and can index arrays by
/// [`Space::index`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Space {
    /// The format version and the upload sequence counter.
    Meta,
    /// One record per device: its one-time key queues and fallback keys.
    Devices,
    /// The one-time keys, stored and remembered issued ones, in claim order.
    Keys,
    /// The one-time keys by key ID, for re-upload checks (R3.2, R3.4).
    Ids,
}

impl Space {
    /// Every space, in [`Space::index`] order.
    pub const ALL: [Space; 4] = [Space::Meta, Space::Devices, Space::Keys, Space::Ids];

    /// How many spaces there are.
    pub const COUNT: usize = Self::ALL.len();

    /// The space's position in [`Space::ALL`], `0..Space::COUNT`.
    pub const fn index(self) -> usize {
        match self {
            Self::Meta => 0,
            Self::Devices => 1,
            Self::Keys => 2,
            Self::Ids => 3,
        }
    }

    /// A short lowercase name (`meta`, `devices`, `keys`, `ids`): a default
    /// for an adapter's column family names, which it should prefix (say
    /// `keyclaim_keys`) so that they cannot clash with its own.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Meta => "meta",
            Self::Devices => "devices",
            Self::Keys => "keys",
            Self::Ids => "ids",
        }
    }
}

impl fmt::Display for Space {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One change of a [`WriteBatch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchOp {
    /// Sets `key` of `space` to `value`, replacing any value.
    Put {
        /// The key space.
        space: Space,
        /// The key.
        key: Vec<u8>,
        /// The new value (may be empty).
        value: Vec<u8>,
    },
    /// Removes `key` of `space`; nothing happens if it is absent.
    Delete {
        /// The key space.
        space: Space,
        /// The key.
        key: Vec<u8>,
    },
}

/// Changes applied together by [`KvEngine::write`]: all of them or none.
///
/// Each (space, key) appears at most once in a batch the layer writes, so
/// the order in which an adapter applies them does not matter; they come
/// sorted by space, then key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    ops: Vec<BatchOp>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a put.
    pub fn put(&mut self, space: Space, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push(BatchOp::Put { space, key, value });
    }

    /// Adds a delete.
    pub fn delete(&mut self, space: Space, key: Vec<u8>) {
        self.ops.push(BatchOp::Delete { space, key });
    }

    /// The changes, in the order they were added.
    pub fn ops(&self) -> &[BatchOp] {
        &self.ops
    }

    /// How many changes the batch holds.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the batch holds no change.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// A failure of the engine: I/O, a closed database, anything. The layer
/// turns it into a retryable [`keyclaim::Error::Storage`] of the operation
/// that met it; for a failed [`KvEngine::write`], of every operation of the
/// batch, none of which is acknowledged.
#[derive(Debug)]
pub struct EngineError {
    source: BoxError,
}

impl EngineError {
    /// Wraps the engine's own error.
    pub fn new(source: impl Into<BoxError>) -> Self {
        Self {
            source: source.into(),
        }
    }

    /// The engine's own error.
    pub fn source_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }

    /// The engine's own error, by value.
    pub fn into_source(self) -> BoxError {
        self.source
    }
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key-value engine failed: {}", self.source)
    }
}

impl std::error::Error for EngineError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// What [`KvEngine::scan`] calls with each key and its value, in order;
/// [`ControlFlow::Break`] stops the scan.
pub type Visitor<'a> = dyn FnMut(&[u8], &[u8]) -> ControlFlow<()> + 'a;

/// The result of an engine call.
pub type EngineResult<T> = Result<T, EngineError>;

/// An ordered, byte-keyed storage engine with atomic write batches: what a
/// homeserver's storage (RocksDB, or its own wrapper around it) implements
/// for [`KvStore`](crate::KvStore).
///
/// All methods are blocking: the layer calls them from its writer thread
/// and from tokio's blocking pool, never on an async runtime's threads.
/// They take `&self` and are called from several threads at once.
///
/// # The contract (checked by [`crate::engine_suite`])
///
/// To be correct, an engine guarantees:
///
/// 1. **Ordered spaces.** Each [`Space`] is a map from byte keys to byte
///    values of its own; [`KvEngine::scan`] visits keys in unsigned
///    byte-wise (lexicographic) order, shorter before longer on a common
///    prefix (`memcmp` order, RocksDB's default comparator). No custom
///    comparator, no prefix extractor that changes which keys a scan sees.
/// 2. **Atomic batches.** A [`WriteBatch`] is applied as a whole across all
///    spaces: no read (point read or scan, from any thread) ever sees part
///    of it. On `Err`, the batch must not have been applied. An engine that
///    cannot promise that for every failure (say, its log was written but
///    its sync failed) must not go on serving the unsynced data as if it
///    were durable: it fails later calls until it is reopened, as RocksDB
///    does after a failed sync (R10.8).
/// 3. **Durability.** When `write(batch, true)` returns `Ok`, the batch,
///    and every batch written before it, survives a crash of the process
///    and of the machine (an fsync'd log: RocksDB's `sync = true`). A batch
///    written with `durable = false` may be lost in a machine crash, but
///    never partly.
/// 4. **Read your writes.** Once `write` has returned `Ok`, every later
///    read from any thread sees the batch.
///
/// Nothing else is assumed: no isolation between a scan and a concurrent
/// write (a scan may see a batch that commits while it runs, as long as it
/// sees each batch whole or not at all, key by key), no snapshots, no
/// transactions, no compare-and-swap. The layer writes from one thread per
/// store, and serializes the reads that need a consistent view itself.
///
/// # What an adapter must not do
///
/// - Let anything other than one [`KvStore`](crate::KvStore) write to the
///   spaces it maps (another store, the homeserver's own code, a second
///   process): the layer assumes it is the only writer, so foreign writes
///   can hand out keys twice.
/// - Reuse the spaces for other data, or map two spaces to one map without
///   keeping them apart (say with a distinct key prefix per space).
/// - Filter, expire or compact away keys on its own (TTLs, compaction
///   filters).
pub trait KvEngine: Send + Sync + 'static {
    /// The value of `key` in `space`, if present.
    ///
    /// # Errors
    /// Any engine failure.
    fn get(&self, space: Space, key: &[u8]) -> EngineResult<Option<Vec<u8>>>;

    /// The values of many keys of `space`, in the order given. Provided: one
    /// [`KvEngine::get`] per key; an engine with a batched read (RocksDB's
    /// `multi_get`) may override it. Not required to be one consistent
    /// read.
    ///
    /// # Errors
    /// Any engine failure.
    fn get_many(&self, space: Space, keys: &[&[u8]]) -> EngineResult<Vec<Option<Vec<u8>>>> {
        keys.iter().map(|key| self.get(space, key)).collect()
    }

    /// Visits the keys of `space` from `start` (inclusive) up to `end`
    /// (exclusive; `None` for no upper bound) in ascending byte order,
    /// calling `visit` with each key and its value until it answers
    /// [`ControlFlow::Break`] or the range ends.
    ///
    /// `visit` never calls back into the engine, so an engine may hold a
    /// lock or an iterator while it runs. A scan need not be a snapshot, but
    /// each key it visits shows a value some whole batch wrote (rule 2).
    ///
    /// # Errors
    /// Any engine failure; the visit may then have seen part of the range.
    fn scan(
        &self,
        space: Space,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut Visitor<'_>,
    ) -> EngineResult<()>;

    /// Applies `batch` atomically (rule 2); when `durable`, it is durable
    /// when this returns `Ok` (rule 3). An empty batch may be a no-op.
    ///
    /// # Errors
    /// Any engine failure; the batch was then not applied (rule 2).
    fn write(&self, batch: &WriteBatch, durable: bool) -> EngineResult<()>;
}

impl<E: KvEngine + ?Sized> KvEngine for Arc<E> {
    fn get(&self, space: Space, key: &[u8]) -> EngineResult<Option<Vec<u8>>> {
        (**self).get(space, key)
    }

    fn get_many(&self, space: Space, keys: &[&[u8]]) -> EngineResult<Vec<Option<Vec<u8>>>> {
        (**self).get_many(space, keys)
    }

    fn scan(
        &self,
        space: Space,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut Visitor<'_>,
    ) -> EngineResult<()> {
        (**self).scan(space, start, end, visit)
    }

    fn write(&self, batch: &WriteBatch, durable: bool) -> EngineResult<()> {
        (**self).write(batch, durable)
    }
}
