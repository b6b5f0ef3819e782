#![doc = include_str!("../README.md")]

mod api;
mod error;
mod ids;
mod key_json;
mod limits;
mod notify;
mod plan;
#[cfg(feature = "ruma")]
pub mod ruma;
mod store;
mod transfer;
mod types;

pub use api::{ApiError, KeysApi};
pub use async_trait::async_trait;
pub use error::{BoxError, Error, LimitKind, Result};
pub use ids::{Algorithm, Device, DeviceId, KeyId, MAX_ID_BYTES, SIGNED_CURVE25519, UserId};
pub use key_json::{KeyDigest, KeyJson, MAX_KEY_JSON_DEPTH, canonical_json};
pub use limits::Limits;
pub use notify::{ChangeNotifier, NOTIFY_CAPACITY};
pub use plan::{DeviceFacts, UploadPlan, plan_upload};
pub use store::KeyStore;
pub use tokio::sync::broadcast;
pub use transfer::{
    CheckReport, CopyReport, Exporter, Problem, check_store, copy_store, diff_stores,
};
pub use types::{
    Changes, ClaimOutcome, ClaimTarget, ClaimedKey, DeviceSnapshot, IssuedKey, OtkCounts,
    StoredFallback, StoredOtk, SyncState, Upload, UploadOutcome,
};
