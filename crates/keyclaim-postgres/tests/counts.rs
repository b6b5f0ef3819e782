//! The per-device count table (schema version 3): exact under concurrent
//! writes of every kind and concurrent compactions (R6.2, R16.1), folded to
//! one row per (device, algorithm) by compaction, and built from the keys
//! of a version-2 schema while other sessions write (R10.9).

// Tests report failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use keyclaim::{ClaimTarget, Device, KeyStore, ResetScope};
use keyclaim_conformance::fixtures::{alg, dev, numbered_otks, upload_of};
use keyclaim_postgres::{PostgresOptions, PostgresStore, SCHEMA_VERSION};
use keyclaim_testing::postgres::{unique_schema, with_server};

use common::{BACK_TO_V2, count_mismatches, raw_session};

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
        {
            let _create = PostgresStore::connect_with(&url, options(&schema))
                .await
                .expect("connect");
        }
        let client = raw_session(&url, &schema).await;
        // 30,000 keys of 3,000 devices: several backfill batches.
        client
            .batch_execute(&format!(
                "INSERT INTO otk SELECT '@u' || (i % 300) || ':x', 'D' || i, 'alg:K' || j, 'alg', j,
                        '\"k\"', '\\x00'
                   FROM generate_series(1, 3000) i, generate_series(1, 10) j;
                 {BACK_TO_V2}"
            ))
            .await
            .expect("a version-2 store with keys");

        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (url, schema, stop) = (url.clone(), schema.clone(), stop.clone());
            tokio::spawn(async move {
                let client = raw_session(&url, &schema).await;
                let mut n = 0i64;
                while !stop.load(Ordering::SeqCst) || n < 100 {
                    client
                        .execute(
                            "INSERT INTO otk VALUES ('@u' || ($1::int8 % 300) || ':x', 'D' || ($1 % 3000),
                                    'alg:W' || $1, 'alg', 100 + $1, '\"k\"', '\\x00')",
                            &[&n],
                        )
                        .await
                        .expect("an insert during the migration");
                    client
                        .execute(
                            "DELETE FROM otk WHERE ctid = (SELECT ctid FROM otk
                              WHERE user_id = '@u' || ($1::int8 % 300) || ':x' AND device_id = 'D' || ($1 * 7 % 3000)
                              LIMIT 1)",
                            &[&n],
                        )
                        .await
                        .expect("a deletion during the migration");
                    n += 1;
                }
                n
            })
        };
        let connects = (0..3).map(|_| PostgresStore::connect_with(&url, options(&schema)));
        let stores: Vec<PostgresStore> = futures::future::join_all(connects)
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .expect("every worker connects");
        stop.store(true, Ordering::SeqCst);
        let written = writer.await.expect("writer");
        assert!(written >= 100);

        let version: i64 = client
            .query_one("SELECT version FROM keyclaim_meta", &[])
            .await
            .expect("version")
            .get(0);
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(count_mismatches(&client).await, vec![]);
        let asked: Vec<Device> = (0..3000)
            .step_by(37)
            .map(|i| dev(&format!("@u{}:x", i % 300), &format!("D{i}")))
            .collect();
        assert_counts_many_exact(&stores[0], &asked).await;
    });
}
