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
use std::collections::{BTreeMap, BTreeSet};

use keyclaim::{
    Algorithm, Changes, ClaimOutcome, ClaimTarget, ClaimedKey, Device, DeviceFacts, DeviceId,
    DeviceSnapshot, Error, IssuedKey, KeyDigest, KeyId, KeyJson, Limits, OtkCounts, Result,
    StoredFallback, StoredOtk, SyncState, Upload, UploadOutcome, UserId, plan_upload,
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

fn corrupt(what: &str, e: &Error) -> Error {
    Error::corrupt(format!("stored {what} is invalid: {e}"))
}

fn parse_key_id(text: String) -> Result<KeyId> {
    KeyId::parse(text).map_err(|e| corrupt("key ID", &e))
}

fn parse_algorithm(text: String) -> Result<Algorithm> {
    Algorithm::parse(text).map_err(|e| corrupt("algorithm", &e))
}

fn parse_key_json(text: &str) -> Result<KeyJson> {
    KeyJson::from_json_str(text).map_err(|e| corrupt("key JSON", &e))
}

fn parse_digest(bytes: &[u8]) -> Result<KeyDigest> {
    KeyDigest::from_slice(bytes)
}

/// An `i64` for SQLite from a count or limit, saturating.
fn sql_int(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

fn count_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Upload

const SQL_OTK_DIGEST: &str =
    "SELECT digest FROM otk WHERE user_id = ?1 AND device_id = ?2 AND key_id = ?3";
const SQL_IS_ISSUED: &str = "SELECT 1 FROM issued_key WHERE user_id = ?1 AND device_id = ?2 \
     AND algorithm = ?3 AND key_id = ?4 AND digest = ?5";
const SQL_COUNT_ALGORITHM: &str =
    "SELECT count(*) FROM otk WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3";
const SQL_FALLBACK_DIGEST: &str =
    "SELECT digest FROM fallback_key WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3";
const SQL_NEXT_SEQ: &str =
    "UPDATE store_meta SET next_seq = next_seq + 1 WHERE id = 1 RETURNING next_seq - 1";
const SQL_INSERT_OTK: &str = "INSERT INTO otk (user_id, device_id, algorithm, key_id, seq, digest, key_json) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";
const SQL_UPSERT_FALLBACK: &str = "INSERT INTO fallback_key \
     (user_id, device_id, algorithm, key_id, digest, key_json, used) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
     ON CONFLICT (user_id, device_id, algorithm) DO UPDATE SET \
     key_id = excluded.key_id, digest = excluded.digest, key_json = excluded.key_json, \
     used = excluded.used";

/// Applies an upload (section 3) inside the caller's write transaction:
/// gathers the [`DeviceFacts`], asks [`plan_upload`], writes the plan.
pub(crate) fn upload(conn: &Connection, upload: &Upload, limits: &Limits) -> Result<UploadOutcome> {
    const OP: &str = "upload";
    let device = &upload.device;
    let (user, dev) = (device.user_id.as_str(), device.device_id.as_str());

    let mut facts = DeviceFacts::default();
    {
        let mut stored = conn.prepare_cached(SQL_OTK_DIGEST).ctx(OP)?;
        let mut issued = conn.prepare_cached(SQL_IS_ISSUED).ctx(OP)?;
        let mut count = conn.prepare_cached(SQL_COUNT_ALGORITHM).ctx(OP)?;
        for (id, json) in &upload.one_time_keys {
            let digest = json.digest();
            let found: Option<Vec<u8>> = stored
                .query_row(params![user, dev, id.as_str()], |r| r.get(0))
                .optional()
                .ctx(OP)?;
            if let Some(bytes) = found {
                facts.stored_otks.insert(id.clone(), parse_digest(&bytes)?);
            }
            let alg = id.algorithm_str();
            if issued
                .exists(params![user, dev, alg, id.as_str(), &digest.0[..]])
                .ctx(OP)?
            {
                facts.issued.insert((id.clone(), digest));
            }
            if let Entry::Vacant(slot) = facts.otk_counts.entry(id.algorithm()) {
                let n: i64 = count
                    .query_row(params![user, dev, alg], |r| r.get(0))
                    .ctx(OP)?;
                slot.insert(count_u64(n));
            }
        }
        let mut fallback = conn.prepare_cached(SQL_FALLBACK_DIGEST).ctx(OP)?;
        for alg in upload.fallback_keys.keys() {
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
        let seq = next_seq(conn, OP)?;
        let mut insert = conn.prepare_cached(SQL_INSERT_OTK).ctx(OP)?;
        for (id, json) in &plan.insert_otks {
            insert
                .execute(params![
                    user,
                    dev,
                    id.algorithm_str(),
                    id.as_str(),
                    seq,
                    &json.digest().0[..],
                    json.canonical()
                ])
                .ctx(OP)?;
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
                    &json.digest().0[..],
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

/// Takes the next value of the store-wide sequence counter (R3.5). Inside the
/// write transaction, so it is monotonic across processes.
fn next_seq(conn: &Connection, op: &'static str) -> Result<i64> {
    conn.prepare_cached(SQL_NEXT_SEQ)
        .ctx(op)?
        .query_row([], |r| r.get(0))
        .ctx(op)
}

// ---------------------------------------------------------------------------
// Claim

const SQL_OLDEST_OTKS: &str = "SELECT id, key_id, key_json, digest FROM otk \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3 ORDER BY seq, key_id LIMIT ?4";
const SQL_DELETE_OTK: &str = "DELETE FROM otk WHERE id = ?1";
const SQL_MAX_ISSUED: &str = "SELECT coalesce(max(n), 0) FROM issued_key \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3";
const SQL_INSERT_ISSUED: &str = "INSERT OR IGNORE INTO issued_key \
     (user_id, device_id, algorithm, n, key_id, digest) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
const SQL_PRUNE_ISSUED: &str = "DELETE FROM issued_key \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3 AND n <= ?4";
const SQL_GET_FALLBACK: &str = "SELECT key_id, key_json, used FROM fallback_key \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3";
const SQL_USE_FALLBACK: &str = "UPDATE fallback_key SET used = 1 \
     WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3";

/// One key taken by a claim, as stored. Turned into a [`ClaimedKey`] by
/// [`RawClaim::into_outcome`], off the writer thread: parsing and checking
/// the key JSON is a good part of a claim's work, and the writer is the one
/// thread every write of the store goes through.
#[derive(Debug)]
pub(crate) struct RawKey {
    target: usize,
    key_id: String,
    key_json: String,
    fallback: bool,
}

/// What a claim took, by target index.
#[derive(Debug, Default)]
pub(crate) struct RawClaim {
    keys: Vec<RawKey>,
    changed: Vec<usize>,
}

impl RawClaim {
    /// The claim's answer, given the targets it was run with.
    ///
    /// # Errors
    /// [`Error::Corrupt`] when a stored key ID or key JSON is invalid (the
    /// claim has been committed: such a key was unusable anyway).
    pub(crate) fn into_outcome(self, targets: &[ClaimTarget]) -> Result<ClaimOutcome> {
        let device = |i: usize| {
            targets
                .get(i)
                .map(|t| t.device.clone())
                .ok_or_else(|| Error::corrupt("claim answer names an unknown target"))
        };
        let mut keys = Vec::with_capacity(self.keys.len());
        for raw in self.keys {
            keys.push(ClaimedKey {
                device: device(raw.target)?,
                key_id: parse_key_id(raw.key_id)?,
                key_json: parse_key_json(&raw.key_json)?,
                fallback: raw.fallback,
            });
        }
        let changed = self
            .changed
            .into_iter()
            .map(device)
            .collect::<Result<Vec<_>>>()?;
        Ok(ClaimOutcome {
            keys,
            changes: Changes::from_devices(changed),
        })
    }

    /// How many keys the claim took.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }
}

/// Claims keys for every target, in order, inside the caller's write
/// transaction (section 4): the oldest OTKs first, removed as they are
/// returned and remembered as issued (by their stored digest); else the
/// fallback key, marked used.
pub(crate) fn claim(
    conn: &Connection,
    targets: &[ClaimTarget],
    limits: &Limits,
) -> Result<RawClaim> {
    const OP: &str = "claim";
    let keep = sql_int(limits.remembered_issued_keys);
    let mut out = RawClaim::default();
    let mut oldest = conn.prepare_cached(SQL_OLDEST_OTKS).ctx(OP)?;
    let mut delete = conn.prepare_cached(SQL_DELETE_OTK).ctx(OP)?;
    let mut max_issued = conn.prepare_cached(SQL_MAX_ISSUED).ctx(OP)?;
    let mut insert_issued = conn.prepare_cached(SQL_INSERT_ISSUED).ctx(OP)?;
    let mut prune = conn.prepare_cached(SQL_PRUNE_ISSUED).ctx(OP)?;
    let mut get_fallback = conn.prepare_cached(SQL_GET_FALLBACK).ctx(OP)?;
    let mut use_fallback = conn.prepare_cached(SQL_USE_FALLBACK).ctx(OP)?;

    for (index, target) in targets.iter().enumerate() {
        let count = limits.clamp_count(target.count);
        if count == 0 {
            continue;
        }
        let device = &target.device;
        let (user, dev, alg) = (
            device.user_id.as_str(),
            device.device_id.as_str(),
            target.algorithm.as_str(),
        );
        // The oldest keys in claim order (R4.2), then removed by row ID; the
        // writer holds the write lock, so nobody else can take them between.
        let taken: Vec<(i64, String, String, Vec<u8>)> = oldest
            .query_map(params![user, dev, alg, i64::from(count)], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .ctx(OP)?
            .collect::<rusqlite::Result<_>>()
            .ctx(OP)?;
        if !taken.is_empty() {
            let mut n: i64 = max_issued
                .query_row(params![user, dev, alg], |r| r.get(0))
                .ctx(OP)?;
            for (id, key_id, key_json, digest) in taken {
                delete.execute([id]).ctx(OP)?;
                let inserted = insert_issued
                    .execute(params![user, dev, alg, n + 1, key_id, digest])
                    .ctx(OP)?;
                n += i64::try_from(inserted).unwrap_or(0);
                out.keys.push(RawKey {
                    target: index,
                    key_id,
                    key_json,
                    fallback: false,
                });
            }
            if n > keep {
                prune.execute(params![user, dev, alg, n - keep]).ctx(OP)?;
            }
            out.changed.push(index);
            continue;
        }
        let fallback: Option<(String, String, bool)> = get_fallback
            .query_row(params![user, dev, alg], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()
            .ctx(OP)?;
        if let Some((key_id, key_json, used)) = fallback {
            if !used {
                use_fallback.execute(params![user, dev, alg]).ctx(OP)?;
                out.changed.push(index);
            }
            out.keys.push(RawKey {
                target: index,
                key_id,
                key_json,
                fallback: true,
            });
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Deletion and import

const SQL_DELETE_DEVICE_OTKS: &str = "DELETE FROM otk WHERE user_id = ?1 AND device_id = ?2";
const SQL_DELETE_DEVICE_FALLBACKS: &str =
    "DELETE FROM fallback_key WHERE user_id = ?1 AND device_id = ?2";
const SQL_DELETE_DEVICE_ISSUED: &str =
    "DELETE FROM issued_key WHERE user_id = ?1 AND device_id = ?2";
const SQL_USER_DEVICES: &str = "SELECT device_id FROM otk WHERE user_id = ?1 \
     UNION SELECT device_id FROM fallback_key WHERE user_id = ?1 \
     UNION SELECT device_id FROM issued_key WHERE user_id = ?1";
const SQL_DELETE_USER_OTKS: &str = "DELETE FROM otk WHERE user_id = ?1";
const SQL_DELETE_USER_FALLBACKS: &str = "DELETE FROM fallback_key WHERE user_id = ?1";
const SQL_DELETE_USER_ISSUED: &str = "DELETE FROM issued_key WHERE user_id = ?1";
const SQL_RAISE_SEQ: &str = "UPDATE store_meta SET next_seq = max(next_seq, ?1) WHERE id = 1";

/// Removes everything of one device; returns the number of rows removed.
fn clear_device(conn: &Connection, device: &Device, op: &'static str) -> Result<usize> {
    let p = params![device.user_id.as_str(), device.device_id.as_str()];
    let mut removed = 0;
    for sql in [
        SQL_DELETE_DEVICE_OTKS,
        SQL_DELETE_DEVICE_FALLBACKS,
        SQL_DELETE_DEVICE_ISSUED,
    ] {
        removed += conn.prepare_cached(sql).ctx(op)?.execute(p).ctx(op)?;
    }
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
        SQL_DELETE_USER_OTKS,
        SQL_DELETE_USER_FALLBACKS,
        SQL_DELETE_USER_ISSUED,
    ] {
        conn.prepare_cached(sql)
            .ctx(OP)?
            .execute([user.as_str()])
            .ctx(OP)?;
    }
    let devices = device_ids
        .into_iter()
        .map(|d| {
            DeviceId::parse(d)
                .map(|d| Device::new(user.clone(), d))
                .map_err(|e| corrupt("device ID", &e))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Changes::from_devices(devices))
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
    let mut otks: Vec<(i64, &StoredOtk)> = Vec::with_capacity(snapshot.one_time_keys.len());
    if fits {
        otks.extend(
            snapshot
                .one_time_keys
                .iter()
                .map(|k| (i64::try_from(k.seq).unwrap_or(0), k)),
        );
    } else {
        let mut sorted: Vec<&StoredOtk> = snapshot.one_time_keys.iter().collect();
        sorted.sort_by(|a, b| (a.seq, &a.key_id).cmp(&(b.seq, &b.key_id)));
        let mut seq = next_seq(conn, OP)?;
        let mut last = None;
        for (i, k) in sorted.into_iter().enumerate() {
            if i > 0 && last != Some(k.seq) {
                seq = next_seq(conn, OP)?;
            }
            last = Some(k.seq);
            otks.push((seq, k));
        }
    }
    let mut insert = conn.prepare_cached(SQL_INSERT_OTK).ctx(OP)?;
    let mut max_seq = 0;
    for (seq, k) in &otks {
        max_seq = max_seq.max(*seq);
        insert
            .execute(params![
                user,
                dev,
                k.key_id.algorithm_str(),
                k.key_id.as_str(),
                seq,
                &k.key_json.digest().0[..],
                k.key_json.canonical()
            ])
            .ctx(OP)?;
    }
    if !otks.is_empty() {
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
                &f.key_json.digest().0[..],
                f.key_json.canonical(),
                f.used
            ])
            .ctx(OP)?;
    }
    let mut insert_issued = conn.prepare_cached(SQL_INSERT_ISSUED).ctx(OP)?;
    for (alg, keys) in &snapshot.issued {
        let mut n = 0i64;
        for key in keys {
            let inserted = insert_issued
                .execute(params![
                    user,
                    dev,
                    alg.as_str(),
                    n + 1,
                    key.key_id.as_str(),
                    &key.digest.0[..]
                ])
                .ctx(OP)?;
            n += i64::try_from(inserted).unwrap_or(0);
        }
    }
    Ok(Changes::from_devices([device.clone()]))
}

// ---------------------------------------------------------------------------
// Reads

const SQL_COUNTS: &str = "SELECT algorithm, count(*) FROM otk \
     WHERE user_id = ?1 AND device_id = ?2 GROUP BY algorithm";
const SQL_UNUSED_FALLBACKS: &str = "SELECT algorithm FROM fallback_key \
     WHERE user_id = ?1 AND device_id = ?2 AND used = 0 ORDER BY algorithm";

/// The device's OTK counts (R6.1), from the `otk_claim_order` index alone.
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
        if n > 0 {
            counts.insert(parse_algorithm(alg)?, count_u64(n));
        }
    }
    Ok(OtkCounts(counts))
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

const SQL_DEVICES_AFTER: [&str; 3] = [
    "SELECT DISTINCT user_id, device_id FROM otk \
     WHERE (user_id, device_id) > (?1, ?2) ORDER BY user_id, device_id LIMIT ?3",
    "SELECT DISTINCT user_id, device_id FROM fallback_key \
     WHERE (user_id, device_id) > (?1, ?2) ORDER BY user_id, device_id LIMIT ?3",
    "SELECT DISTINCT user_id, device_id FROM issued_key \
     WHERE (user_id, device_id) > (?1, ?2) ORDER BY user_id, device_id LIMIT ?3",
];
const SQL_EXPORT_OTKS: &str = "SELECT key_id, key_json, seq FROM otk \
     WHERE user_id = ?1 AND device_id = ?2 ORDER BY seq, key_id";
const SQL_EXPORT_FALLBACKS: &str = "SELECT algorithm, key_id, key_json, used FROM fallback_key \
     WHERE user_id = ?1 AND device_id = ?2 ORDER BY algorithm";
const SQL_EXPORT_ISSUED: &str = "SELECT algorithm, key_id, digest FROM issued_key \
     WHERE user_id = ?1 AND device_id = ?2 ORDER BY algorithm, n";

/// Up to `limit` device snapshots after `after`, in (user ID, device ID)
/// byte order, all read in one read transaction.
pub(crate) fn export_devices(
    conn: &Connection,
    after: Option<&Device>,
    limit: usize,
) -> Result<Vec<DeviceSnapshot>> {
    const OP: &str = "export_devices";
    if limit == 0 {
        return Ok(Vec::new());
    }
    let tx = conn.unchecked_transaction().ctx(OP)?;
    // Every valid user ID starts with '@', so ("", "") is before them all.
    let (after_user, after_device) =
        after.map_or(("", ""), |d| (d.user_id.as_str(), d.device_id.as_str()));
    let mut found: BTreeSet<(String, String)> = BTreeSet::new();
    for sql in SQL_DEVICES_AFTER {
        let mut stmt = tx.prepare_cached(sql).ctx(OP)?;
        let rows = stmt
            .query_map(params![after_user, after_device, sql_int(limit)], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .ctx(OP)?;
        for row in rows {
            found.insert(row.ctx(OP)?);
        }
    }
    let mut out = Vec::new();
    // (String, String) orders by bytes, like Device.
    for (user, dev) in found.into_iter().take(limit) {
        let device = Device::parse(&user, &dev).map_err(|e| corrupt("device", &e))?;
        out.push(snapshot(&tx, device)?);
    }
    tx.commit().ctx(OP)?;
    Ok(out)
}

fn snapshot(conn: &Connection, device: Device) -> Result<DeviceSnapshot> {
    const OP: &str = "export_devices";
    let p = params![device.user_id.as_str(), device.device_id.as_str()];
    let mut snap = DeviceSnapshot::empty(device.clone());

    let mut stmt = conn.prepare_cached(SQL_EXPORT_OTKS).ctx(OP)?;
    let rows = stmt
        .query_map(p, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .ctx(OP)?;
    for row in rows {
        let (key_id, json, seq) = row.ctx(OP)?;
        snap.one_time_keys.push(StoredOtk {
            key_id: parse_key_id(key_id)?,
            key_json: parse_key_json(&json)?,
            seq: count_u64(seq),
        });
    }
    // SQL sorted by (seq, key_id) already; BINARY collation is byte order.

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

    let mut stmt = conn.prepare_cached(SQL_EXPORT_ISSUED).ctx(OP)?;
    let rows = stmt
        .query_map(p, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })
        .ctx(OP)?;
    for row in rows {
        let (alg, key_id, digest) = row.ctx(OP)?;
        snap.issued
            .entry(parse_algorithm(alg)?)
            .or_default()
            .push(IssuedKey {
                key_id: parse_key_id(key_id)?,
                digest: parse_digest(&digest)?,
            });
    }
    Ok(snap)
}
