//! Reads: OTK counts, unused fallback key types, sync state (contract
//! section 6).

use std::collections::BTreeMap;

use keyclaim::backend::decode;
use keyclaim::{Algorithm, Device, OtkCounts, Result, SyncState};
use rusqlite::{Connection, params};

use super::count_u64;
use crate::error::SqlContext as _;

const SQL_COUNTS: &str = "SELECT algorithm, stored FROM otk_queue \
     WHERE user_id = ?1 AND device_id = ?2 AND stored > 0";
const SQL_UNUSED_FALLBACKS: &str = "SELECT algorithm FROM fallback_key \
     WHERE user_id = ?1 AND device_id = ?2 AND used = 0 ORDER BY algorithm";

/// The device's OTK counts (R6.1), from its `otk_queue` rows alone.
pub(crate) fn otk_counts(conn: &Connection, device: &Device) -> Result<OtkCounts> {
    const OP: &str = "otk_counts";
    let mut stmt = conn.prepare_cached(SQL_COUNTS).ctx(OP)?;
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
pub(crate) fn unused_fallback_types(conn: &Connection, device: &Device) -> Result<Vec<Algorithm>> {
    const OP: &str = "unused_fallback_types";
    let mut stmt = conn.prepare_cached(SQL_UNUSED_FALLBACKS).ctx(OP)?;
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

/// Counts and unused fallback types in one read transaction.
pub(crate) fn sync_state(conn: &Connection, device: &Device) -> Result<SyncState> {
    let tx = conn.unchecked_transaction().ctx("sync_state")?;
    let state = SyncState {
        one_time_key_counts: otk_counts(&tx, device)?,
        unused_fallback_key_types: unused_fallback_types(&tx, device)?,
    };
    tx.commit().ctx("sync_state")?;
    Ok(state)
}
