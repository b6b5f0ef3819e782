//! [`KeysApi`]: the wire facade (contract section 9). Matrix request bodies in,
//! Matrix response JSON out.

mod more;
mod provider;

pub use provider::{ClaimOptions, OtkProvider};

use std::fmt;

use serde_json::{Map, Value, json};

use crate::error::{Error, LimitKind};
use crate::ids::{Algorithm, Device, DeviceId, KeyId, UserId};
use crate::key_json::KeyJson;
use crate::limits::{Limits, too_large};
use crate::store::KeyStore;
use crate::types::{ClaimTarget, ClaimedKey, SyncState, Upload, keys_to_wire};

/// The stable name of the fallback key upload field.
const FALLBACK_KEYS: &str = "fallback_keys";
/// The unstable (MSC2732) name of the fallback key upload field.
const UNSTABLE_FALLBACK_KEYS: &str = "org.matrix.msc2732.fallback_keys";
/// The sync field listing unused fallback key types (R6.3).
const UNUSED_TYPES: &str = "device_unused_fallback_key_types";
/// The unstable (MSC2732) name of the sync field.
const UNSTABLE_UNUSED_TYPES: &str = "org.matrix.msc2732.device_unused_fallback_key_types";

/// A Matrix error answer: HTTP status, `errcode` and a message that never
/// contains key material.
#[derive(Debug)]
pub struct ApiError {
    status: u16,
    errcode: &'static str,
    message: String,
    source: Option<Box<Error>>,
}

impl ApiError {
    fn new(status: u16, errcode: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            errcode,
            message: message.into(),
            source: None,
        }
    }

    fn bad_json(message: impl Into<String>) -> Self {
        Self::new(400, "M_BAD_JSON", message)
    }

    /// The HTTP status (400 or 500).
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The Matrix `errcode`, e.g. `M_BAD_JSON`.
    pub fn errcode(&self) -> &str {
        self.errcode
    }

    /// The human-readable message (the `error` field).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The store error behind this answer, if any.
    pub fn store_error(&self) -> Option<&Error> {
        self.source.as_deref()
    }

    /// Whether the request may succeed if retried (a transient storage failure).
    pub fn is_retryable(&self) -> bool {
        self.source.as_deref().is_some_and(Error::is_retryable)
    }

    /// The response body: `{"errcode": ..., "error": ...}`.
    pub fn to_json(&self) -> Value {
        json!({ "errcode": self.errcode, "error": self.message })
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.errcode, self.message)
    }
}

impl std::error::Error for ApiError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        let (status, errcode) = match &err {
            Error::InvalidUserId { .. }
            | Error::InvalidDeviceId { .. }
            | Error::Conflict { .. }
            | Error::DuplicateFallback { .. }
            | Error::MissingFallback { .. } => (400, "M_INVALID_PARAM"),
            Error::InvalidKeyId { .. }
            | Error::InvalidKeyJson { .. }
            | Error::BadRequest { .. } => (400, "M_BAD_JSON"),
            Error::TooLarge { .. } => (400, "M_TOO_LARGE"),
            _ => (500, "M_UNKNOWN"),
        };
        let message = if status == 500 {
            // Internal details stay in the source chain and the logs.
            "internal storage failure".to_owned()
        } else {
            err.to_string()
        };
        Self {
            status,
            errcode,
            message,
            source: Some(Box::new(err)),
        }
    }
}

/// The wire facade: serves `POST /keys/upload`, `POST /keys/claim`, the E2EE
/// fields of `/sync` and device deletion over any [`KeyStore`].
///
/// ```
/// # async fn demo() -> Result<(), keyclaim::ApiError> {
/// # #[derive(Debug)] struct S;
/// # fn store() -> std::sync::Arc<dyn keyclaim::KeyStore> { unimplemented!() }
/// let api = keyclaim::KeysApi::new(store());
/// let counts = api
///     .upload("@alice:example.org", "DEV", br#"{"one_time_keys": {"signed_curve25519:A": "k"}}"#)
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct KeysApi<S> {
    store: S,
    limits: Option<Limits>,
    unstable_alias: bool,
    dehydrated_fallback_required: bool,
}

impl<S: KeyStore> KeysApi<S> {
    /// A facade over a store, with the store's limits and the unstable MSC2732
    /// sync alias on.
    pub fn new(store: S) -> Self {
        Self {
            store,
            limits: None,
            unstable_alias: true,
            dehydrated_fallback_required: false,
        }
    }

    /// Requires every upload for a dehydrated device
    /// ([`KeysApi::replace_dehydrated_device`]) to carry a fallback key for
    /// each algorithm it carries one-time keys of (R14.2); without one the
    /// request fails with 400 `M_INVALID_PARAM` and nothing changes. Off by
    /// default.
    #[must_use]
    pub fn with_dehydrated_fallback_required(mut self, on: bool) -> Self {
        self.dehydrated_fallback_required = on;
        self
    }

