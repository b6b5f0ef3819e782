//! Export of device snapshots and import of one (the transfer between
//! stores).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use keyclaim::backend::{decode, remembered_window};
use keyclaim::transfer::{DeviceSnapshot, IssuedKey, StoredOtk};
use keyclaim::{Algorithm, Changes, Device, Error, Limits, Result};
use rusqlite::{Connection, params};

use super::delete::clear_device;
use super::read::fallback_keys;
use super::{
    SQL_INSERT_KEY, SQL_QUEUE_ADD, SQL_UPSERT_FALLBACK, count_u64, insert_key, reserve, sql_int,
};
use crate::error::SqlContext as _;

const SQL_RAISE_SEQ: &str = "UPDATE store_meta SET next_seq = max(next_seq, ?1) WHERE id = 1";

const SQL_DEVICES_AFTER: [&str; 2] = [
    "SELECT DISTINCT user_id, device_id FROM otk_queue \
     WHERE (user_id, device_id) > (?1, ?2) AND (stored > 0 OR issued > 0) \
     ORDER BY user_id, device_id LIMIT ?3",
    "SELECT DISTINCT user_id, device_id FROM fallback_key \
     WHERE (user_id, device_id) > (?1, ?2) ORDER BY user_id, device_id LIMIT ?3",
];
const SQL_EXPORT_HEADS: &str =
    "SELECT algorithm, head FROM otk_queue WHERE user_id = ?1 AND device_id = ?2";
const SQL_EXPORT_KEYS: &str = "SELECT algorithm, pos, seq, key_id, digest, key_json \
     FROM one_time_key WHERE user_id = ?1 AND device_id = ?2 ORDER BY algorithm, pos";

/// Up to `limit` device snapshots after `after`, in (user ID, device ID)
/// byte order, all read in one read transaction.
pub(crate) fn export_devices(
    conn: &Connection,
    after: Option<&Device>,
    limit: usize,
    limits: &Limits,
) -> Result<Vec<DeviceSnapshot>> {
    const OP: &str = "export_devices";
    if limit == 0 {
        return Ok(Vec::new());
    }
    let tx = conn.unchecked_transaction().ctx(OP)?;
    let mut out = Vec::new();
    // Every valid user ID starts with '@', so ("", "") is before them all.
    let mut cursor: (String, String) = after.map_or_else(Default::default, |d| {
        (
            d.user_id.as_str().to_owned(),
            d.device_id.as_str().to_owned(),
        )
    });
    // Usually one round. A device whose rows are all forgotten issued keys
    // (waiting to be pruned) has no state and is left out; another round
    // fills the page, so that a short page still means the end.
    while out.len() < limit {
        let want = limit - out.len();
        let mut found: BTreeSet<(String, String)> = BTreeSet::new();
        for sql in SQL_DEVICES_AFTER {
            let mut stmt = tx.prepare_cached(sql).ctx(OP)?;
            let rows = stmt
                .query_map(params![cursor.0, cursor.1, sql_int(want)], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })
                .ctx(OP)?;
            for row in rows {
                found.insert(row.ctx(OP)?);
            }
        }
        // (String, String) orders by bytes, like Device.
        let batch: Vec<(String, String)> = found.into_iter().take(want).collect();
        let Some(last) = batch.last().cloned() else {
            break;
        };
        for (user, dev) in batch {
            let device = decode::device(user, dev)?;
            let snap = snapshot(&tx, device, limits.remembered_issued_keys)?;
            if !snap.is_empty() {
                out.push(snap);
            }
        }
        cursor = last;
    }
    tx.commit().ctx(OP)?;
    Ok(out)
}

/// One device's state. Of its issued rows, only the newest `keep` per
/// algorithm are remembered; older ones wait to be pruned and are left out.
fn snapshot(conn: &Connection, device: Device, keep: usize) -> Result<DeviceSnapshot> {
    const OP: &str = "export_devices";
    let p = params![device.user_id.as_str(), device.device_id.as_str()];
    let mut snap = DeviceSnapshot::empty(device.clone());

    let heads: HashMap<String, i64> = conn
        .prepare_cached(SQL_EXPORT_HEADS)
        .ctx(OP)?
        .query_map(p, |r| Ok((r.get(0)?, r.get(1)?)))
        .ctx(OP)?
        .collect::<rusqlite::Result<_>>()
        .ctx(OP)?;
    let mut stmt = conn.prepare_cached(SQL_EXPORT_KEYS).ctx(OP)?;
    let rows = stmt
        .query_map(p, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Vec<u8>>(4)?,
                r.get::<_, String>(5)?,
            ))
        })
        .ctx(OP)?;
    for row in rows {
        let (alg, pos, seq, key_id, digest, json) = row.ctx(OP)?;
        let head = heads
            .get(&alg)
            .copied()
            .ok_or_else(|| Error::corrupt("a stored key has no queue row"))?;
        // A row that does not read back fails the export naming it, so that
        // `check` reports where the damage is (R10.7).
        let located = |e: Error| {
            Error::corrupt_because(
                format!("device {device}: the one-time key row {key_id:?} at position {pos}"),
                e,
            )
        };
        if pos >= head {
            snap.one_time_keys.push(StoredOtk {
                key_id: decode::key_id(key_id.as_str()).map_err(located)?,
                key_json: decode::key_json(&json).map_err(located)?,
                seq: count_u64(seq),
            });
        } else {
            // Rows come in position order: issue order (R3.4).
            snap.issued
                .entry(decode::algorithm(alg.as_str()).map_err(located)?)
                .or_default()
                .push(IssuedKey {
                    key_id: decode::key_id(key_id.as_str()).map_err(located)?,
                    digest: decode::digest(&digest).map_err(located)?,
                });
        }
    }
    for issued in snap.issued.values_mut() {
        *issued = remembered_window(issued, keep).to_vec();
    }
    snap.issued.retain(|_, issued| !issued.is_empty());
    // Upload order across algorithms; key ID bytes break ties (R4.2).
    snap.one_time_keys
        .sort_by(|a, b| (a.seq, &a.key_id).cmp(&(b.seq, &b.key_id)));

    snap.fallback_keys = fallback_keys(conn, &device, OP).map_err(|e| match e {
        Error::Corrupt { .. } => {
            Error::corrupt_because(format!("device {device}: a fallback key row"), e)
        }
        other => other,
    })?;
    Ok(snap)
}

