//! Contract section 14: dehydrated devices (MSC3814).

use std::sync::Arc;

use keyclaim::{DeviceId, Error, KeyStore, KeysApi};
use serde_json::json;

use crate::StoreFactory;
use crate::fixtures::*;

const U: &str = "@alice:example.org";

fn device_id(id: &str) -> DeviceId {
    DeviceId::parse(id).expect("valid fixture device ID")
}

cases! { $ dehydrated;
    /// R14.1: replacing removes everything the previous dehydrated device held
    /// (keys, fallback keys, remembered issued keys) and stores the upload
    /// for the new one; other devices are untouched; both are reported.
    pub async fn r14_1_replace_removes_previous_and_uploads_new<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let old = dev(U, "DEHYDRATED1");
        let new = dev(U, "DEHYDRATED2");
        let other = alice();
        put(
            &store,
            &old,
            otks(SC, &["O1", "O2"]),
            vec![(kid("signed_curve25519:OF"), signed_fallback("of", "s"))],
        )
        .await;
        put(&store, &other, otks(SC, &["A1"]), vec![]).await;
        let upload = upload_of(
            &new,
            otks(SC, &["N1", "N2", "N3"]),
            vec![(kid("signed_curve25519:NF"), signed_fallback("nf", "s"))],
        );
        let out = store
            .replace_device(Some(&old.device_id), &upload)
            .await
            .expect("replace");
        assert_eq!(out.counts.get_str(SC), 3);
        assert!(out.changes.contains(&old) && out.changes.contains(&new));
        assert!(
            store
                .export_devices(None, 100)
                .await
                .expect("export")
                .iter()
                .all(|s| s.device != old),
            "nothing of the previous device is left"
        );
        assert_eq!(count(&store, &new, SC).await, 3);
        assert_eq!(unused(&store, &new).await, [SC]);
        assert_eq!(count(&store, &other, SC).await, 1);
    }

    /// R14.1: the previous device may be absent, unknown, or the new device
    /// itself; then the new device starts empty: its old keys and its
    /// remembered issued keys are gone.
    pub async fn r14_1_replace_same_or_absent_previous<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let d = dev(U, "DEHYDRATED");
        let first = otks(SC, &["K1", "K2"]);
        put(&store, &d, first.clone(), vec![]).await;
        claim_one(&store, &d, SC).await.expect("K1 issued");
        let again = upload_of(&d, first.clone(), vec![]);
        let out = store
            .replace_device(Some(&d.device_id), &again)
            .await
            .expect("same device");
        assert_eq!(
            out.counts.get_str(SC),
            2,
            "K2 replaced, K1 stored again: nothing remembered"
        );
        let out = store
            .replace_device(None, &upload_of(&d, otks(SC, &["K3"]), vec![]))
            .await
            .expect("no previous");
        assert_eq!(
            out.counts.get_str(SC),
            3,
            "without a previous device the upload adds"
        );
        let out = store
            .replace_device(
                Some(&device_id("NEVER")),
                &upload_of(&d, otks(SC, &["K4"]), vec![]),
            )
            .await
            .expect("unknown previous");
        assert_eq!(out.counts.get_str(SC), 4);
        assert!(
            !out.changes.contains(&dev(U, "NEVER")),
            "an empty previous device did not change"
        );
    }

    /// R14.1: an upload that is invalid or over a limit changes nothing: the
    /// previous device keeps everything.
    pub async fn r14_1_failed_replace_changes_nothing<F: StoreFactory>(f: &F) {
        let mut limits = keyclaim::Limits::default();
        limits.max_otks_per_device_algorithm = 2;
        let store = fresh_with(f, limits).await;
        let old = dev(U, "OLD");
        let new = dev(U, "NEW");
        put(
            &store,
            &old,
            otks(SC, &["O1"]),
            vec![(kid("signed_curve25519:F"), signed_fallback("f", "s"))],
        )
        .await;
        put(&store, &new, otks(SC, &["X1"]), vec![]).await;
        let before = full_state(&store).await;
        let mut rx = store.subscribe();
        let over = upload_of(&new, otks(SC, &["N1", "N2"]), vec![]);
        let err = store
            .replace_device(Some(&old.device_id), &over)
            .await
            .expect_err("over the limit");
        assert!(matches!(err, Error::TooLarge { .. }), "{err:?}");
        let conflict = upload_of(
            &new,
            vec![(kid("signed_curve25519:X1"), signed("other", "s"))],
            vec![],
        );
        let err = store
            .replace_device(Some(&old.device_id), &conflict)
            .await
            .expect_err("conflict");
        assert!(matches!(err, Error::Conflict { .. }), "{err:?}");
        let same_over = upload_of(&old, otks(SC, &["P1", "P2", "P3"]), vec![]);
        let err = store
            .replace_device(Some(&old.device_id), &same_over)
            .await
            .expect_err("over, same device");
        assert!(matches!(err, Error::TooLarge { .. }), "{err:?}");
        assert_eq!(full_state(&store).await, before, "nothing changed");
        assert!(rx.try_recv().is_err(), "nothing reported");
    }

    /// R14.1 with R4.2: claims racing the replacement of the device they claim
    /// from: every key answered was the previous device's, none twice, and
    /// none of them is left afterwards.
    pub async fn r14_1_replace_racing_claims_of_previous<F: StoreFactory>(f: &F) {
        let store = Arc::new(fresh(f).await);
        let old = dev(U, "OLD");
        let new = dev(U, "NEW");
        let n = 100;
        put(&*store, &old, numbered_otks(SC, "K", n), vec![]).await;
        let claimers = spawn_drainers(&store, &old, SC, 8);
        let upload = upload_of(&new, numbered_otks(SC, "N", 10), vec![]);
        store
            .replace_device(Some(&old.device_id), &upload)
            .await
            .expect("replace");
        let seen = join_distinct(claimers).await;
        for id in &seen {
            assert!(
                id.starts_with("signed_curve25519:K"),
                "{id} is not the previous device's"
            );
        }
        assert!(seen.len() <= n);
        assert_eq!(count(&*store, &old, SC).await, 0);
        assert_eq!(
            count(&*store, &new, SC).await,
            10,
            "the new device's keys were not claimed"
        );
    }

    /// R14.1 through the facade: the MSC3814 body's keys are stored, its
    /// other fields ignored; the answer names the device and its counts.
    pub async fn r14_1_replace_endpoint<F: StoreFactory>(f: &F) {
        let api = KeysApi::new(fresh(f).await);
        put(api.store(), &dev(U, "OLD"), otks(SC, &["O1"]), vec![]).await;
        let b = body(json!({
            "device_id": "NEW",
            "device_data": {"algorithm": "m.dehydration.v1.olm", "device_pickle": "..."},
            "initial_device_display_name": "dehydrated device",
            "device_keys": {"user_id": U, "device_id": "NEW"},
            "one_time_keys": {"signed_curve25519:N1": wire_key("n1"), "signed_curve25519:N2": wire_key("n2")},
            "fallback_keys": {"signed_curve25519:NF": {"key": "nf", "fallback": true, "signatures": {}}},
        }));
        let answer = api
            .replace_dehydrated_device(U, Some("OLD"), "NEW", &b)
            .await
            .expect("replace");
        assert_eq!(
            answer,
            json!({"device_id": "NEW", "one_time_key_counts": {SC: 2}})
        );
        assert_eq!(count(api.store(), &dev(U, "OLD"), SC).await, 0);
        assert_eq!(unused(api.store(), &dev(U, "NEW")).await, [SC]);
        let bad = body(json!({"one_time_keys": {"nocolon": wire_key("x")}}));
        assert_api_err(
            api.replace_dehydrated_device(U, Some("NEW"), "NEWER", &bad)
                .await,
            400,
            "M_BAD_JSON",
            "bad key ID",
        );
        assert_api_err(
            api.replace_dehydrated_device(U, Some(""), "NEWER", b"{}")
                .await,
            400,
            "M_INVALID_PARAM",
            "bad previous",
        );
        assert_eq!(
            count(api.store(), &dev(U, "NEW"), SC).await,
            2,
            "a refused request changes nothing"
        );
    }

    /// R14.2: with the option on, an upload with one-time keys of an algorithm
    /// but no fallback key of it is 400 `M_INVALID_PARAM`, nothing changed;
    /// with a fallback key per algorithm (or the option off) it is accepted.
    pub async fn r14_2_fallback_required_option<F: StoreFactory>(f: &F) {
        let strict = KeysApi::new(fresh(f).await).with_dehydrated_fallback_required(true);
        put(strict.store(), &dev(U, "OLD"), otks(SC, &["O1"]), vec![]).await;
        let missing = body(json!({
            "one_time_keys": {"signed_curve25519:N1": wire_key("n1"), "other:N2": wire_key("n2")},
            "fallback_keys": {"signed_curve25519:NF": {"key": "nf", "fallback": true, "signatures": {}}},
        }));
        let err = assert_api_err(
            strict
                .replace_dehydrated_device(U, Some("OLD"), "NEW", &missing)
                .await,
            400,
            "M_INVALID_PARAM",
            "no fallback for `other`",
        );
        assert!(err.message().contains("other"), "{}", err.message());
        assert_eq!(
            count(strict.store(), &dev(U, "OLD"), SC).await,
            1,
            "nothing changed"
        );
        let complete = body(json!({
            "one_time_keys": {"signed_curve25519:N1": wire_key("n1")},
            "fallback_keys": {"signed_curve25519:NF": {"key": "nf", "fallback": true, "signatures": {}}},
        }));
        strict
            .replace_dehydrated_device(U, Some("OLD"), "NEW", &complete)
            .await
            .expect("complete upload");
        let lax = KeysApi::new(fresh(f).await);
        lax.replace_dehydrated_device(U, None, "NEW", &missing)
            .await
            .expect("option off");
    }
}
