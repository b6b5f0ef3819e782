//! The logic of the `wire_upload` and `wire_claim` fuzz targets.
//!
//! Each input is a request body. It is served by [`KeysApi`] over a fresh
//! [`MemoryStore`] pre-populated by [`populated_store`] (OTKs, fallback keys,
//! used fallbacks and remembered issued keys on several devices, so that
//! retries, conflicts, R3.4 re-uploads and claims all have something to hit).
//!
//! Whatever the bytes, the facade must answer `Ok` or one of the errors of
//! contract section 9's table (never a panic, never 500 from a store that cannot
//! fail), and:
//!
//! - after an error, the store's full state is exactly what it was before
//!   (R2.6: nothing stored, nothing consumed);
//! - after a successful upload, the answer's counts are the store's, every
//!   uploaded OTK is stored with its content (or was remembered as issued,
//!   R3.4), every uploaded fallback key is the stored one (R5.1, R5.2), and
//!   no stored OTK vanished;
//! - after a successful claim, the answer is well formed, every key handed
//!   out was stored for that device and is gone (OTK) or marked used
//!   (fallback), nothing else changed, and every target that had a key to
//!   hand out got one (R4.3, R4.6);
//! - [`keyclaim::transfer::check_store`] finds no problem afterwards.

use std::collections::BTreeMap;
use std::sync::Arc;

use keyclaim::transfer::{DeviceSnapshot, check_store};
use keyclaim::{
    Algorithm, ApiError, ClaimTarget, Device, KeyId, KeyJson, KeyStore, KeysApi, Upload,
};
use keyclaim_memory::MemoryStore;
use serde_json::{Map, Value, json};
use tokio::sync::OnceCell;

use crate::util::{Violation, block_on, ensure, snapshot_all};

/// The user every `wire_upload` input uploads for.
pub const UPLOAD_USER: &str = "@alice:example.org";
/// The device every `wire_upload` input uploads for.
pub const UPLOAD_DEVICE: &str = "ALICEDEV";

/// The (status, errcode) pairs of contract section 9's table that a client
/// request can earn from a store that cannot fail.
const CLIENT_ERRORS: [(u16, &str); 4] = [
    (400, "M_NOT_JSON"),
    (400, "M_BAD_JSON"),
    (400, "M_INVALID_PARAM"),
    (400, "M_TOO_LARGE"),
];

/// An error message longer than this would echo the request (key IDs and
/// device names are at most a few hundred bytes each).
const MAX_MESSAGE_BYTES: usize = 2048;

pub(crate) fn device(user: &str, device: &str) -> Result<Device, Violation> {
    Ok(Device::parse(user, device)?)
}

pub(crate) fn key(json: Value) -> Result<KeyJson, Violation> {
    Ok(KeyJson::from_value(&json)?)
}

pub(crate) fn kid(id: &str) -> Result<KeyId, Violation> {
    Ok(KeyId::parse(id)?)
}

pub(crate) fn signed(material: &str) -> Value {
    json!({"key": material, "signatures": {"@alice:example.org": {"ed25519:ALICEDEV": "sig"}}})
}

/// A memory store holding a bit of everything:
///
/// - `@alice:example.org`/`ALICEDEV`: `signed_curve25519:AAAAAA1`..`5` (object
///   keys `k-AAAAAA1`..), `signed_curve25519:AAAAAA0` issued and remembered,
///   legacy string OTK `curve25519:LEGACY`, `alg2:X1` issued, unused fallback
///   `signed_curve25519:FB`, used fallback `alg2:FB2`;
/// - `@bob:example.org`/`BOBDEV`: `signed_curve25519:B0`..`B2` and an unused
///   fallback `signed_curve25519:BFB`;
/// - `@carol:example.org`/`C1`: only an unused fallback `alg3:CF`.
///
/// The state is built once per process by uploads and claims
/// ([`build_populated_store`]) and copied into each new store with
/// `import_device`: a fuzz target calls this for every input, and parsing
/// and canonicalizing the keys' JSON again each time took half of its time.
///
/// # Errors
/// The store's errors (none are expected).
pub async fn populated_store() -> Result<Arc<MemoryStore>, Violation> {
    static TEMPLATE: OnceCell<Vec<DeviceSnapshot>> = OnceCell::const_new();
    let template = TEMPLATE
        .get_or_try_init(|| async {
            let built = build_populated_store().await?;
            Ok::<_, Violation>(built.export_devices(None, 64).await?)
        })
        .await?;
    let store = Arc::new(MemoryStore::new());
    for snapshot in template.iter() {
        store.import_device(snapshot).await?;
    }
    Ok(store)
}

