//! Claims (section 4), the one-time step of a split claim (R12.1) and its
//! fallback step (R12.2).

use keyclaim::backend::{RawClaim, RawClaimedKey};
use keyclaim::{ClaimTarget, Device, Error, FallbackTarget};

use redb::ReadableTable;

use super::WriteTables;
use crate::error::Fatal;
use crate::schema::DeviceAlgKey;

/// A claim (section 4): per target, the keys at the head of the (device,
/// algorithm) queue, which moves past them (they stay behind it as the
/// remembered issued keys, R3.4); else, when `fall_back` is set, the
/// fallback key, marked used (R4.4). Without `fall_back` it is the
/// one-time step of a split claim (R12.1), which never touches fallback
/// keys. The keys' JSON is rebuilt by the caller ([`RawClaim::decode`]), so
/// that the writer thread does only storage work. Core clamped the counts
/// (R8.3) and left out targets of 0.
pub(crate) fn claim(
    t: &mut WriteTables<'_>,
    targets: &[ClaimTarget],
    fall_back: bool,
) -> Result<RawClaim, Fatal> {
    let mut out = RawClaim::new();
    for (index, target) in targets.iter().enumerate() {
        let device = &target.device;
        let key = (
            device.user_id.as_str(),
            device.device_id.as_str(),
            target.algorithm.as_str(),
        );
        let took = take_one_time_keys(t, key, device, target.count, index, &mut out)?;
        if !took && fall_back {
            take_fallback(t, key, true, index, &mut out)?;
        }
    }
    Ok(out)
}

/// The fallback step of a split claim (R12.2): per target the current
/// fallback key, marked used only where the target says so (section 5).
/// Targets without a fallback key add nothing (R4.6).
pub(crate) fn claim_fallbacks(
    t: &mut WriteTables<'_>,
    targets: &[FallbackTarget],
) -> Result<RawClaim, Fatal> {
    let mut out = RawClaim::new();
    for (index, target) in targets.iter().enumerate() {
        let key = (
            target.device.user_id.as_str(),
            target.device.device_id.as_str(),
            target.algorithm.as_str(),
        );
        take_fallback(t, key, target.mark_used, index, &mut out)?;
    }
    Ok(out)
}

/// Takes up to `count` keys from the head of a (device, algorithm) queue
/// into `out` (R4.2); returns whether it took any.
fn take_one_time_keys(
    t: &mut WriteTables<'_>,
    (u, d, a): DeviceAlgKey<'_>,
    device: &Device,
    count: u32,
    index: usize,
    out: &mut RawClaim,
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
    Ok(true)
}

/// Hands out the fallback key of a (device, algorithm) into `out`, if it
/// has one, marking it used when `mark_used` is set (R4.4, R12.2).
fn take_fallback(
    t: &mut WriteTables<'_>,
    key: DeviceAlgKey<'_>,
    mark_used: bool,
    index: usize,
    out: &mut RawClaim,
) -> Result<(), Fatal> {
    let fallback = t.fallbacks.get(key)?.map(|v| {
        let (id, json, used, digest) = v.value();
        (id.to_owned(), json.to_owned(), used, digest)
    });
    let Some((key_id, json, used, digest)) = fallback else {
        return Ok(());
    };
    if mark_used && !used {
        t.fallbacks
            .insert(key, (key_id.as_str(), json.as_str(), true, digest))?;
        out.changed(index);
    }
    out.push(RawClaimedKey {
        target: index,
        key_id,
        key_json: json,
        digest: digest.to_vec(),
        fallback: true,
    });
    Ok(())
}
