//! The per-device count table (schema versions 3 and 4): exact under
//! concurrent writes of every kind and concurrent compactions (R6.2,
//! R16.1), folded to one row per (device, algorithm) by compaction, built
//! from the keys of a version-2 schema while other sessions write, and
//! kept exact through the move to version 4, whose statements count
//! themselves while other sessions' writes are counted by a trigger
//! (R10.9).

// Tests report failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use keyclaim::{ClaimTarget, Device, KeyStore, ResetScope};
use keyclaim_conformance::fixtures::{alg, dev, numbered_otks, upload_of};
use keyclaim_postgres::{PostgresOptions, PostgresStore, SCHEMA_VERSION};
use keyclaim_testing::postgres::{unique_schema, with_server};

use common::{BACK_TO_V2, BACK_TO_V3, count_mismatches, otk_triggers, raw_session, schema_version};

const SC: &str = "signed_curve25519";
const OTHER: &str = "other_alg";

fn options(schema: &str) -> PostgresOptions {
    common::options(schema).pool_size(8)
}

fn devices(n: usize) -> Vec<Device> {
    (0..n)
        .map(|i| dev(&format!("@u{}:x", i % 4), &format!("D{i}")))
        .collect()
}

/// Asserts that `counts_many` answers what each device's own `sync_state`
/// (which counts its keys) answers.
async fn assert_counts_many_exact(store: &PostgresStore, devices: &[Device]) {
    let many = store.counts_many(devices).await.expect("counts_many");
    for (device, state) in devices.iter().zip(many) {
        let one = store.sync_state(device).await.expect("sync_state");
        assert_eq!(state, one, "{device:?}");
    }
}

/// One worker's mix of writes on `devices`, `rounds` times: uploads of two
/// algorithms, one-step and split claims of several devices at once,
/// resets, deletions and dehydrated replaces, and a compaction every few
/// rounds.
async fn writer(store: Arc<PostgresStore>, devices: Arc<Vec<Device>>, seed: usize, rounds: usize) {
    for r in 0..rounds {
        let i = (seed * 7 + r * 13) % devices.len();
        let d = &devices[i];
        let next = &devices[(i + 1) % devices.len()];
        match (seed + r) % 7 {
            0 | 1 => {
                let prefix = format!("K{seed}_{r}_");
                let mut keys = numbered_otks(SC, &prefix, 5);
                keys.extend(numbered_otks(OTHER, &prefix, 2));
                store
                    .upload(&upload_of(d, keys, vec![]))
                    .await
                    .expect("upload");
            }
            2 => {
                store
                    .claim(&[
                        ClaimTarget {
                            device: d.clone(),
                            algorithm: alg(SC),
                            count: 2,
                        },
                        ClaimTarget::one(next.clone(), alg(OTHER)),
                    ])
                    .await
                    .expect("claim");
            }
            3 => {
                store
                    .claim_one_time_keys(&[ClaimTarget::one(d.clone(), alg(SC))])
                    .await
                    .expect("split claim");
            }
            4 => {
                store
                    .reset_one_time_keys(d, &ResetScope::All)
                    .await
                    .expect("reset");
            }
            5 => {
                store.delete_device(d).await.expect("delete");
            }
            _ => {
                // A device of the same user (R14.1).
                let previous = &devices[(i + 4) % devices.len()];
                let keys = numbered_otks(SC, &format!("R{seed}_{r}_"), 3);
                store
                    .replace_device(Some(&previous.device_id), &upload_of(d, keys, vec![]))
                    .await
                    .expect("replace");
            }
        }
        if r % 5 == 0 {
            store.compact_counts().await.expect("compact");
        }
    }
}

