//! Export and import of whole devices, for copying a store (`keyclaim::transfer`).

use std::collections::{BTreeMap, BTreeSet};

use keyclaim::transfer::{AlgorithmQueue, DeviceSnapshot, IssuedKey, KeyDigest, StoredOtk};
use keyclaim::{Changes, Device, Error, Limits};
use redb::{ReadTransaction, ReadableTable};

use super::delete::delete_device_rows;
use super::read::fallback_keys;
use super::{WriteTables, check_queue, parse_alg, parse_key_id, remembered_limit, stored_key};
use crate::error::Fatal;
use crate::schema::{DeviceAlgKey, FALLBACKS, OTK_KEYS, OTK_QUEUE, Queue, succ};
use keyclaim::backend::decode;

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
                decode::user_id(u).map_err(Fatal::Other)?,
                decode::device_id(d).map_err(Fatal::Other)?,
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
            let (key_id, key_json) = stored_key((u, d), "one-time key", key_id, json, digest)?;
            snap.one_time_keys.push(StoredOtk {
                key_id,
                key_json,
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
    snap.fallback_keys = fallback_keys(&txn.open_table(FALLBACKS)?, u, d)?;
    Ok(snap)
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
    let queues = snapshot.queues();
    for (alg, AlgorithmQueue { issued, otks }) in queues.per_algorithm {
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
    t.raise_seq_to(queues.max_seq.saturating_add(1));
    Ok(Changes::from_devices([snapshot.device.clone()]))
}
