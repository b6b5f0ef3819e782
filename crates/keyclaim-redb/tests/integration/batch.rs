//! Group commit keeps each operation atomic on its own: an operation that
//! fails, in the same write transaction as others, fails alone.

use std::sync::Arc;

use futures::future::join_all;
use keyclaim::{ClaimTarget, Device, Error, KeyStore, Limits, Upload};
use keyclaim_conformance::fixtures::{SC, alg, dev, otks, signed};
use keyclaim_redb::{RedbOptions, RedbStore};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime")
}

fn small_limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_otks_per_device_algorithm = 10;
    limits
}

enum Expect {
    Ok,
    Conflict,
    TooLarge,
}

/// Rejected uploads (R3.2 conflict, R8.1 limit) queued together with good
/// uploads and claims: only the rejected ones fail, and they store nothing.
#[test]
fn rejected_operation_does_not_fail_its_batch_mates() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            RedbStore::open_with(
                dir.path().join("k.redb"),
                RedbOptions::new().limits(small_limits()),
            )
            .await
            .unwrap(),
        );
        let owner = dev("@owner:example.org", "OWNER");
        store
            .upload(&Upload::from_keys(owner.clone(), otks(SC, &["A"]), []).unwrap())
            .await
            .unwrap();
        // Claims take from a pool device, never the owner's conflicting key.
        let pool = dev("@pool:example.org", "POOL");
        let names: Vec<String> = (0..10).map(|n| format!("P{n}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        store
            .upload(&Upload::from_keys(pool.clone(), otks(SC, &names), []).unwrap())
            .await
            .unwrap();
        for round in 0..5 {
            let before = store.writer_stats();
            let mut jobs = Vec::new();
            for i in 0..48 {
                let store = Arc::clone(&store);
                let owner = owner.clone();
                let pool = pool.clone();
                jobs.push(async move {
                    let d = dev("@u:example.org", &format!("D{round}-{i}"));
                    match i % 4 {
                        0 => {
                            // Same key ID as the owner's A, other content.
                            let up = Upload::from_keys(
                                owner.clone(),
                                [(
                                    keyclaim_conformance::fixtures::kid("signed_curve25519:A"),
                                    signed("other", "s"),
                                )],
                                [],
                            )
                            .unwrap();
                            (Expect::Conflict, d, store.upload(&up).await.map(|_| ()))
                        }
                        1 => {
                            let names: Vec<String> = (0..11).map(|n| format!("K{n}")).collect();
                            let names: Vec<&str> = names.iter().map(String::as_str).collect();
                            let up = Upload::from_keys(d.clone(), otks(SC, &names), []).unwrap();
                            (Expect::TooLarge, d, store.upload(&up).await.map(|_| ()))
                        }
                        2 => {
                            let up =
                                Upload::from_keys(d.clone(), otks(SC, &["X", "Y"]), []).unwrap();
                            (Expect::Ok, d, store.upload(&up).await.map(|_| ()))
                        }
                        _ => {
                            let t = ClaimTarget::one(pool, alg(SC));
                            (Expect::Ok, d, store.claim(&[t]).await.map(|_| ()))
                        }
                    }
                });
            }
            for (expect, d, result) in join_all(jobs).await {
                match (expect, result) {
                    (Expect::Ok, Ok(())) => {}
                    (Expect::Conflict, Err(Error::Conflict { .. })) => {}
                    (Expect::TooLarge, Err(Error::TooLarge { .. })) => {
                        assert_eq!(store.otk_counts(&d).await.unwrap().total(), 0);
                    }
                    (_, other) => panic!("unexpected result for {d}: {other:?}"),
                }
            }
            let after = store.writer_stats();
            assert!(
                after.commits - before.commits < after.operations - before.operations,
                "no batching happened: {before:?} -> {after:?}"
            );
        }
        // The good uploads are all there.
        for round in 0..5 {
            for i in (2..48).step_by(4) {
                let d = dev("@u:example.org", &format!("D{round}-{i}"));
                assert_eq!(store.otk_counts(&d).await.unwrap().get_str(SC), 2, "{d}");
            }
        }
        let stats = store.writer_stats();
        assert!(stats.largest_batch > 1, "{stats:?}");
        assert_eq!(stats.failed_batches, 0, "{stats:?}");
    });
}

const OTKS_DEF: redb::TableDefinition<'_, (&str, &str, &str, u64, &str), &str> =
    redb::TableDefinition::new("otks");
const COUNTS_DEF: redb::TableDefinition<'_, (&str, &str, &str), (u64, u64)> =
    redb::TableDefinition::new("alg_counts");

/// An operation that fails half-way (here: a corrupt stored key, found
/// while claiming) aborts its batch's transaction; the batch is then run
/// one operation per transaction, so only that operation fails and nothing
/// of it is applied.
#[test]
fn failing_operation_is_retried_alone() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.redb");
        RedbStore::open(&path).await.unwrap().close().await.unwrap();
        let bad = dev("@bad:example.org", "BAD");
        {
            let db = redb::Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(OTKS_DEF).unwrap();
                t.insert(
                    ("@bad:example.org", "BAD", SC, 0, "signed_curve25519:X"),
                    "{not json",
                )
                .unwrap();
                let mut c = txn.open_table(COUNTS_DEF).unwrap();
                c.insert(("@bad:example.org", "BAD", SC), (1, 0)).unwrap();
            }
            txn.commit().unwrap();
        }
        let store = Arc::new(RedbStore::open(&path).await.unwrap());
        let mut bad_claims = 0;
        let mut round = 0;
        // Until the corrupt claim has shared a batch with good operations at
        // least once: its batch then fails once, and its retry alone once
        // more, so there are more failed batches than bad claims.
        while round < 3 || (store.writer_stats().failed_batches == bad_claims && round < 50) {
            round += 1;
            bad_claims += 4;
            let mut jobs = Vec::new();
            for i in 0..32 {
                let store = Arc::clone(&store);
                let bad = bad.clone();
                jobs.push(async move {
                    if i % 8 == 0 {
                        let r = store.claim(&[ClaimTarget::one(bad, alg(SC))]).await;
                        (None, r.map(|_| ()))
                    } else {
                        let d: Device = dev("@u:example.org", &format!("R{round}-{i}"));
                        let up = Upload::from_keys(d.clone(), otks(SC, &["A"]), []).unwrap();
                        (Some(d), store.upload(&up).await.map(|_| ()))
                    }
                });
            }
            for (d, result) in join_all(jobs).await {
                match (d, result) {
                    (Some(d), Ok(())) => {
                        assert_eq!(store.otk_counts(&d).await.unwrap().get_str(SC), 1);
                    }
                    (None, Err(Error::Corrupt(_))) => {}
                    (d, other) => panic!("unexpected result for {d:?}: {other:?}"),
                }
            }
            // The failed claim applied nothing.
            assert_eq!(store.otk_counts(&bad).await.unwrap().get_str(SC), 1);
        }
        let stats = store.writer_stats();
        assert!(
            stats.failed_batches > bad_claims,
            "never batched: {stats:?}"
        );
    });
}
