//! Data keyclaim did not write (a corrupt value, a key of the wrong shape):
//! the operation that meets it fails with `Error::Corrupt` before anything
//! is written, its batch-mates go on, nothing panics, and `check` reports
//! it (R10.7).

use std::sync::Arc;

use keyclaim::transfer::check_store;
use keyclaim::{ClaimTarget, Error, KeyStore};
use keyclaim_conformance::fixtures::{SC, alg, dev, kid, numbered_otks, put, signed_fallback};
use keyclaim_kv::{KvEngine, KvStore, MemoryEngine, Space, WriteBatch};

use crate::rt;

/// Writes one row behind keyclaim's back, as a misbehaving program would.
fn tamper(engine: &MemoryEngine, space: Space, key: Vec<u8>, value: &[u8]) {
    let mut batch = WriteBatch::new();
    batch.put(space, key, value.to_vec());
    engine.write(&batch, true).unwrap();
}

fn key_row(user: &str, device: &str, alg: &str, pos: u64) -> Vec<u8> {
    let mut k = Vec::new();
    for s in [user, device, alg] {
        k.extend_from_slice(s.as_bytes());
        k.push(0);
    }
    k.extend_from_slice(&pos.to_be_bytes());
    k
}

fn assert_corrupt<T: std::fmt::Debug>(result: keyclaim::Result<T>, what: &str) {
    assert!(
        matches!(result, Err(Error::Corrupt { .. })),
        "{what}: expected Corrupt, got {result:?}"
    );
}

async fn store() -> (Arc<MemoryEngine>, KvStore<Arc<MemoryEngine>>) {
    let engine = Arc::new(MemoryEngine::new());
    let store = KvStore::open(Arc::clone(&engine)).await.unwrap();
    (engine, store)
}

#[test]
fn a_corrupt_key_fails_its_claim_alone_and_consumes_nothing() {
    rt().block_on(async {
        let (engine, store) = store().await;
        let (a, b) = (dev("@a:x", "A"), dev("@b:x", "B"));
        put(&store, &a, numbered_otks(SC, "k", 2), vec![]).await;
        put(&store, &b, numbered_otks(SC, "k", 2), vec![]).await;
        for damage in [&b"\x00\x01"[..], b""] {
            tamper(&engine, Space::Keys, key_row("@a:x", "A", SC, 0), damage);
            let (ta, tb) = (
                [ClaimTarget::one(a.clone(), alg(SC))],
                [ClaimTarget::one(b.clone(), alg(SC))],
            );
            let (bad, good) = tokio::join!(store.claim(&ta), store.claim(&tb));
            assert_corrupt(bad, "claim of the damaged key");
            assert_eq!(good.unwrap().keys.len(), 1, "the batch-mate went on");
            assert_eq!(store.otk_counts(&a).await.unwrap().get_str(SC), 2);
        }
        // A valid row whose JSON does not match its digest, or is no JSON.
        let mut row = Vec::new();
        row.extend_from_slice(&1u64.to_be_bytes());
        row.extend_from_slice(&[9; 32]);
        for s in ["signed_curve25519:k000000", "{not json"] {
            row.extend_from_slice(&(s.len() as u32).to_be_bytes());
            row.extend_from_slice(s.as_bytes());
        }
        tamper(&engine, Space::Keys, key_row("@a:x", "A", SC, 0), &row);
        assert_corrupt(
            store.claim(&[ClaimTarget::one(a.clone(), alg(SC))]).await,
            "claim of a key that is no JSON",
        );
        assert_eq!(store.otk_counts(&a).await.unwrap().get_str(SC), 2);
        let report = check_store(&store, 10).await;
        assert_corrupt(report, "check");
    });
}

#[test]
fn a_corrupt_device_record_is_an_error_everywhere_and_never_a_panic() {
    rt().block_on(async {
        let (engine, store) = store().await;
        let a = dev("@a:x", "A");
        put(
            &store,
            &a,
            numbered_otks(SC, "k", 2),
            vec![(kid("signed_curve25519:f"), signed_fallback("f", "s"))],
        )
        .await;
        let record = engine.get(Space::Devices, b"@a:x\0A\0").unwrap().unwrap();
        let mut damaged = vec![
            record[..record.len() - 1].to_vec(),
            [record.clone(), vec![0]].concat(),
            vec![0xff; 8],
            Vec::new(),
        ];
        // A queue whose head lies after its end.
        let mut swapped = record.clone();
        let at = 8 + 4 + SC.len() + 8;
        swapped[at..at + 8].copy_from_slice(&9u64.to_be_bytes());
        damaged.push(swapped);
        for value in damaged {
            tamper(&engine, Space::Devices, b"@a:x\0A\0".to_vec(), &value);
            let target = [ClaimTarget::one(a.clone(), alg(SC))];
            assert_corrupt(store.claim(&target).await, "claim");
            assert_corrupt(store.sync_state(&a).await, "sync_state");
            assert_corrupt(
                store.counts_many(std::slice::from_ref(&a)).await,
                "counts_many",
            );
            assert_corrupt(store.fallback_keys(&a).await, "fallback_keys");
            assert_corrupt(
                store
                    .upload(&keyclaim_conformance::fixtures::upload_of(
                        &a,
                        numbered_otks(SC, "n", 1),
                        vec![],
                    ))
                    .await,
                "upload",
            );
            assert_corrupt(check_store(&store, 10).await, "check");
        }
        // Deleting the device removes the damage.
        store.delete_device(&a).await.unwrap();
        assert!(check_store(&store, 10).await.unwrap().problems.is_empty());
    });
}

#[test]
fn keys_of_the_wrong_shape_are_reported_by_check() {
    rt().block_on(async {
        let (engine, store) = store().await;
        let a = dev("@a:x", "A");
        put(&store, &a, numbered_otks(SC, "k", 2), vec![]).await;
        assert!(check_store(&store, 10).await.unwrap().problems.is_empty());
        let cases: Vec<(Space, Vec<u8>, Vec<u8>)> = vec![
            // A record key without its terminator.
            (Space::Devices, b"@z:x\0Z".to_vec(), vec![0; 16]),
            // A key row of the device without a position.
            (
                Space::Keys,
                b"@a:x\0A\0signed_curve25519\0".to_vec(),
                vec![],
            ),
            // A key row of an algorithm without a queue.
            (Space::Keys, key_row("@a:x", "A", "other", 0), vec![]),
            // An index row with a short digest.
            (
                Space::Ids,
                key_row("@a:x", "A", "signed_curve25519:k000000", 0),
                vec![1],
            ),
        ];
        for (space, key, value) in cases {
            tamper(&engine, space, key.clone(), &value);
            assert_corrupt(check_store(&store, 10).await, &format!("{space} {key:?}"));
            let mut batch = WriteBatch::new();
            batch.delete(space, key);
            engine.write(&batch, true).unwrap();
        }
        assert!(check_store(&store, 10).await.unwrap().problems.is_empty());
        // A damaged index row fails the upload that reads it.
        tamper(
            &engine,
            Space::Ids,
            key_row("@a:x", "A", "signed_curve25519:k000000", 0),
            &[1],
        );
        assert_corrupt(
            store
                .upload(&keyclaim_conformance::fixtures::upload_of(
                    &a,
                    numbered_otks(SC, "k", 1),
                    vec![],
                ))
                .await,
            "upload",
        );
    });
}