    /// Uses other limits for what the facade checks before the store sees a
    /// request (body size, keys per upload, claim targets). The store still
    /// enforces its own.
    #[must_use]
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = Some(limits);
        self
    }

    /// Switches the `org.matrix.msc2732.device_unused_fallback_key_types`
    /// alias in [`KeysApi::sync`] on (the default) or off.
    #[must_use]
    pub fn with_unstable_fallback_alias(mut self, on: bool) -> Self {
        self.unstable_alias = on;
        self
    }

    /// The store behind the facade.
    pub fn store(&self) -> &S {
        &self.store
    }

    pub(crate) fn limits(&self) -> &Limits {
        self.limits.as_ref().unwrap_or_else(|| self.store.limits())
    }

    fn parse_body(&self, body: &[u8]) -> Result<Map<String, Value>, ApiError> {
        if body.len() > self.limits().max_body_bytes {
            return Err(too_large(LimitKind::RequestBytes, self.limits().max_body_bytes).into());
        }
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) => Err(ApiError::bad_json("request body must be a JSON object")),
            // Parsing into a `Value` fails only on syntax, EOF or nesting depth.
            Err(_) => Err(ApiError::new(
                400,
                "M_NOT_JSON",
                "request body is not valid JSON",
            )),
        }
    }

    /// The keys of an upload body (`one_time_keys`, `fallback_keys` or its
    /// unstable alias), validated and checked against the request limits.
    fn parse_upload(
        &self,
        device: Device,
        map: &mut Map<String, Value>,
    ) -> Result<Upload, ApiError> {
        let otks = take_key_map(map, "one_time_keys")?;
        let fallbacks = match take_key_map(map, FALLBACK_KEYS)? {
            Some(stable) => Some(stable),
            None => take_key_map(map, UNSTABLE_FALLBACK_KEYS)?,
        };
        let count = otks.as_ref().map_or(0, Map::len) + fallbacks.as_ref().map_or(0, Map::len);
        if count > self.limits().max_keys_per_upload {
            return Err(
                too_large(LimitKind::KeysPerUpload, self.limits().max_keys_per_upload).into(),
            );
        }
        let mut upload = Upload::new(device);
        for (id, json) in parse_keys(otks)? {
            upload.add_one_time_key(id, json)?;
        }
        for (id, json) in parse_keys(fallbacks)? {
            upload.add_fallback_key(id, json)?;
        }
        self.limits().check_upload(&upload)?;
        Ok(upload)
    }

    /// Serves `POST /keys/upload` for an authenticated device.
    ///
    /// Reads `one_time_keys` and `fallback_keys` (or the unstable
    /// `org.matrix.msc2732.fallback_keys` when the stable field is absent or
    /// null); ignores `device_keys` when it is an object or null, and unknown
    /// fields. Answers `{"one_time_key_counts": {...}}` (R3.8, R6.1).
    ///
    /// # Errors
    /// An [`ApiError`] per contract section 9's table; nothing is stored then.
    #[tracing::instrument(name = "keys_upload", skip(self, body), fields(body_len = body.len()))]
    pub async fn upload(
        &self,
        user_id: &str,
        device_id: &str,
        body: &[u8],
    ) -> Result<Value, ApiError> {
        let device = Device::new(UserId::parse(user_id)?, DeviceId::parse(device_id)?);
        let mut map = self.parse_body(body)?;
        match map.get("device_keys") {
            None | Some(Value::Null | Value::Object(_)) => {}
            Some(_) => return Err(ApiError::bad_json("`device_keys` must be an object")),
        }
        let upload = self.parse_upload(device, &mut map)?;
        let outcome = self.store.upload(&upload).await?;
        Ok(json!({ "one_time_key_counts": outcome.counts.to_wire() }))
    }

    /// Serves `POST /keys/claim`.
    ///
    /// Reads `one_time_keys` (user -> device -> algorithm); ignores `timeout`
    /// and other fields. An algorithm string that is no valid algorithm
    /// matches nothing (R4.6). Answers
    /// `{"one_time_keys": {user: {device: {key_id: key_json}}}, "failures": {}}`.
    ///
    /// # Errors
    /// An [`ApiError`] per contract section 9's table; nothing is consumed then.
    #[tracing::instrument(name = "keys_claim", skip(self, body), fields(body_len = body.len(), targets))]
    pub async fn claim(&self, body: &[u8]) -> Result<Value, ApiError> {
        let targets = self.claim_targets(body)?;
        tracing::Span::current().record("targets", targets.len());
        let outcome = if targets.is_empty() {
            Default::default()
        } else {
            self.store.claim(&targets).await?
        };
        Ok(claim_answer(&outcome.keys))
    }

    /// The targets of a `POST /keys/claim` body (section 9).
    fn claim_targets(&self, body: &[u8]) -> Result<Vec<ClaimTarget>, ApiError> {
        let map = self.parse_body(body)?;
        let limit = self.limits().max_claim_targets;
        let mut targets = Vec::new();
        let mut seen = 0usize;
        match map.get("one_time_keys") {
            None | Some(Value::Null) => {}
            Some(Value::Object(users)) => {
                for (user, devices) in users {
                    let user_id = UserId::parse(user.as_str())?;
                    let Value::Object(devices) = devices else {
                        return Err(ApiError::bad_json("`one_time_keys` values must be objects"));
                    };
                    for (device, algorithm) in devices {
                        seen += 1;
                        if seen > limit {
                            return Err(too_large(LimitKind::ClaimTargets, limit).into());
                        }
                        let device_id = DeviceId::parse(device.as_str())?;
                        let Value::String(algorithm) = algorithm else {
                            return Err(ApiError::bad_json("algorithms must be strings"));
                        };
                        if let Ok(algorithm) = Algorithm::parse(algorithm.as_str()) {
                            targets.push(ClaimTarget::one(
                                Device::new(user_id.clone(), device_id),
                                algorithm,
                            ));
                        }
                    }
                }
            }
            Some(_) => return Err(ApiError::bad_json("`one_time_keys` must be an object")),
        }
        Ok(targets)
    }

    /// The E2EE fields of a `/sync` response for a device (section 6):
    /// `device_one_time_keys_count`, `device_unused_fallback_key_types` and,
    /// unless switched off, its unstable alias.
    ///
    /// # Errors
    /// 400 `M_INVALID_PARAM` for bad IDs, 500 `M_UNKNOWN` for storage failures.
    #[tracing::instrument(name = "keys_sync", skip(self))]
    pub async fn sync(&self, user_id: &str, device_id: &str) -> Result<Value, ApiError> {
        let device = Device::new(UserId::parse(user_id)?, DeviceId::parse(device_id)?);
        let state = self.store.sync_state(&device).await?;
        let mut out = sync_fields(&state);
        if self.unstable_alias {
            let types = out[UNUSED_TYPES].clone();
            out.insert(UNSTABLE_UNUSED_TYPES.to_owned(), types);
        }
        Ok(Value::Object(out))
    }

    /// Deletes a device's keys (R7.1), e.g. when the device is logged out.
    ///
    /// # Errors
    /// 400 `M_INVALID_PARAM` for bad IDs, 500 `M_UNKNOWN` for storage failures.
    #[tracing::instrument(name = "keys_delete_device", skip(self))]
    pub async fn delete_device(&self, user_id: &str, device_id: &str) -> Result<(), ApiError> {
        let device = Device::new(UserId::parse(user_id)?, DeviceId::parse(device_id)?);
        self.store.delete_device(&device).await?;
        Ok(())
    }

    /// Deletes the keys of all of a user's devices (R7.2), e.g. on account
    /// deactivation.
    ///
    /// # Errors
    /// 400 `M_INVALID_PARAM` for a bad user ID, 500 `M_UNKNOWN` for storage failures.
    #[tracing::instrument(name = "keys_delete_user", skip(self))]
    pub async fn delete_user(&self, user_id: &str) -> Result<(), ApiError> {
        self.store.delete_user(&UserId::parse(user_id)?).await?;
        Ok(())
    }
}

