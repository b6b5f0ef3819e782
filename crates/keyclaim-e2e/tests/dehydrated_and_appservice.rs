//! Real Olm sessions with the keys of the operations around the claim:
//! a dehydrated device (MSC3814, contract section 14) whose keys arrive
//! through `replace_dehydrated_device` and which, unable to refill, stays
//! reachable through its fallback key; and an application service's device
//! (MSC3983, R12.4) whose one-time keys come from an `OtkProvider` rather
//! than from the store. Every key a claim answers is checked by the owner's
//! signature and by a session the owner's vodozemac account must open.
//!
//! Each scenario runs once per backend (`per_backend!` at the bottom).

// Scenario helpers are plain functions, not #[test]s: a panic is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    Api, claim_and_verify, claim_body, olm_round_trip, otk_count, per_backend,
    unused_fallback_types, upload, verified_keys,
};
use keyclaim::{BoxError, ClaimOptions, ClaimTarget, ClaimedKey, KeyId, KeyJson, OtkProvider};
use keyclaim_e2e::TestBackend;
use keyclaim_e2e::client::{OlmDevice, SIGNED_CURVE25519, VerifiedKey};
use serde_json::{Value, json};

const ALICE: &str = "@alice:example.org";

/// How long a claim may take at most before the test calls it stuck (a
/// deadline, not a timing assertion).
const DEADLINE: Duration = Duration::from_secs(30);

/// A `PUT /dehydrated_device` body (MSC3814) for `device`: its device keys,
/// opaque device data, a fresh fallback key and `otks` fresh one-time keys.
/// Returns the body, the one-time key IDs in the order keyclaim issues them
/// (key-ID byte order within one upload, R3.5) and the fallback key ID.
fn dehydration_body(device: &mut OlmDevice, otks: usize) -> (Value, Vec<String>, String) {
    let (fallback_keys, fallback_id) = device.rotate_fallback_key();
    let (one_time_keys, mut ids) = device.generate_one_time_keys(otks);
    ids.sort();
    let body = json!({
        "device_id": device.device_id,
        "initial_device_display_name": "Dehydrated device",
        "device_data": {
            "algorithm": "org.matrix.msc3814.v2",
            "device_pickle": "b3BhcXVlIHBpY2tsZQ",
            "nonce": "bm9uY2U",
        },
        "device_keys": device.device_keys(),
        "one_time_keys": one_time_keys,
        "fallback_keys": fallback_keys,
    });
    (body, ids, fallback_id)
}

async fn replace(api: &Api, previous: Option<&str>, device: &OlmDevice, body: &Value) -> Value {
    let answer = api
        .replace_dehydrated_device(
            &device.user_id,
            previous,
            &device.device_id,
            body.to_string().as_bytes(),
        )
        .await
        .expect("dehydrated device accepted");
    assert_eq!(answer["device_id"], json!(device.device_id));
    answer
}

async fn fallback_read(api: &Api, device: &OlmDevice) -> Value {
    api.fallback_keys(&device.user_id, &device.device_id)
        .await
        .expect("fallback keys read")
}

/// The keys of a fallback read (R15.1), verified as a client verifies
/// claimed keys.
fn verified_fallback_read(read: &Value, owner: &OlmDevice) -> Vec<VerifiedKey> {
    let as_claim = json!({
        "one_time_keys": { &owner.user_id: { &owner.device_id: read["fallback_keys"] } },
        "failures": {},
    });
    verified_keys(&as_claim, owner)
}

/// As `claim_and_verify`, through the claim with options: every key the
/// answer holds for `owner` (with `always_include_fallback_keys`, a one-time
/// key and the fallback key).
async fn claim_with_and_verify(
    api: &Api,
    owner: &OlmDevice,
    options: &ClaimOptions,
) -> Vec<VerifiedKey> {
    let answer = api
        .claim_with(&claim_body(&[owner]), options)
        .await
        .expect("claim accepted");
    verified_keys(&answer, owner)
}

