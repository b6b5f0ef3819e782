//! Claims (R4.1 to R4.7): the [`CLAIM`] statement and the code that runs
//! it.
//!
//! # Why the claim is correct across connections (R4.2, R4.3)
//!
//! A claim is **one statement** (one round trip, one implicit transaction,
//! see [`CLAIM`]; in the common case the lighter [`CLAIM_FAST`], or
//! [`CLAIM_ONE`] for a lone single-key target, which apply only when
//! every target finds all its keys, so that the argument below holds for
//! them with no fallback and no short target). For each target a
//! `LATERAL` subquery walks the device's keys in claim order through the `otk_claim_order` index and locks them
//! with `FOR UPDATE SKIP LOCKED` under a `LIMIT`; the rows it locks are
//! deleted by the same statement and returned with `RETURNING`.
//!
//! - *No key twice*: a key is returned only by the transaction that deleted
//!   it, and only one transaction can delete a row.
//! - *No under-issue*: the plan is `Limit -> LockRows -> Index Scan`, so the
//!   lock node locks exactly the rows the limit passes on: a claimer locks
//!   only keys it will delete. A row that a concurrent claim deleted and
//!   committed after our snapshot is dropped by the lock node (READ
//!   COMMITTED re-check, R10.5) and the walk goes on; so is a row another
//!   transaction holds locked, which is usually on its way out too (a
//!   claim, a deletion). But that transaction may still fail and roll back
//!   (R4.3): then the key stays stored, and a claim that skipped it must
//!   not come away short. So when a target comes away short and the
//!   device still shows, in the statement's snapshot, keys the walk did not
//!   take (the `contended` CTE, one more index probe of the short targets
//!   only), the statement applies nothing (no deletion, no fallback) and
//!   answers -3; the claim then runs again as [`CLAIM_WAITING`], whose walk
//!   waits for locked rows instead of skipping them: it takes a row whose
//!   locker rolled back, and steps past one whose locker deleted it. This
//!   only happens on a nearly empty device, and costs one more statement.
//!   Claims lock keys in one order (targets in byte order, keys in claim
//!   order), and a skipping walk never waits, so waiting claims cannot
//!   deadlock with each other; a deletion, which locks a device's keys in
//!   an order of its own, can meet a waiting claim of the same device in a
//!   deadlock, which PostgreSQL breaks by failing one of them (retryable,
//!   nothing applied). No other statement locks OTK rows (uploads read them
//!   without a lock and insert new ones, invisible until commit); deletion,
//!   key resets and import lock them only to delete them too.
//! - The fallback key is read for the targets that got no OTK, from the
//!   statement's snapshot, and that version is the key answered. An unused
//!   one is then locked (`FOR UPDATE`, in key order so that concurrent
//!   claims cannot deadlock on it) and marked used through the locked row
//!   version (its `ctid`). The lock waits for a concurrent writer of the row
//!   and yields the row's newest version. If that is the version of the
//!   snapshot, the row is unchanged, and we mark it. If not, the row changed
//!   after the snapshot (another claim marked it, an upload replaced it, a
//!   deletion removed it): the `UPDATE`, which sees rows as of the
//!   snapshot, finds nothing at the new version's `ctid`, and the key is
//!   answered unmarked, as if this claim had run (and marked it) just
//!   before that change, which used, replaced or removed it since. So a
//!   claim marks only the very key it answers (R4.4, R5.1), never a newer
//!   key it did not see. A used key is answered without a lock (so that
//!   claimers of an exhausted hot device do not queue on its row).
//! - The issued memory (R3.4) is written in the same statement: each
//!   claimed key, at most the configured number per (device, algorithm), is
//!   inserted without a conflict check (the statement's `issued_seq` value
//!   and each key's position in the statement make the primary key
//!   unique). Claims never prune it: a (device, algorithm) remembers its
//!   newest `Limits::remembered_issued_keys` issued keys, exactly, and older
//!   rows count as forgotten for uploads and exports alike; uploads prune
//!   them (see [`super::upload`](mod@super::upload)). So a claim touches no older row of the
//!   memory, and claims of one device never meet there.
//! - Targets of the same device and algorithm (named twice in one request,
//!   or by several claims of one batch, see [`crate::combine`]) cannot be
//!   walked twice in one statement (a transaction does not skip its own
//!   locks), so they are merged into one target asking for the sum of their
//!   counts; its keys, oldest first, go to the claimants in arrival order,
//!   each taking its count, so each gets what it would have got had they
//!   run one after another (R4.2). The statement reads and marks the
//!   fallback key exactly when a claimant that falls back comes away with
//!   no OTK (R4.4, R4.5): when the target got at most as many keys as the
//!   claimants before it asked for (`$9`).
//! - With transactional notifications the cross-process notification is
//!   `pg_notify` inside the statement, so it is sent if and only if the
//!   claim commits; by default it is sent after the commit, batched (see
//!   [`crate::listen`]).
//!
//! # Where the walks start (R4.2, R4.3)
//!
//! A claim deletes a device's oldest keys, and their entries stay in the
//! `otk_claim_order` index, dead, until a vacuum removes them; a walk from
//! the head of the device's range steps over all of them. A device claimed
//! without pause piles up thousands a second, and every claim of it slows
//! down. So [`CLAIM_FAST`] and [`CLAIM_ONE`] start their walks at a lower
//! bound of the device's `seq` values kept by the store ([`Heads`]), and
//! read the next bound in the same statement: the `seq` of the device's
//! first key in the statement's snapshot, found by a plain read (no lock,
//! no skipping) from the current bound. No key the device holds or will
//! hold is below that value:
//!
//! - the keys in the snapshot, those locked by other claims included (their
//!   deletion is not committed, so they are visible), are at or above it:
//!   one whose claim rolls back is still found;
//! - a key committed later comes from an upload or import of the device,
//!   which takes the device's lock and then a new `otk_seq` value, so its
//!   `seq` is above that of every upload of the device that committed
//!   before, the first key's among them.
//!
//! This takes `otk_seq` to only ever grow: a schema dropped and created
//! again, or restored from an older backup, while a store is open on it
//! needs that store reopened (its bounds are in memory only).
//!
//! [`CLAIM`] and [`CLAIM_WAITING`] walk from the head as before; a target
//! that comes away short from a bounded walk runs as [`CLAIM`], whose
//! `contended` probe looks at the whole range. A bound is read for a
//! target that asks for several keys in the batch (several claims of the
//! device combined, see [`crate::combine`]), and by a lone claim of one key
//! when none is known and once in 16 after; a big room's claim, one key
//! from each of many devices, reads none (it uses the bounds known).
//!
//! # The split claim's steps (R12.1, R12.2)
//!
//! Claiming one-time keys only is [`CLAIM`] with its fallback step switched
//! off (`$9` at -1), so the argument above holds for it unchanged; one-time
//! and one-step claims share batches. Handing out fallback keys is [`CLAIM_FALLBACKS`], one
//! statement for all targets that reads, locks and marks fallback keys with
//! the same CTEs as [`CLAIM`], marking only where a target asks.
//!
//! Failure modes: a claim whose statement fails rolls back whole. A claim
//! whose connection dies while the server commits may have consumed keys
//! that nobody received (the error is retryable; retrying claims new keys).

