//! The PostgreSQL baselines: the reference homeserver's bulk-claim
//! statement on tables of its own (**not for production use**: it
//! under-issues), and PostgreSQL's own ceiling for single claims, one
//! claim per transaction with a row lock ([`PostgresBaseline::connect_row_lock`]).
//!
//! The reference homeserver claims one-time keys for many devices with one
//! `DELETE ... WHERE (...) IN (SELECT ... ROW_NUMBER() OVER (PARTITION BY
//! ...) ...) RETURNING` and no row locks ([`BASELINE_CLAIM`]). Two concurrent
//! claimers of one device rank the *same* oldest keys; the second one's
//! `DELETE` waits for the first, then finds those rows gone and deletes
//! nothing in their place, so it comes away short (and hands out the
//! fallback key, or nothing) while the device still holds keys: the
//! under-issue that R4.3 forbids and that keyclaim's `SKIP LOCKED` claim
//! avoids.
//!
//! Only the OTK part is reproduced (the reference homeserver claims
//! fallback keys in a second statement); nothing remembers issued keys.
//! That makes it cheaper per claim than keyclaim's statement, which the
//! benchmark then has to match anyway.
//!
//! The keys live in a schema of the baseline's own, in the reference
//! homeserver's table (`seq`, an identity column in upload order, stands
//! in for its `ts_added_ms`, so that two uploads within one millisecond
//! keep their order):
//!
//! ```sql
//! e2e_one_time_keys_json (seq, user_id, device_id, algorithm, key_id, key_json)
//!     UNIQUE (user_id, device_id, algorithm, key_id)
//!     INDEX (user_id, device_id, algorithm, seq)
//! ```
//!
//! Its connections run with `enable_seqscan=off`, as keyclaim's do (with
//! the server's plain defaults PostgreSQL sometimes chose plans that cut
//! its throughput several-fold, which would flatter keyclaim), and leave
//! the choice between custom and generic plans to PostgreSQL unless asked
//! to pin generic plans as keyclaim does.

use async_trait::async_trait;
use deadpool_postgres::{Manager, Pool, Runtime};
use keyclaim::{Algorithm, ClaimTarget, ClaimedKey, Device, Error, KeyId, KeyJson, Result};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use super::Baseline;

const NAME: &str = "postgres-baseline";
const ROW_LOCK_NAME: &str = "postgres-row-lock";

const SQL_CREATE: &str = create_e2e_one_time_keys_json!("BIGINT GENERATED ALWAYS AS IDENTITY");

/// One upload: parameters user ID, device ID, algorithms, key IDs (without
/// the algorithm), key JSON texts, inserted in their order.
const SQL_UPLOAD: &str = "
INSERT INTO e2e_one_time_keys_json (user_id, device_id, algorithm, key_id, key_json)
SELECT $1, $2, u.algorithm, u.key_id, u.key_json
FROM unnest($3::text[], $4::text[], $5::text[]) WITH ORDINALITY
    AS u(algorithm, key_id, key_json, n)
ORDER BY u.n
ON CONFLICT DO NOTHING";

/// The statement: the reference homeserver's shape (its `VALUES` list of
/// targets written here as `unnest` arrays; claim order by upload sequence
/// as in its MSC4225 version). Parameters: user IDs, device IDs,
/// algorithms, counts. Rows: user ID, device ID, algorithm, key ID (without
/// the algorithm), key JSON.
pub const BASELINE_CLAIM: &str = "
WITH claims(user_id, device_id, algorithm, claim_count) AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[])
), ranked_keys AS (
    SELECT
        user_id, device_id, algorithm, key_id, claim_count,
        ROW_NUMBER() OVER (PARTITION BY (user_id, device_id, algorithm) ORDER BY seq) AS r
    FROM e2e_one_time_keys_json
        JOIN claims USING (user_id, device_id, algorithm)
)
DELETE FROM e2e_one_time_keys_json k
WHERE (user_id, device_id, algorithm, key_id) IN (
    SELECT user_id, device_id, algorithm, key_id
    FROM ranked_keys
    WHERE r <= claim_count
)
RETURNING user_id, device_id, algorithm, key_id, key_json";

