//! Conversions between keyclaim's types and `ruma-client-api`'s (feature
//! `ruma`), and the ruma flavour of the [`KeysApi`] facade.
//!
//! A homeserver built on ruma already has the parsed request types; it hands
//! them to [`KeysApi::upload_ruma`], [`KeysApi::claim_ruma`],
//! [`KeysApi::claim_with_ruma`], [`KeysApi::claim_v4_ruma`],
//! [`KeysApi::replace_dehydrated_device_ruma`] and [`KeysApi::sync_ruma`] and
//! gets ruma response types back, with the same validation, limits and errors
//! as the JSON facade (contract section 9).
//!
//! ruma-client-api has no types for the key reset (MSC4162), for reading
//! fallback keys (MSC4081) or for many devices' counts (MSC3202, an
//! application-service push): serve those with the JSON facade. The
//! plain conversion functions serve those that call a [`KeyStore`] directly,
//! and clients or tests that go the other way.
//!
//! The crates are re-exported as [`ruma_client_api`] and [`ruma_common`] so
//! that callers can name the exact versions keyclaim was built with.
//!
//! ```
//! # async fn demo() -> Result<(), keyclaim::ApiError> {
//! # fn store() -> std::sync::Arc<dyn keyclaim::KeyStore> { unimplemented!() }
//! use keyclaim::ruma::ruma_client_api::keys::{claim_keys, upload_keys};
//! use keyclaim::ruma::ruma_common::{device_id, user_id};
//!
//! let api = keyclaim::KeysApi::new(store());
//! let (alice, dev) = (user_id!("@alice:example.org"), device_id!("ALICEDEV"));
//! let request: upload_keys::v3::Request = upload_keys::v3::Request::new(); // from the wire
//! let response: upload_keys::v3::Response = api.upload_ruma(alice, dev, &request).await?;
//! let sync = api.sync_ruma(alice, dev).await?;
//! assert!(sync.device_unused_fallback_key_types.is_some());
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;

use js_int::UInt;
use ruma_client_api::keys::{claim_keys, upload_keys};
use ruma_client_api::sync::sync_events;
use ruma_common::encryption::OneTimeKey;
use ruma_common::serde::Raw;
use ruma_common::{OneTimeKeyAlgorithm, OwnedDeviceId, OwnedOneTimeKeyId, OwnedUserId};
use serde_json::Value;

pub use more::{
    claim_outcome_from_v4_response, claim_targets_from_v4_request, claim_v4_request,
    claim_v4_response, dehydrated_device_request, dehydrated_device_response,
    dehydrated_upload_from_request,
};
pub use ruma_client_api;
pub use ruma_common;

mod more;

use crate::api::{ApiError, KeysApi};
use crate::error::{Error, Result};
use crate::ids::{Algorithm, Device, DeviceId, KeyId, UserId};
use crate::key_json::KeyJson;
use crate::store::KeyStore;
use crate::types::{ClaimOutcome, ClaimTarget, ClaimedKey, OtkCounts, SyncState, Upload};

fn key_json_from_raw(id: &KeyId, raw: &Raw<OneTimeKey>) -> Result<KeyJson> {
    let value: Value =
        serde_json::from_str(raw.json().get()).map_err(|_| Error::InvalidKeyJson {
            key_id: Some(id.clone()),
            reason: "not JSON",
        })?;
    KeyJson::from_value(&value).map_err(|e| e.with_key_id(id))
}

fn raw_from_key_json(json: &KeyJson) -> Result<Raw<OneTimeKey>> {
    Raw::from_json_string(json.canonical().to_owned())
        .map_err(|_| Error::corrupt("stored key JSON does not parse"))
}

fn key_id_to_ruma(id: &KeyId) -> Result<OwnedOneTimeKeyId> {
    OwnedOneTimeKeyId::try_from(id.as_str())
        .map_err(|_| Error::bad_request(format!("key ID `{id}` is not a valid ruma key ID")))
}

fn user_id_to_ruma(user: &UserId) -> Result<OwnedUserId> {
    OwnedUserId::try_from(user.as_str())
        .map_err(|_| Error::bad_request(format!("user ID `{user}` is not a valid ruma user ID")))
}

/// The keyclaim [`Device`] of a ruma user ID and device ID (R2.1, R2.2).
///
/// # Errors
/// [`Error::InvalidUserId`] or [`Error::InvalidDeviceId`] (ruma accepts some
/// IDs keyclaim's limits do not, e.g. device IDs over 255 bytes).
pub fn device_from_ruma(
    user_id: &ruma_common::UserId,
    device_id: &ruma_common::DeviceId,
) -> Result<Device> {
    Device::parse(user_id.as_str(), device_id.as_str())
}

