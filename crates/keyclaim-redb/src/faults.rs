//! Fault injection for tests (feature `fault-injection`): never enable it in
//! a build that serves keys.
//!
//! A [`Faults`] handle, given to a store with
//! [`RedbOptions::faults`](crate::RedbOptions::faults), lets a test make the
//! store's writer thread panic or stall, and the store's file fail its
//! writes or its syncs with `EIO` (R10.8). Clones share their state, so the
//! test keeps one clone and the store another.
//!
//! The file is opened through a [`redb::StorageBackend`] that wraps redb's
//! own file backend. It models what a failed `fsync` means: the writes made
//! since the last successful sync may never reach the disk. When a sync
//! fails, it puts back what those writes overwrote (and the file's length),
//! so the file holds what was on disk at the last successful sync: a store
//! that went on serving what it could not sync would answer differently
//! from the file. A failed write writes nothing.
//!
//! ```
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use keyclaim_redb::faults::Faults;
//! use keyclaim_redb::{RedbOptions, RedbStore};
//!
//! let dir = tempfile::tempdir()?;
//! let faults = Faults::new();
//! let options = RedbOptions::new().faults(faults.clone());
//! let store = RedbStore::open_with(dir.path().join("k.redb"), options).await?;
//! let stall = faults.stall_writer();
//! // ... queue operations: the writer takes a batch and waits ...
//! drop(stall);
//! # drop(store);
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::fs::File;
use std::io;
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex};
use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// Faults to inject into one store (see the module docs). Cloning shares
/// the state.
#[derive(Clone, Default)]
pub struct Faults {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Writer panics still to inject.
    panics: AtomicU64,
    stall: Mutex<Stall>,
    stall_changed: Condvar,
    /// Writes (and length changes) still to fail.
    write_failures: AtomicU64,
    /// Syncs still to fail.
    sync_failures: AtomicU64,
    writes_failed: AtomicU64,
    syncs: AtomicU64,
    syncs_failed: AtomicU64,
}

#[derive(Default)]
struct Stall {
    /// Stall guards alive.
    requested: u64,
    /// The writer waits in a stall now.
    parked: bool,
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Faults")
            .field("panics", &self.inner.panics.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Two handles are equal when they share their state.
impl PartialEq for Faults {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Eq for Faults {}

impl Faults {
    /// No faults yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the writer thread panic once, when it has taken its next
    /// batch and before it runs it.
    pub fn panic_writer(&self) {
        self.inner.panics.fetch_add(1, Ordering::SeqCst);
    }

    /// Stops the writer thread once it has taken its next batch (before it
    /// runs it), until the returned guard is dropped. Operations queued
    /// meanwhile wait in the queue.
    #[must_use = "the writer resumes when the guard is dropped"]
    pub fn stall_writer(&self) -> WriterStall {
        self.inner.stall.lock().requested += 1;
        WriterStall {
            faults: self.clone(),
        }
    }

    /// Makes the next `n` writes (or length changes) of the file fail with
    /// `EIO`, writing nothing; `u64::MAX` fails every write until
    /// [`Faults::heal`].
    pub fn fail_writes(&self, n: u64) {
        self.inner.write_failures.store(n, Ordering::SeqCst);
    }

    /// Makes the next `n` syncs of the file fail with `EIO`, losing the
    /// writes made since the last successful sync (see the module docs);
    /// `u64::MAX` fails every sync until [`Faults::heal`].
    pub fn fail_syncs(&self, n: u64) {
        self.inner.sync_failures.store(n, Ordering::SeqCst);
    }

    /// Ends the disk faults: writes and syncs succeed again.
    pub fn heal(&self) {
        self.fail_writes(0);
        self.fail_syncs(0);
    }

    /// Writes (and length changes) failed so far.
    pub fn writes_failed(&self) -> u64 {
        self.inner.writes_failed.load(Ordering::SeqCst)
    }

    /// Syncs tried so far, failed ones included.
    pub fn syncs(&self) -> u64 {
        self.inner.syncs.load(Ordering::SeqCst)
    }

    /// Syncs failed so far.
    pub fn syncs_failed(&self) -> u64 {
        self.inner.syncs_failed.load(Ordering::SeqCst)
    }

    /// Whether a write is to fail now (counting it down).
    fn write_fails(&self) -> bool {
        let fails = take_one(&self.inner.write_failures);
        if fails {
            self.inner.writes_failed.fetch_add(1, Ordering::SeqCst);
        }
        fails
    }

    /// Whether a sync is to fail now (counting it down).
    fn sync_fails(&self) -> bool {
        self.inner.syncs.fetch_add(1, Ordering::SeqCst);
        let fails = take_one(&self.inner.sync_failures);
        if fails {
            self.inner.syncs_failed.fetch_add(1, Ordering::SeqCst);
        }
        fails
    }

    /// Opens the store's file through the fault-injecting backend.
    pub(crate) fn open_file(
        &self,
        builder: &redb::Builder,
        path: &std::path::Path,
    ) -> Result<redb::Database, redb::DatabaseError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        builder.create_with_backend(FaultyFile::new(file, self.clone())?)
    }

    /// Whether the writer waits in a stall now, holding the batch it took.
    pub fn writer_stalled(&self) -> bool {
        self.inner.stall.lock().parked
    }

    /// Called by the writer with each batch it took, before running it:
    /// panics or waits when told to.
    pub(crate) fn batch_taken(&self) {
        let panic_now = self
            .inner
            .panics
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        // A test-only fault: the panic is the point.
        #[allow(clippy::panic)]
        if panic_now {
            panic!("keyclaim-redb: injected writer panic");
        }
        let mut stall = self.inner.stall.lock();
        while stall.requested > 0 {
            stall.parked = true;
            self.inner.stall_changed.wait(&mut stall);
        }
        stall.parked = false;
    }
}

/// Counts a fault down by one; `u64::MAX` stays.
fn take_one(left: &AtomicU64) -> bool {
    left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
        0 => None,
        u64::MAX => Some(u64::MAX),
        n => Some(n - 1),
    })
    .is_ok()
}

