//! The reference model: the contract's rules written as plainly as possible over
//! `BTreeMap`s and `Vec`s, with no concern for speed. Model-based cases run
//! the same operations against a store and the model and compare every
//! answer, change report and, at the end, the whole state. It is written apart
//! from `keyclaim::backend::plan_upload` on purpose, so that a bug there shows
//! up as a difference.
//!
//! Each method answers what the [`KeyStore`](keyclaim::KeyStore) method of the
//! same name answers, including the devices it reports as changed (R11.1):
//! a device whose OTKs or fallback state an operation changed, and for a
//! device replacement also the previous device when it held anything.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use keyclaim::transfer::{DeviceSnapshot, IssuedKey, KeyDigest, StoredOtk};
use keyclaim::{
    Algorithm, Changes, ClaimOutcome, ClaimTarget, ClaimedKey, Device, DeviceId, Error,
    FallbackTarget, KeyId, KeyJson, LimitKind, Limits, OneTimeClaimOutcome, OtkCap, OtkCounts,
    ResetScope, StoredFallback, SyncState, Upload, UploadOutcome, UserId,
};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ModelDevice {
    /// (upload sequence, key ID, JSON), any order.
    otks: Vec<(u64, KeyId, KeyJson)>,
    /// algorithm -> (key ID, JSON, used)
    fallbacks: BTreeMap<Algorithm, (KeyId, KeyJson, bool)>,
    /// algorithm -> issued (key ID, digest), oldest first, never pruned.
    issued: BTreeMap<Algorithm, Vec<(KeyId, KeyDigest)>>,
}

impl ModelDevice {
    fn is_empty(&self) -> bool {
        self.otks.is_empty() && self.fallbacks.is_empty() && self.issued.is_empty()
    }
}

/// An application service's one-time key for a target the store had none
/// for, if it has one (R12.4).
pub type Provided<'a> = &'a dyn Fn(&ClaimTarget) -> Option<ClaimedKey>;

/// The reference model of one store.
#[derive(Clone, Debug)]
pub struct Model {
    devices: BTreeMap<Device, ModelDevice>,
    seq: u64,
    limits: Limits,
}

impl Model {
    /// An empty model with the given limits. It never forgets issued keys,
    /// so compare it only with stores whose `remembered_issued_keys` is not
    /// reached.
    pub fn new(limits: Limits) -> Self {
        Self {
            devices: BTreeMap::new(),
            seq: 0,
            limits,
        }
    }

    fn state(&self, device: &Device) -> ModelDevice {
        self.devices.get(device).cloned().unwrap_or_default()
    }

    /// Stores a device's state, forgetting it when it holds nothing.
    fn put(&mut self, device: &Device, state: ModelDevice) {
        if state.is_empty() {
            self.devices.remove(device);
        } else {
            self.devices.insert(device.clone(), state);
        }
    }

    /// The upload applied to `state`: the state after it and whether it
    /// stored anything (an OTK, or a fallback key that is not the stored
    /// one), or the error that leaves everything as it was.
    fn apply_upload(
        &mut self,
        mut state: ModelDevice,
        upload: &Upload,
    ) -> Result<(ModelDevice, bool), Error> {
        self.limits.check_upload(upload)?;
        let mut new_keys = Vec::new();
        for (id, json) in upload.one_time_keys() {
            if let Some((_, _, stored)) = state.otks.iter().find(|(_, k, _)| k == id) {
                if stored.digest() == json.digest() {
                    continue;
                }
                return Err(Error::Conflict {
                    device: upload.device().clone(),
                    key_id: id.clone(),
                });
            }
            let was_issued = state
                .issued
                .get(&id.algorithm())
                .is_some_and(|v| v.contains(&(id.clone(), json.digest())));
            if !was_issued {
                new_keys.push((id.clone(), json.clone()));
            }
        }
        let cap = self.limits.max_otks_per_device_algorithm;
        if self.limits.otk_cap == OtkCap::PerDevice {
            // R8.4: every algorithm of the device counts against one cap.
            if !new_keys.is_empty() && (state.otks.len() + new_keys.len()) as u64 > cap {
                return Err(Error::TooLarge {
                    kind: LimitKind::OtksPerDevice,
                    limit: cap,
                });
            }
        } else {
            for (id, _) in &new_keys {
                let alg = id.algorithm();
                let stored = state
                    .otks
                    .iter()
                    .filter(|(_, k, _)| k.algorithm() == alg)
                    .count();
                let added = new_keys
                    .iter()
                    .filter(|(k, _)| k.algorithm() == alg)
                    .count();
                if (stored + added) as u64 > cap {
                    return Err(Error::TooLarge {
                        kind: LimitKind::OtksPerDeviceAlgorithm,
                        limit: cap,
                    });
                }
            }
        }
        let mut stored_any = !new_keys.is_empty();
        self.seq += 1;
        for (id, json) in new_keys {
            state.otks.push((self.seq, id, json));
        }
        for (alg, (id, json)) in upload.fallback_keys() {
            let same = state
                .fallbacks
                .get(alg)
                .is_some_and(|(_, stored, _)| stored.digest() == json.digest());
            if !same {
                stored_any = true;
                state
                    .fallbacks
                    .insert(alg.clone(), (id.clone(), json.clone(), false));
            }
        }
        Ok((state, stored_any))
    }

