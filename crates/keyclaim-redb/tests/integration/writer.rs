//! The writer thread under injected faults (`keyclaim_redb::faults`): a
//! panic fails its batch and the writer goes on; its queue is bounded, and
//! operations whose callers gave up are not applied (R10.6).

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use futures::future::join_all;
use keyclaim::{ClaimTarget, Error, KeyStore, Upload, UploadOutcome};
use keyclaim_conformance::fixtures::{SC, alg, dev, otks};
use keyclaim_redb::faults::Faults;
use keyclaim_redb::{RedbOptions, RedbStore};

use crate::{retrying, within};

fn upload(user: &str, device: &str, names: &[&str]) -> Upload {
    Upload::from_keys(dev(user, device), otks(SC, names), []).unwrap()
}

async fn open(dir: &tempfile::TempDir, faults: &Faults) -> RedbStore {
    open_with(dir, RedbOptions::new().faults(faults.clone())).await
}

async fn open_with(dir: &tempfile::TempDir, options: RedbOptions) -> RedbStore {
    RedbStore::open_with(dir.path().join("k.redb"), options)
        .await
        .unwrap()
}

/// A panic inside the writer thread fails the operation it held with a
/// non-retryable `Error::Storage` (not a hang), applies nothing of it, and
/// the writer goes on: every later write is served, also after a second
/// panic, and the data is intact after reopening.
#[test]
fn writer_panic_fails_its_batch_and_the_writer_goes_on() {
    crate::rt().block_on(async {
        let dir = keyclaim_testing::temp_dir();
        let faults = Faults::new();
        let store = open(&dir, &faults).await;
        let user = "@panic:example.org";
        within(
            "upload",
            store.upload(&upload(user, "A", &["A1", "A2", "A3"])),
        )
        .await
        .unwrap();
        for round in 0..2 {
            faults.panic_writer();
            let device = format!("LOST{round}");
            let err = within(
                "the panicking upload",
                store.upload(&upload(user, &device, &["L"])),
            )
            .await
            .unwrap_err();
            assert!(
                matches!(err, Error::Storage { .. }) && !err.is_retryable(),
                "a writer panic should be a non-retryable storage error: {err:?}"
            );
            // Reads fail, retryably, while the writer reopens the file.
            let lost = dev(user, &device);
            let counts = retrying("counts", || store.otk_counts(&lost)).await;
            assert_eq!(counts.total(), 0, "the panicked upload was applied");
            // The writer goes on: uploads and claims, alone and together.
            let later: Vec<_> = (0..8)
                .map(|i| {
                    let store = &store;
                    async move {
                        let name = format!("B{round}-{i}");
                        let up = upload(user, &format!("B{round}-{i}"), &[name.as_str()]);
                        store.upload(&up).await
                    }
                })
                .collect();
            for result in within("writes after a panic", futures::future::join_all(later)).await {
                result.unwrap();
            }
            let claim = [ClaimTarget::one(dev(user, "A"), alg(SC))];
            let out = within("claim after a panic", store.claim(&claim))
                .await
                .unwrap();
            assert_eq!(out.keys.len(), 1);
        }
        assert_eq!(store.writer_stats().panics, 2);
        store.close().await.unwrap();
        let store = open(&dir, &faults).await;
        assert_eq!(
            store.otk_counts(&dev(user, "A")).await.unwrap().get_str(SC),
            1
        );
        for round in 0..2 {
            for i in 0..8 {
                let d = dev(user, &format!("B{round}-{i}"));
                assert_eq!(store.otk_counts(&d).await.unwrap().get_str(SC), 1, "{d}");
            }
        }
    });
}