use std::collections::{BTreeMap, HashMap};

use keyclaim::backend::decode;
use keyclaim::{
    Changes, ClaimOutcome, ClaimTarget, ClaimedKey, Device, FallbackTarget, Limits, Result,
};
use tokio_postgres::types::ToSql;

use super::{Sql, remembered};
use crate::counts::count_deleted;
use crate::error::{corrupt, pg};
use crate::session::Conn;

/// The CTEs `fb_locked` and `fb_marked` of the claim statements: lock the
/// rows of `fb_seen` (fallback keys read from the statement's snapshot)
/// that are to be marked (`mark`) and were unused, in key order, and mark
/// each through the version the lock yields, which the `UPDATE` finds only
/// when it is still the snapshot's version (see the module docs).
/// `fb_marked` returns the user and device ID of each key marked.
macro_rules! lock_fallbacks_cte {
    () => {
        r#"
fb_locked AS MATERIALIZED (
    SELECT f.row_ctid
    FROM (
        SELECT * FROM fb_seen WHERE mark AND NOT used
        ORDER BY user_id, device_id, algorithm
    ) s
    CROSS JOIN LATERAL (
        SELECT f.ctid AS row_ctid
        FROM fallback f
        WHERE f.user_id = s.user_id AND f.device_id = s.device_id
          AND f.algorithm = s.algorithm
        LIMIT 1
        FOR UPDATE
    ) f
),
fb_marked AS (
    UPDATE fallback f SET used = true
    WHERE f.ctid = ANY (ARRAY(SELECT row_ctid FROM fb_locked))
    RETURNING f.user_id, f.device_id, f.algorithm
),
"#
    };
}