    /// Applies an upload (section 3): the device's counts after it and the
    /// device as changed when anything was stored, or the error.
    pub fn upload(&mut self, upload: &Upload) -> Result<UploadOutcome, Error> {
        let device = upload.device();
        let (state, stored) = self.apply_upload(self.state(device), upload)?;
        let counts = counts_of(&state);
        self.put(device, state);
        Ok(UploadOutcome {
            counts,
            changes: changes_if(stored, device),
        })
    }

    /// The targets with their counts clamped (R8.3), those with a count of 0
    /// left out, after the check of their number (R8.2).
    fn clamped(&self, targets: &[ClaimTarget]) -> Result<Vec<ClaimTarget>, Error> {
        self.limits.check_claim(targets)?;
        Ok(targets
            .iter()
            .filter(|t| t.count > 0)
            .map(|t| ClaimTarget {
                count: t.count.min(self.limits.max_claim_count),
                ..t.clone()
            })
            .collect())
    }

    /// Takes up to `count` of the device's oldest OTKs of `alg` (R3.5,
    /// R4.2), remembering them as issued (R3.4).
    fn take_otks(&mut self, device: &Device, alg: &Algorithm, count: u32) -> Vec<ClaimedKey> {
        let Some(state) = self.devices.get_mut(device) else {
            return Vec::new();
        };
        let mut mine: Vec<(u64, KeyId, KeyJson)> = state
            .otks
            .iter()
            .filter(|(_, k, _)| &k.algorithm() == alg)
            .cloned()
            .collect();
        mine.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        mine.truncate(count as usize);
        let mut out = Vec::new();
        for (_, id, json) in mine {
            state.otks.retain(|(_, k, _)| k != &id);
            state
                .issued
                .entry(alg.clone())
                .or_default()
                .push((id.clone(), json.digest()));
            out.push(ClaimedKey {
                device: device.clone(),
                key_id: id,
                key_json: json,
                fallback: false,
            });
        }
        out
    }

    /// Hands out the device's fallback key of `alg` into `keys`, if it has
    /// one, marking it used when asked (R4.4, R12.2); the device goes into
    /// `changed` when its used flag changed.
    fn take_fallback(
        &mut self,
        device: &Device,
        alg: &Algorithm,
        mark_used: bool,
        keys: &mut Vec<ClaimedKey>,
        changed: &mut Vec<Device>,
    ) {
        let Some(state) = self.devices.get_mut(device) else {
            return;
        };
        let Some((id, json, used)) = state.fallbacks.get_mut(alg) else {
            return;
        };
        if mark_used && !*used {
            changed.push(device.clone());
        }
        *used |= mark_used;
        keys.push(ClaimedKey {
            device: device.clone(),
            key_id: id.clone(),
            key_json: json.clone(),
            fallback: true,
        });
    }

    /// Applies a one-step claim (section 4): the keys handed out, in order,
    /// and the devices whose keys or fallback state changed.
    pub fn claim(&mut self, targets: &[ClaimTarget]) -> Result<ClaimOutcome, Error> {
        let mut keys = Vec::new();
        let mut changed = Vec::new();
        for t in self.clamped(targets)? {
            let otks = self.take_otks(&t.device, &t.algorithm, t.count);
            if otks.is_empty() {
                self.take_fallback(&t.device, &t.algorithm, true, &mut keys, &mut changed);
            } else {
                changed.push(t.device.clone());
                keys.extend(otks);
            }
        }
        Ok(ClaimOutcome {
            keys,
            changes: Changes::from_devices(changed),
        })
    }

    /// Applies the one-time step of a split claim (R12.1): OTKs only; the
    /// targets that got none are the misses.
    pub fn claim_one_time_keys(
        &mut self,
        targets: &[ClaimTarget],
    ) -> Result<OneTimeClaimOutcome, Error> {
        let mut out = OneTimeClaimOutcome::default();
        let mut changed = Vec::new();
        for t in self.clamped(targets)? {
            let otks = self.take_otks(&t.device, &t.algorithm, t.count);
            if otks.is_empty() {
                out.misses.push(t);
            } else {
                changed.push(t.device.clone());
                out.keys.extend(otks);
            }
        }
        out.changes = Changes::from_devices(changed);
        Ok(out)
    }

