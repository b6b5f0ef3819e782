//! The operations: SQL as constants (prepared and cached per connection,
//! never built per call) and the code that runs them.
//!
//! # Why the claim is correct across connections (R4.2, R4.3)
//!
//! A claim is **one statement** (one round trip, one implicit transaction,
//! see [`CLAIM`]). For each target a `LATERAL` subquery walks the device's
//! keys in claim order through the `otk_claim_order` index and locks them
//! with `FOR UPDATE SKIP LOCKED` under a `LIMIT`; the rows it locks are
//! deleted by the same statement and returned with `RETURNING`.
//!
//! - *No key twice*: a key is returned only by the transaction that deleted
//!   it, and only one transaction can delete a row.
//! - *No under-issue*: the plan is `Limit -> LockRows -> Index Scan`, so the
//!   lock node locks exactly the rows the limit passes on: a claimer locks
//!   only keys it will delete. A row another claimer holds is therefore
//!   always on its way out, and skipping it takes nothing away from us; we
//!   keep walking the index to the next key. A row that a concurrent claim
//!   deleted and committed after our snapshot is dropped by the lock node
//!   (READ COMMITTED re-check) and the walk goes on as well. So a claimer
//!   comes away short (and falls back) only when every remaining key is
//!   taken by claims that commit, i.e. when the keys are really gone. No
//!   other statement locks OTK rows (uploads read them without a lock and
//!   insert new ones, invisible until commit); deletion and import lock them
//!   only to delete them too.
//! - The fallback key is read for the targets that got no OTK. An already
//!   used fallback is returned from the snapshot without a lock (so that
//!   claimers of an exhausted hot device do not queue on its row); an unused
//!   one is locked (`FOR UPDATE`, in key order so that concurrent claims
//!   cannot deadlock on it) and marked used; the lock re-reads the newest
//!   version, so a concurrent replacement by an upload or use by another
//!   claim is seen.
//! - The issued memory (R3.4) is written and pruned in the same statement.
//!   Finding what to prune walks the device's remembered keys, up to the
//!   configured number, so only one claim statement in eight does it (by
//!   its `issued_seq` value): a device keeps at least the configured number
//!   of issued keys, and a few claims' worth more between two prunes. The
//!   walk reads only the primary key `(user_id, device_id, algorithm,
//!   issued_txn, issued_pos)` (an index-only scan where the table's pages
//!   are all-visible) to find the newest key that must go; the keys from
//!   there on back are then locked through the same index. The remembered
//!   keys are inserted without a conflict check: the statement's
//!   `issued_seq` value and each key's position in the statement make the
//!   primary key unique. Pruning locks with `SKIP LOCKED` (rows
//!   another claim is pruning are left to it), so it never waits.
//! - Duplicate targets (the same device and algorithm twice in one request)
//!   cannot share one statement (a transaction does not skip its own locks),
//!   so they go to further "rounds": statements in one explicit transaction,
//!   each seeing what the previous one took.
//! - With transactional notifications the cross-process notification is
//!   `pg_notify` inside the statement, so it is sent if and only if the
//!   claim commits; by default it is sent after the commit, batched (see
//!   [`crate::listen`]).
//!
//! Failure modes: a claim whose statement fails rolls back whole. A claim
//! whose connection dies while the server commits may have consumed keys
//! that nobody received (the error is retryable; retrying claims new keys).
//! A claim that skipped a locked row of a concurrent claim *that then rolls
//! back* can come away short while that key remains: only a failing
//! concurrent claim causes this, and the contract's guarantee concerns
//! claims that succeed.
//!
//! # Uploads (R3.1, R3.2, R3.4, R8.1)
//!
//! An upload takes a transaction-scoped advisory lock on its device (and a
//! shared one on its user, which [`delete_user`] takes exclusively), so
//! uploads of one device, and deletions and imports of it, run one after
//! another; then reads everything [`keyclaim::backend::plan_upload`] needs in one
//! statement (one snapshot: a concurrent claim is seen either before or
//! after, never half), plans, and applies the plan in the same transaction,
//! pipelined. The primary key `(user_id, device_id, key_id)` backs the
//! conflict rule up. The per-(device, algorithm) limit holds under
//! concurrent uploads because they are serialized and claims only lower the
//! count.
//!
//! # Deletions and imports (R7.1, R7.2)
//!
//! They take the same advisory locks (a user deletion the user's lock,
//! exclusively), then delete the OTKs in one statement (which waits for
//! claims holding some of them) and the fallback keys and issued memory in
//! a later one, whose snapshot includes the issued keys those claims
//! remembered. A claim running meanwhile skips the OTKs being deleted and
//! waits on the fallback row, then finds it gone: it is served as if after
//! the deletion. Lock waits between a deletion and claims of several
//! devices of the same user can, rarely, end in a deadlock that PostgreSQL
//! breaks by failing one of them: a retryable error, nothing applied.

use std::collections::{BTreeMap, HashMap};

