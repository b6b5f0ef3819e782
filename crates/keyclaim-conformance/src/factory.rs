//! How the suite gets stores from a backend.

use std::sync::Arc;

use async_trait::async_trait;
use keyclaim::{Error, KeyStore, Limits, Result};

use crate::Capability;

/// What a backend can do beyond the basic contract; cases that need a
/// capability the backend lacks are skipped, and every skip is printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// The data survives closing and reopening the store
    /// ([`StoreFactory::reopen`] works): durability cases run (R10.1, R10.2).
    pub persistent: bool,
    /// Several handles may be open on the same data at once, standing for
    /// several processes ([`StoreFactory::open_shared`] works): cross-handle
    /// cases run (R10.3, R6.2).
    pub shared: bool,
}

impl Capabilities {
    /// Neither persistent nor shared (an in-memory store).
    pub const fn in_memory() -> Self {
        Self {
            persistent: false,
            shared: false,
        }
    }

    /// Persistent, single handle (redb).
    pub const fn persistent() -> Self {
        Self {
            persistent: true,
            shared: false,
        }
    }

    /// Persistent and shared by several handles (SQLite, PostgreSQL).
    pub const fn persistent_shared() -> Self {
        Self {
            persistent: true,
            shared: true,
        }
    }

    /// Whether these capabilities include `capability`.
    pub const fn has(self, capability: Capability) -> bool {
        match capability {
            Capability::Persistent => self.persistent,
            Capability::Shared => self.shared,
        }
    }
}

/// Gives the suite stores of one backend. One factory serves one test case;
/// it may keep a temp dir or a database alive for as long as it lives.
#[async_trait]
pub trait StoreFactory: Send + Sync + 'static {
    /// The store type.
    type Store: KeyStore;

    /// What this backend can do.
    fn capabilities(&self) -> Capabilities;

    /// A new, empty store with the given limits. Each call gives a store
    /// that shares no data with earlier ones.
    async fn create(&self, limits: Limits) -> Result<Self::Store>;

    /// Closes `store` (drops it, after its pending writes have returned) and
    /// opens the same data again with the same limits. Needed when
    /// [`Capabilities::persistent`].
    async fn reopen(&self, store: Self::Store) -> Result<Self::Store> {
        drop(store);
        Err(unsupported("reopen"))
    }

    /// Opens a second, independent handle on the same data as `store`, as a
    /// second process would. Needed when [`Capabilities::shared`].
    async fn open_shared(&self, store: &Self::Store) -> Result<Self::Store> {
        let _ = store;
        Err(unsupported("open_shared"))
    }
}

/// The error the default methods of [`StoreFactory`] return.
pub fn unsupported(what: &'static str) -> Error {
    Error::storage(
        "factory",
        what,
        false,
        format!("the factory does not support {what}"),
    )
}

/// Wraps a factory so that its stores are used as `Arc<dyn KeyStore>`:
/// the suite then also checks that the trait object forwards everything.
#[derive(Debug)]
pub struct DynFactory<F>(pub F);

/// A type-erased store with its concrete value kept for reopen.
#[derive(Debug, Clone)]
pub struct DynStore<S> {
    inner: Arc<dyn KeyStore>,
    concrete: Arc<S>,
}

impl<S: KeyStore> DynStore<S> {
    fn new(store: S) -> Self {
        let concrete = Arc::new(store);
        Self {
            inner: concrete.clone() as Arc<dyn KeyStore>,
            concrete,
        }
    }
}

#[async_trait]
impl<S: KeyStore> KeyStore for DynStore<S> {
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }
    fn limits(&self) -> &Limits {
        self.inner.limits()
    }
    fn subscribe(&self) -> keyclaim::broadcast::Receiver<keyclaim::Changes> {
        self.inner.subscribe()
    }
    async fn upload(&self, upload: &keyclaim::Upload) -> Result<keyclaim::UploadOutcome> {
        self.inner.upload(upload).await
    }
    async fn claim(&self, targets: &[keyclaim::ClaimTarget]) -> Result<keyclaim::ClaimOutcome> {
        self.inner.claim(targets).await
    }
    async fn otk_counts(&self, device: &keyclaim::Device) -> Result<keyclaim::OtkCounts> {
        self.inner.otk_counts(device).await
    }
    async fn unused_fallback_types(
        &self,
        device: &keyclaim::Device,
    ) -> Result<Vec<keyclaim::Algorithm>> {
        self.inner.unused_fallback_types(device).await
    }
    async fn delete_device(&self, device: &keyclaim::Device) -> Result<keyclaim::Changes> {
        self.inner.delete_device(device).await
    }
    async fn delete_user(&self, user: &keyclaim::UserId) -> Result<keyclaim::Changes> {
        self.inner.delete_user(user).await
    }
    async fn export_devices(
        &self,
        after: Option<&keyclaim::Device>,
        limit: usize,
    ) -> Result<Vec<keyclaim::transfer::DeviceSnapshot>> {
        self.inner.export_devices(after, limit).await
    }
    async fn import_device(
        &self,
        snapshot: &keyclaim::transfer::DeviceSnapshot,
    ) -> Result<keyclaim::Changes> {
        self.inner.import_device(snapshot).await
    }
    async fn sync_state(&self, device: &keyclaim::Device) -> Result<keyclaim::SyncState> {
        self.inner.sync_state(device).await
    }
    async fn claim_one_time_keys(
        &self,
        targets: &[keyclaim::ClaimTarget],
    ) -> Result<keyclaim::OneTimeClaimOutcome> {
        self.inner.claim_one_time_keys(targets).await
    }
    async fn claim_fallback_keys(
        &self,
        targets: &[keyclaim::FallbackTarget],
    ) -> Result<keyclaim::ClaimOutcome> {
        self.inner.claim_fallback_keys(targets).await
    }
    async fn reset_one_time_keys(
        &self,
        device: &keyclaim::Device,
        scope: &keyclaim::ResetScope,
    ) -> Result<keyclaim::UploadOutcome> {
        self.inner.reset_one_time_keys(device, scope).await
    }
    async fn replace_device(
        &self,
        previous: Option<&keyclaim::DeviceId>,
        upload: &keyclaim::Upload,
    ) -> Result<keyclaim::UploadOutcome> {
        self.inner.replace_device(previous, upload).await
    }
    async fn fallback_keys(
        &self,
        device: &keyclaim::Device,
    ) -> Result<std::collections::BTreeMap<keyclaim::Algorithm, keyclaim::StoredFallback>> {
        self.inner.fallback_keys(device).await
    }
    async fn counts_many(&self, devices: &[keyclaim::Device]) -> Result<Vec<keyclaim::SyncState>> {
        self.inner.counts_many(devices).await
    }
}

#[async_trait]
impl<F: StoreFactory> StoreFactory for DynFactory<F> {
    type Store = DynStore<F::Store>;

    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }

    async fn create(&self, limits: Limits) -> Result<Self::Store> {
        Ok(DynStore::new(self.0.create(limits).await?))
    }

    async fn reopen(&self, store: Self::Store) -> Result<Self::Store> {
        let DynStore { inner, concrete } = store;
        drop(inner);
        let concrete = Arc::try_unwrap(concrete)
            .map_err(|_| Error::storage("factory", "reopen", false, "store still shared"))?;
        Ok(DynStore::new(self.0.reopen(concrete).await?))
    }

    async fn open_shared(&self, store: &Self::Store) -> Result<Self::Store> {
        Ok(DynStore::new(self.0.open_shared(&store.concrete).await?))
    }
}