fn always_include() -> ClaimOptions {
    ClaimOptions::default().always_include_fallback_keys(true)
}

/// Alice's first dehydrated device gets keys, one of them opens a session;
/// then a new dehydrated device (new device ID) replaces it in one step
/// (R14.1). The old device's remaining keys are never handed out again. The
/// new device is claimed from, alternating the plain claim and the claim
/// with `always_include_fallback_keys` (R12.4), until its one-time keys are
/// used up; from then on its fallback key keeps it reachable (R4.4). Every
/// key opens a session on the new device's account.
async fn dehydrated_device_replaced_then_reached_through_its_fallback_key(api: Api) {
    let api = api.with_dehydrated_fallback_required(true);
    let mut old = OlmDevice::new(ALICE, "DEHYDRATEDOLD");
    let (old_body, _, _) = dehydration_body(&mut old, 3);
    let answer = replace(&api, None, &old, &old_body).await;
    assert_eq!(answer["one_time_key_counts"][SIGNED_CURVE25519], json!(3));
    let key = claim_and_verify(&api, &old).await.expect("an OTK of old");
    assert!(!key.fallback);
    olm_round_trip(&mut old, &key, "to the old dehydrated device");
    assert_eq!(otk_count(&api, &old).await, 2);

    let mut new = OlmDevice::new(ALICE, "DEHYDRATEDNEW");
    // R14.2: without a fallback key the new device is refused and the old
    // one stays as it was.
    let (mut bare, _, _) = dehydration_body(&mut new, 1);
    bare.as_object_mut().unwrap().remove("fallback_keys");
    let refused = api
        .replace_dehydrated_device(
            ALICE,
            Some(&old.device_id),
            &new.device_id,
            bare.to_string().as_bytes(),
        )
        .await
        .expect_err("no fallback key: refused (R14.2)");
    assert_eq!(
        (refused.status(), refused.errcode()),
        (400, "M_INVALID_PARAM")
    );
    assert_eq!(otk_count(&api, &old).await, 2);
    assert_eq!(otk_count(&api, &new).await, 0);

    let (body, otk_ids, fallback_id) = dehydration_body(&mut new, 4);
    let answer = replace(&api, Some(&old.device_id), &new, &body).await;
    assert_eq!(answer["one_time_key_counts"][SIGNED_CURVE25519], json!(4));

    // Nothing of the old device is left to hand out (R14.1, R7.1).
    assert_eq!(otk_count(&api, &old).await, 0);
    assert_eq!(unused_fallback_types(&api, &old).await, json!([]));
    assert_eq!(
        fallback_read(&api, &old).await,
        json!({ "fallback_keys": {}, "used": [] })
    );
    assert!(claim_and_verify(&api, &old).await.is_none());
    assert!(
        claim_with_and_verify(&api, &old, &always_include())
            .await
            .is_empty()
    );

    // The new device's fallback key, read without being marked used (R15.1).
    let read = fallback_read(&api, &new).await;
    assert_eq!(read["used"], json!([]));
    let stored = verified_fallback_read(&read, &new);
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].key_id, fallback_id);
    assert!(stored[0].fallback);

    // One claim naming both devices: the old one is left out (R4.6), the new
    // one answers its oldest one-time key.
    let answer = api.claim(&claim_body(&[&old, &new])).await.unwrap();
    assert!(answer["one_time_keys"][ALICE].get(&old.device_id).is_none());
    let keys = verified_keys(&answer, &new);
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].key_id, otk_ids[0]);
    assert!(!keys[0].fallback);
    olm_round_trip(&mut new, &keys[0], "first key of the new device");

    let mut fallback_beside_otk = 0;
    for (i, want) in otk_ids.iter().enumerate().skip(1) {
        let text = format!("one-time key {i}");
        if i % 2 == 0 {
            let key = claim_and_verify(&api, &new).await.expect("an OTK is left");
            assert_eq!(&key.key_id, want);
            assert!(!key.fallback);
            olm_round_trip(&mut new, &key, &text);
        } else {
            let keys = claim_with_and_verify(&api, &new, &always_include()).await;
            let (otks, fallbacks): (Vec<VerifiedKey>, Vec<VerifiedKey>) =
                keys.into_iter().partition(|k| !k.fallback);
            assert_eq!(otks.len(), 1, "one OTK: {otks:?}");
            assert_eq!(&otks[0].key_id, want);
            olm_round_trip(&mut new, &otks[0], &text);
            // vodozemac numbers OTKs and fallback keys from the same start:
            // when the OTK shares the fallback key's ID, the OTK is answered
            // under it; otherwise the fallback key comes beside it.
            if *want == fallback_id {
                assert!(fallbacks.is_empty(), "{fallbacks:?}");
            } else {
                assert_eq!(fallbacks.len(), 1, "the fallback key beside the OTK");
                assert_eq!(fallbacks[0].key_id, fallback_id);
                olm_round_trip(&mut new, &fallbacks[0], "fallback beside an OTK");
                fallback_beside_otk += 1;
            }
        }
        assert_eq!(otk_count(&api, &new).await, (3 - i) as u64);
        // Beside a one-time key the fallback key is not marked used (R12.4).
        assert_eq!(
            unused_fallback_types(&api, &new).await,
            json!([SIGNED_CURVE25519])
        );
    }
    assert!(fallback_beside_otk > 0, "no round returned both keys");

    // The one-time keys are used up: the fallback key, marked used now that
    // it is the only key, and served again and again (R4.4).
    let keys = claim_with_and_verify(&api, &new, &always_include()).await;
    assert_eq!(keys.len(), 1, "the fallback key once: {keys:?}");
    assert_eq!(keys[0].key_id, fallback_id);
    assert!(keys[0].fallback);
    olm_round_trip(&mut new, &keys[0], "fallback, flag on");
    assert_eq!(unused_fallback_types(&api, &new).await, json!([]));
    for round in 0..2 {
        let key = claim_and_verify(&api, &new)
            .await
            .expect("the fallback key");
        assert_eq!(key.key_id, fallback_id);
        assert!(key.fallback);
        olm_round_trip(&mut new, &key, &format!("fallback round {round}"));
    }
    assert_eq!(otk_count(&api, &new).await, 0);
    let read = fallback_read(&api, &new).await;
    assert_eq!(read["used"], json!([SIGNED_CURVE25519]));
    assert_eq!(
        read["fallback_keys"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        [&fallback_id]
    );
}

