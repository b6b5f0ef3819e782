//! The shared conformance suite against [`RedbStore`], directly and as
//! `Arc<dyn KeyStore>`.

use std::sync::atomic::{AtomicUsize, Ordering};

use keyclaim::{KeyStore, Limits, Result, async_trait};
use keyclaim_conformance::{Capabilities, StoreFactory};
use keyclaim_redb::{RedbOptions, RedbStore};

/// Fresh stores in files of a temp dir the factory owns; `reopen` closes
/// the store (joining its writer, releasing the file lock) and opens the
/// same file with the same limits.
pub(crate) struct RedbFactory {
    dir: tempfile::TempDir,
    next: AtomicUsize,
}

impl RedbFactory {
    pub(crate) fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
            next: AtomicUsize::new(0),
        }
    }
}

#[async_trait]
impl StoreFactory for RedbFactory {
    type Store = RedbStore;

    fn capabilities(&self) -> Capabilities {
        Capabilities::persistent()
    }

    async fn create(&self, limits: Limits) -> Result<RedbStore> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.path().join(format!("store-{n}.redb"));
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
    keyclaim_conformance::conformance_tests!(crate::conformance::RedbFactory::new());
}

mod as_dyn {
    keyclaim_conformance::conformance_tests!(keyclaim_conformance::DynFactory(
        crate::conformance::RedbFactory::new()
    ));
}
