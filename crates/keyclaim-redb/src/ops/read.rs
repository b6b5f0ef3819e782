//! Counts and sync state (R6.1 to R6.4), for read transactions and for the
//! write transaction of an upload (R3.8); fallback keys (R15.1) and the
//! sync state of many devices (R16.1).

use std::collections::BTreeMap;

use keyclaim::transfer::StoredFallback;
use keyclaim::{Algorithm, Device, OtkCounts, SyncState};
use redb::{ReadTransaction, ReadableTable};

use super::{check_queue, parse_alg, stored_key};
use crate::error::Fatal;
use crate::schema::{DeviceAlgKey, FALLBACKS, FallbackValue, OTK_QUEUE, Queue, succ};

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

/// A device's fallback keys by algorithm, with their used flags (R15.1):
/// one short range over `fallbacks`.
pub(crate) fn fallback_keys<T>(
    table: &T,
    user: &str,
    device: &str,
) -> Result<BTreeMap<Algorithm, StoredFallback>, Fatal>
where
    T: ReadableTable<DeviceAlgKey<'static>, FallbackValue<'static>>,
{
    let hi = succ(device);
    let mut out = BTreeMap::new();
    for row in table.range((user, device, "")..(user, hi.as_str(), ""))? {
        let (k, v) = row?;
        let (key_id, json, used, digest) = v.value();
        let (key_id, key_json) = stored_key((user, device), "fallback key", key_id, json, digest)?;
        out.insert(
            parse_alg(k.value().2)?,
            StoredFallback {
                key_id,
                key_json,
                used,
            },
        );
    }
    Ok(out)
}

/// The fallback keys of one device from one read transaction (R15.1).
pub(crate) fn read_fallback_keys(
    txn: &ReadTransaction,
    device: &Device,
) -> Result<BTreeMap<Algorithm, StoredFallback>, Fatal> {
    fallback_keys(
        &txn.open_table(FALLBACKS)?,
        device.user_id.as_str(),
        device.device_id.as_str(),
    )
}

/// Counts and unused fallback types of one device, on open tables.
fn state_of<Q, F>(queues: &Q, fallbacks: &F, device: &Device) -> Result<SyncState, Fatal>
where
    Q: ReadableTable<DeviceAlgKey<'static>, Queue>,
    F: ReadableTable<DeviceAlgKey<'static>, FallbackValue<'static>>,
{
    let (u, d) = (device.user_id.as_str(), device.device_id.as_str());
    Ok(SyncState {
        one_time_key_counts: counts(queues, u, d)?,
        unused_fallback_key_types: unused_fallback_types(fallbacks, u, d)?,
    })
}

/// Counts and unused fallback types from one read transaction.
pub(crate) fn sync_state(txn: &ReadTransaction, device: &Device) -> Result<SyncState, Fatal> {
    state_of(
        &txn.open_table(OTK_QUEUE)?,
        &txn.open_table(FALLBACKS)?,
        device,
    )
}

/// The sync state of each device, in the order given, from one read
/// transaction (R16.1): per device one seek into `otk_queue` and one into
/// `fallbacks`, each reading only that device's rows, so the cost grows
/// with the number of devices asked, never with the size of the store. A
/// device without rows answers the empty state.
pub(crate) fn counts_many(
    txn: &ReadTransaction,
    devices: &[Device],
) -> Result<Vec<SyncState>, Fatal> {
    let queues = txn.open_table(OTK_QUEUE)?;
    let fallbacks = txn.open_table(FALLBACKS)?;
    devices
        .iter()
        .map(|device| state_of(&queues, &fallbacks, device))
        .collect()
}