use deadpool_postgres::Object;
use keyclaim::backend::{DeviceFacts, decode, plan_upload};
use keyclaim::transfer::{DeviceSnapshot, IssuedKey, KeyDigest, StoredFallback, StoredOtk};
use keyclaim::{
    Algorithm, Changes, ClaimOutcome, ClaimTarget, ClaimedKey, Device, KeyId, KeyJson, Limits,
    Result, SyncState, Upload, UploadOutcome, UserId,
};
use tokio_postgres::IsolationLevel;
use tokio_postgres::types::ToSql;

use crate::errors::{corrupt, pg};

/// Per-store values the statements take as parameters.
#[derive(Debug, Clone)]
pub(crate) struct Sql {
    /// The schema (for logs; statements resolve it through `search_path`).
    pub(crate) schema: String,
    /// The notification channel of this schema.
    pub(crate) channel: String,
    /// This handle's random identifier, the first word of its notifications.
    pub(crate) instance: String,
    /// Whether mutations send their notifications inside their own
    /// transaction (see [`crate::PostgresOptions::transactional_notify`]).
    pub(crate) transactional_notify: bool,
}

impl Sql {
    pub(crate) fn new(schema: &str, instance: String, transactional_notify: bool) -> Self {
        Self {
            schema: schema.to_owned(),
            channel: channel_name(schema),
            instance,
            transactional_notify,
        }
    }
}

/// The `LISTEN`/`NOTIFY` channel of a schema.
pub(crate) fn channel_name(schema: &str) -> String {
    format!("keyclaim_changes_{schema}")
}

/// Serializes uploads, deletions and imports of one device: an exclusive
/// advisory lock on the device, a shared one on its user. Its own statement,
/// so that the statements after it take their snapshot once it is held.
const LOCK_DEVICE: &str = "SELECT
    pg_advisory_xact_lock_shared(hashtextextended('keyclaim/' || current_schema() || '/' || $1::text, 0)),
    pg_advisory_xact_lock(hashtextextended('keyclaim/' || current_schema() || '/' || $1::text || '/' || $2::text, 1))";

/// Serializes [`delete_user`] with every upload, deletion and import of the user.
const LOCK_USER: &str = "SELECT
    pg_advisory_xact_lock(hashtextextended('keyclaim/' || current_schema() || '/' || $1::text, 0))";

/// Everything [`plan_upload`] needs, in one snapshot: stored OTKs and issued
/// keys among the uploaded key IDs, OTK counts of the uploaded algorithms,
/// stored fallback digests of the uploaded fallback algorithms.
const UPLOAD_FACTS: &str = "
SELECT 0::int2 AS kind, key_id, NULL::text AS algorithm, digest, 0::int8 AS n
  FROM otk WHERE user_id = $1 AND device_id = $2 AND key_id = ANY($3::text[])
UNION ALL
SELECT 1::int2, key_id, NULL::text, digest, 0::int8
  FROM issued WHERE user_id = $1 AND device_id = $2 AND key_id = ANY($3::text[])
UNION ALL
SELECT 2::int2, NULL::text, algorithm, NULL::bytea, count(*)
  FROM otk WHERE user_id = $1 AND device_id = $2 AND algorithm = ANY($4::text[])
  GROUP BY algorithm
UNION ALL
SELECT 3::int2, NULL::text, algorithm, digest, 0::int8
  FROM fallback WHERE user_id = $1 AND device_id = $2 AND algorithm = ANY($5::text[])";

/// New OTKs of one upload, all at one new sequence value (R3.5): the
/// uncorrelated subquery is evaluated once per statement.
const INSERT_OTKS: &str = "
INSERT INTO otk (user_id, device_id, key_id, algorithm, seq, key_json, digest)
SELECT $1, $2, u.key_id, u.algorithm, (SELECT nextval('otk_seq')), u.key_json, u.digest
  FROM unnest($3::text[], $4::text[], $5::text[], $6::bytea[]) AS u(key_id, algorithm, key_json, digest)";

/// Replaces (or adds) fallback keys, unused (R5.1).
const UPSERT_FALLBACKS: &str = "
INSERT INTO fallback (user_id, device_id, algorithm, key_id, key_json, digest, used)
SELECT $1, $2, u.algorithm, u.key_id, u.key_json, u.digest, u.used
  FROM unnest($3::text[], $4::text[], $5::text[], $6::bytea[], $7::bool[])
       AS u(algorithm, key_id, key_json, digest, used)
ON CONFLICT (user_id, device_id, algorithm) DO UPDATE
   SET key_id = EXCLUDED.key_id, key_json = EXCLUDED.key_json,
       digest = EXCLUDED.digest, used = EXCLUDED.used";

/// A device's OTK counts and unused fallback algorithms, in one snapshot;
/// index scans bounded by the device's own rows (R6.4).
const SYNC_STATE: &str = "
SELECT false AS is_fallback, algorithm, count(*) AS n
  FROM otk WHERE user_id = $1 AND device_id = $2 GROUP BY algorithm
UNION ALL
SELECT true, algorithm, 0::int8
  FROM fallback WHERE user_id = $1 AND device_id = $2 AND NOT used";

