//! Group commit keeps each operation atomic on its own: an operation that
//! fails, in the same write transaction as others, fails alone; a claim
//! that meets a corrupt key fails before anything commits (R10.7).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use keyclaim::{ClaimOutcome, ClaimTarget, Error, KeyStore, Limits, Upload};
use keyclaim_conformance::fixtures::{SC, alg, dev, otks, signed};
use keyclaim_redb::faults::Faults;
use keyclaim_redb::{RedbOptions, RedbStore};

fn rt() -> tokio::runtime::Runtime {
    keyclaim_testing::runtime(4)
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
                after.batches - before.batches < after.operations - before.operations,
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

// The tables of format version 2 (see `schema.rs`).
type OtkRow<'a> = (u64, &'a str, [u8; 32], &'a str);
const KEYS_DEF: redb::TableDefinition<'_, (&str, &str, &str, u64), OtkRow<'_>> =
    redb::TableDefinition::new("otk_keys");
const IDS_DEF: redb::TableDefinition<'_, (&str, &str, &str, u64), [u8; 32]> =
    redb::TableDefinition::new("otk_ids");
const QUEUE_DEF: redb::TableDefinition<'_, (&str, &str, &str), (u64, u64, u64)> =
    redb::TableDefinition::new("otk_queue");

/// Writes rows into a closed store's file behind its back.
fn tamper(path: &std::path::Path, f: impl FnOnce(&redb::WriteTransaction)) {
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    f(&txn);
    txn.commit().unwrap();
}

/// An operation that fails half-way (here: an upload that finds a corrupt
/// row of its device after it wrote its keys) aborts its batch's
/// transaction; the batch is then run one operation per transaction, so
/// only that operation fails, and nothing of it is applied.
#[test]
fn failing_operation_is_retried_alone() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.redb");
        RedbStore::open(&path).await.unwrap().close().await.unwrap();
        let bad = dev("@bad:example.org", "BAD");
        tamper(&path, |txn| {
            // An algorithm with a colon cannot be valid: reading the
            // device's counts fails with Error::Corrupt.
            let mut c = txn.open_table(QUEUE_DEF).unwrap();
            c.insert(("@bad:example.org", "BAD", "bad:alg"), (0, 0, 1))
                .unwrap();
        });
        let store = Arc::new(RedbStore::open(&path).await.unwrap());
        let mut bad_uploads = 0;
        let mut round = 0;
        // Until the bad upload has shared a batch with good operations at
        // least once: its batch then fails once, and its retry alone once
        // more, so there are more failed batches than bad uploads.
        while round < 3 || (store.writer_stats().failed_batches == bad_uploads && round < 50) {
            round += 1;
            bad_uploads += 4;
            let mut jobs = Vec::new();
            for i in 0..32 {
                let store = Arc::clone(&store);
                let bad = bad.clone();
                jobs.push(async move {
                    let (d, good) = if i % 8 == 0 {
                        (bad, false)
                    } else {
                        (dev("@u:example.org", &format!("R{round}-{i}")), true)
                    };
                    let name = format!("K{round}-{i}");
                    let up = Upload::from_keys(d.clone(), otks(SC, &[name.as_str()]), []).unwrap();
                    (good, d, store.upload(&up).await.map(|_| ()))
                });
            }
            for (good, d, result) in join_all(jobs).await {
                match (good, result) {
                    (true, Ok(())) => {
                        assert_eq!(store.otk_counts(&d).await.unwrap().get_str(SC), 1);
                    }
                    (false, Err(Error::Corrupt { .. })) => {}
                    (_, other) => panic!("unexpected result for {d}: {other:?}"),
                }
            }
            // The failed uploads applied nothing: no key to claim.
            let out = store
                .claim(&[ClaimTarget::one(bad.clone(), alg(SC))])
                .await
                .unwrap();
            assert!(out.keys.is_empty(), "a failed upload left keys behind");
        }
        let stats = store.writer_stats();
        assert!(
            stats.failed_batches > bad_uploads,
            "never batched: {stats:?}"
        );
    });
}

/// A stored key whose JSON no longer parses is reported as
/// [`Error::Corrupt`] by the claim that meets it: an error, never a panic
/// or a wrong answer (R10.4).
#[test]
fn corrupt_stored_key_is_an_error() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.redb");
        RedbStore::open(&path).await.unwrap().close().await.unwrap();
        tamper(&path, |txn| {
            let id = "signed_curve25519:X";
            txn.open_table(KEYS_DEF)
                .unwrap()
                .insert(
                    ("@bad:example.org", "BAD", SC, 0),
                    (1, id, [0; 32], "{not json"),
                )
                .unwrap();
            txn.open_table(IDS_DEF)
                .unwrap()
                .insert(("@bad:example.org", "BAD", id, 0), [0; 32])
                .unwrap();
            txn.open_table(QUEUE_DEF)
                .unwrap()
                .insert(("@bad:example.org", "BAD", SC), (0, 0, 1))
                .unwrap();
        });
        let store = RedbStore::open(&path).await.unwrap();
        let bad = dev("@bad:example.org", "BAD");
        let err = store
            .claim(&[ClaimTarget::one(bad, alg(SC))])
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    });
}

