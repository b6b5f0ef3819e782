//! Every failure of the layer as a [`keyclaim::Error`], in one place.
//!
//! - An [`EngineError`] is a retryable [`Error::Storage`]: the engine
//!   applied nothing of a failed batch ([`KvEngine`](crate::KvEngine) rule
//!   2), so the same call may succeed later.
//! - A full writer queue is retryable (R10.6).
//! - A blocking task that failed, or a writer that panicked while it held
//!   an operation, is not: whether the operation was applied is unknown.

use std::fmt;
use std::sync::Arc;

use keyclaim::{BoxError, Error};

use crate::BACKEND;
use crate::engine::EngineError;

/// Maps an engine failure during operation `op` to a retryable
/// [`Error::Storage`].
pub(crate) fn engine_failed(op: &'static str) -> impl Fn(EngineError) -> Error {
    move |e| Error::storage(BACKEND, op, true, e)
}

/// A blocking task or thread of operation `op` that failed.
pub(crate) fn task_failed(op: &'static str, e: impl Into<BoxError>) -> Error {
    Error::storage(BACKEND, op, false, e)
}

/// The error of one operation of a batch whose engine write failed: its own
/// retryable value, with the shared cause as its source.
pub(crate) fn for_batch_mate(cause: &Arc<EngineError>, op: &'static str) -> Error {
    Error::storage(BACKEND, op, true, SharedError(Arc::clone(cause)))
}

/// A shared engine error as a source.
#[derive(Debug)]
struct SharedError(Arc<EngineError>);

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
