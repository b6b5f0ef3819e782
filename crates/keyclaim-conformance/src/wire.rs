//! Contract section 9: the wire facade, through `KeysApi` over the backend.

use keyclaim::{KeyStore, KeysApi, Limits};
use serde_json::{Value, json};

use crate::StoreFactory;
use crate::fixtures::*;

const U: &str = "@alice:example.org";
const D: &str = "ALICEDEV";

cases! { $ wire;
    /// The upload body's fields: stable and unstable fallback names, `device_keys`,
    /// nulls and unknown fields.
    pub async fn r9_upload_fields<F: StoreFactory>(f: &F) {
        let api = KeysApi::new(fresh(f).await);
        let a = alice();
        // Unstable name alone is read.
        let b = body(
            json!({"org.matrix.msc2732.fallback_keys": {"signed_curve25519:U": wire_key("u")}}),
        );
        api.upload(U, D, &b).await.expect("unstable fallback");
        assert_eq!(unused(api.store(), &a).await, [SC]);
        // The stable name wins when both are present.
        let b = body(json!({
            "fallback_keys": {"stable:S": wire_key("s")},
            "org.matrix.msc2732.fallback_keys": {"unstable:U": wire_key("u")},
        }));
        api.upload(U, D, &b).await.expect("both names");
        assert_eq!(
            unused(api.store(), &a).await,
            ["signed_curve25519", "stable"]
        );
        // A null stable field counts as absent: the unstable one is read.
        let b = body(
            json!({"fallback_keys": null, "org.matrix.msc2732.fallback_keys": {"unst:U": wire_key("u")}}),
        );
        api.upload(U, D, &b).await.expect("null stable");
        assert_eq!(
            unused(api.store(), &a).await,
            ["signed_curve25519", "stable", "unst"]
        );
        // device_keys object or null is ignored; nulls and unknown fields too.
        for b in [
            json!({"device_keys": {"user_id": U, "anything": [1]}, "one_time_keys": {"signed_curve25519:A": wire_key("a")}}),
            json!({"device_keys": null, "one_time_keys": null, "fallback_keys": null, "unknown": {"x": 1}}),
            json!({}),
        ] {
            api.upload(U, D, &body(b.clone()))
                .await
                .unwrap_or_else(|e| panic!("{b}: {e}"));
        }
        assert_eq!(count(api.store(), &a, SC).await, 1);
        for bad in [
            json!({"device_keys": []}),
            json!({"device_keys": "x"}),
            json!({"device_keys": 1}),
            json!({"one_time_keys": []}),
            json!({"one_time_keys": "x"}),
            json!({"fallback_keys": 1}),
            json!({"org.matrix.msc2732.fallback_keys": []}),
        ] {
            assert_api_err(
                api.upload(U, D, &body(bad.clone())).await,
                400,
                "M_BAD_JSON",
                &bad.to_string(),
            );
        }
    }

    /// The upload answer is `{"one_time_key_counts": {...}}`.
    pub async fn r9_upload_answers_counts<F: StoreFactory>(f: &F) {
        let api = KeysApi::new(fresh(f).await);
        let b = body(
            json!({"one_time_keys": {"signed_curve25519:A": wire_key("a"), "signed_curve25519:B": wire_key("b")}}),
        );
        let out = api.upload(U, D, &b).await.expect("upload");
        assert_eq!(
            out,
            json!({"one_time_key_counts": {"signed_curve25519": 2}})
        );
    }

    /// The claim answer's shape; `timeout` and unknown fields are ignored.
    pub async fn r9_claim_shape<F: StoreFactory>(f: &F) {
        let api = KeysApi::new(fresh(f).await);
        let key = wire_key("a");
        api.upload(
            U,
            D,
            &body(json!({"one_time_keys": {"signed_curve25519:A": key}})),
        )
        .await
        .expect("upload");
        let b = body(json!({"one_time_keys": {U: {D: SC}}, "timeout": 10000, "extra": true}));
        let out = api.claim(&b).await.expect("claim");
        assert_eq!(
            out,
            json!({"one_time_keys": {U: {D: {"signed_curve25519:A": key}}}, "failures": {}})
        );
        for empty in [
            json!({}),
            json!({"one_time_keys": null}),
            json!({"one_time_keys": {}}),
            json!({"one_time_keys": {U: {}}}),
        ] {
            let out = api.claim(&body(empty.clone())).await.expect("claim");
            assert_eq!(out, json!({"one_time_keys": {}, "failures": {}}), "{empty}");
        }
    }

    /// An algorithm string that is no valid algorithm matches nothing; a
    /// non-string algorithm is `M_BAD_JSON`.
    pub async fn r9_claim_ignores_invalid_algorithm_strings<F: StoreFactory>(f: &F) {
        let api = KeysApi::new(fresh(f).await);
        api.upload(
            U,
            D,
            &body(json!({"one_time_keys": {"signed_curve25519:A": wire_key("a")}})),
        )
        .await
        .expect("upload");
        let long = "a".repeat(256);
        for alg in ["", "signed_curve25519:A", "a:b", long.as_str()] {
            let out = api
                .claim(&body(json!({"one_time_keys": {U: {D: alg}}})))
                .await
                .expect("claim");
            assert_eq!(out["one_time_keys"], json!({}), "{alg}");
        }
        for alg in [
            json!(1),
            json!(null),
            json!(["signed_curve25519"]),
            json!({}),
        ] {
            let b = body(json!({"one_time_keys": {U: {D: alg.clone()}}}));
            assert_api_err(api.claim(&b).await, 400, "M_BAD_JSON", &alg.to_string());
        }
        assert_eq!(count(api.store(), &alice(), SC).await, 1);
    }

    /// The sync fields, with the unstable alias on and off.
    pub async fn r9_sync_fields<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        put(&store, &a, otks(SC, &["A"]), otks(SC, &["F"])).await;
        let api = KeysApi::new(store);
        let s = api.sync(U, D).await.expect("sync");
        assert_eq!(
            s,
            json!({
                "device_one_time_keys_count": {"signed_curve25519": 1},
                "device_unused_fallback_key_types": ["signed_curve25519"],
                "org.matrix.msc2732.device_unused_fallback_key_types": ["signed_curve25519"],
            })
        );
        let api = api.with_unstable_fallback_alias(false);
        let s = api.sync(U, D).await.expect("sync");
        assert!(
            s.get("org.matrix.msc2732.device_unused_fallback_key_types")
                .is_none()
        );
        assert_eq!(
            s["device_unused_fallback_key_types"],
            json!(["signed_curve25519"])
        );
    }

    /// `delete_device` through the facade.
    pub async fn r9_delete_device<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        put(&store, &alice(), otks(SC, &["A"]), otks(SC, &["F"])).await;
        put(&store, &bob(), otks(SC, &["A"]), vec![]).await;
        let api = KeysApi::new(store);
        api.delete_device(U, D).await.expect("delete");
        let s = api.sync(U, D).await.expect("sync");
        assert_eq!(
            s["device_one_time_keys_count"],
            json!({"signed_curve25519": 0})
        );
        assert_eq!(s["device_unused_fallback_key_types"], json!([]));
        assert_eq!(count(api.store(), &bob(), SC).await, 1);
        api.delete_user("@bob:example.org")
            .await
            .expect("delete user");
        assert_eq!(count(api.store(), &bob(), SC).await, 0);
    }

    /// Every client-error row of the contract's error table, and that nothing
    /// was stored or consumed by any of them. (The 500 row needs a failing
    /// store: the core crate's own tests and each backend's fault tests cover
    /// it.)
    pub async fn r9_error_table_stores_nothing<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        put(&store, &alice(), otks(SC, &["A"]), otks(SC, &["F"])).await;
        let api = KeysApi::new(store);
        let before = full_state(api.store()).await;
        let cases: Vec<(&[u8], &str)> = vec![
            (b"", "M_NOT_JSON"),
            (b"{", "M_NOT_JSON"),
            (b"{\"one_time_keys\": }", "M_NOT_JSON"),
            (b"\xff\xfe", "M_NOT_JSON"),
            (b"[]", "M_BAD_JSON"),
            (b"\"string\"", "M_BAD_JSON"),
            (b"null", "M_BAD_JSON"),
            (b"42", "M_BAD_JSON"),
        ];
        for (b, code) in &cases {
            assert_api_err(
                api.upload(U, D, b).await,
                400,
                code,
                &String::from_utf8_lossy(b),
            );
            assert_api_err(api.claim(b).await, 400, code, &String::from_utf8_lossy(b));
        }
        let uploads = [
            (
                json!({"one_time_keys": {"bad-id": wire_key("x")}}),
                "M_BAD_JSON",
            ),
            (
                json!({"one_time_keys": {"signed_curve25519:Z": {"key": 1}}}),
                "M_BAD_JSON",
            ),
            (
                json!({"one_time_keys": {"signed_curve25519:A": wire_key("conflict")}}),
                "M_INVALID_PARAM",
            ),
            (
                json!({"fallback_keys": {"x:1": wire_key("1"), "x:2": wire_key("2")}}),
                "M_INVALID_PARAM",
            ),
        ];
        for (b, code) in &uploads {
            assert_api_err(
                api.upload(U, D, &body(b.clone())).await,
                400,
                code,
                &b.to_string(),
            );
        }
        assert_api_err(
            api.upload("nope", D, b"{}").await,
            400,
            "M_INVALID_PARAM",
            "user",
        );
        assert_eq!(
            full_state(api.store()).await,
            before,
            "an error changed the store"
        );
    }

    /// Error messages never carry key material.
    pub async fn r9_errors_never_contain_key_material<F: StoreFactory>(f: &F) {
        let api = KeysApi::new(fresh(f).await);
        api.upload(
            U,
            D,
            &body(json!({"one_time_keys": {"signed_curve25519:A": wire_key("MATERIAL1")}})),
        )
        .await
        .expect("upload");
        let bad = [
            json!({"one_time_keys": {"signed_curve25519:A": wire_key("MATERIAL2")}}),
            json!({"one_time_keys": {"signed_curve25519:B": {"key": "MATERIAL3", "signatures": "MATERIAL4"}}}),
            json!({"fallback_keys": {"x:1": wire_key("MATERIAL5"), "x:2": wire_key("MATERIAL6")}}),
            json!({"one_time_keys": {"signed_curve25519:C": {"key": "MATERIAL7", "signatures": {}, "fallback": "MATERIAL8"}}}),
        ];
        for b in bad {
            let e = api.upload(U, D, &body(b)).await.expect_err("must fail");
            let text = format!("{e} {e:?} {}", e.to_json());
            assert!(!text.contains("MATERIAL"), "{text}");
        }
    }

    /// Bodies over the limit are refused before parsing; so are uploads with too
    /// many keys and claims with too many targets.
    pub async fn r9_large_bodies_are_refused<F: StoreFactory>(f: &F) {
        let api = KeysApi::new(fresh(f).await);
        let big = vec![b' '; (1 << 20) + 1];
        assert_api_err(api.upload(U, D, &big).await, 400, "M_TOO_LARGE", "body");
        assert_api_err(api.claim(&big).await, 400, "M_TOO_LARGE", "body");
        let keys: serde_json::Map<String, Value> = (0..1001)
            .map(|i| (format!("signed_curve25519:K{i}"), json!("k")))
            .collect();
        assert_api_err(
            api.upload(U, D, &body(json!({"one_time_keys": keys})))
                .await,
            400,
            "M_TOO_LARGE",
            "keys",
        );
        let mut limits = Limits::default();
        limits.max_claim_targets = 10;
        let api = api.with_limits(limits);
        let devices: serde_json::Map<String, Value> =
            (0..11).map(|i| (format!("D{i}"), json!(SC))).collect();
        assert_api_err(
            api.claim(&body(json!({"one_time_keys": {U: devices}})))
                .await,
            400,
            "M_TOO_LARGE",
            "targets",
        );
        assert!(full_state(api.store()).await.is_empty());
        let _ = api.store().backend_name();
    }
}
