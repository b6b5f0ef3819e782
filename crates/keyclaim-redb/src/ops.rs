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

use std::collections::{BTreeMap, BTreeSet, HashSet};

use keyclaim::backend::{DeviceFacts, RawClaim, RawClaimedKey, decode, plan_upload};
use keyclaim::transfer::{DeviceSnapshot, IssuedKey, KeyDigest, StoredFallback, StoredOtk};
use keyclaim::{
    Algorithm, Changes, ClaimTarget, Device, DeviceId, Error, KeyId, KeyJson, Limits, OtkCounts,
    Result, SyncState, Upload, UploadOutcome, UserId,
};
use redb::{ReadTransaction, ReadableTable, Table, WriteTransaction};

use crate::BACKEND;
use crate::schema::{
    DeviceAlgKey, Digest, FALLBACKS, FallbackValue, META, META_NEXT_SEQ, OTK_IDS, OTK_KEYS,
    OTK_QUEUE, OtkIdKey, OtkKey, OtkValue, PRUNE_CHUNK, Queue, succ,
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
            // An I/O failure: the writer reopens the file, after which the
            // same operation can succeed.
            Self::Redb(e) => Error::storage(BACKEND, op, crate::slot::is_io(&e), e),
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

/// Every table of one write transaction, opened once, and the sequence
/// counter (R3.5) cached until [`WriteTables::finish`].
pub(crate) struct WriteTables<'txn> {
    meta: Table<'txn, &'static str, u64>,
    queue: Table<'txn, DeviceAlgKey<'static>, Queue>,
    keys: Table<'txn, OtkKey<'static>, OtkValue<'static>>,
    ids: Table<'txn, OtkIdKey<'static>, Digest>,
    fallbacks: Table<'txn, DeviceAlgKey<'static>, FallbackValue<'static>>,
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
            queue: txn.open_table(OTK_QUEUE)?,
            keys: txn.open_table(OTK_KEYS)?,
            ids: txn.open_table(OTK_IDS)?,
            fallbacks: txn.open_table(FALLBACKS)?,
            next_seq,
            seq_dirty: false,
        })
    }

    /// Writes the sequence counter back; call before committing. Returns
    /// whether it moved (then something was written).
    pub(crate) fn finish(&mut self) -> Result<bool, Fatal> {
        if self.seq_dirty {
            self.meta.insert(META_NEXT_SEQ, self.next_seq)?;
            self.seq_dirty = false;
            return Ok(true);
        }
        Ok(false)
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

    /// The queue `(first, head, end)` of a (device, algorithm); all 0 when
    /// it has none.
    fn queue(&self, key: DeviceAlgKey<'_>) -> Result<Queue, Fatal> {
        let q = self.queue.get(key)?.map_or((0, 0, 0), |v| v.value());
        check_queue(q)?;
        Ok(q)
    }

    /// Writes the queue of a (device, algorithm); no row when it is empty.
    fn set_queue(&mut self, key: DeviceAlgKey<'_>, q: Queue) -> Result<(), Fatal> {
        if q.0 == q.2 {
            self.queue.remove(key)?;
        } else {
            self.queue.insert(key, q)?;
        }
        Ok(())
    }

    /// Appends one key at the end of a queue (the caller writes the queue
    /// back with [`WriteTables::set_queue`]).
    fn append(
        &mut self,
        (u, d, a): DeviceAlgKey<'_>,
        q: &mut Queue,
        seq: u64,
        key_id: &str,
        digest: Digest,
        json: &str,
    ) -> Result<(), Fatal> {
        let pos = q.2;
        q.2 = q.2.saturating_add(1);
        self.keys
            .insert((u, d, a, pos), (seq, key_id, digest, json))?;
        self.ids.insert((u, d, key_id, pos), digest)?;
        Ok(())
    }
}

/// A queue whose positions are out of order breaks an invariant.
fn check_queue((first, head, end): Queue) -> Result<(), Fatal> {
    if first <= head && head <= end {
        Ok(())
    } else {
        Err(Fatal::Other(Error::corrupt(format!(
            "one-time key queue with positions {first}, {head}, {end} out of order"
        ))))
    }
}

