//! The claim with options (R12.4): one-time keys from the store, then from
//! an application-service provider, then fallback keys.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use super::{ApiError, KeysApi, claim_answer};
use crate::error::BoxError;
use crate::ids::Device;
use crate::store::KeyStore;
use crate::types::{ClaimTarget, ClaimedKey, FallbackTarget, OneTimeClaimOutcome};

/// A source of one-time keys beyond the store: the homeserver's application
/// services (MSC3983). [`KeysApi::claim_with`] asks it once per claim, for the
/// targets the store had no one-time key for.
#[async_trait]
pub trait OtkProvider: fmt::Debug + Send + Sync {
    /// Claims one-time keys for `targets` (each with its count). Keys for
    /// devices or algorithms not among the targets, and keys beyond a
    /// target's count, are dropped by the caller; the rest are passed to the
    /// client unchanged (R12.4).
    ///
    /// # Errors
    /// Any error: the claim then goes on as if the provider had no keys.
    async fn claim_one_time_keys(
        &self,
        targets: &[ClaimTarget],
    ) -> std::result::Result<Vec<ClaimedKey>, BoxError>;
}

/// Options of [`KeysApi::claim_with`] (R12.4).
///
/// ```
/// let options = keyclaim::ClaimOptions::default()
///     .always_include_fallback_keys(true)
///     .provider_timeout(std::time::Duration::from_secs(2));
/// ```
#[derive(Clone)]
pub struct ClaimOptions {
    always_include_fallback_keys: bool,
    provider: Option<Arc<dyn OtkProvider>>,
    provider_timeout: Duration,
}

impl Default for ClaimOptions {
    /// No fallback keys beside one-time keys, no provider, a provider
    /// timeout of 5 seconds.
    fn default() -> Self {
        Self {
            always_include_fallback_keys: false,
            provider: None,
            provider_timeout: Duration::from_secs(5),
        }
    }
}

impl fmt::Debug for ClaimOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClaimOptions")
            .field(
                "always_include_fallback_keys",
                &self.always_include_fallback_keys,
            )
            .field("provider", &self.provider.is_some())
            .field("provider_timeout", &self.provider_timeout)
            .finish()
    }
}

impl ClaimOptions {
    /// Returns every target's fallback key beside its one-time key, marked
    /// used only where the target got no one-time key (R12.4). Default off.
    #[must_use]
    pub fn always_include_fallback_keys(mut self, on: bool) -> Self {
        self.always_include_fallback_keys = on;
        self
    }

    /// Asks `provider` for one-time keys of the targets the store had none
    /// for, before falling back (R12.4).
    #[must_use]
    pub fn provider(mut self, provider: Arc<dyn OtkProvider>) -> Self {
        self.provider = Some(provider);
        self
    }

    /// How long the provider may take; past it, the claim goes on as if the
    /// provider had no keys. Default 5 seconds. The timer needs a Tokio
    /// runtime with its time driver enabled (`enable_all` or `enable_time`).
    #[must_use]
    pub fn provider_timeout(mut self, timeout: Duration) -> Self {
        self.provider_timeout = timeout;
        self
    }

    /// Whether fallback keys are returned beside one-time keys.
    pub fn get_always_include_fallback_keys(&self) -> bool {
        self.always_include_fallback_keys
    }

    /// The provider's timeout.
    pub fn get_provider_timeout(&self) -> Duration {
        self.provider_timeout
    }
}

impl<S: KeyStore> KeysApi<S> {
    /// Serves `POST /keys/claim` in the reference homeserver's three steps
    /// (R12.4): the store's one-time keys, then keys from the options'
    /// provider for the targets still without one, then fallback keys.
    ///
    /// Without `always_include_fallback_keys`, the fallback step runs for the
    /// targets that got a key from neither step and marks those keys used;
    /// with it, every target's fallback key is returned too, marked used only
    /// where the target got no one-time key (a one-time key and a fallback key
    /// under the same key ID: the one-time key is answered). A provider that
    /// fails or times out counts as having no keys. With default options this
    /// is [`KeysApi::claim`] (whose claim is atomic per target). The steps are
    /// separate store calls: an upload between them is seen by the later
    /// step (R12.3). Same answer shape as [`KeysApi::claim`].
    ///
    /// # Errors
    /// An [`ApiError`] per contract section 9's table; a store failure in
    /// the fallback step comes after the one-time keys were issued (they are
    /// then used up, as with any claim whose answer is lost).
    #[tracing::instrument(name = "keys_claim_with", skip_all, fields(body_len = body.len(), targets))]
    pub async fn claim_with(&self, body: &[u8], options: &ClaimOptions) -> Result<Value, ApiError> {
        let targets = self.claim_targets(body)?;
        tracing::Span::current().record("targets", targets.len());
        let keys = self.claim_targets_with(targets, options).await?;
        Ok(claim_answer(&keys))
    }