/// A dehydrated device re-created under its own device ID (`previous` equal
/// to the new device, R14.1) by a fresh account. vodozemac numbers both
/// accounts' keys alike, so the old and the new keys share key IDs: a plain
/// upload of the new keys conflicts (R3.2), the replace starts from an
/// empty device, and every key served afterwards is the new account's (a
/// left-over old key would fail the new account's signature check).
async fn dehydrated_device_replaced_under_its_own_id(api: Api) {
    const DEVICE: &str = "DEHYDRATED";
    let mut first = OlmDevice::new(ALICE, DEVICE);
    let (first_body, first_ids, _) = dehydration_body(&mut first, 3);
    replace(&api, Some(DEVICE), &first, &first_body).await;
    let key = claim_and_verify(&api, &first).await.expect("an OTK");
    assert_eq!(key.key_id, first_ids[0]);
    olm_round_trip(&mut first, &key, "to the first incarnation");

    let mut second = OlmDevice::new(ALICE, DEVICE);
    let (second_body, second_ids, second_fallback) = dehydration_body(&mut second, 3);
    assert_eq!(second_ids, first_ids, "the accounts share key IDs");
    let conflict = api
        .upload(ALICE, DEVICE, second_body.to_string().as_bytes())
        .await
        .expect_err("same key IDs, other keys: a conflict (R3.2)");
    assert_eq!(
        (conflict.status(), conflict.errcode()),
        (400, "M_INVALID_PARAM")
    );
    assert_eq!(otk_count(&api, &first).await, 2);

    let answer = replace(&api, Some(DEVICE), &second, &second_body).await;
    assert_eq!(
        answer["one_time_key_counts"][SIGNED_CURVE25519],
        json!(3),
        "the first account's keys are gone: no conflict, no left-over"
    );
    let read = fallback_read(&api, &second).await;
    assert_eq!(read["used"], json!([]));
    let stored = verified_fallback_read(&read, &second);
    assert_eq!(stored.len(), 1, "the second account's fallback key");
    assert_eq!(stored[0].key_id, second_fallback);

    for (i, want) in second_ids.iter().enumerate() {
        let key = claim_and_verify(&api, &second).await.expect("an OTK");
        assert_eq!(&key.key_id, want);
        assert!(!key.fallback);
        olm_round_trip(&mut second, &key, &format!("second incarnation {i}"));
    }
    let key = claim_and_verify(&api, &second)
        .await
        .expect("the fallback key");
    assert_eq!(
        (key.key_id.as_str(), key.fallback),
        (second_fallback.as_str(), true)
    );
    olm_round_trip(&mut second, &key, "second incarnation, fallback");
    assert_eq!(otk_count(&api, &second).await, 0);
}

