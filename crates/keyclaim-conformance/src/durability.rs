//! Contract section 10: durability, restarts and several handles.

use std::collections::BTreeSet;
use std::sync::Arc;

use keyclaim::KeyStore;

use crate::StoreFactory;
use crate::fixtures::*;

cases! { $ durability;
    /// R10.1: every acknowledged write survives closing and reopening: stored
    /// OTKs and their order, fallback keys and used flags, claims, remembered
    /// issued keys, deletions.
    #[needs(Persistent)]
    pub async fn r10_1_writes_survive_reopen<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let (a, b) = (alice(), bob());
        put(&store, &a, otks(SC, &["C", "D"]), otks(SC, &["F"])).await;
        put(&store, &a, otks(SC, &["A", "B"]), otks("alg2", &["G"])).await;
        put(&store, &b, otks(SC, &["A"]), vec![]).await;
        let first = claim_one(&store, &a, SC).await.expect("C");
        claim_one(&store, &a, "alg2").await.expect("alg2 fallback");
        store.delete_device(&b).await.expect("delete");
        let before = full_state(&store).await;
        let store = f.reopen(store).await.expect("reopen");
        assert_eq!(
            full_state(&store).await,
            before,
            "state changed across reopen"
        );
        assert_eq!(count(&store, &a, SC).await, 3);
        assert_eq!(unused(&store, &a).await, [SC]);
        assert_eq!(count(&store, &b, SC).await, 0);
        // The remembered issued key survived: re-uploading C stores nothing.
        let out = put(
            &store,
            &a,
            vec![(first.key_id.clone(), first.key_json.clone())],
            vec![],
        )
        .await;
        assert_eq!(out.counts.get_str(SC), 3);
        // Order survived, and new uploads sort after the old ones.
        put(&store, &a, otks(SC, &["0"]), vec![]).await;
        let out = claim_n(&store, &a, SC, 5).await;
        assert_eq!(
            ids(&out.keys),
            [
                "signed_curve25519:D",
                "signed_curve25519:A",
                "signed_curve25519:B",
                "signed_curve25519:0"
            ]
        );
    }

    /// R10.2: after a reopen, every rule still holds: claims after reopen never
    /// return a key claimed before it, counts agree with what claims return.
    #[needs(Persistent)]
    pub async fn r10_2_invariants_hold_after_reopen<F: StoreFactory>(f: &F) {
        let mut store = fresh(f).await;
        let a = alice();
        let mut issued = BTreeSet::new();
        for round in 0..4 {
            put(
                &store,
                &a,
                numbered_otks(SC, &format!("R{round}-"), 10),
                vec![],
            )
            .await;
            let out = claim_n(&store, &a, SC, 5).await;
            for k in &out.keys {
                assert!(
                    issued.insert(k.key_id.to_string()),
                    "{} issued twice",
                    k.key_id
                );
            }
            store = f.reopen(store).await.expect("reopen");
        }
        let left = count(&store, &a, SC).await;
        assert_eq!(left, 40 - issued.len() as u64);
        let out = claim_n(&store, &a, SC, 5).await;
        for k in &out.keys {
            assert!(
                issued.insert(k.key_id.to_string()),
                "{} issued twice",
                k.key_id
            );
        }
    }

    /// R10.3: two handles on one store (two processes) never hand out one key twice.
    #[needs(Shared)]
    pub async fn r10_3_shared_handles_never_double_issue<F: StoreFactory>(f: &F) {
        let one = Arc::new(fresh(f).await);
        let two = Arc::new(f.open_shared(&one).await.expect("second handle"));
        let a = alice();
        put(&*one, &a, numbered_otks(SC, "K", 60), otks(SC, &["FB"])).await;
        let mut tasks = Vec::new();
        for i in 0..8 {
            let store: Arc<dyn KeyStore> = if i % 2 == 0 { one.clone() } else { two.clone() };
            let a = a.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..10 {
                    got.extend(claim_one(&*store, &a, SC).await);
                }
                got
            }));
        }
        let mut otk_ids = BTreeSet::new();
        let mut fallbacks = 0;
        for t in tasks {
            for k in t.await.expect("task") {
                if k.fallback {
                    fallbacks += 1;
                } else {
                    assert!(
                        otk_ids.insert(k.key_id.to_string()),
                        "{} issued twice",
                        k.key_id
                    );
                }
            }
        }
        assert_eq!(otk_ids.len(), 60);
        assert_eq!(fallbacks, 20);
    }
}
