//! Uploads (section 3), the replacement of a dehydrated device (R14.1),
//! which is an upload after a deletion in the same transaction, and the
//! pruning of forgotten issued keys that uploads do.

use std::collections::BTreeMap;

use keyclaim::backend::{DeviceFacts, plan_upload};
use keyclaim::transfer::KeyDigest;
use keyclaim::{Changes, Device, DeviceId, Error, Limits, Result, Upload, UploadOutcome};

use redb::ReadableTable;

use super::delete::delete_device_rows;
use super::{WriteTables, counts, remembered_limit, remove_range};
use crate::error::Fatal;
use crate::schema::{DeviceAlgKey, PRUNE_CHUNK, Queue};

/// An upload (section 3), or the replacement of a dehydrated device
/// (R14.1) when `previous` is given: gathers the [`DeviceFacts`], asks
/// [`plan_upload`], and only if it is `Ok` deletes the `previous` device of
/// the upload's user (as [`delete_device`](super::delete_device) does) and
/// writes the plan, all in the caller's transaction. When `previous` is the
/// upload's own device, the upload is planned for, and applied to, an empty
/// device. Answers the counts after the upload (R3.8) and as changed the
/// previous device if it held anything and the upload's device if anything
/// was stored.
pub(crate) fn upload(
    t: &mut WriteTables<'_>,
    upload: &Upload,
    previous: Option<&DeviceId>,
    limits: &Limits,
) -> Result<Result<UploadOutcome>, Fatal> {
    let device = upload.device();
    let (u, d) = (device.user_id.as_str(), device.device_id.as_str());
    let starts_empty = previous == Some(&device.device_id);
    let (facts, mut queues) = if starts_empty {
        (DeviceFacts::default(), BTreeMap::new())
    } else {
        device_facts(t, upload, limits)?
    };
    let plan = match plan_upload(upload, &facts, limits) {
        Ok(plan) => plan,
        // Nothing written yet: the rejection is this upload's alone, and a
        // replacement leaves the previous device as it was (R14.1).
        Err(e) => return Ok(Err(e)),
    };
    let mut changed = Vec::new();
    if let Some(previous) = previous
        && delete_device_rows(t, u, previous.as_str())?
    {
        changed.push(Device::new(device.user_id.clone(), previous.clone()));
    }
    if !plan.is_noop() {
        changed.push(device.clone());
    }
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
    Ok(Ok(UploadOutcome {
        counts: counts(&t.queue, u, d)?,
        changes: Changes::from_devices(changed),
    }))
}

/// What `plan_upload` needs to know of the upload's device, and the queues
/// of the algorithms the upload names, read on the way.
fn device_facts<'u>(
    t: &WriteTables<'_>,
    upload: &'u Upload,
    limits: &Limits,
) -> Result<(DeviceFacts, BTreeMap<&'u str, Queue>), Fatal> {
    let (u, d) = (
        upload.device().user_id.as_str(),
        upload.device().device_id.as_str(),
    );
    let keep = remembered_limit(limits);
    let mut facts = DeviceFacts::default();
    if DeviceFacts::needs_all_counts(limits) {
        // R8.4: the cap counts every algorithm of the device; one short
        // range over its queue records.
        for (alg, n) in counts(&t.queue, u, d)?.iter() {
            facts.otk_counts.insert(alg.clone(), n);
        }
    }
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
    Ok((facts, queues))
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
