//! The shared conformance suite against [`KvStore`] on [`MemoryEngine`],
//! directly and as `Arc<dyn KeyStore>`.

use std::sync::Arc;

use keyclaim::{KeyStore, Limits, Result, async_trait};
use keyclaim_conformance::{Capabilities, StoreFactory};
use keyclaim_kv::{KvOptions, KvStore, MemoryEngine};

/// Fresh stores on fresh engines; `reopen` closes the store (joining its
/// writer) and opens a new one over the same engine, which keeps the data:
/// the persistent cases run.
#[derive(Default)]
pub(crate) struct KvFactory;

#[async_trait]
impl StoreFactory for KvFactory {
    type Store = KvStore<Arc<MemoryEngine>>;

    fn capabilities(&self) -> Capabilities {
        Capabilities::persistent()
    }

    async fn create(&self, limits: Limits) -> Result<Self::Store> {
        KvStore::open_with(
            Arc::new(MemoryEngine::new()),
            KvOptions::new().limits(limits),
        )
        .await
    }

    async fn reopen(&self, store: Self::Store) -> Result<Self::Store> {
        let engine = Arc::clone(store.engine());
        let limits = store.limits().clone();
        store.close().await?;
        KvStore::open_with(engine, KvOptions::new().limits(limits)).await
    }
}

mod direct {
    keyclaim_conformance::conformance_tests!(crate::conformance::KvFactory);
}

mod as_dyn {
    keyclaim_conformance::conformance_tests!(keyclaim_conformance::DynFactory(
        crate::conformance::KvFactory
    ));
}