/// R10.7: a claim that meets a corrupt stored key fails with
/// `Error::Corrupt` before anything commits: none of the device's keys is
/// used up, the claims sharing its batch succeed, and `check` reports the
/// corruption.
#[test]
fn corrupt_key_fails_its_claim_before_commit_and_alone() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.redb");
        let bad = dev("@bad:example.org", "BAD");
        let good: Vec<_> = (0..8)
            .map(|i| dev("@good:example.org", &format!("G{i}")))
            .collect();
        {
            let store = RedbStore::open(&path).await.unwrap();
            let up = Upload::from_keys(bad.clone(), otks(SC, &["A", "B", "C"]), []).unwrap();
            store.upload(&up).await.unwrap();
            for d in &good {
                let up = Upload::from_keys(d.clone(), otks(SC, &["X", "Y"]), []).unwrap();
                store.upload(&up).await.unwrap();
            }
            store.close().await.unwrap();
        }
        // The second key in claim order (position 1) no longer parses.
        tamper(&path, |txn| {
            use redb::ReadableTable;
            let mut keys = txn.open_table(KEYS_DEF).unwrap();
            let at = ("@bad:example.org", "BAD", SC, 1);
            let (seq, id, digest) = {
                let row = keys.get(at).unwrap().unwrap();
                let (seq, id, digest, _) = row.value();
                (seq, id.to_owned(), digest)
            };
            keys.insert(at, (seq, id.as_str(), digest, "{not json"))
                .unwrap();
        });
        let faults = Faults::new();
        let store = RedbStore::open_with(&path, RedbOptions::new().faults(faults.clone()))
            .await
            .unwrap();
        // One batch for all the claims: the writer stalls holding a first
        // one while the others queue behind it (a claim is queued by its
        // first poll).
        let stall = faults.stall_writer();
        let mut targets = vec![(good[0].clone(), 1)];
        targets.push((bad.clone(), 2));
        targets.extend(good[1..].iter().map(|d| (d.clone(), 1)));
        let targets: Vec<[ClaimTarget; 1]> = targets
            .into_iter()
            .map(|(device, count)| {
                [ClaimTarget {
                    device,
                    algorithm: alg(SC),
                    count,
                }]
            })
            .collect();
        type Call<'a> = Pin<Box<dyn Future<Output = keyclaim::Result<ClaimOutcome>> + 'a>>;
        let mut calls: Vec<Call<'_>> = targets
            .iter()
            .map(|t| Box::pin(store.claim(t)) as Call<'_>)
            .collect();
        assert!(futures::poll!(&mut calls[0]).is_pending());
        keyclaim_testing::wait_until("the writer stalls", Duration::from_secs(30), || {
            faults.writer_stalled()
        })
        .await;
        for call in &mut calls[1..] {
            assert!(futures::poll!(call).is_pending());
        }
        let before = store.writer_stats();
        drop(stall);
        let mut results = join_all(calls).await.into_iter();
        assert_eq!(results.next().unwrap().unwrap().keys.len(), 1);
        let err = results.next().unwrap().unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt { what, .. } if what.contains("B of @bad:example.org BAD")),
            "the error should name the key and its device: {err:?}"
        );
        for result in results {
            assert_eq!(result.unwrap().keys.len(), 1);
        }
        let after = store.writer_stats();
        assert!(
            after.failed_batches > before.failed_batches,
            "the corrupt claim never failed a batch: {after:?}"
        );
        // Nothing of the failed claim was committed; its batch-mates were.
        assert_eq!(store.otk_counts(&bad).await.unwrap().get_str(SC), 3);
        for d in &good {
            assert_eq!(store.otk_counts(d).await.unwrap().get_str(SC), 1, "{d}");
        }
        // The key before the corrupt one is delivered; the corrupt one is
        // refused again, still without using anything up.
        let out = store
            .claim(&[ClaimTarget::one(bad.clone(), alg(SC))])
            .await
            .unwrap();
        assert_eq!(out.keys[0].key_id.name(), "A");
        let err = store
            .claim(&[ClaimTarget::one(bad.clone(), alg(SC))])
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
        assert_eq!(store.otk_counts(&bad).await.unwrap().get_str(SC), 2);
        // `check` reports it, naming it.
        match keyclaim::transfer::check_store(&store, 100).await {
            Err(Error::Corrupt { what, .. }) if what.contains("B of @bad:example.org BAD") => {}
            other => panic!("check did not report the corrupt key: {other:?}"),
        }
    });
}