/// One claim per transaction: the oldest key of one device, locked with
/// `SKIP LOCKED` so that concurrent claimers of the device take different
/// keys, deleted in the same statement. Parameters: user ID, device ID,
/// algorithm. Row: key ID (without the algorithm), key JSON.
pub const ROW_LOCK_CLAIM: &str = "
DELETE FROM e2e_one_time_keys_json
WHERE user_id = $1 AND device_id = $2 AND algorithm = $3 AND seq = (
    SELECT seq FROM e2e_one_time_keys_json
    WHERE user_id = $1 AND device_id = $2 AND algorithm = $3
    ORDER BY seq
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
RETURNING key_id, key_json";

/// A device's one-time keys of one algorithm. Parameters: user ID, device
/// ID, algorithm.
const SQL_COUNT: &str = "
SELECT count(*) FROM e2e_one_time_keys_json
WHERE user_id = $1 AND device_id = $2 AND algorithm = $3";

/// How a [`PostgresBaseline`] claims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pattern {
    /// [`BASELINE_CLAIM`] for every claim, single ones too.
    Reference,
    /// [`ROW_LOCK_CLAIM`] for each key, one transaction each.
    RowLock,
}

/// The reference homeserver's bulk claim on tables of its own (see the
/// module docs), or with [`PostgresBaseline::connect_row_lock`] one
/// `SKIP LOCKED` claim per transaction. Cheap to clone (shared pool).
#[derive(Clone, Debug)]
pub struct PostgresBaseline {
    pool: Pool,
    schema: String,
    pattern: Pattern,
}

impl PostgresBaseline {
    /// Connects to the server at `url` with up to `pool_size` connections,
    /// and creates the baseline's table in `schema` (created if missing;
    /// lowercase ASCII letters, digits and `_`). With `pinned_plans`, its
    /// connections pin every prepared statement to one generic plan
    /// (`plan_cache_mode=force_generic_plan`), as keyclaim's store does by
    /// default; without, PostgreSQL chooses.
    ///
    /// # Errors
    /// [`Error::Storage`]: an invalid URL or schema name (not retryable),
    /// or the server cannot be reached or refuses the table.
    pub async fn connect(
        url: &str,
        schema: &str,
        pool_size: usize,
        pinned_plans: bool,
    ) -> Result<Self> {
        Self::connect_as(url, schema, pool_size, pinned_plans, Pattern::Reference).await
    }

    /// As [`Self::connect`] (PostgreSQL choosing its plans), but each key
    /// is claimed in a transaction of its own with [`ROW_LOCK_CLAIM`]: what
    /// PostgreSQL does for single claims without the reference homeserver's
    /// bulk statement and without keyclaim's bookkeeping (no fallback keys,
    /// no remembered issued keys, no change events). It never comes away
    /// short while the device has an unlocked key.
    ///
    /// # Errors
    /// As [`Self::connect`].
    pub async fn connect_row_lock(url: &str, schema: &str, pool_size: usize) -> Result<Self> {
        Self::connect_as(url, schema, pool_size, false, Pattern::RowLock).await
    }