/// `EIO`, as the kernel reports a failed write or sync (5 on Linux and
/// the other Unixes).
fn eio() -> io::Error {
    io::Error::from_raw_os_error(5)
}

/// redb's file backend, with the injected faults (see the module docs).
#[derive(Debug)]
struct FaultyFile {
    inner: FileBackend,
    faults: Faults,
    undo: Mutex<Undo>,
}

/// What the writes since the last successful sync overwrote.
#[derive(Debug)]
struct Undo {
    /// Oldest first: an offset and the bytes that were there (none past
    /// the file's length at the time).
    overwritten: Vec<(u64, Vec<u8>)>,
    /// The file's length at the last successful sync.
    synced_len: u64,
}

impl FaultyFile {
    fn new(file: File, faults: Faults) -> Result<Self, redb::DatabaseError> {
        let inner = FileBackend::new(file)?;
        let synced_len = inner.len()?;
        Ok(Self {
            inner,
            faults,
            undo: Mutex::new(Undo {
                overwritten: Vec::new(),
                synced_len,
            }),
        })
    }

    /// Remembers the bytes at `offset..end` (those that exist) before they
    /// are overwritten or cut off.
    fn remember(&self, undo: &mut Undo, offset: u64, end: u64) -> io::Result<()> {
        let end = end.min(self.inner.len()?);
        let mut old = vec![0; usize::try_from(end.saturating_sub(offset)).unwrap_or(0)];
        if !old.is_empty() {
            self.inner.read(offset, &mut old)?;
        }
        undo.overwritten.push((offset, old));
        Ok(())
    }
}

impl StorageBackend for FaultyFile {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.faults.write_fails() {
            return Err(eio());
        }
        let mut undo = self.undo.lock();
        self.remember(&mut undo, len, u64::MAX)?;
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut undo = self.undo.lock();
        if self.faults.sync_fails() {
            // The writes since the last good sync never reach the disk:
            // put back what they overwrote, newest first.
            for (offset, old) in undo.overwritten.drain(..).rev() {
                if !old.is_empty() {
                    self.inner.write(offset, &old)?;
                }
            }
            self.inner.set_len(undo.synced_len)?;
            self.inner.sync_data()?;
            return Err(eio());
        }
        self.inner.sync_data()?;
        undo.overwritten.clear();
        undo.synced_len = self.inner.len()?;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.faults.write_fails() {
            return Err(eio());
        }
        let mut undo = self.undo.lock();
        let end = offset.saturating_add(data.len() as u64);
        self.remember(&mut undo, offset, end)?;
        self.inner.write(offset, data)
    }

    fn close(&self) -> io::Result<()> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

/// Keeps the writer stalled (see [`Faults::stall_writer`]) until dropped.
#[derive(Debug)]
pub struct WriterStall {
    faults: Faults,
}

impl WriterStall {
    /// Lets the writer go on (the same as dropping the guard).
    pub fn release(self) {}
}

impl Drop for WriterStall {
    fn drop(&mut self) {
        let inner = &self.faults.inner;
        let mut stall = inner.stall.lock();
        stall.requested = stall.requested.saturating_sub(1);
        drop(stall);
        inner.stall_changed.notify_all();
    }
}
