//! Requests and answers of the [`KeyStore`](crate::KeyStore) API.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::ids::{Algorithm, Device, KeyId, SIGNED_CURVE25519, UserId};
use crate::key_json::{KeyDigest, KeyJson};

/// A validated upload for one device (R3.1): one-time keys and fallback keys.
///
/// One-time keys are kept sorted by key ID, which is the tie-break order of
/// keys inside one upload (R3.5). At most one fallback key per algorithm
/// (R3.6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upload {
    pub(crate) device: Device,
    pub(crate) one_time_keys: BTreeMap<KeyId, KeyJson>,
    pub(crate) fallback_keys: BTreeMap<Algorithm, (KeyId, KeyJson)>,
}

impl Upload {
    /// An empty upload for a device.
    pub fn new(device: Device) -> Self {
        Self {
            device,
            one_time_keys: BTreeMap::new(),
            fallback_keys: BTreeMap::new(),
        }
    }

    /// Builds an upload from key lists.
    ///
    /// # Errors
    /// - [`Error::Conflict`] when one key ID is given twice as an OTK with
    ///   different content (the same content twice is kept once);
    /// - [`Error::DuplicateFallback`] when two fallback keys share an
    ///   algorithm (R3.6).
    pub fn from_keys(
        device: Device,
        one_time_keys: impl IntoIterator<Item = (KeyId, KeyJson)>,
        fallback_keys: impl IntoIterator<Item = (KeyId, KeyJson)>,
    ) -> Result<Self> {
        let mut upload = Self::new(device);
        for (id, json) in one_time_keys {
            upload.add_one_time_key(id, json)?;
        }
        for (id, json) in fallback_keys {
            upload.add_fallback_key(id, json)?;
        }
        Ok(upload)
    }

    /// Adds one OTK.
    ///
    /// # Errors
    /// [`Error::Conflict`] when the key ID is already in this upload with
    /// different content.
    pub fn add_one_time_key(&mut self, id: KeyId, json: KeyJson) -> Result<()> {
        match self.one_time_keys.get(&id) {
            Some(existing) if existing.digest() != json.digest() => Err(Error::Conflict {
                device: self.device.clone(),
                key_id: id,
            }),
            Some(_) => Ok(()),
            None => {
                self.one_time_keys.insert(id, json);
                Ok(())
            }
        }
    }

    /// Adds one fallback key.
    ///
    /// # Errors
    /// [`Error::DuplicateFallback`] when this upload already has a fallback
    /// key of that algorithm (R3.6).
    pub fn add_fallback_key(&mut self, id: KeyId, json: KeyJson) -> Result<()> {
        let algorithm = id.algorithm();
        if self.fallback_keys.contains_key(&algorithm) {
            return Err(Error::DuplicateFallback { algorithm });
        }
        self.fallback_keys.insert(algorithm, (id, json));
        Ok(())
    }

    /// The device the keys belong to.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The one-time keys by key ID, in key ID order (the tie-break order
    /// inside one upload, R3.5).
    pub fn one_time_keys(&self) -> &BTreeMap<KeyId, KeyJson> {
        &self.one_time_keys
    }

    /// The fallback keys by algorithm, each with its key ID (at most one per
    /// algorithm, R3.6).
    pub fn fallback_keys(&self) -> &BTreeMap<Algorithm, (KeyId, KeyJson)> {
        &self.fallback_keys
    }

    /// The number of keys, one-time and fallback together (the figure R8.2 limits).
    pub fn key_count(&self) -> usize {
        self.one_time_keys.len() + self.fallback_keys.len()
    }

    /// Whether the upload carries no key at all.
    pub fn is_empty(&self) -> bool {
        self.key_count() == 0
    }

    /// Checks that the upload carries a fallback key for every algorithm it
    /// carries one-time keys of (R14.2: a dehydrated device cannot refill
    /// its keys, so its fallback key is what keeps it reachable).
    ///
    /// # Errors
    /// [`Error::MissingFallback`] naming the first algorithm without one.
    pub fn require_fallback_keys(&self) -> Result<()> {
        for id in self.one_time_keys.keys() {
            let algorithm = id.algorithm();
            if !self.fallback_keys.contains_key(&algorithm) {
                return Err(Error::MissingFallback { algorithm });
            }
        }
        Ok(())
    }
}

/// One target of a claim (R4.1): a device, an algorithm and how many keys.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClaimTarget {
    /// The device to claim from.
    pub device: Device,
    /// The algorithm wanted.
    pub algorithm: Algorithm,
    /// How many keys; clamped to [`Limits::max_claim_count`](crate::Limits) (R8.3).
    pub count: u32,
}

impl AsRef<Device> for ClaimTarget {
    fn as_ref(&self) -> &Device {
        &self.device
    }
}

