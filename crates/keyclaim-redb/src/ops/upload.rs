//! Uploads (section 3), and the pruning of forgotten issued keys that they
//! do.

use std::collections::BTreeMap;

use keyclaim::backend::{DeviceFacts, plan_upload};
use keyclaim::transfer::KeyDigest;
use keyclaim::{Changes, Error, Limits, Result, Upload, UploadOutcome};

use redb::ReadableTable;

use super::{WriteTables, counts, remembered_limit, remove_range};
use crate::error::Fatal;
use crate::schema::{DeviceAlgKey, PRUNE_CHUNK, Queue};

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
