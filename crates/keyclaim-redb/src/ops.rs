//! The operations, on open tables of one transaction.
//!
//! Write operations take a [`WriteTables`] (every table of one write
//! transaction, opened once per batch) and return `Result<_, Fatal>`: a
//! [`Fatal`] error means the transaction may hold a partial write and must be
//! aborted. A request the rules reject (a conflicting re-upload, a limit) is
//! decided before anything is written and comes back as the inner `Err` of
//! `Ok(Err(_))`, so that the transaction, and the batch-mates in it, go on.
//!
//! Read operations are generic over [`ReadableTable`], so that the same code
//! serves read transactions and the write transaction (an upload answers
//! the counts after itself, R3.8).

use std::collections::{BTreeMap, BTreeSet};

use keyclaim::{
    Algorithm, Changes, ClaimOutcome, ClaimTarget, ClaimedKey, Device, DeviceFacts, DeviceId,
    DeviceSnapshot, Error, IssuedKey, KeyDigest, KeyId, KeyJson, Limits, OtkCounts, Result,
    StoredFallback, StoredOtk, SyncState, Upload, UploadOutcome, UserId, plan_upload,
};
use redb::{ReadTransaction, ReadableTable, Table, WriteTransaction};

use crate::BACKEND;
use crate::schema::{
    ALG_COUNTS, AlgCounts, DeviceAlgKey, Digest, FALLBACKS, FallbackValue, ISSUED, ISSUED_INDEX,
    IssuedIndexKey, IssuedKey as IssuedRowKey, META, META_NEXT_SEQ, OTK_INDEX, OTKS, OtkIndexKey,
    OtkKey, succ,
};

/// A failure that leaves the transaction unusable: a storage error, or data
/// that breaks an invariant. The operation's transaction must be aborted.
#[derive(Debug)]
pub(crate) enum Fatal {
    /// redb failed.
    Redb(redb::Error),
    /// Anything else (corrupt data).
    Other(Error),
}

impl Fatal {
    /// The keyclaim error for operation `op`.
    pub(crate) fn into_error(self, op: &'static str) -> Error {
        match self {
            Self::Redb(e) => Error::storage(BACKEND, op, false, e),
            Self::Other(e) => e,
        }
    }
}

