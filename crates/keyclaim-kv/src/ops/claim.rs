//! Claims (section 4), the one-time step of a split claim (R12.1) and its
//! fallback step (R12.2).
//!
//! Every key a claim takes is decoded and checked here, before anything is
//! written (R10.7): a stored value that does not decode fails the claim
//! with [`Error::Corrupt`] and the writer drops what it wrote, so no key is
//! used up without being delivered (its batch-mates go on).

use keyclaim::{
    Changes, ClaimOutcome, ClaimTarget, ClaimedKey, Device, Error, FallbackTarget, Result,
};

use super::{load_record, store_record, stored_key};
use crate::engine::Space;
use crate::schema::{KeyRow, key_row};
use crate::txn::{Source, Txn};

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
    txn: &mut Txn<'_>,
    targets: &[ClaimTarget],
    fall_back: bool,
) -> Result<ClaimOutcome> {
    let mut out = Taken::default();
    for target in targets {
        let took = take_one_time_keys(txn, target, &mut out)?;
        if !took && fall_back {
            take_fallback(
                txn,
                &target.device,
                target.algorithm.as_str(),
                true,
                &mut out,
            )?;
        }
    }
    Ok(out.into_outcome())
}

/// The fallback step of a split claim (R12.2): per target the current
/// fallback key, marked used only where the target says so (section 5).
/// Targets without a fallback key add nothing (R4.6).
pub(crate) fn claim_fallbacks(
    txn: &mut Txn<'_>,
    targets: &[FallbackTarget],
) -> Result<ClaimOutcome> {
    let mut out = Taken::default();
    for target in targets {
        take_fallback(
            txn,
            &target.device,
            target.algorithm.as_str(),
            target.mark_used,
            &mut out,
        )?;
    }
    Ok(out.into_outcome())
}

/// Takes up to the target's count of keys from the head of its queue into
/// `out` (R4.2); returns whether it took any.
fn take_one_time_keys(txn: &mut Txn<'_>, target: &ClaimTarget, out: &mut Taken) -> Result<bool> {
    let device = &target.device;
    let (u, d, a) = (
        device.user_id.as_str(),
        device.device_id.as_str(),
        target.algorithm.as_str(),
    );
    let mut record = load_record(txn, u, d)?;
    let mut q = record.queue(a);
    if q.head == q.end {
        return Ok(false);
    }
    let n = u64::from(target.count).min(q.end - q.head);
    for pos in q.head..q.head + n {
        let Some(value) = txn.get(Space::Keys, &key_row(u, d, a, pos))? else {
            return Err(Error::corrupt(format!(
                "one-time key at position {pos} of {device} is missing from its {a} queue"
            )));
        };
        let row = KeyRow::decode(u, d, pos, &value)?;
        let (key_id, key_json) =
            stored_key((u, d), "one-time key", &row.key_id, &row.json, row.digest)?;
        out.keys.push(ClaimedKey {
            device: device.clone(),
            key_id,
            key_json,
            fallback: false,
        });
    }
    q.head += n;
    record.set_queue(a, q);
    store_record(txn, u, d, &record);
    out.changed.push(device.clone());
    Ok(true)
}

/// Hands out the fallback key of a (device, algorithm) into `out`, if it
/// has one, marking it used when `mark_used` is set (R4.4, R12.2).
fn take_fallback(
    txn: &mut Txn<'_>,
    device: &Device,
    alg: &str,
    mark_used: bool,
    out: &mut Taken,
) -> Result<()> {
    let (u, d) = (device.user_id.as_str(), device.device_id.as_str());
    let mut record = load_record(txn, u, d)?;
    let Some(fallback) = record.fallbacks.get_mut(alg) else {
        return Ok(());
    };
    let (key_id, key_json) = stored_key(
        (u, d),
        "fallback key",
        &fallback.key_id,
        &fallback.json,
        fallback.digest,
    )?;
    if mark_used && !fallback.used {
        fallback.used = true;
        store_record(txn, u, d, &record);
        out.changed.push(device.clone());
    }
    out.keys.push(ClaimedKey {
        device: device.clone(),
        key_id,
        key_json,
        fallback: true,
    });
    Ok(())
}
