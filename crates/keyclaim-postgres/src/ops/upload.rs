//! Uploads (R3.1, R3.2, R3.4, R8.1), which also prune the issued memory
//! (R3.4, see [`PRUNE_ISSUED`]).
//!
//! An upload takes a transaction-scoped advisory lock on its device (and a
//! shared one on its user, which a user deletion takes exclusively; see
//! [`LOCK_DEVICE`]), so uploads of one device, and deletions and imports of
//! it, run one after another; then reads everything [`plan_upload`] needs
//! in one statement (one snapshot: a concurrent claim is seen either before
//! or after, never half), plans, and applies the plan in the same
//! transaction, pipelined. The primary key `(user_id, device_id, key_id)` backs the
//! conflict rule up. The per-(device, algorithm) limit holds under
//! concurrent uploads because they are serialized and claims only lower the
//! count. When the cap counts per device (R8.4), the facts hold the counts
//! of every algorithm of the device.
//!
//! A device replacement (R14.1) is the same transaction with a device
//! deletion in front: it locks the previous device and the upload's device
//! (in byte order of their IDs, so that two replacements cannot deadlock),
//! deletes the previous device with [`DeviceDeletion`] (as
//! [`delete_device`](super::delete_device) does), then reads the facts,
//! plans and applies the upload as above. The facts statement runs after
//! the deletion, so a replacement of the upload's own device plans against
//! an empty device. When [`plan_upload`] refuses the upload, the
//! transaction is dropped: rolled back, the previous device untouched.

use deadpool_postgres::Transaction;
use futures::TryFutureExt;
use keyclaim::backend::{DeviceFacts, decode, plan_upload};
use keyclaim::{
    Algorithm, Changes, Device, DeviceId, KeyId, Limits, Result, Upload, UploadOutcome,
};
use tokio_postgres::Statement;
use tokio_postgres::types::ToSql;

use super::delete::DeviceDeletion;
use super::read::{SYNC_STATE, decode_sync_state};
use super::{
    LOCK_DEVICE, NOTIFY, Sql, UPSERT_FALLBACKS, count_to_u64, notify_payloads, remembered,
};
use crate::counts::insert_added_counts;
use crate::error::pg;
use crate::session::Conn;

/// Everything [`plan_upload`] needs, in one snapshot: stored OTKs among the
/// uploaded key IDs; remembered issued keys among them, i.e. among the
/// newest `$7` issued keys of each uploaded algorithm (R3.4: older rows
/// count as forgotten until [`PRUNE_ISSUED`] removes them); OTK counts of
/// the uploaded algorithms (`$4`, distinct) or, when `$6` is set, of every
/// algorithm of the device (R8.4); stored fallback digests of the uploaded
/// fallback algorithms. Every branch is an index scan of the device's own
/// rows; the stored OTKs are found by [`key_probe`], one descent of the
/// primary key per uploaded ID. The counts sum the device's `otk_count`
/// rows (see [`crate::counts`]), a few per algorithm, instead of counting
/// its keys, as reads do; they were written in the same statements as the
/// keys, so they are the counts of this snapshot.
///
/// The remembered keys (up to `$7` per algorithm, 1,000 by default) are
/// matched against the uploaded key IDs through a hash of those IDs (a
/// hashed subplan: the `IS TRUE` keeps the planner from turning the `IN`
/// into a join whose shape a generic plan would guess). `= ANY($3)` would
/// compare every remembered key with every uploaded ID: 100,000 text
/// comparisons for an upload of 100 keys, 2.6 ms of server time against
/// 0.6 ms with the hash, measured at 1,000 remembered keys.
const UPLOAD_FACTS: &str = concat!(
    "
SELECT 0::int2 AS kind, k.key_id, NULL::text AS algorithm, k.digest, 0::int8 AS n
  FROM (",
    key_probe!(),
    "
  ) k
UNION ALL
SELECT 1::int2, i.key_id, NULL::text, i.digest, 0::int8
  FROM unnest($4::text[]) AS a(algorithm)
  CROSS JOIN LATERAL (
      SELECT key_id, digest FROM issued
       WHERE user_id = $1 AND device_id = $2 AND algorithm = a.algorithm
       ORDER BY issued_txn DESC, issued_pos DESC
       LIMIT $7
  ) i
 WHERE (i.key_id IN (SELECT unnest($3::text[]))) IS TRUE
UNION ALL
SELECT 2::int2, NULL::text, algorithm, NULL::bytea, sum(n)::int8
  FROM otk_count WHERE user_id = $1 AND device_id = $2 AND ($6::bool OR algorithm = ANY($4::text[]))
  GROUP BY algorithm
UNION ALL
SELECT 3::int2, NULL::text, algorithm, digest, 0::int8
  FROM fallback WHERE user_id = $1 AND device_id = $2 AND algorithm = ANY($5::text[])"
);