macro_rules! fatal_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Fatal {
            fn from(e: $t) -> Self {
                Self::Redb(e.into())
            }
        }
    )*};
}
fatal_from!(
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// Stored data that does not parse back: an invariant is broken.
fn corrupt(what: &'static str) -> impl FnOnce(Error) -> Fatal {
    move |e| Fatal::Other(Error::corrupt(format!("{what}: {e}")))
}

fn parse_alg(s: &str) -> Result<Algorithm, Fatal> {
    Algorithm::parse(s).map_err(corrupt("stored algorithm"))
}

fn parse_key_id(s: &str) -> Result<KeyId, Fatal> {
    KeyId::parse(s).map_err(corrupt("stored key ID"))
}

fn parse_json(s: &str) -> Result<KeyJson, Fatal> {
    KeyJson::from_json_str(s).map_err(corrupt("stored key JSON"))
}

/// Every table of one write transaction, opened once, and the sequence
/// counter (R3.5) cached until [`WriteTables::finish`].
pub(crate) struct WriteTables<'txn> {
    meta: Table<'txn, &'static str, u64>,
    otks: Table<'txn, OtkKey<'static>, &'static str>,
    otk_index: Table<'txn, OtkIndexKey<'static>, (u64, Digest)>,
    alg_counts: Table<'txn, DeviceAlgKey<'static>, AlgCounts>,
    fallbacks: Table<'txn, DeviceAlgKey<'static>, FallbackValue<'static>>,
    issued: Table<'txn, IssuedRowKey<'static>, (&'static str, Digest)>,
    issued_index: Table<'txn, IssuedIndexKey<'static>, u64>,
    next_seq: u64,
    seq_dirty: bool,
}

impl<'txn> WriteTables<'txn> {
    /// Opens every table of `txn`.
    pub(crate) fn open(txn: &'txn WriteTransaction) -> Result<Self, Fatal> {
        let meta = txn.open_table(META)?;
        let next_seq = match meta.get(META_NEXT_SEQ)? {
            Some(v) => v.value(),
            None => {
                return Err(Fatal::Other(Error::corrupt(
                    "redb file has no sequence counter",
                )));
            }
        };
        Ok(Self {
            meta,
            otks: txn.open_table(OTKS)?,
            otk_index: txn.open_table(OTK_INDEX)?,
            alg_counts: txn.open_table(ALG_COUNTS)?,
            fallbacks: txn.open_table(FALLBACKS)?,
            issued: txn.open_table(ISSUED)?,
            issued_index: txn.open_table(ISSUED_INDEX)?,
            next_seq,
            seq_dirty: false,
        })
    }

    /// Writes the sequence counter back; call before committing.
    pub(crate) fn finish(mut self) -> Result<(), Fatal> {
        if self.seq_dirty {
            self.meta.insert(META_NEXT_SEQ, self.next_seq)?;
        }
        Ok(())
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.saturating_add(1);
        self.seq_dirty = true;
        seq
    }

    fn raise_seq_to(&mut self, at_least: u64) {
        if self.next_seq < at_least {
            self.next_seq = at_least;
            self.seq_dirty = true;
        }
    }

    /// The (stored OTKs, remembered issued keys) of a (device, algorithm).
    fn alg_counts(&self, key: DeviceAlgKey<'_>) -> Result<AlgCounts, Fatal> {
        Ok(self.alg_counts.get(key)?.map_or((0, 0), |v| v.value()))
    }

    /// Writes the counts of a (device, algorithm); no row when both are 0.
    fn set_alg_counts(&mut self, key: DeviceAlgKey<'_>, counts: AlgCounts) -> Result<(), Fatal> {
        if counts == (0, 0) {
            self.alg_counts.remove(key)?;
        } else {
            self.alg_counts.insert(key, counts)?;
        }
        Ok(())
    }
}

/// Removes every row of `table` in `[lo, hi)` and calls `seen` with each
/// removed key; returns how many were removed.
fn remove_range<'a, K, V>(
    table: &mut Table<'_, K, V>,
    lo: K::SelfType<'a>,
    hi: K::SelfType<'a>,
    mut seen: impl FnMut(K::SelfType<'_>),
) -> Result<u64, Fatal>
where
    K: redb::Key + 'static,
    V: redb::Value + 'static,
{
    let mut removed = 0;
    let mut it = table.extract_from_if(lo..hi, |_, _| true)?;
    for row in &mut it {
        let (k, _) = row?;
        seen(k.value());
        removed += 1;
    }
    it.close()?;
    Ok(removed)
}

// ---------------------------------------------------------------- reads

/// The OTK counts of a device (R6.1): one short range over `alg_counts`,
/// one row per algorithm the device has keys of.
pub(crate) fn counts<T>(table: &T, user: &str, device: &str) -> Result<OtkCounts, Fatal>
where
    T: ReadableTable<DeviceAlgKey<'static>, AlgCounts>,
{
    let hi = succ(device);
    let mut out = BTreeMap::new();
    for row in table.range((user, device, "")..(user, hi.as_str(), ""))? {
        let (k, v) = row?;
        let (otks, _) = v.value();
        if otks > 0 {
            out.insert(parse_alg(k.value().2)?, otks);
        }
    }
    Ok(OtkCounts(out))
}

/// The algorithms with an unused fallback key, in byte order (R6.3).
pub(crate) fn unused_fallback_types<T>(
    table: &T,
    user: &str,
    device: &str,
) -> Result<Vec<Algorithm>, Fatal>
where
    T: ReadableTable<DeviceAlgKey<'static>, FallbackValue<'static>>,
{
    let hi = succ(device);
    let mut out = Vec::new();
    for row in table.range((user, device, "")..(user, hi.as_str(), ""))? {
        let (k, v) = row?;
        let (_, _, used, _) = v.value();
        if !used {
            out.push(parse_alg(k.value().2)?);
        }
    }
    Ok(out)
}

/// Counts and unused fallback types from one read transaction.
pub(crate) fn sync_state(txn: &ReadTransaction, device: &Device) -> Result<SyncState, Fatal> {
    let (u, d) = (device.user_id.as_str(), device.device_id.as_str());
    Ok(SyncState {
        one_time_key_counts: counts(&txn.open_table(ALG_COUNTS)?, u, d)?,
        unused_fallback_key_types: unused_fallback_types(&txn.open_table(FALLBACKS)?, u, d)?,
    })
}

/// Up to `limit` devices with state, after `after`, in (user, device) byte
/// order. A device has state iff it has a row in `alg_counts` (which has
/// none for a (device, algorithm) without OTKs and without remembered issued
/// keys) or in `fallbacks`; each of the two is read for at most `limit`
/// distinct devices, and the union's first `limit` are the answer.
pub(crate) fn export_devices(
    txn: &ReadTransaction,
    after: Option<&Device>,
    limit: usize,
) -> Result<Vec<DeviceSnapshot>, Fatal> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let lo_device = after.map(|a| (a.user_id.as_str(), succ(a.device_id.as_str())));
    let lo: DeviceAlgKey<'_> = match &lo_device {
        Some((u, d)) => (u, d.as_str(), ""),
        None => ("", "", ""),
    };
    let mut devices: BTreeSet<(String, String)> = BTreeSet::new();
    fn scan<T, V>(
        table: &T,
        lo: DeviceAlgKey<'_>,
        limit: usize,
        out: &mut BTreeSet<(String, String)>,
    ) -> Result<(), Fatal>
    where
        T: ReadableTable<DeviceAlgKey<'static>, V>,
        V: redb::Value + 'static,
    {
        let mut found = 0usize;
        let mut last: Option<(String, String)> = None;
        for row in table.range(lo..)? {
            let (k, _) = row?;
            let (u, d, _) = k.value();
            if last.as_ref().is_some_and(|(lu, ld)| lu == u && ld == d) {
                continue;
            }
            if found == limit {
                break;
            }
            found += 1;
            let dev = (u.to_owned(), d.to_owned());
            out.insert(dev.clone());
            last = Some(dev);
        }
        Ok(())
    }
    scan(&txn.open_table(ALG_COUNTS)?, lo, limit, &mut devices)?;
    scan(&txn.open_table(FALLBACKS)?, lo, limit, &mut devices)?;
    let mut out = Vec::new();
    for (u, d) in devices.into_iter().take(limit) {
        let device = Device::new(
            UserId::parse(u).map_err(corrupt("stored user ID"))?,
            DeviceId::parse(d).map_err(corrupt("stored device ID"))?,
        );
        out.push(snapshot(txn, device)?);
    }
    Ok(out)
}

