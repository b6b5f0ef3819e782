//! Uploads (contract section 3): gather the device's facts, let core plan,
//! write the plan; the pruning of forgotten issued keys, which only uploads
//! do; and the replacement of a device by an upload (R14.1).

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use keyclaim::backend::{DeviceFacts, decode, plan_upload};
use keyclaim::{Changes, Device, DeviceId, Limits, Result, Upload, UploadOutcome};
use rusqlite::{Connection, OptionalExtension as _, params};

use super::delete::clear_device;
use super::{
    Queue, SQL_INSERT_KEY, SQL_KEYS_BY_ID, SQL_QUEUE_ADD, SQL_UPSERT_FALLBACK, count_u64,
    insert_key, otk_counts, queue, reserve, sql_int,
};
use crate::error::SqlContext as _;

/// How many issued rows beyond `Limits::remembered_issued_keys` a (device,
/// algorithm) may keep in its table before an upload deletes the oldest:
/// one range delete per this many issued keys at most. The rows beyond the
/// limit are already forgotten. (Pruning in claims, in chunks of 64, had
/// cost a claim-heavy device about 40% of its claim throughput in the
/// concurrency benchmark.)
const PRUNE_SLACK: i64 = 256;

const SQL_ISSUED_SINCE: &str = "SELECT count(*) FROM one_time_key \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3 AND pos > ?4 AND pos < ?5";
const SQL_FALLBACK_DIGEST: &str =
    "SELECT digest FROM fallback_key WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3";
const SQL_QUEUE_SET_ISSUED: &str = "UPDATE otk_queue SET issued = ?4 \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3";
const SQL_PRUNE_NEWEST_DROPPED: &str = "SELECT pos FROM one_time_key \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3 AND pos < ?4 \
     ORDER BY pos LIMIT 1 OFFSET ?5";
const SQL_PRUNE: &str = "DELETE FROM one_time_key \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3 AND pos <= ?4";

/// Applies an upload (section 3) inside the caller's write transaction:
/// gathers the [`DeviceFacts`], asks [`plan_upload`], writes the plan.
pub(crate) fn upload(conn: &Connection, upload: &Upload, limits: &Limits) -> Result<UploadOutcome> {
    const OP: &str = "upload";
    let device = upload.device();
    let (user, dev) = (device.user_id.as_str(), device.device_id.as_str());

    let keep = sql_int(limits.remembered_issued_keys);
    let mut facts = DeviceFacts::default();
    if DeviceFacts::needs_all_counts(limits) {
        // The cap counts the whole device (R8.4): every algorithm's count,
        // from the device's `otk_queue` rows (one range of its primary key).
        facts.otk_counts.extend(
            otk_counts(conn, device)?
                .iter()
                .map(|(alg, n)| (alg.clone(), n)),
        );
    }
    let mut queues: HashMap<&str, Queue> = HashMap::new();
    {
        let mut by_id = conn.prepare_cached(SQL_KEYS_BY_ID).ctx(OP)?;
        for id in upload.one_time_keys().keys() {
            let head = match queues.entry(id.algorithm_str()) {
                Entry::Occupied(e) => e.get().head,
                Entry::Vacant(slot) => {
                    let q = queue(conn, user, dev, slot.key(), OP)?.unwrap_or_default();
                    facts.otk_counts.insert(id.algorithm(), count_u64(q.stored));
                    slot.insert(q).head
                }
            };
            // Every row with this ID: the stored key (at or past the head),
            // and remembered issued ones (below it), possibly several with
            // different contents.
            let rows = by_id
                .query_map(params![user, dev, id.as_str()], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
                })
                .ctx(OP)?;
            for row in rows {
                let (pos, bytes) = row.ctx(OP)?;
                let digest = decode::digest(&bytes)?;
                if pos >= head {
                    facts.stored_otks.insert(id.clone(), digest);
                } else if issued_since(conn, (user, dev, id.algorithm_str()), pos, head)? < keep {
                    // Among the newest `keep` issued keys: remembered.
                    facts.issued.insert((id.clone(), digest));
                }
            }
        }
        let mut fallback = conn.prepare_cached(SQL_FALLBACK_DIGEST).ctx(OP)?;
        for alg in upload.fallback_keys().keys() {
            let found: Option<Vec<u8>> = fallback
                .query_row(params![user, dev, alg.as_str()], |r| r.get(0))
                .optional()
                .ctx(OP)?;
            if let Some(bytes) = found {
                facts
                    .fallback_digests
                    .insert(alg.clone(), decode::digest(&bytes)?);
            }
        }
    }

    let plan = plan_upload(upload, &facts, limits)?;
    if !plan.insert_otks.is_empty() {
        let (seq, mut pos) = reserve(conn, 1, sql_int(plan.insert_otks.len()), OP)?;
        // In key ID order, so positions follow (sequence, key ID) (R4.2).
        let mut added: HashMap<&str, (i64, i64)> = HashMap::new();
        let mut insert = conn.prepare_cached(SQL_INSERT_KEY).ctx(OP)?;
        for (id, json) in &plan.insert_otks {
            let alg = id.algorithm_str();
            insert_key(
                &mut insert,
                [user, dev, alg],
                (pos, seq),
                id,
                json.digest(),
                json.canonical(),
            )?;
            added.entry(alg).or_insert((pos, 0)).1 += 1;
            pos += 1;
        }
        let mut queue_add = conn.prepare_cached(SQL_QUEUE_ADD).ctx(OP)?;
        for (alg, (first, n)) in added {
            // A new queue starts at its first key; an existing one keeps its
            // head, which is at or before every stored key and past every
            // issued one.
            queue_add
                .execute(params![user, dev, alg, first, n, 0])
                .ctx(OP)?;
            // The only place rows are added, so the place to prune the
            // rows of forgotten issued keys: claims never add rows, and
            // stay one-row writes.
            let q = queues.get(alg).copied().unwrap_or_default();
            if q.issued > keep.saturating_add(PRUNE_SLACK) {
                let removed = prune_issued(conn, (user, dev, alg), (q.head, q.issued), keep)?;
                conn.prepare_cached(SQL_QUEUE_SET_ISSUED)
                    .ctx(OP)?
                    .execute(params![user, dev, alg, q.issued - removed])
                    .ctx(OP)?;
            }
        }
    }
    if !plan.replace_fallbacks.is_empty() {
        let mut upsert = conn.prepare_cached(SQL_UPSERT_FALLBACK).ctx(OP)?;
        for (alg, id, json) in &plan.replace_fallbacks {
            upsert
                .execute(params![
                    user,
                    dev,
                    alg.as_str(),
                    id.as_str(),
                    &json.digest().as_bytes()[..],
                    json.canonical(),
                    false
                ])
                .ctx(OP)?;
        }
    }
    let counts = otk_counts(conn, device)?;
    let changes = if plan.is_noop() {
        Changes::none()
    } else {
        Changes::from_devices([device.clone()])
    };
    Ok(UploadOutcome { counts, changes })
}

