//! The one error type of keyclaim, shared by every backend.

use crate::ids::{Algorithm, Device, KeyId};

/// A boxed source error, kept so that callers can walk the chain.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result type of keyclaim.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which limit of contract section 8 a request exceeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LimitKind {
    /// Stored OTKs per (device, algorithm) (R8.1).
    OtksPerDeviceAlgorithm,
    /// One key's canonical JSON size (R8.2).
    KeyJsonBytes,
    /// Keys in one upload (R8.2).
    KeysPerUpload,
    /// Bytes of one request body (R8.2).
    RequestBytes,
    /// Targets of one claim (R8.2).
    ClaimTargets,
    /// Stored OTKs per device across its algorithms (R8.4).
    OtksPerDevice,
    /// Devices in one bulk read (R16.1).
    CountsDevices,
    /// Key IDs in one key reset (R13.2).
    ResetKeyIds,
}

impl std::fmt::Display for LimitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::OtksPerDeviceAlgorithm => "stored one-time keys per device and algorithm",
            Self::KeyJsonBytes => "bytes of one key's JSON",
            Self::KeysPerUpload => "keys in one upload",
            Self::RequestBytes => "bytes of one request body",
            Self::ClaimTargets => "targets of one claim",
            Self::OtksPerDevice => "stored one-time keys per device",
            Self::CountsDevices => "devices in one bulk read",
            Self::ResetKeyIds => "key IDs in one key reset",
        })
    }
}

/// Everything that can go wrong in keyclaim.
///
/// Messages name devices, key IDs and limits, never key material.
/// [`Error::is_retryable`] tells transient storage failures (busy, pool
/// timeout, serialization failure, lost connection) from permanent ones.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A user ID failed validation (R2.1).
    #[error("invalid user ID: {reason}")]
    InvalidUserId {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A device ID failed validation (R2.2).
    #[error("invalid device ID: {reason}")]
    InvalidDeviceId {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A key ID or algorithm failed validation (R2.3).
    #[error("invalid key ID: {reason}")]
    InvalidKeyId {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Key JSON failed validation (R2.4).
    #[error("invalid key JSON{}: {reason}", key_id.as_ref().map(|k| format!(" for {k}")).unwrap_or_default())]
    InvalidKeyJson {
        /// The key it was uploaded under, when known.
        key_id: Option<KeyId>,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A request was malformed in a way other than the variants above
    /// (wrong JSON types in a wire body, R2.4 / section 9).
    #[error("bad request: {reason}")]
    BadRequest {
        /// What is wrong with it (names fields and IDs, never key material).
        reason: String,
    },
    /// An OTK was re-uploaded under a stored key ID with different content (R3.2).
    #[error("one-time key {key_id} already exists for {device} with different content")]
    Conflict {
        /// The device the upload was for.
        device: Device,
        /// The conflicting key ID.
        key_id: KeyId,
    },
    /// Two or more fallback keys for one algorithm in one upload (R3.6).
    #[error("more than one fallback key for algorithm {algorithm} in one upload")]
    DuplicateFallback {
        /// The algorithm named twice.
        algorithm: Algorithm,
    },
    /// An upload for a dehydrated device carries one-time keys of an
    /// algorithm without a fallback key of it, while the store requires one
    /// (R14.2).
    #[error("the upload has one-time keys of {algorithm} but no fallback key of it")]
    MissingFallback {
        /// The algorithm without a fallback key.
        algorithm: Algorithm,
    },
    /// A limit of contract section 8 was exceeded (R8.1, R8.2).
    #[error("too large: {kind} exceeds the limit of {limit}")]
    TooLarge {
        /// Which limit.
        kind: LimitKind,
        /// The configured limit.
        limit: u64,
    },
    /// The storage failed (I/O, database, connection, busy).
    #[error("storage failure in {backend} during {op}{}", if *retryable { " (retryable)" } else { "" })]
    Storage {
        /// The backend's name, e.g. `sqlite`.
        backend: &'static str,
        /// The operation, e.g. `claim`.
        op: &'static str,
        /// Whether trying again later can succeed.
        retryable: bool,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// The stored data is in a format this version does not understand.
    #[error("{backend} store has format version {found}, this build supports up to {supported}")]
    UnsupportedVersion {
        /// The backend's name.
        backend: &'static str,
        /// The version found in the store.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// The stored data violates an invariant (a bug or outside tampering).
    #[error("corrupt store: {what}")]
    Corrupt {
        /// What was found, naming the kind of value and where.
        what: String,
        /// Why it did not read back, when known (a validation error).
        #[source]
        source: Option<BoxError>,
    },
    /// A store's configuration is invalid (a bad URL, option or schema
    /// name), found when the store is opened.
    #[error("invalid configuration: {reason}")]
    InvalidConfig {
        /// What is wrong, naming the option.
        reason: String,
    },
    /// The store was closed or its worker thread is gone.
    #[error("store is closed")]
    Closed,
}

impl Error {
    /// Builds a [`Error::Storage`].
    pub fn storage(
        backend: &'static str,
        op: &'static str,
        retryable: bool,
        source: impl Into<BoxError>,
    ) -> Self {
        Self::Storage {
            backend,
            op,
            retryable,
            source: source.into(),
        }
    }

    /// Builds a [`Error::Corrupt`] that keeps why the value did not read back.
    pub fn corrupt_because(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Corrupt {
            what: what.into(),
            source: Some(source.into()),
        }
    }

    /// Builds a [`Error::BadRequest`].
    pub fn bad_request(reason: impl Into<String>) -> Self {
        Self::BadRequest {
            reason: reason.into(),
        }
    }

    /// Builds a [`Error::InvalidConfig`].
    pub fn invalid_config(reason: impl Into<String>) -> Self {
        Self::InvalidConfig {
            reason: reason.into(),
        }
    }

    /// Builds a [`Error::Corrupt`].
    pub fn corrupt(what: impl Into<String>) -> Self {
        Self::Corrupt {
            what: what.into(),
            source: None,
        }
    }

    /// Whether the same operation may succeed if tried again (a busy database,
    /// a pool timeout, a serialization failure, a lost connection). Nothing of
    /// a failed operation was applied, so a retry is always safe.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Storage {
                retryable: true,
                ..
            }
        )
    }

    /// Whether the error is the caller's fault (bad input or a limit), as
    /// opposed to a failure of the store.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            Self::InvalidUserId { .. }
                | Self::InvalidDeviceId { .. }
                | Self::InvalidKeyId { .. }
                | Self::InvalidKeyJson { .. }
                | Self::BadRequest { .. }
                | Self::Conflict { .. }
                | Self::DuplicateFallback { .. }
                | Self::TooLarge { .. }
        )
    }

    /// Attaches a key ID to an [`Error::InvalidKeyJson`] that lacks one.
    pub(crate) fn with_key_id(self, id: &KeyId) -> Self {
        match self {
            Self::InvalidKeyJson {
                key_id: None,
                reason,
            } => Self::InvalidKeyJson {
                key_id: Some(id.clone()),
                reason,
            },
            other => other,
        }
    }
}
