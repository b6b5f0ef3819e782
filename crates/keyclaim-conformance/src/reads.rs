//! Contract sections 15 and 16: reading fallback keys (MSC4081) and many
//! devices' counts at once (MSC3202).

use keyclaim::{Device, Error, KeyStore, KeysApi, Limits};
use serde_json::json;

use crate::StoreFactory;
use crate::fixtures::*;

cases! { $ reads;
    /// R15.1: a device's fallback keys per algorithm, with key ID, JSON and
    /// used flag, read without changing anything.
    pub async fn r15_1_fallback_keys_are_read_without_change<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        let fs = (kid("signed_curve25519:F1"), signed_fallback("f1", "s"));
        let fo = (kid("other:F2"), signed_fallback("f2", "s"));
        put(&store, &a, otks(SC, &["K1"]), vec![fs.clone(), fo.clone()]).await;
        claim_one(&store, &dev(U_ALICE, "ALICEDEV"), "other")
            .await
            .expect("other fallback used");
        let before = full_state(&store).await;
        let mut rx = store.subscribe();
        let keys = store.fallback_keys(&a).await.expect("read");
        let got: Vec<_> = keys
            .iter()
            .map(|(alg, k)| {
                (
                    alg.to_string(),
                    k.key_id.clone(),
                    k.key_json.clone(),
                    k.used,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("other".to_owned(), fo.0, fo.1, true),
                (SC.to_owned(), fs.0, fs.1, false),
            ]
        );
        assert_eq!(full_state(&store).await, before, "nothing changed");
        assert!(rx.try_recv().is_err(), "nothing reported");
        assert!(
            store
                .fallback_keys(&bob())
                .await
                .expect("unknown device")
                .is_empty()
        );
    }

    /// R15.1 through the facade: `{"fallback_keys": {key_id: key_json},
    /// "used": [algorithm, ...]}`.
    pub async fn r15_1_fallback_keys_endpoint<F: StoreFactory>(f: &F) {
        let api = KeysApi::new(fresh(f).await);
        let a = alice();
        put(
            api.store(),
            &a,
            vec![],
            vec![
                (kid("signed_curve25519:F1"), signed_fallback("f1", "s")),
                (kid("b:F2"), signed_fallback("f2", "s")),
            ],
        )
        .await;
        claim_one(api.store(), &a, "b")
            .await
            .expect("b fallback used");
        let answer = api.fallback_keys(U_ALICE, "ALICEDEV").await.expect("read");
        assert_eq!(
            answer,
            json!({
                "fallback_keys": {
                    "signed_curve25519:F1": signed_fallback("f1", "s").to_value(),
                    "b:F2": signed_fallback("f2", "s").to_value(),
                },
                "used": ["b"],
            })
        );
        assert_eq!(
            api.fallback_keys(U_ALICE, "NONE").await.expect("empty"),
            json!({"fallback_keys": {}, "used": []})
        );
        assert_api_err(
            api.fallback_keys("bad", "D").await,
            400,
            "M_INVALID_PARAM",
            "bad user",
        );
        assert_eq!(unused(api.store(), &a).await, [SC], "reading marks nothing");
    }

    /// R16.1: counts and unused fallback types of many devices in one call, in
    /// the order asked, the empty state for devices without keys; the same as
    /// reading each device alone.
    pub async fn r16_1_counts_many_matches_single_reads<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let mut devices: Vec<Device> = Vec::new();
        for i in 0..30 {
            let d = dev(&format!("@user{}:example.org", i % 7), &format!("D{i}"));
            if i % 3 != 0 {
                put(&store, &d, numbered_otks(SC, "K", i % 5 + 1), vec![]).await;
            }
            if i % 4 == 0 {
                put(
                    &store,
                    &d,
                    otks("other", &["O"]),
                    vec![(kid("signed_curve25519:F"), signed_fallback("f", "s"))],
                )
                .await;
            }
            devices.push(d);
        }
        devices.reverse();
        devices.push(dev("@nobody:example.org", "NONE"));
        devices.push(devices[0].clone());
        let states = store.counts_many(&devices).await.expect("counts_many");
        assert_eq!(states.len(), devices.len());
        for (d, state) in devices.iter().zip(&states) {
            assert_eq!(
                *state,
                store.sync_state(d).await.expect("sync_state"),
                "{d}"
            );
        }
        assert!(
            states[devices.len() - 2] == keyclaim::SyncState::default(),
            "unknown device: empty"
        );
        assert!(store.counts_many(&[]).await.expect("none").is_empty());
    }

    /// R16.1: more devices than the limit is `TooLarge`, in the store and as
    /// `M_TOO_LARGE` through the facade; bad bodies are refused.
    pub async fn r16_1_counts_many_limit_and_endpoint<F: StoreFactory>(f: &F) {
        let mut limits = Limits::default();
        limits.max_counts_devices = 2;
        let api = KeysApi::new(fresh_with(f, limits).await);
        let (a, b) = (alice(), bob());
        put(
            api.store(),
            &a,
            otks(SC, &["K1"]),
            vec![(kid("signed_curve25519:F"), signed_fallback("f", "s"))],
        )
        .await;
        let three = [a.clone(), b.clone(), dev(U_ALICE, "X")];
        let err = api
            .store()
            .counts_many(&three)
            .await
            .expect_err("three devices");
        assert!(matches!(err, Error::TooLarge { .. }), "{err:?}");
        let answer = api
            .counts_many(&body(
                json!({"devices": {U_ALICE: ["ALICEDEV"], "@bob:example.org": ["BOBDEV"]}}),
            ))
            .await
            .expect("two");
        assert_eq!(
            answer,
            json!({
                U_ALICE: {"ALICEDEV": {"device_one_time_keys_count": {SC: 1}, "device_unused_fallback_key_types": [SC]}},
                "@bob:example.org": {"BOBDEV": {"device_one_time_keys_count": {SC: 0}, "device_unused_fallback_key_types": []}},
            })
        );
        assert_eq!(api.counts_many(b"{}").await.expect("no devices"), json!({}));
        let bad = [
            (
                json!({"devices": {U_ALICE: ["A", "B", "C"]}}),
                "M_TOO_LARGE",
            ),
            (json!({"devices": []}), "M_BAD_JSON"),
            (json!({"devices": {U_ALICE: "ALICEDEV"}}), "M_BAD_JSON"),
            (json!({"devices": {U_ALICE: [1]}}), "M_BAD_JSON"),
            (json!({"devices": {"nope": ["D"]}}), "M_INVALID_PARAM"),
            (json!({"devices": {U_ALICE: [""]}}), "M_INVALID_PARAM"),
        ];
        for (b, code) in bad {
            assert_api_err(
                api.counts_many(&body(b.clone())).await,
                400,
                code,
                &b.to_string(),
            );
        }
    }
}

const U_ALICE: &str = "@alice:example.org";
