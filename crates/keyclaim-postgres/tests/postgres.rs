//! PostgreSQL-specific behaviour beyond the conformance suite: migrations
//! with several workers starting at once, refusing a newer schema, change
//! notifications across workers, schema isolation.

// Tests report failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use keyclaim::{
    Changes, ClaimTarget, Device, Error, FallbackTarget, KeyStore, ResetScope, broadcast,
};
use keyclaim_conformance::fixtures::{alg, dev, numbered_otks, otks, put, upload_of};
use keyclaim_postgres::{PostgresStore, SCHEMA_VERSION};
use keyclaim_testing::postgres::{unique_schema, with_server};

use common::{BACK_TO_V2, count_mismatches, options, raw_session, schema_version, with_param};

const SC: &str = "signed_curve25519";

async fn next_event(rx: &mut broadcast::Receiver<Changes>) -> Changes {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an event within 10 s")
        .expect("channel open")
}

/// Reads events until every one of `devices` was in one (each event within
/// 10 s, at most 1,000 events).
async fn events_until(rx: &mut broadcast::Receiver<Changes>, devices: &[&Device]) {
    let mut missing: Vec<&Device> = devices.to_vec();
    for _ in 0..1000 {
        let event = next_event(rx).await;
        missing.retain(|d| !event.contains(d));
        if missing.is_empty() {
            return;
        }
    }
    panic!("no event of {missing:?}");
}

/// Uploads to a marker device (named `marker`, used once) through `by`, and
/// reads `rx` until its event: `rx` has then consumed every earlier event
/// of `by` and every local one.
async fn sync(rx: &mut broadcast::Receiver<Changes>, by: &PostgresStore, marker: &str) {
    let device = dev("@marker:x", marker);
    put(by, &device, otks(SC, &["K"]), vec![]).await;
    events_until(rx, &[&device]).await;
}

/// The test harness's schema names fit this crate's limit.
#[test]
fn test_schema_names_fit_the_limit() {
    assert_eq!(
        keyclaim_testing::postgres::MAX_SCHEMA_LEN,
        keyclaim_postgres::PostgresOptions::MAX_SCHEMA_LEN
    );
}

#[test]
fn workers_starting_at_once_migrate_once() {
    with_server(
        "postgres::workers_starting_at_once_migrate_once",
        |url| async move {
            let schema = unique_schema("kc_mig");
            let connects = (0..8).map(|_| PostgresStore::connect_with(&url, options(&schema)));
            let stores = futures::future::join_all(connects).await;
            let stores: Vec<PostgresStore> = stores
                .into_iter()
                .collect::<Result<_, _>>()
                .expect("every worker connects");
            let a = dev("@a:x", "A");
            put(&stores[0], &a, otks(SC, &["K"]), vec![]).await;
            assert_eq!(
                stores[7].otk_counts(&a).await.expect("counts").get_str(SC),
                1
            );
        },
    );
}

