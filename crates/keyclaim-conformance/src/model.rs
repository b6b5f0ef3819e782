//! The reference model: the contract's rules written as plainly as possible over
//! `BTreeMap`s and `Vec`s, with no concern for speed. Model-based cases run
//! the same operations against a store and the model and compare every
//! answer. It is written apart from `keyclaim::backend::plan_upload` on purpose, so
//! that a bug there shows up as a difference.

use std::collections::BTreeMap;

use keyclaim::transfer::KeyDigest;
use keyclaim::{
    Algorithm, ClaimTarget, ClaimedKey, Device, Error, KeyId, KeyJson, LimitKind, Limits,
    OtkCounts, Upload, UserId,
};

#[derive(Clone, Debug, Default)]
struct ModelDevice {
    /// (upload sequence, key ID, JSON), any order.
    otks: Vec<(u64, KeyId, KeyJson)>,
    /// algorithm -> (key ID, JSON, used)
    fallbacks: BTreeMap<Algorithm, (KeyId, KeyJson, bool)>,
    /// algorithm -> issued (key ID, digest), oldest first, never pruned.
    issued: BTreeMap<Algorithm, Vec<(KeyId, KeyDigest)>>,
}

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

    /// Applies an upload: the device's counts after it, or the error kind.
    pub fn upload(&mut self, upload: &Upload) -> Result<OtkCounts, Error> {
        self.limits.check_upload(upload)?;
        let mut state = self
            .devices
            .get(upload.device())
            .cloned()
            .unwrap_or_default();
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
            if (stored + added) as u64 > self.limits.max_otks_per_device_algorithm {
                return Err(Error::TooLarge {
                    kind: LimitKind::OtksPerDeviceAlgorithm,
                    limit: self.limits.max_otks_per_device_algorithm,
                });
            }
        }
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
                state
                    .fallbacks
                    .insert(alg.clone(), (id.clone(), json.clone(), false));
            }
        }
        let counts = counts_of(&state);
        self.devices.insert(upload.device().clone(), state);
        Ok(counts)
    }

    /// Applies a claim: the keys handed out, in order.
    pub fn claim(&mut self, targets: &[ClaimTarget]) -> Result<Vec<ClaimedKey>, Error> {
        self.limits.check_claim(targets)?;
        let mut out = Vec::new();
        for t in targets {
            let count = t.count.min(self.limits.max_claim_count) as usize;
            if count == 0 {
                continue;
            }
            let Some(state) = self.devices.get_mut(&t.device) else {
                continue;
            };
            let mut mine: Vec<(u64, KeyId, KeyJson)> = state
                .otks
                .iter()
                .filter(|(_, k, _)| k.algorithm() == t.algorithm)
                .cloned()
                .collect();
            mine.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
            mine.truncate(count);
            for (_, id, json) in &mine {
                state.otks.retain(|(_, k, _)| k != id);
                state
                    .issued
                    .entry(t.algorithm.clone())
                    .or_default()
                    .push((id.clone(), json.digest()));
                out.push(ClaimedKey {
                    device: t.device.clone(),
                    key_id: id.clone(),
                    key_json: json.clone(),
                    fallback: false,
                });
            }
            if let (true, Some((id, json, used))) =
                (mine.is_empty(), state.fallbacks.get_mut(&t.algorithm))
            {
                *used = true;
                out.push(ClaimedKey {
                    device: t.device.clone(),
                    key_id: id.clone(),
                    key_json: json.clone(),
                    fallback: true,
                });
            }
        }
        Ok(out)
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

    /// Deletes a device.
    pub fn delete_device(&mut self, device: &Device) {
        self.devices.remove(device);
    }

    /// Deletes a user's devices.
    pub fn delete_user(&mut self, user: &UserId) {
        self.devices.retain(|d, _| &d.user_id != user);
    }
}

fn counts_of(state: &ModelDevice) -> OtkCounts {
    state
        .otks
        .iter()
        .map(|(_, id, _)| (id.algorithm(), 1))
        .collect()
}