/// Removes every row of `table` in `[lo, hi)`, calling `seen` with each
/// removed key and `seen_row` with each removed row; returns how many were
/// removed.
fn remove_range<'a, K, V>(
    table: &mut Table<'_, K, V>,
    lo: K::SelfType<'a>,
    hi: K::SelfType<'a>,
    mut seen: impl FnMut(K::SelfType<'_>),
    mut seen_row: impl FnMut(K::SelfType<'_>, V::SelfType<'_>),
) -> Result<u64, Fatal>
where
    K: redb::Key + 'static,
    V: redb::Value + 'static,
{
    let mut removed = 0;
    let mut it = table.extract_from_if(lo..hi, |_, _| true)?;
    for row in &mut it {
        let (k, v) = row?;
        seen(k.value());
        seen_row(k.value(), v.value());
        removed += 1;
    }
    it.close()?;
    Ok(removed)
}

// ---------------------------------------------------------------- reads

/// The OTK counts of a device (R6.1): one short range over `otk_queue`, one
/// row per algorithm the device has keys of.
pub(crate) fn counts<T>(table: &T, user: &str, device: &str) -> Result<OtkCounts, Fatal>
where
    T: ReadableTable<DeviceAlgKey<'static>, Queue>,
{
    let hi = succ(device);
    let mut out = BTreeMap::new();
    for row in table.range((user, device, "")..(user, hi.as_str(), ""))? {
        let (k, v) = row?;
        let q = v.value();
        check_queue(q)?;
        let stored = q.2 - q.1;
        if stored > 0 {
            out.insert(parse_alg(k.value().2)?, stored);
        }
    }
    Ok(out.into_iter().collect())
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
        one_time_key_counts: counts(&txn.open_table(OTK_QUEUE)?, u, d)?,
        unused_fallback_key_types: unused_fallback_types(&txn.open_table(FALLBACKS)?, u, d)?,
    })
}

/// Up to `limit` devices with state, after `after`, in (user, device) byte
/// order. A device has a row in `otk_queue` (which has none for a (device,
/// algorithm) without stored and remembered keys) or in `fallbacks`; each of
/// the two is read for at most `limit` distinct devices, and the union's
/// first `limit` are the candidates. A candidate whose only rows are
/// forgotten issued keys waiting to be pruned has no state and is left out;
/// another round then fills the page, so that a short page still means the
/// end of the store.
pub(crate) fn export_devices(
    txn: &ReadTransaction,
    after: Option<&Device>,
    limit: usize,
    limits: &Limits,
) -> Result<Vec<DeviceSnapshot>, Fatal> {
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
    let keep = remembered_limit(limits);
    let queues = txn.open_table(OTK_QUEUE)?;
    let fallbacks = txn.open_table(FALLBACKS)?;
    let mut out = Vec::new();
    let mut cursor: Option<(String, String)> = after.map(|a| {
        (
            a.user_id.as_str().to_owned(),
            a.device_id.as_str().to_owned(),
        )
    });
    while out.len() < limit {
        let want = limit - out.len();
        let lo_device = cursor.as_ref().map(|(u, d)| (u.as_str(), succ(d)));
        let lo: DeviceAlgKey<'_> = match &lo_device {
            Some((u, d)) => (u, d.as_str(), ""),
            None => ("", "", ""),
        };
        let mut devices: BTreeSet<(String, String)> = BTreeSet::new();
        scan(&queues, lo, want, &mut devices)?;
        scan(&fallbacks, lo, want, &mut devices)?;
        let batch: Vec<(String, String)> = devices.into_iter().take(want).collect();
        let Some(last) = batch.last().cloned() else {
            break;
        };
        for (u, d) in batch {
            let device = Device::new(
                UserId::parse(u).map_err(corrupt("stored user ID"))?,
                DeviceId::parse(d).map_err(corrupt("stored device ID"))?,
            );
            let snap = snapshot(txn, device, keep)?;
            if !snap.is_empty() {
                out.push(snap);
            }
        }
        cursor = Some(last);
    }
    Ok(out)
}

/// `limits.remembered_issued_keys` as a queue distance: a key issued at
/// position `pos` of a queue whose head is `head` is remembered while
/// `head - pos <= keep` (R3.4), exactly the newest `keep`, as the reference
/// model does. Older rows wait to be pruned ([`prune`]) and count as
/// forgotten.
fn remembered_limit(limits: &Limits) -> u64 {
    u64::try_from(limits.remembered_issued_keys).unwrap_or(u64::MAX)
}

