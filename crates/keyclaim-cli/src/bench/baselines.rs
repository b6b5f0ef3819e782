//! The reference homeserver's claim pattern on each backend
//! (`keyclaim_benches::baseline`), for the claim races. Each baseline keeps
//! its keys in storage of its own beside the store's, with the store's
//! default durability.

#[cfg(any(feature = "sqlite", feature = "redb"))]
use std::path::Path;
use std::sync::Arc;

use keyclaim_benches::baseline::Baseline;

/// SQLite: one `BEGIN IMMEDIATE` transaction per claim (select the oldest
/// key, delete it, commit) through one connection, as the reference
/// homeserver uses SQLite, on a file of its own with `synchronous = FULL`
/// (the store's default). (One connection per client is slower: the
/// clients then sleep in SQLite's busy handler, which would flatter
/// keyclaim's ratio.)
#[cfg(feature = "sqlite")]
pub(crate) async fn sqlite(path: &Path) -> keyclaim::Result<Arc<dyn Baseline>> {
    Ok(Arc::new(
        keyclaim_benches::baseline::SqliteBaseline::open(path, true).await?,
    ))
}

/// redb: one write transaction (and fsync) per claim, on a file of its own.
#[cfg(feature = "redb")]
pub(crate) async fn redb(path: &Path) -> keyclaim::Result<Arc<dyn Baseline>> {
    Ok(Arc::new(
        keyclaim_benches::baseline::RedbBaseline::open(path).await?,
    ))
}

/// PostgreSQL: the reference homeserver's bulk-claim statement (a
/// `ROW_NUMBER() OVER (PARTITION BY ...)` delete, no `SKIP LOCKED`) on a
/// table in a schema of its own, PostgreSQL choosing its plans.
#[cfg(feature = "postgres")]
pub(crate) async fn postgres(
    url: &str,
    schema: &str,
    pool_size: usize,
) -> keyclaim::Result<Arc<dyn Baseline>> {
    Ok(Arc::new(
        keyclaim_benches::baseline::PostgresBaseline::connect(url, schema, pool_size, false)
            .await?,
    ))
}

/// PostgreSQL: one claim per transaction, the oldest key locked with
/// `FOR UPDATE SKIP LOCKED` and deleted in the same statement, on the same
/// table layout in a schema of its own: PostgreSQL's own ceiling for single
/// claims, beside the reference homeserver's statement.
#[cfg(feature = "postgres")]
pub(crate) async fn postgres_row_lock(
    url: &str,
    schema: &str,
    pool_size: usize,
) -> keyclaim::Result<Arc<dyn Baseline>> {
    Ok(Arc::new(
        keyclaim_benches::baseline::PostgresBaseline::connect_row_lock(url, schema, pool_size)
            .await?,
    ))
}
