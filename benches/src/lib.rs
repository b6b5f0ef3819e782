//! Shared workload pieces for the criterion benches: devices, keys and
//! uploads built the same way for every backend.

use keyclaim::{Device, KeyId, KeyJson, Result, Upload};
use serde_json::json;

/// The device `@user<i>:bench` / `DEV`.
///
/// # Errors
/// Never for the IDs built here; typed for the `?` of callers.
pub fn device(i: usize) -> Result<Device> {
    Device::parse(&format!("@user{i}:bench"), "DEV")
}

/// An upload of `n` signed OTKs named `<prefix><j>` plus, if `fallback`, a
/// fallback key, shaped like a real client's (about 200 bytes a key).
///
/// # Errors
/// Never for the keys built here.
pub fn upload(device: &Device, prefix: &str, n: usize, fallback: bool) -> Result<Upload> {
    let key = |name: &str, fb: bool| -> Result<(KeyId, KeyJson)> {
        let mut v = json!({
            "key": format!("{name:0>43}"),
            "signatures": {device.user_id.as_str(): {format!("ed25519:{}", device.device_id): "s".repeat(86)}},
        });
        if fb {
            v["fallback"] = json!(true);
        }
        Ok((
            KeyId::parse(format!("signed_curve25519:{name}"))?,
            KeyJson::from_value(&v)?,
        ))
    };
    let otks = (0..n)
        .map(|j| key(&format!("{prefix}{j:08}"), false))
        .collect::<Result<Vec<_>>>()?;
    let fallbacks = if fallback {
        vec![key(&format!("{prefix}FB"), true)?]
    } else {
        vec![]
    };
    Upload::from_keys(device.clone(), otks, fallbacks)
}