    async fn connect_as(
        url: &str,
        schema: &str,
        pool_size: usize,
        pinned_plans: bool,
        pattern: Pattern,
    ) -> Result<Self> {
        let invalid = |what: String| Error::storage(NAME, "connect", false, what);
        if !valid_schema(schema) {
            return Err(invalid(format!("invalid schema name {schema:?}")));
        }
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| Error::storage(NAME, "connect", false, e))?;
        if config.get_application_name().is_none() {
            config.application_name("keyclaim-baseline");
        }
        let mut server_options = config.get_options().unwrap_or_default().to_owned();
        server_options.push_str(&format!(" -c search_path={schema} -c enable_seqscan=off"));
        if pinned_plans {
            server_options.push_str(" -c plan_cache_mode=force_generic_plan");
        }
        config.options(server_options.trim());
        // Recycled connections are checked the fast way (the default).
        let pool = Pool::builder(Manager::new(config, NoTls))
            .max_size(pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| Error::storage(NAME, "connect", false, e))?;
        let this = Self {
            pool,
            schema: schema.to_owned(),
            pattern,
        };
        let client = this.client("connect").await?;
        client
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {schema}; {SQL_CREATE}"
            ))
            .await
            .map_err(pg("connect"))?;
        Ok(this)
    }

    /// The schema the baseline's table lives in.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    async fn client(&self, op: &'static str) -> Result<deadpool_postgres::Object> {
        self.pool
            .get()
            .await
            .map_err(|e| Error::storage(NAME, op, true, e))
    }
}

