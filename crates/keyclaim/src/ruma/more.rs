//! The ruma types of the endpoints around claims that ruma-client-api has:
//! MSC3814's `PUT /dehydrated_device` (R14.1) and MSC3983's
//! `/keys/claim` with a list of algorithms per device (several keys per
//! device, the claim homeservers send to application services); and the ruma
//! flavour of the claim with options (R12.4).

use std::collections::BTreeMap;

use ruma_client_api::dehydrated_device::DehydratedDeviceData;
use ruma_client_api::dehydrated_device::put_dehydrated_device::unstable as put_dehydrated_device;
use ruma_client_api::keys::claim_keys;
use ruma_common::encryption::DeviceKeys;
use ruma_common::serde::Raw;
use ruma_common::{OneTimeKeyAlgorithm, OwnedDeviceId, OwnedUserId};

use super::{
    device_from_ruma, key_maps_from_upload, one_time_keys_of, outcome_from_one_time_keys,
    upload_from_key_maps, user_id_to_ruma,
};
use crate::api::{ApiError, ClaimOptions, KeysApi};
use crate::error::Result;
use crate::ids::{Algorithm, Device, DeviceId, UserId};
use crate::store::KeyStore;
use crate::types::{ClaimOutcome, ClaimTarget, Upload};

/// Builds the keyclaim [`Upload`] of a dehydrated device from a ruma MSC3814
/// `PUT /dehydrated_device` request: its `one_time_keys` and
/// `fallback_keys`, for the request's `device_id` of `user_id`. The other
/// fields (`device_data`, `device_keys`, the display name) are the
/// homeserver's and not read.
///
/// # Errors
/// As [`upload_from_request`](super::upload_from_request), and
/// [`Error::InvalidUserId`](crate::Error::InvalidUserId) or
/// [`Error::InvalidDeviceId`](crate::Error::InvalidDeviceId).
pub fn dehydrated_upload_from_request(
    user_id: &ruma_common::UserId,
    request: &put_dehydrated_device::Request,
) -> Result<Upload> {
    let device = device_from_ruma(user_id, &request.device_id)?;
    upload_from_key_maps(device, &request.one_time_keys, &request.fallback_keys)
}

/// The ruma MSC3814 `PUT /dehydrated_device` request that carries an
/// [`Upload`]'s keys for the upload's device, with the device data and
/// device keys the client made (keyclaim has neither), e.g. for a client or
/// a test.
///
/// # Errors
/// [`Error::BadRequest`](crate::Error::BadRequest) for a key ID that ruma
/// does not accept.
pub fn dehydrated_device_request(
    upload: &Upload,
    device_data: Raw<DehydratedDeviceData>,
    device_keys: Raw<DeviceKeys>,
) -> Result<put_dehydrated_device::Request> {
    let device_id = OwnedDeviceId::from(upload.device().device_id.as_str());
    let mut request = put_dehydrated_device::Request::new(device_id, device_data, device_keys);
    (request.one_time_keys, request.fallback_keys) = key_maps_from_upload(upload)?;
    Ok(request)
}

/// The ruma MSC3814 `PUT /dehydrated_device` response for the new device.
pub fn dehydrated_device_response(device: &Device) -> put_dehydrated_device::Response {
    put_dehydrated_device::Response::new(OwnedDeviceId::from(device.device_id.as_str()))
}

/// The claim targets of a ruma MSC3983 `POST /keys/claim` request, which
/// lists algorithms per device: an algorithm named `n` times for a device is
/// one target with a count of `n` (clamped by the store, R8.3). Targets come
/// in order of user, device and algorithm. As in the JSON facade, an
/// algorithm keyclaim does not accept matches nothing (R4.6) and is left
/// out.
///
/// # Errors
/// [`Error::InvalidUserId`](crate::Error::InvalidUserId) or
/// [`Error::InvalidDeviceId`](crate::Error::InvalidDeviceId).
pub fn claim_targets_from_v4_request(
    request: &claim_keys::v4::Request,
) -> Result<Vec<ClaimTarget>> {
    let mut targets = Vec::new();
    for (user, devices) in &request.one_time_keys {
        let user = UserId::parse(user.as_str())?;
        for (device, algorithms) in devices {
            let device = Device::new(user.clone(), DeviceId::parse(device.as_str())?);
            let mut counts: BTreeMap<Algorithm, u32> = BTreeMap::new();
            for algorithm in algorithms {
                if let Ok(algorithm) = Algorithm::parse(algorithm.as_str()) {
                    let count = counts.entry(algorithm).or_insert(0);
                    *count = count.saturating_add(1);
                }
            }
            targets.extend(counts.into_iter().map(|(algorithm, count)| ClaimTarget {
                device: device.clone(),
                algorithm,
                count,
            }));
        }
    }
    Ok(targets)
}

