//! For backend authors: the storage primitives a backend implements, and the
//! pieces of the contract that core applies for it.
//!
//! A backend implements [`Backend`]: storage operations that assume their
//! input was validated, checked against the request-level limits and clamped.
//! Core turns every [`Backend`] into a [`KeyStore`](crate::KeyStore) (see
//! [`Backend`]'s docs), and in that one place it
//!
//! - checks the request-level limits of uploads and claims (R8.2) and clamps
//!   claim counts (R8.3), dropping targets whose count is 0;
//! - opens one `tracing` span per operation, named `keyclaim.<operation>`
//!   with a `backend` field;
//! - reports every change to [`KeyStore::subscribe`](crate::KeyStore::subscribe)rs
//!   after the backend returned (R11.1).
//!
//! What a backend still decides inside its own transactions is served by
//! pure functions here, so that the rules are written once:
//! [`plan_upload`] (R3.2, R3.4, R5.1, R5.2, R8.1), [`decode`] (stored values
//! that do not read back are [`Error::Corrupt`](crate::Error::Corrupt),
//! R10.4), [`RawClaim`] (a claim's answer from stored rows) and
//! [`remembered_window`] (which issued keys are still remembered, R3.4).
//!
//! The conformance suite (`keyclaim-conformance`) checks a backend against
//! the whole contract with one macro call.

mod claim;
pub mod decode;
mod serve;
pub mod url;
pub mod writer;

use std::collections::BTreeMap;
use std::fmt::Debug;

pub use async_trait::async_trait;
pub use claim::{RawClaim, RawClaimedKey};

pub use crate::key_json::{KeyDigest, MAX_KEY_JSON_DEPTH, canonical_json};
pub use crate::notify::{ChangeNotifier, MAX_DEVICES_PER_EVENT, NOTIFY_CAPACITY};
pub use crate::plan::{DeviceFacts, UploadPlan, plan_upload};

use crate::error::Result;
use crate::ids::{Algorithm, Device, DeviceId, UserId};
use crate::limits::Limits;
use crate::types::{
    Changes, ClaimOutcome, ClaimTarget, DeviceSnapshot, FallbackTarget, ResetScope, StoredFallback,
    SyncState, Upload, UploadOutcome,
};

/// What core keeps for every store: its [`Limits`] and its [`ChangeNotifier`].
///
/// A backend creates one when it opens and hands it out through
/// [`Backend::core`]; it never calls the notifier for its own operations
/// (core does, after each one). A backend whose changes can also come from
/// other processes (R11.2) forwards those with [`StoreCore::announce_remote`].
#[derive(Debug, Clone)]
pub struct StoreCore {
    limits: Limits,
    notifier: ChangeNotifier,
}

impl StoreCore {
    /// The core of a store enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            notifier: ChangeNotifier::new(),
        }
    }

    /// The limits the store enforces (section 8).
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The store's change notifier; core reports through it.
    pub(crate) fn notifier(&self) -> &ChangeNotifier {
        &self.notifier
    }

    /// Reports changes made by another process sharing the storage (R11.2)
    /// to this store's subscribers.
    pub fn announce_remote(&self, changes: &Changes) {
        self.notifier.notify(changes);
    }

    /// Tells this store's subscribers that changes of other processes may
    /// have been made without being reported to them (a report was lost: a
    /// notification connection that was down, a change log read too late),
    /// with one [`Changes::unknown`] event: they re-read what they watch
    /// instead of silently missing a change (R11.3).
    pub fn announce_missed(&self) {
        self.notifier.notify(&Changes::unknown());
    }
}

