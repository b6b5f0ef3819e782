//! The operations, as plain functions on a connection.
//!
//! Mutating functions expect to run inside a write transaction (the writer
//! thread wraps each in a savepoint of its batch's `BEGIN IMMEDIATE`
//! transaction), so every read they make, the sequence counter included, sees
//! the state they write to, across processes. Read functions run on a read
//! connection, in a read transaction when they make more than one query.
//!
//! Every statement is a `prepare_cached` constant: no SQL is built per call.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use keyclaim::backend::{
    DeviceFacts, RawClaim, RawClaimedKey, decode, plan_upload, remembered_window,
};
use keyclaim::transfer::{DeviceSnapshot, IssuedKey, KeyDigest, StoredFallback, StoredOtk};
use keyclaim::{
    Algorithm, Changes, ClaimTarget, Device, Error, KeyId, KeyJson, Limits, OtkCounts, Result,
    SyncState, Upload, UploadOutcome, UserId,
};
use rusqlite::{Connection, ErrorCode, OptionalExtension as _, params};

/// The backend name used in errors and logs.
pub(crate) const BACKEND: &str = "sqlite";

/// Whether a rusqlite error is SQLite's `BUSY` or `LOCKED`: another
/// connection holds the lock past the busy timeout. Retrying can succeed.
pub(crate) fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

/// Wraps a rusqlite error as [`Error::Storage`]; busy and locked are
/// retryable, everything else is not.
pub(crate) fn sql_error(op: &'static str, e: rusqlite::Error) -> Error {
    Error::storage(BACKEND, op, is_busy(&e), e)
}