/// The CTE `notified` of the claim statements: sends the devices of the CTE
/// `changed` (`user_id`, `device_id`) in `pg_notify` payloads under the
/// server's limit, in the format of [`super::notify_payloads`], when the
/// flag parameter is set. Arguments: the placeholders of the channel, the
/// instance ID and the flag. Its one row (the number of payloads sent) must
/// be selected for the CTE to run.
macro_rules! notified_cte {
    ($channel:literal, $instance:literal, $flag:literal) => {
        concat!(
            r#"
notified AS (
    SELECT count(pg_notify("#,
            $channel,
            "::text, ",
            $instance,
            r#"::text || ' ' || chunk)) AS n
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
    WHERE "#,
            $flag,
            r#"::bool
)
"#
        )
    };
}

/// The walk over a target's keys (of the CTE `t`) in claim order, up to
/// its count, without its locking clause: the `LATERAL` subquery of the
/// claim statements.
macro_rules! key_walk {
    () => {
        r#"
        SELECT o.ctid AS row_ctid
        FROM otk o
        WHERE o.user_id = t.user_id AND o.device_id = t.device_id
          AND o.algorithm = t.algorithm
        ORDER BY o.seq, o.key_id
        LIMIT t.n
        "#
    };
    (from_lower) => {
        r#"
        SELECT o.ctid AS row_ctid
        FROM otk o
        WHERE o.user_id = t.user_id AND o.device_id = t.device_id
          AND o.algorithm = t.algorithm AND o.seq >= t.lower
        ORDER BY o.seq, o.key_id
        LIMIT t.n
        "#
    };
}

/// The claim statement, with `$lock` the locking clause of the walk over a
/// target's keys and `$detect` whether to look for keys that the walk
/// skipped (see [`CLAIM`] and [`CLAIM_WAITING`]).
macro_rules! claim_statement {
    ($lock:literal, $detect:literal) => {
        concat!(
            r#"
WITH t AS MATERIALIZED (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[], $9::int4[])
        WITH ORDINALITY AS t(user_id, device_id, algorithm, n, fb_at, ord)
),
picked AS MATERIALIZED (
    SELECT t.ord, t.user_id, t.device_id, t.algorithm, t.n, t.fb_at, k.row_ctid
    FROM t LEFT JOIN LATERAL (
"#,
            key_walk!(),
            $lock,
            r#"
    ) k ON true
),
got AS MATERIALIZED (
    SELECT ord, user_id, device_id, algorithm, n, fb_at,
           coalesce(array_agg(row_ctid) FILTER (WHERE row_ctid IS NOT NULL), '{}') AS got
    FROM picked
    GROUP BY ord, user_id, device_id, algorithm, n, fb_at
),
contended AS MATERIALIZED (
    SELECT g.ord
    FROM got g
    WHERE "#,
            $detect,
            r#" AND cardinality(g.got) < g.n
      AND EXISTS (
        SELECT 1 FROM otk o
        WHERE o.user_id = g.user_id AND o.device_id = g.device_id
          AND o.algorithm = g.algorithm AND o.ctid <> ALL (g.got)
      )
),
go AS MATERIALIZED (
    SELECT NOT EXISTS (SELECT 1 FROM contended) AS ok
),
claimed AS (
    DELETE FROM otk o
    WHERE (SELECT ok FROM go)
      AND o.ctid = ANY (ARRAY(SELECT row_ctid FROM picked WHERE row_ctid IS NOT NULL))
    RETURNING o.user_id, o.device_id, o.algorithm, o.key_id, o.key_json, o.digest, o.seq
),
"#,
    count_deleted!("claimed"),
    r#",
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
fb_seen AS MATERIALIZED (
    SELECT g.ord, true AS mark,
           f.user_id, f.device_id, f.algorithm, f.key_id, f.key_json, f.digest, f.used
    FROM got g CROSS JOIN LATERAL (
        SELECT * FROM fallback f
        WHERE f.user_id = g.user_id AND f.device_id = g.device_id
          AND f.algorithm = g.algorithm
        LIMIT 1
    ) f
    WHERE cardinality(g.got) <= g.fb_at AND (SELECT ok FROM go)
),
"#,
            lock_fallbacks_cte!(),
            r#"
changed AS (
    SELECT user_id, device_id FROM claimed
    UNION
    SELECT user_id, device_id FROM fb_marked
),
"#,
            notified_cte!("$6", "$7", "$8"),
            r#"
SELECT 0::int8 AS ord, false AS fallback, c.seq, c.key_id, c.key_json, true AS changed,
       c.user_id, c.device_id, c.algorithm, c.digest
  FROM claimed c
UNION ALL
SELECT s.ord, true, 0::int8, s.key_id, s.key_json, false, NULL, NULL, NULL, s.digest
  FROM fb_seen s
UNION ALL
SELECT -2::int8, false, 0::int8, NULL, NULL, true, m.user_id, m.device_id, m.algorithm, NULL
  FROM fb_marked m
UNION ALL
SELECT -1::int8, false, n, NULL, NULL, false, NULL, NULL, NULL, NULL FROM notified
UNION ALL
SELECT -3::int8, false, 0::int8, NULL, NULL, false, NULL, NULL, NULL, NULL
  FROM go WHERE NOT ok
"#
        )
    };
}

/// Claims for many targets in one statement; see the module docs.
///
/// Parameters: `$1..$4` the targets (user IDs, device IDs, algorithms,
/// counts > 0, no (device, algorithm) twice, in byte order of user, device
/// and algorithm), `$5` the number of issued keys to remember per (device,
/// algorithm), `$6` the channel, `$7` the instance ID, `$8` whether to send
/// the notifications in the statement, `$9` per target the most OTKs it
/// may get and still read and mark its fallback key (R4.4; -1: never, as
/// for R12.1). Rows: `ord` (1-based target index
/// of a fallback key; 0 for an OTK, whose target is found by its user,
/// device and algorithm, unique in a statement; -1 for the notification row;
/// -2 for a fallback key marked used, found by its user, device and
/// algorithm too; -3, alone, when the statement did nothing because a
/// target came away short while keys it skipped remain: see the module
/// docs), `fallback`, `seq`, `key_id`, `key_json`, `changed` (this row
/// changed its device: an OTK removed or a fallback newly marked used),
/// `user_id`, `device_id`, `algorithm` (OTKs and marked fallback keys),
/// `digest` (of the key JSON, stored next to it: the key JSON is rebuilt
/// from both without parsing it again).
///
/// No step joins two intermediate results on a condition the planner could
/// misjudge: a prepared statement's generic plan does not know how many
/// targets a call has, and a nested loop over two 1,000-row CTEs would cost
/// seconds. Every table access is an index scan under `LATERAL` or a TID
/// scan.
pub(crate) const CLAIM: &str = claim_statement!("FOR UPDATE SKIP LOCKED", "true");

/// [`CLAIM`] that waits for locked keys instead of skipping them, run when
/// [`CLAIM`] answered -3 (see the module docs). Its walk locks the targets'
/// keys in one order (targets in byte order, keys in claim order), so that
/// two of them cannot deadlock on keys; it never answers -3.
pub(crate) const CLAIM_WAITING: &str = claim_statement!("FOR UPDATE", "false");

/// The claim of a batch in which every target finds all the keys it asks
/// for, tried before [`CLAIM`] when every target asks for no more keys
/// than are remembered (R3.4) and notifications are not sent in the
/// statement: the common case, at less than half [`CLAIM`]'s server time
/// for a single key (no fallback, contention or notification steps).
///
/// It walks, locks and deletes as [`CLAIM`] does (`SKIP LOCKED`, the same
/// index, the same order) and remembers every key it deletes, in the same
/// issue order. It applies only when every target got its full count
/// (the `go` CTE), so no target comes away short and none needs its
/// fallback key (R4.3, R4.4, R4.5): when one would, it applies nothing
/// and answers -3 alone, and the batch runs as [`CLAIM`]. Parameters:
/// `$1..$4` as [`CLAIM`]'s, then per target its walk's lower bound and
/// whether to read the next (see the module docs, "Where the walks
/// start"). Rows: [`CLAIM`]'s OTK rows (`ord` 0), or the one -3 row; and
/// per target whose bound was read, a -4 row with its user, device and
/// algorithm and the bound in `seq`.
pub(crate) const CLAIM_FAST: &str = concat!(
    r#"
WITH t AS MATERIALIZED (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::int8[], $6::bool[])
        AS t(user_id, device_id, algorithm, n, lower, probe)
),
picked AS MATERIALIZED (
    SELECT k.row_ctid
    FROM t CROSS JOIN LATERAL (
"#,
    key_walk!(from_lower),
    r#"
        FOR UPDATE SKIP LOCKED
    ) k
),
heads AS MATERIALIZED (
    SELECT t.user_id, t.device_id, t.algorithm, h.seq
    FROM t CROSS JOIN LATERAL (
        SELECT o.seq FROM otk o
        WHERE o.user_id = t.user_id AND o.device_id = t.device_id
          AND o.algorithm = t.algorithm AND o.seq >= t.lower
        ORDER BY o.seq, o.key_id
        LIMIT 1
    ) h
    WHERE t.probe
),
go AS MATERIALIZED (
    SELECT (SELECT count(*) FROM picked) = (SELECT coalesce(sum(n), 0) FROM t) AS ok
),
claimed AS (
    DELETE FROM otk o
    WHERE (SELECT ok FROM go)
      AND o.ctid = ANY (ARRAY(SELECT row_ctid FROM picked))
    RETURNING o.user_id, o.device_id, o.algorithm, o.key_id, o.key_json, o.digest, o.seq
),
"#,
    count_deleted!("claimed"),
    r#",
remembered AS (
    INSERT INTO issued (user_id, device_id, algorithm, key_id, digest, issued_txn, issued_pos)
    SELECT c.user_id, c.device_id, c.algorithm, c.key_id, c.digest,
           (SELECT nextval('issued_seq')),
           row_number() OVER (ORDER BY c.user_id, c.device_id, c.algorithm, c.seq, c.key_id)
    FROM claimed c
)
SELECT 0::int8 AS ord, false AS fallback, c.seq, c.key_id, c.key_json, true AS changed,
       c.user_id, c.device_id, c.algorithm, c.digest
  FROM claimed c
UNION ALL
SELECT -3::int8, false, 0::int8, NULL, NULL, false, NULL, NULL, NULL, NULL
  FROM go WHERE NOT ok
UNION ALL
SELECT -4::int8, false, h.seq, NULL, NULL, false, h.user_id, h.device_id, h.algorithm, NULL
  FROM heads h
"#
);