/// Removes the issued keys of the device's algorithms `$3` older than the
/// newest `$4` (R3.4: forgotten already, see [`UPLOAD_FACTS`]). Claims add
/// to the memory and never prune it, so uploads do: a (device, algorithm)
/// holds at most the remembered number plus the keys issued since its last
/// upload, which are at most the keys stored then (R8.1). Only uploads,
/// deletions and imports of the device, serialized by its lock, delete
/// these rows; claims only insert newer ones.
const PRUNE_ISSUED: &str = "
DELETE FROM issued WHERE ctid = ANY (ARRAY(
    SELECT old.row_ctid
      FROM unnest($3::text[]) AS a(algorithm)
      CROSS JOIN LATERAL (
          SELECT ctid AS row_ctid FROM issued
           WHERE user_id = $1 AND device_id = $2 AND algorithm = a.algorithm
           ORDER BY issued_txn DESC, issued_pos DESC
           OFFSET $4
      ) old))";

/// New OTKs of one upload, all at one new sequence value (R3.5): the
/// uncorrelated subquery is evaluated once per statement. Counted in the
/// same statement (R6.2, see [`crate::counts::V4`]).
const INSERT_OTKS: &str = concat!(
    "
WITH added AS (
    INSERT INTO otk (user_id, device_id, key_id, algorithm, seq, key_json, digest)
    SELECT $1, $2, u.key_id, u.algorithm, (SELECT nextval('otk_seq')), u.key_json, u.digest
      FROM unnest($3::text[], $4::text[], $5::text[], $6::bytea[]) AS u(key_id, algorithm, key_json, digest)
    RETURNING algorithm
)
",
    insert_added_counts!()
);

/// Stores an upload (see the module docs).
pub(crate) async fn upload(
    client: &mut Conn,
    sql: &Sql,
    limits: &Limits,
    upload: &Upload,
) -> Result<UploadOutcome> {
    let op = "upload";
    let device = upload.device();
    let tx = client.transaction().await.map_err(pg(op))?;
    let (lock, facts_stmt) = futures::try_join!(
        tx.prepare_cached(LOCK_DEVICE),
        tx.prepare_cached(UPLOAD_FACTS)
    )
    .map_err(pg(op))?;
    let facts = FactsQuery::new(upload, limits);
    let device_params: [&(dyn ToSql + Sync); 2] =
        [&device.user_id.as_str(), &device.device_id.as_str()];
    let (_, facts) = futures::try_join!(
        tx.execute(&lock, &device_params).map_err(pg(op)),
        facts.read(&tx, &facts_stmt, op)
    )?;
    let outcome = apply(&tx, sql, limits, upload, &facts, Vec::new(), op).await?;
    tx.commit().await.map_err(pg(op))?;
    tracing::debug!(%device, changed = !outcome.changes.is_empty(), "upload stored");
    Ok(outcome)
}

