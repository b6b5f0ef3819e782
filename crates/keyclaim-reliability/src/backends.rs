//! The persistent backends under test, behind one type: open, close and
//! reopen a SQLite, redb or RocksDB store on a path, with the durable
//! defaults. RocksDB is there when keyclaim-open was built with it (this
//! crate's `rocksdb` feature; `cargo test --workspace` turns it on):
//! [`Backend::built`].

use std::fmt;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use keyclaim::{KeyStore, Limits, Result};

use crate::differential::{BoxFuture, Subject};

/// A persistent backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `keyclaim_sqlite::SqliteStore`.
    Sqlite,
    /// `keyclaim_redb::RedbStore`.
    Redb,
    /// `keyclaim_rocksdb::RocksStore` (a database directory).
    Rocksdb,
    /// `keyclaim_postgres::PostgresStore`: its location is a connection
    /// URL instead of a path (the soak only; not among [`Backend::ALL`]).
    Postgres,
}

impl Backend {
    /// Every persistent backend kept in a file or directory, built or not.
    pub const ALL: [Backend; 3] = [Backend::Sqlite, Backend::Redb, Backend::Rocksdb];

    /// The persistent backends this build opens: SQLite, redb, and RocksDB
    /// when keyclaim-open has it.
    pub fn built() -> Vec<Backend> {
        Self::ALL.into_iter().filter(|b| b.is_built()).collect()
    }

    /// Whether this build opens this backend's stores.
    pub fn is_built(self) -> bool {
        match self {
            Self::Sqlite | Self::Redb | Self::Postgres => true,
            Self::Rocksdb => keyclaim_open::Scheme::Rocksdb.is_built(),
        }
    }

    /// `sqlite`, `redb`, `rocksdb` or `postgres`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Redb => "redb",
            Self::Rocksdb => "rocksdb",
            Self::Postgres => "postgres",
        }
    }

    /// Parses `sqlite`, `redb`, `rocksdb` or `postgres` (a backend this
    /// build may lack: opening it then fails).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .chain([Self::Postgres])
            .find(|b| b.name() == name)
    }

    /// The store's file (or, for RocksDB, directory) name inside a
    /// directory (PostgreSQL: none, its location is a URL).
    pub fn file_name(self) -> &'static str {
        match self {
            Self::Sqlite => "store.sqlite",
            Self::Redb => "store.redb",
            Self::Rocksdb => "store.rocksdb",
            Self::Postgres => "",
        }
    }

    /// Opens (creating if needed) the store at `path` (for PostgreSQL, a
    /// connection URL) with the durable default settings and the given
    /// limits.
    ///
    /// # Errors
    /// The backend's open errors.
    pub async fn open(self, path: &Path, limits: Limits) -> Result<Persistent> {
        let url = match self {
            Self::Postgres => path.display().to_string(),
            _ => format!("{}:{}", self.name(), path.display()),
        };
        Ok(Persistent::new(
            self.name(),
            keyclaim_open::open_with(&url, limits).await?,
        ))
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An open persistent store.
#[derive(Debug)]
pub struct Persistent {
    name: &'static str,
    store: Arc<dyn KeyStore>,
}

impl Persistent {
    /// A store opened some other way (over a test's storage), named `name`
    /// in errors.
    pub fn new(name: &'static str, store: Arc<dyn KeyStore>) -> Self {
        Self { name, store }
    }

    /// The store.
    pub fn store(&self) -> &dyn KeyStore {
        &*self.store
    }

    /// Closes the store: waits for its writer and releases the file (every
    /// backend does that when dropped), off the async threads.
    ///
    /// # Errors
    /// When the blocking task fails.
    pub async fn close(self) -> Result<()> {
        let name = self.name;
        tokio::task::spawn_blocking(move || drop(self.store))
            .await
            .map_err(|e| keyclaim::Error::storage(name, "close", false, e))
    }
}

/// A persistent backend as a differential [`Subject`]: reopen closes the
/// store and opens the same file again.
#[derive(Debug)]
pub struct PersistentSubject {
    backend: Backend,
    path: PathBuf,
    limits: Limits,
    store: Option<Persistent>,
    /// Answers in place of the store after a failed reopen (the run has
    /// failed by then; this only keeps `store()` total).
    placeholder: keyclaim_memory::MemoryStore,
}

impl PersistentSubject {
    /// Opens a store of `backend` in `dir`.
    ///
    /// # Errors
    /// The backend's open errors.
    pub async fn open(backend: Backend, dir: &Path, limits: Limits) -> Result<Self> {
        let path = dir.join(backend.file_name());
        let store = backend.open(&path, limits.clone()).await?;
        Ok(Self {
            backend,
            path,
            limits,
            store: Some(store),
            placeholder: keyclaim_memory::MemoryStore::new(),
        })
    }

    /// Closes the store.
    ///
    /// # Errors
    /// The backend's close errors.
    pub async fn close(mut self) -> Result<()> {
        match self.store.take() {
            Some(s) => s.close().await,
            None => Ok(()),
        }
    }
}

impl Subject for PersistentSubject {
    fn name(&self) -> &str {
        self.backend.name()
    }

    fn store(&self) -> &dyn KeyStore {
        match &self.store {
            Some(s) => s.store(),
            None => &self.placeholder,
        }
    }

    fn reopen(&mut self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if let Some(s) = self.store.take() {
                s.close().await?;
            }
            self.store = Some(self.backend.open(&self.path, self.limits.clone()).await?);
            Ok(())
        })
    }
}
