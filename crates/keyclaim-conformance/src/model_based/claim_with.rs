//! The claim with options (R12.4) on the model side: the wire body of an
//! operation, the test's application-service provider, and the answer the
//! model expects.

use std::collections::BTreeMap;

use keyclaim::{BoxError, ClaimTarget, ClaimedKey, Device, Error, FallbackTarget, OtkProvider};
use serde_json::{Map, Value, json};

use super::ops::{algorithm, device};
use crate::fixtures::*;
use crate::model::Model;

/// The targets of a `ClaimWith` operation, one per device (a later entry for
/// the same device replaces an earlier one, as in a JSON object).
pub(super) fn targets(spec: &[(usize, usize, usize)]) -> Vec<ClaimTarget> {
    let mut by_device: BTreeMap<Device, ClaimTarget> = BTreeMap::new();
    for &(u, d, a) in spec {
        let target = ClaimTarget::one(device(u, d), algorithm(a));
        by_device.insert(target.device.clone(), target);
    }
    by_device.into_values().collect()
}

/// The `POST /keys/claim` body for targets.
pub(super) fn body(targets: &[ClaimTarget]) -> Vec<u8> {
    let mut users = Map::new();
    for t in targets {
        let devices = users
            .entry(t.device.user_id.as_str())
            .or_insert_with(|| json!({}));
        devices[t.device.device_id.as_str()] = json!(t.algorithm.as_str());
    }
    json!({ "one_time_keys": users, "timeout": 10_000 })
        .to_string()
        .into_bytes()
}

/// The key the test provider holds for a device and algorithm: it has one
/// for every device `D2`, whatever was handed out before (an application
/// service makes keys on demand).
fn provided_key(target: &ClaimTarget) -> Option<ClaimedKey> {
    (target.device.device_id.as_str() == "D2").then(|| ClaimedKey {
        device: target.device.clone(),
        key_id: kid(&format!("{}:AS", target.algorithm)),
        key_json: signed(&format!("as-{}", target.device), "as-sig"),
        fallback: false,
    })
}

/// An application service (MSC3983) that has keys for the devices `D2`, and
/// also answers a key nobody asked for, which the facade must drop.
#[derive(Debug)]
pub(super) struct Provider;

#[keyclaim::async_trait]
impl OtkProvider for Provider {
    async fn claim_one_time_keys(
        &self,
        targets: &[ClaimTarget],
    ) -> Result<Vec<ClaimedKey>, BoxError> {
        let mut keys: Vec<ClaimedKey> = targets.iter().filter_map(provided_key).collect();
        keys.push(ClaimedKey {
            device: dev("@stranger:x", "ZZ"),
            key_id: kid("signed_curve25519:UNASKED"),
            key_json: signed("unasked", "sig"),
            fallback: false,
        });
        Ok(keys)
    }
}

/// Applies a claim with options to the model, as R12.4 says: the store's
/// one-time keys, then the provider's for the misses, then fallback keys
/// (for the targets that got no key from either step, marked used; with
/// `always_include`, for every target, marked used only where it got no
/// one-time key). Answers the wire answer.
pub(super) fn apply(
    model: &mut Model,
    targets: &[ClaimTarget],
    always_include: bool,
    provider: bool,
) -> Result<Value, Error> {
    if !always_include && !provider {
        return Ok(answer(&model.claim(targets)?.keys));
    }
    let local = model.claim_one_time_keys(targets)?;
    let provided: Vec<ClaimedKey> = if provider {
        local.misses.iter().filter_map(provided_key).collect()
    } else {
        Vec::new()
    };
    let got_one = |t: &ClaimTarget| {
        local
            .keys
            .iter()
            .chain(&provided)
            .any(|k| k.device == t.device && k.key_id.algorithm() == t.algorithm)
    };
    let fallback_targets: Vec<FallbackTarget> = targets
        .iter()
        .filter(|t| always_include || !got_one(t))
        .map(|t| FallbackTarget {
            device: t.device.clone(),
            algorithm: t.algorithm.clone(),
            mark_used: !got_one(t),
        })
        .collect();
    let fallback = if fallback_targets.is_empty() {
        Vec::new()
    } else {
        model.claim_fallback_keys(&fallback_targets)?.keys
    };
    // A one-time key and a fallback key under the same key ID of a device:
    // the one-time key is answered.
    let keys: Vec<ClaimedKey> = fallback
        .into_iter()
        .chain(local.keys)
        .chain(provided)
        .collect();
    Ok(answer(&keys))
}

/// The wire answer for keys: `{"one_time_keys": {user: {device: {key_id:
/// key_json}}}, "failures": {}}`, a later key under the same key ID of a
/// device replacing an earlier one.
fn answer(keys: &[ClaimedKey]) -> Value {
    // Indexing `null` by a string makes it an object.
    let mut users = Value::Null;
    for key in keys {
        users[key.device.user_id.as_str()][key.device.device_id.as_str()][key.key_id.as_str()] =
            key.key_json.to_value();
    }
    if users.is_null() {
        users = json!({});
    }
    json!({ "one_time_keys": users, "failures": {} })
}
