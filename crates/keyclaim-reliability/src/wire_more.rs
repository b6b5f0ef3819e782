//! The logic of the fuzz targets for the facade's endpoints around claims:
//! `wire_claim_with` ([`KeysApi::claim_with`], R12.4), `wire_reset`
//! ([`KeysApi::reset`], R13.2), `wire_replace_dehydrated`
//! ([`KeysApi::replace_dehydrated_device`], R14.1, R14.2) and
//! `wire_counts_many` ([`KeysApi::counts_many`], R16.1).
//!
//! Each input is served by [`KeysApi`] over a fresh store from
//! [`populated_store`], as in [`crate::wire`]. Whatever the bytes, the answer
//! is `Ok` or an error of contract section 9's table, after which the store's
//! whole state is unchanged. After `Ok`, the request is read again with
//! `serde_json` alone and applied to the conformance suite's reference
//! [`Model`] loaded with the state from before: the answer must be the
//! model's, and the store's whole state after the call the model's.
//! [`keyclaim::transfer::check_store`] must find nothing either way.
//!
//! Where an input needs more than a body (options, the previous device), its
//! first byte chooses them and the rest is the body; the choices are on each
//! check. The low bits of the ASCII digits are the numbers themselves, so
//! seeds can start with a digit.

use std::future::Future;
use std::sync::Arc;

use keyclaim::transfer::DeviceSnapshot;
use keyclaim::{
    Algorithm, ApiError, BoxError, ClaimOptions, ClaimTarget, ClaimedKey, Device, DeviceId,
    KeyJson, KeyStore, KeysApi, OtkProvider, ResetScope, Upload, UserId,
};
use keyclaim_conformance::model::{Model, Provided, claim_answer};
use keyclaim_memory::MemoryStore;
use serde_json::{Map, Value, json};

use crate::util::{Violation, block_on, ensure, snapshot_all};
use crate::wire::{
    UPLOAD_DEVICE, UPLOAD_USER, check_error, check_sound, claim_targets, kid, populated_store,
};

/// The device a dehydrated device replacement uploads to, unless the
/// selector byte says [`UPLOAD_DEVICE`].
pub const DEHYDRATED_DEVICE: &str = "DEHYDRATED";

type Api = KeysApi<Arc<MemoryStore>>;

/// Serves one request over a fresh populated store. On an error, checks it
/// against the table and that nothing changed; on success, hands the answer,
/// a model loaded with the state from before, and the state after to
/// `check_ok`. Then checks the store.
async fn serve<Fut>(
    request: impl FnOnce(Api) -> Fut,
    check_ok: impl FnOnce(&Value, Model, &[DeviceSnapshot]) -> Result<(), Violation>,
) -> Result<(), Violation>
where
    Fut: Future<Output = Result<Value, ApiError>>,
{
    let store = populated_store().await?;
    let before = snapshot_all(&*store).await?;
    let result = request(KeysApi::new(store.clone())).await;
    let after = snapshot_all(&*store).await?;
    match result {
        Err(err) => check_error(&err, &before, &after)?,
        Ok(answer) => {
            let mut model = Model::new(store.limits().clone());
            for snapshot in &before {
                model.import_device(snapshot);
            }
            check_ok(&answer, model, &after)?;
        }
    }
    check_sound(&store).await
}

/// The answer and the whole state after it must be the model's.
fn agree(
    what: &str,
    answer: &Value,
    want: &Value,
    model: &Model,
    after: &[DeviceSnapshot],
) -> Result<(), Violation> {
    ensure!(answer == want, "{what} answered {answer}, the model {want}");
    ensure!(
        model.snapshot() == after,
        "{what}: the store's state after the call is not the model's"
    );
    Ok(())
}

/// The body of a request the facade accepted, as a JSON object.
fn object_of(body: &[u8], what: &str) -> Result<Map<String, Value>, Violation> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Violation(format!(
            "{what} succeeded on a body that is no object"
        ))),
        Err(e) => Err(Violation(format!(
            "{what} succeeded on a body serde_json rejects: {e}"
        ))),
    }
}

/// What the first byte of an input chooses, and the rest of it.
fn split(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((first, rest)) => (*first, rest),
        None => (0, data),
    }
}