/// Removes the `previous` device of the upload's user and stores the upload,
/// in one transaction (R14.1; see the module docs).
pub(crate) async fn replace_device(
    client: &mut Conn,
    sql: &Sql,
    limits: &Limits,
    previous: Option<&DeviceId>,
    upload: &Upload,
) -> Result<UploadOutcome> {
    let op = "replace_device";
    let device = upload.device();
    let user_id = device.user_id.as_str();
    let tx = client.transaction().await.map_err(pg(op))?;
    let (lock, deletion, facts_stmt) = futures::try_join!(
        tx.prepare_cached(LOCK_DEVICE).map_err(pg(op)),
        DeviceDeletion::prepare(&tx, op),
        tx.prepare_cached(UPLOAD_FACTS).map_err(pg(op))
    )?;
    let mut locked: Vec<&str> = previous
        .map(DeviceId::as_str)
        .into_iter()
        .chain([device.device_id.as_str()])
        .collect();
    locked.sort_unstable();
    locked.dedup();
    let locks = futures::future::try_join_all(
        locked
            .iter()
            .map(|device_id| tx.execute_raw(&lock, [user_id, *device_id])),
    )
    .map_err(pg(op));
    let delete = async {
        match previous {
            Some(previous) => deletion.run(&tx, user_id, previous.as_str(), op).await,
            None => Ok(false),
        }
    };
    let facts = FactsQuery::new(upload, limits);
    // Pipelined in this order: the locks, the deletion, then the facts.
    let (_, removed, facts) = futures::try_join!(locks, delete, facts.read(&tx, &facts_stmt, op))?;
    let mut changed = Vec::new();
    if let (Some(previous), true) = (previous, removed) {
        changed.push(Device::new(device.user_id.clone(), previous.clone()));
    }
    let outcome = apply(&tx, sql, limits, upload, &facts, changed, op).await?;
    tx.commit().await.map_err(pg(op))?;
    tracing::debug!(%device, previous = previous.map(DeviceId::as_str), "device replaced");
    Ok(outcome)
}

/// The parameters of [`UPLOAD_FACTS`] for one upload.
struct FactsQuery<'u> {
    device: &'u Device,
    key_ids: Vec<&'u str>,
    algorithms: Vec<&'u str>,
    fallback_algorithms: Vec<&'u str>,
    all_counts: bool,
    remembered: i64,
}

impl<'u> FactsQuery<'u> {
    fn new(upload: &'u Upload, limits: &Limits) -> Self {
        Self {
            device: upload.device(),
            key_ids: upload.one_time_keys().keys().map(KeyId::as_str).collect(),
            algorithms: otk_algorithms(upload),
            fallback_algorithms: upload
                .fallback_keys()
                .keys()
                .map(Algorithm::as_str)
                .collect(),
            all_counts: DeviceFacts::needs_all_counts(limits),
            remembered: remembered(limits),
        }
    }

    /// Reads the facts. The statement is sent when the future is first
    /// polled, so that it pipelines behind the statements polled before it.
    async fn read(
        &self,
        tx: &Transaction<'_>,
        stmt: &Statement,
        op: &'static str,
    ) -> Result<DeviceFacts> {
        let params: [&(dyn ToSql + Sync); 7] = [
            &self.device.user_id.as_str(),
            &self.device.device_id.as_str(),
            &self.key_ids,
            &self.algorithms,
            &self.fallback_algorithms,
            &self.all_counts,
            &self.remembered,
        ];
        let rows = tx.query(stmt, &params).await.map_err(pg(op))?;
        let mut facts = DeviceFacts::default();
        for row in rows {
            let kind: i16 = row.try_get(0).map_err(pg(op))?;
            match kind {
                0 | 1 => {
                    let key_id = decode::key_id(row.try_get::<_, &str>(1).map_err(pg(op))?)?;
                    let digest = decode::digest(row.try_get(3).map_err(pg(op))?)?;
                    if kind == 0 {
                        facts.stored_otks.insert(key_id, digest);
                    } else {
                        facts.issued.insert((key_id, digest));
                    }
                }
                2 => {
                    let algorithm = decode::algorithm(row.try_get::<_, &str>(2).map_err(pg(op))?)?;
                    facts
                        .otk_counts
                        .insert(algorithm, count_to_u64(row.try_get(4).map_err(pg(op))?));
                }
                _ => {
                    let algorithm = decode::algorithm(row.try_get::<_, &str>(2).map_err(pg(op))?)?;
                    let digest = decode::digest(row.try_get(3).map_err(pg(op))?)?;
                    facts.fallback_digests.insert(algorithm, digest);
                }
            }
        }
        Ok(facts)
    }
}