/// Replaces a device of the upload's user by the upload (R14.1) inside the
/// caller's write transaction: removes what `previous` held, as
/// [`delete_device`](super::delete_device) does, then applies the upload as
/// [`upload`] does, which finds the device empty when it is `previous`. The
/// writer runs the whole of it as one job (in its own savepoint when it has
/// batch-mates) and commits the batch once, so an upload that fails (a
/// conflict, a limit) takes the removal back with it, and a crash leaves the
/// old state or the new one, never a mix.
pub(crate) fn replace_device(
    conn: &Connection,
    previous: Option<&DeviceId>,
    new: &Upload,
    limits: &Limits,
) -> Result<UploadOutcome> {
    let user = &new.device().user_id;
    let previous = previous.map(|p| Device::new(user.clone(), p.clone()));
    let mut changed = Vec::new();
    if let Some(previous) = previous
        && clear_device(conn, &previous, "replace_device")? > 0
    {
        changed.push(previous);
    }
    let outcome = upload(conn, new, limits)?;
    changed.extend(outcome.changes.devices().iter().cloned());
    Ok(UploadOutcome {
        counts: outcome.counts,
        changes: Changes::from_devices(changed),
    })
}

/// How many keys of a (device, algorithm) were issued after the one at
/// `pos` (all rows between it and the queue's head).
fn issued_since(
    conn: &Connection,
    (user, dev, alg): (&str, &str, &str),
    pos: i64,
    head: i64,
) -> Result<i64> {
    conn.prepare_cached(SQL_ISSUED_SINCE)
        .ctx("upload")?
        .query_row(params![user, dev, alg, pos, head], |r| r.get(0))
        .ctx("upload")
}