/// R10.6: 1,000 claims, each under a 100 ms timeout, queued while the
/// writer is stalled: their callers give up, and when the writer resumes it
/// applies none of them, so the device's count has not dropped.
#[test]
fn claims_whose_callers_gave_up_are_not_applied() {
    crate::rt().block_on(async {
        let dir = keyclaim_testing::temp_dir();
        let faults = Faults::new();
        let store = open(&dir, &faults).await;
        let user = "@gone:example.org";
        let names: Vec<String> = (0..50).map(|n| format!("K{n}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        store.upload(&upload(user, "POOL", &names)).await.unwrap();
        let pool = dev(user, "POOL");
        let stall = faults.stall_writer();
        let claims = (0..1000).map(|_| {
            let target = [ClaimTarget::one(pool.clone(), alg(SC))];
            let store = &store;
            async move {
                tokio::time::timeout(Duration::from_millis(100), store.claim(&target))
                    .await
                    .is_err()
            }
        });
        let timed_out = within("the timed-out claims", join_all(claims)).await;
        assert!(
            timed_out.iter().all(|&t| t),
            "a claim was answered while the writer was stalled"
        );
        drop(stall);
        // The writer takes operations in order: once this upload is
        // answered, it has dealt with every claim queued before it.
        within(
            "a write after the claims",
            store.upload(&upload(user, "LATER", &["L"])),
        )
        .await
        .unwrap();
        assert_eq!(
            store.otk_counts(&pool).await.unwrap().get_str(SC),
            50,
            "claims nobody waited for used up keys"
        );
        assert_eq!(store.writer_stats().abandoned, 1000);
    });
}

/// R10.6: the writer's queue holds at most `max_queued` operations; past
/// that an operation fails at once (on its first poll) with a retryable
/// `Error::Storage` and is not applied, the queued ones are answered once
/// the writer goes on, and a refused operation succeeds when tried again.
#[test]
fn a_full_queue_refuses_at_once_with_a_retryable_error() {
    crate::rt().block_on(async {
        let dir = keyclaim_testing::temp_dir();
        let faults = Faults::new();
        let options = RedbOptions::new()
            .faults(faults.clone())
            .max_batch(1)
            .max_queued(8);
        let store = open_with(&dir, options).await;
        let user = "@full:example.org";
        let uploads: Vec<Upload> = (0..20)
            .map(|i| upload(user, &format!("D{i}"), &["K"]))
            .collect();
        let stall = faults.stall_writer();
        type Pending<'a> = Pin<Box<dyn Future<Output = keyclaim::Result<UploadOutcome>> + 'a>>;
        let mut calls: Vec<Pending<'_>> = uploads
            .iter()
            .map(|u| Box::pin(store.upload(u)) as Pending<'_>)
            .collect();
        // The first is taken by the writer, which stalls holding it.
        assert!(futures::poll!(&mut calls[0]).is_pending());
        keyclaim_testing::wait_until("the writer stalls", Duration::from_secs(30), || {
            faults.writer_stalled()
        })
        .await;
        // The queue takes 8 more; the rest are refused on their first poll.
        let mut refused = Vec::new();
        for (i, call) in calls.iter_mut().enumerate().skip(1) {
            match futures::poll!(call) {
                Poll::Pending => {}
                Poll::Ready(Err(e)) => {
                    assert!(
                        matches!(e, Error::Storage { .. }) && e.is_retryable(),
                        "a full queue should refuse with a retryable storage error: {e:?}"
                    );
                    refused.push(i);
                }
                Poll::Ready(Ok(_)) => panic!("upload {i} answered while the writer was stalled"),
            }
        }
        assert_eq!(refused, (9..20).collect::<Vec<_>>());
        assert_eq!(store.writer_stats().refused, 11);
        drop(stall);
        for (i, call) in calls.into_iter().enumerate().take(9) {
            within("a queued upload", call)
                .await
                .unwrap_or_else(|e| panic!("{i}: {e:?}"));
        }
        for i in 0..20 {
            let stored = store
                .otk_counts(&dev(user, &format!("D{i}")))
                .await
                .unwrap();
            assert_eq!(stored.total(), u64::from(i < 9), "D{i}");
        }
        // Room again: a refused upload goes through when tried again.
        within("a retried upload", store.upload(&uploads[9]))
            .await
            .unwrap();
        assert_eq!(store.otk_counts(&dev(user, "D9")).await.unwrap().total(), 1);
    });
}