    /// Applies the fallback step of a split claim (R12.2): each target's
    /// fallback key, marked used where the target says so.
    pub fn claim_fallback_keys(
        &mut self,
        targets: &[FallbackTarget],
    ) -> Result<ClaimOutcome, Error> {
        self.limits.check_claim_targets(targets.len())?;
        let mut keys = Vec::new();
        let mut changed = Vec::new();
        for t in targets {
            self.take_fallback(
                &t.device,
                &t.algorithm,
                t.mark_used,
                &mut keys,
                &mut changed,
            );
        }
        Ok(ClaimOutcome {
            keys,
            changes: Changes::from_devices(changed),
        })
    }

    /// Applies a claim with options as the wire facade serves it (R12.4):
    /// the store's one-time keys, then the provider's for the misses (when
    /// there is a provider: `provided` gives its key for a miss, if any),
    /// then fallback keys: for the targets that got a key from neither step,
    /// marked used; with `always_include`, for every target, marked used
    /// only where it got no one-time key. Without provider and flag, the
    /// one-step claim. Answers the keys in the order the answer is built
    /// from (see [`claim_answer`]): fallback keys, the store's one-time keys,
    /// the provider's.
    pub fn claim_with(
        &mut self,
        targets: &[ClaimTarget],
        always_include: bool,
        provided: Option<Provided<'_>>,
    ) -> Result<Vec<ClaimedKey>, Error> {
        if !always_include && provided.is_none() {
            return Ok(self.claim(targets)?.keys);
        }
        let local = self.claim_one_time_keys(targets)?;
        let from_provider: Vec<ClaimedKey> = match provided {
            Some(provided) => local.misses.iter().filter_map(provided).collect(),
            None => Vec::new(),
        };
        let got_one = |t: &ClaimTarget| {
            local
                .keys
                .iter()
                .chain(&from_provider)
                .any(|k| k.device == t.device && k.key_id.algorithm() == t.algorithm)
        };
        let fallback_targets: Vec<FallbackTarget> = targets
            .iter()
            .filter(|t| always_include || !got_one(t))
            .map(|t| FallbackTarget {
                device: t.device.clone(),
                algorithm: t.algorithm.clone(),
                mark_used: !got_one(t),
            })
            .collect();
        let fallback = self.claim_fallback_keys(&fallback_targets)?.keys;
        Ok(fallback
            .into_iter()
            .chain(local.keys)
            .chain(from_provider)
            .collect())
    }

    /// Applies a key reset (R13.1): the stored OTKs in scope go, nothing
    /// else; the counts after it.
    pub fn reset_one_time_keys(&mut self, device: &Device, scope: &ResetScope) -> UploadOutcome {
        let mut state = self.state(device);
        let before = state.otks.len();
        match scope {
            ResetScope::All => state.otks.clear(),
            ResetScope::KeyIds(ids) => state.otks.retain(|(_, id, _)| !ids.contains(id)),
        }
        let removed = state.otks.len() != before;
        let counts = counts_of(&state);
        self.put(device, state);
        UploadOutcome {
            counts,
            changes: changes_if(removed, device),
        }
    }

    /// Applies a device replacement (R14.1): the previous device of the
    /// upload's user emptied and the upload applied to the upload's device
    /// (to an empty one when it is the previous device), or nothing at all
    /// when the upload fails.
    pub fn replace_device(
        &mut self,
        previous: Option<&DeviceId>,
        upload: &Upload,
    ) -> Result<UploadOutcome, Error> {
        let device = upload.device();
        let previous = previous.map(|p| Device::new(device.user_id.clone(), p.clone()));
        let start = if previous.as_ref() == Some(device) {
            ModelDevice::default()
        } else {
            self.state(device)
        };
        let (state, stored) = self.apply_upload(start, upload)?;
        let mut changed = Vec::new();
        if let Some(previous) = &previous
            && self.devices.remove(previous).is_some()
        {
            changed.push(previous.clone());
        }
        if stored {
            changed.push(device.clone());
        }
        let counts = counts_of(&state);
        self.put(device, state);
        Ok(UploadOutcome {
            counts,
            changes: Changes::from_devices(changed),
        })
    }

    /// OTK counts of a device.
    pub fn counts(&self, device: &Device) -> OtkCounts {
        self.devices.get(device).map(counts_of).unwrap_or_default()
    }

