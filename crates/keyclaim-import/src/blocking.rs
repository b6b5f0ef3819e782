//! Blocking engine calls (SQLite, RocksDB) on tokio's blocking pool, never
//! on the async runtime's threads.

use keyclaim::{Error, Result};

/// Runs `f` on the blocking pool; a task that panicked or was cancelled is
/// a storage error of `source` during `op`.
pub(crate) async fn blocking<T: Send + 'static>(
    source: &'static str,
    op: &'static str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::storage(source, op, false, e))?
}
