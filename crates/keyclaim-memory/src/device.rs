//! One device's state and the operations on it; the caller holds its lock.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use keyclaim::backend::{DeviceFacts, plan_upload};
use keyclaim::transfer::{DeviceSnapshot, IssuedKey, KeyDigest, StoredFallback, StoredOtk};
use keyclaim::{
    Algorithm, ClaimedKey, Device, KeyId, KeyJson, Limits, OtkCounts, ResetScope, Result, Upload,
};

/// Everything stored for one device.
#[derive(Debug, Default)]
pub(crate) struct DeviceState {
    /// OTKs per algorithm, ordered by (upload sequence, key ID) (R3.5).
    otks: BTreeMap<Algorithm, BTreeMap<(u64, KeyId), KeyJson>>,
    /// Where each stored OTK sits, by key ID (R3.2 look-ups).
    otk_index: HashMap<KeyId, (u64, KeyDigest)>,
    fallbacks: BTreeMap<Algorithm, StoredFallback>,
    issued: BTreeMap<Algorithm, IssuedRing>,
}

/// The most recently issued OTKs of one (device, algorithm) (R3.4).
#[derive(Debug, Default)]
struct IssuedRing {
    order: VecDeque<IssuedKey>,
    set: HashSet<(KeyId, KeyDigest)>,
}

impl IssuedRing {
    fn push(&mut self, key: IssuedKey, keep: usize) {
        if self.set.insert((key.key_id.clone(), key.digest)) {
            self.order.push_back(key);
        }
        while self.order.len() > keep {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&(old.key_id, old.digest));
            }
        }
    }
}

impl DeviceState {
    pub(crate) fn is_empty(&self) -> bool {
        self.otk_index.is_empty() && self.fallbacks.is_empty() && self.issued.is_empty()
    }

    pub(crate) fn counts(&self) -> OtkCounts {
        self.otks
            .iter()
            .map(|(alg, keys)| (alg.clone(), keys.len() as u64))
            .collect()
    }

    pub(crate) fn unused_fallback_types(&self) -> Vec<Algorithm> {
        self.fallbacks
            .iter()
            .filter(|(_, f)| !f.used)
            .map(|(alg, _)| alg.clone())
            .collect()
    }

    /// Applies an upload; returns the counts after it and whether anything changed.
    pub(crate) fn upload(
        &mut self,
        upload: &Upload,
        limits: &Limits,
        next_seq: impl FnOnce() -> u64,
    ) -> Result<(OtkCounts, bool)> {
        let facts = self.facts(upload, limits);
        let plan = plan_upload(upload, &facts, limits)?;
        let changed = !plan.is_noop();
        if !plan.insert_otks.is_empty() {
            let seq = next_seq();
            for (id, json) in plan.insert_otks {
                self.otks
                    .entry(id.algorithm())
                    .or_default()
                    .insert((seq, id.clone()), json.clone());
                self.otk_index.insert(id.clone(), (seq, json.digest()));
            }
        }
        for (alg, id, json) in plan.replace_fallbacks {
            self.fallbacks.insert(
                alg.clone(),
                StoredFallback {
                    key_id: id.clone(),
                    key_json: json.clone(),
                    used: false,
                },
            );
        }
        Ok((self.counts(), changed))
    }

    fn facts(&self, upload: &Upload, limits: &Limits) -> DeviceFacts {
        let mut facts = DeviceFacts::default();
        if DeviceFacts::needs_all_counts(limits) {
            for (alg, keys) in &self.otks {
                facts.otk_counts.insert(alg.clone(), keys.len() as u64);
            }
        }
        for (id, json) in upload.one_time_keys() {
            if let Some((_, digest)) = self.otk_index.get(id) {
                facts.stored_otks.insert(id.clone(), *digest);
            }
            let alg = id.algorithm();
            if self
                .issued
                .get(&alg)
                .is_some_and(|r| r.set.contains(&(id.clone(), json.digest())))
            {
                facts.issued.insert((id.clone(), json.digest()));
            }
            let n = self.otks.get(&alg).map_or(0, |k| k.len() as u64);
            facts.otk_counts.insert(alg, n);
        }
        for alg in upload.fallback_keys().keys() {
            if let Some(f) = self.fallbacks.get(alg) {
                facts
                    .fallback_digests
                    .insert(alg.clone(), f.key_json.digest());
            }
        }
        facts
    }

