//! The claim with options (R12.4) on the model side: the wire body of an
//! operation, the test's application-service provider, and the answer the
//! model expects.

use std::collections::BTreeMap;

use keyclaim::{BoxError, ClaimTarget, ClaimedKey, Device, Error, OtkProvider};
use serde_json::{Map, Value, json};

use super::ops::{algorithm, device};
use crate::fixtures::*;
use crate::model::{Model, Provided, claim_answer};

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

/// Applies a claim with options to the model (R12.4), the test provider
/// asked when there is one; the wire answer.
pub(super) fn apply(
    model: &mut Model,
    targets: &[ClaimTarget],
    always_include: bool,
    provider: bool,
) -> Result<Value, Error> {
    let provided: Provided<'_> = &provided_key;
    let keys = model.claim_with(targets, always_include, provider.then_some(provided))?;
    Ok(claim_answer(&keys))
}