/// Sends notification payloads: inside a mutation's transaction (so that
/// they go out only if it commits) with transactional notifications, else
/// from the [`crate::listen::Announcer`] in batches after commits.
pub(crate) const NOTIFY: &str = "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p";

/// Claims for many targets in one statement; see the module docs.
///
/// Parameters: `$1..$4` the targets (user IDs, device IDs, algorithms,
/// counts > 0, no (device, algorithm) twice), `$5` the number of issued
/// keys to remember per (device, algorithm), `$6` the channel, `$7` the
/// instance ID, `$8` whether to send the notifications in the statement. Rows: `ord` (1-based target index of a fallback key; 0 for
/// an OTK, whose target is found by its user, device and algorithm, unique
/// in a round; -1 for the notification row), `fallback`, `seq`, `key_id`,
/// `key_json`, `changed` (this row changed its device: an OTK removed or a
/// fallback newly marked used), `user_id`, `device_id`, `algorithm` (OTKs),
/// `digest` (of the key JSON, stored next to it: the key JSON is rebuilt
/// from both without parsing it again).
///
/// No step joins two intermediate results on a condition the planner could
/// misjudge: a prepared statement's generic plan does not know how many
/// targets a call has, and a nested loop over two 1,000-row CTEs would cost
/// seconds. Every table access is an index scan under `LATERAL` or a TID
/// scan.
pub(crate) const CLAIM: &str = r#"
WITH t AS MATERIALIZED (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[])
        WITH ORDINALITY AS t(user_id, device_id, algorithm, n, ord)
),
picked AS MATERIALIZED (
    SELECT t.ord, t.user_id, t.device_id, t.algorithm, k.row_ctid
    FROM t LEFT JOIN LATERAL (
        SELECT o.ctid AS row_ctid
        FROM otk o
        WHERE o.user_id = t.user_id AND o.device_id = t.device_id
          AND o.algorithm = t.algorithm
        ORDER BY o.seq, o.key_id
        LIMIT t.n
        FOR UPDATE SKIP LOCKED
    ) k ON true
),
claimed AS (
    DELETE FROM otk o
    WHERE o.ctid = ANY (ARRAY(SELECT row_ctid FROM picked WHERE row_ctid IS NOT NULL))
    RETURNING o.user_id, o.device_id, o.algorithm, o.key_id, o.key_json, o.digest, o.seq
),
ranked AS MATERIALIZED (
    SELECT c.*,
           row_number() OVER (ORDER BY c.user_id, c.device_id, c.algorithm, c.seq, c.key_id) AS pos,
           row_number() OVER (PARTITION BY c.user_id, c.device_id, c.algorithm
                              ORDER BY c.seq DESC, c.key_id DESC) AS from_newest
    FROM claimed c
),
issue_txn AS MATERIALIZED (
    SELECT nextval('issued_seq') AS v
),
remembered AS (
    INSERT INTO issued (user_id, device_id, algorithm, key_id, digest, issued_txn, issued_pos)
    SELECT r.user_id, r.device_id, r.algorithm, r.key_id, r.digest,
           (SELECT v FROM issue_txn), r.pos
    FROM ranked r
    WHERE r.from_newest <= $5::int8
),
prune_from AS MATERIALIZED (
    SELECT g.user_id, g.device_id, g.algorithm, c.issued_txn, c.issued_pos
    FROM (
        SELECT user_id, device_id, algorithm, count(*) AS added
        FROM claimed GROUP BY user_id, device_id, algorithm
    ) g
    CROSS JOIN LATERAL (
        SELECT i.issued_txn, i.issued_pos
        FROM issued i
        WHERE i.user_id = g.user_id AND i.device_id = g.device_id
          AND i.algorithm = g.algorithm
        ORDER BY i.issued_txn DESC, i.issued_pos DESC
        OFFSET GREATEST($5::int8 - g.added, 0)
        LIMIT 1
    ) c
    WHERE (SELECT v FROM issue_txn) % 8 = 0
),
prune_locked AS MATERIALIZED (
    SELECT old.row_ctid
    FROM prune_from p CROSS JOIN LATERAL (
        SELECT i.ctid AS row_ctid
        FROM issued i
        WHERE i.user_id = p.user_id AND i.device_id = p.device_id
          AND i.algorithm = p.algorithm
          AND (i.issued_txn, i.issued_pos) <= (p.issued_txn, p.issued_pos)
        FOR UPDATE SKIP LOCKED
    ) old
),
pruned AS (
    DELETE FROM issued i WHERE i.ctid = ANY (ARRAY(SELECT row_ctid FROM prune_locked))
),
fb_seen AS MATERIALIZED (
    SELECT p.ord, f.user_id, f.device_id, f.algorithm, f.key_id, f.key_json, f.digest, f.used
    FROM picked p CROSS JOIN LATERAL (
        SELECT * FROM fallback f
        WHERE f.user_id = p.user_id AND f.device_id = p.device_id
          AND f.algorithm = p.algorithm
        LIMIT 1
    ) f
    WHERE p.row_ctid IS NULL
),
fb_locked AS MATERIALIZED (
    SELECT s.ord, f.row_ctid, f.user_id, f.device_id, f.key_id, f.key_json, f.digest, f.used
    FROM (
        SELECT * FROM fb_seen WHERE NOT used
        ORDER BY user_id, device_id, algorithm
    ) s
    CROSS JOIN LATERAL (
        SELECT f.ctid AS row_ctid, f.user_id, f.device_id, f.key_id, f.key_json, f.digest, f.used
        FROM fallback f
        WHERE f.user_id = s.user_id AND f.device_id = s.device_id
          AND f.algorithm = s.algorithm
        LIMIT 1
        FOR UPDATE
    ) f
),
fb_marked AS (
    UPDATE fallback f SET used = true
    WHERE f.ctid = ANY (ARRAY(SELECT row_ctid FROM fb_locked WHERE NOT used))
),
changed AS (
    SELECT user_id, device_id FROM claimed
    UNION
    SELECT user_id, device_id FROM fb_locked WHERE NOT used
),
notified AS (
    SELECT count(pg_notify($6::text, $7::text || ' ' || chunk)) AS n
    FROM (
        SELECT json_agg(dev ORDER BY dev_order)::text AS chunk
        FROM (
            SELECT dev, dev_order,
                   sum(octet_length(dev::text) + 2) OVER (ORDER BY dev_order) / 4000 AS bucket
            FROM (
                SELECT json_build_array(user_id, device_id) AS dev,
                       row_number() OVER (ORDER BY user_id, device_id) AS dev_order
                FROM changed
            ) c
        ) d
        GROUP BY bucket
    ) chunks
    WHERE $8::bool
)
SELECT 0::int8 AS ord, false AS fallback, c.seq, c.key_id, c.key_json, true AS changed,
       c.user_id, c.device_id, c.algorithm, c.digest
  FROM claimed c
