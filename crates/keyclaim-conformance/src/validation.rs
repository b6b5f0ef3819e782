//! Contract section 2: identifiers and key JSON.

use keyclaim::{KeyStore, KeysApi};
use serde_json::json;

use crate::StoreFactory;
use crate::fixtures::*;

async fn assert_empty<S: KeyStore>(api: &KeysApi<S>) {
    assert!(
        full_state(api.store()).await.is_empty(),
        "nothing may be stored"
    );
}

cases! { $ validation;
    /// R2.1: bad user IDs are `M_INVALID_PARAM`, on every endpoint.
    pub async fn r2_1_invalid_user_ids_are_rejected<F: StoreFactory>(f: &F) {
        let api = KeysApi::new(fresh(f).await);
        let good = body(json!({"one_time_keys": {"signed_curve25519:A": wire_key("a")}}));
        let long = format!("@{}:b", "a".repeat(254));
        for user in [
            "",
            "alice",
            "@alice",
            "@:example.org",
            "@alice:",
            "alice:example.org",
            &long,
        ] {
            assert_api_err(
                api.upload(user, "DEV", &good).await,
                400,
                "M_INVALID_PARAM",
                user,
            );
            assert_api_err(api.sync(user, "DEV").await, 400, "M_INVALID_PARAM", user);
            assert_api_err(
                api.delete_device(user, "DEV").await,
                400,
                "M_INVALID_PARAM",
                user,
            );
        }
        let claim = body(json!({"one_time_keys": {"not-a-user": {"DEV": "signed_curve25519"}}}));
        assert_api_err(api.claim(&claim).await, 400, "M_INVALID_PARAM", "claim");
        assert_empty(&api).await;
    }

    /// R2.8: U+0000 in any identifier is refused alike on every backend:
    /// user and device IDs `M_INVALID_PARAM`, key IDs `M_BAD_JSON`; a claim
    /// naming such a device is a 400, never a 500 from the storage.
    pub async fn r2_8_u0000_is_refused_in_every_identifier<F: StoreFactory>(f: &F) {
        let api = KeysApi::new(fresh(f).await);
        let good = body(json!({"one_time_keys": {"signed_curve25519:A": wire_key("a")}}));
        for (user, device) in [("@a\u{0}:b", "DEV"), ("@a:b", "D\u{0}")] {
            assert_api_err(
                api.upload(user, device, &good).await,
                400,
                "M_INVALID_PARAM",
                device,
            );
            assert_api_err(api.sync(user, device).await, 400, "M_INVALID_PARAM", device);
            let claim = body(json!({"one_time_keys": {user: {device: "signed_curve25519"}}}));
            assert_api_err(api.claim(&claim).await, 400, "M_INVALID_PARAM", "claim");
        }
        for key_id in ["signed_curve25519:A\u{0}", "signed\u{0}:A"] {
            let otk = body(json!({"one_time_keys": {key_id: wire_key("a")}}));
            assert_api_err(
                api.upload("@a:b", "DEV", &otk).await,
                400,
                "M_BAD_JSON",
                key_id,
            );
            let fallback = body(json!({"fallback_keys": {key_id: wire_key("a")}}));
            assert_api_err(
                api.upload("@a:b", "DEV", &fallback).await,
                400,
                "M_BAD_JSON",
                key_id,
            );
        }
        assert_empty(&api).await;
    }

    /// R2.2: bad device IDs are `M_INVALID_PARAM`.
    pub async fn r2_2_invalid_device_ids_are_rejected<F: StoreFactory>(f: &F) {
        let api = KeysApi::new(fresh(f).await);
        let good = body(json!({"one_time_keys": {"signed_curve25519:A": wire_key("a")}}));
        let long = "D".repeat(256);
        for device in ["", long.as_str()] {
            assert_api_err(
                api.upload("@a:b", device, &good).await,
                400,
                "M_INVALID_PARAM",
                device,
            );
            assert_api_err(
                api.sync("@a:b", device).await,
                400,
                "M_INVALID_PARAM",
                device,
            );
        }
        let ok255 = "D".repeat(255);
        api.upload("@a:b", &ok255, &good)
            .await
            .expect("255-byte device ID is fine");
    }

    /// R2.3: key IDs need exactly one colon with non-empty parts of at most 255 bytes.
    pub async fn r2_3_invalid_key_ids_are_rejected<F: StoreFactory>(f: &F) {
        let api = KeysApi::new(fresh(f).await);
        let long_alg = format!("{}:x", "a".repeat(256));
        let long_name = format!("a:{}", "x".repeat(256));
        for id in [
            "nocolon", "a:b:c", ":x", "x:", ":", "", &long_alg, &long_name,
        ] {
            for field in ["one_time_keys", "fallback_keys"] {
                let b = body(json!({ field: { id: wire_key("k") } }));
                assert_api_err(api.upload("@a:b", "D", &b).await, 400, "M_BAD_JSON", id);
            }
        }
        assert_empty(&api).await;
        let ok = format!("{}:{}", "a".repeat(255), "x".repeat(255));
        let b = body(json!({"one_time_keys": { ok.as_str(): wire_key("k") }}));
        api.upload("@a:b", "D", &b)
            .await
            .expect("255-byte parts are fine");
    }

    /// R2.4: key JSON is a string or an object with string `key`, object
    /// `signatures` and boolean `fallback` if present.
    pub async fn r2_4_invalid_key_json_is_rejected<F: StoreFactory>(f: &F) {
        let api = KeysApi::new(fresh(f).await);
        let bad = [
            json!(1),
            json!(null),
            json!(true),
            json!(["k"]),
            json!({}),
            json!({"key": "k"}),
            json!({"signatures": {}}),
            json!({"key": 5, "signatures": {}}),
            json!({"key": "k", "signatures": "s"}),
            json!({"key": "k", "signatures": {}, "fallback": "true"}),
            json!({"key": "k", "signatures": {}, "fallback": 1}),
        ];
        for v in bad {
            for field in ["one_time_keys", "fallback_keys"] {
                let b = body(json!({ field: { "signed_curve25519:A": v.clone() } }));
                assert_api_err(
                    api.upload("@a:b", "D", &b).await,
                    400,
                    "M_BAD_JSON",
                    &v.to_string(),
                );
            }
        }
        assert_empty(&api).await;
        let good = body(json!({"one_time_keys": {
            "signed_curve25519:A": "plain-string-key",
            "signed_curve25519:B": {"key": "k", "signatures": {}, "extra": [1, {"x": null}]},
            "signed_curve25519:C": {"key": "k", "signatures": {}, "fallback": false},
        }}));
        api.upload("@a:b", "D", &good)
            .await
            .expect("valid key JSON");
        assert_eq!(count(api.store(), &dev("@a:b", "D"), SC).await, 3);
    }

    /// R2.5: claims return the stored JSON value unchanged: unknown fields,
    /// `fallback: true`, unicode and numbers included.
    pub async fn r2_5_key_json_is_returned_unchanged<F: StoreFactory>(f: &F) {
        let api = KeysApi::new(fresh(f).await);
        let otk = json!({
            "key": "pk\u{e9}\u{1F511}\"\\",
            "signatures": {"@a:b": {"ed25519:D": "sig1"}},
            "unknown": {"nested": [1, 2.5, -3, null, false, "s"], "big": 9007199254740993u64},
        });
        let fb = json!({"key": "fbk", "fallback": true, "signatures": {"@a:b": {"ed25519:D": "s"}}, "zz": 1});
        let b = body(json!({
            "one_time_keys": {"signed_curve25519:A": otk, "curve25519:S": "legacy-string"},
            "fallback_keys": {"signed_curve25519:F": fb},
        }));
        api.upload("@a:b", "D", &b).await.expect("upload");
        for (alg, id, want) in [
            ("signed_curve25519", "signed_curve25519:A", &otk),
            ("curve25519", "curve25519:S", &json!("legacy-string")),
            ("signed_curve25519", "signed_curve25519:F", &fb),
        ] {
            let c = body(json!({"one_time_keys": {"@a:b": {"D": alg}}}));
            let out = api.claim(&c).await.expect("claim");
            assert_eq!(&out["one_time_keys"]["@a:b"]["D"][id], want, "{id}");
        }
    }

    /// R2.6: an upload with any invalid part stores nothing.
    pub async fn r2_6_invalid_upload_stores_nothing<F: StoreFactory>(f: &F) {
        let api = KeysApi::new(fresh(f).await);
        let cases = [
            json!({"one_time_keys": {"signed_curve25519:A": wire_key("a"), "bad": wire_key("b")}}),
            json!({"one_time_keys": {"signed_curve25519:A": wire_key("a"), "signed_curve25519:B": 7}}),
            json!({"one_time_keys": {"signed_curve25519:A": wire_key("a")}, "fallback_keys": {"x": "y"}}),
            json!({"one_time_keys": {"signed_curve25519:A": wire_key("a")}, "fallback_keys": 3}),
            json!({"one_time_keys": {"signed_curve25519:A": wire_key("a")}, "device_keys": []}),
            json!({"fallback_keys": {"signed_curve25519:F": wire_key("f"), "signed_curve25519:G": wire_key("g")},
                   "one_time_keys": {"signed_curve25519:A": wire_key("a")}}),
        ];
        for c in cases {
            assert!(
                api.upload("@a:b", "D", &body(c.clone())).await.is_err(),
                "{c}"
            );
        }
        assert_empty(&api).await;
    }

    /// R2.6: a claim with any invalid part consumes nothing.
    pub async fn r2_6_invalid_claim_consumes_nothing<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        put(&store, &a, otks(SC, &["A", "B"]), otks(SC, &["F"])).await;
        let before = full_state(&store).await;
        let api = KeysApi::new(store);
        let u = a.user_id.as_str();
        let d = a.device_id.as_str();
        let cases = [
            json!({"one_time_keys": {u: {d: SC}, "@b:x": {"D": 5}}}),
            json!({"one_time_keys": {u: {d: SC}, "@b:x": "D"}}),
            json!({"one_time_keys": {u: {d: SC}, "bad-user": {"D": SC}}}),
            json!({"one_time_keys": {u: {d: SC}, "@b:x": {"": SC}}}),
            json!({"one_time_keys": [u]}),
        ];
        for c in cases {
            assert!(api.claim(&body(c.clone())).await.is_err(), "{c}");
        }
        assert_eq!(
            full_state(api.store()).await,
            before,
            "a failed claim consumed keys"
        );
    }

    /// R2.7: orders are byte orders: unused fallback types and ties inside an upload.
    pub async fn r2_7_orders_are_byte_orders<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        let algs = ["b", "\u{e9}", "B", "_", "a", "Z"];
        let fallbacks = algs
            .iter()
            .map(|x| (kid(&format!("{x}:F")), signed(x, "s")))
            .collect();
        put(
            &store,
            &a,
            otks("alg", &["b", "\u{e9}", "B", "_", "a", "Z", "aa"]),
            fallbacks,
        )
        .await;
        let mut want: Vec<String> = algs.iter().map(|s| s.to_string()).collect();
        want.sort_by(|x, y| x.as_bytes().cmp(y.as_bytes()));
        assert_eq!(unused(&store, &a).await, want);
        let mut order = Vec::new();
        while let Some(k) = claim_one(&store, &a, "alg").await {
            if k.fallback {
                break;
            }
            order.push(k.key_id.name().to_owned());
        }
        assert_eq!(order, ["B", "Z", "_", "a", "aa", "b", "\u{e9}"]);
    }
}
