//! Reads: OTK counts, unused fallback key types, sync state (contract
//! section 6), of one device or many (R16.1); fallback keys (R15.1).

use std::collections::BTreeMap;

use keyclaim::backend::decode;
use keyclaim::{Algorithm, Device, OtkCounts, Result, StoredFallback, SyncState};
use rusqlite::{Connection, Statement, params};

use super::count_u64;
use crate::error::SqlContext as _;

const SQL_COUNTS: &str = "SELECT algorithm, stored FROM otk_queue \
     WHERE user_id = ?1 AND device_id = ?2 AND stored > 0";
const SQL_UNUSED_FALLBACKS: &str = "SELECT algorithm FROM fallback_key \
     WHERE user_id = ?1 AND device_id = ?2 AND used = 0 ORDER BY algorithm";
const SQL_FALLBACKS: &str = "SELECT algorithm, key_id, key_json, used FROM fallback_key \
     WHERE user_id = ?1 AND device_id = ?2 ORDER BY algorithm";

/// The device's OTK counts (R6.1), from its `otk_queue` rows alone.
pub(crate) fn otk_counts(conn: &Connection, device: &Device) -> Result<OtkCounts> {
    let mut stmt = conn.prepare_cached(SQL_COUNTS).ctx("otk_counts")?;
    counts_with(&mut stmt, device)
}

fn counts_with(stmt: &mut Statement<'_>, device: &Device) -> Result<OtkCounts> {
    const OP: &str = "otk_counts";
    let rows = stmt
        .query_map(
            params![device.user_id.as_str(), device.device_id.as_str()],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
        )
        .ctx(OP)?;
    let mut counts = BTreeMap::new();
    for row in rows {
        let (alg, n) = row.ctx(OP)?;
        counts.insert(decode::algorithm(alg)?, count_u64(n));
    }
    Ok(counts.into_iter().collect())
}

/// The device's unused fallback key types, sorted by bytes (R6.3), from the
/// `fallback_unused` index alone.
fn unused_with(stmt: &mut Statement<'_>, device: &Device) -> Result<Vec<Algorithm>> {
    const OP: &str = "unused_fallback_types";
    let rows = stmt
        .query_map(
            params![device.user_id.as_str(), device.device_id.as_str()],
            |r| r.get::<_, String>(0),
        )
        .ctx(OP)?;
    let mut out = Vec::new();
    for row in rows {
        out.push(decode::algorithm(row.ctx(OP)?)?);
    }
    Ok(out)
}

/// Counts and unused fallback types (section 6) with the two statements
/// ([`SQL_COUNTS`], [`SQL_UNUSED_FALLBACKS`]) of the caller's transaction:
/// two seeks, one into `otk_queue`'s primary key and one into the
/// `fallback_unused` index, both by (user, device) prefix.
fn device_sync_state(
    counts: &mut Statement<'_>,
    unused: &mut Statement<'_>,
    device: &Device,
) -> Result<SyncState> {
    Ok(SyncState {
        one_time_key_counts: counts_with(counts, device)?,
        unused_fallback_key_types: unused_with(unused, device)?,
    })
}

/// Counts and unused fallback types in one read transaction.
pub(crate) fn sync_state(conn: &Connection, device: &Device) -> Result<SyncState> {
    let tx = conn.unchecked_transaction().ctx("sync_state")?;
    let mut counts = tx.prepare_cached(SQL_COUNTS).ctx("sync_state")?;
    let mut unused = tx.prepare_cached(SQL_UNUSED_FALLBACKS).ctx("sync_state")?;
    let state = device_sync_state(&mut counts, &mut unused, device)?;
    drop((counts, unused));
    tx.commit().ctx("sync_state")?;
    Ok(state)
}

/// The sync state of each device, in the order given (R16.1), from one read
/// transaction: one snapshot of the file for all of them, one job on the
/// read pool, the two statements taken from the cache once. Each device
/// costs the two index seeks of its own sync state, so the cost grows with
/// the number of devices asked and never with the size of the store (R6.4);
/// a device without rows answers the empty state.
pub(crate) fn counts_many(conn: &Connection, devices: &[Device]) -> Result<Vec<SyncState>> {
    let tx = conn.unchecked_transaction().ctx("counts_many")?;
    let mut counts = tx.prepare_cached(SQL_COUNTS).ctx("counts_many")?;
    let mut unused = tx.prepare_cached(SQL_UNUSED_FALLBACKS).ctx("counts_many")?;
    let states = devices
        .iter()
        .map(|device| device_sync_state(&mut counts, &mut unused, device))
        .collect::<Result<Vec<_>>>()?;
    drop((counts, unused));
    tx.commit().ctx("counts_many")?;
    Ok(states)
}

/// The device's fallback keys by algorithm, with their used flags (R15.1):
/// one range of `fallback_key`'s primary key, led by (user, device). `op`
/// names the operation in errors (a fallback read, or an export).
pub(crate) fn fallback_keys(
    conn: &Connection,
    device: &Device,
    op: &'static str,
) -> Result<BTreeMap<Algorithm, StoredFallback>> {
    let mut stmt = conn.prepare_cached(SQL_FALLBACKS).ctx(op)?;
    let rows = stmt
        .query_map(
            params![device.user_id.as_str(), device.device_id.as_str()],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, bool>(3)?,
                ))
            },
        )
        .ctx(op)?;
    let mut out = BTreeMap::new();
    for row in rows {
        let (alg, key_id, json, used) = row.ctx(op)?;
        out.insert(
            decode::algorithm(alg)?,
            StoredFallback {
                key_id: decode::key_id(key_id)?,
                key_json: decode::key_json(&json)?,
                used,
            },
        );
    }
    Ok(out)
}
