//! Every failure of the backend as a [`keyclaim::Error`], in one place.
//!
//! Whether an [`Error::Storage`] is retryable (nothing of the operation was
//! applied and the same call may succeed later) is decided here and nowhere
//! else:
//!
//! - a redb failure inside an operation ([`Fatal::into_error`]) is
//!   retryable when it is an I/O failure: the writer reopens the file after
//!   it ([`crate::slot`]), and the same operation can then succeed;
//! - a redb failure while opening, creating or migrating the file
//!   ([`redb`]) is not: the caller decides whether to open again;
//! - a file being reopened, or a reopen that failed, is retryable, and so
//!   is a full writer queue;
//! - a blocking task or thread that failed is not, nor a writer that
//!   panicked while it held the operation.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use keyclaim::{BoxError, Error};

use crate::BACKEND;

/// A failure that leaves the transaction unusable: a storage error, or data
/// that breaks an invariant. The operation's transaction must be aborted.
#[derive(Debug)]
pub(crate) enum Fatal {
    /// redb failed.
    Redb(redb::Error),
    /// Anything else (corrupt data).
    Other(Error),
}

impl Fatal {
    /// The keyclaim error for operation `op`.
    pub(crate) fn into_error(self, op: &'static str) -> Error {
        match self {
            Self::Redb(e) => Error::storage(BACKEND, op, is_io(&e), e),
            Self::Other(e) => e,
        }
    }
}

macro_rules! fatal_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Fatal {
            fn from(e: $t) -> Self {
                Self::Redb(e.into())
            }
        }
    )*};
}
fatal_from!(
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// Maps a redb error while opening, creating or migrating the file to a
/// non-retryable [`Error::Storage`] for operation `op`.
pub(crate) fn storage<E>(op: &'static str) -> impl Fn(E) -> Error
where
    E: Into<redb::Error>,
{
    move |e| {
        let e: redb::Error = e.into();
        Error::storage(BACKEND, op, false, e)
    }
}

/// An I/O failure while creating the file: retryable (the directory may
/// become writable, the disk may get room).
pub(crate) fn create_io(e: std::io::Error) -> Error {
    Error::storage(BACKEND, "create", true, e)
}

/// A blocking task or thread of operation `op` that failed (panicked, was
/// cancelled, or could not be spawned).
pub(crate) fn task_failed(op: &'static str, e: impl Into<BoxError>) -> Error {
    Error::storage(BACKEND, op, false, e)
}

/// Whether a redb error is an I/O failure of the storage.
pub(crate) fn is_io(e: &redb::Error) -> bool {
    matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo)
}

/// Whether an error means redb's handle is unusable until reopened (an I/O
/// error, or redb's "previous I/O error").
pub(crate) fn needs_reopen(error: &Error) -> bool {
    chain(error)
        .find_map(|e| e.downcast_ref::<redb::Error>())
        .is_some_and(is_io)
}

/// `error` and its sources, outermost first.
fn chain(error: &Error) -> impl Iterator<Item = &(dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error as &(dyn std::error::Error + 'static)), |e| {
        e.source()
    })
}

/// The error of operation `op` while the file is being reopened after an
/// I/O failure, or after a reopen failed: retryable.
pub(crate) fn reopening(op: &'static str) -> Error {
    Error::storage(BACKEND, op, true, Reopening)
}

/// A reopen that could not close the old handle because transactions still
/// hold it: retryable (the next batch tries again).
pub(crate) fn still_in_use() -> Error {
    Error::storage(
        BACKEND,
        "reopen",
        true,
        "the redb handle is still in use; not reopened",
    )
}

/// A reopen whose open failed: a storage failure becomes retryable (the next
/// batch tries again); any other error (a newer format, corrupt data) stays.
pub(crate) fn reopen_failed(e: Error) -> Error {
    match e {
        Error::Storage { source, .. } => Error::storage(BACKEND, "reopen", true, source),
        other => other,
    }
}

/// The error of opening a file that is already open, or another redb error
/// of opening it.
pub(crate) fn open_failed(path: &Path, e: redb::DatabaseError) -> Error {
    if matches!(e, redb::DatabaseError::DatabaseAlreadyOpen) {
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
        storage("open")(e)
    }
}

/// The error of one caller of a failed batch (operation `op`): its own value,
/// with the shared cause as its source.
pub(crate) fn for_batch_mate(error: &Arc<Error>, op: &'static str) -> Error {
    match &**error {
        Error::Corrupt { what, .. } => Error::corrupt(what.clone()),
        Error::UnsupportedVersion {
            backend,
            found,
            supported,
        } => Error::UnsupportedVersion {
            backend,
            found: *found,
            supported: *supported,
        },
        Error::Closed => Error::Closed,
        other => Error::storage(
            BACKEND,
            op,
            other.is_retryable(),
            SharedError(Arc::clone(error)),
        ),
    }
}

/// A shared error as a source.
#[derive(Debug)]
struct SharedError(Arc<Error>);

impl fmt::Display for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// The source of an operation that found the file being reopened.
#[derive(Debug)]
struct Reopening;

impl fmt::Display for Reopening {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the redb file is being reopened after an I/O error; try again")
    }
}

impl std::error::Error for Reopening {}

/// The source of the [`Error::Storage`] that
/// [`RedbStore::open`](crate::RedbStore::open) returns when the file is
/// already open: by another process, or by another store in this process. A
/// redb file has one user at a time (R10.3); close the other store first.
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
        chain(error).any(|e| e.is::<Self>())
    }
}
