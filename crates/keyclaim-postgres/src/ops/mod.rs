//! The operations, one module per kind: SQL as constants (prepared and
//! cached per connection with `prepare_cached`, never built per call) and
//! the code that runs them. Each takes a pooled connection; the store
//! ([`crate::PostgresStore`]) hands it one and announces the changes.
//!
//! - [`upload`](mod@upload): uploads, under the device's advisory lock, and
//!   device replacements (a deletion and an upload in one transaction).
//! - [`claim`](mod@claim): the one-statement claim and why it is correct across
//!   connections; the split claims' two steps.
//! - [`read`](mod@read): counts and sync state, of one device or many;
//!   fallback keys.
//! - [`delete`](mod@delete): device and user deletion, key resets.
//! - [`transfer`](mod@transfer): export and import of device snapshots.
//!
//! This module holds what several of them share: the per-store [`Sql`]
//! values, the advisory locks, the notification statement and payloads.

/// The keys of the device `$1`, `$2` with the IDs `$3`: for each ID, at
/// most one row (`probe`: the key's `ctid`, `key_id` and `digest`), found
/// by one descent of the primary key. The probe walks the primary key in
/// its own order (`key_id >=`, `ORDER BY key_id`, `LIMIT 1`) so that no
/// other index can serve it without a sort, which the session's
/// `enable_sort = off` rules out: a plain `key_id = ANY($3)` lets a generic
/// plan read the device whole through `otk_claim_order` (and compare
/// each of its keys with every ID) when the statistics say a device holds
/// about one key (see `session::PLANNER_SETTINGS`).
macro_rules! key_probe {
    () => {
        r#"
    SELECT probe.*
      FROM unnest($3::text[]) AS wanted(key_id)
      CROSS JOIN LATERAL (
          SELECT ctid AS row_ctid, key_id, digest FROM otk
           WHERE user_id = $1 AND device_id = $2 AND key_id >= wanted.key_id
           ORDER BY key_id
           LIMIT 1
      ) probe
     WHERE probe.key_id = wanted.key_id"#
    };
}

mod claim;
mod delete;
mod read;
mod transfer;
mod upload;

pub(crate) use claim::{ClaimRequest, claim, claim_fallback_keys, claim_many};
pub(crate) use delete::{delete_device, delete_user, reset_one_time_keys};
pub(crate) use read::{counts_many, fallback_keys, sync_state};
pub(crate) use transfer::{export_devices, import_device};
pub(crate) use upload::{replace_device, upload};

use keyclaim::{Device, Limits};

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
    /// Where the claim walks of this store's devices start.
    pub(crate) heads: std::sync::Arc<claim::Heads>,
}

