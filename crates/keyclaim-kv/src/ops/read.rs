//! Counts and sync state (R6.1 to R6.4), fallback keys (R15.1) and the sync
//! state of many devices (R16.1): each one point read of a device record,
//! which a batch always writes whole, so each device's answer is consistent
//! in itself without a snapshot.

use std::collections::BTreeMap;

use keyclaim::backend::decode;
use keyclaim::transfer::StoredFallback;
use keyclaim::{Algorithm, Device, OtkCounts, Result, SyncState};

use super::{load_record, stored_key};
use crate::engine::{KvEngine, Space};
use crate::error::engine_failed;
use crate::schema::{DeviceRecord, device_key};
use crate::txn::Source;

/// The OTK counts of a record (R6.1).
pub(crate) fn counts(record: &DeviceRecord) -> Result<OtkCounts> {
    record
        .queues
        .iter()
        .map(|(alg, q)| Ok((decode::algorithm(alg.as_str())?, q.stored())))
        .collect()
}

/// Counts and unused fallback types (sorted by bytes, R6.3) of a record.
fn state_of(record: &DeviceRecord) -> Result<SyncState> {
    let mut unused = Vec::new();
    // The record's map is in byte order already.
    for (alg, f) in &record.fallbacks {
        if !f.used {
            unused.push(decode::algorithm(alg.as_str())?);
        }
    }
    Ok(SyncState {
        one_time_key_counts: counts(record)?,
        unused_fallback_key_types: unused,
    })
}

/// The sync state of one device.
pub(crate) fn sync_state(src: &impl Source, device: &Device) -> Result<SyncState> {
    state_of(&load_record(
        src,
        device.user_id.as_str(),
        device.device_id.as_str(),
    )?)
}

/// The sync state of each device, in the order given (R16.1): one batched
/// point read of the records ([`KvEngine::get_many`]), so the cost grows
/// with the number of devices asked, never with the size of the store.
pub(crate) fn counts_many(engine: &dyn KvEngine, devices: &[Device]) -> Result<Vec<SyncState>> {
    let keys: Vec<Vec<u8>> = devices
        .iter()
        .map(|d| device_key(d.user_id.as_str(), d.device_id.as_str()))
        .collect();
    let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    let values = engine
        .get_many(Space::Devices, &refs)
        .map_err(engine_failed("counts_many"))?;
    if values.len() != devices.len() {
        return Err(keyclaim::Error::storage(
            crate::BACKEND,
            "counts_many",
            false,
            "the engine's get_many answered another number of values than keys asked",
        ));
    }
    devices
        .iter()
        .zip(values)
        .map(|(device, value)| match value {
            Some(value) => state_of(&DeviceRecord::decode(
                device.user_id.as_str(),
                device.device_id.as_str(),
                &value,
            )?),
            None => Ok(SyncState::default()),
        })
        .collect()
}

/// A record's fallback keys by algorithm, with their used flags (R15.1).
pub(crate) fn fallbacks_of(
    (user, device): (&str, &str),
    record: &DeviceRecord,
) -> Result<BTreeMap<Algorithm, StoredFallback>> {
    let mut out = BTreeMap::new();
    for (alg, f) in &record.fallbacks {
        let (key_id, key_json) =
            stored_key((user, device), "fallback key", &f.key_id, &f.json, f.digest)?;
        out.insert(
            decode::algorithm(alg.as_str())?,
            StoredFallback {
                key_id,
                key_json,
                used: f.used,
            },
        );
    }
    Ok(out)
}

/// The fallback keys of one device (R15.1).
pub(crate) fn fallback_keys(
    src: &impl Source,
    device: &Device,
) -> Result<BTreeMap<Algorithm, StoredFallback>> {
    let (u, d) = (device.user_id.as_str(), device.device_id.as_str());
    fallbacks_of((u, d), &load_record(src, u, d)?)
}
