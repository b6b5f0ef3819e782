//! The keyclaim benchmarks' library (not published): the reference
//! homeserver's claim patterns that the stores are measured against
//! ([`baseline`]), and workload pieces shared by the benches (devices, keys
//! and uploads built the same way for every backend).
//!
//! The benches are in `benches/`: `memory`, `sqlite`, `redb` (one call at a
//! time), `sqlite_concurrency`, `redb_concurrency` and `postgres_claim`
//! (many claimers, each store against its baseline), run as
//! `cargo bench -p keyclaim-benches --bench <name>`.

pub mod baseline;

use std::str::FromStr;

use keyclaim::{Device, KeyId, KeyJson, Result, Upload};
use serde_json::json;

/// The environment variable `name` parsed as a `T` (a benchmark's knob), or
/// `default` when it is unset or does not parse.
pub fn env_or<T: FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median of `values` (the mean of the two middle ones for an even
/// count), or 0 for none.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The machine's 1, 5 and 15 minute load averages (Linux), or `?`:
/// benchmarks on a shared machine are noisy, so they print it.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned())
}

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
