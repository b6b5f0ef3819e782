//! Small builders shared by the cases (and handy in a backend's own tests).

use keyclaim::{
    Algorithm, ClaimOutcome, ClaimTarget, ClaimedKey, Device, KeyId, KeyJson, KeyStore, Limits,
    Upload, UploadOutcome,
};
use serde_json::json;

use crate::StoreFactory;

/// The usual algorithm.
pub const SC: &str = "signed_curve25519";

/// A device from strings (panics on invalid IDs: fixtures only).
pub fn dev(user: &str, device: &str) -> Device {
    Device::parse(user, device).expect("valid fixture device")
}

/// `@alice:example.org` / `ALICEDEV`.
pub fn alice() -> Device {
    dev("@alice:example.org", "ALICEDEV")
}

/// `@bob:example.org` / `BOBDEV`.
pub fn bob() -> Device {
    dev("@bob:example.org", "BOBDEV")
}

/// An algorithm from a string.
pub fn alg(name: &str) -> Algorithm {
    Algorithm::parse(name).expect("valid fixture algorithm")
}

/// A key ID from a string.
pub fn kid(id: &str) -> KeyId {
    KeyId::parse(id).expect("valid fixture key ID")
}

/// Signed key JSON whose public key is `key` and signature `sig`.
pub fn signed(key: &str, sig: &str) -> KeyJson {
    KeyJson::from_value(&json!({
        "key": key,
        "signatures": {"@alice:example.org": {"ed25519:ALICEDEV": sig}},
    }))
    .expect("valid fixture key JSON")
}

/// Signed fallback key JSON (`fallback: true`).
pub fn signed_fallback(key: &str, sig: &str) -> KeyJson {
    KeyJson::from_value(&json!({
        "key": key,
        "fallback": true,
        "signatures": {"@alice:example.org": {"ed25519:ALICEDEV": sig}},
    }))
    .expect("valid fixture key JSON")
}

/// OTKs `<alg>:<name>` with key material `k-<name>`.
pub fn otks(algorithm: &str, names: &[&str]) -> Vec<(KeyId, KeyJson)> {
    names
        .iter()
        .map(|n| {
            (
                kid(&format!("{algorithm}:{n}")),
                signed(&format!("k-{n}"), "sig"),
            )
        })
        .collect()
}

/// `n` OTKs named `<prefix>000000`, `<prefix>000001`, ...
pub fn numbered_otks(algorithm: &str, prefix: &str, n: usize) -> Vec<(KeyId, KeyJson)> {
    (0..n)
        .map(|i| {
            let name = format!("{prefix}{i:06}");
            (
                kid(&format!("{algorithm}:{name}")),
                signed(&format!("k-{name}"), "sig"),
            )
        })
        .collect()
}

/// Builds an upload (panics when the keys break R3.6: fixtures only).
pub fn upload_of(
    device: &Device,
    one_time: Vec<(KeyId, KeyJson)>,
    fallback: Vec<(KeyId, KeyJson)>,
) -> Upload {
    Upload::from_keys(device.clone(), one_time, fallback).expect("valid fixture upload")
}

/// Uploads and unwraps.
pub async fn put<S: KeyStore + ?Sized>(
    store: &S,
    device: &Device,
    one_time: Vec<(KeyId, KeyJson)>,
    fallback: Vec<(KeyId, KeyJson)>,
) -> UploadOutcome {
    store
        .upload(&upload_of(device, one_time, fallback))
        .await
        .expect("upload succeeds")
}

/// Claims one key of `algorithm` from `device`.
pub async fn claim_one<S: KeyStore + ?Sized>(
    store: &S,
    device: &Device,
    algorithm: &str,
) -> Option<ClaimedKey> {
    let out = store
        .claim(&[ClaimTarget::one(device.clone(), alg(algorithm))])
        .await
        .expect("claim succeeds");
    assert!(
        out.keys.len() <= 1,
        "one target with count 1 gave {} keys",
        out.keys.len()
    );
    out.keys.into_iter().next()
}

/// Claims `count` keys of `algorithm` from `device`.
pub async fn claim_n<S: KeyStore + ?Sized>(
    store: &S,
    device: &Device,
    algorithm: &str,
    count: u32,
) -> ClaimOutcome {
    store
        .claim(&[ClaimTarget {
            device: device.clone(),
            algorithm: alg(algorithm),
            count,
        }])
        .await
        .expect("claim succeeds")
}

