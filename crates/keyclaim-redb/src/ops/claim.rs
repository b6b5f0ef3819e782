//! Claims (section 4), the one-time step of a split claim (R12.1) and its
//! fallback step (R12.2).
//!
//! Every key a claim takes is decoded and checked here, inside the write
//! transaction, before anything commits (R10.7): a stored value that does
//! not decode fails the claim with [`Error::Corrupt`] and aborts its
//! transaction, so no key is used up without being delivered (the writer
//! then runs the batch-mates on their own, and they go on).

use keyclaim::{Changes, ClaimOutcome, ClaimTarget, ClaimedKey, Device, Error, FallbackTarget};

use redb::ReadableTable;

use super::{WriteTables, stored_key};
use crate::error::Fatal;
use crate::schema::DeviceAlgKey;

/// A claim's answer as it is collected.
#[derive(Default)]
struct Taken {
    keys: Vec<ClaimedKey>,
    changed: Vec<Device>,
}

impl Taken {
    fn into_outcome(self) -> ClaimOutcome {
        ClaimOutcome {
            keys: self.keys,
            changes: Changes::from_devices(self.changed),
        }
    }
}

/// A claim (section 4): per target, the keys at the head of the (device,
/// algorithm) queue, which moves past them (they stay behind it as the
/// remembered issued keys, R3.4); else, when `fall_back` is set, the
/// fallback key, marked used (R4.4). Without `fall_back` it is the
/// one-time step of a split claim (R12.1), which never touches fallback
/// keys. Core clamped the counts (R8.3) and left out targets of 0.
pub(crate) fn claim(
    t: &mut WriteTables<'_>,
    targets: &[ClaimTarget],
    fall_back: bool,
) -> Result<ClaimOutcome, Fatal> {
    let mut out = Taken::default();
    for target in targets {
        let device = &target.device;
        let key = (
            device.user_id.as_str(),
            device.device_id.as_str(),
            target.algorithm.as_str(),
        );
        let took = take_one_time_keys(t, key, device, target.count, &mut out)?;
        if !took && fall_back {
            take_fallback(t, key, device, true, &mut out)?;
        }
    }
    Ok(out.into_outcome())
}

/// The fallback step of a split claim (R12.2): per target the current
/// fallback key, marked used only where the target says so (section 5).
/// Targets without a fallback key add nothing (R4.6).
pub(crate) fn claim_fallbacks(
    t: &mut WriteTables<'_>,
    targets: &[FallbackTarget],
) -> Result<ClaimOutcome, Fatal> {
    let mut out = Taken::default();
    for target in targets {
        let device = &target.device;
        let key = (
            device.user_id.as_str(),
            device.device_id.as_str(),
            target.algorithm.as_str(),
        );
        take_fallback(t, key, device, target.mark_used, &mut out)?;
    }
    Ok(out.into_outcome())
}

/// Takes up to `count` keys from the head of a (device, algorithm) queue
/// into `out` (R4.2); returns whether it took any.
fn take_one_time_keys(
    t: &mut WriteTables<'_>,
    (u, d, a): DeviceAlgKey<'_>,
    device: &Device,
    count: u32,
    out: &mut Taken,
) -> Result<bool, Fatal> {
    let mut q = t.queue((u, d, a))?;
    let (_, head, end) = q;
    if head == end {
        return Ok(false);
    }
    let n = u64::from(count).min(end - head);
    let mut next = head;
    for row in t.keys.range((u, d, a, head)..(u, d, a, head + n))? {
        let (k, v) = row?;
        let (_, key_id, digest, json) = v.value();
        if k.value().3 != next {
            break;
        }
        next += 1;
        let (key_id, key_json) = stored_key((u, d), "one-time key", key_id, json, digest)?;
        out.keys.push(ClaimedKey {
            device: device.clone(),
            key_id,
            key_json,
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
    out.changed.push(device.clone());
    Ok(true)
}

/// Hands out the fallback key of a (device, algorithm) into `out`, if it
/// has one, marking it used when `mark_used` is set (R4.4, R12.2).
fn take_fallback(
    t: &mut WriteTables<'_>,
    key: DeviceAlgKey<'_>,
    device: &Device,
    mark_used: bool,
    out: &mut Taken,
) -> Result<(), Fatal> {
    let fallback = t.fallbacks.get(key)?.map(|v| {
        let (id, json, used, digest) = v.value();
        (id.to_owned(), json.to_owned(), used, digest)
    });
    let Some((key_id, json, used, digest)) = fallback else {
        return Ok(());
    };
    let (key_id_parsed, key_json) =
        stored_key((key.0, key.1), "fallback key", &key_id, &json, digest)?;
    if mark_used && !used {
        t.fallbacks
            .insert(key, (key_id.as_str(), json.as_str(), true, digest))?;
        out.changed.push(device.clone());
    }
    out.keys.push(ClaimedKey {
        device: device.clone(),
        key_id: key_id_parsed,
        key_json,
        fallback: true,
    });
    Ok(())
}
