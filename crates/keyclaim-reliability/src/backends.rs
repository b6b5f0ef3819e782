//! The persistent backends under test, behind one type: open, close and
//! reopen a SQLite or redb store on a path, with the durable defaults.

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
}

impl Backend {
    /// Both persistent backends.
    pub const ALL: [Backend; 2] = [Backend::Sqlite, Backend::Redb];

    /// `sqlite` or `redb`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Redb => "redb",
        }
    }

    /// Parses `sqlite` or `redb`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.name() == name)
    }

    /// The store's file name inside a directory.
    pub fn file_name(self) -> &'static str {
        match self {
            Self::Sqlite => "store.sqlite",
            Self::Redb => "store.redb",
        }
    }

    /// Opens (creating if needed) the store at `path` with the durable
    /// default settings and the given limits.
    ///
    /// # Errors
    /// The backend's open errors.
    pub async fn open(self, path: &Path, limits: Limits) -> Result<Persistent> {
        let url = format!("{}:{}", self.name(), path.display());
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

    /// Closes the store: waits for its writer and releases the file (both
    /// backends do that when dropped), off the async threads.
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
