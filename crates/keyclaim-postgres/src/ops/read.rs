//! Reads: a device's OTK counts and unused fallback types (R6.1 to R6.4),
//! the same for many devices at once (R16.1), a device's fallback keys
//! (R15.1).

use std::collections::BTreeMap;

use keyclaim::backend::decode;
use keyclaim::{Algorithm, Device, Result, StoredFallback, SyncState};

use super::count_to_u64;
use crate::error::{corrupt, pg};
use crate::session::Conn;

/// A device's OTK counts and unused fallback algorithms, in one snapshot
/// (R6.2, R6.4). Rows as [`SyncStateRows`] reads them.
///
/// Counts come from `otk_count`, as in [`COUNTS_MANY`]: the device's base
/// rows and the delta rows written since the last compaction (see
/// [`crate::counts`]), never its keys. Counting a device's keys read every
/// one of them: 0.17 ms for 500 keys against 0.02 ms for its count rows,
/// and a device of 20,000 keys that clients read after every `/sync` cost
/// milliseconds each time. The deltas are written by the statement that
/// changed the keys, so a read inside an upload's or deletion's
/// transaction sees its own changes.
pub(super) const SYNC_STATE: &str = "
SELECT false AS is_fallback, algorithm, n
  FROM otk_count WHERE user_id = $1 AND device_id = $2
UNION ALL
SELECT true, algorithm, 0::int8
  FROM fallback WHERE user_id = $1 AND device_id = $2 AND NOT used";

/// [`SYNC_STATE`] for many devices in one statement (one round trip, one
/// snapshot, R16.1): `$1`, `$2` the user and device IDs; a fourth column
/// `ord`, the 1-based index of the device asked. Duplicates are answered
/// once per time they are asked.
///
/// Counts come from `otk_count` (see [`crate::counts`]): per device asked,
/// one index range scan of `otk_count_key` over its base rows and the delta
/// rows written since the last compaction, and one of the `fallback`
/// primary key, so the cost grows with the number of devices asked, never
/// with their keys or the store. The rows are summed here, not per device
/// in the statement (a per-device aggregate cost more than the lookups; at
/// 10,000 devices, 76 to 167 ms against 98 to 205 ms in one run on a
/// loaded machine). The plan (PostgreSQL 15, generic plan):
///
/// ```text
/// Append
///   -> Nested Loop
///        -> Function Scan on d                     (the devices asked)
///        -> Index Only Scan using otk_count_key on otk_count c
///             Index Cond: ((user_id = d.user_id) AND (device_id = d.device_id))
///   -> Nested Loop
///        -> Function Scan on d_1
///        -> Index Scan using fallback_pkey on fallback f
///             Index Cond: ((user_id = d_1.user_id) AND (device_id = d_1.device_id))
///             Filter: (NOT used)
/// ```
const COUNTS_MANY: &str = "
SELECT false, c.algorithm, c.n, d.ord
  FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS d(user_id, device_id, ord)
  JOIN otk_count c ON c.user_id = d.user_id AND c.device_id = d.device_id
UNION ALL
SELECT true, f.algorithm, 0::int8, d.ord
  FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS d(user_id, device_id, ord)
  JOIN fallback f ON f.user_id = d.user_id AND f.device_id = d.device_id AND NOT f.used";

/// A device's fallback keys, changing nothing (R15.1); one index range scan.
const FALLBACK_KEYS: &str = "
SELECT algorithm, key_id, key_json, digest, used
  FROM fallback WHERE user_id = $1 AND device_id = $2";

/// Reads a device's counts and unused fallback types in one statement.
pub(crate) async fn sync_state(
    client: &mut Conn,
    device: &Device,
    op: &'static str,
) -> Result<SyncState> {
    let rows = query_device(client, SYNC_STATE, device, op).await?;
    decode_sync_state(op, rows)
}

/// Runs a statement whose parameters are the device's user and device ID.
async fn query_device(
    client: &mut Conn,
    statement: &str,
    device: &Device,
    op: &'static str,
) -> Result<Vec<tokio_postgres::Row>> {
    client
        .query_alone(
            statement,
            &[&device.user_id.as_str(), &device.device_id.as_str()],
        )
        .await
        .map_err(pg(op))
}

