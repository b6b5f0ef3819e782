//! Opening the file, and the open database, replaceable after an I/O
//! error.
//!
//! A new file is created under a temporary name and renamed into place
//! ([`open_database`]), so that a crash during creation never leaves a file
//! that cannot be opened (R10.2).
//!
//! After an I/O error (a full disk, say) redb refuses every later operation
//! on that handle with "previous I/O error" until the file is closed and
//! opened again, which repairs it. So the handle lives in a slot: readers
//! and the writer take a clone of the `Arc` per transaction, and the writer,
//! when a batch fails with an I/O error, empties the slot, waits for the
//! transactions in flight to drop their clones, closes the file and opens it
//! again: the store then serves what the file holds, never what redb held
//! in memory but could not sync (R10.8). Until that succeeded, operations
//! fail with a retryable [`Error::Storage`](keyclaim::Error::Storage); the
//! next batch or read tries again. The store then works again without a
//! restart once the disk has room or works.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyclaim::Result;
use parking_lot::{Mutex, RwLock};
use redb::Database;

use crate::hooks::Hooks;
use crate::{RedbOptions, error, schema};

/// How long a reopen waits for transactions in flight to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The database handle of a store (see the module docs).
pub(crate) struct DbSlot {
    path: PathBuf,
    options: RedbOptions,
    db: RwLock<Option<Arc<Database>>>,
    reopening: Mutex<()>,
}

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
    /// A retryable [`Error::Storage`](keyclaim::Error::Storage) while the
    /// file is being reopened, or after a reopen failed.
    pub(crate) fn get(&self, op: &'static str) -> Result<Arc<Database>> {
        self.db.read().clone().ok_or_else(|| error::reopening(op))
    }

    /// The open database, opening the file first if the slot is empty (a
    /// reopen after an I/O error failed, say while the disk was still
    /// full or failing).
    ///
    /// # Errors
    /// As [`DbSlot::reopen`].
    pub(crate) fn get_or_reopen(&self, op: &'static str) -> Result<Arc<Database>> {
        if let Ok(db) = self.get(op) {
            return Ok(db);
        }
        let _one_at_a_time = self.reopening.lock();
        // Another caller may have opened it meanwhile.
        if let Ok(db) = self.get(op) {
            return Ok(db);
        }
        self.open_into_slot()?;
        self.get(op)
    }

    /// Closes the database and opens the file again. Blocking: waits for
    /// the transactions in flight to finish (at most 10 s) and runs redb's
    /// repair. The caller must hold no clone of the handle.
    ///
    /// # Errors
    /// [`Error::Storage`](keyclaim::Error::Storage) (retryable) when the
    /// handle stays in use or the file cannot be opened; the slot then stays
    /// empty and the next [`DbSlot::get_or_reopen`] tries again.
    pub(crate) fn reopen(&self) -> Result<()> {
        let _one_at_a_time = self.reopening.lock();
        let span = tracing::debug_span!("keyclaim.redb.reopen");
        let _enter = span.enter();
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
                        return Err(error::still_in_use());
                    }
                }
            }
        }
        self.open_into_slot()
    }

    /// Opens the file into the empty slot; the caller holds `reopening`.
    fn open_into_slot(&self) -> Result<()> {
        let db = open_database(&self.path, &self.options).map_err(error::reopen_failed)?;
        *self.db.write() = Some(Arc::new(db));
        tracing::warn!(path = %self.path.display(), "reopened the redb file");
        Ok(())
    }
}

/// Opens (or creates) the file and checks its format, migrating an older
/// one; blocking.
///
/// # Errors
/// As [`RedbStore::open`](crate::RedbStore::open).
pub(crate) fn open_database(path: &Path, options: &RedbOptions) -> Result<Database> {
    let span = tracing::debug_span!("keyclaim.redb.open", path = %path.display());
    let _enter = span.enter();
    if !path.exists() {
        create_atomically(path, options)?;
    }
    let db = Hooks::new(options)
        .create(&builder(options), path)
        .map_err(|e| error::open_failed(path, e))?;
    schema::init_or_check(&db)?;
    Ok(db)
}

/// redb's builder with the options' cache size.
fn builder(options: &RedbOptions) -> redb::Builder {
    let mut builder = redb::Builder::new();
    if let Some(bytes) = options.get_cache_size() {
        builder.set_cache_size(bytes);
    }
    builder
}

/// Creates a new store file under a temporary name beside `path`, writes
/// its format version and tables, and renames it into place, so that a
/// crash (SIGKILL) during creation never leaves a file at `path` that
/// cannot be opened (R10.2): either there is no file yet, or a complete one.
fn create_atomically(path: &Path, options: &RedbOptions) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.creating-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    {
        let db = builder(options)
            .create(&tmp)
            .map_err(error::storage("create"))?;
        schema::init_or_check(&db)?;
    }
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(error::create_io)?;
    std::fs::rename(&tmp, path).map_err(error::create_io)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(error::create_io)?;
    }
    Ok(())
}