impl AsRef<Device> for FallbackTarget {
    fn as_ref(&self) -> &Device {
        &self.device
    }
}

impl ClaimTarget {
    /// A target for one key (the wire form's only count).
    pub fn one(device: Device, algorithm: Algorithm) -> Self {
        Self {
            device,
            algorithm,
            count: 1,
        }
    }
}

/// One target of [`KeyStore::claim_fallback_keys`](crate::KeyStore::claim_fallback_keys)
/// (R12.2): a device, an algorithm, and whether to mark the fallback key used.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FallbackTarget {
    /// The device whose fallback key is wanted.
    pub device: Device,
    /// The algorithm wanted.
    pub algorithm: Algorithm,
    /// Whether handing the key out marks it used (R4.4).
    pub mark_used: bool,
}

/// Which one-time keys a key reset removes (R13.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResetScope {
    /// Every stored one-time key of the device.
    All,
    /// The stored one-time keys with these key IDs; IDs not stored are
    /// ignored.
    KeyIds(BTreeSet<KeyId>),
}

impl ResetScope {
    /// Whether the scope names no key at all (an empty list).
    pub fn is_empty(&self) -> bool {
        matches!(self, Self::KeyIds(ids) if ids.is_empty())
    }
}

/// One key handed out by a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimedKey {
    /// The device it belonged to.
    pub device: Device,
    /// Its key ID.
    pub key_id: KeyId,
    /// Its JSON, exactly as stored (R2.5).
    pub key_json: KeyJson,
    /// Whether it is the device's fallback key (R4.4) rather than an OTK.
    pub fallback: bool,
}

/// The answer to a claim.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClaimOutcome {
    /// The keys handed out, target by target in request order, the oldest
    /// upload first within a target (R4.2). Targets with nothing to hand out
    /// contribute nothing (R4.6).
    pub keys: Vec<ClaimedKey>,
    /// The devices whose counts or fallback state changed (R11.1).
    pub changes: Changes,
}

impl ClaimOutcome {
    /// The keys in the wire shape `{user: {device: {key_id: key_json}}}`.
    pub fn to_wire(&self) -> Value {
        keys_to_wire(&self.keys)
    }
}

/// Keys in the wire shape `{user: {device: {key_id: key_json}}}`; a later key
/// under the same key ID of one device replaces an earlier one.
pub(crate) fn keys_to_wire<'a>(keys: impl IntoIterator<Item = &'a ClaimedKey>) -> Value {
    let mut users = Map::new();
    for key in keys {
        let user = users
            .entry(key.device.user_id.as_str())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(devices) = user {
            let device = devices
                .entry(key.device.device_id.as_str())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(keys) = device {
                keys.insert(key.key_id.as_str().to_owned(), key.key_json.to_value());
            }
        }
    }
    Value::Object(users)
}

/// The answer to [`KeyStore::claim_one_time_keys`](crate::KeyStore::claim_one_time_keys)
/// (R12.1).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OneTimeClaimOutcome {
    /// The one-time keys handed out, as in [`ClaimOutcome::keys`]; never a
    /// fallback key.
    pub keys: Vec<ClaimedKey>,
    /// The targets that got no one-time key at all, in request order, with
    /// their counts as claimed (clamped, R8.3).
    pub misses: Vec<ClaimTarget>,
    /// The devices whose counts changed (R11.1).
    pub changes: Changes,
}

impl OneTimeClaimOutcome {
    /// Splits a claim's answer into keys and misses. `keys` must list each
    /// target's keys together, in target order (as backends answer).
    pub(crate) fn from_claim(targets: &[ClaimTarget], outcome: ClaimOutcome) -> Self {
        let mut misses = Vec::new();
        let mut next = outcome.keys.iter().peekable();
        for target in targets {
            let mut got = 0u32;
            while got < target.count
                && next.peek().is_some_and(|k| {
                    k.device == target.device
                        && k.key_id.algorithm_str() == target.algorithm.as_str()
                })
            {
                next.next();
                got += 1;
            }
            if got == 0 {
                misses.push(target.clone());
            }
        }
        Self {
            keys: outcome.keys,
            misses,
            changes: outcome.changes,
        }
    }
}

/// OTK counts of one device: algorithm to number of stored OTKs (R6.1).
/// Algorithms with no keys are absent; see [`OtkCounts::to_wire`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OtkCounts(pub(crate) BTreeMap<Algorithm, u64>);

impl FromIterator<(Algorithm, u64)> for OtkCounts {
    /// Counts from (algorithm, count) pairs: counts of one algorithm given
    /// more than once are added up, zero counts are left out (R6.1).
    fn from_iter<I: IntoIterator<Item = (Algorithm, u64)>>(iter: I) -> Self {
        let mut map = BTreeMap::new();
        for (alg, n) in iter {
            if n > 0 {
                *map.entry(alg).or_insert(0u64) += n;
            }
        }
        Self(map)
    }
}

