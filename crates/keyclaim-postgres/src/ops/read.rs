//! Reads: a device's OTK counts and unused fallback types (R6.1 to R6.4).

use std::collections::BTreeMap;

use deadpool_postgres::Object;
use keyclaim::{Device, Result, SyncState};

use super::count_to_u64;
use crate::error::pg;
use keyclaim::backend::decode;

/// A device's OTK counts and unused fallback algorithms, in one snapshot;
/// index scans bounded by the device's own rows (R6.4).
pub(super) const SYNC_STATE: &str = "
SELECT false AS is_fallback, algorithm, count(*) AS n
  FROM otk WHERE user_id = $1 AND device_id = $2 GROUP BY algorithm
UNION ALL
SELECT true, algorithm, 0::int8
  FROM fallback WHERE user_id = $1 AND device_id = $2 AND NOT used";

/// Reads a device's counts and unused fallback types in one statement.
pub(crate) async fn sync_state(
    client: &Object,
    device: &Device,
    op: &'static str,
) -> Result<SyncState> {
    let stmt = client.prepare_cached(SYNC_STATE).await.map_err(pg(op))?;
    let rows = client
        .query(
            &stmt,
            &[&device.user_id.as_str(), &device.device_id.as_str()],
        )
        .await
        .map_err(pg(op))?;
    decode_sync_state(op, rows)
}

pub(super) fn decode_sync_state(
    op: &'static str,
    rows: Vec<tokio_postgres::Row>,
) -> Result<SyncState> {
    let mut counts = BTreeMap::new();
    let mut unused = Vec::new();
    for row in rows {
        let is_fallback: bool = row.try_get(0).map_err(pg(op))?;
        let algorithm = decode::algorithm(row.try_get::<_, &str>(1).map_err(pg(op))?)?;
        if is_fallback {
            unused.push(algorithm);
        } else {
            let n = count_to_u64(row.try_get(2).map_err(pg(op))?);
            if n > 0 {
                counts.insert(algorithm, n);
            }
        }
    }
    // Byte order (R2.7, R6.3), whatever order the rows came in.
    unused.sort();
    Ok(SyncState {
        one_time_key_counts: counts.into_iter().collect(),
        unused_fallback_key_types: unused,
    })
}