UNION ALL
SELECT s.ord, true, 0::int8, s.key_id, s.key_json, false, NULL, NULL, NULL, s.digest
  FROM fb_seen s WHERE s.used
UNION ALL
SELECT l.ord, true, 0::int8, l.key_id, l.key_json, NOT l.used, NULL, NULL, NULL, l.digest
  FROM fb_locked l
UNION ALL
SELECT -1::int8, false, n, NULL, NULL, false, NULL, NULL, NULL, NULL FROM notified
"#;

const DELETE_DEVICE_OTKS: &str = "DELETE FROM otk WHERE user_id = $1 AND device_id = $2";

/// Runs after [`DELETE_DEVICE_OTKS`], in a later snapshot: it also removes
/// the issued memory written by claims that held the device's keys while
/// the OTKs were being deleted.
const DELETE_DEVICE_REST: &str = "
WITH f AS (DELETE FROM fallback WHERE user_id = $1 AND device_id = $2 RETURNING 1),
     i AS (DELETE FROM issued WHERE user_id = $1 AND device_id = $2 RETURNING 1)
SELECT (SELECT count(*) FROM f) + (SELECT count(*) FROM i)";

const DELETE_USER_OTKS: &str = "
WITH d AS (DELETE FROM otk WHERE user_id = $1 RETURNING device_id)
SELECT DISTINCT device_id FROM d";

const DELETE_USER_REST: &str = "
WITH f AS (DELETE FROM fallback WHERE user_id = $1 RETURNING device_id),
     i AS (DELETE FROM issued WHERE user_id = $1 RETURNING device_id)
SELECT device_id FROM f UNION SELECT device_id FROM i";

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

const IMPORT_OTKS: &str = "
INSERT INTO otk (user_id, device_id, key_id, algorithm, seq, key_json, digest)
SELECT $1, $2, u.key_id, u.algorithm, u.seq, u.key_json, u.digest
  FROM unnest($3::text[], $4::text[], $5::int8[], $6::text[], $7::bytea[])
       AS u(key_id, algorithm, seq, key_json, digest)";

const IMPORT_ISSUED: &str = "
INSERT INTO issued (user_id, device_id, algorithm, key_id, digest, issued_txn, issued_pos)
SELECT $1, $2, u.algorithm, u.key_id, u.digest, (SELECT nextval('issued_seq')), u.pos
  FROM unnest($3::text[], $4::text[], $5::bytea[]) WITH ORDINALITY AS u(algorithm, key_id, digest, pos)
ON CONFLICT DO NOTHING";

/// The largest notification payload we build (PostgreSQL's limit is 8000).
const MAX_PAYLOAD: usize = 7000;

/// Notification payloads announcing `devices`: `<instance> <JSON array of
/// [user ID, device ID]>`, split so that each stays under the server's
/// limit. The same format as the [`CLAIM`] statement builds in SQL.
pub(crate) fn notify_payloads(instance: &str, devices: &[Device]) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut len = 0;
    for device in devices {
        let item =
            serde_json::json!([device.user_id.as_str(), device.device_id.as_str()]).to_string();
        if !current.is_empty() && len + item.len() + 1 > MAX_PAYLOAD - instance.len() - 3 {
            out.push(format!("{instance} [{}]", current.join(",")));
            current.clear();
            len = 0;
        }
        len += item.len() + 1;
        current.push(item);
    }
    if !current.is_empty() {
        out.push(format!("{instance} [{}]", current.join(",")));
    }
    out
}

