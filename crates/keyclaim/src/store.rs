//! The [`KeyStore`] trait: the storage contract every backend implements.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::error::Result;
use crate::ids::{Algorithm, Device, DeviceId, UserId};
use crate::limits::Limits;
use crate::types::{
    Changes, ClaimOutcome, ClaimTarget, DeviceSnapshot, FallbackTarget, OneTimeClaimOutcome,
    OtkCounts, ResetScope, StoredFallback, SyncState, Upload, UploadOutcome,
};

/// Storage of one-time keys and fallback keys with atomic claim semantics.
///
/// Object safe: hold it as `Arc<dyn KeyStore>`. Every future is `Send`.
///
/// Backends do not implement this trait directly: they implement
/// [`Backend`](crate::backend::Backend), and core implements `KeyStore` for
/// them, applying the request-level limits, clamping, spans and change
/// reports in one place.
///
/// # The contract, in short
///
/// - **Atomicity**: every method is one atomic step. After it returns an
///   error, nothing of it was applied (R2.6, section 9); after a crash,
///   either all of it is there or none of it (R3.1).
/// - **Durability**: once a mutating method has returned `Ok`, its effect
///   survives a crash of the process and, with the backend's durable default
///   settings, of the machine (R10.1). Non-persistent backends (memory)
///   document that they keep nothing.
/// - **Visibility**: once a mutating method has returned, every later read,
///   from any handle or process sharing the store, sees its effect (R6.2).
/// - **Errors**: a storage failure is [`Error::Storage`](crate::Error::Storage)
///   (check [`Error::is_retryable`](crate::Error::is_retryable)), never a
///   panic and never a wrong answer such as "no keys" (R10.4).
/// - **Notifications**: every mutating method that changed something sends
///   its [`Changes`] to [`KeyStore::subscribe`]rs after commit (R11.1).
///
/// The conformance suite (`keyclaim-conformance`) checks all of it.
#[async_trait]
pub trait KeyStore: Debug + Send + Sync + 'static {
    /// The backend's short name (`memory`, `sqlite`, `redb`, `postgres`), for
    /// logs and error messages.
    fn backend_name(&self) -> &'static str;

    /// The limits this store enforces (contract section 8).
    fn limits(&self) -> &Limits;

    /// Subscribes to change events (R11.1): one event per successful
    /// mutating call that changed at least one device (a change of many
    /// devices may come as several events), from this process and, on
    /// SQLite and PostgreSQL, from the other processes sharing the store
    /// (R11.2). A subscriber that falls behind gets
    /// [`broadcast::error::RecvError::Lagged`]; when reports of other
    /// processes' changes were lost, it gets one [`Changes::unknown`] event
    /// (R11.3). Either way it re-reads what it watches.
    fn subscribe(&self) -> broadcast::Receiver<Changes>;

    /// Stores one device's OTKs and fallback keys (section 3).
    ///
    /// Applies [`plan_upload`](crate::backend::plan_upload)'s rules: retried keys are
    /// accepted unchanged (R3.2), remembered issued keys are not stored again
    /// (R3.4), all new OTKs share one new sequence number (R3.5), fallback
    /// keys replace the stored one unless they are the same key (R5.1, R5.2).
    ///
    /// - Atomicity: all of the upload or none of it (R3.1, R2.6).
    /// - Durability: durable on return.
    /// - Returns the device's OTK counts after the upload (R3.8) and the
    ///   changed device, if anything was stored.
    ///
    /// # Errors
    /// [`Error::TooLarge`](crate::Error::TooLarge) (R8.1, R8.2),
    /// [`Error::Conflict`](crate::Error::Conflict) (R3.2),
    /// [`Error::Storage`](crate::Error::Storage).
    async fn upload(&self, upload: &Upload) -> Result<UploadOutcome>;

    /// Claims keys for many targets in one round trip to the storage (R4.7).
    ///
    /// For each target in order: up to its count (clamped, R8.3) of the
    /// device's oldest OTKs of the algorithm (R4.2), each removed in the same
    /// atomic step that returns it and remembered as issued (R3.4); if none
    /// was available, the device's fallback key of the algorithm, marked used
    /// (R4.4, R4.5); if neither, nothing (R4.6).
    ///
    /// - Atomicity: each key is removed exactly when it is returned. No key
    ///   is ever returned twice, under any concurrency, across processes and
    ///   crashes; while a device holds N keys, N concurrent claims each get
    ///   one (R4.3). The whole claim commits at once or fails as a whole.
    /// - Durability: the removals are durable on return.
    ///
    /// # Errors
    /// [`Error::TooLarge`](crate::Error::TooLarge) for too many targets
    /// (R8.2), [`Error::Storage`](crate::Error::Storage).
    async fn claim(&self, targets: &[ClaimTarget]) -> Result<ClaimOutcome>;

    /// The device's OTK counts (R6.1, R6.2). A read: no atomicity concerns;
    /// it sees every write that returned before it began. Cheap (R6.4).
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage).
    async fn otk_counts(&self, device: &Device) -> Result<OtkCounts>;

    /// The algorithms for which the device has an unused fallback key, sorted
    /// by bytes (R6.3). A read, like [`KeyStore::otk_counts`]. Cheap (R6.4).
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage).
    async fn unused_fallback_types(&self, device: &Device) -> Result<Vec<Algorithm>>;

    /// Removes a device's OTKs, fallback keys and remembered issued keys
    /// (R7.1). Other devices are untouched.
    ///
    /// - Atomicity: all or nothing. Durability: durable on return.
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage).
    async fn delete_device(&self, device: &Device) -> Result<Changes>;

    /// Removes the keys of every device of a user (R7.2), as
    /// [`KeyStore::delete_device`] does for one.
    ///
    /// - Atomicity: all or nothing. Durability: durable on return.
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage).
    async fn delete_user(&self, user: &UserId) -> Result<Changes>;

    /// Exports whole device states, in order of (user ID, device ID) bytes,
    /// starting after `after` and returning at most `limit` devices. Devices
    /// with no state are left out. Call again with the last device returned
    /// to page through the store. Each snapshot is consistent in itself.
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage).
    async fn export_devices(
        &self,
        after: Option<&Device>,
        limit: usize,
    ) -> Result<Vec<DeviceSnapshot>>;

    /// Replaces a device's whole state with a snapshot (for migrations and
    /// restores): OTKs in the snapshot's order, fallback keys with their used
    /// flags, remembered issued keys. Later uploads sort after every imported
    /// key.
    ///
    /// - Atomicity: all or nothing. Durability: durable on return.
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage).
    async fn import_device(&self, snapshot: &DeviceSnapshot) -> Result<Changes>;

    /// The device's OTK counts and unused fallback types together (the E2EE
    /// fields of `/sync`), from one consistent read where the storage
    /// allows it. A read, like [`KeyStore::otk_counts`].
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage).
    async fn sync_state(&self, device: &Device) -> Result<SyncState>;

    /// Claims one-time keys only (R12.1), the first step of a split claim:
    /// exactly as [`KeyStore::claim`] for one-time keys (R4.2, R4.3, R4.5,
    /// R8.3), but never touches fallback keys. Answers the keys issued and
    /// the targets that got none (the misses), in request order.
    ///
    /// - Atomicity and durability: as [`KeyStore::claim`]. Between this
    ///   step and a following [`KeyStore::claim_fallback_keys`] an upload may
    ///   land; the second step sees it (R12.3).
    ///
    /// # Errors
    /// [`Error::TooLarge`](crate::Error::TooLarge) for too many targets
    /// (R8.2), [`Error::Storage`](crate::Error::Storage),
    /// [`Error::Corrupt`](crate::Error::Corrupt).
    async fn claim_one_time_keys(&self, targets: &[ClaimTarget]) -> Result<OneTimeClaimOutcome>;

    /// Hands out fallback keys (R12.2), the last step of a split claim: per
    /// target the device's current fallback key of the algorithm, marked
    /// used only where the target says so (section 5). Targets without one
    /// are left out (R4.6). One round trip for all targets (R4.7).
    ///
    /// - Atomicity: all targets at once. Durability: the marks are durable
    ///   on return.
    ///
    /// # Errors
    /// [`Error::TooLarge`](crate::Error::TooLarge) for too many targets
    /// (R8.2), [`Error::Storage`](crate::Error::Storage),
    /// [`Error::Corrupt`](crate::Error::Corrupt).
    async fn claim_fallback_keys(&self, targets: &[FallbackTarget]) -> Result<ClaimOutcome>;

    /// Removes a device's stored one-time keys in the scope (R13.1): all of
    /// them, or those with the listed key IDs (IDs not stored are ignored).
    /// Fallback keys and remembered issued keys are untouched; removed keys
    /// are not remembered, so uploading one again stores it again. Answers
    /// the counts after the reset and the device when a key was removed.
    ///
    /// - Atomicity: one step. Durability: durable on return.
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage).
    async fn reset_one_time_keys(
        &self,
        device: &Device,
        scope: &ResetScope,
    ) -> Result<UploadOutcome>;

    /// Replaces a user's dehydrated device (R14.1): in one atomic step,
    /// removes everything the `previous` device of the upload's user held
    /// (as [`KeyStore::delete_device`]; it may be absent or the upload's own
    /// device) and applies the upload to the upload's device, with every
    /// rule of [`KeyStore::upload`]. Answers the new device's counts and
    /// both devices as changed.
    ///
    /// - Atomicity: if the upload is invalid or over a limit, nothing
    ///   changes; after a crash either the old state or the new one is
    ///   there, never a mix. Durability: durable on return.
    ///
    /// # Errors
    /// As [`KeyStore::upload`].
    async fn replace_device(
        &self,
        previous: Option<&DeviceId>,
        upload: &Upload,
    ) -> Result<UploadOutcome>;

    /// The device's current fallback keys by algorithm (R15.1): key ID, key
    /// JSON and used flag, without changing anything. A read, like
    /// [`KeyStore::otk_counts`]; cheap (R6.4).
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage), [`Error::Corrupt`](crate::Error::Corrupt).
    async fn fallback_keys(&self, device: &Device) -> Result<BTreeMap<Algorithm, StoredFallback>>;

    /// The sync state (counts and unused fallback types) of many devices at
    /// once (R16.1), one answer per device in the order asked; devices
    /// without keys answer the empty state. One round trip to the storage;
    /// the cost grows with the number of devices, never with the store.
    ///
    /// # Errors
    /// [`Error::TooLarge`](crate::Error::TooLarge) for more than
    /// [`Limits::max_counts_devices`](crate::Limits) devices,
    /// [`Error::Storage`](crate::Error::Storage).
    async fn counts_many(&self, devices: &[Device]) -> Result<Vec<SyncState>>;
}

