#![doc = include_str!("../README.md")]

mod api;
pub mod backend;
mod error;
mod ids;
mod key_json;
mod limits;
mod notify;
mod plan;
#[cfg(feature = "ruma")]
pub mod ruma;
mod store;
pub mod transfer;
mod types;

pub use api::{ApiError, ClaimOptions, KeysApi, OtkProvider};
pub use async_trait::async_trait;
pub use error::{BoxError, Error, LimitKind, Result};
pub use ids::{Algorithm, Device, DeviceId, KeyId, MAX_ID_BYTES, SIGNED_CURVE25519, UserId};
pub use key_json::KeyJson;
pub use limits::{Limits, OtkCap};
pub use store::KeyStore;
pub use tokio::sync::broadcast;
pub use types::{
    Changes, ClaimOutcome, ClaimTarget, ClaimedKey, FallbackTarget, OneTimeClaimOutcome, OtkCounts,
    ResetScope, StoredFallback, SyncState, Upload, UploadOutcome,
};
