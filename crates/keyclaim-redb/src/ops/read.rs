//! Counts and sync state (R6.1 to R6.4), for read transactions and for the
//! write transaction of an upload (R3.8).

use std::collections::BTreeMap;

use keyclaim::{Algorithm, Device, OtkCounts, SyncState};
use redb::{ReadTransaction, ReadableTable};

use super::{check_queue, parse_alg};
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

/// Counts and unused fallback types from one read transaction.
pub(crate) fn sync_state(txn: &ReadTransaction, device: &Device) -> Result<SyncState, Fatal> {
    let (u, d) = (device.user_id.as_str(), device.device_id.as_str());
    Ok(SyncState {
        one_time_key_counts: counts(&txn.open_table(OTK_QUEUE)?, u, d)?,
        unused_fallback_key_types: unused_fallback_types(&txn.open_table(FALLBACKS)?, u, d)?,
    })
}