/// The whole state of one device.
fn snapshot(txn: &ReadTransaction, device: Device) -> Result<DeviceSnapshot, Fatal> {
    let (u, d) = (device.user_id.as_str(), device.device_id.as_str());
    let hi = succ(d);
    let mut snap = DeviceSnapshot::empty(device.clone());
    let otks = txn.open_table(OTKS)?;
    for row in otks.range((u, d, "", 0, "")..(u, hi.as_str(), "", 0, ""))? {
        let (k, v) = row?;
        let (_, _, _, seq, key_id) = k.value();
        snap.one_time_keys.push(StoredOtk {
            key_id: parse_key_id(key_id)?,
            key_json: parse_json(v.value())?,
            seq,
        });
    }
    snap.one_time_keys
        .sort_by(|a, b| (a.seq, &a.key_id).cmp(&(b.seq, &b.key_id)));
    let fallbacks = txn.open_table(FALLBACKS)?;
    for row in fallbacks.range((u, d, "")..(u, hi.as_str(), ""))? {
        let (k, v) = row?;
        let (key_id, json, used, _) = v.value();
        snap.fallback_keys.insert(
            parse_alg(k.value().2)?,
            StoredFallback {
                key_id: parse_key_id(key_id)?,
                key_json: parse_json(json)?,
                used,
            },
        );
    }
    let issued = txn.open_table(ISSUED)?;
    for row in issued.range((u, d, "", 0)..(u, hi.as_str(), "", 0))? {
        let (k, v) = row?;
        let (key_id, digest) = v.value();
        snap.issued
            .entry(parse_alg(k.value().2)?)
            .or_default()
            .push(IssuedKey {
                key_id: parse_key_id(key_id)?,
                digest: KeyDigest(digest),
            });
    }
    Ok(snap)
}

// ---------------------------------------------------------------- writes