    /// Claims up to `count` keys of `alg` into `out`, and the fallback key
    /// (marked used) when none was left and `fall_back` is set; returns
    /// whether the device's state changed.
    pub(crate) fn claim(
        &mut self,
        device: &Device,
        alg: &Algorithm,
        count: u32,
        fall_back: bool,
        limits: &Limits,
        out: &mut Vec<ClaimedKey>,
    ) -> bool {
        let mut issued = 0;
        if let Some(keys) = self.otks.get_mut(alg) {
            while issued < count {
                let Some(((_, key_id), key_json)) = keys.pop_first() else {
                    break;
                };
                self.otk_index.remove(&key_id);
                self.issued.entry(alg.clone()).or_default().push(
                    IssuedKey {
                        key_id: key_id.clone(),
                        digest: key_json.digest(),
                    },
                    limits.remembered_issued_keys,
                );
                out.push(ClaimedKey {
                    device: device.clone(),
                    key_id,
                    key_json,
                    fallback: false,
                });
                issued += 1;
            }
            if keys.is_empty() {
                self.otks.remove(alg);
            }
        }
        if issued > 0 {
            return true;
        }
        fall_back && self.claim_fallback(device, alg, true, out)
    }

    /// Hands out the fallback key of `alg` into `out`, marking it used when
    /// `mark_used` is set (R12.2); returns whether the state changed.
    pub(crate) fn claim_fallback(
        &mut self,
        device: &Device,
        alg: &Algorithm,
        mark_used: bool,
        out: &mut Vec<ClaimedKey>,
    ) -> bool {
        match self.fallbacks.get_mut(alg) {
            Some(fallback) => {
                let changed = mark_used && !fallback.used;
                fallback.used |= mark_used;
                out.push(ClaimedKey {
                    device: device.clone(),
                    key_id: fallback.key_id.clone(),
                    key_json: fallback.key_json.clone(),
                    fallback: true,
                });
                changed
            }
            None => false,
        }
    }

    /// Removes the stored OTKs in scope (R13.1), remembering none of them;
    /// returns whether any was removed.
    pub(crate) fn reset(&mut self, scope: &ResetScope) -> bool {
        match scope {
            ResetScope::All => {
                let any = !self.otk_index.is_empty();
                self.otks.clear();
                self.otk_index.clear();
                any
            }
            ResetScope::KeyIds(ids) => {
                let mut any = false;
                for id in ids {
                    let Some((seq, _)) = self.otk_index.remove(id) else {
                        continue;
                    };
                    any = true;
                    let alg = id.algorithm();
                    if let Some(keys) = self.otks.get_mut(&alg) {
                        keys.remove(&(seq, id.clone()));
                        if keys.is_empty() {
                            self.otks.remove(&alg);
                        }
                    }
                }
                any
            }
        }
    }

    /// The fallback keys by algorithm (R15.1).
    pub(crate) fn fallback_keys(&self) -> BTreeMap<Algorithm, StoredFallback> {
        self.fallbacks.clone()
    }

    pub(crate) fn snapshot(&self, device: Device) -> DeviceSnapshot {
        let mut one_time_keys: Vec<StoredOtk> = self
            .otks
            .values()
            .flat_map(|keys| {
                keys.iter().map(|((seq, key_id), key_json)| StoredOtk {
                    key_id: key_id.clone(),
                    key_json: key_json.clone(),
                    seq: *seq,
                })
            })
            .collect();
        one_time_keys.sort_by(|a, b| (a.seq, &a.key_id).cmp(&(b.seq, &b.key_id)));
        DeviceSnapshot {
            device,
            one_time_keys,
            fallback_keys: self.fallbacks.clone(),
            issued: self
                .issued
                .iter()
                .map(|(alg, ring)| (alg.clone(), ring.order.iter().cloned().collect()))
                .collect(),
        }
    }

    pub(crate) fn from_snapshot(snapshot: &DeviceSnapshot) -> Self {
        let mut state = Self::default();
        for otk in &snapshot.one_time_keys {
            state
                .otks
                .entry(otk.key_id.algorithm())
                .or_default()
                .insert((otk.seq, otk.key_id.clone()), otk.key_json.clone());
            state
                .otk_index
                .insert(otk.key_id.clone(), (otk.seq, otk.key_json.digest()));
        }
        state.fallbacks = snapshot.fallback_keys.clone();
        for (alg, keys) in &snapshot.issued {
            let ring = state.issued.entry(alg.clone()).or_default();
            for key in keys {
                ring.push(key.clone(), usize::MAX);
            }
        }
        state
    }
}