/// One claim, as [`OtkProvider::claim_one_time_keys`] saw it: (user, device,
/// algorithm, count) per target.
type Asked = Vec<(String, String, String, u32)>;

fn asked(targets: &[ClaimTarget]) -> Asked {
    targets
        .iter()
        .map(|t| {
            (
                t.device.user_id.as_str().to_owned(),
                t.device.device_id.as_str().to_owned(),
                t.algorithm.as_str().to_owned(),
                t.count,
            )
        })
        .collect()
}

fn one_target(device: &OlmDevice) -> Asked {
    vec![(
        device.user_id.clone(),
        device.device_id.clone(),
        SIGNED_CURVE25519.to_owned(),
        1,
    )]
}

/// An application service answering claims for the device it manages
/// (MSC3983): it signs fresh one-time keys of the device's vodozemac account
/// on demand. The device never uploads anything to the store.
#[derive(Debug)]
struct Appservice {
    device: Arc<Mutex<OlmDevice>>,
    /// The targets of each call.
    asked: Mutex<Vec<Asked>>,
    /// The key IDs it handed out, in order.
    handed_out: Mutex<Vec<String>>,
}

#[keyclaim::async_trait]
impl OtkProvider for Appservice {
    async fn claim_one_time_keys(
        &self,
        targets: &[ClaimTarget],
    ) -> Result<Vec<ClaimedKey>, BoxError> {
        self.asked.lock().unwrap().push(asked(targets));
        let mut device = self.device.lock().unwrap();
        let mut keys = Vec::new();
        for target in targets {
            if target.device.user_id.as_str() != device.user_id
                || target.device.device_id.as_str() != device.device_id
                || target.algorithm.as_str() != SIGNED_CURVE25519
            {
                continue; // not a device of this appservice
            }
            let (signed, ids) = device.generate_one_time_keys(target.count as usize);
            for id in ids {
                self.handed_out.lock().unwrap().push(id.clone());
                keys.push(ClaimedKey {
                    device: target.device.clone(),
                    key_json: KeyJson::from_value(&signed[&id])?,
                    key_id: KeyId::parse(id)?,
                    fallback: false,
                });
            }
        }
        Ok(keys)
    }
}

const BRIDGE_USER: &str = "@_bridge_dana:example.org";
const BRIDGE_DEVICE: &str = "BRIDGEDEV";