/// R6.2, R16.1: two workers (two pools) write every kind of change to the
/// same devices while both compact; the kept counts stay exact, and a last
/// compaction leaves one row per (device, algorithm) with keys.
#[test]
fn counts_stay_exact_under_concurrent_writes_and_compactions() {
    with_server("counts::exact_under_concurrency", |url| async move {
        let schema = unique_schema("kc_cnt");
        let a = Arc::new(
            PostgresStore::connect_with(&url, options(&schema))
                .await
                .expect("connect"),
        );
        let b = Arc::new(
            PostgresStore::connect_with(&url, options(&schema))
                .await
                .expect("connect"),
        );
        let devices = Arc::new(devices(12));
        let tasks: Vec<_> = (0..8)
            .map(|seed| {
                let store = if seed % 2 == 0 { a.clone() } else { b.clone() };
                tokio::spawn(writer(store, devices.clone(), seed, 60))
            })
            .collect();
        for task in tasks {
            task.await.expect("writer");
        }
        let client = raw_session(&url, &schema).await;
        assert_eq!(count_mismatches(&client).await, vec![]);
        assert_counts_many_exact(&a, &devices).await;

        a.compact_counts().await.expect("compact");
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE delta), count(*) FILTER (WHERE n = 0),
                        count(*) - count(DISTINCT (user_id, device_id, algorithm)), count(*)
                   FROM otk_count",
                &[],
            )
            .await
            .expect("rows");
        let (deltas, zeros, extra, rows): (i64, i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        assert_eq!((deltas, zeros, extra), (0, 0, 0), "{rows} rows");
        assert!(rows > 0, "some devices keep keys");
        assert_eq!(count_mismatches(&client).await, vec![]);
        assert_counts_many_exact(&b, &devices).await;
    });
}

/// A compaction finds the schema's compaction lock taken (another worker
/// compacting) and leaves the rows alone instead of waiting; once the lock
/// is free it folds them.
#[test]
fn compaction_skips_while_another_worker_compacts() {
    with_server("counts::compaction_skips", |url| async move {
        let schema = unique_schema("kc_cntlk");
        let store = PostgresStore::connect_with(&url, options(&schema))
            .await
            .expect("connect");
        let d = dev("@a:x", "A");
        for round in 0..3 {
            let keys = numbered_otks(SC, &format!("K{round}_"), 4);
            store
                .upload(&upload_of(&d, keys, vec![]))
                .await
                .expect("upload");
        }
        let mut holder = raw_session(&url, &schema).await;
        let tx = holder.transaction().await.expect("tx");
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('keyclaim/counts/' || current_schema(), 0))",
            &[],
        )
        .await
        .expect("take the compaction lock");
        assert_eq!(store.compact_counts().await.expect("compact"), 0);
        let client = raw_session(&url, &schema).await;
        let count_rows = "SELECT count(*) FROM otk_count WHERE user_id = '@a:x'";
        let before: i64 = client
            .query_one(count_rows, &[])
            .await
            .expect("rows")
            .get(0);
        assert!(before >= 3, "one delta row per upload: {before}");
        tx.rollback().await.expect("release");
        assert_eq!(store.compact_counts().await.expect("compact"), 1);
        let after: i64 = client
            .query_one(count_rows, &[])
            .await
            .expect("rows")
            .get(0);
        assert_eq!(after, 1);
        let state = store.sync_state(&d).await.expect("state");
        assert_eq!(state.one_time_key_counts.get_str(SC), 12);
    });
}

/// R10.9: a version-2 schema holding keys of many devices is migrated to
/// version 3 by three workers starting at once while another session keeps
/// inserting and deleting keys (as the workers still running the previous
/// version do); every count is exact afterwards.
#[test]
fn version_2_schema_gets_exact_counts_beside_writers() {
    with_server("counts::version_2_migrates", |url| async move {
        let schema = unique_schema("kc_cntv2");
        // 30,000 keys of 3,000 devices: several backfill batches.
        older_store(&url, &schema, 300, 3000, BACK_TO_V2).await;

        let (stores, client) = migrate_beside_a_writer(&url, &schema, 300, 3000).await;
        assert_eq!(count_mismatches(&client).await, vec![]);
        let asked: Vec<Device> = (0..3000)
            .step_by(37)
            .map(|i| dev(&format!("@u{}:x", i % 300), &format!("D{i}")))
            .collect();
        assert_counts_many_exact(&stores[0], &asked).await;
    });
}

