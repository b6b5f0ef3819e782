//! Deletions (R7.1, R7.2) and key resets (R13.1).
//!
//! A deletion takes the advisory locks uploads and imports take
//! ([`LOCK_DEVICE`]; a user deletion [`LOCK_USER`], the user's lock,
//! exclusively), then delete the OTKs in one statement (which waits for
//! claims holding some of them) and the fallback keys and issued memory in
//! a later one, whose snapshot includes the issued keys those claims
//! remembered. A claim running meanwhile skips the OTKs being deleted and
//! waits on the fallback row, then finds it gone: it is served as if after
//! the deletion. Lock waits between a deletion and claims of several
//! devices of the same user can, rarely, end in a deadlock that PostgreSQL
//! breaks by failing one of them: a retryable error, nothing applied.
//!
//! A key reset takes the device's lock too (so that it is ordered with the
//! device's uploads) and deletes the OTKs in scope in one statement; it
//! writes nothing into the issued memory (R13.1). Claims treat the keys it
//! deletes as deletions' keys: skipped, being on their way out.

use deadpool_postgres::Transaction;
use futures::TryFutureExt;
use keyclaim::backend::decode;
use keyclaim::{Changes, Device, KeyId, ResetScope, Result, UploadOutcome, UserId};
use tokio_postgres::Statement;
use tokio_postgres::types::ToSql;

use super::read::{SYNC_STATE, decode_sync_state};
use super::{LOCK_DEVICE, LOCK_USER, NOTIFY, Sql, notify_payloads};
use crate::counts::{count_deleted, insert_deleted_counts};
use crate::error::pg;
use crate::session::Conn;

/// A device's OTKs, counted (R6.2, [`count_deleted`]). Affects one count
/// row per algorithm it deleted keys of: none when it deleted nothing.
pub(super) const DELETE_DEVICE_OTKS: &str = concat!(
    "WITH gone AS (
    DELETE FROM otk WHERE user_id = $1 AND device_id = $2
    RETURNING user_id, device_id, algorithm
) ",
    insert_deleted_counts!("gone")
);

/// Runs after [`DELETE_DEVICE_OTKS`], in a later snapshot: it also removes
/// the issued memory written by claims that held the device's keys while
/// the OTKs were being deleted.
pub(super) const DELETE_DEVICE_REST: &str = "
WITH f AS (DELETE FROM fallback WHERE user_id = $1 AND device_id = $2 RETURNING 1),
     i AS (DELETE FROM issued WHERE user_id = $1 AND device_id = $2 RETURNING 1)
SELECT (SELECT count(*) FROM f) + (SELECT count(*) FROM i)";