impl OtkCounts {
    /// The non-zero counts, by algorithm in byte order.
    pub fn iter(&self) -> impl Iterator<Item = (&Algorithm, u64)> + '_ {
        self.0.iter().map(|(a, n)| (a, *n))
    }

    /// Whether no algorithm has a key.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The count of one algorithm (0 when absent).
    pub fn get(&self, algorithm: &Algorithm) -> u64 {
        self.0.get(algorithm).copied().unwrap_or(0)
    }

    /// The count of one algorithm by name (0 when absent).
    pub fn get_str(&self, algorithm: &str) -> u64 {
        self.0
            .iter()
            .find(|(a, _)| a.as_str() == algorithm)
            .map_or(0, |(_, n)| *n)
    }

    /// The total over all algorithms.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// The wire form (R6.1): zero counts left out, except `signed_curve25519`,
    /// which is always present.
    pub fn to_wire(&self) -> Value {
        let mut map = Map::new();
        map.insert(SIGNED_CURVE25519.to_owned(), Value::from(0u64));
        for (alg, n) in &self.0 {
            if *n > 0 {
                map.insert(alg.as_str().to_owned(), Value::from(*n));
            }
        }
        Value::Object(map)
    }
}

/// The E2EE key state of one device that `/sync` reports (section 6).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncState {
    /// OTK counts (R6.1).
    pub one_time_key_counts: OtkCounts,
    /// Algorithms with an unused fallback key, sorted by bytes (R6.3).
    pub unused_fallback_key_types: Vec<Algorithm>,
}

/// The devices whose OTK counts or fallback state an operation changed
/// (R11.1), sorted and without repeats. Cheap to clone.
///
/// A change event can also be [`Changes::unknown`]: changes were made that
/// could not be reported (another process's reports were lost, R11.3), so
/// any device may have changed. It lists no device, and answers `true` to
/// [`Changes::contains`] and [`Changes::contains_user`] for every device:
/// a subscriber re-reads whatever it watches, as after
/// [`broadcast::error::RecvError::Lagged`](tokio::sync::broadcast::error::RecvError::Lagged).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    devices: Arc<[Device]>,
    unknown: bool,
}

impl Changes {
    /// No change.
    pub fn none() -> Self {
        Self::default()
    }

    /// Changes that could not be reported: any device may have changed (see
    /// the type's docs).
    pub fn unknown() -> Self {
        Self {
            devices: Arc::from([]),
            unknown: true,
        }
    }

    /// Whether this stands for changes that could not be reported
    /// ([`Changes::unknown`]).
    pub fn is_unknown(&self) -> bool {
        self.unknown
    }

    /// Changes of the given devices (sorted and deduplicated here).
    pub fn from_devices(devices: impl IntoIterator<Item = Device>) -> Self {
        let set: BTreeSet<Device> = devices.into_iter().collect();
        Self {
            devices: set.into_iter().collect(),
            unknown: false,
        }
    }

    /// Changes of devices that are already sorted and without repeats.
    pub(crate) fn from_sorted(devices: &[Device]) -> Self {
        Self {
            devices: devices.into(),
            unknown: false,
        }
    }

    /// The changed devices (none for [`Changes::unknown`]).
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// Whether nothing changed (never for [`Changes::unknown`]).
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty() && !self.unknown
    }

    /// Whether the given device changed (or may have: [`Changes::unknown`]).
    pub fn contains(&self, device: &Device) -> bool {
        self.unknown || self.devices.binary_search(device).is_ok()
    }

    /// Whether any device of the given user changed (or may have:
    /// [`Changes::unknown`]).
    pub fn contains_user(&self, user: &UserId) -> bool {
        self.unknown || self.devices.iter().any(|d| &d.user_id == user)
    }
}

/// The answer to an upload, a key reset (R13.1) or a device replacement
/// (R14.1).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UploadOutcome {
    /// The device's OTK counts after the operation (R3.8, R13.1).
    pub counts: OtkCounts,
    /// The devices changed (R11.1): the device, when anything was stored or
    /// removed; for a replacement also the previous device when it held
    /// anything.
    pub changes: Changes,
}

/// A [`DeviceSnapshot`]'s one-time keys per algorithm
/// ([`DeviceSnapshot::queues`]).
#[derive(Debug, Default)]
pub struct SnapshotQueues<'s> {
    /// Per algorithm name, its keys in the order a queue holds them.
    pub per_algorithm: BTreeMap<&'s str, AlgorithmQueue<'s>>,
    /// The largest sequence number of the snapshot's OTKs (0 without any).
    pub max_seq: u64,
}

