//! Deletion of a device's or a user's state (contract section 7).

use keyclaim::backend::decode;
use keyclaim::{Changes, Device, Result, UserId};
use rusqlite::{Connection, params};

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
