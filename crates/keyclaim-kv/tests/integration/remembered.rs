//! R3.4 exactly: the newest `remembered_issued_keys` issued keys are
//! remembered, older ones are forgotten, and an upload prunes their rows so
//! that a device's rows stay bounded.

use std::sync::Arc;

use keyclaim::{KeyStore, Limits};
use keyclaim_conformance::fixtures::{SC, claim_n, dev, kid, put, signed};
use keyclaim_kv::{KvOptions, KvStore, MemoryEngine, Space};

use crate::rt;

#[test]
fn exactly_the_newest_issued_keys_are_remembered_and_older_rows_pruned() {
    rt().block_on(async {
        let mut limits = Limits::default();
        limits.remembered_issued_keys = 3;
        let engine = Arc::new(MemoryEngine::new());
        let store = KvStore::open_with(Arc::clone(&engine), KvOptions::new().limits(limits))
            .await
            .unwrap();
        let a = dev("@a:x", "A");
        let key = |i: usize| {
            (
                kid(&format!("{SC}:k{i:03}")),
                signed(&format!("material-{i}"), "s"),
            )
        };
        put(&store, &a, (0..100).map(key).collect(), vec![]).await;
        for _ in 0..20 {
            claim_n(&store, &a, SC, 5).await;
        }
        assert_eq!(store.otk_counts(&a).await.unwrap().get_str(SC), 0);
        assert_eq!(engine.len(Space::Keys), 100, "claims add and remove no row");
        // The 4th newest is forgotten: stored again. This upload prunes.
        let out = put(&store, &a, vec![key(96)], vec![]).await;
        assert_eq!(out.counts.get_str(SC), 1);
        assert_eq!(engine.len(Space::Keys), 3 + 1, "3 remembered, 1 stored");
        assert_eq!(engine.len(Space::Ids), 3 + 1);
        // The newest 3 are remembered: accepted, not stored.
        let out = put(&store, &a, vec![key(97), key(98), key(99)], vec![]).await;
        assert_eq!(out.counts.get_str(SC), 1);
        let snap = &store.export_devices(None, 10).await.unwrap()[0];
        let issued: Vec<&str> = snap.issued[&keyclaim::Algorithm::parse(SC).unwrap()]
            .iter()
            .map(|k| k.key_id.as_str())
            .collect();
        assert_eq!(
            issued,
            [
                "signed_curve25519:k097",
                "signed_curve25519:k098",
                "signed_curve25519:k099"
            ]
        );
        assert!(
            keyclaim::transfer::check_store(&store, 10)
                .await
                .unwrap()
                .problems
                .is_empty()
        );
    });
}