#[test]
fn newer_schema_is_refused() {
    with_server("postgres::newer_schema_is_refused", |url| async move {
        let schema = unique_schema("kc_new");
        let store = PostgresStore::connect_with(&url, options(&schema))
            .await
            .expect("connect");
        drop(store);
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("raw connection");
        tokio::spawn(connection);
        client
            .batch_execute(&format!(
                "UPDATE {schema}.keyclaim_meta SET version = {}",
                SCHEMA_VERSION + 1
            ))
            .await
            .expect("bump the version");
        let err = PostgresStore::connect_with(&url, options(&schema))
            .await
            .expect_err("a newer schema is refused");
        assert!(
            matches!(err, Error::UnsupportedVersion { found, supported, .. }
                if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
            "{err:?}"
        );
    });
}

/// A store in `schema` whose device `a` holds `keys`, `claims` of which
/// were claimed, put back into the version-1 layout; returns a raw
/// connection whose `search_path` is the schema.
async fn version_1_store(
    url: &str,
    schema: &str,
    a: &Device,
    keys: &[(keyclaim::KeyId, keyclaim::KeyJson)],
    claims: usize,
) -> tokio_postgres::Client {
    {
        let store = PostgresStore::connect_with(url, options(schema))
            .await
            .expect("connect");
        put(&store, a, keys.to_vec(), vec![]).await;
        for _ in 0..claims {
            store
                .claim(&[ClaimTarget::one(a.clone(), alg(SC))])
                .await
                .expect("claim");
        }
    }
    let client = raw_session(url, schema).await;
    client
        .batch_execute(&format!(
            "{BACK_TO_V2}
             ALTER TABLE issued DROP CONSTRAINT issued_pkey;
             ALTER TABLE issued ADD PRIMARY KEY (user_id, device_id, key_id, digest);
             CREATE INDEX issued_order ON issued (user_id, device_id, algorithm, issued_txn, issued_pos);
             UPDATE keyclaim_meta SET version = 1;"
        ))
        .await
        .expect("back to version 1");
    client
}

#[test]
fn version_1_schema_migrates_keeping_the_issued_memory() {
    with_server("postgres::version_1_schema_migrates", |url| async move {
        let schema = unique_schema("kc_v1");
        let a = dev("@a:x", "A");
        let keys = numbered_otks(SC, "K", 10);
        let client = version_1_store(&url, &schema, &a, &keys, 3).await;

        let store = PostgresStore::connect_with(&url, options(&schema))
            .await
            .expect("connect migrates");
        let version: i64 = client
            .query_one(&format!("SELECT version FROM {schema}.keyclaim_meta"), &[])
            .await
            .expect("version")
            .get(0);
        assert_eq!(version, SCHEMA_VERSION);
        let indexes: Vec<String> = client
            .query(
                "SELECT indexdef FROM pg_indexes WHERE schemaname = $1 AND tablename = 'issued'",
                &[&schema],
            )
            .await
            .expect("indexes")
            .iter()
            .map(|row| row.get(0))
            .collect();
        assert_eq!(indexes.len(), 1, "{indexes:?}");
        assert!(
            indexes[0].contains("(user_id, device_id, algorithm, issued_txn, issued_pos)"),
            "{indexes:?}"
        );
        // R3.4 across the migration: the three issued keys are not stored again.
        let out = put(&store, &a, keys[..3].to_vec(), vec![]).await;
        assert_eq!(out.counts.get_str(SC), 7);
        // Claims go on in order, and their keys are remembered too.
        let next = store
            .claim(&[ClaimTarget::one(a.clone(), alg(SC))])
            .await
            .expect("claim after migrating");
        assert_eq!(next.keys[0].key_id, keys[3].0);
        let out = put(&store, &a, keys[3..4].to_vec(), vec![]).await;
        assert_eq!(out.counts.get_str(SC), 6);
        // Version 3 on the way: the kept counts are the keys' (R6.2).
        assert_eq!(count_mismatches(&client).await, vec![]);
    });
}

/// R10.9: version 2 on a table with data, three workers starting at once,
/// builds its key concurrently while another session keeps writing (as the claims of workers still running
/// do), recovers from a build interrupted by duplicate positions (an
/// invalid index left behind) by removing the duplicates, and swaps the key
/// in with the version.
#[test]
fn version_2_migration_runs_beside_writers_and_recovers() {
    with_server(
        "postgres::version_2_migration_beside_writers",
        |url| async move {
            let schema = unique_schema("kc_v1w");
            let a = dev("@a:x", "A");
            let keys = numbered_otks(SC, "K", 30);
            let client = version_1_store(&url, &schema, &a, &keys, 20).await;
            // A duplicate claim position (another key at the position of
            // the oldest), and the invalid index a build interrupted by it
            // leaves behind.
            client
                .batch_execute(
                    "INSERT INTO issued
                       SELECT user_id, device_id, algorithm, 'signed_curve25519:DUP', digest,
                              issued_txn, issued_pos
                       FROM issued ORDER BY issued_txn, issued_pos LIMIT 1",
                )
                .await
                .expect("a duplicate position");
            let interrupted = client
                .batch_execute(
                    "CREATE UNIQUE INDEX CONCURRENTLY issued_v2_key
                 ON issued (user_id, device_id, algorithm, issued_txn, issued_pos)",
                )
                .await;
            assert!(interrupted.is_err(), "the duplicate fails the build");

            // A writer inserting remembered keys the whole time, as a worker of
            // the previous version claims.
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let writer = {
                let (url, schema, stop) = (url.clone(), schema.clone(), stop.clone());
                tokio::spawn(async move {
                    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                        .await
                        .expect("writer connection");
                    tokio::spawn(connection);
                    let insert = format!(
                        "INSERT INTO {schema}.issued
                     VALUES ('@w:x', 'W', 'alg', 'alg:' || $1::text, '\\x00', 1000000 + $2::int8, 0)
                     ON CONFLICT DO NOTHING"
                    );
                    let mut n = 0i64;
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) || n < 50 {
                        client
                            .execute(&insert, &[&n.to_string(), &n])
                            .await
                            .expect("a write during the migration");
                        n += 1;
                    }
                    n
                })
            };
            // Three workers start at once: one migrates, the others wait.
            let connects = (0..3).map(|_| PostgresStore::connect_with(&url, options(&schema)));
            let mut stores: Vec<PostgresStore> = futures::future::join_all(connects)
                .await
                .into_iter()
                .collect::<Result<_, _>>()
                .expect("every worker connects");
            let store = stores.pop().expect("a store");
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            let written = writer.await.expect("writer");

            assert_eq!(schema_version(&client).await, SCHEMA_VERSION);
            let indexes: Vec<(String, bool)> = client
                .query(
                    "SELECT c.relname::text, i.indisvalid FROM pg_index i
                   JOIN pg_class c ON c.oid = i.indexrelid
                   JOIN pg_class t ON t.oid = i.indrelid
                  WHERE t.relname = 'issued' AND t.relnamespace = $1::text::regnamespace",
                    &[&schema],
                )
                .await
                .expect("indexes")
                .iter()
                .map(|row| (row.get(0), row.get(1)))
                .collect();
            assert_eq!(indexes, [("issued_pkey".to_owned(), true)]);
            let key: String = client
                .query_one(
                    "SELECT pg_get_constraintdef(oid) FROM pg_constraint
                  WHERE conname = 'issued_pkey' AND connamespace = $1::text::regnamespace",
                    &[&schema],
                )
                .await
                .expect("primary key")
                .get(0);
            assert_eq!(
                key,
                "PRIMARY KEY (user_id, device_id, algorithm, issued_txn, issued_pos)"
            );
            let rows: i64 = client
                .query_one("SELECT count(*) FROM issued WHERE user_id = '@w:x'", &[])
                .await
                .expect("written rows")
                .get(0);
            assert_eq!(rows, written, "every write during the migration is there");
            // The memory of the device is intact: the 20 issued keys stay out.
            let out = put(&store, &a, keys[..20].to_vec(), vec![]).await;
            assert_eq!(out.counts.get_str(SC), 10);
        },
    );
}

