//! The stores the end-to-end scenarios run against.
//!
//! Every backend on this branch is listed here; a scenario is stamped out
//! once per backend by the `per_backend!` macro in the tests, so a failure
//! names the backend. Persistent backends live in a temporary directory that
//! is removed when the [`TestBackend`] is dropped.

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
    /// The temporary directory of a persistent backend.
    _dir: Option<tempfile::TempDir>,
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
}
