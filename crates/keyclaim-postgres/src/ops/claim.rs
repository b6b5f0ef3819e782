//! Claims (R4.1 to R4.7): the [`CLAIM`] statement and the code that runs
//! it.
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
//!   them (see [`super::upload`]). So a claim touches no older row of the
//!   memory, and claims of one device never meet there.
//! - Duplicate targets (the same device and algorithm twice in one request)
//!   cannot share one statement (a transaction does not skip its own locks),
//!   so they go to further "rounds": statements in one explicit transaction,
//!   each seeing what the previous one took. When one round answers -3,
//!   the transaction rolls back and every round runs again waiting.
//! - With transactional notifications the cross-process notification is
//!   `pg_notify` inside the statement, so it is sent if and only if the
//!   claim commits; by default it is sent after the commit, batched (see
//!   [`crate::listen`]).
//!
//! # The split claim's steps (R12.1, R12.2)
//!
//! Claiming one-time keys only is [`CLAIM`] with its fallback step switched
//! off (`$9`, a one-time filter), so the argument above holds for it
//! unchanged. Handing out fallback keys is [`CLAIM_FALLBACKS`], one
//! statement for all targets that reads, locks and marks fallback keys with
//! the same CTEs as [`CLAIM`], marking only where a target asks.
//!
//! Failure modes: a claim whose statement fails rolls back whole. A claim
//! whose connection dies while the server commits may have consumed keys
//! that nobody received (the error is retryable; retrying claims new keys).

use std::collections::HashMap;

use keyclaim::backend::decode;
use keyclaim::{
    Algorithm, Changes, ClaimOutcome, ClaimTarget, ClaimedKey, Device, FallbackTarget, Limits,
    Result,
};
use tokio_postgres::types::ToSql;

use super::{Sql, remembered};
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