fn parse_key_id(text: &str) -> Result<KeyId> {
    decode::key_id(text)
}

fn parse_key_json(text: &str) -> Result<KeyJson> {
    decode::key_json(text)
}

fn parse_digest(bytes: &[u8]) -> Result<KeyDigest> {
    decode::digest(bytes)
}

fn parse_algorithm(text: &str) -> Result<Algorithm> {
    decode::algorithm(text)
}

fn parse_device(user: &str, device: &str) -> Result<Device> {
    decode::device(user, device)
}

fn count_to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Stores an upload (see the module docs).
pub(crate) async fn upload(
    client: &mut Object,
    sql: &Sql,
    limits: &Limits,
    upload: &Upload,
) -> Result<UploadOutcome> {
    let op = "upload";
    let device = upload.device();
    let user_id = device.user_id.as_str();
    let device_id = device.device_id.as_str();
    let tx = client.transaction().await.map_err(pg(op))?;
    let (lock, facts_stmt) = futures::try_join!(
        tx.prepare_cached(LOCK_DEVICE),
        tx.prepare_cached(UPLOAD_FACTS)
    )
    .map_err(pg(op))?;

    let key_ids: Vec<&str> = upload.one_time_keys().keys().map(KeyId::as_str).collect();
    let mut algorithms: Vec<&str> = upload
        .one_time_keys()
        .keys()
        .map(KeyId::algorithm_str)
        .collect();
    algorithms.dedup();
    let fallback_algorithms: Vec<&str> = upload
        .fallback_keys()
        .keys()
        .map(Algorithm::as_str)
        .collect();
    let device_params: [&(dyn ToSql + Sync); 2] = [&user_id, &device_id];
    let facts_params: [&(dyn ToSql + Sync); 5] = [
        &user_id,
        &device_id,
        &key_ids,
        &algorithms,
        &fallback_algorithms,
    ];
    let (_, rows) = futures::try_join!(
        tx.execute(&lock, &device_params),
        tx.query(&facts_stmt, &facts_params)
    )
    .map_err(pg(op))?;

    let mut facts = DeviceFacts::default();
    for row in rows {
        let kind: i16 = row.try_get(0).map_err(pg(op))?;
        match kind {
            0 | 1 => {
                let key_id = parse_key_id(row.try_get(1).map_err(pg(op))?)?;
                let digest = parse_digest(row.try_get(3).map_err(pg(op))?)?;
                if kind == 0 {
                    facts.stored_otks.insert(key_id, digest);
                } else {
                    facts.issued.insert((key_id, digest));
                }
            }
            2 => {
                let algorithm = parse_algorithm(row.try_get(2).map_err(pg(op))?)?;
                facts
                    .otk_counts
                    .insert(algorithm, count_to_u64(row.try_get(4).map_err(pg(op))?));
            }
            _ => {
                let algorithm = parse_algorithm(row.try_get(2).map_err(pg(op))?)?;
                let digest = parse_digest(row.try_get(3).map_err(pg(op))?)?;
                facts.fallback_digests.insert(algorithm, digest);
            }
        }
    }

    // On a rule violation the transaction is dropped: rolled back, nothing applied.
    let plan = plan_upload(upload, &facts, limits)?;
    let changed = !plan.is_noop();

    let (insert_stmt, upsert_stmt, notify_stmt, state_stmt) = futures::try_join!(
        tx.prepare_cached(INSERT_OTKS),
        tx.prepare_cached(UPSERT_FALLBACKS),
        tx.prepare_cached(NOTIFY),
        tx.prepare_cached(SYNC_STATE)
    )
    .map_err(pg(op))?;

    let otk_ids: Vec<&str> = plan.insert_otks.iter().map(|(id, _)| id.as_str()).collect();
    let otk_algs: Vec<&str> = plan
        .insert_otks
        .iter()
        .map(|(id, _)| id.algorithm_str())
        .collect();
    let otk_jsons: Vec<&str> = plan
        .insert_otks
        .iter()
        .map(|(_, j)| j.canonical())
        .collect();
    let otk_digests: Vec<[u8; 32]> = plan
        .insert_otks
        .iter()
        .map(|(_, j)| *j.digest().as_bytes())
        .collect();
    let otk_digest_refs: Vec<&[u8]> = otk_digests.iter().map(|d| d.as_slice()).collect();

    let fb_algs: Vec<&str> = plan
        .replace_fallbacks
        .iter()
        .map(|(a, _, _)| a.as_str())
        .collect();
    let fb_ids: Vec<&str> = plan
        .replace_fallbacks
        .iter()
        .map(|(_, id, _)| id.as_str())
        .collect();
    let fb_jsons: Vec<&str> = plan
        .replace_fallbacks
        .iter()
        .map(|(_, _, j)| j.canonical())
        .collect();
    let fb_digests: Vec<[u8; 32]> = plan
        .replace_fallbacks
        .iter()
        .map(|(_, _, j)| *j.digest().as_bytes())
        .collect();
    let fb_digest_refs: Vec<&[u8]> = fb_digests.iter().map(|d| d.as_slice()).collect();
    let fb_used: Vec<bool> = vec![false; fb_algs.len()];

    let payloads = if changed && sql.transactional_notify {
        notify_payloads(&sql.instance, std::slice::from_ref(device))
    } else {
        Vec::new()
    };

    let insert = async {
        if otk_ids.is_empty() {
            return Ok(0);
        }
        tx.execute(
            &insert_stmt,
            &[
                &user_id,
                &device_id,
                &otk_ids,
                &otk_algs,
                &otk_jsons,
                &otk_digest_refs,
            ],
        )
        .await
    };
    let upsert = async {
        if fb_algs.is_empty() {
            return Ok(0);
        }
        tx.execute(
            &upsert_stmt,
            &[
                &user_id,
                &device_id,
                &fb_algs,
                &fb_ids,
                &fb_jsons,
                &fb_digest_refs,
                &fb_used,
            ],
        )
        .await
    };
    let notify = async {
        if payloads.is_empty() {
            return Ok(Vec::new());
        }
        tx.query(&notify_stmt, &[&sql.channel, &payloads]).await
    };
    let state = tx.query(&state_stmt, &device_params);
    let (_, _, _, state_rows) =
        futures::try_join!(insert, upsert, notify, state).map_err(pg(op))?;
    let counts = decode_sync_state(op, state_rows)?.one_time_key_counts;
    tx.commit().await.map_err(pg(op))?;

    let changes = if changed {
        Changes::from_devices([device.clone()])
    } else {
        Changes::none()
    };
    tracing::debug!(%device, changed, "upload stored");
    Ok(UploadOutcome { counts, changes })
}

