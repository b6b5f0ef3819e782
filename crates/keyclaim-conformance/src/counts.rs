//! Contract section 6: counts and sync fields.

use keyclaim::{KeyStore, KeysApi};
use serde_json::json;

use crate::StoreFactory;
use crate::fixtures::*;

cases! { $ counts;
    /// R6.1: zero counts are left out, except `signed_curve25519`.
    pub async fn r6_1_counts_leave_out_zero_but_signed_curve25519<F: StoreFactory>(f: &F) {
        let api = KeysApi::new(fresh(f).await);
        let s = api.sync("@a:b", "D").await.expect("sync");
        assert_eq!(
            s["device_one_time_keys_count"],
            json!({"signed_curve25519": 0})
        );
        let b = body(json!({"one_time_keys": {"other:A": wire_key("a")}}));
        let out = api.upload("@a:b", "D", &b).await.expect("upload");
        assert_eq!(
            out,
            json!({"one_time_key_counts": {"signed_curve25519": 0, "other": 1}})
        );
        let c = body(json!({"one_time_keys": {"@a:b": {"D": "other"}}}));
        api.claim(&c).await.expect("claim");
        let s = api.sync("@a:b", "D").await.expect("sync");
        assert_eq!(
            s["device_one_time_keys_count"],
            json!({"signed_curve25519": 0}),
            "zero `other` is left out"
        );
        let counts = api
            .store()
            .otk_counts(&dev("@a:b", "D"))
            .await
            .expect("counts");
        assert!(
            counts.iter().all(|(_, n)| n > 0),
            "the store API leaves out zeros: {counts:?}"
        );
    }

    /// R6.2: after each upload, claim and deletion, counts are exact.
    pub async fn r6_2_counts_are_exact_after_every_operation<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        let mut want = 0;
        for round in 0..5 {
            put(
                &store,
                &a,
                numbered_otks(SC, &format!("R{round}-"), 7),
                vec![],
            )
            .await;
            want += 7;
            assert_eq!(count(&store, &a, SC).await, want);
            let out = claim_n(&store, &a, SC, 3).await;
            want -= out.keys.len() as u64;
            assert_eq!(count(&store, &a, SC).await, want);
        }
        store.delete_device(&a).await.expect("delete");
        assert_eq!(count(&store, &a, SC).await, 0);
    }

    /// R6.2 across handles: what one handle (process) wrote, the other reads at once.
    #[needs(Shared)]
    pub async fn r6_2_counts_are_current_across_handles<F: StoreFactory>(f: &F) {
        let one = fresh(f).await;
        let two = f.open_shared(&one).await.expect("second handle");
        let a = alice();
        put(&one, &a, otks(SC, &["A", "B", "C"]), otks(SC, &["F"])).await;
        assert_eq!(count(&two, &a, SC).await, 3);
        assert_eq!(unused(&two, &a).await, [SC]);
        claim_n(&two, &a, SC, 3).await;
        assert_eq!(count(&one, &a, SC).await, 0);
        claim_one(&one, &a, SC).await.expect("fallback");
        assert!(unused(&two, &a).await.is_empty());
        two.delete_device(&a).await.expect("delete");
        assert!(claim_one(&one, &a, SC).await.is_none());
    }

    /// R6.3: unused fallback types are sorted and always present on sync.
    pub async fn r6_3_unused_fallback_types_sorted_and_present<F: StoreFactory>(f: &F) {
        let api = KeysApi::new(fresh(f).await);
        let s = api.sync("@a:b", "D").await.expect("sync");
        assert_eq!(
            s["device_unused_fallback_key_types"],
            json!([]),
            "present even when empty"
        );
        let b = body(
            json!({"fallback_keys": {"zeta:F": wire_key("z"), "alpha:F": wire_key("a"), "signed_curve25519:F": wire_key("s")}}),
        );
        api.upload("@a:b", "D", &b).await.expect("upload");
        let s = api.sync("@a:b", "D").await.expect("sync");
        assert_eq!(
            s["device_unused_fallback_key_types"],
            json!(["alpha", "signed_curve25519", "zeta"])
        );
        let state = api
            .store()
            .sync_state(&dev("@a:b", "D"))
            .await
            .expect("sync state");
        assert_eq!(state.unused_fallback_key_types.len(), 3);
    }

    /// R6.4: a device's counts are its own, however many other devices and
    /// keys the store holds (that reading them is cheap is a matter for the
    /// benchmarks, not for a timed test).
    pub async fn r6_4_counts_do_not_depend_on_other_devices<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        for i in 0..50 {
            let d = dev(&format!("@u{i}:example.org"), &format!("D{i}"));
            put(&store, &d, numbered_otks(SC, "K", 20), otks(SC, &["F"])).await;
        }
        // Same user as others, other device ID; same device ID, other user.
        let a = dev("@u1:example.org", "D2");
        assert_eq!(count(&store, &a, SC).await, 0);
        assert!(unused(&store, &a).await.is_empty());
        put(&store, &a, otks(SC, &["X"]), vec![]).await;
        assert_eq!(count(&store, &a, SC).await, 1);
        assert_eq!(count(&store, &dev("@u2:example.org", "D2"), SC).await, 20);
    }
}
