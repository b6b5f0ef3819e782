//! The split claim (R12.4: one-time keys, then fallback keys for every
//! target) against the one-step claim of the same targets, through the
//! facade, for one big-room request: both on fresh devices with keys, in
//! alternating rounds so that both see the same store.

use std::sync::Arc;
use std::time::Instant;

use keyclaim::{ClaimOptions, KeyStore, KeysApi};
use serde::Serialize;

use super::stats::{Samples, Summary};
use super::workload::{device, fill};

/// Rounds of each kind.
const ROUNDS: usize = 15;

/// The two claims' latencies and their ratio.
#[derive(Debug, Default, Serialize, Clone)]
pub(crate) struct SplitReport {
    pub(crate) devices: usize,
    pub(crate) one_step: Summary,
    pub(crate) split: Summary,
}

impl SplitReport {
    /// Split claim p50 over one-step claim p50.
    pub(crate) fn ratio(&self) -> f64 {
        if self.one_step.p50_ms > 0.0 {
            self.split.p50_ms / self.one_step.p50_ms
        } else {
            0.0
        }
    }
}

/// Claims one key from each of `devices` fresh devices per round, one-step
/// and split in turn.
pub(crate) async fn run(
    store: &Arc<dyn KeyStore>,
    devices: usize,
    clients: usize,
) -> keyclaim::Result<SplitReport> {
    let keys = ROUNDS + 2;
    fill(store, "split-", devices, keys, clients, || {}).await?;
    let mut users = serde_json::Map::new();
    for i in 0..devices {
        let d = device("split-", i)?;
        users.insert(
            d.user_id.as_str().to_owned(),
            serde_json::json!({ d.device_id.as_str(): "signed_curve25519" }),
        );
    }
    let body = serde_json::to_vec(&serde_json::json!({ "one_time_keys": users }))
        .map_err(|e| keyclaim::Error::bad_request(e.to_string()))?;
    let api = KeysApi::new(store.clone());
    let options = ClaimOptions::default().always_include_fallback_keys(true);
    let (mut one_step, mut split) = (Samples::default(), Samples::default());
    // One unmeasured round of each first (caches, statement preparation).
    for round in 0..=ROUNDS {
        let t0 = Instant::now();
        api.claim(&body).await.map_err(api_error)?;
        if round > 0 {
            one_step.record(t0.elapsed());
        }
        let t0 = Instant::now();
        api.claim_with(&body, &options).await.map_err(api_error)?;
        if round > 0 {
            split.record(t0.elapsed());
        }
    }
    Ok(SplitReport {
        devices,
        one_step: one_step.summary(std::time::Duration::ZERO),
        split: split.summary(std::time::Duration::ZERO),
    })
}

fn api_error(e: keyclaim::ApiError) -> keyclaim::Error {
    match e.store_error() {
        Some(_) => keyclaim::Error::storage("bench", "claim", false, e),
        None => keyclaim::Error::bad_request(e.to_string()),
    }
}
