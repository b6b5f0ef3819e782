//! What the scenario files share: the facade type, the client steps (upload,
//! claim and verify, one Olm round trip) and the `per_backend!` macro that
//! stamps a scenario out once per backend.

use std::sync::Arc;

use keyclaim::{KeyStore, KeysApi};
use keyclaim_e2e::client::{OlmDevice, SIGNED_CURVE25519, VerifiedKey, claimed_keys};
use serde_json::{Value, json};

/// The wire facade as a homeserver holds it.
pub(crate) type Api = KeysApi<Arc<dyn KeyStore>>;

pub(crate) async fn upload(api: &Api, device: &OlmDevice, body: &Value) -> Value {
    api.upload(
        &device.user_id,
        &device.device_id,
        body.to_string().as_bytes(),
    )
    .await
    .expect("upload accepted")
}

pub(crate) async fn otk_count(api: &Api, device: &OlmDevice) -> u64 {
    let sync = api
        .sync(&device.user_id, &device.device_id)
        .await
        .expect("sync");
    sync["device_one_time_keys_count"][SIGNED_CURVE25519]
        .as_u64()
        .expect("signed_curve25519 count always present (R6.1)")
}

pub(crate) async fn unused_fallback_types(api: &Api, device: &OlmDevice) -> Value {
    let sync = api
        .sync(&device.user_id, &device.device_id)
        .await
        .expect("sync");
    sync["device_unused_fallback_key_types"].clone()
}

/// A `/keys/claim` body asking one `signed_curve25519` key of each of
/// `owners`.
pub(crate) fn claim_body(owners: &[&OlmDevice]) -> Vec<u8> {
    let mut targets = serde_json::Map::new();
    for owner in owners {
        targets
            .entry(owner.user_id.clone())
            .or_insert_with(|| json!({}))[&owner.device_id] = json!(SIGNED_CURVE25519);
    }
    json!({ "one_time_keys": targets, "timeout": 10_000 })
        .to_string()
        .into_bytes()
}

/// Verifies every key a claim answer holds for `owner` as a client does
/// (the owner's signature over what keyclaim returned), in answer order.
pub(crate) fn verified_keys(answer: &Value, owner: &OlmDevice) -> Vec<VerifiedKey> {
    assert_eq!(answer["failures"], json!({}));
    claimed_keys(answer, &owner.user_id, &owner.device_id)
        .into_iter()
        .map(|(key_id, json)| {
            OlmDevice::verify_claimed_key(
                &owner.user_id,
                &owner.device_id,
                owner.signing_key(),
                &key_id,
                &json,
            )
            .unwrap_or_else(|e| panic!("claimed key fails client verification: {e}; json: {json}"))
        })
        .collect()
}

/// Bob claims one `signed_curve25519` key of `owner` through the wire facade
/// and verifies it as a client does. `None` when keyclaim has nothing.
pub(crate) async fn claim_and_verify(api: &Api, owner: &OlmDevice) -> Option<VerifiedKey> {
    let answer = api
        .claim(&claim_body(&[owner]))
        .await
        .expect("claim accepted");
    let mut keys = verified_keys(&answer, owner);
    assert!(keys.len() <= 1, "one key per target on the wire: {keys:?}");
    keys.pop()
}

/// A new Bob device opens a session with `key` and sends `text`; `owner`
/// accepts and must read `text`. Returns Bob's device so that callers can
/// keep talking.
pub(crate) fn olm_round_trip(owner: &mut OlmDevice, key: &VerifiedKey, text: &str) -> OlmDevice {
    let bob = OlmDevice::new("@bob:example.org", "BOBDEV");
    let (_, message) = bob
        .open_session(owner.identity_key(), key, text)
        .expect("Bob opens a session");
    let (_, plaintext) = owner
        .accept_session(bob.identity_key(), &message)
        .unwrap_or_else(|e| {
            panic!(
                "{} cannot accept a session on {}: {e}",
                owner.device_id, key.key_id
            )
        });
    assert_eq!(plaintext, text);
    bob
}

/// Stamps out `#[tokio::test]`s: one module per backend, one test per case
/// in it, each case an `async fn(Api)` of the including file run on a fresh
/// store, so that a failure names the backend.
///
/// ```ignore
/// per_backend! {
///     cases { first_case, second_case }
///     memory => Some(TestBackend::memory());
/// }
/// ```
macro_rules! per_backend {
    (cases $cases:tt $($backend:ident => $make:expr;)*) => {$(
        per_backend!(@backend $backend => $make; $cases);
    )*};
    (@backend $backend:ident => $make:expr; { $($case:ident),* $(,)? }) => {
        mod $backend {
            use super::*;

            async fn run<F, Fut>(case: F)
            where
                F: FnOnce(common::Api) -> Fut,
                Fut: std::future::Future<Output = ()>,
            {
                let backend: Option<keyclaim_e2e::TestBackend> = $make;
                let Some(backend) = backend else {
                    return; // skipped loudly by the backend's harness
                };
                case(backend.api.clone()).await;
                drop(backend);
            }

            $(
                #[tokio::test]
                async fn $case() {
                    run(super::$case).await;
                }
            )*
        }
    };
}
pub(crate) use per_backend;