#[test]
fn changes_reach_other_workers() {
    changes_reach_other_workers_with(false);
}

#[test]
fn changes_reach_other_workers_transactional_notify() {
    changes_reach_other_workers_with(true);
}

fn changes_reach_other_workers_with(transactional: bool) {
    with_server("postgres::changes_reach_other_workers", |url| async move {
        let schema = unique_schema("kc_note");
        let opts = || options(&schema).transactional_notify(transactional);
        let one = PostgresStore::connect_with(&url, opts())
            .await
            .expect("one");
        let two = PostgresStore::connect_with(&url, opts())
            .await
            .expect("two");
        let elsewhere = PostgresStore::connect_with(
            &url,
            options(&unique_schema("kc_other")).transactional_notify(transactional),
        )
        .await
        .expect("a store in another schema");
        let mut own = one.subscribe();
        let mut other = two.subscribe();
        let mut unrelated = elsewhere.subscribe();
        let a = dev("@a:x", "A");

        put(&one, &a, otks(SC, &["K"]), otks(SC, &["F"])).await;
        assert!(
            next_event(&mut other).await.contains(&a),
            "upload seen by the other worker"
        );
        two.claim(&[ClaimTarget::one(a.clone(), alg(SC))])
            .await
            .expect("claim");
        assert!(next_event(&mut own).await.contains(&a), "upload, own event");
        assert!(
            next_event(&mut own).await.contains(&a),
            "claim seen by the first worker"
        );
        assert!(
            next_event(&mut other).await.contains(&a),
            "claim, own event"
        );
        two.delete_user(&a.user_id).await.expect("delete");
        assert!(
            next_event(&mut own).await.contains(&a),
            "deletion seen by the first worker"
        );

        // The fallback step of a split claim, a key reset and a device
        // replacement reach the other worker too. Before each, `sync` reads
        // a subscriber up to a fresh marker device's upload by the worker it
        // hears from, so that older events about `b` cannot answer for it.
        let b = dev("@b:x", "B");
        put(&one, &b, otks(SC, &["K1", "K2"]), otks(SC, &["F"])).await;
        sync(&mut own, &two, "M1").await;
        let target = FallbackTarget {
            device: b.clone(),
            algorithm: alg(SC),
            mark_used: true,
        };
        two.claim_fallback_keys(&[target])
            .await
            .expect("fallback claim");
        events_until(&mut own, &[&b]).await;
        sync(&mut other, &one, "M2").await;
        one.reset_one_time_keys(&b, &ResetScope::All)
            .await
            .expect("reset");
        events_until(&mut other, &[&b]).await;
        sync(&mut own, &two, "M3").await;
        let c = dev("@b:x", "C");
        let upload = upload_of(&c, otks(SC, &["N"]), vec![]);
        two.replace_device(Some(&b.device_id), &upload)
            .await
            .expect("replace");
        events_until(&mut own, &[&b, &c]).await;

        // A claim changing many devices arrives complete, in several events.
        let devices: Vec<_> = (0..600)
            .map(|i| dev(&format!("@user-with-a-long-name-{i}:example.org"), "D"))
            .collect();
        for d in &devices {
            put(&one, d, otks(SC, &["K"]), vec![]).await;
        }
        // Drain the uploads' events: one per upload with transactional
        // notifications, more than a subscriber may fall behind (R11.3), so
        // a lag is expected here; wait for quiet.
        while let Ok(Ok(_) | Err(broadcast::error::RecvError::Lagged(_))) =
            tokio::time::timeout(Duration::from_millis(500), other.recv()).await
        {}
        let targets: Vec<_> = devices
            .iter()
            .map(|d| ClaimTarget::one(d.clone(), alg(SC)))
            .collect();
        one.claim(&targets).await.expect("claim");
        let mut seen = std::collections::BTreeSet::new();
        while seen.len() < devices.len() {
            seen.extend(next_event(&mut other).await.devices().iter().cloned());
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(300), unrelated.recv())
                .await
                .is_err(),
            "a store of another schema hears nothing"
        );
    });
}