/// Builds the keyclaim [`Upload`] of a device from a ruma
/// `POST /keys/upload` request. `device_keys` is not keyclaim's concern and
/// is ignored; each key's JSON is kept as sent (R2.5).
///
/// # Errors
/// The same as the JSON facade's: [`Error::InvalidKeyId`],
/// [`Error::InvalidKeyJson`], [`Error::DuplicateFallback`] (R3.6).
pub fn upload_from_request(device: Device, request: &upload_keys::v3::Request) -> Result<Upload> {
    upload_from_key_maps(device, &request.one_time_keys, &request.fallback_keys)
}

/// The keys of a request: one-time keys and fallback keys by key ID, as
/// ruma's upload and dehydrated device requests carry them.
type KeyMap = BTreeMap<OwnedOneTimeKeyId, Raw<OneTimeKey>>;

/// An [`Upload`] of the keys in ruma's maps, validated as the JSON facade
/// validates them.
fn upload_from_key_maps(device: Device, otks: &KeyMap, fallbacks: &KeyMap) -> Result<Upload> {
    let mut upload = Upload::new(device);
    for (id, raw) in otks {
        let id = KeyId::parse(id.as_str())?;
        let json = key_json_from_raw(&id, raw)?;
        upload.add_one_time_key(id, json)?;
    }
    for (id, raw) in fallbacks {
        let id = KeyId::parse(id.as_str())?;
        let json = key_json_from_raw(&id, raw)?;
        upload.add_fallback_key(id, json)?;
    }
    Ok(upload)
}

/// An [`Upload`]'s one-time keys and fallback keys in ruma's maps.
fn key_maps_from_upload(upload: &Upload) -> Result<(KeyMap, KeyMap)> {
    let mut otks = KeyMap::new();
    for (id, json) in &upload.one_time_keys {
        otks.insert(key_id_to_ruma(id)?, raw_from_key_json(json)?);
    }
    let mut fallbacks = KeyMap::new();
    for (id, json) in upload.fallback_keys.values() {
        fallbacks.insert(key_id_to_ruma(id)?, raw_from_key_json(json)?);
    }
    Ok((otks, fallbacks))
}

/// The ruma `POST /keys/upload` request that carries an [`Upload`]'s keys
/// (no `device_keys`), e.g. for a client or a test.
///
/// # Errors
/// [`Error::BadRequest`] for a key ID that ruma does not accept.
pub fn upload_to_request(upload: &Upload) -> Result<upload_keys::v3::Request> {
    let mut request = upload_keys::v3::Request::new();
    (request.one_time_keys, request.fallback_keys) = key_maps_from_upload(upload)?;
    Ok(request)
}

/// OTK counts in ruma's shape, as `/keys/upload` and `/sync` carry them
/// (R6.1: zero counts left out, except `signed_curve25519`, always present).
/// Counts above 2^53 - 1 (never reached: R8.1) saturate.
pub fn counts_to_ruma(counts: &OtkCounts) -> BTreeMap<OneTimeKeyAlgorithm, UInt> {
    let mut map = BTreeMap::new();
    map.insert(OneTimeKeyAlgorithm::SignedCurve25519, UInt::MIN);
    for (algorithm, n) in &counts.0 {
        if *n > 0 {
            map.insert(
                OneTimeKeyAlgorithm::from(algorithm.as_str()),
                UInt::new_saturating(*n),
            );
        }
    }
    map
}

/// OTK counts from ruma's shape, e.g. as a client reads them.
///
/// # Errors
/// [`Error::InvalidKeyId`] for an algorithm name keyclaim does not accept.
pub fn counts_from_ruma(counts: &BTreeMap<OneTimeKeyAlgorithm, UInt>) -> Result<OtkCounts> {
    counts
        .iter()
        .filter(|(_, n)| **n > UInt::MIN)
        .map(|(algorithm, n)| Ok((Algorithm::parse(algorithm.as_str())?, u64::from(*n))))
        .collect::<Result<_>>()
        .map(OtkCounts)
}

/// The ruma `POST /keys/upload` response for the counts after an upload (R3.8).
pub fn upload_response(counts: &OtkCounts) -> upload_keys::v3::Response {
    upload_keys::v3::Response::new(counts_to_ruma(counts))
}

