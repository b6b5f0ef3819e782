//! The `ruma` feature: conversions to and from ruma-client-api's types, and
//! the ruma flavour of the facade giving the same answers as the JSON one.

// Scenario helpers are plain functions, not #[test]s: a panic is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use keyclaim::ruma::ruma_client_api::keys::{claim_keys, upload_keys};
use keyclaim::ruma::ruma_client_api::sync::sync_events;
use keyclaim::ruma::ruma_common::api::{IncomingRequest, OutgoingResponse};
use keyclaim::ruma::ruma_common::exports::http;
use keyclaim::ruma::ruma_common::{OneTimeKeyAlgorithm, device_id, user_id};
use keyclaim::ruma::{self as kr, SyncFields};
use keyclaim::{
    Algorithm, ClaimTarget, Device, KeyId, KeyJson, KeyStore, KeysApi, Limits, OtkCounts,
    SyncState, Upload,
};
use keyclaim_memory::MemoryStore;
use serde_json::{Value, json};

const ALICE: &str = "@alice:example.org";

fn api() -> KeysApi<Arc<dyn KeyStore>> {
    KeysApi::new(Arc::new(MemoryStore::new()))
}

fn alice() -> Device {
    Device::parse(ALICE, "ALICEDEV").unwrap()
}

/// A body as matrix-rust-sdk sends it: signed keys, a fallback key with
/// `fallback: true`, and `device_keys` (ignored by keyclaim).
fn upload_body() -> Value {
    let sig = json!({ ALICE: { "ed25519:ALICEDEV": "c2ln" } });
    json!({
        "device_keys": { "user_id": ALICE, "device_id": "ALICEDEV", "algorithms": [], "keys": {}, "signatures": {} },
        "one_time_keys": {
            "signed_curve25519:AAAAAAAAAAE": { "key": "b25l", "signatures": sig },
            "signed_curve25519:AAAAAAAAAAA": { "key": "emVybw", "signatures": sig, "x-extra": [1, "é"] },
            "other_alg:k1": "legacy-unsigned"
        },
        "fallback_keys": {
            "signed_curve25519:AAAAAAAAAAA": { "key": "ZmI", "fallback": true, "signatures": sig }
        }
    })
}

/// Parses a `POST` wire body as a homeserver built on ruma does.
fn incoming<R: IncomingRequest>(path: &str, body: &Value) -> R {
    incoming_with(http::Method::POST, path, body)
}

/// Parses a wire body as a homeserver built on ruma does, for any method.
fn incoming_with<R: IncomingRequest>(method: http::Method, path: &str, body: &Value) -> R {
    let request = http::Request::builder()
        .method(method)
        .uri(format!("https://hs.example.org{path}"))
        .body(body.to_string().into_bytes())
        .unwrap();
    R::try_from_http_request(request, &[] as &[&str]).unwrap()
}

/// The JSON body a ruma response serializes to.
fn outgoing_json(response: impl OutgoingResponse) -> Value {
    let response = response.try_into_http_response::<Vec<u8>>().unwrap();
    serde_json::from_slice(response.body()).unwrap()
}

#[test]
fn upload_request_keeps_key_json_as_sent() {
    let body = upload_body();
    let request: upload_keys::v3::Request = incoming("/_matrix/client/v3/keys/upload", &body);
    let upload = kr::upload_from_request(alice(), &request).unwrap();
    assert_eq!(upload.one_time_keys().len(), 3);
    for (id, json) in upload.one_time_keys() {
        assert_eq!(json.to_value(), body["one_time_keys"][id.as_str()], "{id}");
    }
    let (id, json) = &upload.fallback_keys()[&Algorithm::signed_curve25519()];
    assert_eq!(id.as_str(), "signed_curve25519:AAAAAAAAAAA");
    assert_eq!(
        json.to_value(),
        body["fallback_keys"]["signed_curve25519:AAAAAAAAAAA"]
    );

    // And back: the same keys in a ruma request.
    let again = kr::upload_from_request(alice(), &kr::upload_to_request(&upload).unwrap()).unwrap();
    assert_eq!(again, upload);
}