/// The state of [`populated_store`], built the long way: by uploads and
/// claims through the store API.
///
/// # Errors
/// The store's errors (none are expected).
pub async fn build_populated_store() -> Result<Arc<MemoryStore>, Violation> {
    let store = Arc::new(MemoryStore::new());
    let alice = device(UPLOAD_USER, UPLOAD_DEVICE)?;
    let bob = device("@bob:example.org", "BOBDEV")?;
    let carol = device("@carol:example.org", "C1")?;

    let mut otks = Vec::new();
    for i in 0..6 {
        otks.push((
            kid(&format!("signed_curve25519:AAAAAA{i}"))?,
            key(signed(&format!("k-AAAAAA{i}")))?,
        ));
    }
    otks.push((kid("curve25519:LEGACY")?, key(json!("legacy-material"))?));
    otks.push((kid("alg2:X1")?, key(signed("k-X1"))?));
    let fallbacks = vec![
        (
            kid("signed_curve25519:FB")?,
            key(json!({"key": "k-FB", "fallback": true, "signatures": {}}))?,
        ),
        (
            kid("alg2:FB2")?,
            key(json!({"key": "k-FB2", "fallback": true, "signatures": {}}))?,
        ),
    ];
    store
        .upload(&Upload::from_keys(alice.clone(), otks, fallbacks)?)
        .await?;
    // Issue AAAAAA0 (remembered, R3.4), X1, then use the alg2 fallback.
    let sc = Algorithm::signed_curve25519();
    let alg2 = Algorithm::parse("alg2")?;
    store
        .claim(&[ClaimTarget::one(alice.clone(), sc.clone())])
        .await?;
    store
        .claim(&[ClaimTarget::one(alice.clone(), alg2.clone())])
        .await?;
    store.claim(&[ClaimTarget::one(alice, alg2)]).await?;

    let bob_otks = (0..3)
        .map(|i| {
            Ok((
                kid(&format!("signed_curve25519:B{i}"))?,
                key(signed(&format!("k-B{i}")))?,
            ))
        })
        .collect::<Result<Vec<_>, Violation>>()?;
    let bob_fb = vec![(kid("signed_curve25519:BFB")?, key(signed("k-BFB"))?)];
    store
        .upload(&Upload::from_keys(bob, bob_otks, bob_fb)?)
        .await?;
    let carol_fb = vec![(kid("alg3:CF")?, key(json!("carol-fallback"))?)];
    store
        .upload(&Upload::from_keys(carol, Vec::new(), carol_fb)?)
        .await?;
    Ok(store)
}

pub(crate) fn check_error(
    err: &ApiError,
    before: &[DeviceSnapshot],
    after: &[DeviceSnapshot],
) -> Result<(), Violation> {
    ensure!(
        CLIENT_ERRORS.contains(&(err.status(), err.errcode())),
        "({}, {}) is not in contract section 9's table for a client error: {err}",
        err.status(),
        err.errcode()
    );
    ensure!(
        err.message().len() <= MAX_MESSAGE_BYTES,
        "error message of {} bytes (echoes the request?)",
        err.message().len()
    );
    ensure!(
        before == after,
        "the store changed although the request failed with {err}"
    );
    Ok(())
}

pub(crate) async fn check_sound(store: &MemoryStore) -> Result<(), Violation> {
    let report = check_store(store, 64).await?;
    ensure!(
        report.problems.is_empty(),
        "check_store found problems: {:?}",
        report.problems
    );
    Ok(())
}

fn find<'a>(state: &'a [DeviceSnapshot], dev: &Device) -> Option<&'a DeviceSnapshot> {
    state.iter().find(|s| &s.device == dev)
}

/// Checks one `wire_upload` input: `body` as a `POST /keys/upload` body for
/// [`UPLOAD_USER`]/[`UPLOAD_DEVICE`].
///
/// # Errors
/// The first broken promise found.
pub fn check_upload(body: &[u8]) -> Result<(), Violation> {
    block_on(check_upload_async(body))?
}

async fn check_upload_async(body: &[u8]) -> Result<(), Violation> {
    let store = populated_store().await?;
    let api = KeysApi::new(store.clone());
    let before = snapshot_all(&*store).await?;
    let result = api.upload(UPLOAD_USER, UPLOAD_DEVICE, body).await;
    let after = snapshot_all(&*store).await?;
    match result {
        Err(err) => check_error(&err, &before, &after)?,
        Ok(answer) => {
            let dev = device(UPLOAD_USER, UPLOAD_DEVICE)?;
            let counts = store.otk_counts(&dev).await?;
            ensure!(
                answer == json!({"one_time_key_counts": counts.to_wire()}),
                "upload answered {answer}, but the store's counts are {}",
                counts.to_wire()
            );
            check_upload_applied(body, &dev, &before, &after)?;
            // Other devices are untouched.
            let others = |s: &[DeviceSnapshot]| -> Vec<DeviceSnapshot> {
                s.iter().filter(|d| d.device != dev).cloned().collect()
            };
            ensure!(
                others(&before) == others(&after),
                "an upload for {dev} changed another device"
            );
        }
    }
    check_sound(&store).await
}