/// The claim targets of a ruma `POST /keys/claim` request, one key each.
/// As in the JSON facade, an algorithm keyclaim does not accept (e.g. one
/// with a `:`) matches nothing (R4.6) and is left out.
///
/// # Errors
/// [`Error::InvalidUserId`] or [`Error::InvalidDeviceId`].
pub fn claim_targets_from_request(request: &claim_keys::v3::Request) -> Result<Vec<ClaimTarget>> {
    let mut targets = Vec::new();
    for (user, devices) in &request.one_time_keys {
        let user = UserId::parse(user.as_str())?;
        for (device, algorithm) in devices {
            let device = Device::new(user.clone(), DeviceId::parse(device.as_str())?);
            if let Ok(algorithm) = Algorithm::parse(algorithm.as_str()) {
                targets.push(ClaimTarget::one(device, algorithm));
            }
        }
    }
    Ok(targets)
}

/// The ruma `POST /keys/claim` request for targets (their counts are not
/// part of the wire form: one key each), e.g. for a client or a test.
///
/// # Errors
/// [`Error::BadRequest`] for a user ID that ruma does not accept.
pub fn claim_request(targets: &[ClaimTarget]) -> Result<claim_keys::v3::Request> {
    let mut one_time_keys: BTreeMap<OwnedUserId, BTreeMap<OwnedDeviceId, OneTimeKeyAlgorithm>> =
        BTreeMap::new();
    for target in targets {
        one_time_keys
            .entry(user_id_to_ruma(&target.device.user_id)?)
            .or_default()
            .insert(
                OwnedDeviceId::from(target.device.device_id.as_str()),
                OneTimeKeyAlgorithm::from(target.algorithm.as_str()),
            );
    }
    Ok(claim_keys::v3::Request::new(one_time_keys))
}

/// The ruma `POST /keys/claim` response for a claim's keys, with empty
/// `failures`. Key JSON is handed over as stored (R2.5).
///
/// # Errors
/// [`Error::BadRequest`] for a user ID or key ID that ruma does not accept
/// (keyclaim's IDs are checked more loosely than ruma's in places).
pub fn claim_response(outcome: &ClaimOutcome) -> Result<claim_keys::v3::Response> {
    Ok(claim_keys::v3::Response::new(one_time_keys_of(
        &outcome.keys,
    )?))
}

/// Keys by user, device and key ID, as claim responses carry them; a later
/// key under the same key ID of a device replaces an earlier one.
type ClaimedKeys = BTreeMap<OwnedUserId, claim_keys::v3::OneTimeKeys>;

fn one_time_keys_of(keys: &[ClaimedKey]) -> Result<ClaimedKeys> {
    let mut one_time_keys = ClaimedKeys::new();
    for key in keys {
        one_time_keys
            .entry(user_id_to_ruma(&key.device.user_id)?)
            .or_default()
            .entry(OwnedDeviceId::from(key.device.device_id.as_str()))
            .or_default()
            .insert(
                key_id_to_ruma(&key.key_id)?,
                raw_from_key_json(&key.key_json)?,
            );
    }
    Ok(one_time_keys)
}

/// The keys of a ruma `POST /keys/claim` response as a [`ClaimOutcome`]
/// (with no [`Changes`](crate::Changes): a response does not say), e.g. for a
/// client or a test. A key counts as a fallback key when its JSON says
/// `"fallback": true`.
///
/// # Errors
/// Invalid IDs or key JSON, as for an upload.
pub fn claim_outcome_from_response(response: &claim_keys::v3::Response) -> Result<ClaimOutcome> {
    outcome_from_one_time_keys(&response.one_time_keys)
}

fn outcome_from_one_time_keys(one_time_keys: &ClaimedKeys) -> Result<ClaimOutcome> {
    let mut keys = Vec::new();
    for (user, devices) in one_time_keys {
        let user = UserId::parse(user.as_str())?;
        for (device, device_keys) in devices {
            let device = Device::new(user.clone(), DeviceId::parse(device.as_str())?);
            for (id, raw) in device_keys {
                let key_id = KeyId::parse(id.as_str())?;
                let key_json = key_json_from_raw(&key_id, raw)?;
                let fallback = key_json.to_value().get("fallback") == Some(&Value::Bool(true));
                keys.push(ClaimedKey {
                    device: device.clone(),
                    key_id,
                    key_json,
                    fallback,
                });
            }
        }
    }
    Ok(ClaimOutcome {
        keys,
        changes: Default::default(),
    })
}