    /// Unused fallback types of a device, sorted.
    pub fn unused_fallback_types(&self, device: &Device) -> Vec<Algorithm> {
        self.devices
            .get(device)
            .map(|s| {
                s.fallbacks
                    .iter()
                    .filter(|(_, (_, _, used))| !used)
                    .map(|(a, _)| a.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Counts and unused fallback types of a device (section 6).
    pub fn sync_state(&self, device: &Device) -> SyncState {
        SyncState {
            one_time_key_counts: self.counts(device),
            unused_fallback_key_types: self.unused_fallback_types(device),
        }
    }

    /// The sync states of many devices, in the order asked (R16.1).
    pub fn counts_many(&self, devices: &[Device]) -> Result<Vec<SyncState>, Error> {
        self.limits.check_counts_many(devices.len())?;
        Ok(devices.iter().map(|d| self.sync_state(d)).collect())
    }

    /// A device's fallback keys with their used flags (R15.1).
    pub fn fallback_keys(&self, device: &Device) -> BTreeMap<Algorithm, StoredFallback> {
        self.devices
            .get(device)
            .map(|s| {
                s.fallbacks
                    .iter()
                    .map(|(alg, (id, json, used))| {
                        let fallback = StoredFallback {
                            key_id: id.clone(),
                            key_json: json.clone(),
                            used: *used,
                        };
                        (alg.clone(), fallback)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Deletes a device (R7.1); it is reported when it held anything.
    pub fn delete_device(&mut self, device: &Device) -> Changes {
        changes_if(self.devices.remove(device).is_some(), device)
    }

    /// Deletes a user's devices (R7.2); those that held anything are reported.
    pub fn delete_user(&mut self, user: &UserId) -> Changes {
        let gone: Vec<Device> = self
            .devices
            .keys()
            .filter(|d| &d.user_id == user)
            .cloned()
            .collect();
        for device in &gone {
            self.devices.remove(device);
        }
        Changes::from_devices(gone)
    }

    /// Replaces a device's whole state with a snapshot, as
    /// [`KeyStore::import_device`](keyclaim::KeyStore::import_device) does:
    /// later uploads sort after every imported key.
    pub fn import_device(&mut self, snapshot: &DeviceSnapshot) {
        let state = ModelDevice {
            otks: snapshot
                .one_time_keys
                .iter()
                .map(|k| (k.seq, k.key_id.clone(), k.key_json.clone()))
                .collect(),
            fallbacks: snapshot
                .fallback_keys
                .iter()
                .map(|(alg, f)| (alg.clone(), (f.key_id.clone(), f.key_json.clone(), f.used)))
                .collect(),
            issued: snapshot
                .issued
                .iter()
                .map(|(alg, keys)| {
                    let keys = keys.iter().map(|k| (k.key_id.clone(), k.digest)).collect();
                    (alg.clone(), keys)
                })
                .collect(),
        };
        let last = state.otks.iter().map(|(seq, _, _)| *seq).max().unwrap_or(0);
        self.seq = self.seq.max(last);
        self.put(&snapshot.device, state);
    }

    /// The whole state: every device that holds anything, in device order,
    /// normalized as [`DeviceSnapshot::normalized`] does (sequence numbers
    /// replaced by their rank), so that it compares equal to a store's
    /// normalized export of the same state.
    pub fn snapshot(&self) -> Vec<DeviceSnapshot> {
        self.devices
            .iter()
            .map(|(device, state)| {
                let mut snapshot = DeviceSnapshot::empty(device.clone());
                snapshot.one_time_keys = state
                    .otks
                    .iter()
                    .map(|(seq, key_id, key_json)| StoredOtk {
                        key_id: key_id.clone(),
                        key_json: key_json.clone(),
                        seq: *seq,
                    })
                    .collect();
                snapshot.fallback_keys = self.fallback_keys(device);
                snapshot.issued = state
                    .issued
                    .iter()
                    .map(|(alg, keys)| {
                        let keys = keys
                            .iter()
                            .map(|(key_id, digest)| IssuedKey {
                                key_id: key_id.clone(),
                                digest: *digest,
                            })
                            .collect();
                        (alg.clone(), keys)
                    })
                    .collect();
                snapshot.normalized()
            })
            .collect()
    }
}

/// The wire answer of a claim for keys in answer order: `{"one_time_keys":
/// {user: {device: {key_id: key_json}}}, "failures": {}}`, a later key under
/// the same key ID of a device replacing an earlier one (so that a one-time
/// key wins over a fallback key of the same ID, R12.4).
pub fn claim_answer(keys: &[ClaimedKey]) -> Value {
    let mut users = json!({});
    for key in keys {
        // Indexing `null` by a string makes it an object.
        users[key.device.user_id.as_str()][key.device.device_id.as_str()][key.key_id.as_str()] =
            key.key_json.to_value();
    }
    json!({ "one_time_keys": users, "failures": {} })
}

fn counts_of(state: &ModelDevice) -> OtkCounts {
    state
        .otks
        .iter()
        .map(|(_, id, _)| (id.algorithm(), 1))
        .collect()
}

fn changes_if(changed: bool, device: &Device) -> Changes {
    if changed {
        Changes::from_devices([device.clone()])
    } else {
        Changes::none()
    }
}
