//! Uploads (section 3), the replacement of a dehydrated device (R14.1),
//! which is an upload after a deletion in the same operation, and the
//! pruning of forgotten issued keys that uploads do.

use std::collections::BTreeMap;

use keyclaim::backend::{DeviceFacts, decode, plan_upload};
use keyclaim::transfer::KeyDigest;
use keyclaim::{Changes, Device, DeviceId, Error, Limits, Result, Upload, UploadOutcome};

use super::delete::delete_device_rows;
use super::read::counts;
use super::{append, load_record, remembered_limit, remove_queue_rows, store_record, take_seq};
use crate::engine::Space;
use crate::schema::{
    DeviceRecord, Fallback, PRUNE_CHUNK, Queue, decode_digest, id_prefix, parse_key, prefix_end,
};
use crate::txn::{Source, Txn};

/// An upload (section 3), or the replacement of a dehydrated device (R14.1)
/// when `previous` is given: gathers the [`DeviceFacts`], asks
/// [`plan_upload`], and only if it is `Ok` deletes the `previous` device of
/// the upload's user and writes the plan. When `previous` is the upload's
/// own device, the upload is planned for, and applied to, an empty device.
/// Answers the counts after the upload (R3.8).
pub(crate) fn upload(
    txn: &mut Txn<'_>,
    upload: &Upload,
    previous: Option<&DeviceId>,
    limits: &Limits,
) -> Result<UploadOutcome> {
    let device = upload.device();
    let (u, d) = (device.user_id.as_str(), device.device_id.as_str());
    let starts_empty = previous == Some(&device.device_id);
    let mut record = if starts_empty {
        DeviceRecord::default()
    } else {
        load_record(txn, u, d)?
    };
    let facts = if starts_empty {
        DeviceFacts::default()
    } else {
        device_facts(txn, upload, &record, limits)?
    };
    // A rejection comes before anything is written: a replacement leaves
    // the previous device as it was (R14.1).
    let plan = plan_upload(upload, &facts, limits)?;
    let mut changed = Vec::new();
    if let Some(previous) = previous
        && delete_device_rows(txn, u, previous.as_str())?
    {
        changed.push(Device::new(device.user_id.clone(), previous.clone()));
    }
    if plan.is_noop() {
        if starts_empty {
            // The device was emptied by the deletion above.
            return outcome(&DeviceRecord::default(), changed);
        }
        return outcome(&record, changed);
    }
    changed.push(device.clone());
    if !plan.insert_otks.is_empty() {
        // One sequence number for the upload; inside a queue, key ID order
        // (the plan's), so positions follow (seq, key ID) (R3.5).
        let seq = take_seq(txn)?;
        let mut queues: BTreeMap<&str, Queue> = BTreeMap::new();
        for (id, json) in &plan.insert_otks {
            let alg = id.algorithm_str();
            let q = queues.entry(alg).or_insert_with(|| record.queue(alg));
            append(
                txn,
                (u, d, alg),
                &mut q.end,
                (seq, json.digest().as_bytes(), id.as_str(), json.canonical()),
            );
        }
        for (alg, mut q) in queues {
            // Uploads are where rows are added, so where the rows of
            // forgotten issued keys are pruned; claims only move the head.
            prune(txn, (u, d, alg), &mut q, limits)?;
            record.set_queue(alg, q);
        }
    }
    for (alg, id, json) in &plan.replace_fallbacks {
        record.fallbacks.insert(
            alg.as_str().to_owned(),
            Fallback {
                key_id: id.as_str().to_owned(),
                used: false,
                digest: *json.digest().as_bytes(),
                json: json.canonical().to_owned(),
            },
        );
    }
    store_record(txn, u, d, &record);
    outcome(&record, changed)
}

/// The answer of an upload: the device's counts (R3.8) and the changes.
fn outcome(record: &DeviceRecord, changed: Vec<Device>) -> Result<UploadOutcome> {
    Ok(UploadOutcome {
        counts: counts(record)?,
        changes: Changes::from_devices(changed),
    })
}

/// What `plan_upload` needs to know of the upload's device.
fn device_facts(
    txn: &Txn<'_>,
    upload: &Upload,
    record: &DeviceRecord,
    limits: &Limits,
) -> Result<DeviceFacts> {
    let device = upload.device();
    let (u, d) = (device.user_id.as_str(), device.device_id.as_str());
    let keep = remembered_limit(limits);
    let mut facts = DeviceFacts::default();
    if DeviceFacts::needs_all_counts(limits) {
        // R8.4: the cap counts every algorithm of the device.
        for (alg, q) in &record.queues {
            facts
                .otk_counts
                .insert(decode::algorithm(alg.as_str())?, q.stored());
        }
    }
    for id in upload.one_time_keys().keys() {
        let alg = id.algorithm_str();
        let q = record.queue(alg);
        facts.otk_counts.insert(id.algorithm(), q.stored());
        let prefix = id_prefix(u, d, id.as_str());
        for (key, value) in txn.scan(Space::Ids, &prefix, &prefix_end(&prefix))? {
            let pos = parse_key(Space::Ids, &key, 3, true)?
                .pos
                .unwrap_or(u64::MAX);
            let digest = KeyDigest::from_bytes(decode_digest(id.as_str(), &value)?);
            if pos >= q.end || pos < q.first {
                return Err(Error::corrupt(format!(
                    "one-time key {id} of {device} lies outside its queue"
                )));
            } else if pos >= q.head {
                facts.stored_otks.insert(id.clone(), digest);
            } else if q.head - pos <= keep {
                // Remembered: among the newest `keep` issued (R3.4). Older
                // ones are forgotten, whether their rows were pruned yet or
                // not.
                facts.issued.insert((id.clone(), digest));
            }
        }
    }
    for alg in upload.fallback_keys().keys() {
        if let Some(f) = record.fallbacks.get(alg.as_str()) {
            facts
                .fallback_digests
                .insert(alg.clone(), KeyDigest::from_bytes(f.digest));
        }
    }
    Ok(facts)
}

/// Deletes the rows of a queue's forgotten issued keys (R3.4: only the
/// newest `limits.remembered_issued_keys` are remembered) once more than
/// [`PRUNE_CHUNK`] of them wait: their `keys` and `ids` rows.
fn prune(
    txn: &mut Txn<'_>,
    (u, d, a): (&str, &str, &str),
    q: &mut Queue,
    limits: &Limits,
) -> Result<()> {
    let keep = remembered_limit(limits);
    if q.head - q.first <= keep.saturating_add(PRUNE_CHUNK) {
        return Ok(());
    }
    let new_first = q.head - keep;
    remove_queue_rows(txn, (u, d, a), q.first, new_first)?;
    q.first = new_first;
    Ok(())
}