/// The ruma MSC3983 `POST /keys/claim` request for targets, each target's
/// algorithm listed as many times as its count, e.g. for a client or a test.
///
/// # Errors
/// [`Error::BadRequest`](crate::Error::BadRequest) for a user ID that ruma
/// does not accept.
pub fn claim_v4_request(targets: &[ClaimTarget]) -> Result<claim_keys::v4::Request> {
    let mut one_time_keys: BTreeMap<
        OwnedUserId,
        BTreeMap<OwnedDeviceId, Vec<OneTimeKeyAlgorithm>>,
    > = BTreeMap::new();
    for target in targets {
        let algorithm = OneTimeKeyAlgorithm::from(target.algorithm.as_str());
        one_time_keys
            .entry(user_id_to_ruma(&target.device.user_id)?)
            .or_default()
            .entry(OwnedDeviceId::from(target.device.device_id.as_str()))
            .or_default()
            .extend(std::iter::repeat_n(algorithm, target.count as usize));
    }
    Ok(claim_keys::v4::Request::new(one_time_keys))
}

/// The ruma MSC3983 `POST /keys/claim` response for a claim's keys, with
/// empty `failures`; several keys per device where the claim handed them out.
///
/// # Errors
/// As [`claim_response`](super::claim_response).
pub fn claim_v4_response(outcome: &ClaimOutcome) -> Result<claim_keys::v4::Response> {
    Ok(claim_keys::v4::Response::new(one_time_keys_of(
        &outcome.keys,
    )?))
}

/// The keys of a ruma MSC3983 `POST /keys/claim` response as a
/// [`ClaimOutcome`], as
/// [`claim_outcome_from_response`](super::claim_outcome_from_response) reads
/// a stable one.
///
/// # Errors
/// Invalid IDs or key JSON, as for an upload.
pub fn claim_outcome_from_v4_response(response: &claim_keys::v4::Response) -> Result<ClaimOutcome> {
    outcome_from_one_time_keys(&response.one_time_keys)
}

impl<S: KeyStore> KeysApi<S> {
    /// Serves a parsed `POST /keys/claim` with options, like
    /// [`KeysApi::claim_with`] (R12.4): `always_include_fallback_keys` and an
    /// application-service provider are the homeserver's settings, not
    /// fields of the request.
    ///
    /// # Errors
    /// An [`ApiError`] per contract section 9's table.
    pub async fn claim_with_ruma(
        &self,
        request: &claim_keys::v3::Request,
        options: &ClaimOptions,
    ) -> Result<claim_keys::v3::Response, ApiError> {
        let targets = super::claim_targets_from_request(request)?;
        self.limits().check_claim(&targets)?;
        let keys = self.claim_targets_with(targets, options).await?;
        Ok(claim_keys::v3::Response::new(one_time_keys_of(&keys)?))
    }

    /// Serves a parsed MSC3983 `POST /keys/claim` (several keys per device)
    /// with options, like [`KeysApi::claim_with`] (R12.4): the store's
    /// one-time keys up to each target's count, then the provider's for the
    /// targets that got none, then fallback keys.
    ///
    /// # Errors
    /// An [`ApiError`] per contract section 9's table.
    pub async fn claim_v4_ruma(
        &self,
        request: &claim_keys::v4::Request,
        options: &ClaimOptions,
    ) -> Result<claim_keys::v4::Response, ApiError> {
        let targets = claim_targets_from_v4_request(request)?;
        self.limits().check_claim(&targets)?;
        let keys = self.claim_targets_with(targets, options).await?;
        Ok(claim_keys::v4::Response::new(one_time_keys_of(&keys)?))
    }

    /// Serves a parsed MSC3814 `PUT /dehydrated_device` for `user_id`, like
    /// [`KeysApi::replace_dehydrated_device`] (R14.1, R14.2): the `previous`
    /// dehydrated device's keys go and the request's keys are stored for its
    /// `device_id`, in one atomic step.
    ///
    /// # Errors
    /// An [`ApiError`] per contract section 9's table; nothing changes then.
    pub async fn replace_dehydrated_device_ruma(
        &self,
        user_id: &ruma_common::UserId,
        previous: Option<&ruma_common::DeviceId>,
        request: &put_dehydrated_device::Request,
    ) -> Result<put_dehydrated_device::Response, ApiError> {
        let upload = dehydrated_upload_from_request(user_id, request)?;
        let previous = previous.map(|p| DeviceId::parse(p.as_str())).transpose()?;
        self.limits().check_upload(&upload)?;
        self.replace_with(previous.as_ref(), &upload).await?;
        Ok(dehydrated_device_response(upload.device()))
    }
}
