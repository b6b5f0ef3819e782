#![doc = include_str!("../README.md")]

mod device;

use std::collections::hash_map::{DefaultHasher, Entry};
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use keyclaim::backend::{Backend, StoreCore, async_trait};
use keyclaim::transfer::DeviceSnapshot;
use keyclaim::{
    Algorithm, Changes, ClaimOutcome, ClaimTarget, Device, DeviceId, FallbackTarget, Limits,
    OtkCounts, ResetScope, Result, StoredFallback, SyncState, Upload, UploadOutcome, UserId,
};
use parking_lot::Mutex;

use device::DeviceState;

const SHARDS: usize = 64;

type UserDevices = BTreeMap<DeviceId, DeviceState>;

/// The in-memory store. `Send + Sync`; share it as `Arc<MemoryStore>` or
/// `Arc<dyn KeyStore>`. Not persistent.
#[derive(Debug)]
pub struct MemoryStore {
    shards: Box<[Mutex<HashMap<UserId, UserDevices>>]>,
    seq: AtomicU64,
    core: StoreCore,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store with the default [`Limits`].
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    /// An empty store with the given limits.
    pub fn with_limits(limits: Limits) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            seq: AtomicU64::new(1),
            core: StoreCore::new(limits),
        }
    }

    fn shard(&self, user: &UserId) -> &Mutex<HashMap<UserId, UserDevices>> {
        let mut h = DefaultHasher::new();
        user.hash(&mut h);
        // The modulo keeps the index below SHARDS, which fits any usize.
        let idx = usize::try_from(h.finish() % SHARDS as u64).unwrap_or(0);
        &self.shards[idx]
    }

    /// Runs `f` on a device's state under its shard lock, creating the state
    /// when `create` is set; drops the state again if it ends up empty.
    fn with_device<R>(
        &self,
        device: &Device,
        create: bool,
        f: impl FnOnce(&mut DeviceState) -> R,
    ) -> Option<R> {
        let mut shard = self.shard(&device.user_id).lock();
        let devices = match shard.entry(device.user_id.clone()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) if create => e.insert(BTreeMap::new()),
            Entry::Vacant(_) => return None,
        };
        let state = if create {
            devices.entry(device.device_id.clone()).or_default()
        } else {
            devices.get_mut(&device.device_id)?
        };
        let out = f(state);
        if state.is_empty() {
            devices.remove(&device.device_id);
        }
        if devices.is_empty() {
            shard.remove(&device.user_id);
        }
        Some(out)
    }

    /// The first `n` devices with state after `after`, in byte order. One
    /// pass over the devices, keeping the `n` smallest in a heap: it clones
    /// only devices that make it into the heap, and snapshots none.
    fn first_devices_after(&self, after: Option<&Device>, n: usize) -> Vec<Device> {
        let mut heap: BinaryHeap<Device> = BinaryHeap::with_capacity(n.min(1024) + 1);
        if n == 0 {
            return Vec::new();
        }
        for shard in self.shards.iter() {
            let shard = shard.lock();
            for (user, devices) in shard.iter() {
                if after.is_some_and(|a| user < &a.user_id) {
                    continue;
                }
                for (device_id, state) in devices {
                    let later =
                        after.is_none_or(|a| (user, device_id) > (&a.user_id, &a.device_id));
                    let smaller = heap.len() < n
                        || heap
                            .peek()
                            .is_some_and(|max| (user, device_id) < (&max.user_id, &max.device_id));
                    if later && smaller && !state.is_empty() {
                        heap.push(Device::new(user.clone(), device_id.clone()));
                        if heap.len() > n {
                            heap.pop();
                        }
                    }
                }
            }
        }
        heap.into_sorted_vec()
    }

    /// Claims for every target, each under its device's lock (atomic per
    /// target, R12.3), falling back to the fallback key when `fall_back` is
    /// set (R4.4) or never (R12.1).
    fn claim_targets(&self, targets: &[ClaimTarget], fall_back: bool) -> ClaimOutcome {
        let limits = self.core.limits();
        let mut keys = Vec::new();
        let mut changed = Vec::new();
        for target in targets {
            let touched = self.with_device(&target.device, false, |state| {
                state.claim(
                    &target.device,
                    &target.algorithm,
                    target.count,
                    fall_back,
                    limits,
                    &mut keys,
                )
            });
            if touched == Some(true) {
                changed.push(target.device.clone());
            }
        }
        ClaimOutcome {
            keys,
            changes: Changes::from_devices(changed),
        }
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }
}

