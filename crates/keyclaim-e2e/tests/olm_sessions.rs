//! Real Olm sessions through keyclaim: Alice's vodozemac account uploads signed
//! one-time keys and fallback keys through the wire facade, Bob claims them,
//! verifies Alice's signature over what keyclaim returned, opens an Olm
//! session and encrypts; Alice accepts the session and decrypts.
//!
//! Each scenario runs once per backend (`per_backend!` at the bottom).

// Scenario helpers are plain functions, not #[test]s: a panic is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    Api, claim_and_verify, olm_round_trip, otk_count, per_backend, unused_fallback_types, upload,
};
use keyclaim_e2e::TestBackend;
use keyclaim_e2e::client::{OlmDevice, SIGNED_CURVE25519, claimed_keys};
use serde_json::json;

const ALICE: &str = "@alice:example.org";
const ALICE_DEV: &str = "ALICEDEV";

/// Every one-time key is served once, oldest upload first and by key ID
/// within an upload (R3.5, R4.2), and every one of them yields a working
/// session. Then the fallback key is served, flagged `fallback: true` under
/// Alice's signature, again and again (R4.4), and each time it works.
async fn every_otk_in_fifo_order_then_fallback_repeatedly(api: Api) {
    let mut alice = OlmDevice::new(ALICE, ALICE_DEV);
    let mut expected = Vec::new();
    let (fallback_keys, fallback_id) = alice.rotate_fallback_key();
    for batch in 0..3 {
        let (otks, mut ids) = alice.generate_one_time_keys(7);
        let mut body = json!({ "one_time_keys": otks });
        if batch == 0 {
            body["fallback_keys"] = fallback_keys.clone();
        }
        let counts = upload(&api, &alice, &body).await;
        assert_eq!(
            counts["one_time_key_counts"][SIGNED_CURVE25519],
            json!(7 * (batch + 1))
        );
        // Keys of one upload are issued in key-ID byte order (R3.5). Base64
        // IDs do not sort like the counter behind them, so this is not
        // always generation order.
        ids.sort();
        expected.extend(ids);
    }
    // vodozemac numbers OTKs and fallback keys from the same start: a real
    // client uploads an OTK and a fallback key with one key ID (R3.3).
    assert!(
        expected.contains(&fallback_id),
        "{fallback_id} shared by an OTK"
    );
    assert_eq!(otk_count(&api, &alice).await, 21);
    assert_eq!(
        unused_fallback_types(&api, &alice).await,
        json!([SIGNED_CURVE25519])
    );

    for (i, want) in expected.iter().enumerate() {
        let key = claim_and_verify(&api, &alice)
            .await
            .expect("an OTK is left");
        assert_eq!(&key.key_id, want, "claim {i} in FIFO order");
        assert!(!key.fallback, "an OTK is not flagged fallback");
        olm_round_trip(&mut alice, &key, &format!("message {i}"));
        assert_eq!(otk_count(&api, &alice).await, (20 - i) as u64);
    }
    // The fallback key was never touched by OTK claims (R5.4).
    assert_eq!(
        unused_fallback_types(&api, &alice).await,
        json!([SIGNED_CURVE25519])
    );

    for round in 0..4 {
        let key = claim_and_verify(&api, &alice)
            .await
            .expect("the fallback key is served when OTKs run out");
        assert_eq!(key.key_id, fallback_id);
        assert!(key.fallback, "served with its signed `fallback: true`");
        olm_round_trip(&mut alice, &key, &format!("fallback round {round}"));
        assert_eq!(unused_fallback_types(&api, &alice).await, json!([]));
        assert_eq!(otk_count(&api, &alice).await, 0);
    }
}

