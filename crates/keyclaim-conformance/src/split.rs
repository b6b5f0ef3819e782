//! Contract section 12: split claims (one-time keys, then an application
//! service's keys, then fallback keys).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keyclaim::{
    BoxError, ClaimOptions, ClaimTarget, ClaimedKey, FallbackTarget, KeyJson, KeyStore, KeysApi,
    OtkProvider,
};
use serde_json::{Value, json};

use crate::StoreFactory;
use crate::fixtures::*;

/// A provider (an application service) that hands out keys from a list, or
/// fails, or never answers; it counts its calls and records its targets.
#[derive(Debug)]
struct Provider {
    mode: Mode,
    calls: AtomicUsize,
    asked: std::sync::Mutex<Vec<ClaimTarget>>,
}

#[derive(Debug)]
enum Mode {
    Keys(Vec<ClaimedKey>),
    Fails,
    Hangs,
}

impl Provider {
    fn new(mode: Mode) -> Arc<Self> {
        Arc::new(Self {
            mode,
            calls: AtomicUsize::new(0),
            asked: std::sync::Mutex::new(Vec::new()),
        })
    }
}

#[keyclaim::async_trait]
impl OtkProvider for Provider {
    async fn claim_one_time_keys(
        &self,
        targets: &[ClaimTarget],
    ) -> Result<Vec<ClaimedKey>, BoxError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.asked
            .lock()
            .expect("provider lock")
            .extend_from_slice(targets);
        match &self.mode {
            Mode::Keys(keys) => Ok(keys.clone()),
            Mode::Fails => Err("application service unreachable".into()),
            Mode::Hangs => std::future::pending().await,
        }
    }
}

fn provided(device: &keyclaim::Device, id: &str, json: Value) -> ClaimedKey {
    ClaimedKey {
        device: device.clone(),
        key_id: kid(id),
        key_json: KeyJson::from_value(&json).expect("valid provided key"),
        fallback: false,
    }
}

fn claim_body(targets: &[(&keyclaim::Device, &str)]) -> Vec<u8> {
    let mut users = serde_json::Map::new();
    for (device, algorithm) in targets {
        let entry = users
            .entry(device.user_id.as_str())
            .or_insert_with(|| json!({}));
        entry[device.device_id.as_str()] = json!(algorithm);
    }
    body(json!({ "one_time_keys": users }))
}

/// The key IDs of one device in a claim answer, sorted.
fn answered(answer: &Value, device: &keyclaim::Device) -> Vec<String> {
    let keys = &answer["one_time_keys"][device.user_id.as_str()][device.device_id.as_str()];
    let mut ids: Vec<String> = keys
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    ids.sort();
    ids
}

