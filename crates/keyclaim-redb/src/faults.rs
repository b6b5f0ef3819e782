//! Fault injection for tests (feature `fault-injection`): never enable it in
//! a build that serves keys.
//!
//! A [`Faults`] handle, given to a store with
//! [`RedbOptions::faults`](crate::RedbOptions::faults), lets a test make the
//! store's writer thread panic or stall. Clones share their state, so the
//! test keeps one clone and the store another.
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
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex};

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
