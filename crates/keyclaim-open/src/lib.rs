#![doc = include_str!("../README.md")]

use std::sync::Arc;

use keyclaim::{Error, KeyStore, Limits, Result};

/// The backend a store URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Scheme {
    /// `memory:`
    Memory,
    /// `sqlite:PATH`
    Sqlite,
    /// `redb:PATH`
    Redb,
    /// `postgres://...`, `postgresql://...` or `postgres:KEY=VALUE ...`
    Postgres,
    /// `kv-memory:` or `kv-memory:?OPTIONS`: the key-value layer over a
    /// fresh in-memory engine
    KvMemory,
    /// `rocksdb:PATH`: a RocksDB database in the directory `PATH` (the
    /// `rocksdb` feature)
    Rocksdb,
}

impl Scheme {
    /// The backend a URL names.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when it names none.
    pub fn of(url: &str) -> Result<Self> {
        if url == "memory:" || url == "memory" {
            Ok(Self::Memory)
        } else if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("redb:") {
            Ok(Self::Redb)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Ok(Self::Postgres)
        } else if url == "kv-memory:" || url.starts_with("kv-memory:?") {
            Ok(Self::KvMemory)
        } else if url.starts_with("rocksdb:") {
            Ok(Self::Rocksdb)
        } else {
            Err(Error::invalid_config(format!(
                "unknown store URL {}: use memory:, sqlite:PATH, redb:PATH, postgres://..., kv-memory: or rocksdb:PATH",
                redacted(url)
            )))
        }
    }

    /// Whether this build opens stores of this backend (its feature of
    /// this crate is on).
    pub fn is_built(self) -> bool {
        match self {
            Self::Memory => cfg!(feature = "memory"),
            Self::Sqlite => cfg!(feature = "sqlite"),
            Self::Redb => cfg!(feature = "redb"),
            Self::Postgres => cfg!(feature = "postgres"),
            Self::KvMemory => cfg!(feature = "kv"),
            Self::Rocksdb => cfg!(feature = "rocksdb"),
        }
    }
}

/// Opens the store a URL names, with the default [`Limits`], creating it
/// (or its tables) when it does not exist yet.
///
/// # Errors
/// [`Error::InvalidConfig`] for a bad URL or a backend this build lacks;
/// otherwise the backend's errors on opening.
pub async fn open(url: &str) -> Result<Arc<dyn KeyStore>> {
    open_with(url, Limits::default()).await
}

/// Opens the store a URL names, enforcing `limits` (section 8 of the
/// contract). See [`open`].
///
/// # Errors
/// As [`open`].
pub async fn open_with(url: &str, limits: Limits) -> Result<Arc<dyn KeyStore>> {
    match Scheme::of(url)? {
        Scheme::Memory => memory(limits),
        Scheme::Sqlite => sqlite(url, limits).await,
        Scheme::Redb => redb(url, limits).await,
        Scheme::Postgres => postgres(url, limits).await,
        Scheme::KvMemory => kv_memory(url, limits).await,
        Scheme::Rocksdb => rocksdb(url, limits).await,
    }
}

/// The URL with any password replaced by `…`, for logs and messages.
pub fn redacted(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((userinfo, host)) = rest.split_once('@') {
            let user = userinfo.split(':').next().unwrap_or_default();
            return format!("{scheme}://{user}:…@{host}");
        }
        return url.to_owned();
    }
    // A libpq key/value string: hide the value of `password=`.
    url.split(' ')
        .map(|part| match part.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=…"),
            _ => part.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[allow(dead_code)]
fn not_built(url: &str, feature: &str) -> Error {
    Error::invalid_config(format!(
        "this build has no backend for {} (enable the `{feature}` feature of keyclaim-open)",
        redacted(url)
    ))
}

#[cfg(feature = "memory")]
fn memory(limits: Limits) -> Result<Arc<dyn KeyStore>> {
    Ok(Arc::new(keyclaim_memory::MemoryStore::with_limits(limits)))
}

#[cfg(not(feature = "memory"))]
fn memory(_: Limits) -> Result<Arc<dyn KeyStore>> {
    Err(not_built("memory:", "memory"))
}

#[cfg(feature = "sqlite")]
async fn sqlite(url: &str, limits: Limits) -> Result<Arc<dyn KeyStore>> {
    let (path, options) = keyclaim_sqlite::SqliteOptions::from_url(url)?;
    let store = keyclaim_sqlite::SqliteStore::open_with(path, options.limits(limits)).await?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "sqlite"))]
async fn sqlite(url: &str, _: Limits) -> Result<Arc<dyn KeyStore>> {
    Err(not_built(url, "sqlite"))
}

#[cfg(feature = "redb")]
async fn redb(url: &str, limits: Limits) -> Result<Arc<dyn KeyStore>> {
    let (path, options) = keyclaim_redb::RedbOptions::from_url(url)?;
    let store = keyclaim_redb::RedbStore::open_with(path, options.limits(limits)).await?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "redb"))]
