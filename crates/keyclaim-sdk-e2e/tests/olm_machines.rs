//! Two (or more) matrix-sdk-crypto `OlmMachine`s whose key requests keyclaim
//! serves. Each scenario runs per backend and per transport (the JSON facade
//! with ruma's wire bytes, and the ruma facade).

// Scenario helpers are plain functions, not #[test]s: a panic is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use keyclaim_e2e::TestBackend;
use keyclaim_sdk_e2e::{Client, Homeserver, Store, Transport};
use ruma::{OwnedRoomId, UserId, device_id, room_id, user_id};
use serde_json::{Value, json};

const SC: &str = "signed_curve25519";

fn room() -> OwnedRoomId {
    room_id!("!room:example.org").to_owned()
}

fn alice_id() -> &'static UserId {
    user_id!("@alice:example.org")
}

fn bob_id() -> &'static UserId {
    user_id!("@bob:example.org")
}

/// keyclaim's view of a device: (signed_curve25519 count, unused fallback types).
async fn keyclaim_state(hs: &Homeserver, user: &UserId, device: &str) -> (u64, Value) {
    let sync = hs.keys().sync(user.as_str(), device).await.unwrap();
    (
        sync["device_one_time_keys_count"][SC].as_u64().unwrap(),
        sync["device_unused_fallback_key_types"].clone(),
    )
}

/// A device as a client brings it up: first upload, first sync (which
/// tells it that the server supports fallback keys), second upload.
async fn online(hs: &Arc<Homeserver>, user: &UserId, device: &str) -> Client {
    let client = Client::new(hs, user, device.into()).await;
    client.send_outgoing_requests().await;
    client.sync().await;
    client.send_outgoing_requests().await;
    client
}

/// The machine's first upload has its device keys and 50 one-time keys but
/// no fallback key. Only after a sync that carries
/// `device_unused_fallback_key_types` (which keyclaim always sends, `[]`
/// included) does it create and upload a fallback key; a server that leaves
/// the field out never gets one.
async fn machine_uploads_fallback_key_because_keyclaim_advertises_support(
    store: Store,
    transport: Transport,
) {
    let hs = Homeserver::new(store, transport);
    let alice = Client::new(&hs, alice_id(), device_id!("ALICEDEV")).await;
    let first = alice.send_outgoing_requests().await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert!(first[0].device_keys);
    assert_eq!(first[0].one_time_keys.len(), 50);
    assert!(first[0].fallback_keys.is_empty());
    assert_eq!(
        keyclaim_state(&hs, alice_id(), "ALICEDEV").await,
        (50, json!([]))
    );

    // Control: the same machine behind a server without the field.
    let carol_id = user_id!("@carol:example.org");
    let carol = Client::new(&hs, carol_id, device_id!("CAROLDEV")).await;
    carol.send_outgoing_requests().await;
    carol.sync_with(false).await;
    assert!(
        carol.send_outgoing_requests().await.is_empty(),
        "no fallback key without the server's sign of support"
    );

    alice.sync().await;
    let second = alice.send_outgoing_requests().await;
    assert_eq!(second.len(), 1, "{second:?}");
    assert!(!second[0].device_keys);
    assert!(second[0].one_time_keys.is_empty());
    assert_eq!(second[0].fallback_keys.len(), 1);
    let (fallback_id, fallback_json) = second[0].fallback_keys.iter().next().unwrap();
    assert!(fallback_id.starts_with("signed_curve25519:"));
    assert_eq!(fallback_json["fallback"], json!(true));
    assert_eq!(
        keyclaim_state(&hs, alice_id(), "ALICEDEV").await,
        (50, json!([SC]))
    );

    // Steady state: nothing more to upload.
    alice.sync().await;
    assert!(alice.send_outgoing_requests().await.is_empty());
}