/// The targets of a claim split into rounds in which no (device, algorithm)
/// repeats; targets with a count of 0 are left out (they take nothing).
#[derive(Debug, Default)]
pub(crate) struct ClaimRounds<'a> {
    rounds: Vec<Round<'a>>,
}

#[derive(Debug, Default)]
struct Round<'a> {
    /// The index of each target in the request.
    index: Vec<usize>,
    users: Vec<&'a str>,
    devices: Vec<&'a str>,
    algorithms: Vec<&'a str>,
    counts: Vec<i32>,
}

impl<'a> ClaimRounds<'a> {
    /// Rounds of the targets (core clamped their counts, R8.3, and left out
    /// those of 0).
    pub(crate) fn new(targets: &'a [ClaimTarget]) -> Self {
        let mut rounds: Vec<Round<'a>> = Vec::new();
        let mut seen: HashMap<(&Device, &Algorithm), usize> = HashMap::new();
        for (i, target) in targets.iter().enumerate() {
            let count = target.count;
            let occurrence = seen.entry((&target.device, &target.algorithm)).or_insert(0);
            let r = *occurrence;
            *occurrence += 1;
            if rounds.len() <= r {
                rounds.push(Round::default());
            }
            let round = &mut rounds[r];
            round.index.push(i);
            round.users.push(target.device.user_id.as_str());
            round.devices.push(target.device.device_id.as_str());
            round.algorithms.push(target.algorithm.as_str());
            round.counts.push(i32::try_from(count).unwrap_or(i32::MAX));
        }
        Self { rounds }
    }
}

/// One claimed key before sorting: (target index, is fallback, seq, key).
type Claimed = (usize, bool, i64, ClaimedKey);

/// Claims keys (see the module docs).
pub(crate) async fn claim(
    client: &mut Object,
    sql: &Sql,
    limits: &Limits,
    targets: &[ClaimTarget],
    rounds: &ClaimRounds<'_>,
) -> Result<ClaimOutcome> {
    let op = "claim";
    let remembered = i64::try_from(limits.remembered_issued_keys).unwrap_or(i64::MAX);
    let mut claimed: Vec<Claimed> = Vec::new();
    let mut changed: Vec<Device> = Vec::new();
    if let [round] = rounds.rounds.as_slice() {
        // The common case: one statement, its own transaction, one round trip.
        let stmt = client.prepare_cached(CLAIM).await.map_err(pg(op))?;
        let rows = client
            .query(&stmt, &claim_params(round, &remembered, sql))
            .await
            .map_err(pg(op))?;
        decode_claim(round, targets, rows, &mut claimed, &mut changed)?;
    } else {
        let tx = client.transaction().await.map_err(pg(op))?;
        let stmt = tx.prepare_cached(CLAIM).await.map_err(pg(op))?;
        for round in &rounds.rounds {
            let rows = tx
                .query(&stmt, &claim_params(round, &remembered, sql))
                .await
                .map_err(pg(op))?;
            decode_claim(round, targets, rows, &mut claimed, &mut changed)?;
        }
        tx.commit().await.map_err(pg(op))?;
    }
    claimed.sort_by(|a, b| (a.0, a.1, a.2, &a.3.key_id).cmp(&(b.0, b.1, b.2, &b.3.key_id)));
    let keys: Vec<ClaimedKey> = claimed.into_iter().map(|(_, _, _, key)| key).collect();
    tracing::debug!(issued = keys.len(), changed = changed.len(), "claim done");
    Ok(ClaimOutcome {
        keys,
        changes: Changes::from_devices(changed),
    })
}

