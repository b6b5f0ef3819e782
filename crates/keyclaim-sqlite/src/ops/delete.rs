//! Deletion of a device's or a user's state (contract section 7), and of a
//! device's stored one-time keys (key reset, R13.1).

use std::collections::HashMap;

use keyclaim::backend::decode;
use keyclaim::{Changes, Device, ResetScope, Result, UploadOutcome, UserId};
use rusqlite::{Connection, params};

use super::{SQL_KEYS_BY_ID, otk_counts, queue};
use crate::error::SqlContext as _;

const SQL_DELETE_DEVICE_KEYS: &str =
    "DELETE FROM one_time_key WHERE user_id = ?1 AND device_id = ?2";
const SQL_DELETE_DEVICE_FALLBACKS: &str =
    "DELETE FROM fallback_key WHERE user_id = ?1 AND device_id = ?2";
const SQL_DELETE_DEVICE_QUEUES: &str =
    "DELETE FROM otk_queue WHERE user_id = ?1 AND device_id = ?2";
const SQL_USER_DEVICES: &str = "SELECT device_id FROM otk_queue \
     WHERE user_id = ?1 AND (stored > 0 OR issued > 0) \
     UNION SELECT device_id FROM fallback_key WHERE user_id = ?1";
const SQL_DELETE_USER_KEYS: &str = "DELETE FROM one_time_key WHERE user_id = ?1";
const SQL_DELETE_USER_FALLBACKS: &str = "DELETE FROM fallback_key WHERE user_id = ?1";
const SQL_DELETE_USER_QUEUES: &str = "DELETE FROM otk_queue WHERE user_id = ?1";
/// Empties every queue of the device that holds stored keys; answers where
/// each one's stored keys start.
const SQL_UNSTORE_QUEUES: &str = "UPDATE otk_queue SET stored = 0 \
     WHERE user_id = ?1 AND device_id = ?2 AND stored > 0 RETURNING algorithm, head";
/// The stored keys of a queue: a range of the primary key from the head.
const SQL_DELETE_STORED: &str = "DELETE FROM one_time_key \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3 AND pos >= ?4";
const SQL_DELETE_KEY_AT: &str = "DELETE FROM one_time_key \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3 AND pos = ?4";
const SQL_QUEUE_UNSTORE: &str = "UPDATE otk_queue SET stored = max(stored - ?4, 0) \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3";

/// Removes everything of one device; returns the number of keys (stored,
/// remembered and fallback) removed.
pub(super) fn clear_device(conn: &Connection, device: &Device, op: &'static str) -> Result<usize> {
    let p = params![device.user_id.as_str(), device.device_id.as_str()];
    let mut removed = 0;
    for sql in [SQL_DELETE_DEVICE_KEYS, SQL_DELETE_DEVICE_FALLBACKS] {
        removed += conn.prepare_cached(sql).ctx(op)?.execute(p).ctx(op)?;
    }
    conn.prepare_cached(SQL_DELETE_DEVICE_QUEUES)
        .ctx(op)?
        .execute(p)
        .ctx(op)?;
    Ok(removed)
}

/// Removes a device's OTKs, fallback keys and remembered issued keys (R7.1).
pub(crate) fn delete_device(conn: &Connection, device: &Device) -> Result<Changes> {
    let removed = clear_device(conn, device, "delete_device")?;
    Ok(if removed > 0 {
        Changes::from_devices([device.clone()])
    } else {
        Changes::none()
    })
}

