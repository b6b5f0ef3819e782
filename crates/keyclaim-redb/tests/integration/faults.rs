//! Storage faults (R10.8).
//!
//! - A full disk: after it, the same store works again once there is room
//!   (the writer reopens the redb file after an I/O error). Needs root and
//!   `mount -t tmpfs` (`keyclaim_testing::DiskFull`); where that is
//!   unavailable the test prints `SKIPPED` on stderr and passes, and under
//!   `CI=true` it fails.
//! - `EIO` from writes and syncs, injected by the fault-injecting storage
//!   backend of `keyclaim_redb::faults` (no root needed): a failed sync
//!   loses the writes since the last good one, so a store that served what
//!   it could not sync would answer differently from the file.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use keyclaim::{ClaimTarget, Error, KeyStore, Upload};
use keyclaim_conformance::fixtures::{SC, alg, dev, otks};
use keyclaim_redb::faults::Faults;
use keyclaim_redb::{RedbDurability, RedbOptions, RedbStore};
use keyclaim_testing::DiskFull;

use crate::retrying;

fn upload_of(i: usize) -> Upload {
    let names: Vec<String> = (0..50).map(|n| format!("K{i}-{n}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    Upload::from_keys(
        dev("@full:example.org", &format!("D{i}")),
        otks(SC, &names),
        [],
    )
    .unwrap()
}

#[test]
fn same_store_recovers_after_disk_full() {
    let Some(mut disk) = keyclaim_testing::require(
        "faults::same_store_recovers_after_disk_full",
        DiskFull::mount(8 << 20),
    ) else {
        return;
    };
    crate::rt().block_on(async {
        let path = disk.dir().join("k.redb");
        let store = RedbStore::open(&path).await.unwrap();
        let mut acked = Vec::new();
        for i in 0..10 {
            store.upload(&upload_of(i)).await.unwrap();
            acked.push(i);
        }
        disk.fill().unwrap();
        let mut failed = Vec::new();
        for i in 10..200 {
            match store.upload(&upload_of(i)).await {
                Ok(_) => acked.push(i),
                Err(e @ Error::Storage { .. }) => {
                    assert!(
                        e.is_retryable(),
                        "an I/O failure should be retryable: {e:?}"
                    );
                    failed.push(i);
                }
                Err(other) => panic!("unexpected error on a full disk: {other:?}"),
            }
        }
        assert!(!failed.is_empty(), "the disk never filled up");
        disk.clear().unwrap();
        // The same handle: the writer reopens the file; an operation that
        // arrives while it does may still fail, retryably. Retry until one
        // succeeds (the bound only keeps a store that never recovers from
        // hanging the test).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for attempt in 1000.. {
            match store.upload(&upload_of(attempt)).await {
                Ok(_) => {
                    acked.push(attempt);
                    break;
                }
                Err(e) => assert!(e.is_retryable(), "{e:?}"),
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the store did not recover once the disk had room"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let check = |store: RedbStore, acked: Vec<usize>, failed: Vec<usize>| async move {
            for &i in &acked {
                let d = dev("@full:example.org", &format!("D{i}"));
                assert_eq!(store.otk_counts(&d).await.unwrap().get_str(SC), 50, "{d}");
            }
            for &i in &failed {
                let d = dev("@full:example.org", &format!("D{i}"));
                let n = store.otk_counts(&d).await.unwrap().get_str(SC);
                assert!(n == 0 || n == 50, "{d}: a failed upload left {n} keys");
            }
            store
        };
        let store = check(store, acked.clone(), failed.clone()).await;
        store.close().await.unwrap();
        let store = RedbStore::open(&path).await.unwrap();
        let store = check(store, acked, failed).await;
        store.close().await.unwrap();
    });
}

const USER: &str = "@eio:example.org";

fn keys(device: &str, names: &[&str]) -> Upload {
    Upload::from_keys(dev(USER, device), otks(SC, names), []).unwrap()
}

/// A store in a new directory whose file fails when told to; the
/// directory guard, the file's path and the faults.
async fn open_faulty(relaxed: bool) -> (tempfile::TempDir, PathBuf, Faults, RedbStore) {
    let dir = keyclaim_testing::temp_dir();
    let path = dir.path().join("k.redb");
    let faults = Faults::new();
    let mut options = RedbOptions::new().faults(faults.clone());
    if relaxed {
        options = options.durability(RedbDurability::Relaxed {
            flush_every: Duration::from_millis(20),
        });
    }
    let store = RedbStore::open_with(&path, options).await.unwrap();
    (dir, path, faults, store)
}

/// The device's stored one-time keys, read until the store answers.
async fn count(store: &RedbStore, device: &str) -> u64 {
    let d = dev(USER, device);
    retrying("counts", || store.otk_counts(&d))
        .await
        .get_str(SC)
}

/// Uploads one key to `device` until the store takes it.
async fn upload_until_ok(store: &RedbStore, device: &str, name: &str) {
    let up = keys(device, &[name]);
    retrying("upload", || store.upload(&up)).await;
}

/// The error of an operation on a failing disk: retryable storage.
fn assert_retryable<T: std::fmt::Debug>(what: &str, result: keyclaim::Result<T>) {
    match result {
        Err(e @ Error::Storage { .. }) if e.is_retryable() => {}
        other => panic!("{what}: expected a retryable storage error, got {other:?}"),
    }
}

/// While the disk fails, a read either fails retryably or shows nothing of
/// `device` (whose writes all failed): never data that is not on disk.
async fn not_served(store: &RedbStore, device: &str) {
    match store.otk_counts(&dev(USER, device)).await {
        Ok(counts) => assert_eq!(counts.total(), 0, "{device}: served data it could not sync"),
        Err(e) => assert!(e.is_retryable(), "{device}: {e:?}"),
    }
}

/// Opens the file without faults and checks the counts there.
async fn on_disk(path: &std::path::Path, want: &[(&str, u64)]) {
    let store = RedbStore::open(path).await.unwrap();
    for &(device, n) in want {
        assert_eq!(count(&store, device).await, n, "{device} after reopening");
    }
    store.close().await.unwrap();
}

/// R10.8: a write whose sync fails fails with a retryable error, and
/// nothing of it is acknowledged or served afterwards: the store reopens
/// the file and answers from what is on disk. A claim whose sync failed
/// used up nothing (its key was never delivered, the next claim gets it);
/// the store goes on working.
#[test]
fn a_failed_sync_fails_its_write_and_nothing_unsynced_is_served() {
    crate::rt().block_on(async {
        let (_dir, path, faults, store) = open_faulty(false).await;
        store.upload(&keys("A", &["A1", "A2", "A3"])).await.unwrap();
        faults.fail_syncs(1);
        assert_retryable("upload B", store.upload(&keys("B", &["B1"])).await);
        assert_eq!(faults.syncs_failed(), 1);
        // The writer reopens the file (its own syncs must not meet the next
        // injected fault).
        keyclaim_testing::wait_until("the writer reopens", Duration::from_secs(30), || {
            store.writer_stats().reopens >= 1
        })
        .await;
        assert_eq!(
            count(&store, "B").await,
            0,
            "served an upload whose sync failed"
        );
        assert_eq!(count(&store, "A").await, 3);
        faults.fail_syncs(1);
        let target = [ClaimTarget::one(dev(USER, "A"), alg(SC))];
        assert_retryable("claim", store.claim(&target).await);
        let out = retrying("claim again", || store.claim(&target)).await;
        let ids: Vec<&str> = out.keys.iter().map(|k| k.key_id.name()).collect();
        assert_eq!(ids, ["A1"], "the failed claim's key was used up or skipped");
        assert_eq!(count(&store, "A").await, 2);
        upload_until_ok(&store, "C", "C1").await;
        store.close().await.unwrap();
        on_disk(&path, &[("A", 2), ("B", 0), ("C", 1)]).await;
    });
}

/// R10.8: while every sync fails, every write fails retryably and nothing
/// of them is served; once the disk heals, the same store works again and
/// holds exactly the acknowledged writes.
#[test]
fn while_syncs_fail_writes_fail_retryably_and_the_store_recovers() {
    crate::rt().block_on(async {
        let (_dir, path, faults, store) = open_faulty(false).await;
        store.upload(&keys("A", &["A1", "A2"])).await.unwrap();
        faults.fail_syncs(u64::MAX);
        for i in 0..5 {
            let device = format!("F{i}");
            assert_retryable("upload", store.upload(&keys(&device, &["K"])).await);
            not_served(&store, &device).await;
        }
        let target = [ClaimTarget::one(dev(USER, "A"), alg(SC))];
        assert_retryable("claim", store.claim(&target).await);
        faults.heal();
        // Reads come back first, without waiting for a write to reopen the
        // file.
        assert_eq!(count(&store, "A").await, 2);
        for i in 0..5 {
            assert_eq!(count(&store, &format!("F{i}")).await, 0);
        }
        upload_until_ok(&store, "G", "G1").await;
        let out = retrying("claim after healing", || store.claim(&target)).await;
        assert_eq!(out.keys[0].key_id.name(), "A1");
        store.close().await.unwrap();
        let mut want = vec![("A", 1), ("G", 1)];
        let failed: Vec<String> = (0..5).map(|i| format!("F{i}")).collect();
        want.extend(failed.iter().map(|d| (d.as_str(), 0)));
        on_disk(&path, &want).await;
    });
}

/// R10.8: a write that fails with `EIO` fails its operation retryably and
/// applies nothing; the store works again once writes succeed.
#[test]
fn a_failed_write_fails_its_operation_and_the_store_recovers() {
    crate::rt().block_on(async {
        let (_dir, path, faults, store) = open_faulty(false).await;
        store.upload(&keys("A", &["A1"])).await.unwrap();
        faults.fail_writes(u64::MAX);
        assert_retryable("upload", store.upload(&keys("B", &["B1"])).await);
        assert!(faults.writes_failed() > 0);
        not_served(&store, "B").await;
        faults.heal();
        upload_until_ok(&store, "C", "C1").await;
        assert_eq!(count(&store, "B").await, 0);
        store.close().await.unwrap();
        on_disk(&path, &[("A", 1), ("B", 0), ("C", 1)]).await;
    });
}

/// R10.8 in relaxed mode: a flush whose sync fails loses the commits that
/// were not durable yet (as relaxed mode documents); the store reopens and
/// serves what is on disk, not them, and does not retry the flush in a
/// loop (it reopened: nothing is left to flush).
#[test]
fn relaxed_failed_flush_is_neither_served_nor_retried_in_a_loop() {
    crate::rt().block_on(async {
        let (_dir, path, faults, store) = open_faulty(true).await;
        store.upload(&keys("A", &["A1"])).await.unwrap();
        keyclaim_testing::wait_until("A is flushed", Duration::from_secs(30), || {
            store.writer_stats().flushes >= 1
        })
        .await;
        faults.fail_syncs(u64::MAX);
        // Acknowledged without an fsync, as relaxed mode does.
        store.upload(&keys("B", &["B1"])).await.unwrap();
        keyclaim_testing::wait_until("the flush fails", Duration::from_secs(30), || {
            store.writer_stats().failed_flushes >= 1
        })
        .await;
        // Nothing happens here: a writer that spun would fail flush after
        // flush meanwhile (the window is measured, so a slow machine only
        // makes it more lenient).
        let failed = store.writer_stats().failed_flushes;
        let since = Instant::now();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let more = store.writer_stats().failed_flushes - failed;
        let bound = 2 + since.elapsed().as_millis() as u64 / 10;
        assert!(
            more <= bound,
            "{more} more failed flushes in {:?}",
            since.elapsed()
        );
        not_served(&store, "B").await;
        faults.heal();
        assert_eq!(
            count(&store, "B").await,
            0,
            "served a commit whose flush failed"
        );
        assert_eq!(count(&store, "A").await, 1);
        upload_until_ok(&store, "C", "C1").await;
        store.close().await.unwrap();
        on_disk(&path, &[("A", 1), ("B", 0), ("C", 1)]).await;
    });
}
