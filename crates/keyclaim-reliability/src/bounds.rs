//! Resource-bound cases: hostile requests that the limits of contract
//! section 8 (R8.1 to R8.4) must refuse quickly and with bounded memory,
//! and the hostile bodies of the newer endpoints ([`crate::hostile`], whose
//! answers this crate's tests check).
//!
//! Each case builds its input first, then resets the process's peak-RSS mark
//! (`/proc/self/clear_refs`, value 5) and serves the request through
//! [`KeysApi`] (or the store API) over a memory store. The figure reported is
//! the growth of the peak RSS during the call alone (`VmHWM` after the call
//! minus `VmRSS` before it), so the input's own size is not counted. The
//! `bounds` binary runs each case in its own process; these are benchmark
//! figures to record, not assertions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyclaim::{Algorithm, ClaimTarget, Device, KeyId, KeyJson, KeyStore, KeysApi, Limits, Upload};
use keyclaim_memory::MemoryStore;
use serde_json::json;

use crate::util::{Violation, block_on};

/// What one case did.
#[derive(Debug, Clone)]
pub struct BoundsReport {
    /// The case's name.
    pub case: &'static str,
    /// The size of the request (body bytes, or keys/targets for store calls).
    pub input: String,
    /// `status errcode`, or `ok` / `ok: N keys` when the request was served.
    pub outcome: String,
    /// Wall time of the call alone.
    pub elapsed: Duration,
    /// Peak RSS growth during the call, in KiB (`None` where `/proc` is missing).
    pub peak_growth_kib: Option<u64>,
    /// RSS before the call (the input included), in KiB.
    pub rss_before_kib: Option<u64>,
}

/// The names of the cases of this module, in the order the `bounds` binary
/// runs them; [`all_cases`] adds those of [`crate::hostile`].
pub const CASES: [&str; 13] = [
    "huge_body_64mib",
    "deep_nesting_body",
    "deep_nesting_in_key",
    "million_tiny_keys_body",
    "max_tiny_keys_in_1mib",
    "million_keys_store_api",
    "claim_million_targets_body",
    "claim_targets_in_1mib",
    "claim_100001_targets_16mib_limit",
    "claim_million_targets_store_api",
    "enormous_user_id_10mib",
    "enormous_key_id_in_body",
    "small_objects_1mib",
];

/// Every case the `bounds` binary runs: [`CASES`], then the hostile bodies
/// of the newer endpoints ([`crate::hostile::CASES`]).
pub fn all_cases() -> Vec<&'static str> {
    CASES
        .iter()
        .copied()
        .chain(crate::hostile::CASES.iter().map(|c| c.name))
        .collect()
}

fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn api_outcome(r: &Result<serde_json::Value, keyclaim::ApiError>) -> String {
    match r {
        Ok(v) => {
            let keys = v
                .get("one_time_keys")
                .and_then(|k| k.as_object())
                .map_or(0, serde_json::Map::len);
            format!("200 ok ({keys} users in answer)")
        }
        Err(e) => format!("{} {}", e.status(), e.errcode()),
    }
}

/// Runs one case by name.
///
/// # Errors
/// An unknown case name, or a failure building the input.
pub fn run_case(case: &str) -> Result<BoundsReport, Violation> {
    block_on(run_case_async(case))?
}

/// A case's call: the outcome, and the input handed back so that dropping
/// it is not timed.
type Call = std::pin::Pin<Box<dyn std::future::Future<Output = (String, Box<dyn std::any::Any>)>>>;

struct Prepared {
    name: &'static str,
    input: String,
    call: Call,
}

