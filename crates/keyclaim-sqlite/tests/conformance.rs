//! The shared conformance suite against `SqliteStore` on temp files, directly
//! and as `Arc<dyn KeyStore>`.

use keyclaim::{Limits, Result};
use keyclaim_conformance::{Capabilities, StoreFactory, keyclaim::async_trait};
use keyclaim_sqlite::{SqliteOptions, SqliteStore};

/// Gives fresh SQLite stores, each a new file in a temp dir the factory owns.
/// Persistent (reopen drops the store, which joins its threads and closes the
/// file, then opens the same path) and shared (a second `SqliteStore` on the
/// same file stands for a second process).
#[derive(Default)]
struct SqliteFactory {
    files: keyclaim_testing::TempFiles,
}

#[async_trait]
impl StoreFactory for SqliteFactory {
    type Store = SqliteStore;

    fn capabilities(&self) -> Capabilities {
        Capabilities::persistent_shared()
    }

    async fn create(&self, limits: Limits) -> Result<SqliteStore> {
        let path = self.files.path("store", "sqlite");
        SqliteStore::open_with(path, SqliteOptions::new().limits(limits)).await
    }

    async fn reopen(&self, store: SqliteStore) -> Result<SqliteStore> {
        let path = store.path().to_owned();
        let options = store.options().clone();
        drop(store);
        SqliteStore::open_with(path, options).await
    }

    async fn open_shared(&self, store: &SqliteStore) -> Result<SqliteStore> {
        SqliteStore::open_with(store.path(), store.options().clone()).await
    }
}

mod direct {
    keyclaim_conformance::conformance_tests!(crate::SqliteFactory::default());
}

mod as_dyn {
    keyclaim_conformance::conformance_tests!(keyclaim_conformance::DynFactory(
        crate::SqliteFactory::default()
    ));
}
