//! Per-(device, algorithm) OTK counts kept beside the keys (schema versions
//! 3 and 4), so that [`counts_many`](keyclaim::KeyStore::counts_many) reads
//! one short index range per device asked instead of counting its keys
//! (R16.1).
//!
//! # Rows
//!
//! `otk_count` holds rows `(user, device, algorithm, n, delta)`; a device's
//! count of an algorithm is the **sum of `n`** over its rows. Every
//! keyclaim statement that inserts or deletes keys adds, in the same
//! statement, a row per (device, algorithm) it changed: `+k` for `k` keys
//! inserted, `-k` for `k` deleted (`delta = true`; [`count_deleted`] and
//! its like). The writes of any other session (an operator's `psql`, a
//! host's own statements) are counted by a row-level trigger, `+1` or `-1`
//! per key, which keyclaim's sessions switch off ([`V4`]). So a
//! count changes in the same transaction as the keys (R6.2), and no writer
//! ever updates or locks a count row: concurrent claims of one hot device
//! each add their own row instead of queueing on one (the claim itself
//! takes a different key row with `SKIP LOCKED`; a shared counter would
//! serialize the claims' commits).
//!
//! # Compaction
//!
//! Each store folds the delta rows, in the background (every
//! [`PostgresOptions::count_compaction_interval`] after it wrote, and now
//! and then when idle) or when asked ([`PostgresStore::compact_counts`]):
//! one statement deletes every row of up to [`COMPACT_BATCH`] (device,
//! algorithm) pairs that have delta rows and inserts their sum as one row
//! (none when it is zero). Rows added meanwhile are not in the statement's
//! snapshot and stay for the next round. One compaction runs per schema at
//! a time (an advisory lock that a busy round skips rather than waits for).
//! Between rounds a device has its base row plus the few rows written
//! since.
//!
//! # Migration from version 2
//!
//! Without holding up writers for longer than one short lock (R10.9): one
//! transaction creates the table and the triggers (from then on every
//! change adds its rows), then the existing keys are counted in batches of
//! about [`BACKFILL_BATCH`] keys by (user, device) range: each batch, in one
//! statement, deletes the range's count rows and inserts the range's counts
//! from `otk`. Both read one snapshot, so a change committed before it is
//! counted once (in the keys; its delta rows are deleted) and a change
//! committed after it once (its delta rows stay). The version is recorded
//! after the last batch; an interrupted migration starts again at the next
//! connect, and every batch is idempotent.
//!
//! [`PostgresOptions::count_compaction_interval`]: crate::PostgresOptions::count_compaction_interval
//! [`PostgresStore::compact_counts`]: crate::PostgresStore::compact_counts

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deadpool_postgres::ClientWrapper;
use keyclaim::Result;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::error::{self, pg};
use crate::session::{Conn, Connections};

/// The table, its indexes, the trigger function and the triggers (schema
/// version 3). Idempotent, so that an interrupted migration can run it
/// again. The function keeps the `search_path` it was created with, so
/// that a session with another `search_path` (an operator's `psql`, a
/// host's pooled connection) still counts into the store's table.
pub(crate) const V3: &str = r#"
CREATE TABLE IF NOT EXISTS otk_count (
    user_id   text COLLATE "C" NOT NULL,
    device_id text COLLATE "C" NOT NULL,
    algorithm text COLLATE "C" NOT NULL,
    n         bigint NOT NULL,
    delta     boolean NOT NULL
);
CREATE INDEX IF NOT EXISTS otk_count_key ON otk_count (user_id, device_id, algorithm) INCLUDE (n);
CREATE INDEX IF NOT EXISTS otk_count_dirty ON otk_count (user_id, device_id, algorithm) WHERE delta;

CREATE OR REPLACE FUNCTION otk_count_follow() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM otk_count;
        RETURN NULL;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO otk_count (user_id, device_id, algorithm, n, delta)
        SELECT user_id, device_id, algorithm, count(*), true FROM added GROUP BY 1, 2, 3;
    END IF;
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        INSERT INTO otk_count (user_id, device_id, algorithm, n, delta)
        SELECT user_id, device_id, algorithm, -count(*), true FROM gone GROUP BY 1, 2, 3;
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS otk_count_insert ON otk;
DROP TRIGGER IF EXISTS otk_count_delete ON otk;
DROP TRIGGER IF EXISTS otk_count_update ON otk;
DROP TRIGGER IF EXISTS otk_count_truncate ON otk;
CREATE TRIGGER otk_count_insert AFTER INSERT ON otk
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION otk_count_follow();
CREATE TRIGGER otk_count_delete AFTER DELETE ON otk
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION otk_count_follow();
CREATE TRIGGER otk_count_update AFTER UPDATE ON otk
    REFERENCING OLD TABLE AS gone NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION otk_count_follow();
CREATE TRIGGER otk_count_truncate AFTER TRUNCATE ON otk
    FOR EACH STATEMENT EXECUTE FUNCTION otk_count_follow();
"#;