/// R11.3: when a store's notification connection is lost, what other
/// workers change before it listens again is not heard; once it listens
/// again it says so with one unknown event, and later changes are heard as
/// before.
#[test]
fn a_lost_notification_connection_is_announced_as_unknown_changes() {
    with_server(
        "postgres::a_lost_notification_connection_is_announced",
        |url| async move {
            let schema = unique_schema("kc_relisten");
            let one = PostgresStore::connect_with(&url, options(&schema))
                .await
                .expect("one");
            let two = PostgresStore::connect_with(&url, options(&schema))
                .await
                .expect("two");
            let mut other = two.subscribe();
            let raw = common::raw(&url).await;
            let listening = format!("LISTEN keyclaim_changes_{schema}");
            let killed: i64 = raw
                .query_one(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query = $1",
                    &[&listening],
                )
                .await
                .expect("terminate the listeners")
                .get(0);
            assert_eq!(killed, 2, "both stores' listeners");
            let event = next_event(&mut other).await;
            assert!(event.is_unknown(), "{event:?}");
            let a = dev("@a:x", "A");
            put(&one, &a, otks(SC, &["K"]), vec![]).await;
            loop {
                let event = next_event(&mut other).await;
                if !event.is_unknown() && event.contains(&a) {
                    break;
                }
            }
        },
    );
}

