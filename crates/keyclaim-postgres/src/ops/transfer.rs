//! Export and import of whole device states ([`DeviceSnapshot`]), for
//! copying, checking and migrating stores (`keyclaim::transfer`). An import
//! takes the device's advisory lock like an upload and replaces its state in
//! one transaction (R7.1 for the deletion half; see [`super::delete`]).

use std::collections::HashMap;

use keyclaim::backend::{decode, remembered_window};
use keyclaim::transfer::{DeviceSnapshot, IssuedKey, StoredFallback, StoredOtk};
use keyclaim::{Algorithm, Changes, Device, Limits, Result};
use tokio_postgres::IsolationLevel;
use tokio_postgres::types::ToSql;

use super::delete::{DELETE_DEVICE_OTKS, DELETE_DEVICE_REST};
use super::{LOCK_DEVICE, NOTIFY, Sql, UPSERT_FALLBACKS, count_to_u64, notify_payloads};
use crate::counts::insert_added_counts;
use crate::error::{corrupt, pg};
use crate::session::Conn;

/// One page of devices that hold any state, after a (user, device) cursor
/// (`('', '')` for the start: every user ID is longer). Each table gives at
/// most a page through its primary key, then the union is cut to a page.
const EXPORT_DEVICES: &str = "
SELECT user_id, device_id FROM (
    (SELECT DISTINCT user_id, device_id FROM otk
      WHERE (user_id, device_id) > ($1::text, $2::text) ORDER BY 1, 2 LIMIT $3)
    UNION
    (SELECT user_id, device_id FROM fallback
      WHERE (user_id, device_id) > ($1::text, $2::text) ORDER BY 1, 2 LIMIT $3)
    UNION
    (SELECT DISTINCT user_id, device_id FROM issued
      WHERE (user_id, device_id) > ($1::text, $2::text) ORDER BY 1, 2 LIMIT $3)
) d
ORDER BY user_id, device_id LIMIT $3";

const EXPORT_OTKS: &str = "
SELECT o.user_id, o.device_id, o.key_id, o.key_json, o.seq
  FROM otk o JOIN unnest($1::text[], $2::text[]) AS d(user_id, device_id)
    ON o.user_id = d.user_id AND o.device_id = d.device_id
 ORDER BY o.user_id, o.device_id, o.seq, o.key_id";

const EXPORT_FALLBACKS: &str = "
SELECT f.user_id, f.device_id, f.key_id, f.key_json, f.used
  FROM fallback f JOIN unnest($1::text[], $2::text[]) AS d(user_id, device_id)
    ON f.user_id = d.user_id AND f.device_id = d.device_id";

const EXPORT_ISSUED: &str = "
SELECT i.user_id, i.device_id, i.key_id, i.digest
  FROM issued i JOIN unnest($1::text[], $2::text[]) AS d(user_id, device_id)
    ON i.user_id = d.user_id AND i.device_id = d.device_id
 ORDER BY i.user_id, i.device_id, i.algorithm, i.issued_txn, i.issued_pos";

/// `$1` increasing new sequence values, one per distinct upload position
/// of an imported snapshot.
const ALLOCATE_SEQS: &str =
    "SELECT v FROM (SELECT nextval('otk_seq') AS v FROM generate_series(1, $1::int8)) s ORDER BY v";

/// A device's imported OTKs, counted in the same statement (R6.2, see
/// [`crate::counts::V4`]).
const IMPORT_OTKS: &str = concat!(
    "
WITH added AS (
    INSERT INTO otk (user_id, device_id, key_id, algorithm, seq, key_json, digest)
    SELECT $1, $2, u.key_id, u.algorithm, u.seq, u.key_json, u.digest
      FROM unnest($3::text[], $4::text[], $5::int8[], $6::text[], $7::bytea[])
           AS u(key_id, algorithm, seq, key_json, digest)
    RETURNING algorithm
)
",
    insert_added_counts!()
);

const IMPORT_ISSUED: &str = "
INSERT INTO issued (user_id, device_id, algorithm, key_id, digest, issued_txn, issued_pos)
SELECT $1, $2, u.algorithm, u.key_id, u.digest, (SELECT nextval('issued_seq')), u.pos
  FROM unnest($3::text[], $4::text[], $5::bytea[]) WITH ORDINALITY AS u(algorithm, key_id, digest, pos)
ON CONFLICT DO NOTHING";