/// The key the test provider (an application service) holds for a target:
/// one for every device, of `signed_curve25519` only.
fn provided_key(target: &ClaimTarget) -> Option<ClaimedKey> {
    if target.algorithm.as_str() != keyclaim::SIGNED_CURVE25519 {
        return None;
    }
    Some(ClaimedKey {
        device: target.device.clone(),
        key_id: kid("signed_curve25519:ASKEY").ok()?,
        key_json: KeyJson::from_value(&json!({"key": "as-key", "signatures": {}})).ok()?,
        fallback: false,
    })
}

/// The test provider: [`provided_key`] for each target, or a failure.
#[derive(Debug)]
struct Provider {
    fails: bool,
}

#[keyclaim::async_trait]
impl OtkProvider for Provider {
    async fn claim_one_time_keys(
        &self,
        targets: &[ClaimTarget],
    ) -> Result<Vec<ClaimedKey>, BoxError> {
        if self.fails {
            return Err("application service unreachable".into());
        }
        Ok(targets.iter().filter_map(provided_key).collect())
    }
}

/// Checks one `wire_claim_with` input. The first byte chooses the options:
/// bit 0 `always_include_fallback_keys`, bit 1 a provider, bit 2 a provider
/// that fails; the rest is a `POST /keys/claim` body. After `Ok`, the answer
/// and the state are the model's claim with the same options (R12.4).
///
/// # Errors
/// The first broken promise found.
pub fn check_claim_with(data: &[u8]) -> Result<(), Violation> {
    let (choice, body) = split(data);
    let always_include = choice & 1 != 0;
    let provider = (choice & 2 != 0).then_some(Provider {
        fails: choice & 4 != 0,
    });
    block_on(serve(
        |api| async move {
            let mut options = ClaimOptions::default().always_include_fallback_keys(always_include);
            if let Some(provider) = provider {
                options = options.provider(Arc::new(provider));
            }
            api.claim_with(body, &options).await
        },
        |answer, mut model, after| {
            let targets = claim_targets(body)?;
            let provided: Provided<'_> = if choice & 4 != 0 {
                &|_| None
            } else {
                &provided_key
            };
            let keys = model
                .claim_with(
                    &targets,
                    always_include,
                    (choice & 2 != 0).then_some(provided),
                )
                .map_err(|e| {
                    Violation(format!("the facade served a claim the model refuses: {e}"))
                })?;
            agree("claim_with", answer, &claim_answer(&keys), &model, after)
        },
    ))?
}

/// Checks one `wire_reset` input: the bytes as a `POST /keys/reset` body for
/// [`UPLOAD_USER`]/[`UPLOAD_DEVICE`]. After `Ok`, the answer and the state
/// are the model's reset of the scope read from the body (R13.1, R13.2).
///
/// # Errors
/// The first broken promise found.
pub fn check_reset(body: &[u8]) -> Result<(), Violation> {
    block_on(serve(
        |api| async move { api.reset(UPLOAD_USER, UPLOAD_DEVICE, body).await },
        |answer, mut model, after| {
            let map = object_of(body, "reset")?;
            let scope = if map.get("all") == Some(&Value::Bool(true)) {
                ResetScope::All
            } else {
                let ids = match map.get("key_ids") {
                    Some(Value::Array(ids)) => ids
                        .iter()
                        .map(|id| match id {
                            Value::String(id) => kid(id),
                            _ => Err(Violation::new("reset succeeded with a non-string key ID")),
                        })
                        .collect::<Result<_, _>>()?,
                    _ => Default::default(),
                };
                ResetScope::KeyIds(ids)
            };
            let device = Device::parse(UPLOAD_USER, UPLOAD_DEVICE)?;
            let counts = model.reset_one_time_keys(&device, &scope).counts;
            let want = json!({ "device_one_time_keys_count": counts.to_wire() });
            agree("reset", answer, &want, &model, after)
        },
    ))?
}

/// What the selector byte of a `wire_replace_dehydrated` input chooses (see
/// [`check_replace_dehydrated`]): the previous device, the new device, and
/// whether the facade requires a fallback key per algorithm (R14.2).
fn replace_choice(choice: u8) -> (Option<&'static str>, &'static str, bool) {
    let previous = match choice & 3 {
        0 => None,
        1 => Some(UPLOAD_DEVICE),
        2 => Some(DEHYDRATED_DEVICE),
        _ => Some(""),
    };
    let device = if choice & 4 == 0 {
        DEHYDRATED_DEVICE
    } else {
        UPLOAD_DEVICE
    };
    (previous, device, choice & 8 != 0)
}