/// The whole state of one device; of its issued keys, the remembered ones
/// (the newest `keep` per algorithm).
fn snapshot(txn: &ReadTransaction, device: Device, keep: u64) -> Result<DeviceSnapshot, Fatal> {
    let (u, d) = (device.user_id.as_str(), device.device_id.as_str());
    let hi = succ(d);
    let mut snap = DeviceSnapshot::empty(device.clone());
    let mut queues: BTreeMap<String, Queue> = BTreeMap::new();
    for row in txn
        .open_table(OTK_QUEUE)?
        .range((u, d, "")..(u, hi.as_str(), ""))?
    {
        let (k, v) = row?;
        let q = v.value();
        check_queue(q)?;
        queues.insert(k.value().2.to_owned(), q);
    }
    let keys = txn.open_table(OTK_KEYS)?;
    for row in keys.range((u, d, "", 0)..(u, hi.as_str(), "", 0))? {
        let (k, v) = row?;
        let (_, _, alg, pos) = k.value();
        let (seq, key_id, digest, json) = v.value();
        let (first, head, _) = queues.get(alg).copied().ok_or_else(|| {
            Fatal::Other(Error::corrupt(format!(
                "one-time key {key_id} of {device} has no queue"
            )))
        })?;
        if pos >= head {
            snap.one_time_keys.push(StoredOtk {
                key_id: parse_key_id(key_id)?,
                key_json: stored_json(json, digest)?,
                seq,
            });
        } else if pos >= first {
            if head - pos > keep {
                // Forgotten; the row waits to be pruned.
                continue;
            }
            snap.issued
                .entry(parse_alg(alg)?)
                .or_default()
                .push(IssuedKey {
                    key_id: parse_key_id(key_id)?,
                    digest: KeyDigest::from_bytes(digest),
                });
        } else {
            return Err(Fatal::Other(Error::corrupt(format!(
                "one-time key {key_id} of {device} lies before its queue"
            ))));
        }
    }
    snap.one_time_keys
        .sort_by(|a, b| (a.seq, a.key_id.as_str()).cmp(&(b.seq, b.key_id.as_str())));
    let fallbacks = txn.open_table(FALLBACKS)?;
    for row in fallbacks.range((u, d, "")..(u, hi.as_str(), ""))? {
        let (k, v) = row?;
        let (key_id, json, used, digest) = v.value();
        snap.fallback_keys.insert(
            parse_alg(k.value().2)?,
            StoredFallback {
                key_id: parse_key_id(key_id)?,
                key_json: stored_json(json, digest)?,
                used,
            },
        );
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
        upload.device().user_id.as_str(),
        upload.device().device_id.as_str(),
    );
    let keep = remembered_limit(limits);
    let mut facts = DeviceFacts::default();
    let mut queues: BTreeMap<&str, Queue> = BTreeMap::new();
    for id in upload.one_time_keys().keys() {
        let alg = id.algorithm_str();
        let (_, head, end) = match queues.get(alg) {
            Some(q) => *q,
            None => {
                let q = t.queue((u, d, alg))?;
                queues.insert(alg, q);
                facts.otk_counts.insert(id.algorithm(), q.2 - q.1);
                q
            }
        };
        let key_id = id.as_str();
        for row in t.ids.range((u, d, key_id, 0)..=(u, d, key_id, u64::MAX))? {
            let (k, v) = row?;
            let pos = k.value().3;
            let digest = KeyDigest::from_bytes(v.value());
            if pos >= end {
                return Err(Fatal::Other(Error::corrupt(format!(
                    "one-time key {key_id} of {} lies after its queue",
                    upload.device()
                ))));
            } else if pos >= head {
                facts.stored_otks.insert(id.clone(), digest);
            } else if head - pos <= keep {
                // Remembered: among the newest `keep` issued (R3.4). Older
                // ones are forgotten, whether their rows were pruned yet or
                // not.
                facts.issued.insert((id.clone(), digest));
            }
        }
    }
    for alg in upload.fallback_keys().keys() {
        if let Some(v) = t.fallbacks.get((u, d, alg.as_str()))? {
            facts
                .fallback_digests
                .insert(alg.clone(), KeyDigest::from_bytes(v.value().3));
        }
    }
    let plan = match plan_upload(upload, &facts, limits) {
        Ok(plan) => plan,
        // Nothing written yet: the rejection is this upload's alone.
        Err(e) => return Ok(Err(e)),
    };
    let changed = !plan.is_noop();
    if !plan.insert_otks.is_empty() {
        // One sequence number for the upload; inside a queue, key ID order
        // (the plan's), so positions follow (seq, key ID) (R3.5).
        let seq = t.take_seq();
        for (id, json) in plan.insert_otks {
            let alg = id.algorithm_str();
            let mut q = match queues.get(alg) {
                Some(q) => *q,
                None => t.queue((u, d, alg))?,
            };
            t.append(
                (u, d, alg),
                &mut q,
                seq,
                id.as_str(),
                *json.digest().as_bytes(),
                json.canonical(),
            )?;
            queues.insert(alg, q);
        }
        for (alg, q) in &mut queues {
            // Uploads are where rows are added, so where the rows of
            // forgotten issued keys are pruned: a claim adds no row (it
            // moves the head), so a queue holds at most the remembered limit
            // + PRUNE_CHUNK + the keys stored at its last upload, and claims
            // rewrite the queue record only.
            prune(t, (u, d, alg), q, limits)?;
            t.set_queue((u, d, alg), *q)?;
        }
    }
    for (alg, id, json) in plan.replace_fallbacks {
        t.fallbacks.insert(
            (u, d, alg.as_str()),
            (
                id.as_str(),
                json.canonical(),
                false,
                *json.digest().as_bytes(),
            ),
        )?;
    }
    let counts = counts(&t.queue, u, d)?;
    let changes = if changed {
        Changes::from_devices([upload.device().clone()])
    } else {
        Changes::none()
    };
    Ok(Ok(UploadOutcome { counts, changes }))
}