/// The storage primitives of a backend. Core implements
/// [`KeyStore`](crate::KeyStore) for every type that implements this trait.
///
/// Every method is one atomic step against the storage, durable on return
/// when it mutates (R10.1), and visible to every later read from any handle
/// or process sharing the storage (R6.2). A storage failure is
/// [`Error::Storage`](crate::Error::Storage) with the right retryable flag,
/// never a panic and never a wrong answer (R10.4); a stored value that does
/// not read back is [`Error::Corrupt`](crate::Error::Corrupt) (use
/// [`decode`]).
///
/// What core has done before a method is called is said on each method; a
/// backend does not repeat it.
#[async_trait]
pub trait Backend: Debug + Send + Sync + 'static {
    /// The backend's short name (`memory`, `sqlite`, `redb`, `postgres`):
    /// the `backend` field of spans and of
    /// [`Error::Storage`](crate::Error::Storage).
    fn name(&self) -> &'static str;

    /// The store's limits and notifier.
    fn core(&self) -> &StoreCore;

    /// Applies one upload atomically (R3.1).
    ///
    /// Core has checked the request-level limits (R8.2). Inside its
    /// transaction the backend reads the [`DeviceFacts`] the upload needs,
    /// applies what [`plan_upload`] decides (the per-device limit R8.1 and
    /// the rules R3.2, R3.4, R3.5, R5.1, R5.2 live there) and answers the
    /// counts after the upload (R3.8) and the changed device when anything
    /// was stored.
    ///
    /// # Errors
    /// Those of [`plan_upload`], [`Error::Storage`](crate::Error::Storage).
    async fn upload(&self, upload: &Upload) -> Result<UploadOutcome>;

    /// Claims for many targets in one round trip to the storage (R4.7):
    /// per target the oldest OTKs (R4.2), else the fallback key marked used
    /// (R4.4, R4.5), each removal in the same atomic step that returns it,
    /// no key twice and no under-issue under any concurrency (R4.3).
    ///
    /// Core has checked the number of targets (R8.2), clamped every count
    /// (R8.3) and left out targets with a count of 0; `targets` is never
    /// empty. The answer lists keys in target order (R4.6 for targets with
    /// nothing) and the devices changed.
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage), [`Error::Corrupt`](crate::Error::Corrupt).
    async fn claim(&self, targets: &[ClaimTarget]) -> Result<ClaimOutcome>;

    /// The device's OTK counts (R6.1: algorithms with no key left out; core's
    /// wire forms add `signed_curve25519`) and the algorithms with an unused
    /// fallback key, sorted by bytes (R6.3), from one consistent read; cheap
    /// (R6.4). Core serves `otk_counts` and `unused_fallback_types` from it.
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage).
    async fn sync_state(&self, device: &Device) -> Result<SyncState>;

    /// Removes a device's OTKs, fallback keys and remembered issued keys,
    /// atomically (R7.1); answers the device when it held anything.
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage).
    async fn delete_device(&self, device: &Device) -> Result<Changes>;

    /// Removes every device of a user, atomically (R7.2); answers the
    /// devices that held anything.
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage).
    async fn delete_user(&self, user: &UserId) -> Result<Changes>;

    /// Whole device states in (user ID, device ID) byte order after `after`,
    /// at most `limit`, devices without state left out; each snapshot is
    /// consistent in itself. Remembered issued keys beyond the limit are
    /// left out ([`remembered_window`]).
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage), [`Error::Corrupt`](crate::Error::Corrupt).
    async fn export_devices(
        &self,
        after: Option<&Device>,
        limit: usize,
    ) -> Result<Vec<DeviceSnapshot>>;

    /// Replaces a device's whole state with a snapshot, atomically; later
    /// uploads sort after every imported key (R3.5). Answers the device.
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage).
    async fn import_device(&self, snapshot: &DeviceSnapshot) -> Result<Changes>;

    /// Claims one-time keys only (R12.1): as [`Backend::claim`] without the
    /// fallback step. Core has done what it does for [`Backend::claim`]; it
    /// derives the misses from the answer, so the answer lists each target's
    /// keys together, in target order.
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage), [`Error::Corrupt`](crate::Error::Corrupt).
    async fn claim_one_time_keys(&self, targets: &[ClaimTarget]) -> Result<ClaimOutcome>;

    /// Hands out each target's current fallback key, marking it used where
    /// the target says so (R12.2, section 5), all targets in one atomic step
    /// and one round trip (R4.7). Targets without a fallback key are left
    /// out (R4.6). The answer lists keys in target order, with
    /// `fallback: true`, and the devices whose fallback key became used.
    ///
    /// Core has checked the number of targets (R8.2); `targets` is never
    /// empty.
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage), [`Error::Corrupt`](crate::Error::Corrupt).
    async fn claim_fallback_keys(&self, targets: &[FallbackTarget]) -> Result<ClaimOutcome>;

    /// Removes the device's stored one-time keys in the scope, atomically
    /// (R13.1), leaving fallback keys and remembered issued keys alone and
    /// remembering none of the removed keys. Answers the counts after the
    /// reset and the device when a key was removed.
    ///
    /// Core has answered empty scopes itself; `scope` names at least one key
    /// or is [`ResetScope::All`].
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage).
    async fn reset_one_time_keys(
        &self,
        device: &Device,
        scope: &ResetScope,
    ) -> Result<UploadOutcome>;

    /// In one atomic step, removes what the `previous` device of the
    /// upload's user held (as [`Backend::delete_device`]; it may be the
    /// upload's own device) and then applies the upload as
    /// [`Backend::upload`] does, to an empty device when `previous` is the
    /// upload's device (R14.1). If the upload fails ([`plan_upload`]'s
    /// errors), nothing changes. Answers the new device's counts and both
    /// devices as changed when they changed.
    ///
    /// Core has checked the request-level limits (R8.2).
    ///
    /// # Errors
    /// Those of [`plan_upload`], [`Error::Storage`](crate::Error::Storage).
    async fn replace_device(
        &self,
        previous: Option<&DeviceId>,
        upload: &Upload,
    ) -> Result<UploadOutcome>;

    /// The device's current fallback keys by algorithm (R15.1), changing
    /// nothing; cheap (R6.4).
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage), [`Error::Corrupt`](crate::Error::Corrupt).
    async fn fallback_keys(&self, device: &Device) -> Result<BTreeMap<Algorithm, StoredFallback>>;

    /// The sync state of each device, in the order given (R16.1), in one
    /// round trip to the storage and at a cost that grows with the number
    /// of devices only; devices without keys answer the empty state. Each
    /// device's state is consistent in itself.
    ///
    /// Core has checked the number of devices (R16.1); `devices` is never
    /// empty.
    ///
    /// # Errors
    /// [`Error::Storage`](crate::Error::Storage).
    async fn counts_many(&self, devices: &[Device]) -> Result<Vec<SyncState>>;
}

/// The part of a (device, algorithm)'s issued keys, oldest first, that is
/// still remembered (R3.4): the newest `remembered` of them. Backends that
/// prune lazily keep older rows for a while; those count as forgotten for
/// uploads and exports alike.
pub fn remembered_window<T>(issued: &[T], remembered: usize) -> &[T] {
    &issued[issued.len().saturating_sub(remembered)..]
}
