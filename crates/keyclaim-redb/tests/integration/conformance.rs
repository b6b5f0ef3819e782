//! The shared conformance suite against [`RedbStore`], directly and as
//! `Arc<dyn KeyStore>`.

use keyclaim::{KeyStore, Limits, Result, async_trait};
use keyclaim_conformance::{Capabilities, StoreFactory};
use keyclaim_redb::{RedbOptions, RedbStore};

/// Fresh stores in files of a temp dir the factory owns; `reopen` closes
/// the store (joining its writer, releasing the file lock) and opens the
/// same file with the same limits.
#[derive(Default)]
pub(crate) struct RedbFactory {
    files: keyclaim_testing::TempFiles,
}

#[async_trait]
impl StoreFactory for RedbFactory {
    type Store = RedbStore;

    fn capabilities(&self) -> Capabilities {
        Capabilities::persistent()
    }

    async fn create(&self, limits: Limits) -> Result<RedbStore> {
        let path = self.files.path("store", "redb");
        RedbStore::open_with(path, RedbOptions::new().limits(limits)).await
    }

    async fn reopen(&self, store: RedbStore) -> Result<RedbStore> {
        let path = store.path().to_owned();
        let limits = store.limits().clone();
        store.close().await?;
        RedbStore::open_with(path, RedbOptions::new().limits(limits)).await
    }
}

mod direct {
    keyclaim_conformance::conformance_tests!(crate::conformance::RedbFactory::default());
}

mod as_dyn {
    keyclaim_conformance::conformance_tests!(keyclaim_conformance::DynFactory(
        crate::conformance::RedbFactory::default()
    ));
}
