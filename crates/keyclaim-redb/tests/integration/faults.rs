//! Storage faults: after a full disk, the same store works again once
//! there is room (the writer reopens the redb file after an I/O error).
//!
//! Needs root and `mount -t tmpfs` (`keyclaim_testing::DiskFull`); where
//! that is unavailable the test prints `SKIPPED` on stderr and passes, and
//! under `CI=true` it fails.

use std::time::Duration;

use keyclaim::{Error, KeyStore, Upload};
use keyclaim_conformance::fixtures::{SC, dev, otks};
use keyclaim_redb::RedbStore;
use keyclaim_testing::DiskFull;

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