/// The independent oracle for a successful upload: parses the body again
/// with `serde_json` alone and checks the stored state against it.
fn check_upload_applied(
    body: &[u8],
    dev: &Device,
    before: &[DeviceSnapshot],
    after: &[DeviceSnapshot],
) -> Result<(), Violation> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        Violation(format!(
            "upload succeeded on a body serde_json rejects: {e}"
        ))
    })?;
    let Value::Object(map) = value else {
        return Err(Violation::new("upload succeeded on a non-object body"));
    };
    let empty = DeviceSnapshot::empty(dev.clone());
    let was = find(before, dev).unwrap_or(&empty);
    let now = find(after, dev).unwrap_or(&empty);
    // No stored OTK vanished, and stored ones kept their content.
    for otk in &was.one_time_keys {
        ensure!(
            now.one_time_keys
                .iter()
                .any(|o| o.key_id == otk.key_id && o.key_json == otk.key_json),
            "upload removed or rewrote the stored OTK {}",
            otk.key_id
        );
    }
    let as_map = |v: Option<&Value>| -> Option<Map<String, Value>> {
        match v {
            Some(Value::Object(m)) => Some(m.clone()),
            _ => None,
        }
    };
    for (id, json) in as_map(map.get("one_time_keys")).unwrap_or_default() {
        let id = kid(&id)?;
        let json = KeyJson::from_value(&json)?;
        let stored = now
            .one_time_keys
            .iter()
            .any(|o| o.key_id == id && o.key_json.digest() == json.digest());
        let remembered = was.issued.get(&id.algorithm()).is_some_and(|v| {
            v.iter()
                .any(|i| i.key_id == id && i.digest == json.digest())
        });
        ensure!(
            stored || remembered,
            "uploaded OTK {id} is neither stored nor a remembered issued key"
        );
        ensure!(
            !(stored && remembered),
            "uploaded OTK {id} was stored although it was issued and remembered (R3.4)"
        );
    }
    let fallbacks = match map.get("fallback_keys") {
        Some(Value::Null) | None => as_map(map.get("org.matrix.msc2732.fallback_keys")),
        stable => as_map(stable),
    };
    for (id, json) in fallbacks.unwrap_or_default() {
        let id = kid(&id)?;
        let json = KeyJson::from_value(&json)?;
        let stored = now.fallback_keys.get(&id.algorithm());
        ensure!(
            stored.is_some_and(|f| f.key_json.digest() == json.digest()),
            "uploaded fallback key {id} is not the stored fallback key of its algorithm"
        );
    }
    Ok(())
}

/// Checks one `wire_claim` input: `body` as a `POST /keys/claim` body.
///
/// # Errors
/// The first broken promise found.
pub fn check_claim(body: &[u8]) -> Result<(), Violation> {
    block_on(check_claim_async(body))?
}

async fn check_claim_async(body: &[u8]) -> Result<(), Violation> {
    let store = populated_store().await?;
    let api = KeysApi::new(store.clone());
    let before = snapshot_all(&*store).await?;
    let result = api.claim(body).await;
    let after = snapshot_all(&*store).await?;
    match result {
        Err(err) => check_error(&err, &before, &after)?,
        Ok(answer) => check_claim_answer(body, &answer, &before, &after)?,
    }
    check_sound(&store).await
}

