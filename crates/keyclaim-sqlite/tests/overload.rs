//! Overload and abandoned requests (R10.6): the writer's queue is bounded,
//! and a claim whose caller went away before it was applied uses up no key.

// A test: a failed expectation is how it reports.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{device, key};
use keyclaim::{ClaimTarget, Error, KeyStore, Upload};
use keyclaim_sqlite::{SqliteOptions, SqliteStore};

fn target(i: usize) -> ClaimTarget {
    ClaimTarget::one(device(i), "signed_curve25519".parse().unwrap())
}

async fn upload_keys(store: &SqliteStore, i: usize, n: usize) {
    let keys = (0..n).map(|j| key(&format!("k{j}")));
    let upload = Upload::from_keys(device(i), keys, []).unwrap();
    store.upload(&upload).await.unwrap();
}

async fn count(store: &SqliteStore, i: usize) -> u64 {
    store.otk_counts(&device(i)).await.unwrap().total()
}

/// R10.6: another process holds the file's write lock while 1,000 claims
/// each give up after 100 ms; once the lock is released, none of them is
/// applied: the device's count does not drop, and the next claim gets the
/// oldest key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r10_6_claims_abandoned_while_the_file_is_locked_use_up_no_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locked.sqlite");
    let store = SqliteStore::open(&path).await.unwrap();
    upload_keys(&store, 0, 100).await;

    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let one = [target(0)];
    let claims =
        (0..1000).map(|_| tokio::time::timeout(Duration::from_millis(100), store.claim(&one)));
    let outcomes = futures::future::join_all(claims).await;
    for outcome in outcomes {
        match outcome {
            // Timed out: the future was dropped.
            Err(_) => {}
            Ok(Err(e)) if e.is_retryable() => {}
            Ok(other) => panic!("a claim went through a locked file: {other:?}"),
        }
    }
    other.execute_batch("ROLLBACK").unwrap();
    drop(other);

    // The writer takes operations in order: once this claim answers, every
    // abandoned one before it has been dealt with.
    let out = store.claim(&[target(0)]).await.unwrap();
    assert_eq!(out.keys.len(), 1);
    assert_eq!(
        out.keys[0].key_id.as_str(),
        "signed_curve25519:k0",
        "the abandoned claims took no key"
    );
    assert_eq!(count(&store, 0).await, 99);
}

/// R10.6: past `max_queued` waiting operations, a write fails at once with
/// a retryable `Error::Storage`, having done nothing; the queued ones go
/// through once the lock is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r10_6_a_full_write_queue_fails_at_once_with_a_retryable_error() {
    const CLAIMS: usize = 20;
    const QUEUED: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.sqlite");
    let options = SqliteOptions::new()
        .max_queued(QUEUED)
        .max_batch(1)
        .busy_timeout(Duration::from_secs(30));
    let store = Arc::new(SqliteStore::open_with(&path, options).await.unwrap());
    upload_keys(&store, 0, 100).await;

    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let results = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..CLAIMS {
        let (store, results) = (Arc::clone(&store), Arc::clone(&results));
        tasks.push(tokio::spawn(async move {
            let out = store.claim(&[target(0)]).await;
            results.lock().unwrap().push(out);
        }));
    }
    // At most QUEUED wait in the queue and one in the writer's batch: the
    // others are refused while the lock is still held.
    let refused = CLAIMS - QUEUED - 1;
    let deadline = Instant::now() + Duration::from_secs(20);
    while results.lock().unwrap().len() < refused {
        assert!(
            Instant::now() < deadline,
            "only {} of {CLAIMS} claims answered while the file was locked",
            results.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let answered = results.lock().unwrap().len();
    for out in results.lock().unwrap().iter() {
        match out {
            Err(e @ Error::Storage { .. }) => {
                assert!(e.is_retryable(), "{e}");
                assert!(format!("{e:?}").contains("queue is full"), "{e:?}");
            }
            other => panic!("expected a full queue, got {other:?}"),
        }
    }
    other.execute_batch("ROLLBACK").unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    let claimed = results.lock().unwrap().iter().filter(|r| r.is_ok()).count();
    assert_eq!(
        claimed,
        CLAIMS - answered,
        "every queued claim went through"
    );
    assert_eq!(count(&store, 0).await, 100 - claimed as u64);
}