/// Key JSON the store wrote itself ([`decode::key_json_with_digest`]).
fn stored_json(text: &str, digest: Digest) -> Result<KeyJson, Fatal> {
    decode::key_json_with_digest(text, KeyDigest::from_bytes(digest)).map_err(Fatal::Other)
}

/// A claim (section 4): per target, the keys at the head of the (device,
/// algorithm) queue, which moves past them (they stay behind it as the
/// remembered issued keys, R3.4); else the fallback key, marked used. The
/// keys' JSON is rebuilt by the caller ([`RawClaim::decode`]), so
/// that the writer thread does only storage work. Core clamped the counts
/// (R8.3) and left out targets of 0.
pub(crate) fn claim(t: &mut WriteTables<'_>, targets: &[ClaimTarget]) -> Result<RawClaim, Fatal> {
    let mut out = RawClaim::new();
    for (index, target) in targets.iter().enumerate() {
        let count = target.count;
        let device = &target.device;
        let (u, d, a) = (
            device.user_id.as_str(),
            device.device_id.as_str(),
            target.algorithm.as_str(),
        );
        let mut q = t.queue((u, d, a))?;
        let (_, head, end) = q;
        if head < end {
            let n = u64::from(count).min(end - head);
            let mut next = head;
            for row in t.keys.range((u, d, a, head)..(u, d, a, head + n))? {
                let (k, v) = row?;
                let (_, key_id, digest, json) = v.value();
                if k.value().3 != next {
                    break;
                }
                next += 1;
                out.push(RawClaimedKey {
                    target: index,
                    key_id: key_id.to_owned(),
                    key_json: json.to_owned(),
                    digest: digest.to_vec(),
                    fallback: false,
                });
            }
            if next != head + n {
                return Err(Fatal::Other(Error::corrupt(format!(
                    "one-time key at position {next} of {device} is missing from its queue"
                ))));
            }
            q.1 = next;
            t.set_queue((u, d, a), q)?;
            out.changed(index);
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
                out.changed(index);
            }
            out.push(RawClaimedKey {
                target: index,
                key_id,
                key_json: json,
                digest: digest.to_vec(),
                fallback: true,
            });
        }
    }
    Ok(out)
}

/// Deletes the rows of a queue's forgotten issued keys (R3.4: only the
/// newest `limits.remembered_issued_keys` are remembered) once more than
/// [`PRUNE_CHUNK`] of them wait: one contiguous range of `otk_keys` and the
/// keys' `otk_ids` rows. Called by uploads, never by claims.
fn prune(
    t: &mut WriteTables<'_>,
    (u, d, a): DeviceAlgKey<'_>,
    q: &mut Queue,
    limits: &Limits,
) -> Result<(), Fatal> {
    let keep = remembered_limit(limits);
    let (first, head, _) = *q;
    if head - first <= keep.saturating_add(PRUNE_CHUNK) {
        return Ok(());
    }
    let new_first = head - keep;
    let mut forgotten: Vec<(String, u64)> = Vec::new();
    remove_range(
        &mut t.keys,
        (u, d, a, first),
        (u, d, a, new_first),
        |_| {},
        |k, v| forgotten.push((v.1.to_owned(), k.3)),
    )?;
    for (key_id, pos) in &forgotten {
        t.ids.remove((u, d, key_id.as_str(), *pos))?;
    }
    q.0 = new_first;
    Ok(())
}