/// `.ctx(op)` on rusqlite results.
pub(crate) trait SqlContext<T> {
    /// Maps the error with [`sql_error`].
    fn ctx(self, op: &'static str) -> Result<T>;
}

impl<T> SqlContext<T> for rusqlite::Result<T> {
    fn ctx(self, op: &'static str) -> Result<T> {
        self.map_err(|e| sql_error(op, e))
    }
}

fn parse_key_id(text: String) -> Result<KeyId> {
    decode::key_id(text)
}

fn parse_algorithm(text: String) -> Result<Algorithm> {
    decode::algorithm(text)
}

fn parse_key_json(text: &str) -> Result<KeyJson> {
    decode::key_json(text)
}

fn parse_digest(bytes: &[u8]) -> Result<KeyDigest> {
    decode::digest(bytes)
}

/// An `i64` for SQLite from a count or limit, saturating.
fn sql_int(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

fn count_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Layout (schema version 2)
//
// `one_time_key` holds a (device, algorithm)'s keys in claim order by `pos`,
// a store-wide position counter taken in (upload sequence, key ID) order.
// `otk_queue` holds one small row per (device, algorithm): `head`, the
// position of the oldest stored key; `stored`, how many keys are at or past
// the head; `issued`, how many remembered issued keys (R3.4) are below it. A
// key below the head was issued: a claim moves the head past the keys it
// takes and leaves the rows where they are, so that it rewrites one small row
// (one page) and the taken keys stay behind as the remembered issued keys.
// A (device, algorithm) remembers its newest `Limits::remembered_issued_keys`
// issued keys (R3.4), exactly, as the reference model does: an older issued
// row that is still in the table (it waits to be pruned) counts as
// forgotten, for uploads and for exports alike. The rows themselves are
// pruned in chunks of [`PRUNE_SLACK`], the oldest first, by uploads: a claim
// never adds a row (it moves the head over existing ones), so a queue holds
// at most `remembered_issued_keys` + [`PRUNE_SLACK`] + the keys stored at
// its last upload, and claims stay one-row writes.

/// How many issued rows beyond `Limits::remembered_issued_keys` a (device,
/// algorithm) may keep in its table before an upload deletes the oldest:
/// one range delete per this many issued keys at most. The rows beyond the
/// limit are already forgotten. (Pruning in claims, in chunks of 64, had
/// cost a claim-heavy device about 40% of its claim throughput in the
/// concurrency benchmark.)
pub(crate) const PRUNE_SLACK: i64 = 256;

// ---------------------------------------------------------------------------
// Upload

const SQL_QUEUE_GET: &str = "SELECT head, stored, issued FROM otk_queue \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3";
const SQL_KEYS_BY_ID: &str = "SELECT pos, digest FROM one_time_key \
     WHERE user_id = ?1 AND device_id = ?2 AND key_id = ?3";
const SQL_ISSUED_SINCE: &str = "SELECT count(*) FROM one_time_key \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3 AND pos > ?4 AND pos < ?5";
const SQL_FALLBACK_DIGEST: &str =
    "SELECT digest FROM fallback_key WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3";
const SQL_RESERVE: &str = "UPDATE store_meta SET next_seq = next_seq + ?1, next_pos = next_pos + ?2 \
     WHERE id = 1 RETURNING next_seq - ?1, next_pos - ?2";
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

/// Applies an upload (section 3) inside the caller's write transaction:
/// gathers the [`DeviceFacts`], asks [`plan_upload`], writes the plan.
pub(crate) fn upload(conn: &Connection, upload: &Upload, limits: &Limits) -> Result<UploadOutcome> {
    const OP: &str = "upload";
    let device = upload.device();
    let (user, dev) = (device.user_id.as_str(), device.device_id.as_str());

    let keep = sql_int(limits.remembered_issued_keys);
    let mut facts = DeviceFacts::default();
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
                let digest = parse_digest(&bytes)?;
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
                    .insert(alg.clone(), parse_digest(&bytes)?);
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

// ---------------------------------------------------------------------------
// Claim

/// The queue's counters and its oldest keys, in one statement: a seek into
/// `otk_queue`'s primary key, then a range of `one_time_key`'s from the head.
pub(crate) const SQL_HEAD_KEYS: &str = "SELECT q.stored, q.issued, k.pos, k.key_id, k.key_json, k.digest \
     FROM otk_queue AS q JOIN one_time_key AS k \
     ON k.user_id = q.user_id AND k.device_id = q.device_id AND k.algorithm = q.algorithm \
     AND k.pos >= q.head \
     WHERE q.user_id = ?1 AND q.device_id = ?2 AND q.algorithm = ?3 AND q.stored > 0 \
     ORDER BY k.pos LIMIT ?4";
const SQL_QUEUE_SET: &str = "UPDATE otk_queue SET head = ?4, stored = ?5, issued = ?6 \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3";
const SQL_QUEUE_SET_ISSUED: &str = "UPDATE otk_queue SET issued = ?4 \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3";
const SQL_PRUNE_NEWEST_DROPPED: &str = "SELECT pos FROM one_time_key \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3 AND pos < ?4 \
     ORDER BY pos LIMIT 1 OFFSET ?5";
const SQL_PRUNE: &str = "DELETE FROM one_time_key \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3 AND pos <= ?4";
const SQL_GET_FALLBACK: &str = "SELECT key_id, key_json, digest, used FROM fallback_key \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3";
const SQL_USE_FALLBACK: &str = "UPDATE fallback_key SET used = 1 \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3";

/// Claims keys for every target, in order, inside the caller's write
/// transaction (section 4): the oldest OTKs first, by moving the queue's
/// head past them (which leaves them behind as remembered issued keys,
/// R3.4); else the fallback key, marked used. It writes the queue row (and
/// a fallback key's flag) and nothing else; uploads prune.
pub(crate) fn claim(conn: &Connection, targets: &[ClaimTarget]) -> Result<RawClaim> {
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
        // Prepared (looked up in the statement cache) only when needed.
        let fallback: Option<(String, String, Vec<u8>, bool)> = conn
            .prepare_cached(SQL_GET_FALLBACK)
            .ctx(OP)?
            .query_row(params![user, dev, alg], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()
            .ctx(OP)?;
        if let Some((key_id, key_json, digest, used)) = fallback {
            if !used {
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
        }
    }
    Ok(out)
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
    const OP: &str = "claim";
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

// ---------------------------------------------------------------------------
// Deletion and import

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
const SQL_RAISE_SEQ: &str = "UPDATE store_meta SET next_seq = max(next_seq, ?1) WHERE id = 1";

/// Removes everything of one device; returns the number of keys (stored,
/// remembered and fallback) removed.
fn clear_device(conn: &Connection, device: &Device, op: &'static str) -> Result<usize> {
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

// ---------------------------------------------------------------------------
// Reads

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
        counts.insert(parse_algorithm(alg)?, count_u64(n));
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
        out.push(parse_algorithm(row.ctx(OP)?)?);
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
const SQL_EXPORT_FALLBACKS: &str = "SELECT algorithm, key_id, key_json, used FROM fallback_key \
     WHERE user_id = ?1 AND device_id = ?2 ORDER BY algorithm";

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
        if pos >= head {
            snap.one_time_keys.push(StoredOtk {
                key_id: parse_key_id(key_id)?,
                key_json: parse_key_json(&json)?,
                seq: count_u64(seq),
            });
        } else {
            // Rows come in position order: issue order (R3.4).
            snap.issued
                .entry(parse_algorithm(alg)?)
                .or_default()
                .push(IssuedKey {
                    key_id: parse_key_id(key_id)?,
                    digest: parse_digest(&digest)?,
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

    let mut stmt = conn.prepare_cached(SQL_EXPORT_FALLBACKS).ctx(OP)?;
    let rows = stmt
        .query_map(p, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, bool>(3)?,
            ))
        })
        .ctx(OP)?;
    for row in rows {
        let (alg, key_id, json, used) = row.ctx(OP)?;
        snap.fallback_keys.insert(
            parse_algorithm(alg)?,
            StoredFallback {
                key_id: parse_key_id(key_id)?,
                key_json: parse_key_json(&json)?,
                used,
            },
        );
    }
    Ok(snap)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::SqliteOptions;
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
        schema::migrate(&conn, options.busy_timeout).unwrap();
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
            let raw = claim(&conn, std::slice::from_ref(&target)).unwrap();
            let out = raw.decode(std::slice::from_ref(&target)).unwrap();
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
        let raw = claim(&conn, std::slice::from_ref(&target)).unwrap();
        let out = raw.decode(std::slice::from_ref(&target)).unwrap();
        assert_eq!(out.keys[0].key_id, id(0));
    }
}
