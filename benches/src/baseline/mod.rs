//! The reference homeserver's claim patterns, one per backend, that the
//! benchmarks measure keyclaim's stores against.
//!
//! A baseline is a yardstick, not a store: it keeps one-time keys in storage
//! of its own (its own file, or its own tables), laid out like the reference
//! homeserver's `e2e_one_time_keys_json` table, and claims them the way the
//! reference homeserver does on that kind of storage. It needs nothing of a
//! backend's internals, and it does less than a store: no fallback keys, no
//! remembering of issued keys, no change events, no limits. What it keeps is
//! the shape of the claim path, which is what a benchmark compares:
//!
//! | baseline | claim pattern |
//! | --- | --- |
//! | [`SqliteBaseline`] | one `BEGIN IMMEDIATE` transaction per claimed key, through one connection |
//! | [`RedbBaseline`] | one write transaction (and fsync) per claimed key |
//! | `RocksBaseline` (feature `rocksdb`) | the conduwuit family's pattern: read the first key of the device's prefix, delete it in one synced write per claimed key, no lock |
//! | [`PostgresBaseline`] | one bulk `DELETE ... ROW_NUMBER() OVER (PARTITION BY ...) ... RETURNING`, no row locks |
//! | [`PostgresBaseline::connect_row_lock`] | one `DELETE ... WHERE seq = (SELECT ... LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING` transaction per claimed key: PostgreSQL's own ceiling for single claims |
//!
//! Every baseline hands out a device's keys oldest upload first (R4.2) and
//! no key twice; the PostgreSQL one may come away short under contention
//! (see [`PostgresBaseline`]), which is what it exists to show.
//!
//! ```no_run
//! # async fn demo() -> keyclaim::Result<()> {
//! use keyclaim::{Algorithm, Device, KeyId, KeyJson};
//! use keyclaim_benches::baseline::{Baseline, SqliteBaseline};
//!
//! let baseline = SqliteBaseline::open("/tmp/baseline.sqlite", true).await?;
//! let device = Device::parse("@alice:example.org", "DEV")?;
//! let key = (
//!     KeyId::parse("signed_curve25519:AAAA")?,
//!     KeyJson::from_value(&serde_json::json!({
//!         "key": "k",
//!         "signatures": {"@alice:example.org": {"ed25519:DEV": "s"}},
//!     }))?,
//! );
//! baseline.upload(&device, &[key]).await?;
//! let claimed = baseline
//!     .claim_one(&device, &Algorithm::signed_curve25519())
//!     .await?;
//! assert_eq!(claimed.map(|k| k.key_id.to_string()).as_deref(), Some("signed_curve25519:AAAA"));
//! # Ok(())
//! # }
//! ```

/// SQL creating the reference homeserver's `e2e_one_time_keys_json` table
/// and its claim-order index; `$seq` is the type of the `seq` column, which
/// stands in for the reference homeserver's `ts_added_ms` (upload order).
#[cfg(any(feature = "sqlite", feature = "postgres"))]
macro_rules! create_e2e_one_time_keys_json {
    ($seq:literal) => {
        concat!(
            "CREATE TABLE IF NOT EXISTS e2e_one_time_keys_json (
    seq ",
            $seq,
            ",
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key_json TEXT NOT NULL,
    CONSTRAINT e2e_one_time_keys_json_uniqueness UNIQUE (user_id, device_id, algorithm, key_id)
);
CREATE INDEX IF NOT EXISTS e2e_one_time_keys_json_user_id_device_id_algorithm_seq_idx
    ON e2e_one_time_keys_json (user_id, device_id, algorithm, seq);"
        )
    };
}

#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redb")]
mod redb;
#[cfg(feature = "rocksdb")]
mod rocksdb;
#[cfg(feature = "sqlite")]
mod sqlite;

use async_trait::async_trait;
use keyclaim::{Algorithm, ClaimTarget, ClaimedKey, Device, Error, KeyId, KeyJson, Result};

#[cfg(feature = "postgres")]
pub use postgres::{BASELINE_CLAIM, PostgresBaseline, ROW_LOCK_CLAIM, drop_schemas};
#[cfg(feature = "redb")]
pub use redb::RedbBaseline;
#[cfg(feature = "rocksdb")]
pub use rocksdb::RocksBaseline;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteBaseline;

/// Runs `f` on tokio's blocking pool, never on the async runtime's threads
/// (the embedded baselines' storage calls block); a task that panicked or
/// was cancelled is a storage error of baseline `name` during `op`.
#[cfg(any(feature = "sqlite", feature = "redb", feature = "rocksdb"))]
async fn on_blocking_pool<T: Send + 'static>(
    name: &'static str,
    op: &'static str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::storage(name, op, false, e))?
}

