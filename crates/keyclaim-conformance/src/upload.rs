//! Contract section 3: upload.

use keyclaim::{Error, KeyStore, KeysApi, Limits, Upload};
use serde_json::json;

use crate::StoreFactory;
use crate::fixtures::*;

cases! { $ upload;
    /// R3.1: an upload's OTKs and fallback keys land together.
    pub async fn r3_1_upload_is_applied_whole<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        let out = put(&store, &a, otks(SC, &["A", "B", "C"]), otks(SC, &["F"])).await;
        assert_eq!(out.counts.get_str(SC), 3);
        assert_eq!(unused(&store, &a).await, [SC]);
        // A failing upload (one conflicting key) leaves nothing of itself behind.
        let mut bad = otks(SC, &["D", "E"]);
        bad.push((kid("signed_curve25519:A"), signed("other", "sig")));
        let err = store
            .upload(&upload_of(&a, bad, otks("alg2", &["F"])))
            .await;
        assert!(matches!(err, Err(Error::Conflict { .. })), "{err:?}");
        assert_eq!(count(&store, &a, SC).await, 3);
        assert_eq!(
            unused(&store, &a).await,
            [SC],
            "the alg2 fallback must not be stored"
        );
    }

    /// R3.2: a retried upload (same content, other signatures) is accepted and
    /// the originally stored JSON is kept.
    pub async fn r3_2_retried_upload_is_accepted_and_keeps_original<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        let id = kid("signed_curve25519:A");
        put(&store, &a, vec![(id.clone(), signed("k", "sig-1"))], vec![]).await;
        let out = put(&store, &a, vec![(id.clone(), signed("k", "sig-2"))], vec![]).await;
        assert_eq!(out.counts.get_str(SC), 1);
        assert!(out.changes.is_empty(), "a pure retry changes nothing");
        let k = claim_one(&store, &a, SC).await.expect("the key");
        assert_eq!(
            k.key_json,
            signed("k", "sig-1"),
            "the original signatures are kept"
        );
    }

    /// R3.2: other content under a stored key ID rejects the whole upload, and
    /// the message names the key ID but not the key.
    pub async fn r3_2_conflicting_reupload_is_rejected_whole<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        put(&store, &a, otks(SC, &["A"]), vec![]).await;
        let before = full_state(&store).await;
        let api = KeysApi::new(store);
        let b = body(json!({
            "one_time_keys": {
                "signed_curve25519:A": wire_key("SECRET-OTHER-CONTENT"),
                "signed_curve25519:B": wire_key("b"),
            },
            "fallback_keys": {"signed_curve25519:F": wire_key("f")},
        }));
        let e = assert_api_err(
            api.upload(a.user_id.as_str(), a.device_id.as_str(), &b)
                .await,
            400,
            "M_INVALID_PARAM",
            "conflict",
        );
        assert!(
            e.message().contains("signed_curve25519:A"),
            "{}",
            e.message()
        );
        assert!(!e.message().contains("SECRET"), "{}", e.message());
        assert!(!e.to_string().contains("SECRET"));
        assert_eq!(full_state(api.store()).await, before);
    }

    /// R3.3: `alg1:x` and `alg2:x` are different keys; an OTK and a fallback key
    /// may share a key ID.
    pub async fn r3_3_algorithms_and_namespaces_do_not_collide<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        let x1 = (kid("alg1:x"), signed("one", "s"));
        let x2 = (kid("alg2:x"), signed("two", "s"));
        let fb = (kid("alg1:x"), signed_fallback("fb", "s"));
        put(&store, &a, vec![x1.clone(), x2.clone()], vec![fb.clone()]).await;
        assert_eq!(count(&store, &a, "alg1").await, 1);
        assert_eq!(count(&store, &a, "alg2").await, 1);
        let k1 = claim_one(&store, &a, "alg1").await.expect("alg1 OTK");
        assert_eq!((k1.key_json, k1.fallback), (x1.1, false));
        let k2 = claim_one(&store, &a, "alg2").await.expect("alg2 OTK");
        assert_eq!(k2.key_json, x2.1);
        let k3 = claim_one(&store, &a, "alg1").await.expect("alg1 fallback");
        assert_eq!((k3.key_json, k3.fallback), (fb.1, true));
    }

    /// R3.4: an OTK that was handed out and is uploaded again (same ID, same
    /// content) is accepted but neither stored nor counted.
    pub async fn r3_4_issued_key_is_not_stored_again<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        let keys = otks(SC, &["A", "B"]);
        put(&store, &a, keys.clone(), vec![]).await;
        let first = claim_one(&store, &a, SC).await.expect("A");
        assert_eq!(first.key_id.name(), "A");
        // The client lost the response and sends the same upload again, with
        // fresh signatures.
        let retry: Vec<_> = keys
            .iter()
            .map(|(id, _)| (id.clone(), signed(&format!("k-{}", id.name()), "new-sig")))
            .collect();
        let out = put(&store, &a, retry, vec![]).await;
        assert_eq!(out.counts.get_str(SC), 1, "A must not come back");
        assert_eq!(
            claim_one(&store, &a, SC).await.expect("B").key_id.name(),
            "B"
        );
        assert!(
            claim_one(&store, &a, SC).await.is_none(),
            "A must never be issued twice"
        );
    }

    /// R3.4: the same ID with new content is a new key and is stored.
    pub async fn r3_4_issued_key_with_new_content_is_stored<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        put(&store, &a, otks(SC, &["A"]), vec![]).await;
        claim_one(&store, &a, SC).await.expect("A");
        let fresh_key = (kid("signed_curve25519:A"), signed("brand-new", "s"));
        let out = put(&store, &a, vec![fresh_key.clone()], vec![]).await;
        assert_eq!(out.counts.get_str(SC), 1);
        assert_eq!(
            claim_one(&store, &a, SC).await.expect("new A").key_json,
            fresh_key.1
        );
    }

    /// R3.4: when the ID is stored with other content, R3.2's conflict applies
    /// first, even if that content was once issued.
    pub async fn r3_4_conflict_check_comes_before_issued_check<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        let old = (kid("signed_curve25519:A"), signed("old", "s"));
        let new = (kid("signed_curve25519:A"), signed("new", "s"));
        put(&store, &a, vec![old.clone()], vec![]).await;
        claim_one(&store, &a, SC).await.expect("old A");
        put(&store, &a, vec![new.clone()], vec![]).await;
        // `old` was issued, but A is now stored with `new`: a conflict.
        let err = store.upload(&upload_of(&a, vec![old], vec![])).await;
        assert!(matches!(err, Err(Error::Conflict { .. })), "{err:?}");
        assert_eq!(count(&store, &a, SC).await, 1);
    }

    /// R3.4: at least the most recent 1000 issued keys of a device and algorithm
    /// are remembered.
    pub async fn r3_4_remembers_at_least_1000_issued_keys<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        let all = numbered_otks(SC, "K", 1000);
        for chunk in all.chunks(500) {
            put(&store, &a, chunk.to_vec(), vec![]).await;
            let mut got = 0;
            while got < chunk.len() {
                let out = claim_n(&store, &a, SC, 5).await;
                assert!(!out.keys.is_empty());
                got += out.keys.len();
            }
        }
        assert_eq!(count(&store, &a, SC).await, 0);
        // Re-upload every one of the 1000 issued keys: none may be stored.
        for chunk in all.chunks(500) {
            let out = put(&store, &a, chunk.to_vec(), vec![]).await;
            assert_eq!(out.counts.get_str(SC), 0, "an issued key came back");
        }
    }

    /// R3.4: a device remembers exactly its newest `remembered_issued_keys`
    /// issued keys, whatever other devices are claimed in between: a
    /// re-upload of older issued keys stores them again, of the newest
    /// stores nothing, and an export lists exactly the newest.
    pub async fn r3_4_exactly_the_newest_issued_keys_are_remembered<F: StoreFactory>(f: &F) {
        let mut limits = Limits::default();
        limits.remembered_issued_keys = 3;
        let store = fresh_with(f, limits).await;
        let devices: Vec<_> = (0..8).map(|i| dev("@a:x", &format!("D{i}"))).collect();
        let keys = numbered_otks(SC, "K", 10);
        for d in &devices {
            put(&store, d, keys.clone(), vec![]).await;
        }
        // A worker claiming the eight devices in turn.
        for _ in 0..keys.len() {
            for d in &devices {
                claim_one(&store, d, SC).await.expect("a key");
            }
        }
        for snapshot in full_state(&store).await {
            let remembered: Vec<String> = snapshot.issued[&alg(SC)]
                .iter()
                .map(|k| k.key_id.to_string())
                .collect();
            let newest: Vec<String> = keys[7..].iter().map(|(id, _)| id.to_string()).collect();
            assert_eq!(remembered, newest, "{}", snapshot.device);
        }
        for d in &devices {
            let out = put(&store, d, keys.clone(), vec![]).await;
            assert_eq!(out.counts.get_str(SC), 7, "{d}: the 7 forgotten keys are stored");
        }
        // Claim the 7 again and re-upload everything: now K4..K6 are the
        // newest issued; K7..K9 are forgotten and come back with K0..K3.
        for d in &devices {
            for (id, _) in &keys[..7] {
                assert_eq!(claim_one(&store, d, SC).await.expect("a key").key_id, *id);
            }
            put(&store, d, keys.clone(), vec![]).await;
            let mut back = Vec::new();
            while let Some(k) = claim_one(&store, d, SC).await {
                back.push(k.key_id);
            }
            let want: Vec<_> = [0, 1, 2, 3, 7, 8, 9].map(|i| keys[i].0.clone()).into();
            assert_eq!(back, want, "{d}");
        }
    }

    /// R3.5: the oldest upload's keys are issued first, whatever their IDs.
    pub async fn r3_5_oldest_upload_is_issued_first<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        put(&store, &a, otks(SC, &["Z", "Y"]), vec![]).await;
        put(&store, &a, otks(SC, &["A", "B"]), vec![]).await;
        put(&store, &a, otks(SC, &["M"]), vec![]).await;
        let mut order = Vec::new();
        while let Some(k) = claim_one(&store, &a, SC).await {
            order.push(k.key_id.name().to_owned());
        }
        assert_eq!(order, ["Y", "Z", "A", "B", "M"]);
    }

    /// R3.5: keys of one upload are issued in key ID order.
    pub async fn r3_5_ties_inside_an_upload_break_by_key_id<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        put(&store, &a, otks(SC, &["c", "a", "b", "AA", "A"]), vec![]).await;
        let out = claim_n(&store, &a, SC, 5).await;
        assert_eq!(
            ids(&out.keys),
            [
                "signed_curve25519:A",
                "signed_curve25519:AA",
                "signed_curve25519:a",
                "signed_curve25519:b",
                "signed_curve25519:c"
            ]
        );
    }

    /// R3.6: two fallback keys of one algorithm in one upload are rejected.
    pub async fn r3_6_two_fallback_keys_for_one_algorithm_are_rejected<F: StoreFactory>(f: &F) {
        let a = alice();
        let err = Upload::from_keys(a.clone(), vec![], otks(SC, &["F1", "F2"]));
        assert!(
            matches!(err, Err(Error::DuplicateFallback { .. })),
            "{err:?}"
        );
        let api = KeysApi::new(fresh(f).await);
        let b = body(json!({"fallback_keys": {
            "signed_curve25519:F1": wire_key("1"),
            "signed_curve25519:F2": wire_key("2"),
        }}));
        assert_api_err(
            api.upload("@a:b", "D", &b).await,
            400,
            "M_INVALID_PARAM",
            "two fallbacks",
        );
        assert!(full_state(api.store()).await.is_empty());
        // Two algorithms are fine.
        let b = body(json!({"fallback_keys": {"alg1:F": wire_key("1"), "alg2:F": wire_key("2")}}));
        api.upload("@a:b", "D", &b)
            .await
            .expect("one per algorithm");
    }

    /// R3.7: an upload of only fallback keys is applied.
    pub async fn r3_7_fallback_only_upload_is_applied<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        let out = put(&store, &a, vec![], otks(SC, &["F"])).await;
        assert_eq!(out.counts.get_str(SC), 0);
        assert!(out.changes.contains(&a));
        assert_eq!(unused(&store, &a).await, [SC]);
    }

    /// R3.8: the upload answers the counts after it.
    pub async fn r3_8_upload_answers_counts<F: StoreFactory>(f: &F) {
        let store = fresh_with(f, Limits::default()).await;
        let a = alice();
        let out = put(&store, &a, otks(SC, &["A", "B"]), vec![]).await;
        assert_eq!(out.counts.get_str(SC), 2);
        let out = put(&store, &a, otks("other", &["A"]), vec![]).await;
        assert_eq!(
            (out.counts.get_str(SC), out.counts.get_str("other")),
            (2, 1)
        );
        claim_one(&store, &a, SC).await.expect("a key");
        let out = put(&store, &a, vec![], vec![]).await;
        assert_eq!(out.counts.get_str(SC), 1);
        assert_eq!(out.counts, store.otk_counts(&a).await.expect("counts"));
    }
}
