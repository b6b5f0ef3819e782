//! The writer's queue: bounded (a full queue refuses at once, retryably),
//! operations whose caller went away are dropped unapplied (R10.6), and
//! operations that queue up while a batch is written share the next batch.

use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use keyclaim::{ClaimTarget, KeyStore};
use keyclaim_conformance::fixtures::{SC, alg, dev, numbered_otks, put, upload_of};
use keyclaim_kv::{KvOptions, KvStore};

use crate::faults::{FaultyEngine, faulty_store};
use crate::{rt, within};

/// Waits until the engine's writes have started `n` times: the writer
/// is then inside the engine's write of its current batch.
async fn writes_started(engine: &FaultyEngine, n: usize) {
    keyclaim_testing::wait_until(
        "the writer reaches the engine",
        Duration::from_secs(30),
        || engine.writes_started.load(Ordering::SeqCst) >= n,
    )
    .await;
}

/// Starts an upload to a device of its own and holds the writer inside the
/// engine's write of it; returns the upload's task.
async fn hold_writer(
    engine: &std::sync::Arc<FaultyEngine>,
    store: &std::sync::Arc<KvStore<std::sync::Arc<FaultyEngine>>>,
) -> tokio::task::JoinHandle<keyclaim::Result<keyclaim::UploadOutcome>> {
    engine.hold();
    let before = engine.writes_started.load(Ordering::SeqCst);
    let task = {
        let store = std::sync::Arc::clone(store);
        tokio::spawn(async move {
            let h = dev("@holder:x", "H");
            store
                .upload(&upload_of(&h, numbered_otks(SC, "h", 1), vec![]))
                .await
        })
    };
    writes_started(engine, before + 1).await;
    task
}

#[test]
fn a_full_queue_refuses_at_once_and_recovers() {
    rt().block_on(async {
        let (engine, store) = faulty_store(KvOptions::new().max_queued(2)).await;
        let store = std::sync::Arc::new(store);
        let holder = hold_writer(&engine, &store).await;
        let ups: Vec<_> = (0..3)
            .map(|i| {
                upload_of(
                    &dev("@q:x", &format!("Q{i}")),
                    numbered_otks(SC, "q", 1),
                    vec![],
                )
            })
            .collect();
        // Two fit in the queue and wait for their answers...
        let mut first = Box::pin(store.upload(&ups[0]));
        let mut second = Box::pin(store.upload(&ups[1]));
        assert!(futures::poll!(&mut first).is_pending());
        assert!(futures::poll!(&mut second).is_pending());
        // ...the third is refused at once, retryably.
        match futures::poll!(Box::pin(store.upload(&ups[2]))) {
            Poll::Ready(Err(e)) => assert!(e.is_retryable(), "{e:?}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(store.writer_stats().refused, 1);
        engine.release();
        within("holder", holder).await.unwrap().unwrap();
        within("first", first).await.unwrap();
        within("second", second).await.unwrap();
        // Room again.
        within("third", store.upload(&ups[2])).await.unwrap();
    });
}

#[test]
fn a_claim_whose_caller_went_away_is_not_applied() {
    rt().block_on(async {
        let (engine, store) = faulty_store(KvOptions::new()).await;
        let store = std::sync::Arc::new(store);
        let a = dev("@a:x", "A");
        put(&*store, &a, numbered_otks(SC, "k", 2), vec![]).await;
        let holder = hold_writer(&engine, &store).await;
        let target = [ClaimTarget::one(a.clone(), alg(SC))];
        let mut gone = Box::pin(store.claim(&target));
        assert!(futures::poll!(&mut gone).is_pending(), "queued");
        drop(gone);
        engine.release();
        within("holder", holder).await.unwrap().unwrap();
        // The writer runs operations in order: once this one is answered,
        // it has passed the dropped claim.
        let out = within("claim", store.claim(&target)).await.unwrap();
        assert_eq!(out.keys[0].key_id.as_str(), "signed_curve25519:k000000");
        assert_eq!(store.otk_counts(&a).await.unwrap().get_str(SC), 1);
        assert_eq!(store.writer_stats().abandoned, 1);
    });
}

#[test]
fn operations_that_queue_during_a_write_share_the_next_batch() {
    rt().block_on(async {
        let (engine, store) = faulty_store(KvOptions::new()).await;
        let store = std::sync::Arc::new(store);
        let devices: Vec<_> = (0..16).map(|i| dev("@c:x", &format!("C{i}"))).collect();
        for d in &devices {
            put(&*store, d, numbered_otks(SC, "k", 1), vec![]).await;
        }
        let holder = hold_writer(&engine, &store).await;
        let mut claims = Vec::new();
        for d in &devices {
            let mut claim = Box::pin({
                let store = std::sync::Arc::clone(&store);
                let target = [ClaimTarget::one(d.clone(), alg(SC))];
                async move { store.claim(&target).await }
            });
            assert!(futures::poll!(&mut claim).is_pending());
            claims.push(claim);
        }
        engine.release();
        within("holder", holder).await.unwrap().unwrap();
        for claim in claims {
            assert_eq!(within("claim", claim).await.unwrap().keys.len(), 1);
        }
        assert_eq!(store.writer_stats().largest_batch, 16);
    });
}