#[async_trait]
impl Baseline for PostgresBaseline {
    fn name(&self) -> &'static str {
        match self.pattern {
            Pattern::Reference => NAME,
            Pattern::RowLock => ROW_LOCK_NAME,
        }
    }

    async fn upload(&self, device: &Device, keys: &[(KeyId, KeyJson)]) -> Result<()> {
        let op = "upload";
        let algorithms: Vec<&str> = keys.iter().map(|(id, _)| id.algorithm_str()).collect();
        let key_ids: Vec<&str> = keys.iter().map(|(id, _)| id.name()).collect();
        let jsons: Vec<&str> = keys.iter().map(|(_, json)| json.canonical()).collect();
        let client = self.client(op).await?;
        let stmt = client.prepare_cached(SQL_UPLOAD).await.map_err(pg(op))?;
        client
            .execute(
                &stmt,
                &[
                    &device.user_id.as_str(),
                    &device.device_id.as_str(),
                    &algorithms,
                    &key_ids,
                    &jsons,
                ],
            )
            .await
            .map_err(pg(op))?;
        Ok(())
    }

    async fn claim_one(
        &self,
        device: &Device,
        algorithm: &Algorithm,
    ) -> Result<Option<ClaimedKey>> {
        if self.pattern == Pattern::RowLock {
            return self.claim_row_lock(device, algorithm).await;
        }
        let target = [ClaimTarget::one(device.clone(), algorithm.clone())];
        Ok(self.claim(&target).await?.into_iter().next())
    }

    async fn count(&self, device: &Device, algorithm: &Algorithm) -> Result<u64> {
        let op = "count";
        let rows = self.per_device(op, SQL_COUNT, device, algorithm).await?;
        let n: i64 = match rows.first() {
            Some(row) => row.try_get(0).map_err(pg(op))?,
            None => 0,
        };
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Claims every target in one [`BASELINE_CLAIM`] statement (with
    /// [`PostgresBaseline::connect_row_lock`]: key by key, one transaction
    /// each). Returns the keys it got; for the reference statement, fewer
    /// than asked while keys remain is the under-issue this baseline exists
    /// to show.
    async fn claim(&self, targets: &[ClaimTarget]) -> Result<Vec<ClaimedKey>> {
        let op = "claim";
        if self.pattern == Pattern::RowLock {
            return super::claim_key_by_key(self, targets).await;
        }
        let users: Vec<&str> = targets.iter().map(|t| t.device.user_id.as_str()).collect();
        let devices: Vec<&str> = targets
            .iter()
            .map(|t| t.device.device_id.as_str())
            .collect();
        let algorithms: Vec<&str> = targets.iter().map(|t| t.algorithm.as_str()).collect();
        let counts: Vec<i32> = targets
            .iter()
            .map(|t| i32::try_from(t.count).unwrap_or(i32::MAX))
            .collect();
        let client = self.client(op).await?;
        let stmt = client
            .prepare_cached(BASELINE_CLAIM)
            .await
            .map_err(pg(op))?;
        let rows = client
            .query(&stmt, &[&users, &devices, &algorithms, &counts])
            .await
            .map_err(pg(op))?;
        let mut keys = Vec::with_capacity(rows.len());
        for row in rows {
            let column = |i: usize| -> Result<&str> { row.try_get(i).map_err(pg(op)) };
            let device = Device::parse(column(0)?, column(1)?)
                .map_err(|e| Error::corrupt(format!("baseline: stored device: {e}")))?;
            keys.push(super::claimed(
                device,
                &format!("{}:{}", column(2)?, column(3)?),
                column(4)?,
            )?);
        }
        Ok(keys)
    }
}

impl PostgresBaseline {
    /// One [`ROW_LOCK_CLAIM`], in a transaction of its own.
    async fn claim_row_lock(
        &self,
        device: &Device,
        algorithm: &Algorithm,
    ) -> Result<Option<ClaimedKey>> {
        let op = "claim";
        let rows = self
            .per_device(op, ROW_LOCK_CLAIM, device, algorithm)
            .await?;
        rows.first()
            .map(|row| {
                let key_id: &str = row.try_get(0).map_err(pg(op))?;
                let key_json: &str = row.try_get(1).map_err(pg(op))?;
                super::claimed(device.clone(), &format!("{algorithm}:{key_id}"), key_json)
            })
            .transpose()
    }

    /// Runs `sql` with parameters user ID, device ID and algorithm.
    async fn per_device(
        &self,
        op: &'static str,
        sql: &str,
        device: &Device,
        algorithm: &Algorithm,
    ) -> Result<Vec<tokio_postgres::Row>> {
        let client = self.client(op).await?;
        let stmt = client.prepare_cached(sql).await.map_err(pg(op))?;
        client
            .query(
                &stmt,
                &[
                    &device.user_id.as_str(),
                    &device.device_id.as_str(),
                    &algorithm.as_str(),
                ],
            )
            .await
            .map_err(pg(op))
    }
}

/// Drops `schemas` and everything in them (`DROP SCHEMA IF EXISTS ...
/// CASCADE`, one statement) on the server of `url`: what a bench run left
/// in a database it was given. Names are checked as [`PostgresBaseline`]
/// checks its schema's.
///
/// # Errors
/// [`Error::Storage`]: an invalid URL or schema name, or the server
/// cannot be reached or refuses the statement.
pub async fn drop_schemas(url: &str, schemas: &[&str]) -> Result<()> {
    let op = "drop schemas";
    if let Some(bad) = schemas.iter().find(|s| !valid_schema(s)) {
        return Err(Error::storage(
            NAME,
            op,
            false,
            format!("invalid schema name {bad:?}"),
        ));
    }
    if schemas.is_empty() {
        return Ok(());
    }
    let config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| Error::storage(NAME, op, false, e))?;
    let (client, connection) = config.connect(NoTls).await.map_err(pg(op))?;
    let connection = tokio::spawn(connection);
    let dropped = client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            schemas.join(", ")
        ))
        .await
        .map_err(pg(op));
    drop(client);
    let _ = connection.await;
    dropped
}

/// Whether `schema` is a plain lower-case identifier (safe to put into SQL
/// unquoted).
fn valid_schema(schema: &str) -> bool {
    schema
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && schema.bytes().next().is_some_and(|b| !b.is_ascii_digit())
}

/// Maps a PostgreSQL error to [`Error::Storage`], retryable for a
/// serialization failure or a deadlock.
fn pg(op: &'static str) -> impl Fn(tokio_postgres::Error) -> Error {
    move |e| {
        let retryable = e.code().is_some_and(|code| {
            *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED
        });
        Error::storage(NAME, op, retryable, e)
    }
}
