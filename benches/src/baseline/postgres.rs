//! The PostgreSQL baseline: the reference homeserver's bulk-claim statement
//! on tables of its own. **Not for production use**: it under-issues.
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

/// The reference homeserver's bulk claim on tables of its own (see the
/// module docs). Cheap to clone (shared pool).
#[derive(Clone, Debug)]
pub struct PostgresBaseline {
    pool: Pool,
    schema: String,
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
        let invalid = |what: String| Error::storage(NAME, "connect", false, what);
        let valid_schema = schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && schema.bytes().next().is_some_and(|b| !b.is_ascii_digit());
        if !valid_schema {
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
        NAME
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
        let target = [ClaimTarget::one(device.clone(), algorithm.clone())];
        Ok(self.claim(&target).await?.into_iter().next())
    }

    /// Claims every target in one [`BASELINE_CLAIM`] statement. Returns the
    /// keys it got; fewer than asked while keys remain is the under-issue
    /// this baseline exists to show.
    async fn claim(&self, targets: &[ClaimTarget]) -> Result<Vec<ClaimedKey>> {
        let op = "claim";
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
