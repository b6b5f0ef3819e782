//! The split claim (R12.4) against the one-step claim of the same targets,
//! through the facade, for one big-room request in which one device in ten
//! has no one-time key left (only its fallback key): the split claim as an
//! application-service homeserver runs it (store, provider, fallback keys
//! for the targets still without a key), and with
//! `always_include_fallback_keys` (every target's fallback key as well, so
//! twice the keys in the answer). The three run in turn, round after round,
//! so that all see the same store.

use std::sync::Arc;
use std::time::Instant;

use keyclaim::{BoxError, ClaimOptions, ClaimTarget, ClaimedKey, KeyStore, KeysApi, OtkProvider};
use serde::Serialize;

use super::stats::{Samples, Summary};
use super::workload::{device, fill};

/// Rounds of each kind.
const ROUNDS: usize = 15;

/// The claims' latencies.
#[derive(Debug, Default, Serialize, Clone)]
pub(crate) struct SplitReport {
    pub(crate) devices: usize,
    pub(crate) one_step: Summary,
    pub(crate) split: Summary,
    pub(crate) always_include: Summary,
}

impl SplitReport {
    /// A variant's p50 over the one-step claim's p50.
    pub(crate) fn ratio(&self, variant: &Summary) -> f64 {
        if self.one_step.p50_ms > 0.0 {
            variant.p50_ms / self.one_step.p50_ms
        } else {
            0.0
        }
    }
}

/// An application service with no keys to give, answering at once.
#[derive(Debug)]
struct NoKeys;

#[keyclaim::async_trait]
impl OtkProvider for NoKeys {
    async fn claim_one_time_keys(&self, _: &[ClaimTarget]) -> Result<Vec<ClaimedKey>, BoxError> {
        Ok(Vec::new())
    }
}

/// Claims one key from each of `devices` fresh devices per round, one-step
/// and split in turn.
pub(crate) async fn run(
    store: &Arc<dyn KeyStore>,
    devices: usize,
    clients: usize,
) -> keyclaim::Result<SplitReport> {
    let misses = devices / 10;
    let with_keys = devices - misses;
    fill(store, "split-", with_keys, 3 * ROUNDS + 3, clients, || {}).await?;
    fill(store, "split-miss-", misses, 0, clients, || {}).await?;
    let mut users = serde_json::Map::new();
    let named = (0..with_keys)
        .map(|i| device("split-", i))
        .chain((0..misses).map(|i| device("split-miss-", i)));
    for d in named {
        let d = d?;
        users.insert(
            d.user_id.as_str().to_owned(),
            serde_json::json!({ d.device_id.as_str(): "signed_curve25519" }),
        );
    }
    let body = serde_json::to_vec(&serde_json::json!({ "one_time_keys": users }))
        .map_err(|e| keyclaim::Error::bad_request(e.to_string()))?;
    let api = KeysApi::new(store.clone());
    let split = ClaimOptions::default().provider(Arc::new(NoKeys));
    let always = ClaimOptions::default().always_include_fallback_keys(true);
    let mut samples = [Samples::default(), Samples::default(), Samples::default()];
    // One unmeasured round of each first (caches, statement preparation).
    for round in 0..=ROUNDS {
        for (i, options) in [None, Some(&split), Some(&always)].into_iter().enumerate() {
            let t0 = Instant::now();
            match options {
                None => api.claim(&body).await,
                Some(options) => api.claim_with(&body, options).await,
            }
            .map_err(api_error)?;
            if round > 0 {
                samples[i].record(t0.elapsed());
            }
        }
    }
    let [one_step, split, always_include] = samples.map(|s| s.summary(std::time::Duration::ZERO));
    Ok(SplitReport {
        devices,
        one_step,
        split,
        always_include,
    })
}

fn api_error(e: keyclaim::ApiError) -> keyclaim::Error {
    match e.store_error() {
        Some(_) => keyclaim::Error::storage("bench", "claim", false, e),
        None => keyclaim::Error::bad_request(e.to_string()),
    }
}
