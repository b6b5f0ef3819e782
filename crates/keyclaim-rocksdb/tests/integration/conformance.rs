//! The shared conformance suite against [`RocksStore`], directly and as
//! `Arc<dyn KeyStore>`.

use keyclaim::{Limits, Result, async_trait};
use keyclaim_conformance::{Capabilities, StoreFactory};
use keyclaim_rocksdb::{RocksOptions, RocksStore};

/// Fresh stores in database directories of a temp dir the factory owns;
/// `reopen` closes the store (joining its writer, closing the database)
/// and opens the same directory with the same limits.
#[derive(Default)]
pub(crate) struct RocksFactory {
    files: keyclaim_testing::TempFiles,
}

#[async_trait]
impl StoreFactory for RocksFactory {
    type Store = RocksStore;

    fn capabilities(&self) -> Capabilities {
        Capabilities::persistent()
    }

    async fn create(&self, limits: Limits) -> Result<RocksStore> {
        let path = self.files.path("store", "rocksdb");
        RocksStore::open_with(path, RocksOptions::new().limits(limits)).await
    }

    async fn reopen(&self, store: RocksStore) -> Result<RocksStore> {
        let path = store.db().path().to_owned();
        let limits = store.options().get_limits().clone();
        store.close().await?;
        RocksStore::open_with(path, RocksOptions::new().limits(limits)).await
    }
}

mod direct {
    keyclaim_conformance::conformance_tests!(crate::conformance::RocksFactory::default());
}

mod as_dyn {
    keyclaim_conformance::conformance_tests!(keyclaim_conformance::DynFactory(
        crate::conformance::RocksFactory::default()
    ));
}