async fn redb(url: &str, _: Limits) -> Result<Arc<dyn KeyStore>> {
    Err(not_built(url, "redb"))
}

#[cfg(feature = "postgres")]
async fn postgres(url: &str, limits: Limits) -> Result<Arc<dyn KeyStore>> {
    let (conninfo, options) = if url.contains("://") {
        keyclaim_postgres::PostgresOptions::from_url(url)?
    } else {
        // `postgres:KEY=VALUE ...`: a libpq connection string, default options.
        let conninfo = url
            .trim_start_matches("postgresql:")
            .trim_start_matches("postgres:");
        (
            conninfo.to_owned(),
            keyclaim_postgres::PostgresOptions::default(),
        )
    };
    let store =
        keyclaim_postgres::PostgresStore::connect_with(&conninfo, options.limits(limits)).await?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "postgres"))]
async fn postgres(url: &str, _: Limits) -> Result<Arc<dyn KeyStore>> {
    Err(not_built(url, "postgres"))
}

#[cfg(feature = "kv")]
async fn kv_memory(url: &str, limits: Limits) -> Result<Arc<dyn KeyStore>> {
    let query = url.strip_prefix("kv-memory:").unwrap_or_default();
    let options = keyclaim_kv::KvOptions::from_query("kv-memory", query.trim_start_matches('?'))?;
    let engine = keyclaim_kv::MemoryEngine::new();
    let store = keyclaim_kv::KvStore::open_with(engine, options.limits(limits)).await?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "kv"))]
async fn kv_memory(url: &str, _: Limits) -> Result<Arc<dyn KeyStore>> {
    Err(not_built(url, "kv"))
}

#[cfg(feature = "rocksdb")]
async fn rocksdb(url: &str, limits: Limits) -> Result<Arc<dyn KeyStore>> {
    let (path, options) = keyclaim_rocksdb::RocksOptions::from_url(url)?;
    let store = keyclaim_rocksdb::RocksStore::open_with(path, options.limits(limits)).await?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "rocksdb"))]
async fn rocksdb(url: &str, _: Limits) -> Result<Arc<dyn KeyStore>> {
    Err(not_built(url, "rocksdb"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn schemes_are_recognised() {
        assert_eq!(Scheme::of("memory:").unwrap(), Scheme::Memory);
        assert_eq!(Scheme::of("sqlite:/tmp/x.db").unwrap(), Scheme::Sqlite);
        assert_eq!(Scheme::of("redb:x.redb").unwrap(), Scheme::Redb);
        assert_eq!(Scheme::of("postgres://h/db").unwrap(), Scheme::Postgres);
        assert_eq!(Scheme::of("postgresql://h/db").unwrap(), Scheme::Postgres);
        assert_eq!(Scheme::of("postgres:host=/tmp").unwrap(), Scheme::Postgres);
        assert_eq!(Scheme::of("rocksdb:/tmp/keys").unwrap(), Scheme::Rocksdb);
        for bad in ["mysql://x", "", "keys.db", "sqlite"] {
            assert!(
                matches!(Scheme::of(bad), Err(Error::InvalidConfig { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn passwords_are_never_shown() {
        for url in [
            "postgres://u:secret@h/db",
            "postgres:host=/tmp password=secret user=u",
        ] {
            let shown = redacted(url);
            assert!(!shown.contains("secret"), "{shown}");
            assert!(shown.contains('u'), "{shown}");
        }
        let err = Scheme::of("mysql://u:secret@h").unwrap_err().to_string();
        assert!(!err.contains("secret"), "{err}");
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn opens_embedded_stores_with_their_limits() {
        let dir = tempfile::tempdir().unwrap();
        let mut limits = Limits::default();
        limits.max_claim_count = 2;
        runtime().block_on(async {
            for url in [
                "memory:".to_owned(),
                format!("sqlite:{}", dir.path().join("k.sqlite").display()),
                format!("redb:{}", dir.path().join("k.redb").display()),
                "kv-memory:".to_owned(),
                "kv-memory:?max_batch=8&durable=off".to_owned(),
                #[cfg(feature = "rocksdb")]
                format!("rocksdb:{}", dir.path().join("k.rocksdb").display()),
                #[cfg(feature = "rocksdb")]
                format!(
                    "rocksdb:{}?durable=off&cf_prefix=kc_",
                    dir.path().join("k2.rocksdb").display()
                ),
            ] {
                let store = open_with(&url, limits.clone()).await.unwrap();
                assert_eq!(store.limits().max_claim_count, 2, "{url}");
            }
            let bad = format!("sqlite:{}?no_such_option=1", dir.path().join("x").display());
            assert!(matches!(open(&bad).await, Err(Error::InvalidConfig { .. })));
            let bad = "kv-memory:?no_such_option=1";
            assert!(matches!(open(bad).await, Err(Error::InvalidConfig { .. })));
            let bad = format!(
                "rocksdb:{}?no_such_option=1",
                dir.path().join("r").display()
            );
            assert!(matches!(open(&bad).await, Err(Error::InvalidConfig { .. })));
        });
    }
}