/// The claim of one key of one target (a lone single-key claim: one
/// client's claim, or a device's claim when nothing else is waiting),
/// tried instead of [`CLAIM_FAST`] when the batch is that one target and
/// [`CLAIM_FAST`] would apply to it. The same walk (`SKIP LOCKED`, the same
/// index, the same order) without the target list, the materialized steps
/// and the window function, which are most of [`CLAIM_FAST`]'s server time
/// for one key. It deletes the key and remembers it (R3.4), or, when the walk
/// finds no key it can lock, does nothing and answers no row: the claim
/// then runs as [`CLAIM`], which falls back or waits (R4.3, R4.4).
/// Parameters: the user ID, device ID and algorithm, the walk's lower bound
/// (see the module docs, "Where the walks start"), and whether to read the
/// next. Row: [`CLAIM`]'s OTK row (`ord` 0) with the next bound in an
/// eleventh column `head` (NULL when not read), or none.
pub(crate) const CLAIM_ONE: &str = r#"
WITH claimed AS (
    DELETE FROM otk o
    WHERE o.ctid = (
        SELECT k.ctid
        FROM otk k
        WHERE k.user_id = $1 AND k.device_id = $2 AND k.algorithm = $3 AND k.seq >= $4
        ORDER BY k.seq, k.key_id
        LIMIT 1
        FOR UPDATE SKIP LOCKED
    )
    RETURNING o.user_id, o.device_id, o.algorithm, o.key_id, o.key_json, o.digest, o.seq
),
counted AS (
    INSERT INTO otk_count (user_id, device_id, algorithm, n, delta)
    SELECT c.user_id, c.device_id, c.algorithm, -1, true FROM claimed c
),
remembered AS (
    INSERT INTO issued (user_id, device_id, algorithm, key_id, digest, issued_txn, issued_pos)
    SELECT c.user_id, c.device_id, c.algorithm, c.key_id, c.digest, nextval('issued_seq'), 1
    FROM claimed c
)
SELECT 0::int8 AS ord, false AS fallback, c.seq, c.key_id, c.key_json, true AS changed,
       c.user_id, c.device_id, c.algorithm, c.digest,
       CASE WHEN $5 THEN
           (SELECT h.seq FROM otk h
             WHERE h.user_id = $1 AND h.device_id = $2 AND h.algorithm = $3 AND h.seq >= $4
             ORDER BY h.seq, h.key_id
             LIMIT 1)
       END AS head
  FROM claimed c
"#;

/// Hands out fallback keys for many targets in one statement (R12.2).
///
/// Parameters: `$1..$4` the targets (user IDs, device IDs, algorithms,
/// whether to mark the key used; a (device, algorithm) may repeat), `$5`
/// the channel, `$6` the instance ID, `$7` whether to send the
/// notifications in the statement. Targets are grouped by (device,
/// algorithm), so a key is read, locked and marked once however often it
/// is named (marked if any of its targets says so). Rows: the answered
/// keys, `ord` (the 1-based indexes of the group's targets), `key_id`,
/// `key_json`, `digest`; then `user_id` and `device_id` of each key newly
/// marked used (`ord` NULL); then the notification row (all NULL).
///
/// Keys are answered from the statement's snapshot and marked as in
/// [`CLAIM`] ([`lock_fallbacks_cte`]): a key marked is the key answered.
/// As in [`CLAIM`], every table access is an index scan under `LATERAL` or
/// a TID scan.
pub(crate) const CLAIM_FALLBACKS: &str = concat!(
    r#"
WITH t AS MATERIALIZED (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[])
        WITH ORDINALITY AS t(user_id, device_id, algorithm, mark, ord)
),
g AS MATERIALIZED (
    SELECT user_id, device_id, algorithm, bool_or(mark) AS mark, array_agg(ord) AS ord
    FROM t GROUP BY user_id, device_id, algorithm
),
fb_seen AS MATERIALIZED (
    SELECT g.ord, g.mark,
           f.user_id, f.device_id, f.algorithm, f.key_id, f.key_json, f.digest, f.used
    FROM g CROSS JOIN LATERAL (
        SELECT * FROM fallback f
        WHERE f.user_id = g.user_id AND f.device_id = g.device_id
          AND f.algorithm = g.algorithm
        LIMIT 1
    ) f
),
"#,
    lock_fallbacks_cte!(),
    r#"
changed AS (
    SELECT user_id, device_id FROM fb_marked
),
"#,
    notified_cte!("$5", "$6", "$7"),
    r#"
SELECT s.ord, s.key_id, s.key_json, s.digest, NULL AS user_id, NULL AS device_id
  FROM fb_seen s
UNION ALL
SELECT NULL, NULL, NULL, NULL, m.user_id, m.device_id FROM fb_marked m
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL FROM notified
"#
);

/// One claim of a batch: its targets (core clamped their counts, R8.3, and
/// left out those of 0) and whether it falls back to the fallback key
/// (R4.4; not for the one-time step of a split claim, R12.1).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClaimRequest<'a> {
    /// The targets, in request order.
    pub(crate) targets: &'a [ClaimTarget],
    /// Whether a target without OTKs gets the fallback key.
    pub(crate) fall_back: bool,
}

/// A target of one claim of a batch, as a share of its merged target.
#[derive(Debug)]
struct Claimant {
    /// The claim's index in the batch.
    claim: usize,
    /// The target's index in the claim.
    target: usize,
    count: usize,
    fall_back: bool,
}

/// The targets of a batch of claims merged by (device, algorithm), in byte
/// order of user, device and algorithm: the order in which
/// [`CLAIM_WAITING`] locks. Each merged target asks for the sum of its
/// claimants' counts; its keys go to the claimants in arrival order (the
/// batch's claims in order, a claim's targets in request order), oldest
/// first, so that each gets what it would have got had they run one after
/// another (R4.2, R4.5).
#[derive(Debug, Default)]
struct Merged<'a> {
    users: Vec<&'a str>,
    devices: Vec<&'a str>,
    algorithms: Vec<&'a str>,
    counts: Vec<i32>,
    /// The fallback threshold: a merged target reads (and marks) its
    /// fallback key when it got at most this many OTKs, which is when a
    /// claimant that falls back gets none; -1 when none falls back.
    fb_at: Vec<i32>,
    claimants: Vec<Vec<Claimant>>,
}