    /// The keys a claim with options hands out for `targets` (R12.4), in the
    /// order the answer is built from: fallback keys, the store's one-time
    /// keys, the provider's, so that a later key under the same key ID of a
    /// device (a one-time key) replaces an earlier one (its fallback key).
    /// The targets' number is checked by the store (R8.2). The targets are
    /// taken by value: those that ask for a fallback key become the
    /// fallback step's targets in the same allocation, and the store's list
    /// of misses is let go once the provider has had it, so a claim of many
    /// targets holds at most two lists of them at once.
    pub(crate) async fn claim_targets_with(
        &self,
        targets: Vec<ClaimTarget>,
        options: &ClaimOptions,
    ) -> Result<Vec<ClaimedKey>, ApiError> {
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        if options.provider.is_none() && !options.always_include_fallback_keys {
            return Ok(self.store.claim(&targets).await?.keys);
        }
        let OneTimeClaimOutcome {
            keys: local,
            misses,
            ..
        } = self.store.claim_one_time_keys(&targets).await?;
        let provided = match &options.provider {
            Some(provider) if !misses.is_empty() => {
                ask_provider(provider.as_ref(), &misses, options.provider_timeout).await
            }
            _ => Vec::new(),
        };
        drop(misses);
        let served: HashSet<(&Device, &str)> = local
            .iter()
            .chain(&provided)
            .map(|k| (&k.device, k.key_id.algorithm_str()))
            .collect();
        let fallback_targets: Vec<FallbackTarget> = targets
            .into_iter()
            .filter_map(|t| {
                let got_one = served.contains(&(&t.device, t.algorithm.as_str()));
                (options.always_include_fallback_keys || !got_one).then_some(FallbackTarget {
                    device: t.device,
                    algorithm: t.algorithm,
                    mark_used: !got_one,
                })
            })
            .collect();
        let fallback = if fallback_targets.is_empty() {
            Vec::new()
        } else {
            self.store
                .claim_fallback_keys(&fallback_targets)
                .await?
                .keys
        };
        Ok(fallback.into_iter().chain(local).chain(provided).collect())
    }
}

/// The provider's keys for the misses, each miss's keys up to its count;
/// nothing when it fails or takes longer than `timeout`.
async fn ask_provider(
    provider: &dyn OtkProvider,
    misses: &[ClaimTarget],
    timeout: Duration,
) -> Vec<ClaimedKey> {
    let keys = match tokio::time::timeout(timeout, provider.claim_one_time_keys(misses)).await {
        Ok(Ok(keys)) => keys,
        Ok(Err(error)) => {
            tracing::warn!(%error, "one-time key provider failed; going on without its keys");
            return Vec::new();
        }
        Err(_) => {
            tracing::warn!(
                ?timeout,
                "one-time key provider timed out; going on without its keys"
            );
            return Vec::new();
        }
    };
    let mut room: HashMap<(&Device, &str), u32> = HashMap::new();
    for miss in misses {
        *room
            .entry((&miss.device, miss.algorithm.as_str()))
            .or_insert(0) += miss.count;
    }
    let keep: Vec<bool> = keys
        .iter()
        .map(
            |key| match room.get_mut(&(&key.device, key.key_id.algorithm_str())) {
                Some(left) if *left > 0 => {
                    *left -= 1;
                    true
                }
                _ => false,
            },
        )
        .collect();
    keys.into_iter()
        .zip(keep)
        .filter(|(_, keep)| *keep)
        .map(|(key, _)| ClaimedKey {
            fallback: false,
            ..key
        })
        .collect()
}
