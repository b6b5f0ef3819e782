//! The upload rules (R3.2, R3.4, R3.6, R5.1, R5.2, R8.1) as one pure function,
//! shared by every backend.
//!
//! A backend reads the [`DeviceFacts`] an upload needs inside its transaction
//! (by whatever queries suit it), asks [`plan_upload`] what to do, and applies
//! the resulting [`UploadPlan`] in the same transaction. The rules then live in
//! one place and cannot drift apart between backends.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::error::{Error, LimitKind, Result};
use crate::ids::{Algorithm, KeyId};
use crate::key_json::{KeyDigest, KeyJson};
use crate::limits::{Limits, OtkCap, too_large};
use crate::types::Upload;

/// What the store holds that an upload depends on, for one device.
#[derive(Clone, Debug, Default)]
pub struct DeviceFacts {
    /// Digests of the stored OTKs whose key IDs the upload names (others may
    /// be left out).
    pub stored_otks: HashMap<KeyId, KeyDigest>,
    /// Remembered issued OTKs (R3.4) among the key IDs the upload names
    /// (others may be left out).
    pub issued: HashSet<(KeyId, KeyDigest)>,
    /// Stored OTK counts per algorithm, for the algorithms the upload names;
    /// when the store's cap counts per device ([`OtkCap::PerDevice`], R8.4),
    /// for every algorithm the device holds (see [`DeviceFacts::needs_all_counts`]).
    pub otk_counts: HashMap<Algorithm, u64>,
    /// Digests of the stored fallback keys, for the algorithms the upload names.
    pub fallback_digests: HashMap<Algorithm, KeyDigest>,
}

impl DeviceFacts {
    /// Whether [`DeviceFacts::otk_counts`] must cover every algorithm of the
    /// device rather than only those the upload names (R8.4).
    pub fn needs_all_counts(limits: &Limits) -> bool {
        limits.otk_cap == OtkCap::PerDevice
    }
}

/// What an upload must write.
#[derive(Debug, Default)]
pub struct UploadPlan<'a> {
    /// OTKs to insert, in key ID order, all at one new sequence number.
    pub insert_otks: Vec<(&'a KeyId, &'a KeyJson)>,
    /// Fallback keys that replace the stored one (or are the first), unused.
    pub replace_fallbacks: Vec<(&'a Algorithm, &'a KeyId, &'a KeyJson)>,
}

impl UploadPlan<'_> {
    /// Whether the upload changes nothing (a retry, or only remembered keys).
    pub fn is_noop(&self) -> bool {
        self.insert_otks.is_empty() && self.replace_fallbacks.is_empty()
    }
}

/// Decides what an upload writes, given what the store holds.
///
/// Rules: a stored OTK ID with the same content (ignoring `signatures`) is
/// skipped, with other content the whole upload fails with
/// [`Error::Conflict`] (R3.2); a key that was issued and is remembered is
/// skipped (R3.4); the per-(device, algorithm) limit holds after the upload
/// or the whole upload fails with [`Error::TooLarge`] (R8.1); a fallback key
/// whose digest equals the stored one's changes nothing, otherwise it replaces
/// it (R5.1, R5.2).
///
/// # Errors
/// [`Error::Conflict`], [`Error::TooLarge`].
pub fn plan_upload<'a>(
    upload: &'a Upload,
    facts: &DeviceFacts,
    limits: &Limits,
) -> Result<UploadPlan<'a>> {
    let mut plan = UploadPlan::default();
    let mut added: BTreeMap<&str, u64> = BTreeMap::new();
    for (id, json) in &upload.one_time_keys {
        match facts.stored_otks.get(id) {
            Some(digest) if *digest == json.digest() => continue,
            Some(_) => {
                return Err(Error::Conflict {
                    device: upload.device.clone(),
                    key_id: id.clone(),
                });
            }
            None => {}
        }
        if facts.issued.contains(&(id.clone(), json.digest())) {
            continue;
        }
        *added.entry(id.algorithm_str()).or_insert(0) += 1;
        plan.insert_otks.push((id, json));
    }
    let cap = limits.max_otks_per_device_algorithm;
    match limits.otk_cap {
        OtkCap::PerDevice => {
            let stored: u64 = facts.otk_counts.values().sum();
            let new: u64 = added.values().sum();
            if new > 0 && stored.saturating_add(new) > cap {
                return Err(too_large(LimitKind::OtksPerDevice, cap));
            }
        }
        OtkCap::PerAlgorithm => {
            for (alg, n) in added {
                let stored = facts
                    .otk_counts
                    .iter()
                    .find(|(a, _)| a.as_str() == alg)
                    .map_or(0, |(_, c)| *c);
                if stored.saturating_add(n) > cap {
                    return Err(too_large(LimitKind::OtksPerDeviceAlgorithm, cap));
                }
            }
        }
    }
    for (alg, (id, json)) in &upload.fallback_keys {
        if facts.fallback_digests.get(alg) != Some(&json.digest()) {
            plan.replace_fallbacks.push((alg, id, json));
        }
    }
    Ok(plan)
}
