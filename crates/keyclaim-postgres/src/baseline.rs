//! The reference homeserver's bulk-claim statement, on keyclaim's tables,
//! for side-by-side benchmarks. **Not for production use**: it under-issues.
//!
//! The reference homeserver claims one-time keys for many devices with one
//! `DELETE ... WHERE (...) IN (SELECT ... ROW_NUMBER() OVER (PARTITION BY
//! ...) ...) RETURNING` and no row locks ([`BASELINE_CLAIM`]). Two concurrent
//! claimers of one device rank the *same* oldest keys; the second one's
//! `DELETE` waits for the first, then finds those rows gone and deletes
//! nothing in their place, so it comes away short (and hands out the
//! fallback key, or nothing) while the device still holds keys: the
//! under-issue that SPEC R4.3 forbids and that [`crate::PostgresStore`]'s
//! `SKIP LOCKED` claim avoids.
//!
//! Only the OTK part is reproduced (the reference homeserver claims
//! fallback keys in a second statement); no issued-key memory is written.
//! That makes it cheaper per claim than keyclaim's statement, which the
//! benchmark then has to match anyway.

use keyclaim::{ClaimTarget, ClaimedKey, Result};

use crate::PostgresStore;
use crate::error::pg;

/// The statement: the reference homeserver's shape (its `VALUES` list of
/// targets written here as `unnest` arrays; claim order by upload sequence
/// as in its MSC4225 version). Parameters: user IDs, device IDs,
/// algorithms, counts. Rows: user ID, device ID, key ID, key JSON.
pub const BASELINE_CLAIM: &str = "
WITH claims(user_id, device_id, algorithm, claim_count) AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[])
), ranked_keys AS (
    SELECT
        user_id, device_id, algorithm, key_id, claim_count,
        ROW_NUMBER() OVER (PARTITION BY (user_id, device_id, algorithm) ORDER BY seq, key_id) AS r
    FROM otk
        JOIN claims USING (user_id, device_id, algorithm)
)
DELETE FROM otk k
WHERE (user_id, device_id, algorithm, key_id) IN (
    SELECT user_id, device_id, algorithm, key_id
    FROM ranked_keys
    WHERE r <= claim_count
)
RETURNING user_id, device_id, key_id, key_json";

/// Claims OTKs the reference homeserver's way, through `store`'s pool and
/// tables. Returns the keys it got (never fallback keys); fewer than asked
/// while keys remain is the under-issue this module exists to show.
///
/// # Errors
/// [`keyclaim::Error::Storage`].
pub async fn claim(store: &PostgresStore, targets: &[ClaimTarget]) -> Result<Vec<ClaimedKey>> {
    let op = "baseline_claim";
    let users: Vec<&str> = targets.iter().map(|t| t.device.user_id.as_str()).collect();
    let devices: Vec<&str> = targets
        .iter()
        .map(|t| t.device.device_id.as_str())
        .collect();
    let algorithms: Vec<&str> = targets.iter().map(|t| t.algorithm.as_str()).collect();
    let counts: Vec<i32> = targets
        .iter()
        .map(|t| {
            i32::try_from(keyclaim::KeyStore::limits(store).clamp_count(t.count))
                .unwrap_or(i32::MAX)
        })
        .collect();
    let client = store.client(op).await?;
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
        let user: &str = row.try_get(0).map_err(pg(op))?;
        let device: &str = row.try_get(1).map_err(pg(op))?;
        let key_id: &str = row.try_get(2).map_err(pg(op))?;
        let key_json: &str = row.try_get(3).map_err(pg(op))?;
        keys.push(ClaimedKey {
            device: keyclaim::Device::parse(user, device)
                .map_err(|e| crate::error::corrupt("stored device", e))?,
            key_id: keyclaim::KeyId::parse(key_id)
                .map_err(|e| crate::error::corrupt("stored key ID", e))?,
            key_json: keyclaim::KeyJson::from_json_str(key_json)
                .map_err(|e| crate::error::corrupt("stored key JSON", e))?,
            fallback: false,
        });
    }
    Ok(keys)
}