/// A claim naming a local device and a bridged (appservice-managed) device:
/// the local device's key comes from the store, the provider is asked once,
/// for the misses only, and its key for the bridged device opens a session on
/// the appservice's account (R12.4). The store holds nothing for the bridged
/// device, before or after.
async fn appservice_provider_keys_open_sessions(api: Api) {
    let bridged = Arc::new(Mutex::new(OlmDevice::new(BRIDGE_USER, BRIDGE_DEVICE)));
    let provider = Arc::new(Appservice {
        device: Arc::clone(&bridged),
        asked: Mutex::new(Vec::new()),
        handed_out: Mutex::new(Vec::new()),
    });
    let options = ClaimOptions::default().provider(provider.clone());
    let mut carol = OlmDevice::new("@carol:example.org", "CAROLDEV");
    let (otks, carol_ids) = carol.generate_one_time_keys(1);
    upload(&api, &carol, &json!({ "one_time_keys": otks })).await;
    let bridge_target = one_target(&bridged.lock().unwrap());

    let mut earlier: Vec<VerifiedKey> = Vec::new();
    for round in 0..2 {
        let body = claim_body(&[&carol, &bridged.lock().unwrap()]);
        let answer = api.claim_with(&body, &options).await.expect("claim");

        let mut asked = provider.asked.lock().unwrap().clone();
        assert_eq!(asked.len(), round + 1, "asked once per claim");
        let mut asked = asked.pop().unwrap();
        asked.sort();
        if round == 0 {
            assert_eq!(asked, bridge_target, "asked for the miss only");
        } else {
            // Carol has nothing left: a miss too, for which the provider
            // has nothing; she is left out (R4.6).
            let mut want = one_target(&carol);
            want.extend(bridge_target.clone());
            want.sort();
            assert_eq!(asked, want);
        }

        let carols = verified_keys(&answer, &carol);
        if round == 0 {
            assert_eq!(carols.len(), 1);
            assert_eq!(carols[0].key_id, carol_ids[0]);
            olm_round_trip(&mut carol, &carols[0], "to Carol");
        } else {
            assert!(carols.is_empty(), "{carols:?}");
        }

        {
            let mut bridged = bridged.lock().unwrap();
            let keys = verified_keys(&answer, &bridged);
            assert_eq!(keys.len(), 1, "round {round}: the provider's key: {keys:?}");
            let key = keys.into_iter().next().unwrap();
            assert!(!key.fallback);
            assert_eq!(
                Some(&key.key_id),
                provider.handed_out.lock().unwrap().last(),
                "passed through unchanged, under the appservice's key ID"
            );
            assert!(
                earlier.iter().all(|k| k.key != key.key),
                "a fresh key each claim"
            );
            olm_round_trip(&mut bridged, &key, &format!("to the bridge, round {round}"));
            earlier.push(key);
        }

        let sync = api.sync(BRIDGE_USER, BRIDGE_DEVICE).await.unwrap();
        assert_eq!(
            sync["device_one_time_keys_count"][SIGNED_CURVE25519],
            json!(0),
            "nothing stored for the bridged device"
        );
        assert_eq!(sync["device_unused_fallback_key_types"], json!([]));
    }
    assert_eq!(provider.handed_out.lock().unwrap().len(), 2);
    assert_eq!(otk_count(&api, &carol).await, 0);
}

/// A provider that fails, or never answers.
#[derive(Debug)]
struct Broken {
    hang: bool,
    asked: Mutex<Vec<Asked>>,
}

#[keyclaim::async_trait]
impl OtkProvider for Broken {
    async fn claim_one_time_keys(
        &self,
        targets: &[ClaimTarget],
    ) -> Result<Vec<ClaimedKey>, BoxError> {
        self.asked.lock().unwrap().push(asked(targets));
        if self.hang {
            std::future::pending::<()>().await;
        }
        Err("appservice unreachable".into())
    }
}

