//! Deleting a device (R7.1) or a user (R7.2), one range per table, and a
//! device's stored one-time keys (R13.1).

use std::collections::{BTreeMap, BTreeSet};

use keyclaim::{Changes, Device, Error, ResetScope, UploadOutcome, UserId};
use redb::ReadableTable;

use super::{WriteTables, check_queue, counts, remove_range};
use crate::error::Fatal;
use crate::schema::{DeviceAlgKey, Digest, Queue, succ};
use keyclaim::backend::decode;

/// Removes every row of one device from every table; returns whether it had
/// any (R7.1).
pub(super) fn delete_device_rows(t: &mut WriteTables<'_>, u: &str, d: &str) -> Result<bool, Fatal> {
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
            decode::device_id(d).map_err(Fatal::Other)?,
        ));
    }
    Ok(Changes::from_devices(out))
}

/// Removes the device's stored one-time keys in `scope` (R13.1): per
/// algorithm, keys of the stored part `head..end` of its queue. The
/// remembered issued keys (`first..head`) and the fallback keys stay, and
/// the removed keys are not remembered (their `otk_ids` rows go too, so a
/// re-upload stores them again). Answers the counts after the reset and the
/// device when a key was removed.
pub(crate) fn reset_one_time_keys(
    t: &mut WriteTables<'_>,
    device: &Device,
    scope: &ResetScope,
) -> Result<UploadOutcome, Fatal> {
    let (u, d) = (device.user_id.as_str(), device.device_id.as_str());
    // Per algorithm: its queue and the positions to remove (`None`: all of
    // `head..end`).
    let mut doomed: BTreeMap<String, (Queue, Option<BTreeSet<u64>>)> = BTreeMap::new();
    match scope {
        ResetScope::All => {
            let hi = succ(d);
            for row in t.queue.range((u, d, "")..(u, hi.as_str(), ""))? {
                let (k, v) = row?;
                let q = v.value();
                check_queue(q)?;
                if q.1 < q.2 {
                    doomed.insert(k.value().2.to_owned(), (q, None));
                }
            }
        }
        ResetScope::KeyIds(ids) => {
            for id in ids {
                let alg = id.algorithm_str();
                let q = match doomed.get(alg) {
                    Some((q, _)) => *q,
                    None => t.queue((u, d, alg))?,
                };
                let (_, head, end) = q;
                let key_id = id.as_str();
                let mut found = Vec::new();
                for row in t.ids.range((u, d, key_id, 0)..=(u, d, key_id, u64::MAX))? {
                    let pos = row?.0.value().3;
                    // Stored, not issued: issued keys stay remembered.
                    if (head..end).contains(&pos) {
                        found.push(pos);
                    }
                }
                if !found.is_empty() {
                    let (_, listed) = doomed
                        .entry(alg.to_owned())
                        .or_insert_with(|| (q, Some(BTreeSet::new())));
                    listed.get_or_insert_default().extend(found);
                }
            }
        }
    }
    let changed = !doomed.is_empty();
    for (alg, (q, listed)) in &doomed {
        remove_stored(t, (u, d, alg), *q, listed.as_ref(), device)?;
    }
    Ok(UploadOutcome {
        counts: counts(&t.queue, u, d)?,
        changes: if changed {
            Changes::from_devices([device.clone()])
        } else {
            Changes::none()
        },
    })
}

/// Removes stored keys of one queue: those at the `listed` positions (all
/// of them when `None`). The queue stays without gaps (claims read
/// `head..` position by position): the stored keys after the first removed
/// one move down, in the same order and with their upload sequence, so
/// counts stay `end - head` and the claim order (R3.5) is kept.
fn remove_stored(
    t: &mut WriteTables<'_>,
    (u, d, a): DeviceAlgKey<'_>,
    mut q: Queue,
    listed: Option<&BTreeSet<u64>>,
    device: &Device,
) -> Result<(), Fatal> {
    let (_, head, end) = q;
    let from = match listed {
        Some(listed) => match listed.first() {
            Some(&pos) => pos,
            None => return Ok(()),
        },
        None => head,
    };
    let mut gone: Vec<(String, u64)> = Vec::new();
    let mut kept: Vec<(u64, String, Digest, String)> = Vec::new();
    let removed = remove_range(
        &mut t.keys,
        (u, d, a, from),
        (u, d, a, end),
        |_| {},
        |k, (seq, key_id, digest, json)| {
            gone.push((key_id.to_owned(), k.3));
            if listed.is_some_and(|l| !l.contains(&k.3)) {
                kept.push((seq, key_id.to_owned(), digest, json.to_owned()));
            }
        },
    )?;
    if removed != end - from {
        return Err(Fatal::Other(Error::corrupt(format!(
            "one-time keys of {device} are missing from their {a} queue"
        ))));
    }
    for (key_id, pos) in &gone {
        t.ids.remove((u, d, key_id.as_str(), *pos))?;
    }
    q.2 = from;
    for (seq, key_id, digest, json) in &kept {
        t.append((u, d, a), &mut q, *seq, key_id, *digest, json)?;
    }
    t.set_queue((u, d, a), q)
}