/// The independent oracle for a successful claim.
fn check_claim_answer(
    body: &[u8],
    answer: &Value,
    before: &[DeviceSnapshot],
    after: &[DeviceSnapshot],
) -> Result<(), Violation> {
    let Value::Object(answer_map) = answer else {
        return Err(Violation::new("claim answer is not an object"));
    };
    ensure!(
        answer_map.len() == 2 && answer_map.get("failures") == Some(&json!({})),
        "claim answer has other fields than `one_time_keys` and an empty `failures`: {answer}"
    );
    let Some(Value::Object(users)) = answer_map.get("one_time_keys") else {
        return Err(Violation(format!(
            "claim answer has no `one_time_keys` object: {answer}"
        )));
    };
    // What the answer hands out, per device: (key ID, JSON).
    let mut handed: BTreeMap<Device, (KeyId, Value)> = BTreeMap::new();
    for (user, devices) in users {
        let Value::Object(devices) = devices else {
            return Err(Violation(format!("answer for {user} is not an object")));
        };
        ensure!(!devices.is_empty(), "empty device map for {user} (R4.6)");
        for (dev_id, keys) in devices {
            let Value::Object(keys) = keys else {
                return Err(Violation(format!(
                    "answer for {user}/{dev_id} is not an object"
                )));
            };
            ensure!(
                keys.len() == 1,
                "{user}/{dev_id} got {} keys for a one-key wire claim",
                keys.len()
            );
            for (id, json) in keys {
                handed.insert(device(user, dev_id)?, (kid(id)?, json.clone()));
            }
        }
    }
    // Every key handed out was the device's and is now gone or used.
    let empty_of = |d: &Device| DeviceSnapshot::empty(d.clone());
    for (dev, (id, json)) in &handed {
        let empty = empty_of(dev);
        let was = find(before, dev).unwrap_or(&empty);
        let now = find(after, dev).unwrap_or(&empty);
        if let Some(otk) = was.one_time_keys.iter().find(|o| &o.key_id == id) {
            ensure!(
                &otk.key_json.to_value() == json,
                "claimed {id} of {dev} does not carry its stored JSON (R2.5)"
            );
            ensure!(
                !now.one_time_keys.iter().any(|o| &o.key_id == id),
                "claimed OTK {id} of {dev} is still stored (R4.2)"
            );
            // It was the oldest of its algorithm.
            let oldest = was
                .one_time_keys
                .iter()
                .find(|o| o.key_id.algorithm() == id.algorithm());
            ensure!(
                oldest.is_some_and(|o| &o.key_id == id),
                "claimed OTK {id} of {dev} is not the oldest of its algorithm (R4.2)"
            );
        } else if let Some(fb) = was.fallback_keys.get(&id.algorithm()) {
            ensure!(
                &fb.key_id == id && &fb.key_json.to_value() == json,
                "claimed fallback {id} of {dev} is not its stored fallback key"
            );
            ensure!(
                !was.one_time_keys
                    .iter()
                    .any(|o| o.key_id.algorithm() == id.algorithm()),
                "fallback {id} of {dev} handed out while OTKs of its algorithm remain (R4.3)"
            );
            ensure!(
                now.fallback_keys
                    .get(&id.algorithm())
                    .is_some_and(|f| f.used),
                "claimed fallback {id} of {dev} is not marked used (R4.4)"
            );
        } else {
            return Err(Violation(format!(
                "claim handed out {id} for {dev}, which that device did not hold"
            )));
        }
    }
    // Nothing else changed: apply the answer to `before` and compare.
    let mut expected: Vec<DeviceSnapshot> = Vec::new();
    for snap in before {
        let mut s = snap.clone();
        if let Some((id, _)) = handed.get(&s.device) {
            if let Some(pos) = s.one_time_keys.iter().position(|o| &o.key_id == id) {
                let otk = s.one_time_keys.remove(pos);
                s.issued
                    .entry(id.algorithm())
                    .or_default()
                    .push(keyclaim::transfer::IssuedKey {
                        key_id: otk.key_id,
                        digest: otk.key_json.digest(),
                    });
            } else if let Some(fb) = s.fallback_keys.get_mut(&id.algorithm()) {
                fb.used = true;
            }
        }
        expected.push(s.normalized());
    }
    ensure!(
        expected == after,
        "the claim changed more than the keys it handed out"
    );
    // No under-issue: every wire target that had something got something.
    for target in claim_targets(body)? {
        let (dev, alg) = (&target.device, &target.algorithm);
        let had = find(before, dev).is_some_and(|s| {
            s.fallback_keys.contains_key(alg)
                || s.one_time_keys.iter().any(|o| &o.key_id.algorithm() == alg)
        });
        let got = handed
            .get(dev)
            .is_some_and(|(id, _)| &id.algorithm() == alg);
        ensure!(
            had == got,
            "target {dev} {alg}: had a key to hand out: {had}, got one: {got}"
        );
    }
    Ok(())
}

/// The targets of a claim body the facade accepted: one key per (user,
/// device); an algorithm string that is no valid algorithm matches nothing.
pub(crate) fn claim_targets(body: &[u8]) -> Result<Vec<ClaimTarget>, Violation> {
    let map = match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => map,
        _ => {
            return Err(Violation::new(
                "claim succeeded on a body that is no JSON object",
            ));
        }
    };
    let mut targets = Vec::new();
    let Some(Value::Object(users)) = map.get("one_time_keys") else {
        return Ok(targets);
    };
    for (user, devices) in users {
        let Value::Object(devices) = devices else {
            return Err(Violation::new(
                "claim succeeded with a non-object device map",
            ));
        };
        for (device, algorithm) in devices {
            let Value::String(algorithm) = algorithm else {
                return Err(Violation::new(
                    "claim succeeded with a non-string algorithm",
                ));
            };
            if let Ok(algorithm) = Algorithm::parse(algorithm.as_str()) {
                targets.push(ClaimTarget::one(Device::parse(user, device)?, algorithm));
            }
        }
    }
    Ok(targets)
}