#[test]
fn upload_request_is_validated_like_the_wire() {
    let mut request = upload_keys::v3::Request::new();
    let bad_json =
        kr::ruma_common::serde::Raw::from_json_string(r#"{"key": 1}"#.to_owned()).unwrap();
    request
        .one_time_keys
        .insert("signed_curve25519:A".try_into().unwrap(), bad_json);
    let err = kr::upload_from_request(alice(), &request).unwrap_err();
    assert!(
        matches!(err, keyclaim::Error::InvalidKeyJson { .. }),
        "{err}"
    );

    // ruma accepts key names with a colon; keyclaim's key IDs have exactly one (R2.3).
    let mut request = upload_keys::v3::Request::new();
    let ok = kr::ruma_common::serde::Raw::from_json_string(r#""k""#.to_owned()).unwrap();
    request
        .one_time_keys
        .insert("alg:na:me".try_into().unwrap(), ok);
    let err = kr::upload_from_request(alice(), &request).unwrap_err();
    assert!(matches!(err, keyclaim::Error::InvalidKeyId { .. }), "{err}");
}

#[test]
fn counts_always_carry_signed_curve25519() {
    let empty = kr::counts_to_ruma(&OtkCounts::default());
    assert_eq!(empty.len(), 1);
    assert_eq!(
        empty[&OneTimeKeyAlgorithm::SignedCurve25519],
        js_int::uint!(0)
    );
    let counts: OtkCounts = [
        (Algorithm::parse("alg_a").unwrap(), 3),
        (Algorithm::parse("alg_zero").unwrap(), 0),
    ]
    .into_iter()
    .collect();
    let ruma = kr::counts_to_ruma(&counts);
    assert_eq!(ruma.len(), 2, "zero counts left out: {ruma:?}");
    assert_eq!(kr::counts_from_ruma(&ruma).unwrap().iter().count(), 1);
    assert_eq!(
        kr::counts_from_ruma(&ruma).unwrap().get_str("alg_a"),
        3,
        "round trip"
    );
}

#[test]
fn claim_request_to_targets_and_back() {
    let body = json!({
        "timeout": 10000,
        "one_time_keys": {
            ALICE: { "D1": "signed_curve25519", "D2": "alg" },
            "@bob:example.org": { "B1": "signed_curve25519" }
        }
    });
    let request: claim_keys::v3::Request = incoming("/_matrix/client/v3/keys/claim", &body);
    let targets = kr::claim_targets_from_request(&request).unwrap();
    assert_eq!(targets.len(), 3);
    assert!(targets.iter().all(|t| t.count == 1));
    let again = kr::claim_targets_from_request(&kr::claim_request(&targets).unwrap()).unwrap();
    assert_eq!(again, targets);

    // An algorithm keyclaim does not accept matches nothing (R4.6), as on the wire.
    let odd: claim_keys::v3::Request = incoming(
        "/_matrix/client/v3/keys/claim",
        &json!({ "one_time_keys": { ALICE: { "D1": "a:b" } } }),
    );
    assert!(kr::claim_targets_from_request(&odd).unwrap().is_empty());
}

#[test]
fn sync_fields_round_trip_and_fill_a_sync_response() {
    let state = SyncState {
        one_time_key_counts: [(Algorithm::signed_curve25519(), 7)].into_iter().collect(),
        unused_fallback_key_types: vec![Algorithm::signed_curve25519()],
    };
    let fields = SyncFields::from(&state);
    assert_eq!(
        fields.device_unused_fallback_key_types,
        Some(vec![OneTimeKeyAlgorithm::SignedCurve25519])
    );
    assert_eq!(fields.to_sync_state().unwrap(), state);

    let mut response = sync_events::v3::Response::new("s1".to_owned());
    assert_eq!(response.device_unused_fallback_key_types, None);
    fields.apply_to(&mut response);
    assert_eq!(SyncFields::from_response(&response), fields);
    let wire = outgoing_json(response);
    assert_eq!(
        wire["device_one_time_keys_count"],
        json!({ "signed_curve25519": 7 })
    );
    assert_eq!(
        wire["device_unused_fallback_key_types"],
        json!(["signed_curve25519"])
    );

    // An empty list is still present: it is what tells clients the server
    // supports fallback keys (R6.3).
    let none = SyncFields::from(&SyncState::default());
    assert_eq!(none.device_unused_fallback_key_types, Some(vec![]));
}

/// The ruma facade answers exactly what the JSON facade answers, on the wire.
#[tokio::test]
async fn ruma_facade_matches_the_json_facade() {
    let (json_api, ruma_api) = (api(), api());
    let (user, device) = (user_id!("@alice:example.org"), device_id!("ALICEDEV"));
    let body = upload_body();

    let json_answer = json_api
        .upload(ALICE, "ALICEDEV", body.to_string().as_bytes())
        .await
        .unwrap();
    let request: upload_keys::v3::Request = incoming("/_matrix/client/v3/keys/upload", &body);
    let ruma_answer = ruma_api.upload_ruma(user, device, &request).await.unwrap();
    assert_eq!(outgoing_json(ruma_answer), json_answer);

    let claim = json!({ "one_time_keys": { ALICE: { "ALICEDEV": "signed_curve25519" } } });
    for round in 0..3 {
        let json_answer = json_api.claim(claim.to_string().as_bytes()).await.unwrap();
        let request: claim_keys::v3::Request = incoming("/_matrix/client/v3/keys/claim", &claim);
        let ruma_answer = ruma_api.claim_ruma(&request).await.unwrap();
        let ruma_wire = outgoing_json(ruma_answer);
        // ruma leaves out empty `failures`; the JSON facade writes `{}`.
        assert_eq!(
            ruma_wire["one_time_keys"], json_answer["one_time_keys"],
            "round {round}"
        );
        let json_sync = json_api.sync(ALICE, "ALICEDEV").await.unwrap();
        let ruma_sync = ruma_api.sync_ruma(user, device).await.unwrap();
        let mut response = sync_events::v3::Response::new("s".to_owned());
        ruma_sync.apply_to(&mut response);
        let ruma_sync = outgoing_json(response);
        for field in [
            "device_one_time_keys_count",
            "device_unused_fallback_key_types",
        ] {
            assert_eq!(ruma_sync[field], json_sync[field], "round {round}: {field}");
        }
    }
    // Two OTKs, then the fallback key with its signed `fallback: true`.
    let sync = ruma_api.sync_ruma(user, device).await.unwrap();
    assert_eq!(sync.device_unused_fallback_key_types, Some(vec![]));
}

/// A facade whose store holds [`upload_body`]'s keys for alice's device,
/// uploaded through the ruma facade.
async fn uploaded_api() -> KeysApi<Arc<dyn KeyStore>> {
    let api = api();
    let request: upload_keys::v3::Request =
        incoming("/_matrix/client/v3/keys/upload", &upload_body());
    api.upload_ruma(
        user_id!("@alice:example.org"),
        device_id!("ALICEDEV"),
        &request,
    )
    .await
    .unwrap();
    api
}

#[tokio::test]
async fn ruma_claim_response_round_trips_to_an_outcome() {
    let api = uploaded_api().await;
    let targets = vec![
        ClaimTarget::one(alice(), Algorithm::signed_curve25519()),
        ClaimTarget::one(alice(), Algorithm::parse("other_alg").unwrap()),
    ];
    let outcome = api.store().claim(&targets).await.unwrap();
    let response = kr::claim_response(&outcome).unwrap();
    let back = kr::claim_outcome_from_response(&response).unwrap();
    assert_eq!(back.keys.len(), 2);
    for key in &back.keys {
        let original = outcome
            .keys
            .iter()
            .find(|k| k.key_id == key.key_id)
            .unwrap();
        assert_eq!(key.key_json, original.key_json);
        assert_eq!(key.fallback, original.fallback);
    }

    // Only the fallback key is left for signed_curve25519 now... after one more OTK.
    let outcome = api.store().claim(&targets[..1]).await.unwrap();
    assert!(!outcome.keys[0].fallback);
    let outcome = api.store().claim(&targets[..1]).await.unwrap();
    let back = kr::claim_outcome_from_response(&kr::claim_response(&outcome).unwrap()).unwrap();
    assert!(
        back.keys[0].fallback,
        "recognized by its signed `fallback: true`"
    );
}

#[tokio::test]
async fn ruma_facade_errors_follow_the_table() {
    let (user, device) = (user_id!("@alice:example.org"), device_id!("ALICEDEV"));
    let limited = api().with_limits({
        let mut limits = Limits::default();
        limits.max_keys_per_upload = 2;
        limits
    });
    let request: upload_keys::v3::Request =
        incoming("/_matrix/client/v3/keys/upload", &upload_body());
    let err = limited
        .upload_ruma(user, device, &request)
        .await
        .unwrap_err();
    assert_eq!((err.status(), err.errcode()), (400, "M_TOO_LARGE"), "{err}");

    let long = "D".repeat(256);
    let err = limited
        .upload_ruma(user, long.as_str().into(), &upload_keys::v3::Request::new())
        .await
        .unwrap_err();
    assert_eq!(
        (err.status(), err.errcode()),
        (400, "M_INVALID_PARAM"),
        "{err}"
    );

    // A conflicting re-upload (R3.2) is M_INVALID_PARAM, as on the wire.
    let api = api();
    let mut upload = Upload::new(alice());
    let id = KeyId::parse("signed_curve25519:A").unwrap();
    upload
        .add_one_time_key(
            id.clone(),
            KeyJson::from_value(&json!("MATERIAL_ONE")).unwrap(),
        )
        .unwrap();
    api.upload_ruma(user, device, &kr::upload_to_request(&upload).unwrap())
        .await
        .unwrap();
    let mut other = Upload::new(alice());
    other
        .add_one_time_key(id, KeyJson::from_value(&json!("MATERIAL_TWO")).unwrap())
        .unwrap();
    let err = api
        .upload_ruma(user, device, &kr::upload_to_request(&other).unwrap())
        .await
        .unwrap_err();
    assert_eq!(
        (err.status(), err.errcode()),
        (400, "M_INVALID_PARAM"),
        "{err}"
    );
    assert!(!err.message().contains("MATERIAL"));
}

const DEHYDRATED_PATH: &str = "/_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device";
const CLAIM_V4_PATH: &str = "/_matrix/client/unstable/org.matrix.msc3983/keys/claim";

/// An MSC3814 `PUT /dehydrated_device` body as matrix-rust-sdk sends it.
fn dehydrated_body(otk_algorithms: &[&str]) -> Value {
    let sig = json!({ ALICE: { "ed25519:DEHYDRATED": "c2ln" } });
    let otks: serde_json::Map<String, Value> = otk_algorithms
        .iter()
        .enumerate()
        .map(|(i, alg)| {
            (
                format!("{alg}:AAAAAAAAAA{i}"),
                json!({ "key": format!("k{i}"), "signatures": sig }),
            )
        })
        .collect();
    json!({
        "device_id": "DEHYDRATED",
        "initial_device_display_name": "Dehydrated device",
        "device_data": { "algorithm": "org.matrix.msc3814.v2", "device_pickle": "cGlja2xl", "nonce": "bm9uY2U" },
        "device_keys": { "user_id": ALICE, "device_id": "DEHYDRATED", "algorithms": [], "keys": {}, "signatures": {} },
        "one_time_keys": otks,
        "fallback_keys": {
            "signed_curve25519:AAAAAAAAAAF": { "key": "fb", "fallback": true, "signatures": sig }
        }
    })
}

#[test]
fn dehydrated_device_request_to_upload_and_back() {
    use keyclaim::ruma::ruma_client_api::dehydrated_device::put_dehydrated_device::unstable as put;
    let body = dehydrated_body(&["signed_curve25519", "signed_curve25519"]);
    let request: put::Request = incoming_with(http::Method::PUT, DEHYDRATED_PATH, &body);
    let upload =
        kr::dehydrated_upload_from_request(user_id!("@alice:example.org"), &request).unwrap();
    assert_eq!(
        upload.device(),
        &Device::parse(ALICE, "DEHYDRATED").unwrap()
    );
    assert_eq!(upload.one_time_keys().len(), 2);
    for (id, json) in upload.one_time_keys() {
        assert_eq!(json.to_value(), body["one_time_keys"][id.as_str()], "{id}");
    }
    let (id, json) = &upload.fallback_keys()[&Algorithm::signed_curve25519()];
    assert_eq!(json.to_value(), body["fallback_keys"][id.as_str()]);

    // And back, with the client's device data and keys.
    let again = kr::dehydrated_device_request(
        &upload,
        request.device_data.clone(),
        request.device_keys.clone(),
    )
    .unwrap();
    assert_eq!(again.device_id, request.device_id);
    assert_eq!(
        kr::dehydrated_upload_from_request(user_id!("@alice:example.org"), &again).unwrap(),
        upload
    );
    let response = kr::dehydrated_device_response(upload.device());
    assert_eq!(
        outgoing_json(response),
        json!({ "device_id": "DEHYDRATED" })
    );
}

/// The device's number of `signed_curve25519` one-time keys.
async fn sc_count(api: &KeysApi<Arc<dyn KeyStore>>, device: &Device) -> u64 {
    let counts = api.store().otk_counts(device).await.unwrap();
    counts.get_str("signed_curve25519")
}

/// The ruma replacement leaves the store as the JSON facade's does (R14.1),
/// and refuses what it refuses (R14.2), changing nothing.
#[tokio::test]
async fn ruma_dehydrated_replace_matches_the_json_facade() {
    use keyclaim::ruma::ruma_client_api::dehydrated_device::put_dehydrated_device::unstable as put;
    let (json_api, ruma_api) = (api(), api());
    let old = Device::parse(ALICE, "OLD").unwrap();
    let new = Device::parse(ALICE, "DEHYDRATED").unwrap();
    let keys = [(
        KeyId::parse("signed_curve25519:O1").unwrap(),
        KeyJson::from_value(&json!("o1")).unwrap(),
    )];
    for api in [&json_api, &ruma_api] {
        let upload = Upload::from_keys(old.clone(), keys.clone(), []).unwrap();
        api.store().upload(&upload).await.unwrap();
    }
    let body = dehydrated_body(&["signed_curve25519", "signed_curve25519"]);
    let json_answer = json_api
        .replace_dehydrated_device(
            ALICE,
            Some("OLD"),
            "DEHYDRATED",
            body.to_string().as_bytes(),
        )
        .await
        .unwrap();
    let request: put::Request = incoming_with(http::Method::PUT, DEHYDRATED_PATH, &body);
    let response = ruma_api
        .replace_dehydrated_device_ruma(
            user_id!("@alice:example.org"),
            Some(device_id!("OLD")),
            &request,
        )
        .await
        .unwrap();
    assert_eq!(
        json_answer["device_id"],
        outgoing_json(response)["device_id"]
    );
    for device in [&old, &new] {
        assert_eq!(
            ruma_api.store().sync_state(device).await.unwrap(),
            json_api.store().sync_state(device).await.unwrap(),
            "{device}"
        );
    }
    assert_eq!(sc_count(&ruma_api, &new).await, 2);
    assert!(ruma_api.store().otk_counts(&old).await.unwrap().is_empty());

    // R14.2: one-time keys of `other` without a fallback key of it.
    let strict = ruma_api.clone().with_dehydrated_fallback_required(true);
    let missing = dehydrated_body(&["signed_curve25519", "other"]);
    let request: put::Request = incoming_with(http::Method::PUT, DEHYDRATED_PATH, &missing);
    let err = strict
        .replace_dehydrated_device_ruma(
            user_id!("@alice:example.org"),
            Some(device_id!("DEHYDRATED")),
            &request,
        )
        .await
        .unwrap_err();
    assert_eq!(
        (err.status(), err.errcode()),
        (400, "M_INVALID_PARAM"),
        "{err}"
    );
    assert_eq!(sc_count(&ruma_api, &new).await, 2, "nothing changed");
}

#[test]
fn claim_v4_request_counts_repeated_algorithms() {
    let body = json!({
        "timeout": 10000,
        "one_time_keys": {
            ALICE: { "D1": ["signed_curve25519", "alg", "signed_curve25519"], "D2": ["a:b"] },
            "@bob:example.org": { "B1": [] }
        }
    });
    let request: claim_keys::v4::Request = incoming(CLAIM_V4_PATH, &body);
    let targets = kr::claim_targets_from_v4_request(&request).unwrap();
    let d1 = Device::parse(ALICE, "D1").unwrap();
    assert_eq!(
        targets,
        [
            keyclaim::ClaimTarget {
                device: d1.clone(),
                algorithm: Algorithm::parse("alg").unwrap(),
                count: 1
            },
            keyclaim::ClaimTarget {
                device: d1,
                algorithm: Algorithm::signed_curve25519(),
                count: 2
            },
        ],
        "an algorithm keyclaim does not accept matches nothing (R4.6)"
    );
    let again =
        kr::claim_targets_from_v4_request(&kr::claim_v4_request(&targets).unwrap()).unwrap();
    assert_eq!(again, targets);
}

/// An application service with one key for every device it is asked about.
#[derive(Debug)]
struct AppService;

#[keyclaim::async_trait]
impl keyclaim::OtkProvider for AppService {
    async fn claim_one_time_keys(
        &self,
        targets: &[ClaimTarget],
    ) -> Result<Vec<keyclaim::ClaimedKey>, keyclaim::BoxError> {
        Ok(targets
            .iter()
            .map(|t| keyclaim::ClaimedKey {
                device: t.device.clone(),
                key_id: KeyId::parse(format!("{}:APPSERVICE", t.algorithm)).unwrap(),
                key_json: KeyJson::from_value(&json!({"key": "as", "signatures": {}})).unwrap(),
                fallback: false,
            })
            .collect())
    }
}

/// Several keys per device through the MSC3983 claim, the oldest first, then
/// the fallback key beside them or the provider's key once they are gone.
#[tokio::test]
async fn claim_v4_ruma_hands_out_several_keys_per_device() {
    let api = uploaded_api().await;
    let body = json!({ "one_time_keys": { ALICE: { "ALICEDEV": ["signed_curve25519", "signed_curve25519", "signed_curve25519"] } } });
    let request: claim_keys::v4::Request = incoming(CLAIM_V4_PATH, &body);

    let options = keyclaim::ClaimOptions::default().always_include_fallback_keys(true);
    let response = api.claim_v4_ruma(&request, &options).await.unwrap();
    let keys = outgoing_json(response.clone())["one_time_keys"][ALICE]["ALICEDEV"].clone();
    let ids: Vec<&String> = keys.as_object().unwrap().keys().collect();
    // Both OTKs, and the fallback key beside them (its ID is the first OTK's:
    // the OTK is answered), not marked used.
    assert_eq!(
        ids,
        [
            "signed_curve25519:AAAAAAAAAAA",
            "signed_curve25519:AAAAAAAAAAE"
        ]
    );
    assert_eq!(keys["signed_curve25519:AAAAAAAAAAA"]["key"], "emVybw");
    let outcome = kr::claim_outcome_from_v4_response(&response).unwrap();
    assert_eq!(outcome.keys.len(), 2);
    assert_eq!(
        kr::claim_outcome_from_v4_response(&kr::claim_v4_response(&outcome).unwrap()).unwrap(),
        outcome
    );
    let sync = api
        .sync_ruma(user_id!("@alice:example.org"), device_id!("ALICEDEV"))
        .await
        .unwrap();
    assert_eq!(
        sync.device_unused_fallback_key_types,
        Some(vec![OneTimeKeyAlgorithm::SignedCurve25519])
    );

    // No OTK left: the application service's key, and the fallback key beside it, still unused.
    let options = options.provider(Arc::new(AppService));
    let response = api.claim_v4_ruma(&request, &options).await.unwrap();
    let keys = outgoing_json(response)["one_time_keys"][ALICE]["ALICEDEV"].clone();
    assert_eq!(keys["signed_curve25519:APPSERVICE"]["key"], "as");
    assert_eq!(keys["signed_curve25519:AAAAAAAAAAA"]["fallback"], true);
    let sync = api
        .sync_ruma(user_id!("@alice:example.org"), device_id!("ALICEDEV"))
        .await
        .unwrap();
    assert_eq!(
        sync.device_unused_fallback_key_types,
        Some(vec![OneTimeKeyAlgorithm::SignedCurve25519])
    );

    // Too many targets: M_TOO_LARGE, as on the wire.
    let limited = api.with_limits({
        let mut limits = Limits::default();
        limits.max_claim_targets = 0;
        limits
    });
    let err = limited.claim_v4_ruma(&request, &options).await.unwrap_err();
    assert_eq!((err.status(), err.errcode()), (400, "M_TOO_LARGE"), "{err}");
}

/// The ruma claim with options answers what the JSON one answers.
#[tokio::test]
async fn ruma_claim_with_matches_the_json_facade() {
    let (json_api, ruma_api) = (api(), api());
    let body = upload_body();
    for api in [&json_api, &ruma_api] {
        api.upload(ALICE, "ALICEDEV", body.to_string().as_bytes())
            .await
            .unwrap();
    }
    let claim = json!({ "one_time_keys": {
        ALICE: { "ALICEDEV": "signed_curve25519" },
        "@bob:example.org": { "BOBDEV": "signed_curve25519" }
    } });
    let options = keyclaim::ClaimOptions::default()
        .always_include_fallback_keys(true)
        .provider(Arc::new(AppService));
    for round in 0..4 {
        let json_answer = json_api
            .claim_with(claim.to_string().as_bytes(), &options)
            .await
            .unwrap();
        let request: claim_keys::v3::Request = incoming("/_matrix/client/v3/keys/claim", &claim);
        let ruma_answer =
            outgoing_json(ruma_api.claim_with_ruma(&request, &options).await.unwrap());
        assert_eq!(
            ruma_answer["one_time_keys"], json_answer["one_time_keys"],
            "round {round}"
        );
        assert_eq!(
            ruma_api.sync(ALICE, "ALICEDEV").await.unwrap(),
            json_api.sync(ALICE, "ALICEDEV").await.unwrap(),
            "round {round}"
        );
    }
}