/// The E2EE key fields of a ruma `/sync` response (section 6).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncFields {
    /// `device_one_time_keys_count` (R6.1).
    pub device_one_time_keys_count: BTreeMap<OneTimeKeyAlgorithm, UInt>,
    /// `device_unused_fallback_key_types`: always `Some` when built from a
    /// [`SyncState`] (R6.3), since its presence is what tells clients that
    /// the server supports fallback keys.
    pub device_unused_fallback_key_types: Option<Vec<OneTimeKeyAlgorithm>>,
}

impl SyncFields {
    /// Writes the fields into a ruma `/sync` response.
    pub fn apply_to(&self, response: &mut sync_events::v3::Response) {
        response
            .device_one_time_keys_count
            .clone_from(&self.device_one_time_keys_count);
        response
            .device_unused_fallback_key_types
            .clone_from(&self.device_unused_fallback_key_types);
    }

    /// Reads the fields of a ruma `/sync` response.
    pub fn from_response(response: &sync_events::v3::Response) -> Self {
        Self {
            device_one_time_keys_count: response.device_one_time_keys_count.clone(),
            device_unused_fallback_key_types: response.device_unused_fallback_key_types.clone(),
        }
    }

    /// The [`SyncState`] these fields describe. An absent
    /// `device_unused_fallback_key_types` reads as no unused fallback key.
    ///
    /// # Errors
    /// [`Error::InvalidKeyId`] for an algorithm keyclaim does not accept.
    pub fn to_sync_state(&self) -> Result<SyncState> {
        let mut unused = self
            .device_unused_fallback_key_types
            .iter()
            .flatten()
            .map(|a| Algorithm::parse(a.as_str()))
            .collect::<Result<Vec<_>>>()?;
        unused.sort();
        unused.dedup();
        Ok(SyncState {
            one_time_key_counts: counts_from_ruma(&self.device_one_time_keys_count)?,
            unused_fallback_key_types: unused,
        })
    }
}

impl From<&SyncState> for SyncFields {
    fn from(state: &SyncState) -> Self {
        Self {
            device_one_time_keys_count: counts_to_ruma(&state.one_time_key_counts),
            device_unused_fallback_key_types: Some(
                state
                    .unused_fallback_key_types
                    .iter()
                    .map(|a| OneTimeKeyAlgorithm::from(a.as_str()))
                    .collect(),
            ),
        }
    }
}

/// The ruma flavour of the facade: ruma requests in, ruma responses out, with
/// the JSON facade's validation, limits and [`ApiError`]s.
impl<S: KeyStore> KeysApi<S> {
    /// Serves a parsed `POST /keys/upload` for an authenticated device, like
    /// [`KeysApi::upload`].
    ///
    /// # Errors
    /// An [`ApiError`] per contract section 9's table; nothing is stored then.
    pub async fn upload_ruma(
        &self,
        user_id: &ruma_common::UserId,
        device_id: &ruma_common::DeviceId,
        request: &upload_keys::v3::Request,
    ) -> Result<upload_keys::v3::Response, ApiError> {
        let device = device_from_ruma(user_id, device_id)?;
        let upload = upload_from_request(device, request)?;
        self.limits().check_upload(&upload)?;
        let outcome = self.store().upload(&upload).await?;
        Ok(upload_response(&outcome.counts))
    }

    /// Serves a parsed `POST /keys/claim`, like [`KeysApi::claim`].
    ///
    /// # Errors
    /// An [`ApiError`] per contract section 9's table; nothing is consumed then.
    pub async fn claim_ruma(
        &self,
        request: &claim_keys::v3::Request,
    ) -> Result<claim_keys::v3::Response, ApiError> {
        let targets = claim_targets_from_request(request)?;
        self.limits().check_claim(&targets)?;
        let outcome = if targets.is_empty() {
            ClaimOutcome::default()
        } else {
            self.store().claim(&targets).await?
        };
        Ok(claim_response(&outcome)?)
    }

    /// The E2EE key fields of `/sync` for a device, like [`KeysApi::sync`];
    /// [`SyncFields::apply_to`] writes them into a ruma sync response.
    ///
    /// # Errors
    /// 400 `M_INVALID_PARAM` for bad IDs, 500 `M_UNKNOWN` for storage failures.
    pub async fn sync_ruma(
        &self,
        user_id: &ruma_common::UserId,
        device_id: &ruma_common::DeviceId,
    ) -> Result<SyncFields, ApiError> {
        let device = device_from_ruma(user_id, device_id)?;
        let state = self.store().sync_state(&device).await?;
        Ok(SyncFields::from(&state))
    }
}