/// A reference claim pattern on one backend's kind of storage.
///
/// `Send + Sync`; share it as `Arc<dyn Baseline>`.
#[async_trait]
pub trait Baseline: Send + Sync {
    /// A short name for reports, such as `sqlite-baseline`.
    fn name(&self) -> &'static str;

    /// Stores one-time keys of `device`, in one transaction, after every
    /// key stored before (a later claim hands them out after those). A key
    /// ID the device already holds for that algorithm is ignored, as the
    /// reference homeserver's uniqueness constraint does.
    ///
    /// # Errors
    /// [`Error::Storage`].
    async fn upload(&self, device: &Device, keys: &[(KeyId, KeyJson)]) -> Result<()>;

    /// Claims the oldest one-time key of `device` and `algorithm`, or
    /// `None` when it has none, in the backend's reference pattern.
    ///
    /// # Errors
    /// [`Error::Storage`]; [`Error::Corrupt`] for a stored key that does
    /// not parse.
    async fn claim_one(&self, device: &Device, algorithm: &Algorithm)
    -> Result<Option<ClaimedKey>>;

    /// How many one-time keys of `algorithm` `device` holds (what a
    /// homeserver reports to the device's `/sync`).
    ///
    /// # Errors
    /// [`Error::Storage`].
    async fn count(&self, device: &Device, algorithm: &Algorithm) -> Result<u64>;

    /// Claims up to `count` keys per target (never fallback keys). By
    /// default one [`Baseline::claim_one`] after the other, target by
    /// target, so every key is a transaction of its own; a baseline whose
    /// reference claims many targets in one statement overrides it.
    ///
    /// # Errors
    /// As [`Baseline::claim_one`]; keys claimed before the error stay
    /// claimed.
    async fn claim(&self, targets: &[ClaimTarget]) -> Result<Vec<ClaimedKey>> {
        claim_key_by_key(self, targets).await
    }
}

/// Up to `count` keys per target, one [`Baseline::claim_one`] after the
/// other, target by target.
async fn claim_key_by_key<B: Baseline + ?Sized>(
    baseline: &B,
    targets: &[ClaimTarget],
) -> Result<Vec<ClaimedKey>> {
    let mut keys = Vec::new();
    for target in targets {
        for _ in 0..target.count {
            match baseline
                .claim_one(&target.device, &target.algorithm)
                .await?
            {
                Some(key) => keys.push(key),
                None => break,
            }
        }
    }
    Ok(keys)
}

/// Keys as the baselines store them, in the reference homeserver's
/// columns: (algorithm, key ID without the algorithm, canonical JSON).
#[cfg(any(feature = "sqlite", feature = "redb"))]
fn rows(keys: &[(KeyId, KeyJson)]) -> Vec<(String, String, String)> {
    keys.iter()
        .map(|(id, json)| {
            (
                id.algorithm_str().to_owned(),
                id.name().to_owned(),
                json.canonical().to_owned(),
            )
        })
        .collect()
}

/// A claimed one-time key from its stored columns.
#[cfg_attr(
    not(any(
        feature = "sqlite",
        feature = "redb",
        feature = "postgres",
        feature = "rocksdb"
    )),
    allow(dead_code)
)]
fn claimed(device: Device, key_id: &str, key_json: &str) -> Result<ClaimedKey> {
    let corrupt = |what: &str, e: Error| Error::corrupt(format!("baseline: stored {what}: {e}"));
    Ok(ClaimedKey {
        device,
        key_id: KeyId::parse(key_id).map_err(|e| corrupt("key ID", e))?,
        key_json: KeyJson::from_json_str(key_json).map_err(|e| corrupt("key JSON", e))?,
        fallback: false,
    })
}

/// Whether this build has the RocksDB baseline (the `rocksdb` feature).
pub const ROCKSDB: bool = cfg!(feature = "rocksdb");

/// The RocksDB baseline (`RocksBaseline`) in the database directory
/// `path`, when this build has it (the `rocksdb` feature); `None` when it
/// does not, so that callers need no feature of their own.
///
/// # Errors
/// As `RocksBaseline::open`.
pub async fn open_rocksdb(path: &std::path::Path) -> Option<Result<std::sync::Arc<dyn Baseline>>> {
    #[cfg(feature = "rocksdb")]
    {
        Some(
            RocksBaseline::open(path)
                .await
                .map(|b| std::sync::Arc::new(b) as std::sync::Arc<dyn Baseline>),
        )
    }
    #[cfg(not(feature = "rocksdb"))]
    {
        let _ = path;
        None
    }
}