/// Bob's machine claims one of Alice's one-time keys from keyclaim, verifies
/// it, opens an Olm session and sends the room key over it; Alice's machine
/// decrypts the to-device message and then Bob's room message. Alice's
/// machine sees the lower count in its next sync and uploads a replacement.
async fn session_over_a_one_time_key(store: Store, transport: Transport) {
    let hs = Homeserver::new(store, transport);
    let alice = online(&hs, alice_id(), "ALICEDEV").await;
    let bob = online(&hs, bob_id(), "BOBDEV").await;
    let alice_otks = hs.uploads()[0].one_time_keys.clone();

    alice.track(&[bob_id()]).await;
    bob.track(&[alice_id()]).await;
    let claim = bob
        .claim_missing_sessions(&[alice_id()])
        .await
        .expect("Bob claims a key of Alice's new device");
    assert_eq!(claim.keys.len(), 1, "{claim:?}");
    let (user, device, key_id, json) = &claim.keys[0];
    assert_eq!(
        (user.as_str(), device.as_str()),
        (alice_id().as_str(), "ALICEDEV")
    );
    assert!(alice_otks.contains(key_id), "an OTK of the first upload");
    assert!(
        json.get("fallback").is_none(),
        "an OTK, not the fallback key"
    );
    assert_eq!(keyclaim_state(&hs, alice_id(), "ALICEDEV").await.0, 49);
    assert!(
        bob.claim_missing_sessions(&[alice_id()]).await.is_none(),
        "the session is established: nothing more to claim"
    );

    assert!(bob.share_room_key(&room(), &[alice_id()]).await >= 1);
    let received = alice.sync().await;
    assert_eq!(received.undecryptable(), 0, "{:?}", received.to_device);
    assert_eq!(received.decrypted_types(), vec!["m.room_key".to_owned()]);
    assert_eq!(received.room_keys.len(), 1);
    assert_eq!(received.room_keys[0].room_id, room());
    let event = bob.encrypt_text(&room(), "hello Alice").await;
    assert_eq!(alice.decrypt_text(&room(), &event).await, "hello Alice");

    // The sync told Alice's machine 49 keys are left: it tops up to 50.
    let top_up = alice.send_outgoing_requests().await;
    assert_eq!(top_up.len(), 1, "{top_up:?}");
    assert_eq!(top_up[0].one_time_keys.len(), 1);
    assert!(top_up[0].fallback_keys.is_empty());
    assert_eq!(keyclaim_state(&hs, alice_id(), "ALICEDEV").await.0, 50);
}