impl<'a> Merged<'a> {
    fn new(claims: &[ClaimRequest<'a>]) -> Self {
        type Key<'k> = (&'k str, &'k str, &'k str);
        let mut by_target: BTreeMap<Key<'a>, Vec<Claimant>> = BTreeMap::new();
        for (c, claim) in claims.iter().enumerate() {
            for (i, t) in claim.targets.iter().enumerate() {
                let key = (
                    t.device.user_id.as_str(),
                    t.device.device_id.as_str(),
                    t.algorithm.as_str(),
                );
                by_target.entry(key).or_default().push(Claimant {
                    claim: c,
                    target: i,
                    count: usize::try_from(t.count).unwrap_or(usize::MAX),
                    fall_back: claim.fall_back,
                });
            }
        }
        let mut merged = Merged::default();
        for ((user, device, algorithm), claimants) in by_target {
            let mut before: usize = 0;
            let mut fb_at: i64 = -1;
            for c in &claimants {
                if c.fall_back {
                    fb_at = fb_at.max(i64::try_from(before).unwrap_or(i64::MAX));
                }
                before = before.saturating_add(c.count);
            }
            merged.users.push(user);
            merged.devices.push(device);
            merged.algorithms.push(algorithm);
            merged
                .counts
                .push(i32::try_from(before).unwrap_or(i32::MAX));
            merged.fb_at.push(i32::try_from(fb_at).unwrap_or(i32::MAX));
            merged.claimants.push(claimants);
        }
        merged
    }
}

/// What one merged target got from the statement.
#[derive(Debug, Default)]
struct Got {
    /// OTKs with their sequence values.
    otks: Vec<(i64, ClaimedKey)>,
    fallback: Option<ClaimedKey>,
    /// Whether the statement marked the fallback key used.
    marked: bool,
    /// Why a key of the target did not decode (R10.7): its claims fail.
    corrupt: Option<String>,
}

/// Claims keys for one claim (see the module docs), falling back to the
/// fallback key when `fall_back` is set (R4.4) and never otherwise (R12.1).
/// The answer lists each target's keys together, in target order.
pub(crate) async fn claim(
    client: &mut Conn,
    sql: &Sql,
    limits: &Limits,
    targets: &[ClaimTarget],
    fall_back: bool,
) -> Result<ClaimOutcome> {
    let request = ClaimRequest { targets, fall_back };
    claim_many(client, sql, limits, &[request])
        .await?
        .pop()
        .unwrap_or_else(|| Err(corrupt("claim answer", "no answer")))
}

/// Claims keys for a batch of claims in one statement: [`CLAIM_FAST`] (or
/// [`CLAIM_ONE`] for a lone single-key target) when every target finds all
/// the keys it asks for, else [`CLAIM`] after it
/// (and [`CLAIM_WAITING`] after that when [`CLAIM`] met keys locked by
/// others, see the module docs); each statement that does not apply
/// applies nothing. Each claim's
/// targets merged with those of the other claims of the same (device,
/// algorithm) ([`Merged`]). `Err` when the statement failed: then nothing
/// was applied. Else one answer per claim, in order: its keys (each
/// target's keys together, in target order) and the devices it changed, or
/// an error when one of its keys did not decode (its keys were taken all
/// the same; the other claims are answered).
pub(crate) async fn claim_many(
    client: &mut Conn,
    sql: &Sql,
    limits: &Limits,
    claims: &[ClaimRequest<'_>],
) -> Result<Vec<Result<ClaimOutcome>>> {
    let merged = Merged::new(claims);
    let remembered = remembered(limits);
    // Every key the fast statement takes is remembered (R3.4) only when no
    // target asks for more than are remembered.
    let fast =
        !sql.transactional_notify && merged.counts.iter().all(|&n| i64::from(n) <= remembered);
    // Each statement in turn until one applies: a statement that does not
    // apply applied nothing. [`CLAIM`] does not apply when a target came
    // away short while keys it skipped were still stored; the waiting
    // statement then waits for them (R4.3), and always applies.
    let one = fast && merged.counts == [1];
    let statements: &[Statement] = if one {
        &[Statement::ONE, Statement::FULL, Statement::WAITING]
    } else if fast {
        &[Statement::FAST, Statement::FULL, Statement::WAITING]
    } else {
        &[Statement::FULL, Statement::WAITING]
    };
    let mut answer = None;
    for &statement in statements {
        let run = ClaimRun {
            statement,
            merged: &merged,
            sql,
            remembered,
        };
        answer = run.execute(client).await?;
        if answer.is_some() {
            break;
        }
        if statement.sql == CLAIM {
            tracing::debug!("claim contended; waiting for locked keys");
        }
    }
    let rows = answer.ok_or_else(|| corrupt("claim answer", "a waiting claim did not apply"))?;
    let got = decode_claim(&merged, claims, &rows)?;
    Ok(hand_out(&merged, claims, got))
}

/// Per (device, algorithm), a lower bound of the claim order's `seq` of
/// every key the device holds or will hold: the walks of [`CLAIM_FAST`]
/// and [`CLAIM_ONE`] start there (`seq >= lower`) instead of at the head of
/// the device's range of `otk_claim_order`, past the index entries of keys
/// claimed before, which stay in the index until a vacuum removes them. See
/// the module docs ("Where the walks start") for why no key is skipped.
/// Bounded: past [`Heads::MAX`] entries it starts again empty (a bound is
/// only a shortcut).
#[derive(Debug, Default)]
pub(crate) struct Heads(std::sync::Mutex<HashMap<String, Head>>);

/// What [`Heads`] keeps of a (device, algorithm).
#[derive(Debug, Clone, Copy)]
struct Head {
    /// The bound.
    lower: i64,
    /// Lone claims since the bound was last read.
    since: u32,
}

impl Heads {
    /// The most (device, algorithm) pairs remembered.
    const MAX: usize = 4_096;
    /// A lone claim reads the bound of its device once in this many.
    const LONE_READ_EVERY: u32 = 16;

    /// The map's key of a (device, algorithm), written into `key`.
    fn key_into<'k>(key: &'k mut String, user: &str, device: &str, algorithm: &str) -> &'k str {
        key.clear();
        // IDs hold no U+0000 (R2.8).
        for part in [user, "\0", device, "\0", algorithm] {
            key.push_str(part);
        }
        key
    }

    fn key(user: &str, device: &str, algorithm: &str) -> String {
        let mut key = String::new();
        Self::key_into(&mut key, user, device, algorithm);
        key
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Head>> {
        // A panic while holding the lock left a valid map behind.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The bounds of a batch's targets (`i64::MIN` where none is known),
    /// under one lock.
    fn lowers(&self, users: &[&str], devices: &[&str], algorithms: &[&str]) -> Vec<i64> {
        let map = self.map();
        let mut key = String::new();
        users
            .iter()
            .zip(devices)
            .zip(algorithms)
            .map(|((user, device), algorithm)| {
                map.get(Self::key_into(&mut key, user, device, algorithm))
                    .map_or(i64::MIN, |head| head.lower)
            })
            .collect()
    }

    /// The bound of a (device, algorithm): `i64::MIN` when none is known.
    #[cfg(test)]
    fn lower(&self, user: &str, device: &str, algorithm: &str) -> i64 {
        self.lowers(&[user], &[device], &[algorithm])[0]
    }

    /// The bound of a (device, algorithm) for a lone claim, and whether
    /// that claim is to read the next one: when none is known, and once in
    /// [`Heads::LONE_READ_EVERY`] lone claims.
    fn lower_for_lone(&self, user: &str, device: &str, algorithm: &str) -> (i64, bool) {
        match self.map().get_mut(&Self::key(user, device, algorithm)) {
            Some(head) => {
                head.since = head.since.wrapping_add(1);
                (head.lower, head.since % Self::LONE_READ_EVERY == 0)
            }
            None => (i64::MIN, true),
        }
    }

    /// Raises the bound of each (device, algorithm) to its `seq`: the claim
    /// order value of its first key in a statement's snapshot. One lock.
    fn raise<'r>(&self, bounds: impl IntoIterator<Item = (&'r str, &'r str, &'r str, i64)>) {
        let mut bounds = bounds.into_iter().peekable();
        if bounds.peek().is_none() {
            return;
        }
        let mut map = self.map();
        for (user, device, algorithm, seq) in bounds {
            if map.len() >= Self::MAX {
                map.clear();
            }
            let head = map
                .entry(Self::key(user, device, algorithm))
                .or_insert(Head {
                    lower: seq,
                    since: 0,
                });
            head.lower = head.lower.max(seq);
        }
    }
}