/// A client whose fallback key was used rotates it (matrix-rust-sdk does so
/// when `device_unused_fallback_key_types` lacks the algorithm). The new key
/// is served from then on; sessions made with the previous one still open,
/// because vodozemac keeps two fallback keys. Re-uploading the new key
/// (a retry) does not make a used key unused again (R5.2).
async fn rotated_fallback_key_is_served(api: Api) {
    let mut alice = OlmDevice::new(ALICE, ALICE_DEV);
    let (first, first_id) = alice.rotate_fallback_key();
    // An upload with only a fallback key (R3.7).
    upload(&api, &alice, &json!({ "fallback_keys": first })).await;
    assert_eq!(otk_count(&api, &alice).await, 0);

    let old = claim_and_verify(&api, &alice).await.expect("fallback");
    assert_eq!(old.key_id, first_id);
    let bob = OlmDevice::new("@bob:example.org", "BOB1");
    let (_, early_message) = bob
        .open_session(alice.identity_key(), &old, "sent before the rotation")
        .unwrap();

    // Alice sees the key used in /sync and rotates, as clients do.
    assert_eq!(unused_fallback_types(&api, &alice).await, json!([]));
    let (second, second_id) = alice.rotate_fallback_key();
    assert_ne!(second_id, first_id);
    let second_body = json!({ "fallback_keys": second });
    upload(&api, &alice, &second_body).await;
    assert_eq!(
        unused_fallback_types(&api, &alice).await,
        json!([SIGNED_CURVE25519])
    );

    for round in 0..2 {
        let new = claim_and_verify(&api, &alice).await.expect("fallback");
        assert_eq!(
            new.key_id, second_id,
            "round {round}: the new key is served"
        );
        assert_ne!(new.key, old.key);
        assert!(new.fallback);
        olm_round_trip(&mut alice, &new, "after the rotation");
    }
    // The message made with the previous fallback key still opens.
    let (_, plaintext) = alice
        .accept_session(bob.identity_key(), &early_message)
        .expect("vodozemac keeps the previous fallback key");
    assert_eq!(plaintext, "sent before the rotation");

    // A retried upload of the current (used) key changes nothing (R5.2).
    upload(&api, &alice, &second_body).await;
    assert_eq!(unused_fallback_types(&api, &alice).await, json!([]));
    let again = claim_and_verify(&api, &alice).await.expect("fallback");
    assert_eq!(again.key_id, second_id);

    // Once Alice forgets the previous key, sessions on it fail: the reason
    // the server must never hand out a replaced fallback key.
    assert!(alice.account.forget_fallback_key());
    let late = bob
        .open_session(alice.identity_key(), &old, "too late")
        .unwrap()
        .1;
    assert!(alice.accept_session(bob.identity_key(), &late).is_err());
}

/// The double-issue hole (R3.4): Alice uploads keys, one is claimed, and
/// Alice re-sends the same upload because she lost the response. The claimed
/// key must not be stored again: Alice's account has already used it up, so
/// a second session on it could never be opened.
async fn reuploaded_claimed_key_is_not_served_again(api: Api) {
    let mut alice = OlmDevice::new(ALICE, ALICE_DEV);
    let (otks, _) = alice.generate_one_time_keys(3);
    let (fallback, fallback_id) = alice.rotate_fallback_key();
    let body = json!({ "one_time_keys": otks, "fallback_keys": fallback });
    upload(&api, &alice, &body).await;

    let first = claim_and_verify(&api, &alice).await.expect("an OTK");
    let bob1 = olm_round_trip(&mut alice, &first, "first");

    // The retry: byte for byte the same upload.
    let counts = upload(&api, &alice, &body).await;
    assert_eq!(
        counts["one_time_key_counts"][SIGNED_CURVE25519],
        json!(2),
        "the claimed key is not stored again"
    );

    let mut served = vec![first.key_id.clone()];
    while let Some(key) = claim_and_verify(&api, &alice).await {
        if key.fallback {
            assert_eq!(key.key_id, fallback_id);
            olm_round_trip(&mut alice, &key, "fallback");
            break;
        }
        assert!(!served.contains(&key.key_id), "{} served twice", key.key_id);
        served.push(key.key_id.clone());
        olm_round_trip(&mut alice, &key, &key.key_id);
    }
    assert_eq!(served.len(), 3, "each OTK served exactly once");

    // Had keyclaim served the first key again, this is what the claimer
    // would have met: Alice cannot open a second session on it.
    let (_, replay) = bob1
        .open_session(alice.identity_key(), &first, "again")
        .unwrap();
    assert!(
        alice.accept_session(bob1.identity_key(), &replay).is_err(),
        "a used one-time key cannot carry a second session"
    );
}

