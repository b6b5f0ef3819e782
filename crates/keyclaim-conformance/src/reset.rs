//! Contract section 13: key reset (MSC4162).

use std::collections::BTreeSet;
use std::sync::Arc;

use keyclaim::{KeyStore, KeysApi, ResetScope};
use serde_json::json;

use crate::StoreFactory;
use crate::fixtures::*;

const U: &str = "@alice:example.org";
const D: &str = "ALICEDEV";

fn listed(names: &[&str]) -> ResetScope {
    ResetScope::KeyIds(names.iter().map(|n| kid(n)).collect())
}

cases! { $ reset;
    /// R13.1: resetting all removes every stored one-time key of the device,
    /// of every algorithm, and nothing else: the fallback key, other devices
    /// and the remembered issued keys stay.
    pub async fn r13_1_reset_all_removes_only_one_time_keys<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let (a, b) = (alice(), bob());
        let issued = otks(SC, &["I1"]);
        put(
            &store,
            &a,
            issued.clone(),
            vec![(kid("signed_curve25519:F"), signed_fallback("f", "s"))],
        )
        .await;
        claim_one(&store, &a, SC).await.expect("I1 issued");
        put(&store, &a, otks(SC, &["A1", "A2"]), vec![]).await;
        put(&store, &a, otks("other", &["O1"]), vec![]).await;
        put(&store, &b, otks(SC, &["B1"]), vec![]).await;
        let out = store
            .reset_one_time_keys(&a, &ResetScope::All)
            .await
            .expect("reset");
        assert!(
            out.counts.is_empty(),
            "counts after the reset: {:?}",
            out.counts
        );
        assert!(out.changes.contains(&a));
        assert_eq!(count(&store, &a, SC).await, 0);
        assert_eq!(count(&store, &a, "other").await, 0);
        assert_eq!(count(&store, &b, SC).await, 1, "other devices untouched");
        assert_eq!(unused(&store, &a).await, [SC], "fallback key untouched");
        // The issued key is still remembered (R3.4): its re-upload is not stored.
        put(&store, &a, issued, vec![]).await;
        assert_eq!(
            count(&store, &a, SC).await,
            0,
            "remembered issued keys untouched"
        );
        // A reset key was never issued: uploading it again stores it again.
        put(&store, &a, otks(SC, &["A1"]), vec![]).await;
        assert_eq!(count(&store, &a, SC).await, 1);
    }

    /// R13.1: a list of key IDs removes just those; IDs not stored are
    /// ignored; the rest keep their claim order.
    pub async fn r13_1_reset_listed_key_ids<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        put(&store, &a, otks(SC, &["K1", "K2"]), vec![]).await;
        put(&store, &a, otks(SC, &["K3", "K4"]), vec![]).await;
        let out = store
            .reset_one_time_keys(
                &a,
                &listed(&[
                    "signed_curve25519:K1",
                    "signed_curve25519:K3",
                    "signed_curve25519:NOPE",
                    "other:K2",
                ]),
            )
            .await
            .expect("reset");
        assert_eq!(out.counts.get_str(SC), 2);
        assert!(out.changes.contains(&a));
        let left = claim_n(&store, &a, SC, 5).await;
        assert_eq!(
            ids(&left.keys),
            ["signed_curve25519:K2", "signed_curve25519:K4"]
        );
    }

    /// R13.1: a reset that removes nothing changes nothing and reports no
    /// change (R11.1); an unknown device answers empty counts.
    pub async fn r13_1_reset_of_nothing_changes_nothing<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        put(&store, &a, otks(SC, &["K1"]), vec![]).await;
        let mut rx = store.subscribe();
        let out = store
            .reset_one_time_keys(&a, &listed(&["signed_curve25519:ZZ"]))
            .await
            .expect("reset");
        assert!(out.changes.is_empty());
        assert_eq!(out.counts.get_str(SC), 1);
        let out = store
            .reset_one_time_keys(&a, &listed(&[]))
            .await
            .expect("empty list");
        assert!(out.changes.is_empty());
        let out = store
            .reset_one_time_keys(&dev("@nobody:example.org", "X"), &ResetScope::All)
            .await
            .expect("unknown");
        assert!(out.counts.is_empty() && out.changes.is_empty());
        assert!(rx.try_recv().is_err(), "no change reported");
        store
            .reset_one_time_keys(&a, &ResetScope::All)
            .await
            .expect("reset all");
        assert!(rx.try_recv().expect("reported").contains(&a));
    }

    /// R13.1 with R4.2: a reset racing claims of the device: every key is
    /// either claimed once or removed, never both, never twice.
    pub async fn r13_1_reset_racing_claims<F: StoreFactory>(f: &F) {
        let store = Arc::new(fresh(f).await);
        let a = alice();
        let n = 100;
        put(&*store, &a, numbered_otks(SC, "K", n), vec![]).await;
        let claimers = spawn_drainers(&store, &a, SC, 8);
        let evens: Vec<String> = (0..n)
            .step_by(2)
            .map(|i| format!("signed_curve25519:K{i:06}"))
            .collect();
        let names: Vec<&str> = evens.iter().map(String::as_str).collect();
        store
            .reset_one_time_keys(&a, &listed(&names))
            .await
            .expect("reset");
        let claimed = join_distinct(claimers).await;
        assert_eq!(count(&*store, &a, SC).await, 0, "claimers drained the rest");
        let odd: BTreeSet<String> = (1..n)
            .step_by(2)
            .map(|i| format!("signed_curve25519:K{i:06}"))
            .collect();
        assert!(
            odd.is_subset(&claimed),
            "keys outside the reset were all claimed"
        );
        // Every key was claimed or reset: the claimed ones are at most all.
        assert!(claimed.len() <= n);
    }

    /// R13.2: the facade's `POST /keys/reset`: `all` wins over `key_ids`, an
    /// empty request resets nothing, the answer is the counts.
    pub async fn r13_2_reset_endpoint<F: StoreFactory>(f: &F) {
        let api = KeysApi::new(fresh(f).await);
        let a = alice();
        put(api.store(), &a, otks(SC, &["K1", "K2", "K3"]), vec![]).await;
        let answer = api.reset(U, D, b"{}").await.expect("empty");
        assert_eq!(answer, json!({"device_one_time_keys_count": {SC: 3}}));
        let answer = api
            .reset(
                U,
                D,
                &body(json!({"all": false, "key_ids": ["signed_curve25519:K1"]})),
            )
            .await
            .expect("list");
        assert_eq!(answer, json!({"device_one_time_keys_count": {SC: 2}}));
        let answer = api
            .reset(
                U,
                D,
                &body(json!({"all": true, "key_ids": ["signed_curve25519:K2"]})),
            )
            .await
            .expect("all");
        assert_eq!(answer, json!({"device_one_time_keys_count": {SC: 0}}));
    }

    /// R13.2: bad types are `M_BAD_JSON`, bad key IDs too (R2.3), too many key
    /// IDs `M_TOO_LARGE`, bad IDs `M_INVALID_PARAM`; nothing is removed.
    pub async fn r13_2_bad_reset_requests_change_nothing<F: StoreFactory>(f: &F) {
        let mut limits = keyclaim::Limits::default();
        limits.max_keys_per_upload = 3;
        let api = KeysApi::new(fresh_with(f, limits).await);
        let a = alice();
        put(api.store(), &a, otks(SC, &["K1"]), vec![]).await;
        let cases = [
            (json!({"all": "yes"}), "M_BAD_JSON"),
            (json!({"key_ids": "signed_curve25519:K1"}), "M_BAD_JSON"),
            (json!({"key_ids": [1]}), "M_BAD_JSON"),
            (
                json!({"key_ids": ["signed_curve25519:K1", "nocolon"]}),
                "M_BAD_JSON",
            ),
            (
                json!({"key_ids": ["signed_curve25519:K1", "a\u{0}b:c"]}),
                "M_BAD_JSON",
            ),
            (
                json!({"key_ids": ["a:1", "a:2", "a:3", "signed_curve25519:K1"]}),
                "M_TOO_LARGE",
            ),
        ];
        for (b, code) in cases {
            assert_api_err(
                api.reset(U, D, &body(b.clone())).await,
                400,
                code,
                &b.to_string(),
            );
        }
        assert_api_err(
            api.reset(U, D, b"[1]").await,
            400,
            "M_BAD_JSON",
            "array body",
        );
        assert_api_err(
            api.reset(U, D, b"{").await,
            400,
            "M_NOT_JSON",
            "broken body",
        );
        assert_api_err(
            api.reset("bad", D, b"{}").await,
            400,
            "M_INVALID_PARAM",
            "bad user",
        );
        assert_eq!(count(api.store(), &a, SC).await, 1, "nothing removed");
    }
}
