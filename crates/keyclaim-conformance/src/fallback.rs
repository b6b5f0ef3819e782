//! Contract section 5: fallback keys.

use keyclaim::KeyJson;
use serde_json::json;

use crate::StoreFactory;
use crate::fixtures::*;

cases! { $ fallback;
    /// R5.1: a new fallback key replaces the stored one and is unused.
    pub async fn r5_1_new_fallback_replaces_and_is_unused<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        put(
            &store,
            &a,
            vec![],
            vec![(kid("signed_curve25519:F1"), signed_fallback("one", "s"))],
        )
        .await;
        assert!(claim_one(&store, &a, SC).await.expect("F1").fallback);
        assert!(unused(&store, &a).await.is_empty());
        let f2 = (kid("signed_curve25519:F2"), signed_fallback("two", "s"));
        let out = put(&store, &a, vec![], vec![f2.clone()]).await;
        assert!(out.changes.contains(&a));
        assert_eq!(unused(&store, &a).await, [SC]);
        let k = claim_one(&store, &a, SC).await.expect("F2");
        assert_eq!((k.key_id, k.key_json), f2);
    }

    /// R5.2: re-uploading the same fallback key (other signatures, other field
    /// order) changes nothing: a used key stays used.
    pub async fn r5_2_same_fallback_keeps_used_flag<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        let original = KeyJson::from_value(
            &json!({"key": "fb", "fallback": true, "signatures": {"@a:b": {"ed25519:D": "s1"}}}),
        )
        .unwrap();
        put(
            &store,
            &a,
            vec![],
            vec![(kid("signed_curve25519:F"), original.clone())],
        )
        .await;
        claim_one(&store, &a, SC).await.expect("fallback");
        assert!(unused(&store, &a).await.is_empty());
        let resigned = KeyJson::from_json_str(
            r#"{"signatures":{"@a:b":{"ed25519:D":"s2"}},"fallback":true,"key":"fb"}"#,
        )
        .unwrap();
        let out = put(
            &store,
            &a,
            vec![],
            vec![(kid("signed_curve25519:F"), resigned)],
        )
        .await;
        assert!(out.changes.is_empty(), "nothing changed");
        assert!(unused(&store, &a).await.is_empty(), "a used key stays used");
        assert_eq!(
            claim_one(&store, &a, SC).await.expect("fallback").key_json,
            original,
            "stored JSON kept"
        );
    }

    /// R5.2: the same key under another key ID is the same key: the stored one
    /// (ID, JSON, used flag) is kept.
    pub async fn r5_2_same_key_under_other_id_is_kept<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        let json = signed_fallback("fb", "s");
        put(
            &store,
            &a,
            vec![],
            vec![(kid("signed_curve25519:OLD"), json.clone())],
        )
        .await;
        claim_one(&store, &a, SC).await.expect("fallback");
        put(
            &store,
            &a,
            vec![],
            vec![(kid("signed_curve25519:NEW"), json)],
        )
        .await;
        assert!(unused(&store, &a).await.is_empty());
        assert_eq!(
            claim_one(&store, &a, SC)
                .await
                .expect("fallback")
                .key_id
                .name(),
            "OLD"
        );
    }

    /// R5.3: fallback state is per algorithm.
    pub async fn r5_3_fallback_state_is_per_algorithm<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        put(
            &store,
            &a,
            vec![],
            vec![
                (kid("alg1:F"), signed("1", "s")),
                (kid("alg2:F"), signed("2", "s")),
            ],
        )
        .await;
        assert_eq!(unused(&store, &a).await, ["alg1", "alg2"]);
        assert_eq!(
            claim_one(&store, &a, "alg1")
                .await
                .expect("alg1")
                .key_id
                .to_string(),
            "alg1:F"
        );
        assert_eq!(unused(&store, &a).await, ["alg2"]);
        put(&store, &a, vec![], vec![(kid("alg2:G"), signed("3", "s"))]).await;
        assert_eq!(unused(&store, &a).await, ["alg2"], "alg1 stays used");
    }

    /// R5.4: OTK uploads and claims never touch fallback state.
    pub async fn r5_4_otk_operations_leave_fallback_alone<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        put(&store, &a, otks(SC, &["A"]), otks(SC, &["F"])).await;
        claim_one(&store, &a, SC).await.expect("A");
        put(&store, &a, otks(SC, &["B"]), vec![]).await;
        assert_eq!(unused(&store, &a).await, [SC]);
        assert!(!claim_one(&store, &a, SC).await.expect("B").fallback);
        assert_eq!(unused(&store, &a).await, [SC]);
        assert!(claim_one(&store, &a, SC).await.expect("fallback").fallback);
        put(&store, &a, otks(SC, &["C"]), vec![]).await;
        assert!(
            unused(&store, &a).await.is_empty(),
            "an OTK upload does not reset the used flag"
        );
        assert!(!claim_one(&store, &a, SC).await.expect("C").fallback);
    }
}