/// The OTKs of a device with the listed key IDs (R13.1), each found by
/// its own probe of the primary key ([`key_probe`]), counted (R6.2).
/// Affects one count row per algorithm it deleted keys of.
const RESET_LISTED_OTKS: &str = concat!(
    "WITH gone AS (
    DELETE FROM otk WHERE ctid = ANY (ARRAY(SELECT row_ctid FROM (",
    key_probe!(),
    ") k))
    RETURNING user_id, device_id, algorithm
) ",
    insert_deleted_counts!("gone")
);

/// A user's OTKs, counted (R6.2); rows: the devices that had some.
const DELETE_USER_OTKS: &str = concat!(
    "
WITH d AS (DELETE FROM otk WHERE user_id = $1 RETURNING user_id, device_id, algorithm), ",
    count_deleted!("d"),
    "
SELECT DISTINCT device_id FROM d"
);

const DELETE_USER_REST: &str = "
WITH f AS (DELETE FROM fallback WHERE user_id = $1 RETURNING device_id),
     i AS (DELETE FROM issued WHERE user_id = $1 RETURNING device_id)
SELECT device_id FROM f UNION SELECT device_id FROM i";

/// The statements that remove a device's state (R7.1), prepared: see
/// [`DELETE_DEVICE_REST`] for why two. Shared by [`delete_device`] and the
/// device replacement (R14.1).
pub(super) struct DeviceDeletion {
    otks: Statement,
    rest: Statement,
}

impl DeviceDeletion {
    pub(super) async fn prepare(tx: &Transaction<'_>, op: &'static str) -> Result<Self> {
        let (otks, rest) = futures::try_join!(
            tx.prepare_cached(DELETE_DEVICE_OTKS),
            tx.prepare_cached(DELETE_DEVICE_REST)
        )
        .map_err(pg(op))?;
        Ok(Self { otks, rest })
    }

    /// Removes the device's state; answers whether it held anything. The
    /// caller holds the device's lock ([`LOCK_DEVICE`]) or sent it just
    /// before: both statements are sent when the future is first polled.
    pub(super) async fn run(
        &self,
        tx: &Transaction<'_>,
        user_id: &str,
        device_id: &str,
        op: &'static str,
    ) -> Result<bool> {
        let params: [&(dyn ToSql + Sync); 2] = [&user_id, &device_id];
        let (removed_otks, rest_row) = futures::try_join!(
            tx.execute(&self.otks, &params),
            tx.query_one(&self.rest, &params)
        )
        .map_err(pg(op))?;
        let removed_rest: i64 = rest_row.try_get(0).map_err(pg(op))?;
        Ok(removed_otks > 0 || removed_rest > 0)
    }
}

/// Removes a device's state (R7.1).
pub(crate) async fn delete_device(
    client: &mut Conn,
    sql: &Sql,
    device: &Device,
) -> Result<Changes> {
    let op = "delete_device";
    let user_id = device.user_id.as_str();
    let device_id = device.device_id.as_str();
    let tx = client.transaction().await.map_err(pg(op))?;
    let (lock, deletion, notify) = futures::try_join!(
        tx.prepare_cached(LOCK_DEVICE).map_err(pg(op)),
        DeviceDeletion::prepare(&tx, op),
        tx.prepare_cached(NOTIFY).map_err(pg(op))
    )?;
    let params: [&(dyn ToSql + Sync); 2] = [&user_id, &device_id];
    let (_, removed) = futures::try_join!(
        tx.execute(&lock, &params).map_err(pg(op)),
        deletion.run(&tx, user_id, device_id, op)
    )?;
    let changes = if removed {
        Changes::from_devices([device.clone()])
    } else {
        Changes::none()
    };
    commit_notifying(tx, sql, &notify, &changes, op).await?;
    Ok(changes)
}

/// Removes the device's stored OTKs in `scope` (R13.1; see the module
/// docs), answering the counts after.
pub(crate) async fn reset_one_time_keys(
    client: &mut Conn,
    sql: &Sql,
    device: &Device,
    scope: &ResetScope,
) -> Result<UploadOutcome> {
    let op = "reset_one_time_keys";
    let user_id = device.user_id.as_str();
    let device_id = device.device_id.as_str();
    let tx = client.transaction().await.map_err(pg(op))?;
    let (lock, all, listed, state, notify) = futures::try_join!(
        tx.prepare_cached(LOCK_DEVICE),
        tx.prepare_cached(DELETE_DEVICE_OTKS),
        tx.prepare_cached(RESET_LISTED_OTKS),
        tx.prepare_cached(SYNC_STATE),
        tx.prepare_cached(NOTIFY)
    )
    .map_err(pg(op))?;
    let params: [&(dyn ToSql + Sync); 2] = [&user_id, &device_id];
    let remove = async {
        match scope {
            ResetScope::All => tx.execute(&all, &params).await,
            ResetScope::KeyIds(ids) => {
                let ids: Vec<&str> = ids.iter().map(KeyId::as_str).collect();
                tx.execute(&listed, &[&user_id, &device_id, &ids]).await
            }
        }
    };
    // Pipelined: the lock, the deletion, then the counts after it.
    let (_, removed, state_rows) = futures::try_join!(
        tx.execute(&lock, &params),
        remove,
        tx.query(&state, &params)
    )
    .map_err(pg(op))?;
    let counts = decode_sync_state(op, state_rows)?.one_time_key_counts;
    let changes = if removed > 0 {
        Changes::from_devices([device.clone()])
    } else {
        Changes::none()
    };
    commit_notifying(tx, sql, &notify, &changes, op).await?;
    Ok(UploadOutcome { counts, changes })
}

/// Removes the state of every device of a user (R7.2).
pub(crate) async fn delete_user(client: &mut Conn, sql: &Sql, user: &UserId) -> Result<Changes> {
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
        devices.push(decode::device(
            user_id,
            row.try_get::<_, &str>(0).map_err(pg(op))?,
        )?);
    }
    let changes = Changes::from_devices(devices);
    commit_notifying(tx, sql, &notify, &changes, op).await?;
    Ok(changes)
}

/// Commits a deletion, sending its notification inside the transaction
/// first when the store notifies transactionally (R11.2).
async fn commit_notifying(
    tx: Transaction<'_>,
    sql: &Sql,
    notify: &Statement,
    changes: &Changes,
    op: &'static str,
) -> Result<()> {
    if !changes.is_empty() && sql.transactional_notify {
        let payloads = notify_payloads(&sql.instance, changes.devices());
        tx.query(notify, &[&sql.channel, &payloads])
            .await
            .map_err(pg(op))?;
    }
    tx.commit().await.map_err(pg(op))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::plans::check_generic_plans;

    /// [`RESET_LISTED_OTKS`] finds each listed key by one descent of the
    /// primary key and deletes it by its `ctid`: its cost grows with the
    /// IDs listed, never with the device's keys.
    #[test]
    fn reset_looks_up_each_listed_key() {
        check_generic_plans(
            "delete::reset_plan",
            &format!("reset(text, text, text[]) AS {RESET_LISTED_OTKS}"),
            "EXECUTE reset('@u1:x', 'D', '{alg:K1,alg:K9}')",
            |plan| {
                assert!(plan.contains("Index Scan using otk_pkey on otk"), "{plan}");
                assert!(plan.contains("Tid Scan on otk"), "{plan}");
                assert!(!plan.contains("otk_claim_order"), "{plan}");
                assert!(!plan.contains("Seq Scan"), "{plan}");
            },
        );
    }
}
