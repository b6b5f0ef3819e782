//! Every failure of the backend as a [`keyclaim::Error`], in one place.
//!
//! Whether an [`Error::Storage`] is retryable (nothing of the operation was
//! applied and the same call may succeed later) is decided here and nowhere
//! else:
//!
//! - a SQLite error is retryable when it is `BUSY` or `LOCKED` (another
//!   connection, of this or another process, held the lock past the busy
//!   timeout), or an I/O error or a full disk (`IOERR`, `FULL`: a failed
//!   write or sync, R10.8): SQLite rolls the transaction back, and the same
//!   call may succeed once the storage works again ([`sql_error`]);
//! - a batch whose transaction failed as a whole gives every operation in it
//!   the same error ([`BatchFailure`]), retryable when the cause was busy or
//!   a batch-mate's failure;
//! - an operation that never ran (its batch ended first) is retryable;
//! - an operation refused because its queue was full is retryable (R10.6);
//! - a thread that could not be started, an operation that panicked, or a
//!   file that refuses WAL mode is not.

use std::sync::Arc;

use keyclaim::{Error, Result};
use rusqlite::ErrorCode;

use crate::BACKEND;

/// Whether a rusqlite error is SQLite's `BUSY` or `LOCKED`: another
/// connection holds the lock past the busy timeout. Retrying can succeed.
pub(crate) fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

/// Whether a rusqlite error is one that trying again may get past: busy or
/// locked ([`is_busy`]), or a failed write or sync (`IOERR`) or a full disk
/// (`FULL`). A transaction that meets one is rolled back, so nothing of it
/// was applied (R10.8).
pub(crate) fn is_transient(e: &rusqlite::Error) -> bool {
    is_busy(e)
        || matches!(
            e.sqlite_error_code(),
            Some(ErrorCode::SystemIoFailure | ErrorCode::DiskFull)
        )
}

/// Wraps a rusqlite error of operation `op` as [`Error::Storage`]; busy,
/// locked, I/O errors and a full disk are retryable ([`is_transient`]),
/// everything else is not.
pub(crate) fn sql_error(op: &'static str, e: rusqlite::Error) -> Error {
    Error::storage(BACKEND, op, is_transient(&e), e)
}

/// `.ctx(op)` on rusqlite results.
pub(crate) trait SqlContext<T> {
    /// Maps the error with [`sql_error`].
    fn ctx(self, op: &'static str) -> Result<T>;
}

impl<T> SqlContext<T> for rusqlite::Result<T> {
    fn ctx(self, op: &'static str) -> Result<T> {
        self.map_err(|e| sql_error(op, e))
    }
}

/// A thread of the store (writer, reader or checkpointer) could not be
/// started while opening it.
pub(crate) fn spawn_failed(e: std::io::Error) -> Error {
    Error::storage(BACKEND, "open", false, e)
}

/// Operation `op` panicked; its transaction (or savepoint) is rolled back.
pub(crate) fn panicked(op: &'static str) -> Error {
    Error::storage(BACKEND, op, false, "the operation panicked")
}

/// Operation `op` was queued in a batch that ended before it ran.
pub(crate) fn did_not_run(op: &'static str) -> Error {
    Error::storage(BACKEND, op, true, "the operation did not run")
}

/// The file would not switch to WAL mode (`journal_mode` stayed `mode`).
pub(crate) fn wal_refused(mode: &str) -> Error {
    Error::storage(
        BACKEND,
        "open",
        false,
        format!("the file refuses WAL mode (journal_mode is {mode})"),
    )
}

/// Why a whole batch failed: a shared source error, given to every
/// operation of the batch.
#[derive(Clone, Debug)]
pub(crate) struct BatchFailure {
    pub(crate) retryable: bool,
    pub(crate) source: Arc<dyn std::error::Error + Send + Sync>,
}

impl BatchFailure {
    /// The batch's `BEGIN`, `SAVEPOINT`, `ROLLBACK` or `COMMIT` failed;
    /// retryable as [`sql_error`] says.
    pub(crate) fn from_sql(e: rusqlite::Error) -> Self {
        Self {
            retryable: is_transient(&e),
            source: Arc::new(e),
        }
    }

    /// A batch-mate's failure ended the transaction (SQLite rolled it back
    /// on its own, e.g. after an I/O error): the others did nothing wrong,
    /// and trying again may succeed.
    pub(crate) fn aborted_by_batch_mate() -> Self {
        Self {
            retryable: true,
            source: Arc::new(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
                Some(
                    "the transaction was rolled back by a failing operation of the same batch"
                        .into(),
                ),
            )),
        }
    }

    /// The writer's connection was closed (it could not end a transaction)
    /// and could not be opened again: nothing of the batch ran, and a later
    /// try may reopen it.
    pub(crate) fn reopen_failed(e: Error) -> Self {
        Self {
            retryable: true,
            source: Arc::new(e),
        }
    }

    /// The batch's only operation failed: the transaction is rolled back,
    /// and the operation answers with its own error (never with this one).
    pub(crate) fn sole_operation_failed() -> Self {
        Self::aborted_by_batch_mate()
    }

    /// The error operation `op` of the batch answers with.
    pub(crate) fn to_error(&self, op: &'static str) -> Error {
        Error::storage(BACKEND, op, self.retryable, Arc::clone(&self.source))
    }
}
