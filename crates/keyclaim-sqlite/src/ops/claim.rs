//! Claims (contract section 4): the oldest stored keys by moving the
//! queue's head, else the fallback key; and the two steps of a split claim
//! (section 12), which are the same code with one of the two parts left out.

use keyclaim::backend::{RawClaim, RawClaimedKey};
use keyclaim::{ClaimOutcome, ClaimTarget, FallbackTarget, Result};
use rusqlite::{Connection, OptionalExtension as _, params};

use super::Queue;
use crate::error::SqlContext as _;

/// The queue's counters and its oldest keys, in one statement: a seek into
/// `otk_queue`'s primary key, then a range of `one_time_key`'s from the head.
const SQL_HEAD_KEYS: &str = "SELECT q.stored, q.issued, k.pos, k.key_id, k.key_json, k.digest \
     FROM otk_queue AS q JOIN one_time_key AS k \
     ON k.user_id = q.user_id AND k.device_id = q.device_id AND k.algorithm = q.algorithm \
     AND k.pos >= q.head \
     WHERE q.user_id = ?1 AND q.device_id = ?2 AND q.algorithm = ?3 AND q.stored > 0 \
     ORDER BY k.pos LIMIT ?4";
const SQL_QUEUE_SET: &str = "UPDATE otk_queue SET head = ?4, stored = ?5, issued = ?6 \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3";
const SQL_GET_FALLBACK: &str = "SELECT key_id, key_json, digest, used FROM fallback_key \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3";
const SQL_USE_FALLBACK: &str = "UPDATE fallback_key SET used = 1 \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3";

/// Claims keys for every target, in order, inside the caller's write
/// transaction (section 4): the oldest OTKs first, by moving the queue's
/// head past them (which leaves them behind as remembered issued keys,
/// R3.4); else, when `fall_back` is set, the fallback key, marked used
/// (R4.4); without it, the one-time step of a split claim (R12.1). It writes
/// the queue row (and a fallback key's flag) and nothing else; uploads
/// prune.
///
/// The answer is decoded here, inside the transaction: a stored key that
/// does not read back (its key ID, JSON or digest) fails the claim before
/// anything is committed, so no key is used up undelivered (R10.7).
pub(crate) fn claim(
    conn: &Connection,
    targets: &[ClaimTarget],
    fall_back: bool,
) -> Result<ClaimOutcome> {
    claim_raw(conn, targets, fall_back)?.decode(targets)
}

/// [`claim`] before decoding.
fn claim_raw(conn: &Connection, targets: &[ClaimTarget], fall_back: bool) -> Result<RawClaim> {
    const OP: &str = "claim";
    let mut out = RawClaim::new();
    let mut oldest = conn.prepare_cached(SQL_HEAD_KEYS).ctx(OP)?;
    let mut set_queue = conn.prepare_cached(SQL_QUEUE_SET).ctx(OP)?;

    for (index, target) in targets.iter().enumerate() {
        // Core clamped the count (R8.3) and left out targets of 0.
        let count = target.count;
        let device = &target.device;
        let (user, dev, alg) = (
            device.user_id.as_str(),
            device.device_id.as_str(),
            target.algorithm.as_str(),
        );
        // The oldest keys in claim order (R4.2); the writer holds the write
        // lock, so nobody else can take them in between.
        let rows = oldest
            .query_map(params![user, dev, alg, i64::from(count)], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })
            .ctx(OP)?;
        let mut q: Option<Queue> = None;
        for row in rows {
            let (stored, issued, pos, key_id, key_json, digest) = row.ctx(OP)?;
            let q = q.get_or_insert(Queue {
                head: pos,
                stored,
                issued,
            });
            q.head = pos.saturating_add(1);
            q.stored = (q.stored - 1).max(0);
            q.issued = q.issued.saturating_add(1);
            out.push(RawClaimedKey {
                target: index,
                key_id,
                key_json,
                digest,
                fallback: false,
            });
        }
        if let Some(q) = q {
            set_queue
                .execute(params![user, dev, alg, q.head, q.stored, q.issued])
                .ctx(OP)?;
            out.changed(index);
            continue;
        }
        if fall_back {
            claim_fallback(conn, [user, dev, alg], index, true, &mut out)?;
        }
    }
    Ok(out)
}

/// The fallback step of a split claim (R12.2): every target's current
/// fallback key, marked used where the target says so (section 5), inside
/// the caller's write transaction, so that all targets are one atomic step;
/// decoded before it commits, as [`claim`] is (R10.7).
pub(crate) fn claim_fallback_keys(
    conn: &Connection,
    targets: &[FallbackTarget],
) -> Result<ClaimOutcome> {
    let mut out = RawClaim::new();
    for (index, target) in targets.iter().enumerate() {
        let device = &target.device;
        let names = [
            device.user_id.as_str(),
            device.device_id.as_str(),
            target.algorithm.as_str(),
        ];
        claim_fallback(conn, names, index, target.mark_used, &mut out)?;
    }
    out.decode(targets)
}

/// Hands out the (device, algorithm)'s fallback key, if it has one, as the
/// key of target `index`, marking it used when `mark_used` is set and it was
/// not yet (then the device changed, R11.1).
fn claim_fallback(
    conn: &Connection,
    [user, dev, alg]: [&str; 3],
    index: usize,
    mark_used: bool,
    out: &mut RawClaim,
) -> Result<()> {
    const OP: &str = "claim";
    // Prepared (looked up in the statement cache) only when needed.
    let fallback: Option<(String, String, Vec<u8>, bool)> = conn
        .prepare_cached(SQL_GET_FALLBACK)
        .ctx(OP)?
        .query_row(params![user, dev, alg], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()
        .ctx(OP)?;
    let Some((key_id, key_json, digest, used)) = fallback else {
        return Ok(());
    };
    if mark_used && !used {
        conn.prepare_cached(SQL_USE_FALLBACK)
            .ctx(OP)?
            .execute(params![user, dev, alg])
            .ctx(OP)?;
        out.changed(index);
    }
    out.push(RawClaimedKey {
        target: index,
        key_id,
        key_json,
        digest,
        fallback: true,
    });
    Ok(())
}