/// Version 4: keyclaim's own statements write their count rows themselves,
/// in the statement that changes the keys (a data-modifying CTE), and the
/// statement-level triggers, whose transition tables copied every changed
/// row (its key JSON too) for each of those statements, give way to one
/// row-level trigger for every other writer (an operator's `psql`, the
/// host's own statements). It adds `+1` or `-1` per key, and only in a
/// session without the setting `keyclaim.counted = on`, which every
/// keyclaim session has (see [`crate::session`]); in keyclaim's sessions
/// its condition is false for each row and nothing is queued. Truncation
/// keeps its statement-level trigger. Idempotent; one short transaction
/// (R10.9).
pub(crate) const V4: &str = r#"
CREATE OR REPLACE FUNCTION otk_count_row() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO otk_count (user_id, device_id, algorithm, n, delta)
        VALUES (NEW.user_id, NEW.device_id, NEW.algorithm, 1, true);
    END IF;
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        INSERT INTO otk_count (user_id, device_id, algorithm, n, delta)
        VALUES (OLD.user_id, OLD.device_id, OLD.algorithm, -1, true);
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS otk_count_insert ON otk;
DROP TRIGGER IF EXISTS otk_count_delete ON otk;
DROP TRIGGER IF EXISTS otk_count_update ON otk;
DROP TRIGGER IF EXISTS otk_count_row ON otk;
CREATE TRIGGER otk_count_row AFTER INSERT OR UPDATE OR DELETE ON otk
    FOR EACH ROW
    WHEN (current_setting('keyclaim.counted', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION otk_count_row();
"#;

/// The `INSERT` with which a keyclaim statement counts the keys it deletes
/// (schema version 4): `$rows` names the statement's `RETURNING` rows
/// (with `user_id`, `device_id`, `algorithm`), one row each. As the
/// statement's last part it affects one row per (device, algorithm) with
/// keys deleted: none when nothing was.
macro_rules! insert_deleted_counts {
    ($rows:literal) => {
        concat!(
            "INSERT INTO otk_count (user_id, device_id, algorithm, n, delta)
    SELECT user_id, device_id, algorithm, -count(*), true FROM ",
            $rows,
            " GROUP BY user_id, device_id, algorithm"
        )
    };
}
pub(crate) use insert_deleted_counts;

/// The `INSERT` with which a keyclaim statement counts the keys it inserts
/// for one device, `$1` and `$2` (schema version 4): `added` names the
/// statement's `RETURNING algorithm` rows, one per key.
macro_rules! insert_added_counts {
    () => {
        "INSERT INTO otk_count (user_id, device_id, algorithm, n, delta)
SELECT $1, $2, algorithm, count(*), true FROM added GROUP BY algorithm"
    };
}
pub(crate) use insert_added_counts;

/// [`insert_deleted_counts`] as a data-modifying CTE named `counted`.
macro_rules! count_deleted {
    ($rows:literal) => {
        concat!(
            "counted AS (\n    ",
            $crate::counts::insert_deleted_counts!($rows),
            "\n)"
        )
    };
}
pub(crate) use count_deleted;

/// (device, algorithm) pairs one compaction statement folds at most.
pub(crate) const COMPACT_BATCH: i64 = 2_000;

/// About how many keys one backfill batch counts.
const BACKFILL_BATCH: i64 = 10_000;

/// One compaction round (see the module docs), in one statement: answers
/// the number of pairs folded, and whether the schema's compaction lock was
/// free (when it was not, nothing was done).
const COMPACT: &str = "
WITH lock AS (
    SELECT pg_try_advisory_xact_lock(hashtextextended('keyclaim/counts/' || current_schema(), 0)) AS held
), dirty AS (
    SELECT DISTINCT c.user_id, c.device_id, c.algorithm
      FROM otk_count c, lock WHERE lock.held AND c.delta
     LIMIT $1
), gone AS (
    DELETE FROM otk_count c USING dirty d
     WHERE c.user_id = d.user_id AND c.device_id = d.device_id AND c.algorithm = d.algorithm
    RETURNING c.user_id, c.device_id, c.algorithm, c.n
), folded AS (
    INSERT INTO otk_count (user_id, device_id, algorithm, n, delta)
    SELECT user_id, device_id, algorithm, sum(n)::int8, false FROM gone
     GROUP BY 1, 2, 3 HAVING sum(n) <> 0
)
SELECT (SELECT count(*) FROM dirty), (SELECT held FROM lock)";

/// The backfill's exclusion of compaction (see [`COMPACT`]'s lock): a
/// compaction folding rows of a range being counted could have its sum
/// counted again.
const BACKFILL_LOCK: &str =
    "SELECT pg_advisory_xact_lock(hashtextextended('keyclaim/counts/' || current_schema(), 0))";

/// The first (user, device) after `($1, $2)` past `$3` keys: the end of a
/// backfill batch that starts at `($1, $2)`.
const BACKFILL_NEXT: &str = "SELECT user_id, device_id FROM otk
    WHERE (user_id, device_id) > ($1, $2) ORDER BY user_id, device_id OFFSET $3 LIMIT 1";

/// One backfill batch, `[($1, $2), ($3, $4))`, in one statement (one
/// snapshot; see the module docs).
const BACKFILL_RANGE: &str = "
WITH gone AS (
    DELETE FROM otk_count
     WHERE (user_id, device_id) >= ($1, $2) AND (user_id, device_id) < ($3, $4)
)
INSERT INTO otk_count (user_id, device_id, algorithm, n, delta)
SELECT user_id, device_id, algorithm, count(*), false FROM otk
 WHERE (user_id, device_id) >= ($1, $2) AND (user_id, device_id) < ($3, $4)
 GROUP BY 1, 2, 3";

/// The last backfill batch, from `($1, $2)` to the end.
const BACKFILL_REST: &str = "
WITH gone AS (
    DELETE FROM otk_count WHERE (user_id, device_id) >= ($1, $2)
)
INSERT INTO otk_count (user_id, device_id, algorithm, n, delta)
SELECT user_id, device_id, algorithm, count(*), false FROM otk
 WHERE (user_id, device_id) >= ($1, $2)
 GROUP BY 1, 2, 3";

/// Counts the keys a version-2 schema holds into `otk_count`, whose table
/// and triggers are in place, batch by batch (see the module docs).
/// Answers the number of batches.
pub(crate) async fn backfill(client: &mut ClientWrapper) -> Result<u64> {
    let op = "migrate";
    // Below every valid ID (R2.1: IDs are not empty).
    let mut from = (String::new(), String::new());
    let mut batches = 0;
    loop {
        let tx = client.transaction().await.map_err(pg(op))?;
        tx.execute(BACKFILL_LOCK, &[]).await.map_err(pg(op))?;
        let next = tx
            .query_opt(BACKFILL_NEXT, &[&from.0, &from.1, &BACKFILL_BATCH])
            .await
            .map_err(pg(op))?;
        batches += 1;
        match next {
            Some(row) => {
                let to: (String, String) = (
                    row.try_get(0).map_err(pg(op))?,
                    row.try_get(1).map_err(pg(op))?,
                );
                tx.execute(BACKFILL_RANGE, &[&from.0, &from.1, &to.0, &to.1])
                    .await
                    .map_err(pg(op))?;
                tx.commit().await.map_err(pg(op))?;
                from = to;
            }
            None => {
                tx.execute(BACKFILL_REST, &[&from.0, &from.1])
                    .await
                    .map_err(pg(op))?;
                tx.commit().await.map_err(pg(op))?;
                return Ok(batches);
            }
        }
    }
}

/// Runs compaction rounds until one folds less than a full batch or finds
/// the schema's compaction busy; answers the pairs folded.
pub(crate) async fn compact(client: &mut Conn) -> Result<u64> {
    let op = "compact_counts";
    let mut folded = 0u64;
    loop {
        let rows = client
            .query_alone(COMPACT, &[&COMPACT_BATCH])
            .await
            .map_err(pg(op))?;
        let row = rows
            .first()
            .ok_or_else(|| error::corrupt("compaction answer", "no row"))?;
        let n: i64 = row.try_get(0).map_err(pg(op))?;
        let held: bool = row.try_get(1).map_err(pg(op))?;
        folded += u64::try_from(n).unwrap_or(0);
        if !held || n < COMPACT_BATCH {
            return Ok(folded);
        }
    }
}

/// Rounds a store runs without having written before it compacts anyway
/// (for delta rows left by workers that stopped).
const IDLE_ROUNDS: u32 = 30;

/// A store's background compaction; stops when dropped.
pub(crate) struct Compactor {
    wrote: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Drop for Compactor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Compactor {
    /// Starts compacting every `interval` after this store wrote (and
    /// every [`IDLE_ROUNDS`] intervals when it did not).
    pub(crate) fn start(connections: Connections, interval: Duration) -> Self {
        // A first round at start: rows left by stopped workers.
        let wrote = Arc::new(AtomicBool::new(true));
        let flag = wrote.clone();
        let span = tracing::debug_span!("keyclaim.postgres.compactor");
        let task = tokio::spawn(
            async move {
                let mut idle = 0;
                loop {
                    tokio::time::sleep(interval).await;
                    if !flag.swap(false, Ordering::Relaxed) && idle < IDLE_ROUNDS {
                        idle += 1;
                        continue;
                    }
                    idle = 0;
                    let round = async {
                        let mut client = connections.get_without_turn("compact_counts").await?;
                        compact(&mut client).await
                    };
                    match round.await {
                        Ok(folded) => tracing::trace!(folded, "count rows folded"),
                        Err(e) => tracing::warn!(error = %e, "count compaction failed; retrying"),
                    }
                }
            }
            .instrument(span),
        );
        Compactor { wrote, task }
    }

    /// Notes that the store wrote (so the next round runs).
    pub(crate) fn wrote(&self) {
        self.wrote.store(true, Ordering::Relaxed);
    }
}
