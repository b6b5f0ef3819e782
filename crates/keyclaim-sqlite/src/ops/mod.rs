//! The operations, as plain functions on a connection, one file per kind:
//! [`upload`](mod@upload) (and the device replacement, R14.1),
//! [`claim`](mod@claim) (and the split claim's two steps, R12.1, R12.2),
//! [`read`] (counts, sync state of one device or many, fallback keys),
//! [`delete`] (and the key reset, R13.1) and [`transfer`] (export and
//! import). This file holds what several of them share.
//!
//! Mutating functions expect to run inside a write transaction (the writer
//! thread wraps each in a savepoint of its batch's `BEGIN IMMEDIATE`
//! transaction), so every read they make, the sequence counter included, sees
//! the state they write to, across processes. Read functions run on a read
//! connection, in a read transaction when they make more than one query.
//!
//! Every statement is a `prepare_cached` constant: no SQL is built per call.
//!
//! # How the operations use the layout (schema version 3)
//!
//! `one_time_key` holds a (device, algorithm)'s keys in claim order by `pos`,
//! a store-wide position counter taken in (upload sequence, key ID) order.
//! `otk_queue` holds one small row per (device, algorithm): `head`, the
//! position of the oldest stored key; `stored`, how many keys are at or past
//! the head; `issued`, how many remembered issued keys (R3.4) are below it. A
//! key below the head was issued: a claim moves the head past the keys it
//! takes and leaves the rows where they are, so that it rewrites one small row
//! (one page) and the taken keys stay behind as the remembered issued keys.
//! A (device, algorithm) remembers its newest `Limits::remembered_issued_keys`
//! issued keys (R3.4), exactly, as the reference model does: an older issued
//! row that is still in the table (it waits to be pruned) counts as
//! forgotten, for uploads and for exports alike. The rows themselves are
//! pruned in chunks, the oldest first, by uploads: a claim never adds a row
//! (it moves the head over existing ones), so a queue holds at most
//! `remembered_issued_keys` + a slack + the keys stored at its last upload,
//! and claims stay one-row writes.

mod claim;
mod delete;
mod read;
mod transfer;
mod upload;

pub(crate) use claim::{claim, claim_fallback_keys};
pub(crate) use delete::{delete_device, delete_user, reset_one_time_keys};
pub(crate) use read::{counts_many, fallback_keys, otk_counts, sync_state};
pub(crate) use transfer::{export_devices, import_device};
pub(crate) use upload::{replace_device, upload};

use keyclaim::transfer::KeyDigest;
use keyclaim::{KeyId, Result};
use rusqlite::{Connection, OptionalExtension as _, params};

use crate::error::SqlContext as _;

const SQL_RESERVE: &str = "UPDATE store_meta SET next_seq = next_seq + ?1, next_pos = next_pos + ?2 \
     WHERE id = 1 RETURNING next_seq - ?1, next_pos - ?2";
const SQL_QUEUE_GET: &str = "SELECT head, stored, issued FROM otk_queue \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3";
/// Every row of a key ID: the stored key (at or past its queue's head) and
/// remembered issued ones (below it), by the `one_time_key_id` index.
const SQL_KEYS_BY_ID: &str = "SELECT pos, digest FROM one_time_key \
     WHERE user_id = ?1 AND device_id = ?2 AND key_id = ?3";
const SQL_INSERT_KEY: &str = "INSERT INTO one_time_key \
     (user_id, device_id, algorithm, pos, seq, key_id, digest, key_json) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
const SQL_QUEUE_ADD: &str = "INSERT INTO otk_queue \
     (user_id, device_id, algorithm, head, stored, issued) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
     ON CONFLICT (user_id, device_id, algorithm) DO UPDATE SET stored = stored + excluded.stored";
const SQL_UPSERT_FALLBACK: &str = "INSERT INTO fallback_key \
     (user_id, device_id, algorithm, key_id, digest, key_json, used) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
     ON CONFLICT (user_id, device_id, algorithm) DO UPDATE SET \
     key_id = excluded.key_id, digest = excluded.digest, key_json = excluded.key_json, \
     used = excluded.used";

/// A (device, algorithm)'s `otk_queue` row.
#[derive(Clone, Copy, Debug, Default)]
struct Queue {
    head: i64,
    stored: i64,
    issued: i64,
}

/// A (device, algorithm)'s `otk_queue` row, if it has one.
fn queue(
    conn: &Connection,
    user: &str,
    dev: &str,
    alg: &str,
    op: &'static str,
) -> Result<Option<Queue>> {
    conn.prepare_cached(SQL_QUEUE_GET)
        .ctx(op)?
        .query_row(params![user, dev, alg], |r| {
            Ok(Queue {
                head: r.get(0)?,
                stored: r.get(1)?,
                issued: r.get(2)?,
            })
        })
        .optional()
        .ctx(op)
}

/// An `i64` for SQLite from a count or limit, saturating.
fn sql_int(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// A count read from SQLite (never negative).
fn count_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Inserts one `one_time_key` row with [`SQL_INSERT_KEY`].
fn insert_key(
    insert: &mut rusqlite::CachedStatement<'_>,
    [user, dev, alg]: [&str; 3],
    (pos, seq): (i64, i64),
    key_id: &KeyId,
    digest: KeyDigest,
    key_json: &str,
) -> Result<()> {
    insert
        .execute(params![
            user,
            dev,
            alg,
            pos,
            seq,
            key_id.as_str(),
            &digest.as_bytes()[..],
            key_json
        ])
        .ctx("insert_key")?;
    Ok(())
}

/// Takes `seqs` values of the store-wide sequence counter (R3.5) and
/// `positions` of the position counter; returns the first of each. Inside
/// the write transaction, so both are monotonic across processes.
fn reserve(conn: &Connection, seqs: i64, positions: i64, op: &'static str) -> Result<(i64, i64)> {
    conn.prepare_cached(SQL_RESERVE)
        .ctx(op)?
        .query_row(params![seqs, positions], |r| Ok((r.get(0)?, r.get(1)?)))
        .ctx(op)
}
