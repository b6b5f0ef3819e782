//! The open database, replaceable after an I/O error.
//!
//! After an I/O error (a full disk, say) redb refuses every later operation
//! on that handle with "previous I/O error" until the file is closed and
//! opened again, which repairs it. So the handle lives in a slot: readers
//! and the writer take a clone of the `Arc` per transaction, and the writer,
//! when a batch fails with an I/O error, empties the slot, waits for the
//! transactions in flight to drop their clones, closes the file and opens it
//! again. Until that succeeded, operations fail with a retryable
//! [`Error::Storage`]; the next batch tries again. The store then works
//! again without a restart once the disk has room.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyclaim::{Error, Result};
use parking_lot::{Mutex, RwLock};
use redb::Database;

use crate::{BACKEND, RedbOptions, open_database};

/// How long a reopen waits for transactions in flight to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The database handle of a store (see the module docs).
pub(crate) struct DbSlot {
    path: PathBuf,
    options: RedbOptions,
    db: RwLock<Option<Arc<Database>>>,
    reopening: Mutex<()>,
}

/// The error of an operation that found the slot empty.
#[derive(Debug)]
struct Reopening;

impl std::fmt::Display for Reopening {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the redb file is being reopened after an I/O error; try again")
    }
}

impl std::error::Error for Reopening {}

impl DbSlot {
    pub(crate) fn new(path: PathBuf, options: RedbOptions, db: Database) -> Self {
        Self {
            path,
            options,
            db: RwLock::new(Some(Arc::new(db))),
            reopening: Mutex::new(()),
        }
    }

    /// The open database, for one transaction.
    ///
    /// # Errors
    /// A retryable [`Error::Storage`] while the file is being reopened, or
    /// after a reopen failed.
    pub(crate) fn get(&self, op: &'static str) -> Result<Arc<Database>> {
        self.db
            .read()
            .clone()
            .ok_or_else(|| Error::storage(BACKEND, op, true, Reopening))
    }

    /// The open database, reopening the file first if the slot is empty.
    ///
    /// # Errors
    /// As [`DbSlot::reopen`].
    pub(crate) fn get_or_reopen(&self, op: &'static str) -> Result<Arc<Database>> {
        match self.get(op) {
            Ok(db) => Ok(db),
            Err(_) => {
                self.reopen()?;
                self.get(op)
            }
        }
    }

    /// Closes the database and opens the file again. Blocking: waits for
    /// the transactions in flight to finish (at most 10 s) and runs redb's
    /// repair. The caller must hold no clone of the handle.
    ///
    /// # Errors
    /// [`Error::Storage`] (retryable) when the handle stays in use or the
    /// file cannot be opened; the slot then stays empty and the next
    /// [`DbSlot::get_or_reopen`] tries again.
    pub(crate) fn reopen(&self) -> Result<()> {
        let _one_at_a_time = self.reopening.lock();
        let taken = self.db.write().take();
        if let Some(mut old) = taken {
            let deadline = Instant::now() + DRAIN_TIMEOUT;
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        // Closing a handle after an I/O error may fail too;
                        // the open below repairs the file either way.
                        drop(db);
                        break;
                    }
                    Err(still_shared) if Instant::now() < deadline => {
                        old = still_shared;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(still_shared) => {
                        *self.db.write() = Some(still_shared);
                        return Err(Error::storage(
                            BACKEND,
                            "reopen",
                            true,
                            "the redb handle is still in use; not reopened",
                        ));
                    }
                }
            }
        }
        let db = open_database(&self.path, &self.options).map_err(|e| match e {
            Error::Storage { source, .. } => Error::storage(BACKEND, "reopen", true, source),
            other => other,
        })?;
        *self.db.write() = Some(Arc::new(db));
        tracing::warn!(path = %self.path.display(), "reopened the redb file after an I/O error");
        Ok(())
    }
}

/// Whether an error means redb's handle is unusable until reopened (an I/O
/// error, or redb's "previous I/O error").
pub(crate) fn needs_reopen(error: &Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(e) = e.downcast_ref::<redb::Error>() {
            return is_io(e);
        }
        source = e.source();
    }
    false
}

/// Whether a redb error is an I/O failure of the storage.
pub(crate) fn is_io(e: &redb::Error) -> bool {
    matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo)
}
