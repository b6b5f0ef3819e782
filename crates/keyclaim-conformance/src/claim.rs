//! Contract section 4: claim.

use std::collections::BTreeSet;
use std::sync::Arc;

use keyclaim::{ClaimTarget, KeyStore};

use crate::StoreFactory;
use crate::fixtures::*;

cases! { $ claim;
    /// R4.1: the store API takes a count per target.
    pub async fn r4_1_count_per_target<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let (a, b) = (alice(), bob());
        put(&store, &a, otks(SC, &["1", "2", "3", "4"]), vec![]).await;
        put(&store, &b, otks(SC, &["1", "2", "3", "4"]), vec![]).await;
        let out = store
            .claim(&[
                ClaimTarget {
                    device: a.clone(),
                    algorithm: alg(SC),
                    count: 3,
                },
                ClaimTarget {
                    device: b.clone(),
                    algorithm: alg(SC),
                    count: 1,
                },
            ])
            .await
            .expect("claim");
        assert_eq!(out.keys.iter().filter(|k| k.device == a).count(), 3);
        assert_eq!(out.keys.iter().filter(|k| k.device == b).count(), 1);
        assert_eq!(
            (count(&store, &a, SC).await, count(&store, &b, SC).await),
            (1, 3)
        );
    }

    /// R4.2: a claimed key is gone: never returned again, not counted.
    pub async fn r4_2_claimed_keys_are_removed<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        put(&store, &a, otks(SC, &["A", "B", "C"]), vec![]).await;
        let mut seen = BTreeSet::new();
        for left in [2, 1, 0] {
            let k = claim_one(&store, &a, SC).await.expect("a key");
            assert!(!k.fallback);
            assert!(
                seen.insert(k.key_id.to_string()),
                "{} issued twice",
                k.key_id
            );
            assert_eq!(count(&store, &a, SC).await, left);
        }
        assert!(claim_one(&store, &a, SC).await.is_none());
    }

    /// R4.3: with N keys and M > N concurrent claims, exactly N get distinct
    /// OTKs; without a fallback key the others get nothing.
    pub async fn r4_3_concurrent_claims_never_under_issue<F: StoreFactory>(f: &F) {
        let store = Arc::new(fresh(f).await);
        let a = alice();
        let n = 20;
        put(&*store, &a, numbered_otks(SC, "K", n), vec![]).await;
        let got = race(store.clone(), 3 * n).await;
        let distinct: BTreeSet<_> = got.iter().map(|k| k.key_id.to_string()).collect();
        assert_eq!(got.len(), n, "exactly N claims get a key");
        assert_eq!(distinct.len(), n, "no key twice");
        assert!(got.iter().all(|k| !k.fallback));
        assert_eq!(count(&*store, &a, SC).await, 0);
    }

    /// R4.3 with a fallback key: N claims get the N OTKs, all others the
    /// fallback key; nobody gets the fallback while OTKs remain.
    pub async fn r4_3_concurrent_claims_with_fallback<F: StoreFactory>(f: &F) {
        let store = Arc::new(fresh(f).await);
        let a = alice();
        let n = 20;
        put(&*store, &a, numbered_otks(SC, "K", n), otks(SC, &["FB"])).await;
        let got = race(store.clone(), 2 * n).await;
        assert_eq!(got.len(), 2 * n, "every claim gets something");
        let otk_ids: BTreeSet<_> = got
            .iter()
            .filter(|k| !k.fallback)
            .map(|k| k.key_id.to_string())
            .collect();
        assert_eq!(otk_ids.len(), n, "all N OTKs, each once");
        assert_eq!(got.iter().filter(|k| k.fallback).count(), n);
    }

    /// R4.4: without OTKs the fallback key is returned, marked used, and
    /// returned again on later claims.
    pub async fn r4_4_fallback_when_no_otk_and_marked_used<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        let fb = (kid("signed_curve25519:FB"), signed_fallback("fb", "s"));
        put(&store, &a, otks(SC, &["A"]), vec![fb.clone()]).await;
        let k = claim_one(&store, &a, SC).await.expect("A");
        assert!(!k.fallback, "an OTK first");
        assert_eq!(
            unused(&store, &a).await,
            [SC],
            "OTK claims leave the fallback unused"
        );
        for _ in 0..3 {
            let k = claim_one(&store, &a, SC).await.expect("fallback");
            assert!(k.fallback);
            assert_eq!((k.key_id, k.key_json), fb.clone());
            assert!(unused(&store, &a).await.is_empty(), "used after a claim");
        }
    }

    /// R4.5: a count beyond the available OTKs returns what there is, and the
    /// fallback only when no OTK was returned.
    pub async fn r4_5_count_beyond_available<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        put(&store, &a, otks(SC, &["A", "B"]), otks(SC, &["FB"])).await;
        let out = claim_n(&store, &a, SC, 5).await;
        assert_eq!(
            ids(&out.keys),
            ["signed_curve25519:A", "signed_curve25519:B"]
        );
        assert_eq!(
            unused(&store, &a).await,
            [SC],
            "no fallback when OTKs were returned"
        );
        let out = claim_n(&store, &a, SC, 5).await;
        assert_eq!(out.keys.len(), 1);
        assert!(out.keys[0].fallback);
        assert!(unused(&store, &a).await.is_empty());
    }

    /// R4.6: targets with nothing to hand out are left out entirely.
    pub async fn r4_6_nothing_to_hand_out_is_left_out<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        put(&store, &a, otks(SC, &["A"]), vec![]).await;
        let out = store
            .claim(&[
                ClaimTarget::one(dev("@nobody:example.org", "X"), alg(SC)),
                ClaimTarget::one(dev("@alice:example.org", "OTHERDEV"), alg(SC)),
                ClaimTarget::one(a.clone(), alg("curve25519")),
                ClaimTarget::one(a.clone(), alg(SC)),
            ])
            .await
            .expect("claim");
        assert_eq!(ids(&out.keys), ["signed_curve25519:A"]);
        let wire = out.to_wire();
        assert_eq!(wire.as_object().map(|m| m.len()), Some(1), "{wire}");
        assert_eq!(
            wire["@alice:example.org"].as_object().map(|m| m.len()),
            Some(1),
            "{wire}"
        );
        // Through the facade: no empty maps, no failures.
        let api = keyclaim::KeysApi::new(store);
        let b = body(serde_json::json!({"one_time_keys": {
            "@nobody:example.org": {"X": SC},
            "@alice:example.org": {"ALICEDEV": SC, "OTHERDEV": SC},
        }}));
        let out = api.claim(&b).await.expect("claim");
        assert_eq!(
            out,
            serde_json::json!({"one_time_keys": {}, "failures": {}})
        );
    }

    /// R4.7: one claim names a thousand devices and is served at once.
    pub async fn r4_7_many_devices_in_one_claim<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let n = 1000;
        let devices: Vec<_> = (0..n)
            .map(|i| dev(&format!("@u{i}:example.org"), "D"))
            .collect();
        for (i, d) in devices.iter().enumerate() {
            let fallback = if i % 2 == 0 {
                otks(SC, &["FB"])
            } else {
                vec![]
            };
            put(&store, d, otks(SC, &["A", "B"]), fallback).await;
        }
        let targets: Vec<_> = devices
            .iter()
            .map(|d| ClaimTarget::one(d.clone(), alg(SC)))
            .collect();
        for round in 0..3 {
            let out = store.claim(&targets).await.expect("bulk claim");
            let want = if round < 2 { n } else { n / 2 };
            assert_eq!(out.keys.len(), want, "round {round}");
            assert_eq!(
                out.keys.iter().filter(|k| k.fallback).count(),
                if round < 2 { 0 } else { n / 2 }
            );
            let distinct: BTreeSet<_> = out.keys.iter().map(|k| k.device.clone()).collect();
            assert_eq!(distinct.len(), want, "one key per device");
        }
    }
}

async fn race<S: KeyStore>(store: Arc<S>, claimers: usize) -> Vec<keyclaim::ClaimedKey> {
    let a = alice();
    let barrier = Arc::new(tokio::sync::Barrier::new(claimers));
    let tasks: Vec<_> = (0..claimers)
        .map(|_| {
            let (store, a, barrier) = (store.clone(), a.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                claim_one(&*store, &a, SC).await
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.extend(t.await.expect("claimer task"));
    }
    out
}