/// Alice is offline while all 50 of her one-time keys are claimed. Three of
/// Bob's devices then each get her fallback key (flagged `fallback: true`
/// under her signature), open sessions and send room keys; Alice's machine
/// decrypts all three. Back online, it uploads 50 new one-time keys, and the
/// next claimer gets a one-time key again.
async fn fallback_path_after_one_time_keys_run_out(store: Store, transport: Transport) {
    let hs = Homeserver::new(store, transport);
    let alice = online(&hs, alice_id(), "ALICEDEV").await;
    let fallback_id = hs.uploads()[1]
        .fallback_keys
        .keys()
        .next()
        .expect("fallback key uploaded")
        .clone();

    let drain = json!({ "one_time_keys": { alice_id(): { "ALICEDEV": SC } } }).to_string();
    for _ in 0..50 {
        let answer = hs.keys().claim(drain.as_bytes()).await.unwrap();
        let keys = &answer["one_time_keys"][alice_id().as_str()]["ALICEDEV"];
        let key = keys.as_object().unwrap().values().next().unwrap();
        assert!(key.get("fallback").is_none(), "still one-time keys");
    }
    assert_eq!(
        keyclaim_state(&hs, alice_id(), "ALICEDEV").await,
        (0, json!([SC]))
    );

    let mut bobs = Vec::new();
    for device in ["BOB1", "BOB2", "BOB3"] {
        let bob = online(&hs, bob_id(), device).await;
        bob.track(&[alice_id()]).await;
        let claim = bob
            .claim_missing_sessions(&[alice_id()])
            .await
            .expect("claim");
        assert_eq!(claim.keys.len(), 1, "{claim:?}");
        let (_, _, key_id, json) = &claim.keys[0];
        assert_eq!(key_id, &fallback_id, "{device} gets the fallback key");
        assert_eq!(json["fallback"], json!(true));
        assert_eq!(
            keyclaim_state(&hs, alice_id(), "ALICEDEV").await,
            (0, json!([])),
            "marked used"
        );
        assert!(bob.share_room_key(&room(), &[alice_id()]).await >= 1);
        bobs.push(bob);
    }

    alice.track(&[bob_id()]).await;
    let received = alice.sync().await;
    assert_eq!(received.undecryptable(), 0, "{:?}", received.to_device);
    assert_eq!(received.decrypted_types().len(), 3);
    assert_eq!(received.room_keys.len(), 3, "one room key per Bob device");
    for bob in &bobs {
        let text = format!("from {}", bob.machine.device_id());
        let event = bob.encrypt_text(&room(), &text).await;
        assert_eq!(alice.decrypt_text(&room(), &event).await, text);
    }

    // Back online: the sync said 0 keys left, so the machine uploads 50. It
    // does not rotate the used fallback key (0.18 rotates by age, a week).
    let refill = alice.send_outgoing_requests().await;
    assert_eq!(refill.len(), 1, "{refill:?}");
    assert_eq!(refill[0].one_time_keys.len(), 50);
    assert!(refill[0].fallback_keys.is_empty());
    assert_eq!(
        keyclaim_state(&hs, alice_id(), "ALICEDEV").await,
        (50, json!([]))
    );

    let bob4 = online(&hs, bob_id(), "BOB4").await;
    bob4.track(&[alice_id()]).await;
    let claim = bob4.claim_missing_sessions(&[alice_id()]).await.unwrap();
    let (_, _, key_id, json) = &claim.keys[0];
    assert!(refill[0].one_time_keys.contains(key_id), "a new OTK");
    assert!(json.get("fallback").is_none());
    assert!(bob4.share_room_key(&room(), &[alice_id()]).await >= 1);
    let received = alice.sync().await;
    assert_eq!(received.room_keys.len(), 1);
    assert_eq!(received.undecryptable(), 0);
}

/// The lost-response retry (R3.2, R3.4): Alice's machine uploads its keys
/// but never hears back; meanwhile Bob claims one of them and opens a
/// session. The machine then re-sends the very same upload. keyclaim accepts
/// it (200) without storing the claimed key again, so the next claimer gets
/// a different key and both sessions decrypt.
async fn retried_upload_after_a_lost_response(store: Store, transport: Transport) {
    let hs = Homeserver::new(store, transport);
    let alice = Client::new(&hs, alice_id(), device_id!("ALICEDEV")).await;
    let lost = alice
        .send_upload_and_lose_response()
        .await
        .expect("an upload");
    assert_eq!(lost.one_time_keys.len(), 50);

    let bob1 = online(&hs, bob_id(), "BOB1").await;
    bob1.track(&[alice_id()]).await;
    let first = bob1.claim_missing_sessions(&[alice_id()]).await.unwrap();
    let first_key = first.keys[0].2.clone();
    assert_eq!(keyclaim_state(&hs, alice_id(), "ALICEDEV").await.0, 49);

    // The machine re-sends the same upload; keyclaim answers 49 (the
    // claimed key is not stored again), so the machine tops up with one
    // new key. Had keyclaim stored the claimed key again, it would answer
    // 50 and a second claimer could get a key Alice has already used.
    let retry = alice.send_outgoing_requests().await;
    assert_eq!(retry.len(), 2, "{retry:?}");
    assert_eq!(
        retry[0].one_time_keys, lost.one_time_keys,
        "the same keys again"
    );
    assert!(retry[0].one_time_keys.contains(&first_key));
    assert_eq!(
        retry[1].one_time_keys.len(),
        1,
        "a top-up after the answer 49"
    );
    assert!(!lost.one_time_keys.contains(&retry[1].one_time_keys[0]));
    assert_eq!(keyclaim_state(&hs, alice_id(), "ALICEDEV").await.0, 50);

    let bob2 = online(&hs, bob_id(), "BOB2").await;
    bob2.track(&[alice_id()]).await;
    let second = bob2.claim_missing_sessions(&[alice_id()]).await.unwrap();
    assert_ne!(second.keys[0].2, first_key);

    bob1.share_room_key(&room(), &[alice_id()]).await;
    bob2.share_room_key(&room(), &[alice_id()]).await;
    alice.track(&[bob_id()]).await;
    let received = alice.sync().await;
    assert_eq!(received.undecryptable(), 0, "{:?}", received.to_device);
    assert_eq!(received.room_keys.len(), 2);
}