/// The key IDs of claimed keys, as strings.
pub fn ids(keys: &[ClaimedKey]) -> Vec<String> {
    keys.iter().map(|k| k.key_id.to_string()).collect()
}

/// A fresh store with default limits.
pub async fn fresh<F: StoreFactory>(f: &F) -> F::Store {
    f.create(Limits::default()).await.expect("create a store")
}

/// A fresh store with the given limits.
pub async fn fresh_with<F: StoreFactory>(f: &F, limits: Limits) -> F::Store {
    f.create(limits).await.expect("create a store")
}

/// The count of `algorithm` OTKs of a device.
pub async fn count<S: KeyStore + ?Sized>(store: &S, device: &Device, algorithm: &str) -> u64 {
    store
        .otk_counts(device)
        .await
        .expect("counts succeed")
        .get_str(algorithm)
}

/// Unused fallback types of a device, as strings.
pub async fn unused<S: KeyStore + ?Sized>(store: &S, device: &Device) -> Vec<String> {
    store
        .unused_fallback_types(device)
        .await
        .expect("unused fallback types succeed")
        .into_iter()
        .map(|a| a.into_string())
        .collect()
}

/// The whole state of the store, every device, with sequence numbers
/// normalized, for before/after comparisons.
pub async fn full_state<S: KeyStore + ?Sized>(
    store: &S,
) -> Vec<keyclaim::transfer::DeviceSnapshot> {
    let mut out = Vec::new();
    let mut after: Option<Device> = None;
    loop {
        let page = store
            .export_devices(after.as_ref(), 100)
            .await
            .expect("export succeeds");
        let Some(last) = page.last() else { break };
        after = Some(last.device.clone());
        out.extend(
            page.iter()
                .map(keyclaim::transfer::DeviceSnapshot::normalized),
        );
    }
    out
}

/// Serializes a JSON value as a request body.
pub fn body(value: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&value).expect("serialize a fixture body")
}

/// Asserts that a facade call failed with the given status and errcode.
pub fn assert_api_err<T: std::fmt::Debug>(
    result: Result<T, keyclaim::ApiError>,
    status: u16,
    errcode: &str,
    context: &str,
) -> keyclaim::ApiError {
    match result {
        Ok(v) => panic!("{context}: expected {status} {errcode}, got Ok({v:?})"),
        Err(e) => {
            assert_eq!(
                (e.status(), e.errcode()),
                (status, errcode),
                "{context}: wrong error ({e})"
            );
            e
        }
    }
}

/// A signed key as wire JSON.
pub fn wire_key(key: &str) -> serde_json::Value {
    json!({"key": key, "signatures": {"@alice:example.org": {"ed25519:ALICEDEV": "sig"}}})
}

/// Starts `tasks` claimers that each claim one key of `algorithm` from
/// `device` at a time until a claim comes away empty, answering the key IDs
/// they got; [`join_distinct`] collects them.
pub fn spawn_drainers<S: KeyStore>(
    store: &std::sync::Arc<S>,
    device: &Device,
    algorithm: &str,
    tasks: usize,
) -> Vec<tokio::task::JoinHandle<Vec<String>>> {
    (0..tasks)
        .map(|_| {
            let (store, target) = (
                store.clone(),
                ClaimTarget::one(device.clone(), alg(algorithm)),
            );
            tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let out = store
                        .claim(std::slice::from_ref(&target))
                        .await
                        .expect("claim");
                    if out.keys.is_empty() {
                        return got;
                    }
                    got.extend(out.keys.into_iter().map(|k| k.key_id.to_string()));
                }
            })
        })
        .collect()
}

/// The key IDs claimers answered, asserting that none was issued twice
/// (R4.2).
pub async fn join_distinct(
    claimers: Vec<tokio::task::JoinHandle<Vec<String>>>,
) -> std::collections::BTreeSet<String> {
    let mut seen = std::collections::BTreeSet::new();
    for claimer in claimers {
        for id in claimer.await.expect("claimer") {
            assert!(seen.insert(id.clone()), "{id} issued twice");
        }
    }
    seen
}