/// One algorithm's keys of a [`DeviceSnapshot`], in queue order.
#[derive(Debug, Default)]
pub struct AlgorithmQueue<'s> {
    /// The remembered issued keys, oldest first (R3.4).
    pub issued: Vec<&'s IssuedKey>,
    /// The stored OTKs, in claim order (R3.5).
    pub otks: Vec<&'s StoredOtk>,
}

/// A stored OTK, as exported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredOtk {
    /// Its key ID.
    pub key_id: KeyId,
    /// Its JSON.
    pub key_json: KeyJson,
    /// Its upload sequence number (R3.5); only the order matters.
    pub seq: u64,
}

/// A stored fallback key, as exported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredFallback {
    /// Its key ID.
    pub key_id: KeyId,
    /// Its JSON.
    pub key_json: KeyJson,
    /// Whether a claim has handed it out since it was uploaded (R4.4).
    pub used: bool,
}

/// A remembered issued OTK (R3.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedKey {
    /// Its key ID (the algorithm is the key ID's).
    pub key_id: KeyId,
    /// The digest of its JSON without signatures.
    pub digest: KeyDigest,
}

/// The whole stored state of one device, for export, import and checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSnapshot {
    /// The device.
    pub device: Device,
    /// Its OTKs, in claim order (oldest upload first, then key ID).
    pub one_time_keys: Vec<StoredOtk>,
    /// Its fallback keys by algorithm.
    pub fallback_keys: BTreeMap<Algorithm, StoredFallback>,
    /// Its remembered issued OTKs per algorithm, oldest issue first.
    pub issued: BTreeMap<Algorithm, Vec<IssuedKey>>,
}

impl DeviceSnapshot {
    /// An empty snapshot of a device.
    pub fn empty(device: Device) -> Self {
        Self {
            device,
            one_time_keys: Vec::new(),
            fallback_keys: BTreeMap::new(),
            issued: BTreeMap::new(),
        }
    }

    /// Whether the device holds nothing.
    pub fn is_empty(&self) -> bool {
        self.one_time_keys.is_empty() && self.fallback_keys.is_empty() && self.issued.is_empty()
    }

    /// The snapshot's one-time keys laid out per algorithm, as a backend
    /// that keeps a queue per (device, algorithm) imports them: the
    /// remembered issued keys, oldest first, each (key ID, digest) once and
    /// filed under its key ID's algorithm (where uploads look for it); then
    /// the stored OTKs in claim order, (seq, key ID), a key ID given twice
    /// counting once (the first). `max_seq` is the largest sequence number
    /// of those OTKs (0 without any): the store's counter must move past
    /// it, so that later uploads sort after every imported key.
    pub fn queues(&self) -> SnapshotQueues<'_> {
        let mut out = SnapshotQueues::default();
        let mut seen_issued: HashSet<(&str, [u8; 32])> = HashSet::new();
        for key in self.issued.values().flatten() {
            if seen_issued.insert((key.key_id.as_str(), *key.digest.as_bytes())) {
                let alg = key.key_id.algorithm_str();
                out.per_algorithm.entry(alg).or_default().issued.push(key);
            }
        }
        let mut seen_otks: HashSet<&str> = HashSet::new();
        for otk in &self.one_time_keys {
            if seen_otks.insert(otk.key_id.as_str()) {
                let alg = otk.key_id.algorithm_str();
                out.per_algorithm.entry(alg).or_default().otks.push(otk);
                out.max_seq = out.max_seq.max(otk.seq);
            }
        }
        for queue in out.per_algorithm.values_mut() {
            queue
                .otks
                .sort_by(|a, b| (a.seq, a.key_id.as_str()).cmp(&(b.seq, b.key_id.as_str())));
        }
        out
    }

    /// OTK counts derived from the snapshot.
    pub fn counts(&self) -> OtkCounts {
        self.one_time_keys
            .iter()
            .map(|otk| (otk.key_id.algorithm(), 1))
            .collect()
    }

    /// Unused fallback types derived from the snapshot.
    pub fn unused_fallback_types(&self) -> Vec<Algorithm> {
        self.fallback_keys
            .iter()
            .filter(|(_, f)| !f.used)
            .map(|(a, _)| a.clone())
            .collect()
    }

    /// The snapshot with sequence numbers replaced by their rank, so that two
    /// stores holding the same state compare equal whatever their counters.
    pub fn normalized(&self) -> Self {
        let mut out = self.clone();
        out.one_time_keys
            .sort_by(|a, b| (a.seq, &a.key_id).cmp(&(b.seq, &b.key_id)));
        let mut rank = 0u64;
        let mut last = None;
        for otk in &mut out.one_time_keys {
            if last != Some(otk.seq) {
                rank += 1;
                last = Some(otk.seq);
            }
            otk.seq = rank;
        }
        out
    }
}