impl Sql {
    pub(crate) fn new(schema: &str, instance: String, transactional_notify: bool) -> Self {
        Self {
            schema: schema.to_owned(),
            channel: channel_name(schema),
            instance,
            transactional_notify,
            heads: std::sync::Arc::default(),
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

/// Replaces (or adds) fallback keys, unused (R5.1).
const UPSERT_FALLBACKS: &str = "
INSERT INTO fallback (user_id, device_id, algorithm, key_id, key_json, digest, used)
SELECT $1, $2, u.algorithm, u.key_id, u.key_json, u.digest, u.used
  FROM unnest($3::text[], $4::text[], $5::text[], $6::bytea[], $7::bool[])
       AS u(algorithm, key_id, key_json, digest, used)
ON CONFLICT (user_id, device_id, algorithm) DO UPDATE
   SET key_id = EXCLUDED.key_id, key_json = EXCLUDED.key_json,
       digest = EXCLUDED.digest, used = EXCLUDED.used";

/// Sends notification payloads: inside a mutation's transaction (so that
/// they go out only if it commits) with transactional notifications, else
/// from the [`crate::listen::Announcer`] in batches after commits.
pub(crate) const NOTIFY: &str = "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p";

/// [`NOTIFY`] as the [`crate::listen::Announcer`] sends it, in a transaction
/// of its own after the changes committed: with `synchronous_commit` off
/// for that transaction alone, so that the announcement (which changes no
/// data, and which a crash loses anyway with the listeners' connections)
/// does not wait for a WAL flush of its own beside the claims' flushes. It
/// is delivered at commit all the same.
pub(crate) const ANNOUNCE: &str =
    "SELECT pg_notify($1, p), set_config('synchronous_commit', 'off', true)
    FROM unnest($2::text[]) AS p";

/// The largest notification payload we build (PostgreSQL's limit is 8000).
const MAX_PAYLOAD: usize = 7000;

/// Notification payloads announcing `devices`: `<instance> <JSON array of
/// [user ID, device ID]>`, split so that each stays under the server's
/// limit. The same format as the [`claim::CLAIM`] statement builds in SQL.
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

/// `Limits::remembered_issued_keys` (R3.4) as a statement parameter.
fn remembered(limits: &Limits) -> i64 {
    i64::try_from(limits.remembered_issued_keys).unwrap_or(i64::MAX)
}

// Typed forms of core's decoders, for columns read as `&str`.

/// A count or sequence value read from the database as a `u64`.
fn count_to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// A statement's generic plans in a store of many devices, for the tests
/// that check that a statement reaches every table through an index.
#[cfg(test)]
pub(crate) mod plans {
    #![allow(clippy::expect_used)]

    use crate::{PostgresOptions, PostgresStore};
    use keyclaim_testing::postgres::{unique_schema, with_server};

    /// The table shapes the plans are checked under, as (devices, keys per
    /// device): many devices of a few keys, and few devices of one key
    /// each. Under the second, the statistics say a device holds about one
    /// key, so that the planner finds a sort of a device's keys as cheap as
    /// walking them in order, and reading a device whole as cheap as looking
    /// up a few of its keys (as it does in a store whose device IDs are
    /// unique: it takes a device's user and device ID as independent).
    const SHAPES: [(u32, u32); 2] = [(20_000, 3), (200, 1)];

    /// For each of [`SHAPES`], fills a new store's tables with its devices
    /// and keys (and a fallback key, used on every second device), prepares
    /// `statement` as `prepared` (`name(types) AS`), and gives the plan of
    /// `execute` (`EXECUTE name(...)`) to `check` with sequential scans off
    /// and on, under the store's pinned generic plans and its session
    /// settings, after checking that the plan is not JIT-compiled.
    pub(crate) fn check_generic_plans(
        name: &str,
        prepared: &str,
        execute: &'static str,
        check: fn(&str),
    ) {
        let prepared = prepared.to_owned();
        with_server(name, move |url| async move {
            let store = PostgresStore::connect_with(
                &url,
                PostgresOptions::new()
                    .schema(unique_schema("kc_plan"))
                    .pool_size(1)
                    .allow_unsafe_server(true),
            )
            .await
            .expect("connect");
            let conn = store.client("test").await.expect("client");
            let client = conn.raw();
            client
                .batch_execute(&format!("PREPARE {prepared}"))
                .await
                .expect("prepare");
            for (devices, keys) in SHAPES {
                client
                    .batch_execute(&format!(
                        "TRUNCATE otk, fallback;
                         SET keyclaim.counted = off;
                         INSERT INTO otk SELECT '@u' || i || ':x', 'D', 'alg:K' || j, 'alg', j, '\"k\"', '\\x00'
                           FROM generate_series(1, {devices}) i, generate_series(1, {keys}) j;
                         INSERT INTO fallback SELECT '@u' || i || ':x', 'D', 'alg', 'alg:F', '\"f\"', '\\x00', i % 2 = 0
                           FROM generate_series(1, {devices}) i;
                         SET keyclaim.counted = on;
                         ANALYZE otk; ANALYZE otk_count; ANALYZE fallback;"
                    ))
                    .await
                    .expect("fill");
                for seqscan in ["off", "on"] {
                    client
                        .batch_execute(&format!(
                            "SET plan_cache_mode = force_generic_plan; SET enable_seqscan = {seqscan}"
                        ))
                        .await
                        .expect("settings");
                    // With costs: EXPLAIN tells of JIT only then.
                    let plan: Vec<String> = client
                        .query(&format!("EXPLAIN {execute}"), &[])
                        .await
                        .expect("explain")
                        .iter()
                        .map(|row| row.get(0))
                        .collect();
                    let plan = plan.join("\n");
                    // Not compiled (the session's `jit = off`): the cost
                    // of a statement that must sort is above the JIT
                    // threshold once sorts are off.
                    assert!(!plan.contains("JIT"), "{plan}");
                    check(&plan);
                }
            }
        });
    }
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