fn claim_params<'a>(
    round: &'a Round<'_>,
    remembered: &'a i64,
    sql: &'a Sql,
) -> [&'a (dyn ToSql + Sync); 8] {
    [
        &round.users,
        &round.devices,
        &round.algorithms,
        &round.counts,
        remembered,
        &sql.channel,
        &sql.instance,
        &sql.transactional_notify,
    ]
}

fn decode_claim(
    round: &Round<'_>,
    targets: &[ClaimTarget],
    rows: Vec<tokio_postgres::Row>,
    claimed: &mut Vec<Claimed>,
    changed: &mut Vec<Device>,
) -> Result<()> {
    let op = "claim";
    // (user, device, algorithm) -> position in the round (unique there).
    let by_target: HashMap<(&str, &str, &str), usize> = (0..round.index.len())
        .map(|i| ((round.users[i], round.devices[i], round.algorithms[i]), i))
        .collect();
    for row in &rows {
        let ord: i64 = row.try_get(0).map_err(pg(op))?;
        if ord < 0 {
            continue; // the notification row
        }
        let position = if ord == 0 {
            let user: &str = row.try_get(6).map_err(pg(op))?;
            let device: &str = row.try_get(7).map_err(pg(op))?;
            let algorithm: &str = row.try_get(8).map_err(pg(op))?;
            by_target.get(&(user, device, algorithm)).copied()
        } else {
            usize::try_from(ord - 1).ok()
        };
        let (index, target) = position
            .and_then(|i| round.index.get(i))
            .and_then(|&i| targets.get(i).map(|t| (i, t)))
            .ok_or_else(|| corrupt("claim answer", format!("no target {ord}")))?;
        let fallback: bool = row.try_get(1).map_err(pg(op))?;
        let seq: i64 = row.try_get(2).map_err(pg(op))?;
        let key_id = parse_key_id(row.try_get(3).map_err(pg(op))?)?;
        // The store wrote this text itself, canonical, with its digest
        // (upload and import store `KeyJson::canonical` and `digest`): no
        // need to parse, canonicalize and hash it again for every key.
        let key_json = decode::key_json_with_digest(
            row.try_get::<_, &str>(4).map_err(pg(op))?,
            parse_digest(row.try_get(9).map_err(pg(op))?)?,
        )?;
        if row.try_get::<_, bool>(5).map_err(pg(op))? {
            changed.push(target.device.clone());
        }
        claimed.push((
            index,
            fallback,
            seq,
            ClaimedKey {
                device: target.device.clone(),
                key_id,
                key_json,
                fallback,
            },
        ));
    }
    Ok(())
}

/// Reads a device's counts and unused fallback types in one statement.
pub(crate) async fn sync_state(
    client: &Object,
    _sql: &Sql,
    device: &Device,
    op: &'static str,
) -> Result<SyncState> {
    let stmt = client.prepare_cached(SYNC_STATE).await.map_err(pg(op))?;
    let rows = client
        .query(
            &stmt,
            &[&device.user_id.as_str(), &device.device_id.as_str()],
        )
        .await
        .map_err(pg(op))?;
    decode_sync_state(op, rows)
}

fn decode_sync_state(op: &'static str, rows: Vec<tokio_postgres::Row>) -> Result<SyncState> {
    let mut counts = BTreeMap::new();
    let mut unused = Vec::new();
    for row in rows {
        let is_fallback: bool = row.try_get(0).map_err(pg(op))?;
        let algorithm = parse_algorithm(row.try_get(1).map_err(pg(op))?)?;
        if is_fallback {
            unused.push(algorithm);
        } else {
            let n = count_to_u64(row.try_get(2).map_err(pg(op))?);
            if n > 0 {
                counts.insert(algorithm, n);
            }
        }
    }
    // Byte order (R2.7, R6.3), whatever order the rows came in.
    unused.sort();
    Ok(SyncState {
        one_time_key_counts: counts.into_iter().collect(),
        unused_fallback_key_types: unused,
    })
}