/// Replaces a user's `previous` device by the upload's device among the
/// user's `devices` (R14.1): the upload is planned first, so that when it
/// fails nothing changes; the caller drops devices left empty.
fn replace_in(
    devices: &mut UserDevices,
    previous: Option<&DeviceId>,
    upload: &Upload,
    limits: &Limits,
    next_seq: impl FnOnce() -> u64,
) -> Result<UploadOutcome> {
    let device = upload.device();
    let starts_empty = previous == Some(&device.device_id);
    let mut fresh = DeviceState::default();
    let state = if starts_empty {
        &mut fresh
    } else {
        devices.entry(device.device_id.clone()).or_default()
    };
    let (counts, stored) = state.upload(upload, limits, next_seq)?;
    let mut changed = Vec::new();
    if let Some(previous) = previous
        && devices.remove(previous).is_some_and(|s| !s.is_empty())
    {
        changed.push(Device::new(device.user_id.clone(), previous.clone()));
    }
    if starts_empty {
        devices.insert(device.device_id.clone(), fresh);
    }
    if stored {
        changed.push(device.clone());
    }
    Ok(UploadOutcome {
        counts,
        changes: Changes::from_devices(changed),
    })
}

#[async_trait]
impl Backend for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn core(&self) -> &StoreCore {
        &self.core
    }

    async fn upload(&self, upload: &Upload) -> Result<UploadOutcome> {
        let device = upload.device();
        let limits = self.core.limits();
        let result = self
            .with_device(device, true, |state| {
                state.upload(upload, limits, || self.next_seq())
            })
            .unwrap_or_else(|| Ok((OtkCounts::default(), false)));
        let (counts, changed) = result?;
        let changes = if changed {
            Changes::from_devices([device.clone()])
        } else {
            Changes::none()
        };
        Ok(UploadOutcome { counts, changes })
    }

    async fn claim(&self, targets: &[ClaimTarget]) -> Result<ClaimOutcome> {
        Ok(self.claim_targets(targets, true))
    }

    async fn claim_one_time_keys(&self, targets: &[ClaimTarget]) -> Result<ClaimOutcome> {
        Ok(self.claim_targets(targets, false))
    }

    async fn claim_fallback_keys(&self, targets: &[FallbackTarget]) -> Result<ClaimOutcome> {
        let mut keys = Vec::new();
        let mut changed = Vec::new();
        for target in targets {
            let touched = self.with_device(&target.device, false, |state| {
                state.claim_fallback(
                    &target.device,
                    &target.algorithm,
                    target.mark_used,
                    &mut keys,
                )
            });
            if touched == Some(true) {
                changed.push(target.device.clone());
            }
        }
        Ok(ClaimOutcome {
            keys,
            changes: Changes::from_devices(changed),
        })
    }

    async fn reset_one_time_keys(
        &self,
        device: &Device,
        scope: &ResetScope,
    ) -> Result<UploadOutcome> {
        let outcome = self.with_device(device, false, |state| (state.reset(scope), state.counts()));
        let (changed, counts) = outcome.unwrap_or_default();
        let changes = if changed {
            Changes::from_devices([device.clone()])
        } else {
            Changes::none()
        };
        Ok(UploadOutcome { counts, changes })
    }

    async fn replace_device(
        &self,
        previous: Option<&DeviceId>,
        upload: &Upload,
    ) -> Result<UploadOutcome> {
        let device = upload.device();
        let mut shard = self.shard(&device.user_id).lock();
        let devices = shard.entry(device.user_id.clone()).or_default();
        let outcome = replace_in(devices, previous, upload, self.core.limits(), || {
            self.next_seq()
        });
        devices.retain(|_, s| !s.is_empty());
        if devices.is_empty() {
            shard.remove(&device.user_id);
        }
        outcome
    }

    async fn fallback_keys(&self, device: &Device) -> Result<BTreeMap<Algorithm, StoredFallback>> {
        Ok(self
            .with_device(device, false, |s| s.fallback_keys())
            .unwrap_or_default())
    }

    async fn counts_many(&self, devices: &[Device]) -> Result<Vec<SyncState>> {
        let mut out = Vec::with_capacity(devices.len());
        for device in devices {
            out.push(Backend::sync_state(self, device).await?);
        }
        Ok(out)
    }

    async fn sync_state(&self, device: &Device) -> Result<SyncState> {
        Ok(self
            .with_device(device, false, |s| SyncState {
                one_time_key_counts: s.counts(),
                unused_fallback_key_types: s.unused_fallback_types(),
            })
            .unwrap_or_default())
    }

    async fn delete_device(&self, device: &Device) -> Result<Changes> {
        let removed = self.with_device(device, false, |s| *s = DeviceState::default());
        Ok(match removed {
            Some(()) => Changes::from_devices([device.clone()]),
            None => Changes::none(),
        })
    }

    async fn delete_user(&self, user: &UserId) -> Result<Changes> {
        let removed = self.shard(user).lock().remove(user);
        Ok(Changes::from_devices(removed.into_iter().flatten().map(
            |(device_id, _)| Device::new(user.clone(), device_id),
        )))
    }

    async fn export_devices(
        &self,
        after: Option<&Device>,
        limit: usize,
    ) -> Result<Vec<DeviceSnapshot>> {
        let mut out = Vec::with_capacity(limit.min(1024));
        let mut cursor = after.cloned();
        // Usually one pass: the `limit` first devices after the cursor, then
        // their snapshots. A device deleted in between is skipped and the
        // page is topped up from a further pass, so that a short page still
        // means the end of the store.
        while out.len() < limit {
            let next = self.first_devices_after(cursor.as_ref(), limit - out.len());
            let Some(last) = next.last().cloned() else {
                break;
            };
            for device in next {
                let snapshot = self.with_device(&device, false, |s| s.snapshot(device.clone()));
                out.extend(snapshot);
            }
            cursor = Some(last);
        }
        Ok(out)
    }

    async fn import_device(&self, snapshot: &DeviceSnapshot) -> Result<Changes> {
        let max_seq = snapshot
            .one_time_keys
            .iter()
            .map(|k| k.seq)
            .max()
            .unwrap_or(0);
        self.seq
            .fetch_max(max_seq.saturating_add(1), Ordering::Relaxed);
        self.with_device(&snapshot.device, true, |s| {
            *s = DeviceState::from_snapshot(snapshot);
        });
        Ok(Changes::from_devices([snapshot.device.clone()]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyclaim::KeyStore;
    use keyclaim_conformance::{Capabilities, StoreFactory};

    /// Gives fresh in-memory stores; not persistent, no shared handles.
    pub(crate) struct MemoryFactory;

    #[async_trait]
    impl StoreFactory for MemoryFactory {
        type Store = MemoryStore;
        fn capabilities(&self) -> Capabilities {
            Capabilities::in_memory()
        }
        async fn create(&self, limits: Limits) -> Result<MemoryStore> {
            Ok(MemoryStore::with_limits(limits))
        }
    }

    mod direct {
        keyclaim_conformance::conformance_tests!(crate::tests::MemoryFactory);
    }

    mod as_dyn {
        keyclaim_conformance::conformance_tests!(keyclaim_conformance::DynFactory(
            crate::tests::MemoryFactory
        ));
    }

    /// Paging through many devices spread over every shard returns each
    /// device with state once, in byte order, whatever the page size.
    #[tokio::test]
    async fn export_pages_cover_every_shard_in_order() {
        let store = MemoryStore::new();
        let mut expected = Vec::new();
        for u in 0..40 {
            for d in 0..12 {
                let device = Device::parse(&format!("@u{u}:x"), &format!("D{d}")).unwrap();
                let key = (
                    keyclaim::KeyId::parse(format!("alg:{u}-{d}")).unwrap(),
                    keyclaim::KeyJson::from_json_str("\"k\"").unwrap(),
                );
                KeyStore::upload(
                    &store,
                    &Upload::from_keys(device.clone(), [key], []).unwrap(),
                )
                .await
                .unwrap();
                expected.push(device);
            }
        }
        expected.sort();
        for page in [1, 7, 100, 1000] {
            let mut exporter = keyclaim::transfer::Exporter::new(page);
            let mut seen = Vec::new();
            while let Some(batch) = exporter.next_batch(&store).await.unwrap() {
                assert!(batch.len() <= page);
                seen.extend(batch.into_iter().map(|s| s.device));
            }
            assert_eq!(seen, expected, "page size {page}");
        }
    }
}