/// A provider that fails, or hangs past `provider_timeout`, counts as having
/// no keys (R12.4): the claim still succeeds, local one-time keys are served,
/// and a device without one is reached through its fallback key.
async fn failing_or_hanging_provider_falls_back(api: Api) {
    // Dana: only a fallback key. Erin: two one-time keys and a fallback key.
    let mut dana = OlmDevice::new("@dana:example.org", "DANADEV");
    let (fallback, dana_fallback) = dana.rotate_fallback_key();
    upload(&api, &dana, &json!({ "fallback_keys": fallback })).await;
    let mut erin = OlmDevice::new("@erin:example.org", "ERINDEV");
    let (erin_fallback_keys, erin_fallback) = erin.rotate_fallback_key();
    let (otks, mut erin_ids) = erin.generate_one_time_keys(2);
    erin_ids.sort();
    let body = json!({ "one_time_keys": otks, "fallback_keys": erin_fallback_keys });
    upload(&api, &erin, &body).await;

    for (round, hang) in [false, true].into_iter().enumerate() {
        let provider = Arc::new(Broken {
            hang,
            asked: Mutex::new(Vec::new()),
        });
        // The hanging round also asks for fallback keys beside one-time keys.
        let options = ClaimOptions::default()
            .provider(provider.clone())
            .provider_timeout(Duration::from_millis(100))
            .always_include_fallback_keys(hang);
        let answer = tokio::time::timeout(
            DEADLINE,
            api.claim_with(&claim_body(&[&dana, &erin]), &options),
        )
        .await
        .expect("the claim goes on after the provider's timeout")
        .expect("the claim succeeds without the provider");
        assert_eq!(
            provider.asked.lock().unwrap().as_slice(),
            [one_target(&dana)],
            "round {round}: the provider was asked, for the miss only"
        );

        let keys = verified_keys(&answer, &dana);
        assert_eq!(keys.len(), 1, "round {round}: {keys:?}");
        assert_eq!(
            (keys[0].key_id.as_str(), keys[0].fallback),
            (dana_fallback.as_str(), true)
        );
        olm_round_trip(&mut dana, &keys[0], &format!("to Dana, round {round}"));
        assert_eq!(unused_fallback_types(&api, &dana).await, json!([]));

        let keys = verified_keys(&answer, &erin);
        let (otks, fallbacks): (Vec<VerifiedKey>, Vec<VerifiedKey>) =
            keys.into_iter().partition(|k| !k.fallback);
        assert_eq!(otks.len(), 1);
        assert_eq!(otks[0].key_id, erin_ids[round]);
        olm_round_trip(&mut erin, &otks[0], &format!("to Erin, round {round}"));
        if hang {
            // vodozemac gave Erin's first OTK the fallback key's ID; the
            // second one differs, so the fallback key comes beside it.
            assert_ne!(erin_ids[round], erin_fallback);
            assert_eq!(fallbacks.len(), 1);
            assert_eq!(fallbacks[0].key_id, erin_fallback);
            olm_round_trip(&mut erin, &fallbacks[0], "to Erin's fallback key");
        } else {
            assert!(fallbacks.is_empty(), "{fallbacks:?}");
        }
        assert_eq!(otk_count(&api, &erin).await, 1 - round as u64);
        assert_eq!(
            unused_fallback_types(&api, &erin).await,
            json!([SIGNED_CURVE25519]),
            "Erin got an OTK: her fallback key stays unused"
        );
    }
}

per_backend! {
    cases {
        dehydrated_device_replaced_then_reached_through_its_fallback_key,
        dehydrated_device_replaced_under_its_own_id,
        appservice_provider_keys_open_sessions,
        failing_or_hanging_provider_falls_back,
    }
    memory => Some(TestBackend::memory());
    sqlite => Some(TestBackend::sqlite().await.unwrap());
    redb => Some(TestBackend::redb().await.unwrap());
    postgres => TestBackend::postgres().await.unwrap();
}