cases! { $ split;
    /// R12.1: the one-time step issues one-time keys as the one-step claim
    /// does (oldest first, count clamped) and never touches fallback keys;
    /// targets that got nothing are the misses, in request order.
    pub async fn r12_1_one_time_step_never_touches_fallback_keys<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let (a, b) = (alice(), bob());
        put(
            &store,
            &a,
            otks(SC, &["A1", "A2"]),
            vec![(kid("signed_curve25519:F"), signed_fallback("fa", "s"))],
        )
        .await;
        put(&store, &a, otks(SC, &["A0"]), vec![]).await;
        put(
            &store,
            &b,
            vec![],
            vec![(kid("signed_curve25519:G"), signed_fallback("fb", "s"))],
        )
        .await;
        let ghost = dev("@ghost:example.org", "NONE");
        let targets = [
            ClaimTarget::one(ghost.clone(), alg(SC)),
            ClaimTarget {
                count: 9,
                ..ClaimTarget::one(a.clone(), alg(SC))
            },
            ClaimTarget::one(b.clone(), alg(SC)),
        ];
        let out = store
            .claim_one_time_keys(&targets)
            .await
            .expect("one-time step");
        assert_eq!(
            ids(&out.keys),
            [
                "signed_curve25519:A1",
                "signed_curve25519:A2",
                "signed_curve25519:A0"
            ]
        );
        assert!(out.keys.iter().all(|k| !k.fallback && k.device == a));
        assert_eq!(
            out.misses,
            [targets[0].clone(), targets[2].clone()],
            "misses in request order"
        );
        assert!(out.changes.contains(&a) && !out.changes.contains(&b));
        // Nothing left: a miss, and the fallback keys are untouched.
        let out = store
            .claim_one_time_keys(&[ClaimTarget::one(a.clone(), alg(SC))])
            .await
            .expect("again");
        assert!(out.keys.is_empty());
        assert_eq!(out.misses.len(), 1);
        assert!(out.changes.is_empty());
        assert_eq!(unused(&store, &a).await, [SC]);
        assert_eq!(unused(&store, &b).await, [SC]);
    }

    /// R12.1 with R8.3: counts are clamped; a target that got fewer keys than
    /// it asked for is not a miss.
    pub async fn r12_1_partial_targets_are_not_misses<F: StoreFactory>(f: &F) {
        let mut limits = keyclaim::Limits::default();
        limits.max_claim_count = 2;
        let store = fresh_with(f, limits).await;
        let a = alice();
        put(&store, &a, otks(SC, &["K1", "K2", "K3"]), vec![]).await;
        let target = ClaimTarget {
            count: 50,
            ..ClaimTarget::one(a.clone(), alg(SC))
        };
        let out = store
            .claim_one_time_keys(std::slice::from_ref(&target))
            .await
            .expect("first");
        assert_eq!(
            ids(&out.keys),
            ["signed_curve25519:K1", "signed_curve25519:K2"],
            "clamped to 2"
        );
        let out = store
            .claim_one_time_keys(std::slice::from_ref(&target))
            .await
            .expect("second");
        assert_eq!(ids(&out.keys), ["signed_curve25519:K3"]);
        assert!(out.misses.is_empty(), "one key is not a miss");
        assert_eq!(count(&store, &a, SC).await, 0);
    }

    /// R12.2: the fallback step answers every target's current fallback key
    /// and marks it used only where asked; it never takes a one-time key.
    pub async fn r12_2_fallback_step_marks_only_where_asked<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let (a, b) = (alice(), bob());
        let fa = (kid("signed_curve25519:FA"), signed_fallback("fa", "s"));
        let fb = (kid("signed_curve25519:FB"), signed_fallback("fb", "s"));
        put(&store, &a, otks(SC, &["A1"]), vec![fa.clone()]).await;
        put(&store, &b, vec![], vec![fb.clone()]).await;
        let targets = [
            FallbackTarget {
                device: a.clone(),
                algorithm: alg(SC),
                mark_used: false,
            },
            FallbackTarget {
                device: dev("@ghost:example.org", "X"),
                algorithm: alg(SC),
                mark_used: true,
            },
            FallbackTarget {
                device: b.clone(),
                algorithm: alg(SC),
                mark_used: true,
            },
            FallbackTarget {
                device: b.clone(),
                algorithm: alg("other"),
                mark_used: true,
            },
        ];
        let out = store
            .claim_fallback_keys(&targets)
            .await
            .expect("fallback step");
        let got: Vec<_> = out
            .keys
            .iter()
            .map(|k| {
                (
                    k.device.clone(),
                    k.key_id.clone(),
                    k.key_json.clone(),
                    k.fallback,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (a.clone(), fa.0, fa.1, true),
                (b.clone(), fb.0.clone(), fb.1.clone(), true)
            ],
            "targets without a fallback key are left out"
        );
        assert_eq!(unused(&store, &a).await, [SC], "not marked where not asked");
        assert!(unused(&store, &b).await.is_empty(), "marked where asked");
        assert!(out.changes.contains(&b) && !out.changes.contains(&a));
        assert_eq!(count(&store, &a, SC).await, 1, "one-time keys untouched");
        // R4.4 holds for it: the used key is answered again.
        let again = store
            .claim_fallback_keys(&targets[2..3])
            .await
            .expect("again");
        assert_eq!(ids(&again.keys), [fb.0.to_string()]);
        assert!(again.changes.is_empty(), "already used: no change");
    }

    /// R12.3: the two steps are separate: an upload between them is seen by
    /// the second one.
    pub async fn r12_3_upload_between_steps_is_seen<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        let a = alice();
        let miss = store
            .claim_one_time_keys(&[ClaimTarget::one(a.clone(), alg(SC))])
            .await
            .expect("step 1");
        assert_eq!(miss.misses.len(), 1);
        put(
            &store,
            &a,
            vec![],
            vec![(kid("signed_curve25519:NEW"), signed_fallback("n", "s"))],
        )
        .await;
        let step2: Vec<FallbackTarget> = miss
            .misses
            .iter()
            .map(|t| FallbackTarget {
                device: t.device.clone(),
                algorithm: t.algorithm.clone(),
                mark_used: true,
            })
            .collect();
        let out = store.claim_fallback_keys(&step2).await.expect("step 2");
        assert_eq!(ids(&out.keys), ["signed_curve25519:NEW"]);
        assert!(unused(&store, &a).await.is_empty());
    }

    /// R12.3 with R4.2 and R4.3: split claims racing one-step claims and
    /// uploads on one device never hand out a key twice, and while keys are
    /// stored nobody comes away with the fallback key.
    pub async fn r12_3_split_and_one_step_claims_race<F: StoreFactory>(f: &F) {
        let store = Arc::new(fresh(f).await);
        let a = alice();
        let n = 64;
        put(
            &*store,
            &a,
            numbered_otks(SC, "K", n),
            vec![(kid("signed_curve25519:F"), signed_fallback("f", "s"))],
        )
        .await;
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let (store, a) = (store.clone(), a.clone());
                tokio::spawn(async move {
                    let target = [ClaimTarget::one(a.clone(), alg(SC))];
                    if i % 2 == 0 {
                        store
                            .claim_one_time_keys(&target)
                            .await
                            .expect("split")
                            .keys
                    } else {
                        store.claim(&target).await.expect("one-step").keys
                    }
                })
            })
            .collect();
        let mut seen = BTreeSet::new();
        for task in tasks {
            let keys = task.await.expect("task");
            assert_eq!(
                keys.len(),
                1,
                "every claim got a key while {n} were stored (R4.3)"
            );
            assert!(
                !keys[0].fallback,
                "no fallback while one-time keys are stored"
            );
            assert!(
                seen.insert(keys[0].key_id.to_string()),
                "{} issued twice",
                keys[0].key_id
            );
        }
        assert_eq!(seen.len(), n);
        assert_eq!(count(&*store, &a, SC).await, 0);
        assert_eq!(
            unused(&*store, &a).await,
            [SC],
            "the fallback key was never handed out"
        );
    }

    /// R12.4: without the flag, the fallback step runs for targets that got a
    /// key from neither the store nor the provider; the provider is asked once,
    /// with the misses, and its keys are passed through unchanged.
    pub async fn r12_4_provider_then_fallback<F: StoreFactory>(f: &F) {
        let api = KeysApi::new(fresh(f).await);
        let (a, b) = (alice(), bob());
        let c = dev("@carol:example.org", "CAROLDEV");
        put(
            api.store(),
            &a,
            otks(SC, &["A1"]),
            vec![(kid("signed_curve25519:FA"), signed_fallback("fa", "s"))],
        )
        .await;
        put(
            api.store(),
            &b,
            vec![],
            vec![(kid("signed_curve25519:FB"), signed_fallback("fb", "s"))],
        )
        .await;
        put(
            api.store(),
            &c,
            vec![],
            vec![(kid("signed_curve25519:FC"), signed_fallback("fc", "s"))],
        )
        .await;
        let odd = json!({"key": "as", "signatures": {"@bot:as": {"ed25519:X": "s"}}, "extra": [1, {"z": null}]});
        let provider = Provider::new(Mode::Keys(vec![
            provided(&b, "signed_curve25519:AS1", odd.clone()),
            provided(&a, "signed_curve25519:NOTASKED", wire_key("n")),
        ]));
        let options = ClaimOptions::default().provider(provider.clone());
        let answer = api
            .claim_with(&claim_body(&[(&a, SC), (&b, SC), (&c, SC)]), &options)
            .await
            .expect("claim");
        assert_eq!(answered(&answer, &a), ["signed_curve25519:A1"]);
        assert_eq!(
            answered(&answer, &b),
            ["signed_curve25519:AS1"],
            "the provider's key, not b's fallback"
        );
        assert_eq!(
            answer["one_time_keys"][b.user_id.as_str()][b.device_id.as_str()]["signed_curve25519:AS1"],
            odd,
            "unchanged"
        );
        assert_eq!(
            answered(&answer, &c),
            ["signed_curve25519:FC"],
            "c got the fallback"
        );
        assert_eq!(answer["failures"], json!({}));
        assert_eq!(provider.calls.load(Ordering::SeqCst), 1, "asked once");
        let asked: BTreeSet<_> = provider
            .asked
            .lock()
            .expect("lock")
            .iter()
            .map(|t| t.device.clone())
            .collect();
        assert_eq!(
            asked,
            [b.clone(), c.clone()].into_iter().collect(),
            "asked for the misses only"
        );
        assert_eq!(unused(api.store(), &a).await, [SC]);
        assert_eq!(
            unused(api.store(), &b).await,
            [SC],
            "b's fallback not used: the provider served b"
        );
        assert!(unused(api.store(), &c).await.is_empty());
    }

    /// R12.4: with `always_include_fallback_keys`, every target's fallback key
    /// comes too, marked used only where no one-time key was found.
    pub async fn r12_4_always_include_fallback_keys<F: StoreFactory>(f: &F) {
        let api = KeysApi::new(fresh(f).await);
        let (a, b) = (alice(), bob());
        put(
            api.store(),
            &a,
            otks(SC, &["A1"]),
            vec![(kid("signed_curve25519:FA"), signed_fallback("fa", "s"))],
        )
        .await;
        put(
            api.store(),
            &b,
            vec![],
            vec![(kid("signed_curve25519:FB"), signed_fallback("fb", "s"))],
        )
        .await;
        let options = ClaimOptions::default().always_include_fallback_keys(true);
        let answer = api
            .claim_with(&claim_body(&[(&a, SC), (&b, SC)]), &options)
            .await
            .expect("claim");
        assert_eq!(
            answered(&answer, &a),
            ["signed_curve25519:A1", "signed_curve25519:FA"]
        );
        assert_eq!(answered(&answer, &b), ["signed_curve25519:FB"]);
        assert_eq!(
            unused(api.store(), &a).await,
            [SC],
            "a got a one-time key: its fallback stays unused"
        );
        assert!(
            unused(api.store(), &b).await.is_empty(),
            "b got none: its fallback is used"
        );
        assert_eq!(count(api.store(), &a, SC).await, 0);
    }

    /// R12.4: a provider that fails or does not answer in time counts as having
    /// no keys; the claim still succeeds, with fallback keys.
    pub async fn r12_4_failing_or_slow_provider_is_no_keys<F: StoreFactory>(f: &F) {
        let api = KeysApi::new(fresh(f).await);
        let b = bob();
        for (i, mode) in [Mode::Fails, Mode::Hangs].into_iter().enumerate() {
            let fallback = (
                kid(&format!("signed_curve25519:F{i}")),
                signed_fallback(&format!("f{i}"), "s"),
            );
            put(api.store(), &b, vec![], vec![fallback.clone()]).await;
            let provider = Provider::new(mode);
            let options = ClaimOptions::default()
                .provider(provider.clone())
                .provider_timeout(Duration::from_millis(50));
            let answer = api
                .claim_with(&claim_body(&[(&b, SC)]), &options)
                .await
                .expect("claim succeeds");
            assert_eq!(answered(&answer, &b), [fallback.0.to_string()]);
            assert_eq!(provider.calls.load(Ordering::SeqCst), 1);
            assert!(unused(api.store(), &b).await.is_empty());
        }
    }

    /// R12.4: bad bodies are refused as `claim` refuses them, consuming nothing.
    pub async fn r12_4_bad_bodies_consume_nothing<F: StoreFactory>(f: &F) {
        let api = KeysApi::new(fresh(f).await);
        let a = alice();
        put(api.store(), &a, otks(SC, &["A1"]), vec![]).await;
        let options = ClaimOptions::default().always_include_fallback_keys(true);
        let bad: [(&[u8], u16, &str); 4] = [
            (b"not json", 400, "M_NOT_JSON"),
            (b"[]", 400, "M_BAD_JSON"),
            (
                br#"{"one_time_keys": {"@alice:example.org": {"ALICEDEV": 7}}}"#,
                400,
                "M_BAD_JSON",
            ),
            (
                br#"{"one_time_keys": {"nope": {"ALICEDEV": "signed_curve25519"}}}"#,
                400,
                "M_INVALID_PARAM",
            ),
        ];
        for (b, status, code) in bad {
            assert_api_err(
                api.claim_with(b, &options).await,
                status,
                code,
                &String::from_utf8_lossy(b),
            );
        }
        assert_eq!(count(api.store(), &a, SC).await, 1);
    }
}