/// Reads the sync state of each device, in the order given, in one
/// statement ([`COUNTS_MANY`]). The statement is asked for each device
/// once, in byte order of user and device ID (the order of the indexes
/// it probes: neighbouring probes share their pages, which took a third
/// off the server's time at 10,000 devices), and a device asked twice is
/// answered twice from one lookup.
pub(crate) async fn counts_many(client: &mut Conn, devices: &[Device]) -> Result<Vec<SyncState>> {
    let op = "counts_many";
    // The places asked, sorted by device in byte order (R2.7), and the
    // distinct devices, each with its run of places in that order.
    let mut order: Vec<usize> = (0..devices.len()).collect();
    order.sort_by(|&a, &b| devices[a].cmp(&devices[b]));
    let mut distinct: Vec<(&Device, std::ops::Range<usize>)> = Vec::with_capacity(devices.len());
    for (at, &i) in order.iter().enumerate() {
        match distinct.last_mut() {
            Some((last, run)) if *last == &devices[i] => run.end = at + 1,
            _ => distinct.push((&devices[i], at..at + 1)),
        }
    }
    let users: Vec<&str> = distinct.iter().map(|(d, _)| d.user_id.as_str()).collect();
    let device_ids: Vec<&str> = distinct.iter().map(|(d, _)| d.device_id.as_str()).collect();
    let rows = client
        .query_alone(COUNTS_MANY, &[&users, &device_ids])
        .await
        .map_err(pg(op))?;
    let mut states: Vec<SyncStateRows> =
        distinct.iter().map(|_| SyncStateRows::default()).collect();
    for row in rows {
        let ord: i64 = row.try_get(3).map_err(pg(op))?;
        let state = usize::try_from(ord - 1)
            .ok()
            .and_then(|i| states.get_mut(i))
            .ok_or_else(|| corrupt("counts_many answer", format!("no device {ord}")))?;
        state.add(op, &row)?;
    }
    // Each state goes to every place its device was asked at (moved to the
    // last, copied to the others).
    let mut answer = vec![SyncState::default(); devices.len()];
    for ((_, run), state) in distinct.into_iter().zip(states) {
        if let Some((&last, others)) = order[run].split_last() {
            let state = state.finish();
            for &i in others {
                answer[i] = state.clone();
            }
            answer[last] = state;
        }
    }
    Ok(answer)
}

/// Reads a device's fallback keys in one statement.
pub(crate) async fn fallback_keys(
    client: &mut Conn,
    device: &Device,
) -> Result<BTreeMap<Algorithm, StoredFallback>> {
    let op = "fallback_keys";
    let rows = query_device(client, FALLBACK_KEYS, device, op).await?;
    let mut keys = BTreeMap::new();
    for row in rows {
        let algorithm = decode::algorithm(row.try_get::<_, &str>(0).map_err(pg(op))?)?;
        let key_id = decode::key_id(row.try_get::<_, &str>(1).map_err(pg(op))?)?;
        // Stored canonical with its digest by upload and import.
        let key_json = decode::key_json_with_digest(
            row.try_get::<_, &str>(2).map_err(pg(op))?,
            decode::digest(row.try_get(3).map_err(pg(op))?)?,
        )?;
        let used: bool = row.try_get(4).map_err(pg(op))?;
        keys.insert(
            algorithm,
            StoredFallback {
                key_id,
                key_json,
                used,
            },
        );
    }
    Ok(keys)
}

/// Decodes the rows of [`SYNC_STATE`].
pub(super) fn decode_sync_state(
    op: &'static str,
    rows: Vec<tokio_postgres::Row>,
) -> Result<SyncState> {
    let mut state = SyncStateRows::default();
    for row in &rows {
        state.add(op, row)?;
    }
    Ok(state.finish())
}

/// One device's sync state, gathered from rows whose first three columns
/// are `is_fallback`, `algorithm`, `n` ([`SYNC_STATE`], [`COUNTS_MANY`]);
/// the `n` of one algorithm's rows add up (count rows, see
/// [`crate::counts`]).
#[derive(Default)]
struct SyncStateRows {
    counts: BTreeMap<Algorithm, i64>,
    unused: Vec<Algorithm>,
}

impl SyncStateRows {
    fn add(&mut self, op: &'static str, row: &tokio_postgres::Row) -> Result<()> {
        let is_fallback: bool = row.try_get(0).map_err(pg(op))?;
        let algorithm = decode::algorithm(row.try_get::<_, &str>(1).map_err(pg(op))?)?;
        if is_fallback {
            self.unused.push(algorithm);
        } else {
            let n: i64 = row.try_get(2).map_err(pg(op))?;
            *self.counts.entry(algorithm).or_default() += n;
        }
        Ok(())
    }

    fn finish(mut self) -> SyncState {
        // Byte order (R2.7, R6.3), whatever order the rows came in.
        self.unused.sort();
        SyncState {
            one_time_key_counts: self
                .counts
                .into_iter()
                .map(|(algorithm, n)| (algorithm, count_to_u64(n)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            unused_fallback_key_types: self.unused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::plans::check_generic_plans;

    /// [`COUNTS_MANY`] walks the devices asked, with index scans of each
    /// (R16.1), in a store of many devices, whether or not sequential scans
    /// are allowed: the generic plan of the store's connections.
    #[test]
    fn counts_many_plan_grows_with_the_devices_asked_only() {
        check_generic_plans(
            "read::counts_many_plan",
            &format!("counts_many(text[], text[]) AS {COUNTS_MANY}"),
            "EXECUTE counts_many('{@u1:x,@u2:x}', '{D,D}')",
            |plan| {
                // Both tables are reached through an index, per device asked
                // (an index-only scan, or a bitmap scan before a vacuum).
                assert!(plan.starts_with("Append"), "{plan}");
                assert_eq!(plan.matches("Nested Loop").count(), 2, "{plan}");
                assert!(plan.contains("Function Scan on d"), "{plan}");
                assert!(plan.contains("otk_count_key"), "{plan}");
                assert!(plan.contains("fallback_pkey"), "{plan}");
                assert_eq!(
                    plan.matches("Index Cond: ((user_id = ").count(),
                    2,
                    "{plan}"
                );
                assert!(
                    !plan.contains("Seq Scan") && !plan.contains("Hash") && !plan.contains("Merge"),
                    "{plan}"
                );
            },
        );
    }
}