/// Exports a page of device snapshots, all from one snapshot of the
/// database (a read-only repeatable-read transaction), with the remembered
/// issued keys of each (device, algorithm): its newest
/// `Limits::remembered_issued_keys` (R3.4; older rows wait for an upload to
/// prune them and count as forgotten).
pub(crate) async fn export_devices(
    client: &mut Conn,
    limits: &Limits,
    after: Option<&Device>,
    limit: usize,
) -> Result<Vec<DeviceSnapshot>> {
    let op = "export_devices";
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let (after_user, after_device) =
        after.map_or(("", ""), |d| (d.user_id.as_str(), d.device_id.as_str()));
    let tx = client
        .transaction_with(IsolationLevel::RepeatableRead, true)
        .await
        .map_err(pg(op))?;
    let (devices_stmt, otks_stmt, fallbacks_stmt, issued_stmt) = futures::try_join!(
        tx.prepare_cached(EXPORT_DEVICES),
        tx.prepare_cached(EXPORT_OTKS),
        tx.prepare_cached(EXPORT_FALLBACKS),
        tx.prepare_cached(EXPORT_ISSUED)
    )
    .map_err(pg(op))?;
    let device_rows = tx
        .query(&devices_stmt, &[&after_user, &after_device, &limit])
        .await
        .map_err(pg(op))?;
    let mut users: Vec<String> = Vec::with_capacity(device_rows.len());
    let mut device_ids: Vec<String> = Vec::with_capacity(device_rows.len());
    let mut snapshots: Vec<DeviceSnapshot> = Vec::with_capacity(device_rows.len());
    let mut position: HashMap<(String, String), usize> = HashMap::new();
    for row in &device_rows {
        let user: String = row.try_get(0).map_err(pg(op))?;
        let device_id: String = row.try_get(1).map_err(pg(op))?;
        snapshots.push(DeviceSnapshot::empty(decode::device(&user, &device_id)?));
        position.insert((user.clone(), device_id.clone()), snapshots.len() - 1);
        users.push(user);
        device_ids.push(device_id);
    }
    if snapshots.is_empty() {
        return Ok(snapshots);
    }
    let params: [&(dyn ToSql + Sync); 2] = [&users, &device_ids];
    let (otk_rows, fallback_rows, issued_rows) = futures::try_join!(
        tx.query(&otks_stmt, &params),
        tx.query(&fallbacks_stmt, &params),
        tx.query(&issued_stmt, &params)
    )
    .map_err(pg(op))?;
    tx.commit().await.map_err(pg(op))?;

    let find = |row: &tokio_postgres::Row| -> Result<usize> {
        let user: &str = row.try_get(0).map_err(pg(op))?;
        let device_id: &str = row.try_get(1).map_err(pg(op))?;
        position
            .get(&(user.to_owned(), device_id.to_owned()))
            .copied()
            .ok_or_else(|| corrupt("export", "row of an unlisted device"))
    };
    for row in &otk_rows {
        let i = find(row)?;
        let seq: i64 = row.try_get(4).map_err(pg(op))?;
        snapshots[i].one_time_keys.push(StoredOtk {
            key_id: decode::key_id(row.try_get::<_, &str>(2).map_err(pg(op))?)?,
            key_json: decode::key_json(row.try_get(3).map_err(pg(op))?)?,
            seq: count_to_u64(seq),
        });
    }
    for row in &fallback_rows {
        let i = find(row)?;
        let key_id = decode::key_id(row.try_get::<_, &str>(2).map_err(pg(op))?)?;
        snapshots[i].fallback_keys.insert(
            key_id.algorithm(),
            StoredFallback {
                key_id,
                key_json: decode::key_json(row.try_get(3).map_err(pg(op))?)?,
                used: row.try_get(4).map_err(pg(op))?,
            },
        );
    }
    for row in &issued_rows {
        let i = find(row)?;
        let key_id = decode::key_id(row.try_get::<_, &str>(2).map_err(pg(op))?)?;
        let digest = decode::digest(row.try_get(3).map_err(pg(op))?)?;
        snapshots[i]
            .issued
            .entry(key_id.algorithm())
            .or_default()
            .push(IssuedKey { key_id, digest });
    }
    for snapshot in &mut snapshots {
        for keys in snapshot.issued.values_mut() {
            let forgotten =
                keys.len() - remembered_window(keys, limits.remembered_issued_keys).len();
            keys.drain(..forgotten);
        }
    }
    Ok(snapshots)
}