/// An upload (section 3): gathers the [`DeviceFacts`], asks
/// [`plan_upload`], and writes the plan only if it is `Ok`.
pub(crate) fn upload(
    t: &mut WriteTables<'_>,
    upload: &Upload,
    limits: &Limits,
) -> Result<Result<UploadOutcome>, Fatal> {
    let (u, d) = (
        upload.device.user_id.as_str(),
        upload.device.device_id.as_str(),
    );
    let mut facts = DeviceFacts::default();
    for (id, json) in &upload.one_time_keys {
        if let Some(v) = t.otk_index.get((u, d, id.as_str()))? {
            facts.stored_otks.insert(id.clone(), KeyDigest(v.value().1));
        }
        let digest = json.digest();
        if t.issued_index.get((u, d, id.as_str(), digest.0))?.is_some() {
            facts.issued.insert((id.clone(), digest));
        }
        if let std::collections::hash_map::Entry::Vacant(slot) =
            facts.otk_counts.entry(id.algorithm())
        {
            slot.insert(t.alg_counts((u, d, id.algorithm_str()))?.0);
        }
    }
    for alg in upload.fallback_keys.keys() {
        if let Some(v) = t.fallbacks.get((u, d, alg.as_str()))? {
            facts
                .fallback_digests
                .insert(alg.clone(), KeyDigest(v.value().3));
        }
    }
    let plan = match plan_upload(upload, &facts, limits) {
        Ok(plan) => plan,
        // Nothing written yet: the rejection is this upload's alone.
        Err(e) => return Ok(Err(e)),
    };
    let changed = !plan.is_noop();
    if !plan.insert_otks.is_empty() {
        let seq = t.take_seq();
        let mut added: BTreeMap<&str, u64> = BTreeMap::new();
        for (id, json) in plan.insert_otks {
            let alg = id.algorithm_str();
            t.otks
                .insert((u, d, alg, seq, id.as_str()), json.canonical())?;
            t.otk_index
                .insert((u, d, id.as_str()), (seq, json.digest().0))?;
            *added.entry(alg).or_insert(0) += 1;
        }
        for (alg, n) in added {
            let (otks, issued) = t.alg_counts((u, d, alg))?;
            t.set_alg_counts((u, d, alg), (otks.saturating_add(n), issued))?;
        }
    }
    for (alg, id, json) in plan.replace_fallbacks {
        t.fallbacks.insert(
            (u, d, alg.as_str()),
            (id.as_str(), json.canonical(), false, json.digest().0),
        )?;
    }
    let counts = counts(&t.alg_counts, u, d)?;
    let changes = if changed {
        Changes::from_devices([upload.device.clone()])
    } else {
        Changes::none()
    };
    Ok(Ok(UploadOutcome { counts, changes }))
}

/// A claim (section 4): per target, the oldest OTKs of the (device,
/// algorithm) range, removed as they are read; else the fallback key,
/// marked used.
pub(crate) fn claim(
    t: &mut WriteTables<'_>,
    targets: &[ClaimTarget],
    limits: &Limits,
) -> Result<ClaimOutcome, Fatal> {
    let mut keys = Vec::new();
    let mut changed = Vec::new();
    for target in targets {
        let count = limits.clamp_count(target.count) as usize;
        if count == 0 {
            continue;
        }
        let device = &target.device;
        let (u, d, a) = (
            device.user_id.as_str(),
            device.device_id.as_str(),
            target.algorithm.as_str(),
        );
        let hi = succ(a);
        let mut taken: Vec<(String, String)> = Vec::new();
        {
            let mut it = t
                .otks
                .extract_from_if((u, d, a, 0, "")..(u, d, hi.as_str(), 0, ""), |_, _| true)?;
            while taken.len() < count {
                let Some(row) = it.next() else { break };
                let (k, v) = row?;
                taken.push((k.value().4.to_owned(), v.value().to_owned()));
            }
            it.close()?;
        }
        if !taken.is_empty() {
            let (otks, mut issued) = t.alg_counts((u, d, a))?;
            let otks = otks.saturating_sub(taken.len() as u64);
            for (key_id, json) in taken {
                t.otk_index.remove((u, d, key_id.as_str()))?;
                let key_json = parse_json(&json)?;
                remember_issued(
                    t,
                    (u, d, a),
                    &key_id,
                    key_json.digest().0,
                    limits,
                    &mut issued,
                )?;
                keys.push(ClaimedKey {
                    device: device.clone(),
                    key_id: parse_key_id(&key_id)?,
                    key_json,
                    fallback: false,
                });
            }
            t.set_alg_counts((u, d, a), (otks, issued))?;
            changed.push(device.clone());
            continue;
        }
        let fallback = t.fallbacks.get((u, d, a))?.map(|v| {
            let (id, json, used, digest) = v.value();
            (id.to_owned(), json.to_owned(), used, digest)
        });
        if let Some((key_id, json, used, digest)) = fallback {
            if !used {
                t.fallbacks
                    .insert((u, d, a), (key_id.as_str(), json.as_str(), true, digest))?;
                changed.push(device.clone());
            }
            keys.push(ClaimedKey {
                device: device.clone(),
                key_id: parse_key_id(&key_id)?,
                key_json: parse_json(&json)?,
                fallback: true,
            });
        }
    }
    Ok(ClaimOutcome {
        keys,
        changes: Changes::from_devices(changed),
    })
}