/// A claim statement: [`CLAIM_ONE`] takes the one target's IDs, its walk's
/// lower bound and whether to read the next, as scalars; [`CLAIM_FAST`] the
/// targets, their walks' lower bounds and whether to read their next;
/// [`CLAIM`] and [`CLAIM_WAITING`] the targets and the store's values.
#[derive(Clone, Copy)]
struct Statement {
    sql: &'static str,
}

impl Statement {
    /// [`CLAIM_ONE`].
    const ONE: Statement = Statement { sql: CLAIM_ONE };
    /// [`CLAIM_FAST`].
    const FAST: Statement = Statement { sql: CLAIM_FAST };
    /// [`CLAIM`].
    const FULL: Statement = Statement { sql: CLAIM };
    /// [`CLAIM_WAITING`].
    const WAITING: Statement = Statement { sql: CLAIM_WAITING };
}

/// One run of a claim statement.
struct ClaimRun<'a> {
    statement: Statement,
    merged: &'a Merged<'a>,
    sql: &'a Sql,
    remembered: i64,
}

impl ClaimRun<'_> {
    /// Runs the statement, its own transaction, one round trip. `None`
    /// when it answered that it did nothing (-3, or no row from
    /// [`CLAIM_ONE`]).
    async fn execute(&self, client: &mut Conn) -> Result<Option<Vec<tokio_postgres::Row>>> {
        let op = "claim";
        let m = self.merged;
        let heads = &self.sql.heads;
        if self.statement.sql == CLAIM_ONE {
            let (Some(user), Some(device), Some(algorithm)) =
                (m.users.first(), m.devices.first(), m.algorithms.first())
            else {
                return Ok(None);
            };
            let (lower, read) = heads.lower_for_lone(user, device, algorithm);
            let params: [&(dyn ToSql + Sync); 5] = [user, device, algorithm, &lower, &read];
            let rows = client
                .query_alone(CLAIM_ONE, &params)
                .await
                .map_err(pg(op))?;
            // No row: no key it could lock, nothing done.
            if let Some(Ok(Some(head))) = rows.first().map(|row| row.try_get::<_, Option<i64>>(10))
            {
                heads.raise([(*user, *device, *algorithm, head)]);
            }
            return Ok((!rows.is_empty()).then_some(rows));
        }
        let rows = if self.statement.sql == CLAIM_FAST {
            let lowers = heads.lowers(&m.users, &m.devices, &m.algorithms);
            // A device's head is worth reading when it is claimed often:
            // several keys of it in one batch (a big room's claim of many
            // devices, one key each, reads none).
            let probes: Vec<bool> = m.counts.iter().map(|&n| n > 1).collect();
            let params: [&(dyn ToSql + Sync); 6] = [
                &m.users,
                &m.devices,
                &m.algorithms,
                &m.counts,
                &lowers,
                &probes,
            ];
            client
                .query_alone(CLAIM_FAST, &params)
                .await
                .map_err(pg(op))?
        } else {
            let params: [&(dyn ToSql + Sync); 9] = [
                &m.users,
                &m.devices,
                &m.algorithms,
                &m.counts,
                &self.remembered,
                &self.sql.channel,
                &self.sql.instance,
                &self.sql.transactional_notify,
                &m.fb_at,
            ];
            client
                .query_alone(self.statement.sql, &params)
                .await
                .map_err(pg(op))?
        };
        let contended = rows
            .iter()
            .any(|row| matches!(row.try_get::<_, i64>(0), Ok(-3)));
        if contended {
            return Ok(None);
        }
        heads.raise(rows.iter().filter_map(|row| {
            match (
                row.try_get::<_, i64>(0),
                row.try_get::<_, i64>(2),
                row.try_get::<_, &str>(6),
                row.try_get::<_, &str>(7),
                row.try_get::<_, &str>(8),
            ) {
                (Ok(-4), Ok(seq), Ok(user), Ok(device), Ok(algorithm)) => {
                    Some((user, device, algorithm, seq))
                }
                _ => None,
            }
        }));
        Ok(Some(rows))
    }
}