/// Removes every row of one device from every table; returns whether it had
/// any (R7.1).
fn delete_device_rows(t: &mut WriteTables<'_>, u: &str, d: &str) -> Result<bool, Fatal> {
    let hi = succ(d);
    let hi = hi.as_str();
    let mut n = 0;
    n += remove_range(&mut t.queue, (u, d, ""), (u, hi, ""), |_| {}, |_, _| {})?;
    n += remove_range(
        &mut t.keys,
        (u, d, "", 0),
        (u, hi, "", 0),
        |_| {},
        |_, _| {},
    )?;
    n += remove_range(&mut t.ids, (u, d, "", 0), (u, hi, "", 0), |_| {}, |_, _| {})?;
    n += remove_range(&mut t.fallbacks, (u, d, ""), (u, hi, ""), |_| {}, |_, _| {})?;
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
    // Every device with state has a row in `otk_queue` or `fallbacks`.
    remove_range(
        &mut t.queue,
        (u, "", ""),
        (hi, "", ""),
        |k| note(k.1),
        |_, _| {},
    )?;
    remove_range(
        &mut t.fallbacks,
        (u, "", ""),
        (hi, "", ""),
        |k| note(k.1),
        |_, _| {},
    )?;
    remove_range(
        &mut t.keys,
        (u, "", "", 0),
        (hi, "", "", 0),
        |_| {},
        |_, _| {},
    )?;
    remove_range(
        &mut t.ids,
        (u, "", "", 0),
        (hi, "", "", 0),
        |_| {},
        |_, _| {},
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

/// Replaces a device's state with a snapshot. Per algorithm, the remembered
/// issued keys (oldest first) go before the head of the queue, the OTKs
/// after it in (seq, key ID) order; OTKs keep the snapshot's sequence
/// numbers and the counter moves past them, so that later uploads sort
/// after every imported key.
pub(crate) fn import_device(
    t: &mut WriteTables<'_>,
    snapshot: &DeviceSnapshot,
) -> Result<Changes, Fatal> {
    let (u, d) = (
        snapshot.device.user_id.as_str(),
        snapshot.device.device_id.as_str(),
    );
    delete_device_rows(t, u, d)?;
    type Pending<'s> = (Vec<&'s IssuedKey>, Vec<&'s StoredOtk>);
    let mut per_alg: BTreeMap<&str, Pending<'_>> = BTreeMap::new();
    let mut seen_otks: HashSet<&str> = HashSet::new();
    let mut seen_issued: HashSet<(&str, Digest)> = HashSet::new();
    let mut max_seq = 0;
    for keys in snapshot.issued.values() {
        for key in keys {
            // Filed under its key ID's algorithm, where uploads look for it.
            if seen_issued.insert((key.key_id.as_str(), *key.digest.as_bytes())) {
                let alg = key.key_id.algorithm_str();
                per_alg.entry(alg).or_default().0.push(key);
            }
        }
    }
    for otk in &snapshot.one_time_keys {
        // A key ID given twice: the first one counts.
        if seen_otks.insert(otk.key_id.as_str()) {
            let alg = otk.key_id.algorithm_str();
            per_alg.entry(alg).or_default().1.push(otk);
            max_seq = max_seq.max(otk.seq);
        }
    }
    for (alg, (issued, mut otks)) in per_alg {
        otks.sort_by(|a, b| (a.seq, a.key_id.as_str()).cmp(&(b.seq, b.key_id.as_str())));
        let mut q: Queue = (0, 0, 0);
        for key in issued {
            t.append(
                (u, d, alg),
                &mut q,
                0,
                key.key_id.as_str(),
                *key.digest.as_bytes(),
                "",
            )?;
        }
        q.1 = q.2;
        for otk in otks {
            t.append(
                (u, d, alg),
                &mut q,
                otk.seq,
                otk.key_id.as_str(),
                *otk.key_json.digest().as_bytes(),
                otk.key_json.canonical(),
            )?;
        }
        t.set_queue((u, d, alg), q)?;
    }
    for (alg, fb) in &snapshot.fallback_keys {
        t.fallbacks.insert(
            (u, d, alg.as_str()),
            (
                fb.key_id.as_str(),
                fb.key_json.canonical(),
                fb.used,
                *fb.key_json.digest().as_bytes(),
            ),
        )?;
    }
    t.raise_seq_to(max_seq.saturating_add(1));
    Ok(Changes::from_devices([snapshot.device.clone()]))
}
