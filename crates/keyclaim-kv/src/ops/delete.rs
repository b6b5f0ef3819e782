//! Deleting a device (R7.1) or a user (R7.2), and a device's stored
//! one-time keys (R13.1).

use std::collections::{BTreeMap, BTreeSet};

use keyclaim::backend::decode;
use keyclaim::{Changes, Device, Error, ResetScope, Result, UploadOutcome, UserId};

use super::read::counts;
use super::{append, load_record, remove_queue_rows, store_record};
use crate::engine::Space;
use crate::schema::{
    KeyRow, Queue, decode_digest, device_key, id_prefix, parse_key, prefix_end, user_prefix,
};
use crate::txn::{Source, Txn};

/// Removes every row of one device from every space; returns whether it
/// had any (R7.1).
pub(super) fn delete_device_rows(txn: &mut Txn<'_>, user: &str, device: &str) -> Result<bool> {
    let prefix = device_key(user, device);
    let end = prefix_end(&prefix);
    let mut had = txn.get(Space::Devices, &prefix)?.is_some();
    if had {
        txn.delete(Space::Devices, prefix.clone());
    }
    for space in [Space::Keys, Space::Ids] {
        for (key, _) in txn.scan(space, &prefix, &end)? {
            had = true;
            txn.delete(space, key);
        }
    }
    Ok(had)
}

/// Deletes one device (R7.1).
pub(crate) fn delete_device(txn: &mut Txn<'_>, device: &Device) -> Result<Changes> {
    let had = delete_device_rows(txn, device.user_id.as_str(), device.device_id.as_str())?;
    Ok(if had {
        Changes::from_devices([device.clone()])
    } else {
        Changes::none()
    })
}

/// Deletes every device of a user (R7.2): every device with state has a
/// record.
pub(crate) fn delete_user(txn: &mut Txn<'_>, user: &UserId) -> Result<Changes> {
    let prefix = user_prefix(user.as_str());
    let records = txn.scan(Space::Devices, &prefix, &prefix_end(&prefix))?;
    let mut devices = Vec::with_capacity(records.len());
    for (key, _) in &records {
        let parts = parse_key(Space::Devices, key, 2, false)?;
        devices.push(decode::device_id(parts.strings[1])?);
    }
    let mut out = Vec::with_capacity(devices.len());
    for device in devices {
        delete_device_rows(txn, user.as_str(), device.as_str())?;
        out.push(Device::new(user.clone(), device));
    }
    // Rows of a device without a record are not keyclaim's: `check`
    // reports them. Remove them too, so that the user is gone.
    for space in [Space::Keys, Space::Ids] {
        for (key, _) in txn.scan(space, &prefix, &prefix_end(&prefix))? {
            txn.delete(space, key);
        }
    }
    Ok(Changes::from_devices(out))
}

/// Removes the device's stored one-time keys in `scope` (R13.1): per
/// algorithm, keys of the stored part `head..end` of its queue. The
/// remembered issued keys (`first..head`) and the fallback keys stay, and
/// the removed keys are not remembered (their `ids` rows go too, so a
/// re-upload stores them again). Answers the counts after the reset.
pub(crate) fn reset_one_time_keys(
    txn: &mut Txn<'_>,
    device: &Device,
    scope: &ResetScope,
) -> Result<UploadOutcome> {
    let (u, d) = (device.user_id.as_str(), device.device_id.as_str());
    let mut record = load_record(txn, u, d)?;
    // Per algorithm, the positions to remove (`None`: all of `head..end`).
    let mut doomed: BTreeMap<String, Option<BTreeSet<u64>>> = BTreeMap::new();
    match scope {
        ResetScope::All => {
            for (alg, q) in &record.queues {
                if q.stored() > 0 {
                    doomed.insert(alg.clone(), None);
                }
            }
        }
        ResetScope::KeyIds(ids) => {
            for id in ids {
                let q = record.queue(id.algorithm_str());
                let prefix = id_prefix(u, d, id.as_str());
                for (key, value) in txn.scan(Space::Ids, &prefix, &prefix_end(&prefix))? {
                    let pos = parse_key(Space::Ids, &key, 3, true)?
                        .pos
                        .unwrap_or(u64::MAX);
                    decode_digest(id.as_str(), &value)?;
                    // Stored, not issued: issued keys stay remembered.
                    if (q.head..q.end).contains(&pos) {
                        doomed
                            .entry(id.algorithm_str().to_owned())
                            .or_insert_with(|| Some(BTreeSet::new()))
                            .get_or_insert_default()
                            .insert(pos);
                    }
                }
            }
        }
    }
    let changed = !doomed.is_empty();
    for (alg, listed) in &doomed {
        let mut q = record.queue(alg);
        remove_stored(txn, (u, d, alg), &mut q, listed.as_ref(), device)?;
        record.set_queue(alg, q);
    }
    if changed {
        store_record(txn, u, d, &record);
    }
    Ok(UploadOutcome {
        counts: counts(&record)?,
        changes: if changed {
            Changes::from_devices([device.clone()])
        } else {
            Changes::none()
        },
    })
}

/// Removes stored keys of one queue: those at the `listed` positions (all
/// of them when `None`). The queue stays without gaps (claims read `head..`
/// position by position): the stored keys after the first removed one move
/// down, in the same order and with their upload sequence, so counts stay
/// `end - head` and the claim order (R3.5) is kept.
fn remove_stored(
    txn: &mut Txn<'_>,
    (u, d, a): (&str, &str, &str),
    q: &mut Queue,
    listed: Option<&BTreeSet<u64>>,
    device: &Device,
) -> Result<()> {
    let from = match listed {
        Some(listed) => match listed.first() {
            Some(&pos) => pos,
            None => return Ok(()),
        },
        None => q.head,
    };
    let removed = remove_queue_rows(txn, (u, d, a), from, q.end)?;
    if removed.len() as u64 != q.end - from {
        return Err(Error::corrupt(format!(
            "one-time keys of {device} are missing from their {a} queue"
        )));
    }
    let kept: Vec<KeyRow> = removed
        .into_iter()
        .filter(|(pos, _)| listed.is_some_and(|l| !l.contains(pos)))
        .map(|(_, row)| row)
        .collect();
    q.end = from;
    for row in &kept {
        append(
            txn,
            (u, d, a),
            &mut q.end,
            (row.seq, &row.digest, &row.key_id, &row.json),
        );
    }
    Ok(())
}