/// Deletes the rows of all but the newest `keep` issued keys (those below
/// the head) of one (device, algorithm), `issued` of them in all; returns
/// how many it deleted. It finds the newest row to delete by walking from
/// the oldest, over the `issued - keep` rows it deletes anyway, not over
/// the `keep` it keeps.
fn prune_issued(
    conn: &Connection,
    (user, dev, alg): (&str, &str, &str),
    (head, issued): (i64, i64),
    keep: i64,
) -> Result<i64> {
    const OP: &str = "upload";
    let drop = issued.saturating_sub(keep);
    if drop <= 0 {
        return Ok(0);
    }
    let newest_dropped: Option<i64> = conn
        .prepare_cached(SQL_PRUNE_NEWEST_DROPPED)
        .ctx(OP)?
        .query_row(params![user, dev, alg, head, drop - 1], |r| r.get(0))
        .optional()
        .ctx(OP)?;
    let Some(newest_dropped) = newest_dropped else {
        return Ok(0);
    };
    let removed = conn
        .prepare_cached(SQL_PRUNE)
        .ctx(OP)?
        .execute(params![user, dev, alg, newest_dropped])
        .ctx(OP)?;
    Ok(sql_int(removed))
}

#[cfg(test)]
mod tests {
    use super::*;

    use keyclaim::{ClaimTarget, Device, KeyId, KeyJson};

    use crate::SqliteOptions;
    use crate::ops::{claim, export_devices};
    use crate::schema::{self, Role};

    fn json(k: &str) -> KeyJson {
        KeyJson::from_value(&serde_json::json!({"key": k, "signatures": {}})).unwrap()
    }

    fn id(n: usize) -> KeyId {
        KeyId::parse(format!("alg:{n:04}")).unwrap()
    }

    /// A (device, algorithm) remembers exactly its newest
    /// `remembered_issued_keys` issued keys (R3.4), as the reference model
    /// does, for uploads and exports alike; claims never delete rows, and
    /// the next upload deletes the rows of forgotten keys, oldest first.
    #[test]
    fn exactly_the_newest_issued_keys_are_remembered_and_uploads_prune() {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteOptions::default();
        let conn =
            schema::open_connection(&dir.path().join("db.sqlite"), &options, Role::Writer).unwrap();
        schema::migrate(&conn, options.get_busy_timeout()).unwrap();
        let mut limits = Limits::default();
        limits.remembered_issued_keys = 3;
        limits.max_otks_per_device_algorithm = 10_000;
        let slack = usize::try_from(PRUNE_SLACK).unwrap();
        let device = Device::parse("@alice:example.org", "D").unwrap();
        let total = 3 + slack + 5;
        let up = Upload::from_keys(
            device.clone(),
            (0..total).map(|n| (id(n), json(&n.to_string()))),
            [],
        )
        .unwrap();
        upload(&conn, &up, &limits).unwrap();
        let target = ClaimTarget::one(device.clone(), "alg".parse().unwrap());
        let remembered = |conn: &Connection| -> Vec<String> {
            export_devices(conn, None, 1, &limits).unwrap()[0]
                .issued
                .values()
                .flatten()
                .map(|k| k.key_id.as_str().to_owned())
                .collect()
        };
        let rows = |conn: &Connection| -> i64 {
            conn.query_row("SELECT count(*) FROM one_time_key", [], |r| r.get(0))
                .unwrap()
        };
        for n in 0..total {
            let out = claim(&conn, std::slice::from_ref(&target), true).unwrap();
            assert_eq!(out.keys[0].key_id, id(n), "claim order");
            let expected: Vec<String> = (n.saturating_sub(2)..=n)
                .map(|k| id(k).as_str().to_owned())
                .collect();
            assert_eq!(remembered(&conn), expected, "after claim {n}");
        }
        // Claims moved the head and deleted nothing.
        assert_eq!(rows(&conn), i64::try_from(total).unwrap());
        // Forgotten keys may be uploaded again and are stored: the oldest,
        // and the fourth newest, whose row is still there. A remembered one
        // is not stored. The upload then deletes the forgotten rows, down to
        // the three remembered, beside the two new keys.
        let again = Upload::from_keys(
            device.clone(),
            [
                (id(0), json("0")),
                (id(total - 4), json(&(total - 4).to_string())),
                (id(total - 1), json(&(total - 1).to_string())),
            ],
            [],
        )
        .unwrap();
        let outcome = upload(&conn, &again, &limits).unwrap();
        assert_eq!(outcome.counts.total(), 2);
        assert_eq!(rows(&conn), 3 + 2);
        assert_eq!(
            remembered(&conn),
            [id(total - 3), id(total - 2), id(total - 1)].map(|k| k.as_str().to_owned())
        );
        let out = claim(&conn, std::slice::from_ref(&target), true).unwrap();
        assert_eq!(out.keys[0].key_id, id(0));
    }
}
