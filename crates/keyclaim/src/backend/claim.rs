//! A claim's answer built from what the storage returned.

use crate::error::{Error, Result};
use crate::ids::Device;
use crate::types::{Changes, ClaimOutcome, ClaimedKey};

use super::decode;

/// One key a claim took, as the storage holds it.
#[derive(Debug)]
pub struct RawClaimedKey {
    /// The index of its target in the claim's targets.
    pub target: usize,
    /// Its key ID, as stored.
    pub key_id: String,
    /// Its canonical key JSON, as stored.
    pub key_json: String,
    /// The digest stored next to it (32 bytes or 64 hex characters).
    pub digest: Vec<u8>,
    /// Whether it is the fallback key (R4.4) rather than a one-time key.
    pub fallback: bool,
}

/// What a claim took, by target index, before decoding. A backend collects
/// it inside its transaction and turns it into the answer with
/// [`RawClaim::decode`].
#[derive(Debug, Default)]
pub struct RawClaim {
    keys: Vec<RawClaimedKey>,
    changed: Vec<usize>,
}

impl RawClaim {
    /// An empty claim.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key taken for a target (in target order, the oldest first
    /// within a target: R4.2).
    pub fn push(&mut self, key: RawClaimedKey) {
        self.keys.push(key);
    }

    /// Records that the target's device changed (R11.1).
    pub fn changed(&mut self, target: usize) {
        self.changed.push(target);
    }

    /// How many keys the claim took.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the claim changed any device (took a one-time key or marked
    /// a fallback key used): whether it wrote anything.
    pub fn changed_any(&self) -> bool {
        !self.changed.is_empty()
    }

    /// Whether the claim took nothing.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The claim's answer, given the targets it was run with (claim targets
    /// or fallback targets: anything that names its device).
    ///
    /// # Errors
    /// [`Error::Corrupt`] when a stored key ID, key JSON or digest does not
    /// read back, or a target index is out of range.
    pub fn decode<T: AsRef<Device>>(self, targets: &[T]) -> Result<ClaimOutcome> {
        let device = |i: usize| {
            targets
                .get(i)
                .map(|t| t.as_ref().clone())
                .ok_or_else(|| Error::corrupt("claim answer names an unknown target"))
        };
        let mut keys = Vec::with_capacity(self.keys.len());
        for raw in self.keys {
            let digest = decode::digest(&raw.digest)?;
            keys.push(ClaimedKey {
                device: device(raw.target)?,
                key_id: decode::key_id(raw.key_id)?,
                key_json: decode::key_json_with_digest(raw.key_json, digest)?,
                fallback: raw.fallback,
            });
        }
        let changed = self
            .changed
            .into_iter()
            .map(device)
            .collect::<Result<Vec<_>>>()?;
        Ok(ClaimOutcome {
            keys,
            changes: Changes::from_devices(changed),
        })
    }
}
