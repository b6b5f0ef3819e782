//! The stores the end-to-end scenarios run against.
//!
//! Every backend of the workspace is listed here; a scenario is stamped out
//! once per backend by the `per_backend!` macro in the tests, so a failure
//! names the backend. SQLite and redb live in a temporary directory that is
//! removed when the [`TestBackend`] is dropped; PostgreSQL gets a schema of
//! its own on the shared test server of `keyclaim_testing::postgres` (its
//! cases are skipped loudly without a server, and fail under `CI=true`).

use std::sync::Arc;

use keyclaim::{KeyStore, KeysApi};
use keyclaim_memory::MemoryStore;

/// A fresh, empty store behind the wire facade, plus whatever keeps its files
/// alive.
#[derive(Debug)]
pub struct TestBackend {
    /// The backend's name, for messages.
    pub name: &'static str,
    /// The wire facade over the store, as a homeserver would hold it.
    pub api: KeysApi<Arc<dyn KeyStore>>,
    /// The temporary directory of a file-based backend.
    _dir: Option<tempfile::TempDir>,
}

fn temp_dir() -> keyclaim::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("keyclaim-e2e-")
        .tempdir()
        .map_err(|e| keyclaim::Error::storage("e2e", "create temp dir", false, e))
}

impl TestBackend {
    fn new(name: &'static str, store: Arc<dyn KeyStore>, dir: Option<tempfile::TempDir>) -> Self {
        Self {
            name,
            api: KeysApi::new(store),
            _dir: dir,
        }
    }

    /// The in-memory reference backend.
    pub fn memory() -> Self {
        Self::new("memory", Arc::new(MemoryStore::new()), None)
    }

    /// SQLite on a file in a fresh temporary directory (durable defaults).
    ///
    /// # Errors
    /// When the directory or the database cannot be created.
    pub async fn sqlite() -> keyclaim::Result<Self> {
        let dir = temp_dir()?;
        let url = format!("sqlite:{}", dir.path().join("keys.sqlite3").display());
        Ok(Self::new(
            "sqlite",
            keyclaim_open::open(&url).await?,
            Some(dir),
        ))
    }

    /// redb on a file in a fresh temporary directory (durable defaults).
    ///
    /// # Errors
    /// When the directory or the database cannot be created.
    pub async fn redb() -> keyclaim::Result<Self> {
        let dir = temp_dir()?;
        let url = format!("redb:{}", dir.path().join("keys.redb").display());
        Ok(Self::new(
            "redb",
            keyclaim_open::open(&url).await?,
            Some(dir),
        ))
    }

    /// PostgreSQL in a schema of its own on the shared test server, or
    /// `None` (after a loud message) when there is no server outside CI.
    ///
    /// # Errors
    /// When the server is there but the store cannot be set up.
    ///
    /// # Panics
    /// Under `CI=true` without a server (a skip there is a failure).
    pub async fn postgres() -> keyclaim::Result<Option<Self>> {
        let Some(url) = keyclaim_testing::postgres::require_server("keyclaim-e2e") else {
            return Ok(None);
        };
        let schema = keyclaim_testing::postgres::unique_schema("e2e");
        let url = keyclaim_testing::postgres::store_url(&url, &schema);
        let store = keyclaim_open::open(&url).await?;
        Ok(Some(Self::new("postgres", store, None)))
    }
}