/// R6.2, R10.9: a version-3 schema (statement-level count triggers) is
/// migrated to version 4 by three workers starting at once while another
/// session keeps inserting and deleting keys, as the workers of the
/// previous version and an operator's `psql` do. Afterwards keyclaim's own
/// writes (uploads, claims, resets, deletions) count themselves and the
/// other session's are counted by the row-level trigger, neither twice: the
/// kept counts equal the keys.
#[test]
fn version_3_schema_keeps_exact_counts_through_version_4() {
    with_server("counts::version_3_migrates", |url| async move {
        let schema = unique_schema("kc_cntv3");
        let client = older_store(&url, &schema, 30, 300, BACK_TO_V3).await;
        assert_eq!(
            otk_triggers(&client).await,
            [
                "otk_count_delete",
                "otk_count_insert",
                "otk_count_truncate",
                "otk_count_update"
            ]
        );

        let (stores, client) = migrate_beside_a_writer(&url, &schema, 30, 300).await;
        assert_eq!(
            otk_triggers(&client).await,
            ["otk_count_row", "otk_count_truncate"]
        );
        assert_eq!(count_mismatches(&client).await, vec![]);

        // keyclaim's writes of every kind on the migrated schema, beside the
        // other session's.
        let devices = Arc::new(devices(12));
        let stores: Vec<Arc<PostgresStore>> = stores.into_iter().map(Arc::new).collect();
        let workers = stores
            .iter()
            .enumerate()
            .map(|(seed, store)| tokio::spawn(writer(store.clone(), devices.clone(), seed, 20)))
            .collect::<Vec<_>>();
        client
            .batch_execute(
                "INSERT INTO otk SELECT '@u1:x', 'D1', 'signed_curve25519:X' || j, 'signed_curve25519',
                        1000 + j, '\"k\"', '\\x00'
                   FROM generate_series(1, 5) j;
                 DELETE FROM otk WHERE user_id = '@u2:x' AND device_id = 'D2' AND key_id LIKE 'alg:K%'",
            )
            .await
            .expect("the other session's writes");
        for w in workers {
            w.await.expect("worker");
        }
        assert_eq!(count_mismatches(&client).await, vec![]);
        assert_counts_many_exact(&stores[0], &devices).await;
    });
}

/// Three workers connect to the schema `schema` at once (and migrate it)
/// while another session, as a worker of the previous version or an
/// operator would, inserts and deletes keys of `users` users' `devices`
/// devices until they have and at least 100 times. Answers the workers'
/// stores, once the schema is at [`SCHEMA_VERSION`], and a raw session on
/// the schema.
async fn migrate_beside_a_writer(
    url: &str,
    schema: &str,
    users: i64,
    devices: i64,
) -> (Vec<PostgresStore>, tokio_postgres::Client) {
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (url, schema, stop) = (url.to_owned(), schema.to_owned(), stop.clone());
        tokio::spawn(async move {
            let client = raw_session(&url, &schema).await;
            let mut n = 0i64;
            while !stop.load(Ordering::SeqCst) || n < 100 {
                client
                    .execute(
                        "INSERT INTO otk VALUES ('@u' || ($1::int8 % $2::int8) || ':x', 'D' || ($1 % $3::int8),
                                'alg:W' || $1, 'alg', 100 + $1, '\"k\"', '\\x00')",
                        &[&n, &users, &devices],
                    )
                    .await
                    .expect("an insert during the migration");
                client
                    .execute(
                        "DELETE FROM otk WHERE ctid = (SELECT ctid FROM otk
                          WHERE user_id = '@u' || ($1::int8 % $2::int8) || ':x'
                            AND device_id = 'D' || ($1 * 7 % $3::int8)
                          LIMIT 1)",
                        &[&n, &users, &devices],
                    )
                    .await
                    .expect("a deletion during the migration");
                n += 1;
            }
            n
        })
    };
    let connects = (0..3).map(|_| PostgresStore::connect_with(url, options(schema)));
    let stores: Vec<PostgresStore> = futures::future::join_all(connects)
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("every worker connects");
    stop.store(true, Ordering::SeqCst);
    let written = writer.await.expect("writer");
    assert!(written >= 100);
    let client = raw_session(url, schema).await;
    assert_eq!(schema_version(&client).await, SCHEMA_VERSION);
    (stores, client)
}

/// A store in `schema` whose `devices` devices (of `users` users) hold 10
/// keys each, written by another session, then taken back to an older
/// layout with `back_to`. Answers a raw session on the schema.
async fn older_store(
    url: &str,
    schema: &str,
    users: i64,
    devices: i64,
    back_to: &str,
) -> tokio_postgres::Client {
    {
        let _create = PostgresStore::connect_with(url, options(schema))
            .await
            .expect("connect");
    }
    let client = raw_session(url, schema).await;
    client
        .execute(
            "INSERT INTO otk SELECT '@u' || (i % $1::int8) || ':x', 'D' || i, 'alg:K' || j, 'alg', j,
                    '\"k\"', '\\x00'
               FROM generate_series(1, $2::int8) i, generate_series(1, 10) j",
            &[&users, &devices],
        )
        .await
        .expect("keys");
    client
        .batch_execute(back_to)
        .await
        .expect("the older layout");
    client
}