/// The distinct algorithms of an upload's OTKs. The keys are in key ID
/// order, in which the IDs of one algorithm (`<algorithm>:` and a name) are
/// adjacent.
fn otk_algorithms(upload: &Upload) -> Vec<&str> {
    let mut algorithms: Vec<&str> = upload
        .one_time_keys()
        .keys()
        .map(KeyId::algorithm_str)
        .collect();
    algorithms.dedup();
    algorithms
}

/// Plans the upload against `facts` and applies the plan in `tx`, pipelined
/// with the pruning of the issued memory ([`PRUNE_ISSUED`]), the counts
/// after it and, with transactional notifications, the
/// notification of `changed` plus the upload's device when it stored
/// anything. Does not commit: on a rule violation the caller drops the
/// transaction (rolled back, nothing applied).
async fn apply(
    tx: &Transaction<'_>,
    sql: &Sql,
    limits: &Limits,
    upload: &Upload,
    facts: &DeviceFacts,
    mut changed: Vec<Device>,
    op: &'static str,
) -> Result<UploadOutcome> {
    let device = upload.device();
    let user_id = device.user_id.as_str();
    let device_id = device.device_id.as_str();
    let plan = plan_upload(upload, facts, limits)?;
    if !plan.is_noop() {
        changed.push(device.clone());
    }
    let changes = Changes::from_devices(changed);

    let (insert_stmt, upsert_stmt, notify_stmt, state_stmt, prune_stmt) = futures::try_join!(
        tx.prepare_cached(INSERT_OTKS),
        tx.prepare_cached(UPSERT_FALLBACKS),
        tx.prepare_cached(NOTIFY),
        tx.prepare_cached(SYNC_STATE),
        tx.prepare_cached(PRUNE_ISSUED)
    )
    .map_err(pg(op))?;
    let prune_algs = otk_algorithms(upload);
    let remembered = remembered(limits);
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

    let payloads = if sql.transactional_notify {
        notify_payloads(&sql.instance, changes.devices())
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
    let prune = async {
        if prune_algs.is_empty() {
            return Ok(0);
        }
        tx.execute(
            &prune_stmt,
            &[&user_id, &device_id, &prune_algs, &remembered],
        )
        .await
    };
    let device_params: [&(dyn ToSql + Sync); 2] = [&user_id, &device_id];
    let state = tx.query(&state_stmt, &device_params);
    let (_, _, _, _, state_rows) =
        futures::try_join!(insert, upsert, notify, prune, state).map_err(pg(op))?;
    let counts = decode_sync_state(op, state_rows)?.one_time_key_counts;
    Ok(UploadOutcome { counts, changes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::plans::check_generic_plans;

    /// [`UPLOAD_FACTS`]' generic plan matches the remembered keys against
    /// the uploaded key IDs through a hashed subplan, not by comparing each
    /// with every ID (R3.4 at 1,000 remembered keys and uploads of up to
    /// 1,000 keys), and reaches every table through an index.
    #[test]
    fn upload_facts_match_remembered_keys_through_a_hash() {
        check_generic_plans(
            "upload::facts_plan",
            &format!("facts(text, text, text[], text[], text[], bool, int8) AS {UPLOAD_FACTS}"),
            "EXECUTE facts('@u1:x', 'D', '{alg:K1,alg:K9}', '{alg}', '{alg}', false, 1000)",
            |plan| {
                assert!(plan.contains("hashed SubPlan"), "{plan}");
                // The uploaded IDs are looked up among the device's keys,
                // not matched against all of them.
                assert!(plan.contains("Index Scan using otk_pkey on otk"), "{plan}");
                assert!(!plan.contains("otk_claim_order"), "{plan}");
                assert!(
                    plan.contains("Index Scan Backward using issued_pkey on issued"),
                    "{plan}"
                );
                assert!(!plan.contains("Seq Scan"), "{plan}");
            },
        );
    }
}