/// Checks one `wire_replace_dehydrated` input: the first byte chooses the
/// devices and the option (bits 0-1 the previous device: none,
/// [`UPLOAD_DEVICE`], [`DEHYDRATED_DEVICE`] or an empty, invalid ID; bit 2
/// the new device: [`DEHYDRATED_DEVICE`] or [`UPLOAD_DEVICE`]; bit 3 the
/// R14.2 option), the rest is an MSC3814
/// `PUT /dehydrated_device` body for [`UPLOAD_USER`]. After `Ok`, the answer
/// and the state are the model's replacement with the keys read from the
/// body (R14.1), and with the option every algorithm with one-time keys has
/// a fallback key (R14.2).
///
/// # Errors
/// The first broken promise found.
pub fn check_replace_dehydrated(data: &[u8]) -> Result<(), Violation> {
    let (choice, body) = split(data);
    let (previous, device, required) = replace_choice(choice);
    block_on(serve(
        |api| async move {
            api.with_dehydrated_fallback_required(required)
                .replace_dehydrated_device(UPLOAD_USER, previous, device, body)
                .await
        },
        |answer, mut model, after| {
            let upload = upload_of(body, Device::parse(UPLOAD_USER, device)?)?;
            if required {
                for id in upload.one_time_keys().keys() {
                    ensure!(
                        upload.fallback_keys().contains_key(&id.algorithm()),
                        "replace succeeded without a fallback key for {} (R14.2)",
                        id.algorithm()
                    );
                }
            }
            let previous = previous.map(DeviceId::parse).transpose()?;
            let counts = model
                .replace_device(previous.as_ref(), &upload)
                .map_err(|e| {
                    Violation(format!(
                        "the facade served a replacement the model refuses: {e}"
                    ))
                })?
                .counts;
            let want = json!({ "device_id": device, "one_time_key_counts": counts.to_wire() });
            agree("replace_dehydrated_device", answer, &want, &model, after)
        },
    ))?
}

/// The keys of an upload body the facade accepted: `one_time_keys` and
/// `fallback_keys`, or the unstable alias when the stable field is absent
/// or null.
fn upload_of(body: &[u8], device: Device) -> Result<Upload, Violation> {
    let map = object_of(body, "upload")?;
    let keys = |field: &str| -> Result<Vec<_>, Violation> {
        match map.get(field) {
            Some(Value::Object(keys)) => keys
                .iter()
                .map(|(id, json)| Ok((kid(id)?, KeyJson::from_value(json)?)))
                .collect(),
            _ => Ok(Vec::new()),
        }
    };
    let fallbacks = match map.get("fallback_keys") {
        None | Some(Value::Null) => keys("org.matrix.msc2732.fallback_keys")?,
        Some(_) => keys("fallback_keys")?,
    };
    Ok(Upload::from_keys(
        device,
        keys("one_time_keys")?,
        fallbacks,
    )?)
}

/// Checks one `wire_counts_many` input: the bytes as a bulk counts body
/// (`{"devices": {user: [device, ...]}}`). After `Ok`, each device named is
/// answered once, with the model's counts and unused fallback types
/// (R16.1), and nothing changed.
///
/// # Errors
/// The first broken promise found.
pub fn check_counts_many(body: &[u8]) -> Result<(), Violation> {
    block_on(serve(
        |api| async move { api.counts_many(body).await },
        |answer, model, after| {
            let map = object_of(body, "counts_many")?;
            let mut want = json!({});
            if let Some(Value::Object(users)) = map.get("devices") {
                for (user, devices) in users {
                    let Value::Array(devices) = devices else {
                        return Err(Violation::new(
                            "counts_many succeeded with a non-array device list",
                        ));
                    };
                    let user_id = UserId::parse(user.as_str())?;
                    for device in devices {
                        let Value::String(device) = device else {
                            return Err(Violation::new(
                                "counts_many succeeded with a non-string device ID",
                            ));
                        };
                        let device_id = DeviceId::parse(device.as_str())?;
                        let state = model.sync_state(&Device::new(user_id.clone(), device_id));
                        let types: Vec<&str> = state
                            .unused_fallback_key_types
                            .iter()
                            .map(Algorithm::as_str)
                            .collect();
                        want[user.as_str()][device.as_str()] = json!({
                            "device_one_time_keys_count": state.one_time_key_counts.to_wire(),
                            "device_unused_fallback_key_types": types,
                        });
                    }
                }
            }
            agree("counts_many", answer, &want, &model, after)
        },
    ))?
}