fn tiny_keys_body(n: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(n * 16 + 32);
    body.extend_from_slice(br#"{"one_time_keys":{"#);
    for i in 0..n {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(format!("\"a:{i}\":\"\"").as_bytes());
    }
    body.extend_from_slice(b"}}");
    body
}

fn claim_body(n: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(n * 24 + 32);
    body.extend_from_slice(br#"{"one_time_keys":{"#);
    for i in 0..n {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(format!("\"@{i}:x\":{{\"D\":\"a\"}}").as_bytes());
    }
    body.extend_from_slice(b"}}");
    body
}

fn bytes_of(b: &[u8]) -> String {
    format!("{} bytes", b.len())
}

async fn run_case_async(case: &str) -> Result<BoundsReport, Violation> {
    let store = Arc::new(MemoryStore::new());
    let api = KeysApi::new(store.clone());
    let u = "@alice:example.org";
    let d = "ALICEDEV";
    let prepared = match case {
        "huge_body_64mib" => {
            let mut body = Vec::with_capacity(64 << 20);
            body.extend_from_slice(br#"{"one_time_keys":{"a:b":""#);
            body.resize((64 << 20) - 3, b'x');
            body.extend_from_slice(br#""}}"#);
            let input = bytes_of(&body);
            let api = api.clone();
            Prepared {
                name: "huge_body_64mib",
                input,
                call: Box::pin(async move {
                    let o = api_outcome(&api.upload(u, d, &body).await);
                    (o, Box::new(body) as Box<dyn std::any::Any>)
                }),
            }
        }
        "deep_nesting_body" => {
            let half = (1 << 20) / 2 - 1;
            let mut body = Vec::with_capacity(half * 2);
            body.resize(half, b'[');
            body.resize(half * 2, b']');
            let input = bytes_of(&body);
            let api = api.clone();
            Prepared {
                name: "deep_nesting_body",
                input,
                call: Box::pin(async move {
                    let o = api_outcome(&api.upload(u, d, &body).await);
                    (o, Box::new(body) as Box<dyn std::any::Any>)
                }),
            }
        }
        "deep_nesting_in_key" => {
            // Deeper than the key JSON limit (32), within serde_json's (128).
            let body = format!(
                r#"{{"one_time_keys":{{"a:b":{{"key":"k","signatures":{{}},"x":{}{}}}}}}}"#,
                "[".repeat(120),
                "]".repeat(120)
            )
            .into_bytes();
            let input = bytes_of(&body);
            let api = api.clone();
            Prepared {
                name: "deep_nesting_in_key",
                input,
                call: Box::pin(async move {
                    let o = api_outcome(&api.upload(u, d, &body).await);
                    (o, Box::new(body) as Box<dyn std::any::Any>)
                }),
            }
        }
        "million_tiny_keys_body" => {
            let body = tiny_keys_body(1_000_000);
            let input = bytes_of(&body);
            let api = api.clone();
            Prepared {
                name: "million_tiny_keys_body",
                input,
                call: Box::pin(async move {
                    let o = api_outcome(&api.upload(u, d, &body).await);
                    (o, Box::new(body) as Box<dyn std::any::Any>)
                }),
            }
        }
        "max_tiny_keys_in_1mib" => {
            // As many keys as fit in the body limit: parsed, then refused.
            let mut n = 60_000;
            while tiny_keys_body(n + 1000).len() < (1 << 20) {
                n += 1000;
            }
            let body = tiny_keys_body(n);
            let input = format!("{} bytes, {n} keys", body.len());
            let api = api.clone();
            Prepared {
                name: "max_tiny_keys_in_1mib",
                input,
                call: Box::pin(async move {
                    let o = api_outcome(&api.upload(u, d, &body).await);
                    (o, Box::new(body) as Box<dyn std::any::Any>)
                }),
            }
        }
        "million_keys_store_api" => {
            let dev = Device::parse(u, d)?;
            let json = KeyJson::from_value(&json!(""))?;
            let keys = (0..1_000_000)
                .map(|i| Ok((KeyId::parse(format!("a:{i}"))?, json.clone())))
                .collect::<keyclaim::Result<Vec<_>>>()?;
            let upload = Upload::from_keys(dev, keys, [])?;
            let store = store.clone();
            Prepared {
                name: "million_keys_store_api",
                input: "1000000 keys (Upload)".to_owned(),
                call: Box::pin(async move {
                    let o = match store.upload(&upload).await {
                        Ok(_) => "ok".to_owned(),
                        Err(e) => keyclaim::ApiError::from(e).errcode().to_owned(),
                    };
                    (o, Box::new(upload) as Box<dyn std::any::Any>)
                }),
            }
        }
        "claim_million_targets_body" => {
            let body = claim_body(1_000_000);
            let input = bytes_of(&body);
            let api = api.clone();
            Prepared {
                name: "claim_million_targets_body",
                input,
                call: Box::pin(async move {
                    let o = api_outcome(&api.claim(&body).await);
                    (o, Box::new(body) as Box<dyn std::any::Any>)
                }),
            }
        }
        "claim_targets_in_1mib" => {
            // As many targets as fit in the body limit: under the target
            // limit, so served (each matches nothing).
            let mut n = 40_000;
            while claim_body(n + 1000).len() < (1 << 20) {
                n += 1000;
            }
            let body = claim_body(n);
            let input = format!("{} bytes, {n} targets", body.len());
            let api = api.clone();
            Prepared {
                name: "claim_targets_in_1mib",
                input,
                call: Box::pin(async move {
                    let o = api_outcome(&api.claim(&body).await);
                    (o, Box::new(body) as Box<dyn std::any::Any>)
                }),
            }
        }
        "claim_100001_targets_16mib_limit" => {
            let mut limits = Limits::default();
            limits.max_body_bytes = 16 << 20;
            let api = KeysApi::new(store.clone()).with_limits(limits);
            let body = claim_body(100_001);
            let input = format!("{} bytes, 100001 targets", body.len());
            Prepared {
                name: "claim_100001_targets_16mib_limit",
                input,
                call: Box::pin(async move {
                    let o = api_outcome(&api.claim(&body).await);
                    (o, Box::new(body) as Box<dyn std::any::Any>)
                }),
            }
        }
        "claim_million_targets_store_api" => {
            let alg = Algorithm::parse("a")?;
            let targets = (0..1_000_000)
                .map(|i| {
                    Ok(ClaimTarget::one(
                        Device::parse(&format!("@{i}:x"), "D")?,
                        alg.clone(),
                    ))
                })
                .collect::<Result<Vec<_>, Violation>>()?;
            let store = store.clone();
            Prepared {
                name: "claim_million_targets_store_api",
                input: "1000000 targets (ClaimTarget)".to_owned(),
                call: Box::pin(async move {
                    let o = match store.claim(&targets).await {
                        Ok(o) => format!("ok: {} keys", o.keys.len()),
                        Err(e) => keyclaim::ApiError::from(e).errcode().to_owned(),
                    };
                    (o, Box::new(targets) as Box<dyn std::any::Any>)
                }),
            }
        }
        "enormous_user_id_10mib" => {
            let user = format!("@{}:x", "u".repeat(10 << 20));
            let input = format!("user ID of {} bytes", user.len());
            let api = api.clone();
            Prepared {
                name: "enormous_user_id_10mib",
                input,
                call: Box::pin(async move {
                    let o = api_outcome(&api.upload(&user, d, b"{}").await);
                    (o, Box::new(user) as Box<dyn std::any::Any>)
                }),
            }
        }
        "enormous_key_id_in_body" => {
            let name = "n".repeat((1 << 20) - 64);
            let body = format!(r#"{{"one_time_keys":{{"a:{name}":"k"}}}}"#).into_bytes();
            let input = bytes_of(&body);
            let api = api.clone();
            Prepared {
                name: "enormous_key_id_in_body",
                input,
                call: Box::pin(async move {
                    let o = api_outcome(&api.upload(u, d, &body).await);
                    (o, Box::new(body) as Box<dyn std::any::Any>)
                }),
            }
        }
        "small_objects_1mib" => {
            // The worst parse amplification found: many one-member objects
            // under an ignored field, each a B-tree node once parsed.
            let n = (1 << 20) / 8 - 4;
            let mut body = Vec::with_capacity(n * 8 + 16);
            body.extend_from_slice(br#"{"x":["#);
            for i in 0..n {
                if i > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(br#"{"a":1}"#);
            }
            body.extend_from_slice(b"]}");
            let input = format!("{} bytes, {n} objects", body.len());
            let api = api.clone();
            Prepared {
                name: "small_objects_1mib",
                input,
                call: Box::pin(async move {
                    let o = api_outcome(&api.upload(u, d, &body).await);
                    (o, Box::new(body) as Box<dyn std::any::Any>)
                }),
            }
        }
        other => {
            let Some(case) = crate::hostile::find(other) else {
                return Err(Violation(format!("unknown case {other}")));
            };
            let body = (case.body)();
            let input = bytes_of(&body);
            let api = crate::hostile::api(case, store.clone());
            Prepared {
                name: case.name,
                input,
                call: Box::pin(async move {
                    let o = api_outcome(&crate::hostile::serve(&api, case.endpoint, &body).await);
                    (o, Box::new(body) as Box<dyn std::any::Any>)
                }),
            }
        }
    };
    let measured = reset_peak();
    let rss_before = status_kib("VmRSS:");
    let start = Instant::now();
    let (outcome, input) = prepared.call.await;
    let elapsed = start.elapsed();
    let peak = status_kib("VmHWM:");
    drop(input);
    Ok(BoundsReport {
        case: prepared.name,
        input: prepared.input,
        outcome,
        elapsed,
        peak_growth_kib: match (measured, peak, rss_before) {
            (true, Some(p), Some(b)) => Some(p.saturating_sub(b)),
            _ => None,
        },
        rss_before_kib: rss_before,
    })
}