/// Replaces a device's state with a snapshot. The snapshot's OTK order is
/// kept with new sequence values, so that later uploads sort after it; of
/// its issued keys, the newest `Limits::remembered_issued_keys` of each
/// algorithm are remembered (R3.4).
pub(crate) async fn import_device(
    client: &mut Conn,
    sql: &Sql,
    limits: &Limits,
    snapshot: &DeviceSnapshot,
) -> Result<Changes> {
    let op = "import_device";
    let device = &snapshot.device;
    let user_id = device.user_id.as_str();
    let device_id = device.device_id.as_str();

    // Distinct upload positions, in order; each gets one new sequence value.
    let mut positions: Vec<u64> = snapshot.one_time_keys.iter().map(|k| k.seq).collect();
    positions.sort_unstable();
    positions.dedup();
    let position_count = i64::try_from(positions.len()).unwrap_or(i64::MAX);

    let tx = client.transaction().await.map_err(pg(op))?;
    let (lock, del_otks, del_rest, alloc, ins_otks, ins_fallbacks, ins_issued, notify) =
        futures::try_join!(
            tx.prepare_cached(LOCK_DEVICE),
            tx.prepare_cached(DELETE_DEVICE_OTKS),
            tx.prepare_cached(DELETE_DEVICE_REST),
            tx.prepare_cached(ALLOCATE_SEQS),
            tx.prepare_cached(IMPORT_OTKS),
            tx.prepare_cached(UPSERT_FALLBACKS),
            tx.prepare_cached(IMPORT_ISSUED),
            tx.prepare_cached(NOTIFY)
        )
        .map_err(pg(op))?;
    let params: [&(dyn ToSql + Sync); 2] = [&user_id, &device_id];
    let count_params: [&(dyn ToSql + Sync); 1] = [&position_count];
    let (_, _, _, seq_rows) = futures::try_join!(
        tx.execute(&lock, &params),
        tx.execute(&del_otks, &params),
        tx.query_one(&del_rest, &params),
        tx.query(&alloc, &count_params)
    )
    .map_err(pg(op))?;
    let mut new_seq: HashMap<u64, i64> = HashMap::with_capacity(positions.len());
    for (old, row) in positions.iter().zip(&seq_rows) {
        new_seq.insert(*old, row.try_get(0).map_err(pg(op))?);
    }

    let otk_ids: Vec<&str> = snapshot
        .one_time_keys
        .iter()
        .map(|k| k.key_id.as_str())
        .collect();
    let otk_algs: Vec<&str> = snapshot
        .one_time_keys
        .iter()
        .map(|k| k.key_id.algorithm_str())
        .collect();
    let otk_seqs: Vec<i64> = snapshot
        .one_time_keys
        .iter()
        .map(|k| new_seq.get(&k.seq).copied().unwrap_or(0))
        .collect();
    let otk_jsons: Vec<&str> = snapshot
        .one_time_keys
        .iter()
        .map(|k| k.key_json.canonical())
        .collect();
    let otk_digests: Vec<[u8; 32]> = snapshot
        .one_time_keys
        .iter()
        .map(|k| *k.key_json.digest().as_bytes())
        .collect();
    let otk_digest_refs: Vec<&[u8]> = otk_digests.iter().map(|d| d.as_slice()).collect();

    let fb_algs: Vec<&str> = snapshot
        .fallback_keys
        .keys()
        .map(Algorithm::as_str)
        .collect();
    let fb_ids: Vec<&str> = snapshot
        .fallback_keys
        .values()
        .map(|f| f.key_id.as_str())
        .collect();
    let fb_jsons: Vec<&str> = snapshot
        .fallback_keys
        .values()
        .map(|f| f.key_json.canonical())
        .collect();
    let fb_digests: Vec<[u8; 32]> = snapshot
        .fallback_keys
        .values()
        .map(|f| *f.key_json.digest().as_bytes())
        .collect();
    let fb_digest_refs: Vec<&[u8]> = fb_digests.iter().map(|d| d.as_slice()).collect();
    let fb_used: Vec<bool> = snapshot.fallback_keys.values().map(|f| f.used).collect();

    let issued: Vec<(&Algorithm, &IssuedKey)> = snapshot
        .issued
        .iter()
        .flat_map(|(alg, keys)| {
            remembered_window(keys, limits.remembered_issued_keys)
                .iter()
                .map(move |k| (alg, k))
        })
        .collect();
    let iss_algs: Vec<&str> = issued.iter().map(|(a, _)| a.as_str()).collect();
    let iss_ids: Vec<&str> = issued.iter().map(|(_, k)| k.key_id.as_str()).collect();
    let iss_digests: Vec<&[u8]> = issued
        .iter()
        .map(|(_, k)| k.digest.as_bytes().as_slice())
        .collect();

    let payloads = if sql.transactional_notify {
        notify_payloads(&sql.instance, std::slice::from_ref(device))
    } else {
        Vec::new()
    };
    let otk_params: [&(dyn ToSql + Sync); 7] = [
        &user_id,
        &device_id,
        &otk_ids,
        &otk_algs,
        &otk_seqs,
        &otk_jsons,
        &otk_digest_refs,
    ];
    let fb_params: [&(dyn ToSql + Sync); 7] = [
        &user_id,
        &device_id,
        &fb_algs,
        &fb_ids,
        &fb_jsons,
        &fb_digest_refs,
        &fb_used,
    ];
    let iss_params: [&(dyn ToSql + Sync); 5] =
        [&user_id, &device_id, &iss_algs, &iss_ids, &iss_digests];
    let notify_params: [&(dyn ToSql + Sync); 2] = [&sql.channel, &payloads];
    futures::try_join!(
        tx.execute(&ins_otks, &otk_params),
        tx.execute(&ins_fallbacks, &fb_params),
        tx.execute(&ins_issued, &iss_params),
        tx.query(&notify, &notify_params)
    )
    .map_err(pg(op))?;
    tx.commit().await.map_err(pg(op))?;
    Ok(Changes::from_devices([device.clone()]))
}