/// One algorithm's part of an imported snapshot.
#[derive(Default)]
struct ImportQueue<'a> {
    issued: Vec<&'a IssuedKey>,
    stored: Vec<(i64, &'a StoredOtk)>,
}

/// Replaces a device's whole state with a snapshot. OTKs keep their relative
/// order; the store's sequence counter is raised past them so that later
/// uploads sort after every imported key.
pub(crate) fn import_device(conn: &Connection, snapshot: &DeviceSnapshot) -> Result<Changes> {
    const OP: &str = "import_device";
    let device = &snapshot.device;
    let (user, dev) = (device.user_id.as_str(), device.device_id.as_str());
    clear_device(conn, device, OP)?;

    // Keep the snapshot's sequence numbers when SQLite can hold them (and the
    // counter can pass them); otherwise renumber by rank from the counter.
    let fits = snapshot
        .one_time_keys
        .iter()
        .all(|k| i64::try_from(k.seq).is_ok_and(|s| s < i64::MAX - 1));
    let mut sorted: Vec<&StoredOtk> = snapshot.one_time_keys.iter().collect();
    sorted.sort_by(|a, b| (a.seq, &a.key_id).cmp(&(b.seq, &b.key_id)));
    let mut queues: BTreeMap<Algorithm, ImportQueue<'_>> = BTreeMap::new();
    let mut max_seq = 0;
    let mut renumbered: Option<(u64, i64)> = None;
    for k in sorted {
        let seq = if fits {
            i64::try_from(k.seq).unwrap_or(0)
        } else {
            match renumbered {
                Some((last, seq)) if last == k.seq => seq,
                _ => {
                    let (seq, _) = reserve(conn, 1, 0, OP)?;
                    renumbered = Some((k.seq, seq));
                    seq
                }
            }
        };
        max_seq = max_seq.max(seq);
        queues
            .entry(k.key_id.algorithm())
            .or_default()
            .stored
            .push((seq, k));
    }
    for (alg, keys) in &snapshot.issued {
        let mut seen = HashSet::new();
        let q = queues.entry(alg.clone()).or_default();
        q.issued
            .extend(keys.iter().filter(|k| seen.insert((&k.key_id, k.digest))));
    }
    let total: usize = queues
        .values()
        .map(|q| q.issued.len() + q.stored.len())
        .sum();
    let (_, mut pos) = reserve(conn, 0, sql_int(total), OP)?;
    let mut insert = conn.prepare_cached(SQL_INSERT_KEY).ctx(OP)?;
    let mut queue_add = conn.prepare_cached(SQL_QUEUE_ADD).ctx(OP)?;
    for (alg, q) in &queues {
        let alg = alg.as_str();
        for key in &q.issued {
            // A remembered key needs its ID and digest only.
            insert_key(
                &mut insert,
                [user, dev, alg],
                (pos, 0),
                &key.key_id,
                key.digest,
                "",
            )?;
            pos += 1;
        }
        let head = pos;
        for (seq, k) in &q.stored {
            insert_key(
                &mut insert,
                [user, dev, alg],
                (pos, *seq),
                &k.key_id,
                k.key_json.digest(),
                k.key_json.canonical(),
            )?;
            pos += 1;
        }
        queue_add
            .execute(params![
                user,
                dev,
                alg,
                head,
                sql_int(q.stored.len()),
                sql_int(q.issued.len())
            ])
            .ctx(OP)?;
    }
    if !snapshot.one_time_keys.is_empty() {
        conn.prepare_cached(SQL_RAISE_SEQ)
            .ctx(OP)?
            .execute([max_seq.saturating_add(1)])
            .ctx(OP)?;
    }
    let mut upsert = conn.prepare_cached(SQL_UPSERT_FALLBACK).ctx(OP)?;
    for (alg, f) in &snapshot.fallback_keys {
        upsert
            .execute(params![
                user,
                dev,
                alg.as_str(),
                f.key_id.as_str(),
                &f.key_json.digest().as_bytes()[..],
                f.key_json.canonical(),
                f.used
            ])
            .ctx(OP)?;
    }
    Ok(Changes::from_devices([device.clone()]))
}