/// The client verifies the owner's signature over the whole claimed key
/// JSON, `fallback: true` and unknown fields included: a server that hands
/// back anything but the JSON as uploaded (R2.5) breaks session setup. Here
/// the homeserver drops `fallback` from Alice's fallback key on the way out;
/// Bob's machine refuses the key, so no session and no room key for Alice.
/// (JSON transport only: the tampering hook sits on the JSON path.)
async fn machine_refuses_altered_key_json(store: Store, transport: Transport) {
    let hs = Homeserver::new(store, transport);
    let alice = online(&hs, alice_id(), "ALICEDEV").await;
    let bob = online(&hs, bob_id(), "BOBDEV").await;
    let drain = json!({ "one_time_keys": { alice_id(): { "ALICEDEV": SC } } }).to_string();
    for _ in 0..50 {
        hs.keys().claim(drain.as_bytes()).await.unwrap();
    }
    hs.tamper_claims(|key| {
        if let Some(key) = key.as_object_mut() {
            key.remove("fallback");
        }
    });
    bob.track(&[alice_id()]).await;
    let claim = bob.claim_missing_sessions(&[alice_id()]).await.unwrap();
    assert_eq!(claim.keys.len(), 1);
    assert!(claim.keys[0].3.get("fallback").is_none(), "tampered");
    bob.share_room_key(&room(), &[alice_id()]).await;
    let received = alice.sync().await;
    assert!(
        received.room_keys.is_empty(),
        "no Olm session from a key whose signed JSON changed"
    );
}

/// One `#[tokio::test]` per scenario for one backend and one transport.
macro_rules! cases {
    ($make:expr, $transport:ident: $($case:ident),*) => {$(
        #[tokio::test]
        async fn $case() {
            let backend: Option<TestBackend> = $make;
            let Some(backend) = backend else {
                return; // skipped loudly by the backend's harness
            };
            crate::$case(backend.api.store().clone(), Transport::$transport).await;
            drop(backend);
        }
    )*};
}

macro_rules! per_backend {
    ($($backend:ident => $make:expr;)*) => {$(
        mod $backend {
            use super::*;

            mod json {
                use super::*;
                cases!($make, Json: machine_uploads_fallback_key_because_keyclaim_advertises_support,
                    session_over_a_one_time_key, fallback_path_after_one_time_keys_run_out,
                    machine_refuses_altered_key_json, retried_upload_after_a_lost_response);
            }

            mod ruma {
                use super::*;
                cases!($make, Ruma: machine_uploads_fallback_key_because_keyclaim_advertises_support,
                    session_over_a_one_time_key, fallback_path_after_one_time_keys_run_out,
                    retried_upload_after_a_lost_response);
            }
        }
    )*};
}

per_backend! {
    memory => Some(TestBackend::memory());
    sqlite => Some(TestBackend::sqlite().await.unwrap());
    redb => Some(TestBackend::redb().await.unwrap());
    postgres => TestBackend::postgres().await.unwrap();
}