#[test]
fn pinned_and_unpinned_plans_claim_alike() {
    with_server(
        "postgres::pinned_and_unpinned_plans_claim_alike",
        |url| async move {
            // Two handles on one schema: keyclaim's pinned generic plans, and
            // PostgreSQL's own choice of plans (as the benchmark's baseline runs).
            let schema = unique_schema("kc_plans");
            let pinned = PostgresStore::connect_with(&url, options(&schema))
                .await
                .expect("connect pinned");
            let unpinned = PostgresStore::connect_with(&url, options(&schema).pinned_plans(false))
                .await
                .expect("connect unpinned");
            assert!(format!("{unpinned:?}").contains("pinned_plans: false"));
            let a = dev("@a:x", "A");
            let b = dev("@b:x", "B");
            put(&pinned, &a, numbered_otks(SC, "A", 3), vec![]).await;
            put(&pinned, &a, numbered_otks(SC, "B", 3), vec![]).await;
            put(&pinned, &b, numbered_otks(SC, "C", 2), vec![]).await;
            let targets = [
                ClaimTarget {
                    device: a.clone(),
                    algorithm: alg(SC),
                    count: 4,
                },
                ClaimTarget::one(b.clone(), alg(SC)),
            ];
            // Several calls, so that both plan modes run past PostgreSQL's first
            // five custom plans of a prepared statement.
            let mut got = Vec::new();
            for round in 0..8 {
                let store = if round % 2 == 0 { &pinned } else { &unpinned };
                let outcome = store.claim(&targets).await.expect("claim");
                got.extend(outcome.keys.iter().map(|k| k.key_id.to_string()));
                if round == 0 {
                    let ids: Vec<String> =
                        outcome.keys.iter().map(|k| k.key_id.to_string()).collect();
                    assert_eq!(ids.len(), 5, "{ids:?}");
                    assert_eq!(
                        ids.iter().filter(|id| id.contains(":A")).count(),
                        3,
                        "{ids:?}"
                    );
                    assert_eq!(
                        ids.iter().filter(|id| id.contains(":C")).count(),
                        1,
                        "{ids:?}"
                    );
                }
            }
            got.sort();
            let before = got.len();
            got.dedup();
            assert_eq!(before, got.len(), "no key twice: {got:?}");
            assert_eq!(got.len(), 8, "every key once: {got:?}");
        },
    );
}

#[test]
fn debug_shows_no_secrets() {
    with_server("postgres::debug_shows_no_secrets", |url| async move {
        let url = with_param(&url, "password", "hunter2-secret");
        let store = PostgresStore::connect_with(&url, options(&unique_schema("kc_dbg")))
            .await
            .expect("connect (trust auth ignores the password)");
        let shown = format!("{store:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("kc_dbg"), "{shown}");
    });
}

#[test]
fn unreachable_server_is_a_retryable_error() {
    keyclaim_testing::runtime(4).block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!(
            "host={} port=1 user=nobody dbname=nothing",
            dir.path().display()
        );
        let err = PostgresStore::connect_with(
            &url,
            options("kc_x").connect_timeout(Duration::from_secs(2)),
        )
        .await
        .expect_err("nothing listens there");
        assert!(err.is_retryable(), "{err:?}");
        let err = PostgresStore::connect("not a url ===")
            .await
            .expect_err("bad URL");
        assert!(!err.is_retryable(), "{err:?}");
        let err = PostgresStore::connect_with(&url, options("Bad-Name"))
            .await
            .expect_err("bad schema");
        assert!(!err.is_retryable(), "{err:?}");
    });
}

/// R3.4 with a worker claiming eight devices in turn: each device
/// remembers exactly its newest 5 issued keys (re-uploads and exports
/// agree), its rows grow only by the keys claimed since its last upload,
/// and its next upload prunes them to exactly 5.
/// A connection string that does not parse is a configuration error, not a
/// storage failure, and its message shows no password.
#[test]
fn a_bad_connection_string_is_invalid_config() {
    keyclaim_testing::runtime(2).block_on(async {
        for url in [
            "not a url ===",
            "postgres://u:hunter2-secret@h:notaport/db",
            "host=/tmp port=abc",
            "host=/tmp sslmode=sometimes",
            "postgres://u:hunter2-secret@h/db?nosuchoption=1",
        ] {
            let err = PostgresStore::connect_with(url, options("kc_x"))
                .await
                .expect_err(url);
            match &err {
                Error::InvalidConfig { reason } => {
                    assert!(reason.contains("connection string"), "{url}: {reason}");
                    assert!(!reason.contains("hunter2"), "{url}: {reason}");
                }
                other => panic!("{url}: expected InvalidConfig, got {other:?}"),
            }
            assert!(!err.is_retryable());
        }
    });
}