/// Remembers an issued OTK (R3.4), keeping the newest
/// `limits.remembered_issued_keys` of the (device, algorithm); `issued` is
/// the (device, algorithm)'s count of remembered keys, kept up to date here
/// and written back by the caller.
fn remember_issued(
    t: &mut WriteTables<'_>,
    (u, d, a): DeviceAlgKey<'_>,
    key_id: &str,
    digest: Digest,
    limits: &Limits,
    issued: &mut u64,
) -> Result<(), Fatal> {
    let keep = u64::try_from(limits.remembered_issued_keys).unwrap_or(u64::MAX);
    if keep == 0 {
        return Ok(());
    }
    let seq = t.take_seq();
    let previous = t
        .issued_index
        .insert((u, d, key_id, digest), seq)?
        .map(|v| v.value());
    if let Some(previous) = previous {
        // Already remembered (only an import can lead here): it keeps its
        // place, as in the reference store.
        t.issued_index.insert((u, d, key_id, digest), previous)?;
        return Ok(());
    }
    t.issued.insert((u, d, a, seq), (key_id, digest))?;
    *issued += 1;
    if *issued > keep {
        *issued -= prune_issued(t, (u, d, a), *issued - keep)?;
    }
    Ok(())
}

/// Forgets the `excess` oldest remembered issued keys of a (device,
/// algorithm); returns how many it forgot.
fn prune_issued(
    t: &mut WriteTables<'_>,
    (u, d, a): DeviceAlgKey<'_>,
    excess: u64,
) -> Result<u64, Fatal> {
    let hi = succ(a);
    let mut forgotten: Vec<(String, Digest)> = Vec::new();
    {
        let mut it = t
            .issued
            .extract_from_if((u, d, a, 0)..(u, d, hi.as_str(), 0), |_, _| true)?;
        while (forgotten.len() as u64) < excess {
            let Some(row) = it.next() else { break };
            let (_, v) = row?;
            let (key_id, digest) = v.value();
            forgotten.push((key_id.to_owned(), digest));
        }
        it.close()?;
    }
    for (key_id, digest) in &forgotten {
        t.issued_index.remove((u, d, key_id.as_str(), *digest))?;
    }
    Ok(forgotten.len() as u64)
}

/// Removes every row of one device from every table; returns whether it had
/// any (R7.1).
fn delete_device_rows(t: &mut WriteTables<'_>, u: &str, d: &str) -> Result<bool, Fatal> {
    let hi = succ(d);
    let hi = hi.as_str();
    let mut n = 0;
    n += remove_range(&mut t.otks, (u, d, "", 0, ""), (u, hi, "", 0, ""), |_| {})?;
    n += remove_range(&mut t.otk_index, (u, d, ""), (u, hi, ""), |_| {})?;
    n += remove_range(&mut t.alg_counts, (u, d, ""), (u, hi, ""), |_| {})?;
    n += remove_range(&mut t.fallbacks, (u, d, ""), (u, hi, ""), |_| {})?;
    n += remove_range(&mut t.issued, (u, d, "", 0), (u, hi, "", 0), |_| {})?;
    n += remove_range(
        &mut t.issued_index,
        (u, d, "", [0; 32]),
        (u, hi, "", [0; 32]),
        |_| {},
    )?;
    Ok(n > 0)
}