/// Decodes one claim statement's rows into what each merged target got. A
/// key that does not decode fails its target's claims only.
fn decode_claim(
    merged: &Merged<'_>,
    claims: &[ClaimRequest<'_>],
    rows: &[tokio_postgres::Row],
) -> Result<Vec<Got>> {
    let op = "claim";
    // (user, device, algorithm) -> merged target (unique there).
    let by_target: HashMap<(&str, &str, &str), usize> = (0..merged.users.len())
        .map(|i| {
            (
                (merged.users[i], merged.devices[i], merged.algorithms[i]),
                i,
            )
        })
        .collect();
    let mut got: Vec<Got> = std::iter::repeat_with(Got::default)
        .take(merged.users.len())
        .collect();
    for row in rows {
        let ord: i64 = row.try_get(0).map_err(pg(op))?;
        if ord == -1 || ord == -4 {
            continue; // the notification row, or a device's head
        }
        let position = if ord == 0 || ord == -2 {
            let user: &str = row.try_get(6).map_err(pg(op))?;
            let device: &str = row.try_get(7).map_err(pg(op))?;
            let algorithm: &str = row.try_get(8).map_err(pg(op))?;
            by_target.get(&(user, device, algorithm)).copied()
        } else {
            usize::try_from(ord - 1).ok()
        };
        let (m, device) = position
            .and_then(|m| {
                let first = merged.claimants.get(m)?.first()?;
                let target = claims.get(first.claim)?.targets.get(first.target)?;
                Some((m, &target.device))
            })
            .ok_or_else(|| corrupt("claim answer", format!("no target {ord}")))?;
        let slot = &mut got[m];
        if ord == -2 {
            // A fallback key marked used; it is answered by its own row.
            slot.marked = true;
            continue;
        }
        let fallback: bool = row.try_get(1).map_err(pg(op))?;
        let seq: i64 = row.try_get(2).map_err(pg(op))?;
        match decode_key(row, device, fallback) {
            Ok(key) if fallback => slot.fallback = Some(key),
            Ok(key) => slot.otks.push((seq, key)),
            Err(e) => slot.corrupt = Some(e.to_string()),
        }
    }
    Ok(got)
}

/// The key of one row of a claim statement.
fn decode_key(row: &tokio_postgres::Row, device: &Device, fallback: bool) -> Result<ClaimedKey> {
    let op = "claim";
    let key_id = decode::key_id(row.try_get::<_, &str>(3).map_err(pg(op))?)?;
    // The store wrote this text itself, canonical, with its digest (upload
    // and import store `KeyJson::canonical` and `digest`): no need to
    // parse, canonicalize and hash it again for every key.
    let key_json = decode::key_json_with_digest(
        row.try_get::<_, &str>(4).map_err(pg(op))?,
        decode::digest(row.try_get(9).map_err(pg(op))?)?,
    )?;
    Ok(ClaimedKey {
        device: device.clone(),
        key_id,
        key_json,
        fallback,
    })
}

/// Hands each merged target's keys to its claimants in arrival order,
/// oldest first (R4.2); a claimant that falls back and got no OTK gets the
/// fallback key (R4.4, R4.5), and the first of them reports it marked.
fn hand_out(
    merged: &Merged<'_>,
    claims: &[ClaimRequest<'_>],
    got: Vec<Got>,
) -> Vec<Result<ClaimOutcome>> {
    let mut keys: Vec<Vec<(usize, ClaimedKey)>> = claims.iter().map(|_| Vec::new()).collect();
    let mut changed: Vec<Vec<Device>> = claims.iter().map(|_| Vec::new()).collect();
    let mut failed: Vec<Option<String>> = claims.iter().map(|_| None).collect();
    for (claimants, got) in merged.claimants.iter().zip(got) {
        let Got {
            mut otks,
            fallback,
            mut marked,
            corrupt: bad,
        } = got;
        otks.sort_by(|a, b| (a.0, &a.1.key_id).cmp(&(b.0, &b.1.key_id)));
        let mut otks = otks.into_iter().map(|(_, key)| key);
        for c in claimants {
            if let Some(why) = &bad {
                failed[c.claim] = Some(why.clone());
                continue;
            }
            let before = keys[c.claim].len();
            keys[c.claim].extend(otks.by_ref().take(c.count).map(|key| (c.target, key)));
            let device = &claims[c.claim].targets[c.target].device;
            if keys[c.claim].len() > before {
                changed[c.claim].push(device.clone());
            } else if let Some(key) = fallback.as_ref().filter(|_| c.fall_back) {
                keys[c.claim].push((c.target, key.clone()));
                if std::mem::take(&mut marked) {
                    changed[c.claim].push(device.clone());
                }
            }
        }
    }
    keys.into_iter()
        .zip(changed)
        .zip(failed)
        .map(|((mut keys, changed), failed)| {
            if let Some(why) = failed {
                return Err(corrupt("claim answer", why));
            }
            // Stable: a target's keys keep their claim order.
            keys.sort_by_key(|(target, _)| *target);
            tracing::debug!(issued = keys.len(), changed = changed.len(), "claim done");
            Ok(ClaimOutcome {
                keys: keys.into_iter().map(|(_, key)| key).collect(),
                changes: Changes::from_devices(changed),
            })
        })
        .collect()
}

/// Hands out the targets' fallback keys in one statement ([`CLAIM_FALLBACKS`]),
/// in target order.
pub(crate) async fn claim_fallback_keys(
    client: &mut Conn,
    sql: &Sql,
    targets: &[FallbackTarget],
) -> Result<ClaimOutcome> {
    let op = "claim_fallback_keys";
    let users: Vec<&str> = targets.iter().map(|t| t.device.user_id.as_str()).collect();
    let devices: Vec<&str> = targets
        .iter()
        .map(|t| t.device.device_id.as_str())
        .collect();
    let algorithms: Vec<&str> = targets.iter().map(|t| t.algorithm.as_str()).collect();
    let marks: Vec<bool> = targets.iter().map(|t| t.mark_used).collect();
    let rows = client
        .query_alone(
            CLAIM_FALLBACKS,
            &[
                &users,
                &devices,
                &algorithms,
                &marks,
                &sql.channel,
                &sql.instance,
                &sql.transactional_notify,
            ],
        )
        .await
        .map_err(pg(op))?;
    let mut keys: Vec<(usize, ClaimedKey)> = Vec::new();
    let mut changed: Vec<Device> = Vec::new();
    for row in &rows {
        let Some(ords) = row.try_get::<_, Option<Vec<i64>>>(0).map_err(pg(op))? else {
            // A key marked used, or the notification row (no user).
            if let Some(user) = row.try_get::<_, Option<&str>>(4).map_err(pg(op))? {
                let device = row.try_get::<_, &str>(5).map_err(pg(op))?;
                changed.push(decode::device(user, device)?);
            }
            continue;
        };
        let key_id = decode::key_id(row.try_get::<_, &str>(1).map_err(pg(op))?)?;
        let key_json = decode::key_json_with_digest(
            row.try_get::<_, &str>(2).map_err(pg(op))?,
            decode::digest(row.try_get(3).map_err(pg(op))?)?,
        )?;
        for ord in ords {
            let (index, target) = usize::try_from(ord - 1)
                .ok()
                .and_then(|i| targets.get(i).map(|t| (i, t)))
                .ok_or_else(|| corrupt("fallback claim answer", format!("no target {ord}")))?;
            keys.push((
                index,
                ClaimedKey {
                    device: target.device.clone(),
                    key_id: key_id.clone(),
                    key_json: key_json.clone(),
                    fallback: true,
                },
            ));
        }
    }
    keys.sort_by_key(|(index, _)| *index);
    tracing::debug!(
        answered = keys.len(),
        changed = changed.len(),
        "fallback claim done"
    );
    Ok(ClaimOutcome {
        keys: keys.into_iter().map(|(_, key)| key).collect(),
        changes: Changes::from_devices(changed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::plans::check_generic_plans;

    /// Every OTK row lock of `plan` is taken by a walk through the claim
    /// order index itself, never by a sort of a device's keys read in
    /// another order: such a sort reads and orders all of the device's
    /// keys for every claim (R4.7). (Fallback keys are locked through their
    /// primary key, one row per target.)
    fn assert_walks_in_claim_order(plan: &str) {
        let lines: Vec<&str> = plan.lines().collect();
        let mut walks = 0;
        for (i, line) in lines.iter().enumerate() {
            if line.contains("LockRows") {
                let below = lines.get(i + 1).copied().unwrap_or_default();
                if below.contains("Index Scan using otk_claim_order on otk") {
                    walks += 1;
                } else {
                    assert!(
                        below.contains("Index Scan using fallback_pkey on fallback"),
                        "{plan}"
                    );
                }
            }
        }
        assert!(walks > 0, "{plan}");
    }

    /// [`CLAIM_FAST`]'s generic plan reaches every table through an index
    /// per target or through the deleted rows' `ctid`s, whether or not
    /// sequential scans are allowed: a claim's cost grows with its targets
    /// only (R4.7), never with the store.
    #[test]
    fn fast_claim_plan_walks_each_target_through_the_claim_order_index() {
        check_generic_plans(
            "claim::fast_plan",
            &format!("fast(text[], text[], text[], int4[], int8[], bool[]) AS {CLAIM_FAST}"),
            "EXECUTE fast('{@u1:x,@u2:x}', '{D,D}', '{alg,alg}', '{1,2}', '{0,5}', '{false,true}')",
            |plan| {
                assert!(
                    plan.contains("Index Scan using otk_claim_order on otk"),
                    "{plan}"
                );
                assert_walks_in_claim_order(plan);
                assert!(plan.contains("Tid Scan on otk"), "{plan}");
                // No join that reads a whole side: the one aggregate
                // groups the keys deleted, for their count rows (R6.2).
                assert!(
                    !plan.contains("Seq Scan")
                        && !plan.contains("Merge")
                        && plan
                            .lines()
                            .all(|l| !l.contains("Hash") || l.contains("HashAggregate")),
                    "{plan}"
                );
            },
        );
    }

    /// A device's bound only rises; a lone claim reads the next one when
    /// none is known and once in [`Heads::LONE_READ_EVERY`]; past
    /// [`Heads::MAX`] devices the bounds start again empty.
    #[test]
    fn walk_bounds_rise_and_are_read_now_and_then() {
        let heads = Heads::default();
        assert_eq!(heads.lower("@u:x", "D", "alg"), i64::MIN);
        assert_eq!(heads.lower_for_lone("@u:x", "D", "alg"), (i64::MIN, true));
        heads.raise([("@u:x", "D", "alg", 10)]);
        heads.raise([("@u:x", "D", "alg", 7)]);
        assert_eq!(heads.lower("@u:x", "D", "alg"), 10);
        assert_eq!(heads.lower("@u:x", "D", "other"), i64::MIN);
        let reads: Vec<bool> = (0..2 * Heads::LONE_READ_EVERY)
            .map(|_| heads.lower_for_lone("@u:x", "D", "alg").1)
            .collect();
        assert_eq!(reads.iter().filter(|read| **read).count(), 2);
        for i in 0..Heads::MAX {
            heads.raise([("@v:x", format!("D{i}").as_str(), "alg", 1)]);
        }
        assert_eq!(heads.lower("@u:x", "D", "alg"), i64::MIN);
    }

    /// [`CLAIM_ONE`] walks its target's keys through the claim order index
    /// and deletes the one it locked by its `ctid`.
    #[test]
    fn one_key_claim_plan_walks_the_claim_order_index() {
        check_generic_plans(
            "claim::one_plan",
            &format!("one(text, text, text, int8, bool) AS {CLAIM_ONE}"),
            "EXECUTE one('@u1:x', 'D', 'alg', 0, true)",
            |plan| {
                assert_walks_in_claim_order(plan);
                assert!(plan.contains("Tid Scan on otk"), "{plan}");
                assert!(
                    !plan.contains("Seq Scan") && !plan.contains("Hash") && !plan.contains("Merge"),
                    "{plan}"
                );
            },
        );
    }

    /// [`CLAIM`] and [`CLAIM_WAITING`] walk each target's keys through the
    /// claim order index too, skipping locked keys or waiting for them.
    #[test]
    fn full_claim_plans_walk_each_target_through_the_claim_order_index() {
        for (name, statement, lock) in [
            ("claim::full_plan", CLAIM, "SKIP LOCKED"),
            ("claim::waiting_plan", CLAIM_WAITING, "FOR UPDATE"),
        ] {
            check_generic_plans(
                name,
                &format!(
                    "walk(text[], text[], text[], int4[], int8, text, text, bool, int4[]) AS {statement}"
                ),
                "EXECUTE walk('{@u1:x,@u2:x}', '{D,D}', '{alg,alg}', '{1,2}', \
                 1000, 'chan', 'me', false, '{0,0}')",
                |plan| {
                    assert_walks_in_claim_order(plan);
                    assert!(!plan.contains("Seq Scan"), "{plan}");
                },
            );
            assert!(statement.contains(lock));
        }
    }
}