/// Removes the state of every device of a user (R7.2).
pub(crate) fn delete_user(conn: &Connection, user: &UserId) -> Result<Changes> {
    const OP: &str = "delete_user";
    let device_ids: Vec<String> = conn
        .prepare_cached(SQL_USER_DEVICES)
        .ctx(OP)?
        .query_map([user.as_str()], |r| r.get(0))
        .ctx(OP)?
        .collect::<rusqlite::Result<_>>()
        .ctx(OP)?;
    for sql in [
        SQL_DELETE_USER_KEYS,
        SQL_DELETE_USER_FALLBACKS,
        SQL_DELETE_USER_QUEUES,
    ] {
        conn.prepare_cached(sql)
            .ctx(OP)?
            .execute([user.as_str()])
            .ctx(OP)?;
    }
    let devices = device_ids
        .into_iter()
        .map(|d| decode::device_id(d).map(|d| Device::new(user.clone(), d)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Changes::from_devices(devices))
}

/// Removes the device's stored one-time keys in `scope` (R13.1) inside the
/// caller's write transaction, and answers the counts after it. Only rows
/// at or past their queue's head (stored keys) are deleted, and their queue
/// no longer counts them; the rows below the head (the remembered issued
/// keys, R3.4) and the fallback keys stay. A deleted row is gone, so the key
/// is not remembered and uploading it again stores it again.
pub(crate) fn reset_one_time_keys(
    conn: &Connection,
    device: &Device,
    scope: &ResetScope,
) -> Result<UploadOutcome> {
    const OP: &str = "reset_one_time_keys";
    let (user, dev) = (device.user_id.as_str(), device.device_id.as_str());
    let changed = match scope {
        ResetScope::All => {
            let queues: Vec<(String, i64)> = conn
                .prepare_cached(SQL_UNSTORE_QUEUES)
                .ctx(OP)?
                .query_map(params![user, dev], |r| Ok((r.get(0)?, r.get(1)?)))
                .ctx(OP)?
                .collect::<rusqlite::Result<_>>()
                .ctx(OP)?;
            let mut delete = conn.prepare_cached(SQL_DELETE_STORED).ctx(OP)?;
            for (alg, head) in &queues {
                delete.execute(params![user, dev, alg, head]).ctx(OP)?;
            }
            !queues.is_empty()
        }
        ResetScope::KeyIds(ids) => {
            // Per algorithm: its queue's head (none: no stored key) and how
            // many of its stored keys were deleted.
            let mut queues: HashMap<&str, Option<(i64, i64)>> = HashMap::new();
            let mut by_id = conn.prepare_cached(SQL_KEYS_BY_ID).ctx(OP)?;
            let mut delete = conn.prepare_cached(SQL_DELETE_KEY_AT).ctx(OP)?;
            for id in ids {
                let alg = id.algorithm_str();
                let slot = match queues.get_mut(alg) {
                    Some(slot) => slot,
                    None => {
                        let head = queue(conn, user, dev, alg, OP)?.map(|q| (q.head, 0));
                        queues.entry(alg).or_insert(head)
                    }
                };
                let Some((head, deleted)) = slot else {
                    continue;
                };
                // The key's stored row, if any (R3.2: at most one); rows
                // below the head are remembered issued keys and stay.
                let positions: Vec<i64> = by_id
                    .query_map(params![user, dev, id.as_str()], |r| r.get(0))
                    .ctx(OP)?
                    .collect::<rusqlite::Result<_>>()
                    .ctx(OP)?;
                for pos in positions.into_iter().filter(|pos| pos >= head) {
                    let n = delete.execute(params![user, dev, alg, pos]).ctx(OP)?;
                    *deleted += i64::try_from(n).unwrap_or(0);
                }
            }
            let mut unstore = conn.prepare_cached(SQL_QUEUE_UNSTORE).ctx(OP)?;
            let mut changed = false;
            for (alg, slot) in queues {
                if let Some((_, deleted)) = slot
                    && deleted > 0
                {
                    unstore.execute(params![user, dev, alg, deleted]).ctx(OP)?;
                    changed = true;
                }
            }
            changed
        }
    };
    let counts = otk_counts(conn, device)?;
    let changes = if changed {
        Changes::from_devices([device.clone()])
    } else {
        Changes::none()
    };
    Ok(UploadOutcome { counts, changes })
}
