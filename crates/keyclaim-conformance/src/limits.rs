//! Contract section 8: limits.

use keyclaim::{ClaimTarget, Error, KeyStore, LimitKind, Limits};

use crate::StoreFactory;
use crate::fixtures::*;

fn is_too_large<T: std::fmt::Debug>(r: &keyclaim::Result<T>, kind: LimitKind) -> bool {
    matches!(r, Err(Error::TooLarge { kind: k, .. }) if *k == kind)
}

cases! { $ limits;
    /// R8.1: at most 500 stored OTKs per (device, algorithm); an upload past it
    /// is rejected whole; other algorithms have their own budget.
    pub async fn r8_1_otks_per_device_algorithm<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        put(&store, &a, numbered_otks(SC, "A", 499), vec![]).await;
        let r = store
            .upload(&upload_of(&a, numbered_otks(SC, "B", 2), otks(SC, &["F"])))
            .await;
        assert!(is_too_large(&r, LimitKind::OtksPerDeviceAlgorithm), "{r:?}");
        assert_eq!(count(&store, &a, SC).await, 499);
        assert!(
            unused(&store, &a).await.is_empty(),
            "nothing of the rejected upload"
        );
        put(&store, &a, numbered_otks(SC, "B", 1), vec![]).await;
        assert_eq!(count(&store, &a, SC).await, 500);
        put(&store, &a, numbered_otks("other", "B", 3), vec![]).await;
        // Retrying stored keys at the limit is fine: nothing new is stored.
        put(&store, &a, numbered_otks(SC, "B", 1), vec![]).await;
        // A configured limit.
        let mut limits = Limits::default();
        limits.max_otks_per_device_algorithm = 3;
        let small = fresh_with(f, limits).await;
        put(&small, &a, numbered_otks(SC, "A", 3), vec![]).await;
        let r = small
            .upload(&upload_of(&a, numbered_otks(SC, "B", 1), vec![]))
            .await;
        assert!(is_too_large(&r, LimitKind::OtksPerDeviceAlgorithm), "{r:?}");
    }

    /// R8.2: one key's JSON is at most 4 KiB.
    pub async fn r8_2_key_json_size<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        // {"key":"<pad>","signatures":{...}}: find the padding that makes 4096.
        let base = signed("", "sig").len();
        let exact = signed(&"x".repeat(4096 - base), "sig");
        assert_eq!(exact.len(), 4096);
        put(
            &store,
            &a,
            vec![(kid("signed_curve25519:OK"), exact)],
            vec![],
        )
        .await;
        let over = signed(&"x".repeat(4097 - base), "sig");
        let r = store
            .upload(&upload_of(
                &a,
                vec![(kid("signed_curve25519:BIG"), over.clone())],
                vec![],
            ))
            .await;
        assert!(is_too_large(&r, LimitKind::KeyJsonBytes), "{r:?}");
        let r = store
            .upload(&upload_of(
                &a,
                vec![],
                vec![(kid("signed_curve25519:BIG"), over)],
            ))
            .await;
        assert!(is_too_large(&r, LimitKind::KeyJsonBytes), "{r:?}");
        assert_eq!(count(&store, &a, SC).await, 1);
        assert!(unused(&store, &a).await.is_empty());
    }

    /// R8.2: one upload holds at most 1000 keys, one-time and fallback together.
    pub async fn r8_2_keys_per_upload<F: StoreFactory>(f: &F) {
        let mut limits = Limits::default();
        limits.max_otks_per_device_algorithm = 10_000;
        let store = fresh_with(f, limits).await;
        let a = alice();
        let r = store
            .upload(&upload_of(
                &a,
                numbered_otks(SC, "A", 1000),
                otks(SC, &["F"]),
            ))
            .await;
        assert!(is_too_large(&r, LimitKind::KeysPerUpload), "{r:?}");
        assert_eq!(count(&store, &a, SC).await, 0);
        put(&store, &a, numbered_otks(SC, "A", 999), otks(SC, &["F"])).await;
        assert_eq!(count(&store, &a, SC).await, 999);
    }

    /// R8.2: one claim names at most 100,000 targets (checked before anything
    /// is consumed).
    pub async fn r8_2_claim_targets<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        put(&store, &a, otks(SC, &["A"]), vec![]).await;
        let mut targets = vec![ClaimTarget::one(a.clone(), alg(SC))];
        targets
            .extend((0..100_000).map(|i| ClaimTarget::one(dev(&format!("@u{i}:x"), "D"), alg(SC))));
        let r = store.claim(&targets).await;
        assert!(is_too_large(&r, LimitKind::ClaimTargets), "{r:?}");
        assert_eq!(count(&store, &a, SC).await, 1, "nothing consumed");
        // A configured limit.
        let mut limits = Limits::default();
        limits.max_claim_targets = 2;
        let small = fresh_with(f, limits).await;
        let r = small.claim(&targets[..3]).await;
        assert!(is_too_large(&r, LimitKind::ClaimTargets), "{r:?}");
        small
            .claim(&targets[..2])
            .await
            .expect("two targets are fine");
    }

    /// R8.3: the count per target is clamped to 5.
    pub async fn r8_3_count_is_clamped<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        put(&store, &a, numbered_otks(SC, "K", 20), vec![]).await;
        let out = claim_n(&store, &a, SC, 1000).await;
        assert_eq!(out.keys.len(), 5);
        let out = claim_n(&store, &a, SC, 0).await;
        assert!(out.keys.is_empty(), "a count of 0 takes nothing");
        assert_eq!(count(&store, &a, SC).await, 15);
    }

    /// R8.4: with the cap counted per device, keys of all algorithms count
    /// together; re-uploads and fallback keys do not count; the default
    /// stays per (device, algorithm).
    pub async fn r8_4_cap_per_device_across_algorithms<F: StoreFactory>(f: &F) {
        let mut limits = Limits::default();
        limits.max_otks_per_device_algorithm = 3;
        limits.otk_cap = keyclaim::OtkCap::PerDevice;
        let store = fresh_with(f, limits).await;
        let a = alice();
        put(&store, &a, otks(SC, &["A", "B"]), vec![]).await;
        put(&store, &a, otks("other", &["C"]), vec![]).await;
        let r = store
            .upload(&upload_of(&a, otks("third", &["D"]), vec![]))
            .await;
        assert!(is_too_large(&r, LimitKind::OtksPerDevice), "{r:?}");
        // A retried upload adds nothing, and fallback keys are not one-time keys.
        put(
            &store,
            &a,
            otks(SC, &["A"]),
            vec![(kid("third:F"), signed_fallback("f", "s"))],
        )
        .await;
        assert_eq!(store.otk_counts(&a).await.expect("counts").total(), 3);
        // Claiming one makes room for one, of any algorithm.
        claim_one(&store, &a, "other").await.expect("C");
        put(&store, &a, otks("third", &["D"]), vec![]).await;
        // Other devices have their own cap.
        put(&store, &bob(), otks(SC, &["A", "B", "C"]), vec![]).await;
        // The default counts per (device, algorithm).
        let mut per_alg = Limits::default();
        per_alg.max_otks_per_device_algorithm = 3;
        let store = fresh_with(f, per_alg).await;
        put(&store, &a, otks(SC, &["A", "B", "C"]), vec![]).await;
        put(&store, &a, otks("other", &["A", "B", "C"]), vec![]).await;
        assert_eq!(store.otk_counts(&a).await.expect("counts").total(), 6);
    }
}