// `KeyStore` has no provided methods, so a method added to the trait and
// forgotten here is a compile error rather than a silent fall-back to a
// default that skips the pointee's implementation. (`Box` is not forwarded:
// core implements `KeyStore` for every `Backend`, and a downstream crate may
// implement `Backend` for `Box<its own type>`.)
macro_rules! forward_key_store {
    ($($ptr:ident),*) => {$(
        #[async_trait]
        impl<T: KeyStore + ?Sized> KeyStore for $ptr<T> {
            fn backend_name(&self) -> &'static str {
                (**self).backend_name()
            }
            fn limits(&self) -> &Limits {
                (**self).limits()
            }
            fn subscribe(&self) -> broadcast::Receiver<Changes> {
                (**self).subscribe()
            }
            async fn upload(&self, upload: &Upload) -> Result<UploadOutcome> {
                (**self).upload(upload).await
            }
            async fn claim(&self, targets: &[ClaimTarget]) -> Result<ClaimOutcome> {
                (**self).claim(targets).await
            }
            async fn otk_counts(&self, device: &Device) -> Result<OtkCounts> {
                (**self).otk_counts(device).await
            }
            async fn unused_fallback_types(&self, device: &Device) -> Result<Vec<Algorithm>> {
                (**self).unused_fallback_types(device).await
            }
            async fn delete_device(&self, device: &Device) -> Result<Changes> {
                (**self).delete_device(device).await
            }
            async fn delete_user(&self, user: &UserId) -> Result<Changes> {
                (**self).delete_user(user).await
            }
            async fn export_devices(&self, after: Option<&Device>, limit: usize) -> Result<Vec<DeviceSnapshot>> {
                (**self).export_devices(after, limit).await
            }
            async fn import_device(&self, snapshot: &DeviceSnapshot) -> Result<Changes> {
                (**self).import_device(snapshot).await
            }
            async fn sync_state(&self, device: &Device) -> Result<SyncState> {
                (**self).sync_state(device).await
            }
            async fn claim_one_time_keys(&self, targets: &[ClaimTarget]) -> Result<OneTimeClaimOutcome> {
                (**self).claim_one_time_keys(targets).await
            }
            async fn claim_fallback_keys(&self, targets: &[FallbackTarget]) -> Result<ClaimOutcome> {
                (**self).claim_fallback_keys(targets).await
            }
            async fn reset_one_time_keys(&self, device: &Device, scope: &ResetScope) -> Result<UploadOutcome> {
                (**self).reset_one_time_keys(device, scope).await
            }
            async fn replace_device(&self, previous: Option<&DeviceId>, upload: &Upload) -> Result<UploadOutcome> {
                (**self).replace_device(previous, upload).await
            }
            async fn fallback_keys(&self, device: &Device) -> Result<BTreeMap<Algorithm, StoredFallback>> {
                (**self).fallback_keys(device).await
            }
            async fn counts_many(&self, devices: &[Device]) -> Result<Vec<SyncState>> {
                (**self).counts_many(devices).await
            }
        }
    )*};
}

forward_key_store!(Arc);