/// Deletes one device (R7.1).
pub(crate) fn delete_device(t: &mut WriteTables<'_>, device: &Device) -> Result<Changes, Fatal> {
    let had = delete_device_rows(t, device.user_id.as_str(), device.device_id.as_str())?;
    Ok(if had {
        Changes::from_devices([device.clone()])
    } else {
        Changes::none()
    })
}

/// Deletes every device of a user (R7.2): one range per table.
pub(crate) fn delete_user(t: &mut WriteTables<'_>, user: &UserId) -> Result<Changes, Fatal> {
    let u = user.as_str();
    let hi = succ(u);
    let hi = hi.as_str();
    let mut devices: BTreeSet<String> = BTreeSet::new();
    let mut note = |d: &str| {
        if !devices.contains(d) {
            devices.insert(d.to_owned());
        }
    };
    // Every device with state has a row in `alg_counts` or `fallbacks`.
    remove_range(&mut t.alg_counts, (u, "", ""), (hi, "", ""), |k| note(k.1))?;
    remove_range(&mut t.fallbacks, (u, "", ""), (hi, "", ""), |k| note(k.1))?;
    remove_range(&mut t.otks, (u, "", "", 0, ""), (hi, "", "", 0, ""), |_| {})?;
    remove_range(&mut t.otk_index, (u, "", ""), (hi, "", ""), |_| {})?;
    remove_range(&mut t.issued, (u, "", "", 0), (hi, "", "", 0), |_| {})?;
    remove_range(
        &mut t.issued_index,
        (u, "", "", [0; 32]),
        (hi, "", "", [0; 32]),
        |_| {},
    )?;
    let mut out = Vec::with_capacity(devices.len());
    for d in devices {
        out.push(Device::new(
            user.clone(),
            DeviceId::parse(d).map_err(corrupt("stored device ID"))?,
        ));
    }
    Ok(Changes::from_devices(out))
}

/// Replaces a device's state with a snapshot. OTKs keep the snapshot's
/// sequence numbers and the counter moves past them, so that later uploads
/// sort after every imported key.
pub(crate) fn import_device(
    t: &mut WriteTables<'_>,
    snapshot: &DeviceSnapshot,
) -> Result<Changes, Fatal> {
    let (u, d) = (
        snapshot.device.user_id.as_str(),
        snapshot.device.device_id.as_str(),
    );
    delete_device_rows(t, u, d)?;
    let mut max_seq = 0;
    let mut counts: BTreeMap<&str, AlgCounts> = BTreeMap::new();
    for otk in &snapshot.one_time_keys {
        let id = otk.key_id.as_str();
        if t.otk_index.get((u, d, id))?.is_some() {
            // A key ID given twice: the first one counts.
            continue;
        }
        let alg = otk.key_id.algorithm_str();
        t.otks
            .insert((u, d, alg, otk.seq, id), otk.key_json.canonical())?;
        t.otk_index
            .insert((u, d, id), (otk.seq, otk.key_json.digest().0))?;
        counts.entry(alg).or_insert((0, 0)).0 += 1;
        max_seq = max_seq.max(otk.seq);
    }
    for (alg, fb) in &snapshot.fallback_keys {
        t.fallbacks.insert(
            (u, d, alg.as_str()),
            (
                fb.key_id.as_str(),
                fb.key_json.canonical(),
                fb.used,
                fb.key_json.digest().0,
            ),
        )?;
    }
    for (alg, keys) in &snapshot.issued {
        let a = alg.as_str();
        let n = &mut counts.entry(a).or_insert((0, 0)).1;
        for key in keys {
            let id = key.key_id.as_str();
            if t.issued_index.get((u, d, id, key.digest.0))?.is_some() {
                continue;
            }
            let seq = t.take_seq();
            t.issued.insert((u, d, a, seq), (id, key.digest.0))?;
            t.issued_index.insert((u, d, id, key.digest.0), seq)?;
            *n += 1;
        }
    }
    for (alg, alg_counts) in counts {
        t.set_alg_counts((u, d, alg), alg_counts)?;
    }
    t.raise_seq_to(max_seq.saturating_add(1));
    Ok(Changes::from_devices([snapshot.device.clone()]))
}