#[test]
fn issued_memory_is_pruned_to_exactly_the_configured_number() {
    with_server("postgres::issued_memory_is_pruned", |url| async move {
        let mut limits = keyclaim::Limits::default();
        limits.remembered_issued_keys = 5;
        let schema = unique_schema("kc_prune");
        let store = PostgresStore::connect_with(&url, options(&schema).limits(limits))
            .await
            .expect("connect");
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("raw connection");
        tokio::spawn(connection);
        let rows = |device: &Device| {
            let (client, schema) = (&client, &schema);
            let (user, id) = (device.user_id.to_string(), device.device_id.to_string());
            async move {
                let n: i64 = client
                    .query_one(
                        &format!(
                            "SELECT count(*) FROM {schema}.issued WHERE user_id = $1 AND device_id = $2"
                        ),
                        &[&user, &id],
                    )
                    .await
                    .expect("count rows")
                    .get(0);
                n
            }
        };
        let devices: Vec<Device> = (0..8).map(|i| dev("@a:x", &format!("D{i}"))).collect();
        let keys = numbered_otks(SC, "K", 40);
        for round in 0..3 {
            for d in &devices {
                let out = put(&store, d, keys.clone(), vec![]).await;
                if round > 0 {
                    // The newest 5 issued are remembered, the rest stored again.
                    assert_eq!(out.counts.get_str(SC), 35);
                    assert_eq!(rows(d).await, 5, "{d}: the upload pruned to exactly 5");
                }
            }
            let stored = if round == 0 { 40 } else { 35 };
            let mut claimed: Vec<Vec<keyclaim::KeyId>> = vec![Vec::new(); devices.len()];
            for _ in 0..stored {
                for (i, d) in devices.iter().enumerate() {
                    let out = store
                        .claim(&[ClaimTarget::one(d.clone(), alg(SC))])
                        .await
                        .expect("claim");
                    assert!(!out.keys[0].fallback);
                    claimed[i].push(out.keys[0].key_id.clone());
                }
            }
            for d in &devices {
                let n = rows(d).await;
                assert!(n <= 5 + stored, "{d}: {n} rows");
            }
            let snapshots = store.export_devices(None, 10).await.expect("export");
            assert_eq!(snapshots.len(), devices.len());
            for (snapshot, claimed) in snapshots.iter().zip(&claimed) {
                let got: Vec<_> = snapshot.issued[&alg(SC)]
                    .iter()
                    .map(|k| k.key_id.clone())
                    .collect();
                assert_eq!(got, claimed[claimed.len() - 5..], "{}", snapshot.device);
            }
        }
    });
}

/// The store's own pool hands out the connection used last: after a burst
/// opened every connection of the pool, one client's operations one after
/// another all run on one server process (its caches and plans warm)
/// instead of on each idle one in turn.
#[test]
fn one_client_after_a_burst_reuses_one_connection() {
    with_server("postgres::lifo", |url| async move {
        let app = unique_schema("kc_lifo_app");
        // No listener, no background compaction: only the test's own
        // operations use the pool.
        let store = PostgresStore::connect_with(
            &with_param(&url, "application_name", &app),
            options(&unique_schema("kc_lifo"))
                .notifications(false)
                .count_compaction_interval(Duration::from_secs(3600)),
        )
        .await
        .unwrap();
        let d = dev("@lifo:x", "D");
        let watcher = common::raw(&url).await;
        // (pid, last state change) of the store's connections.
        let sessions = || async {
            let rows = watcher
                .query(
                    "SELECT pid, state_change::text FROM pg_stat_activity
                      WHERE application_name = $1 ORDER BY pid",
                    &[&app],
                )
                .await
                .unwrap();
            rows.iter()
                .map(|r| (r.get::<_, i32>(0), r.get::<_, Option<String>>(1)))
                .collect::<Vec<_>>()
        };
        // A burst: more concurrent reads than the pool (4) has connections.
        let burst = futures::future::join_all((0..16).map(|_| store.otk_counts(&d))).await;
        assert!(burst.iter().all(Result::is_ok));
        let before = sessions().await;
        assert!(
            before.len() >= 2,
            "the burst opened several connections: {before:?}"
        );
        for _ in 0..20 {
            store.otk_counts(&d).await.unwrap();
        }
        let after = sessions().await;
        let used = after.iter().filter(|s| !before.contains(s)).count();
        assert_eq!(
            used, 1,
            "20 reads in turn ran on one connection: {before:?} then {after:?}"
        );
    });
}