/// The claim statement, with `$lock` the locking clause of the walk over a
/// target's keys and `$detect` whether to look for keys that the walk
/// skipped (see [`CLAIM`] and [`CLAIM_WAITING`]).
macro_rules! claim_statement {
    ($lock:literal, $detect:literal) => {
        concat!(
            r#"
WITH t AS MATERIALIZED (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[])
        WITH ORDINALITY AS t(user_id, device_id, algorithm, n, ord)
),
picked AS MATERIALIZED (
    SELECT t.ord, t.user_id, t.device_id, t.algorithm, t.n, k.row_ctid
    FROM t LEFT JOIN LATERAL (
        SELECT o.ctid AS row_ctid
        FROM otk o
        WHERE o.user_id = t.user_id AND o.device_id = t.device_id
          AND o.algorithm = t.algorithm
        ORDER BY o.seq, o.key_id
        LIMIT t.n
        "#,
            $lock,
            r#"
    ) k ON true
),
contended AS MATERIALIZED (
    SELECT g.ord
    FROM (
        SELECT ord, user_id, device_id, algorithm, n,
               coalesce(array_agg(row_ctid) FILTER (WHERE row_ctid IS NOT NULL), '{}') AS got
        FROM picked
        GROUP BY ord, user_id, device_id, algorithm, n
    ) g
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
    SELECT p.ord, true AS mark,
           f.user_id, f.device_id, f.algorithm, f.key_id, f.key_json, f.digest, f.used
    FROM picked p CROSS JOIN LATERAL (
        SELECT * FROM fallback f
        WHERE f.user_id = p.user_id AND f.device_id = p.device_id
          AND f.algorithm = p.algorithm
        LIMIT 1
    ) f
    WHERE p.row_ctid IS NULL AND $9::bool AND (SELECT ok FROM go)
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
/// the notifications in the statement, `$9` whether to fall back to the
/// fallback key (R4.4; not for R12.1). Rows: `ord` (1-based target index
/// of a fallback key; 0 for an OTK, whose target is found by its user,
/// device and algorithm, unique in a round; -1 for the notification row;
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

/// The targets of a claim split into rounds in which no (device, algorithm)
/// repeats.
#[derive(Debug, Default)]
struct ClaimRounds<'a> {
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
    /// those of 0), each in byte order of user, device and algorithm: the
    /// order in which [`CLAIM_WAITING`] locks.
    fn new(targets: &'a [ClaimTarget]) -> Self {
        let mut rounds: Vec<Round<'a>> = Vec::new();
        let mut seen: HashMap<(&Device, &Algorithm), usize> = HashMap::new();
        let mut order: Vec<(usize, &ClaimTarget)> = targets.iter().enumerate().collect();
        // Stable: the repeats of a target keep their order across rounds.
        order.sort_by_key(|(_, t)| {
            (
                t.device.user_id.as_str(),
                t.device.device_id.as_str(),
                t.algorithm.as_str(),
            )
        });
        for (i, target) in order {
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

/// Claims keys (see the module docs), falling back to the fallback key
/// when `fall_back` is set (R4.4) and never otherwise (R12.1). The answer
/// lists each target's keys together, in target order.
pub(crate) async fn claim(
    client: &mut Conn,
    sql: &Sql,
    limits: &Limits,
    targets: &[ClaimTarget],
    fall_back: bool,
) -> Result<ClaimOutcome> {
    let rounds = ClaimRounds::new(targets);
    let remembered = remembered(limits);
    let run = |statement| ClaimRun {
        statement,
        rounds: &rounds,
        targets,
        sql,
        remembered,
        fall_back,
    };
    let (mut claimed, changed) = match run(CLAIM).execute(client).await? {
        Some(done) => done,
        None => {
            // A target came away short while keys it skipped were still
            // stored: nothing was applied; wait for them (R4.3).
            tracing::debug!("claim contended; waiting for locked keys");
            run(CLAIM_WAITING)
                .execute(client)
                .await?
                .ok_or_else(|| corrupt("claim answer", "a waiting claim did not apply"))?
        }
    };
    claimed.sort_by(|a, b| (a.0, a.1, a.2, &a.3.key_id).cmp(&(b.0, b.1, b.2, &b.3.key_id)));
    let keys: Vec<ClaimedKey> = claimed.into_iter().map(|(_, _, _, key)| key).collect();
    tracing::debug!(issued = keys.len(), changed = changed.len(), "claim done");
    Ok(ClaimOutcome {
        keys,
        changes: Changes::from_devices(changed),
    })
}

/// One run of a claim statement ([`CLAIM`] or [`CLAIM_WAITING`]) over every
/// round of a claim.
struct ClaimRun<'a> {
    statement: &'static str,
    rounds: &'a ClaimRounds<'a>,
    targets: &'a [ClaimTarget],
    sql: &'a Sql,
    remembered: i64,
    fall_back: bool,
}

impl ClaimRun<'_> {
    /// Runs the rounds: one statement in its own transaction, or several
    /// in one. `None` when a statement answered that it did nothing (-3):
    /// then nothing of the claim was applied.
    async fn execute(&self, client: &mut Conn) -> Result<Option<(Vec<Claimed>, Vec<Device>)>> {
        let op = "claim";
        let mut claimed: Vec<Claimed> = Vec::new();
        let mut changed: Vec<Device> = Vec::new();
        if let [round] = self.rounds.rounds.as_slice() {
            // The common case: one statement, its own transaction, one
            // round trip (on keyclaim's own pool).
            let rows = client
                .query_alone(self.statement, &self.params(round))
                .await
                .map_err(pg(op))?;
            if !decode_claim(round, self.targets, rows, &mut claimed, &mut changed)? {
                return Ok(None);
            }
        } else {
            let tx = client.transaction().await.map_err(pg(op))?;
            let stmt = tx.prepare_cached(self.statement).await.map_err(pg(op))?;
            for round in &self.rounds.rounds {
                let rows = tx.query(&stmt, &self.params(round)).await.map_err(pg(op))?;
                if !decode_claim(round, self.targets, rows, &mut claimed, &mut changed)? {
                    // Dropped: rolled back, with what earlier rounds took.
                    return Ok(None);
                }
            }
            tx.commit().await.map_err(pg(op))?;
        }
        Ok(Some((claimed, changed)))
    }

    fn params<'p>(&'p self, round: &'p Round<'_>) -> [&'p (dyn ToSql + Sync); 9] {
        [
            &round.users,
            &round.devices,
            &round.algorithms,
            &round.counts,
            &self.remembered,
            &self.sql.channel,
            &self.sql.instance,
            &self.sql.transactional_notify,
            &self.fall_back,
        ]
    }
}

/// Decodes one claim statement's rows into `claimed` and `changed`;
/// `false` when the statement did nothing (its -3 row).
fn decode_claim(
    round: &Round<'_>,
    targets: &[ClaimTarget],
    rows: Vec<tokio_postgres::Row>,
    claimed: &mut Vec<Claimed>,
    changed: &mut Vec<Device>,
) -> Result<bool> {
    let op = "claim";
    // (user, device, algorithm) -> position in the round (unique there).
    let by_target: HashMap<(&str, &str, &str), usize> = (0..round.index.len())
        .map(|i| ((round.users[i], round.devices[i], round.algorithms[i]), i))
        .collect();
    for row in &rows {
        let ord: i64 = row.try_get(0).map_err(pg(op))?;
        if ord == -1 {
            continue; // the notification row
        }
        if ord == -3 {
            return Ok(false);
        }
        let position = if ord == 0 || ord == -2 {
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
        if ord == -2 {
            // A fallback key marked used; it is answered by its own row.
            changed.push(target.device.clone());
            continue;
        }
        let fallback: bool = row.try_get(1).map_err(pg(op))?;
        let seq: i64 = row.try_get(2).map_err(pg(op))?;
        let key_id = decode::key_id(row.try_get::<_, &str>(3).map_err(pg(op))?)?;
        // The store wrote this text itself, canonical, with its digest
        // (upload and import store `KeyJson::canonical` and `digest`): no
        // need to parse, canonicalize and hash it again for every key.
        let key_json = decode::key_json_with_digest(
            row.try_get::<_, &str>(4).map_err(pg(op))?,
            decode::digest(row.try_get(9).map_err(pg(op))?)?,
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
    Ok(true)
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