/// The answer to a claim: `{"one_time_keys": {user: {device: {key_id:
/// key_json}}}, "failures": {}}`. A later key under the same key ID of one
/// device replaces an earlier one.
fn claim_answer<'a>(keys: impl IntoIterator<Item = &'a ClaimedKey>) -> Value {
    json!({ "one_time_keys": keys_to_wire(keys), "failures": {} })
}

/// One device's counts and unused fallback types in the wire form (R6.1,
/// R6.3), as `/sync` and the bulk read answer them.
fn sync_fields(state: &SyncState) -> Map<String, Value> {
    let types: Vec<&str> = state
        .unused_fallback_key_types
        .iter()
        .map(Algorithm::as_str)
        .collect();
    let mut out = Map::new();
    out.insert(
        "device_one_time_keys_count".to_owned(),
        state.one_time_key_counts.to_wire(),
    );
    out.insert(UNUSED_TYPES.to_owned(), json!(types));
    out
}

/// Takes a key map field: absent or null is `None`, an object is `Some`,
/// anything else is `M_BAD_JSON`.
fn take_key_map(
    map: &mut Map<String, Value>,
    field: &str,
) -> Result<Option<Map<String, Value>>, ApiError> {
    match map.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(keys)) => Ok(Some(keys)),
        Some(_) => Err(ApiError::bad_json(format!("`{field}` must be an object"))),
    }
}

fn parse_keys(keys: Option<Map<String, Value>>) -> Result<Vec<(KeyId, KeyJson)>, ApiError> {
    keys.into_iter()
        .flatten()
        .map(|(id, json)| {
            let id = KeyId::parse(id)?;
            let json = KeyJson::from_value(&json).map_err(|e| e.with_key_id(&id))?;
            Ok((id, json))
        })
        .collect()
}
