//! Decoding stored values back into keyclaim's types.
//!
//! A value a backend reads back that does not validate is
//! [`Error::Corrupt`], naming what it was, never a panic and never a wrong
//! answer (R10.4). Backends use these functions instead of calling the
//! parsers themselves, so that every backend reports corruption alike.

use crate::error::{Error, Result};
use crate::ids::{Algorithm, Device, DeviceId, KeyId, UserId};
use crate::key_json::{KeyDigest, KeyJson};

fn corrupt(what: &str, error: Error) -> Error {
    Error::corrupt_because(format!("stored {what} is invalid"), error)
}

/// A stored user ID.
///
/// # Errors
/// [`Error::Corrupt`].
pub fn user_id(text: impl Into<String>) -> Result<UserId> {
    UserId::parse(text).map_err(|e| corrupt("user ID", e))
}

/// A stored device ID.
///
/// # Errors
/// [`Error::Corrupt`].
pub fn device_id(text: impl Into<String>) -> Result<DeviceId> {
    DeviceId::parse(text).map_err(|e| corrupt("device ID", e))
}

/// A stored device, from its user ID and device ID.
///
/// # Errors
/// [`Error::Corrupt`].
pub fn device(user: impl Into<String>, device: impl Into<String>) -> Result<Device> {
    Ok(Device::new(user_id(user)?, device_id(device)?))
}

/// A stored algorithm.
///
/// # Errors
/// [`Error::Corrupt`].
pub fn algorithm(text: impl Into<String>) -> Result<Algorithm> {
    Algorithm::parse(text).map_err(|e| corrupt("algorithm", e))
}

/// A stored key ID.
///
/// # Errors
/// [`Error::Corrupt`].
pub fn key_id(text: impl Into<String>) -> Result<KeyId> {
    KeyId::parse(text).map_err(|e| corrupt("key ID", e))
}

/// A stored key digest, from 32 raw bytes or 64 hex characters.
///
/// # Errors
/// [`Error::Corrupt`].
pub fn digest(bytes: &[u8]) -> Result<KeyDigest> {
    KeyDigest::from_slice(bytes).map_err(|e| corrupt("key digest", e))
}

/// Stored key JSON, validated and canonicalized again (R2.4). For key JSON
/// whose text and digest the backend wrote itself, [`key_json_with_digest`]
/// is cheaper.
///
/// # Errors
/// [`Error::Corrupt`].
pub fn key_json(text: &str) -> Result<KeyJson> {
    KeyJson::from_json_str(text).map_err(|e| corrupt("key JSON", e))
}

/// Key JSON that the backend wrote itself: the canonical text
/// ([`KeyJson::canonical`]) and the digest ([`KeyJson::digest`]) stored next
/// to it, taken without parsing into a value, canonicalizing or hashing
/// again. The text is still checked to be one JSON value (a cheap scan), so
/// that a damaged row is an error rather than a wrong answer (R10.4).
///
/// # Errors
/// [`Error::Corrupt`].
pub fn key_json_with_digest(
    text: impl Into<std::sync::Arc<str>>,
    digest: KeyDigest,
) -> Result<KeyJson> {
    let text = text.into();
    if serde_json::from_str::<serde::de::IgnoredAny>(&text).is_err() {
        return Err(Error::corrupt("stored key JSON is invalid: not JSON"));
    }
    Ok(KeyJson::from_stored(text, digest))
}
