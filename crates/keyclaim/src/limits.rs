//! Limits against buggy or hostile clients (contract section 8).

use crate::error::{Error, LimitKind, Result};
use crate::types::{ClaimTarget, Upload};

/// What the cap on stored one-time keys counts (R8.1, R8.4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OtkCap {
    /// Per (device, algorithm): each algorithm of a device may hold up to the
    /// cap (R8.1). The default.
    #[default]
    PerAlgorithm,
    /// Per device, across all its algorithms together (R8.4): the reference
    /// homeserver's rule since 2026-08.
    PerDevice,
}

/// Configurable limits; [`Limits::default`] gives the contract's defaults.
///
/// ```
/// let mut limits = keyclaim::Limits::default();
/// limits.max_otks_per_device_algorithm = 100;
/// assert_eq!(limits.max_keys_per_upload, 1000);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Stored OTKs per (device, algorithm), or per device when
    /// [`Limits::otk_cap`] says so; an upload that would exceed it is
    /// rejected whole (R8.1, R8.4). Default 500.
    pub max_otks_per_device_algorithm: u64,
    /// What [`Limits::max_otks_per_device_algorithm`] counts (R8.4). Default
    /// [`OtkCap::PerAlgorithm`].
    pub otk_cap: OtkCap,
    /// One key's canonical JSON, signatures included, in bytes (R8.2). Default 4096.
    pub max_key_json_bytes: usize,
    /// Keys (one-time and fallback together) in one upload (R8.2). Default 1000.
    pub max_keys_per_upload: usize,
    /// Bytes of one request body the wire facade parses (R8.2). Default 1 MiB.
    pub max_body_bytes: usize,
    /// Targets in one claim (R8.2). Default 100,000.
    pub max_claim_targets: usize,
    /// The count per claim target is clamped to this (R8.3). Default 5.
    pub max_claim_count: u32,
    /// Devices in one [`KeyStore::counts_many`](crate::KeyStore::counts_many)
    /// call (R16.1). Default 10,000.
    pub max_counts_devices: usize,
    /// How many issued OTKs are remembered per (device, algorithm) so that a
    /// re-upload of one is not stored again (R3.4). Default 1000; at least
    /// this many are kept.
    pub remembered_issued_keys: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_otks_per_device_algorithm: 500,
            otk_cap: OtkCap::PerAlgorithm,
            max_key_json_bytes: 4096,
            max_keys_per_upload: 1000,
            max_body_bytes: 1 << 20,
            max_claim_targets: 100_000,
            max_claim_count: 5,
            max_counts_devices: 10_000,
            remembered_issued_keys: 1000,
        }
    }
}

impl Limits {
    /// Checks the request-level limits of an upload (R8.2): its number of keys
    /// and each key's size. The per-device limit R8.1 depends on stored state
    /// and is checked by the store inside its transaction.
    ///
    /// # Errors
    /// [`Error::TooLarge`].
    pub fn check_upload(&self, upload: &Upload) -> Result<()> {
        if upload.key_count() > self.max_keys_per_upload {
            return Err(too_large(
                LimitKind::KeysPerUpload,
                self.max_keys_per_upload,
            ));
        }
        let biggest = upload
            .one_time_keys
            .values()
            .chain(upload.fallback_keys.values().map(|(_, json)| json))
            .map(|json| json.len())
            .max()
            .unwrap_or(0);
        if biggest > self.max_key_json_bytes {
            return Err(too_large(LimitKind::KeyJsonBytes, self.max_key_json_bytes));
        }
        Ok(())
    }

    /// Checks the number of targets of a claim (R8.2).
    ///
    /// # Errors
    /// [`Error::TooLarge`].
    pub fn check_claim(&self, targets: &[ClaimTarget]) -> Result<()> {
        self.check_claim_targets(targets.len())
    }

    /// Checks a number of claim targets (R8.2), for claims of any kind.
    ///
    /// # Errors
    /// [`Error::TooLarge`].
    pub fn check_claim_targets(&self, targets: usize) -> Result<()> {
        if targets > self.max_claim_targets {
            return Err(too_large(LimitKind::ClaimTargets, self.max_claim_targets));
        }
        Ok(())
    }

    /// Checks the number of devices of a bulk read (R16.1).
    ///
    /// # Errors
    /// [`Error::TooLarge`].
    pub fn check_counts_many(&self, devices: usize) -> Result<()> {
        if devices > self.max_counts_devices {
            return Err(too_large(LimitKind::CountsDevices, self.max_counts_devices));
        }
        Ok(())
    }

    /// Checks the number of key IDs of a key reset (R13.2): at most as many
    /// as one upload may carry.
    ///
    /// # Errors
    /// [`Error::TooLarge`].
    pub fn check_reset(&self, key_ids: usize) -> Result<()> {
        if key_ids > self.max_keys_per_upload {
            return Err(too_large(LimitKind::ResetKeyIds, self.max_keys_per_upload));
        }
        Ok(())
    }

    /// The number of keys a claim target may take: its count clamped to
    /// [`Limits::max_claim_count`] (R8.3). A count of 0 takes nothing.
    pub fn clamp_count(&self, count: u32) -> u32 {
        count.min(self.max_claim_count)
    }
}

pub(crate) fn too_large(kind: LimitKind, limit: impl TryInto<u64>) -> Error {
    Error::TooLarge {
        kind,
        limit: limit.try_into().unwrap_or(u64::MAX),
    }
}