/// Removes a device's state (R7.1); see [`DELETE_DEVICE_REST`] for why in
/// two statements.
pub(crate) async fn delete_device(
    client: &mut Object,
    sql: &Sql,
    device: &Device,
) -> Result<Changes> {
    let op = "delete_device";
    let user_id = device.user_id.as_str();
    let device_id = device.device_id.as_str();
    let tx = client.transaction().await.map_err(pg(op))?;
    let (lock, otks, rest, notify) = futures::try_join!(
        tx.prepare_cached(LOCK_DEVICE),
        tx.prepare_cached(DELETE_DEVICE_OTKS),
        tx.prepare_cached(DELETE_DEVICE_REST),
        tx.prepare_cached(NOTIFY)
    )
    .map_err(pg(op))?;
    let params: [&(dyn ToSql + Sync); 2] = [&user_id, &device_id];
    let (_, removed_otks, rest_row) = futures::try_join!(
        tx.execute(&lock, &params),
        tx.execute(&otks, &params),
        tx.query_one(&rest, &params)
    )
    .map_err(pg(op))?;
    let removed_rest: i64 = rest_row.try_get(0).map_err(pg(op))?;
    let changes = if removed_otks > 0 || removed_rest > 0 {
        Changes::from_devices([device.clone()])
    } else {
        Changes::none()
    };
    if !changes.is_empty() && sql.transactional_notify {
        let payloads = notify_payloads(&sql.instance, changes.devices());
        tx.query(&notify, &[&sql.channel, &payloads])
            .await
            .map_err(pg(op))?;
    }
    tx.commit().await.map_err(pg(op))?;
    Ok(changes)
}

/// Removes the state of every device of a user (R7.2).
pub(crate) async fn delete_user(client: &mut Object, sql: &Sql, user: &UserId) -> Result<Changes> {
    let op = "delete_user";
    let user_id = user.as_str();
    let tx = client.transaction().await.map_err(pg(op))?;
    let (lock, otks, rest, notify) = futures::try_join!(
        tx.prepare_cached(LOCK_USER),
        tx.prepare_cached(DELETE_USER_OTKS),
        tx.prepare_cached(DELETE_USER_REST),
        tx.prepare_cached(NOTIFY)
    )
    .map_err(pg(op))?;
    let params: [&(dyn ToSql + Sync); 1] = [&user_id];
    let (_, otk_rows, rest_rows) = futures::try_join!(
        tx.execute(&lock, &params),
        tx.query(&otks, &params),
        tx.query(&rest, &params)
    )
    .map_err(pg(op))?;
    let mut devices = Vec::new();
    for row in otk_rows.iter().chain(&rest_rows) {
        devices.push(parse_device(user_id, row.try_get(0).map_err(pg(op))?)?);
    }
    let changes = Changes::from_devices(devices);
    if !changes.is_empty() && sql.transactional_notify {
        let payloads = notify_payloads(&sql.instance, changes.devices());
        tx.query(&notify, &[&sql.channel, &payloads])
            .await
            .map_err(pg(op))?;
    }
    tx.commit().await.map_err(pg(op))?;
    Ok(changes)
}

/// Exports a page of device snapshots, all from one snapshot of the
/// database (a read-only repeatable-read transaction).
pub(crate) async fn export_devices(
    client: &mut Object,
    after: Option<&Device>,
    limit: usize,
) -> Result<Vec<DeviceSnapshot>> {
    let op = "export_devices";
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let (after_user, after_device) =
        after.map_or(("", ""), |d| (d.user_id.as_str(), d.device_id.as_str()));
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
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
        snapshots.push(DeviceSnapshot::empty(parse_device(&user, &device_id)?));
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
            key_id: parse_key_id(row.try_get(2).map_err(pg(op))?)?,
            key_json: parse_key_json(row.try_get(3).map_err(pg(op))?)?,
            seq: count_to_u64(seq),
        });
    }
    for row in &fallback_rows {
        let i = find(row)?;
        let key_id = parse_key_id(row.try_get(2).map_err(pg(op))?)?;
        snapshots[i].fallback_keys.insert(
            key_id.algorithm(),
            StoredFallback {
                key_id,
                key_json: parse_key_json(row.try_get(3).map_err(pg(op))?)?,
                used: row.try_get(4).map_err(pg(op))?,
            },
        );
    }
    for row in &issued_rows {
        let i = find(row)?;
        let key_id = parse_key_id(row.try_get(2).map_err(pg(op))?)?;
        let digest = parse_digest(row.try_get(3).map_err(pg(op))?)?;
        snapshots[i]
            .issued
            .entry(key_id.algorithm())
            .or_default()
            .push(IssuedKey { key_id, digest });
    }
    Ok(snapshots)
}

/// Replaces a device's state with a snapshot. The snapshot's OTK order is
/// kept with new sequence values, so that later uploads sort after it.
pub(crate) async fn import_device(
    client: &mut Object,
    sql: &Sql,
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
        .flat_map(|(alg, keys)| keys.iter().map(move |k| (alg, k)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_stay_under_the_server_limit() {
        let devices: Vec<Device> = (0..2000)
            .map(|i| {
                Device::parse(&format!("@user{i}:example.org"), &format!("DEVICE{i}")).unwrap()
            })
            .collect();
        let payloads = notify_payloads("0123456789abcdef", &devices);
        assert!(payloads.len() > 1);
        let mut seen = 0;
        for p in &payloads {
            assert!(p.len() < 8000);
            let (id, json) = p.split_once(' ').unwrap();
            assert_eq!(id, "0123456789abcdef");
            let list: Vec<(String, String)> = serde_json::from_str(json).unwrap();
            seen += list.len();
        }
        assert_eq!(seen, devices.len());
    }
}