/// One claim naming many devices (R4.7) serves each of them its own key,
/// and each key opens a session with the right device.
async fn one_claim_for_many_devices(api: Api) {
    let mut devices: Vec<OlmDevice> = (0..4)
        .map(|i| OlmDevice::new(ALICE, &format!("DEV{i}")))
        .chain((0..3).map(|i| OlmDevice::new("@carol:example.net", &format!("C{i}"))))
        .collect();
    let mut targets = serde_json::Map::new();
    for (i, device) in devices.iter_mut().enumerate() {
        // Odd devices have only a fallback key left.
        let mut body = json!({ "fallback_keys": device.rotate_fallback_key().0 });
        if i % 2 == 0 {
            body["one_time_keys"] = device.generate_one_time_keys(2).0;
        }
        upload(&api, device, &body).await;
        targets
            .entry(device.user_id.clone())
            .or_insert_with(|| json!({}))[&device.device_id] = json!(SIGNED_CURVE25519);
    }
    // A device that does not exist is left out (R4.6).
    targets[ALICE]["NOSUCHDEV"] = json!(SIGNED_CURVE25519);
    let answer = api
        .claim(json!({ "one_time_keys": targets }).to_string().as_bytes())
        .await
        .unwrap();
    assert!(answer["one_time_keys"][ALICE].get("NOSUCHDEV").is_none());
    for (i, device) in devices.iter_mut().enumerate() {
        let keys = claimed_keys(&answer, &device.user_id, &device.device_id);
        assert_eq!(keys.len(), 1, "{}", device.device_id);
        let (key_id, json) = keys.into_iter().next().unwrap();
        let key = OlmDevice::verify_claimed_key(
            &device.user_id,
            &device.device_id,
            device.signing_key(),
            &key_id,
            &json,
        )
        .unwrap();
        assert_eq!(key.fallback, i % 2 == 1, "{}", device.device_id);
        let text = format!("to {}", device.device_id);
        olm_round_trip(device, &key, &text);
    }
}

/// The session is a real two-way Olm session: Alice answers on it and Bob
/// decrypts the answer.
async fn sessions_work_both_ways(api: Api) {
    let mut alice = OlmDevice::new(ALICE, ALICE_DEV);
    let (otks, _) = alice.generate_one_time_keys(1);
    upload(&api, &alice, &json!({ "one_time_keys": otks })).await;
    let key = claim_and_verify(&api, &alice).await.unwrap();
    let bob = OlmDevice::new("@bob:example.org", "BOBDEV");
    let (mut bob_session, message) = bob.open_session(alice.identity_key(), &key, "hi").unwrap();
    let (mut alice_session, text) = alice.accept_session(bob.identity_key(), &message).unwrap();
    assert_eq!(text, "hi");
    let answer = alice_session.encrypt("hello Bob").unwrap();
    assert_eq!(bob_session.decrypt(&answer).unwrap(), b"hello Bob");
    assert_eq!(bob_session.session_id(), alice_session.session_id());
}

per_backend! {
    cases {
        every_otk_in_fifo_order_then_fallback_repeatedly,
        rotated_fallback_key_is_served,
        reuploaded_claimed_key_is_not_served_again,
        one_claim_for_many_devices,
        sessions_work_both_ways,
    }
    memory => Some(TestBackend::memory());
    sqlite => Some(TestBackend::sqlite().await.unwrap());
    redb => Some(TestBackend::redb().await.unwrap());
    postgres => TestBackend::postgres().await.unwrap();
}
