//! Export and import of whole devices, for copying a store
//! (`keyclaim::transfer`), and what `check` reads.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use keyclaim::backend::decode;
use keyclaim::transfer::{AlgorithmQueue, DeviceSnapshot, IssuedKey, KeyDigest, StoredOtk};
use keyclaim::{Changes, Device, Error, Limits, Result};

use super::delete::delete_device_rows;
use super::read::fallbacks_of;
use super::{append, raise_seq_to, remembered_limit, store_record, stored_key};
use crate::engine::{KvEngine, Space};
use crate::error::engine_failed;
use crate::schema::{
    DeviceRecord, Fallback, KeyRow, Queue, decode_digest, device_key, parse_key, prefix_end,
};
use crate::txn::{Direct, Source, Txn};

/// Up to `limit` devices with state after `after`, in (user, device) byte
/// order (the order of the record keys). The caller keeps the writer from
/// applying a batch meanwhile, so that each snapshot is consistent.
///
/// Every row of an exported device is decoded: a record, key or value
/// keyclaim did not write is [`Error::Corrupt`], which `check` reports.
pub(crate) fn export_devices(
    engine: &dyn KvEngine,
    after: Option<&Device>,
    limit: usize,
    limits: &Limits,
) -> Result<Vec<DeviceSnapshot>> {
    let op = "export_devices";
    let start = after.map_or_else(Vec::new, |a| {
        device_key(a.user_id.as_str(), a.device_id.as_str())
    });
    let mut records: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    engine
        .scan(Space::Devices, &start, None, &mut |k, v| {
            if k == start.as_slice() {
                return ControlFlow::Continue(());
            }
            if records.len() == limit {
                return ControlFlow::Break(());
            }
            records.push((k.to_vec(), v.to_vec()));
            ControlFlow::Continue(())
        })
        .map_err(engine_failed(op))?;
    let src = Direct { engine, op };
    let keep = remembered_limit(limits);
    let mut out = Vec::with_capacity(records.len());
    for (key, value) in records {
        let parts = parse_key(Space::Devices, &key, 2, false)?;
        let device = decode::device(parts.strings[0], parts.strings[1])?;
        let (u, d) = (parts.strings[0], parts.strings[1]);
        let record = DeviceRecord::decode(u, d, &value)?;
        out.push(snapshot(&src, device, &record, keep)?);
    }
    Ok(out)
}

/// The whole state of one device; of its issued keys, the remembered ones
/// (the newest `keep` per algorithm).
fn snapshot(
    src: &Direct<'_>,
    device: Device,
    record: &DeviceRecord,
    keep: u64,
) -> Result<DeviceSnapshot> {
    let (u, d) = (device.user_id.as_str(), device.device_id.as_str());
    let prefix = device_key(u, d);
    let end = prefix_end(&prefix);
    let mut snap = DeviceSnapshot::empty(device.clone());
    let mut rows_per_alg: BTreeMap<String, u64> = BTreeMap::new();
    for (key, value) in src.scan(Space::Keys, &prefix, &end)? {
        let parts = parse_key(Space::Keys, &key, 3, true)?;
        let alg = parts.strings[2];
        let pos = parts.pos.unwrap_or(u64::MAX);
        let row = KeyRow::decode(u, d, pos, &value)?;
        let q = record.queues.get(alg).copied().ok_or_else(|| {
            Error::corrupt(format!(
                "one-time key {} of {device} has no {alg} queue",
                row.key_id
            ))
        })?;
        *rows_per_alg.entry(alg.to_owned()).or_default() += 1;
        if pos >= q.end || pos < q.first {
            return Err(Error::corrupt(format!(
                "one-time key {} of {device} lies outside its {alg} queue",
                row.key_id
            )));
        } else if pos >= q.head {
            let (key_id, key_json) =
                stored_key((u, d), "one-time key", &row.key_id, &row.json, row.digest)?;
            snap.one_time_keys.push(StoredOtk {
                key_id,
                key_json,
                seq: row.seq,
            });
        } else if q.head - pos <= keep {
            snap.issued
                .entry(decode::algorithm(alg)?)
                .or_default()
                .push(IssuedKey {
                    key_id: decode::key_id(row.key_id.as_str())?,
                    digest: KeyDigest::from_bytes(row.digest),
                });
        }
    }
    for (alg, q) in &record.queues {
        if rows_per_alg.get(alg).copied().unwrap_or(0) != q.end - q.first {
            return Err(Error::corrupt(format!(
                "the {alg} queue of {device} misses one-time keys"
            )));
        }
    }
    // The key ID index: every row must have keyclaim's shape.
    for (key, value) in src.scan(Space::Ids, &prefix, &end)? {
        let parts = parse_key(Space::Ids, &key, 3, true)?;
        decode_digest(parts.strings[2], &value)?;
    }
    snap.one_time_keys
        .sort_by(|a, b| (a.seq, a.key_id.as_str()).cmp(&(b.seq, b.key_id.as_str())));
    snap.fallback_keys = fallbacks_of((u, d), record)?;
    Ok(snap)
}

/// Replaces a device's state with a snapshot. Per algorithm, the remembered
/// issued keys (oldest first) go before the head of the queue, the OTKs
/// after it in (seq, key ID) order; OTKs keep the snapshot's sequence
/// numbers and the counter moves past them, so that later uploads sort
/// after every imported key.
pub(crate) fn import_device(txn: &mut Txn<'_>, snapshot: &DeviceSnapshot) -> Result<Changes> {
    let (u, d) = (
        snapshot.device.user_id.as_str(),
        snapshot.device.device_id.as_str(),
    );
    delete_device_rows(txn, u, d)?;
    let queues = snapshot.queues();
    let mut record = DeviceRecord::default();
    for (alg, AlgorithmQueue { issued, otks }) in queues.per_algorithm {
        let mut q = Queue::default();
        for key in issued {
            append(
                txn,
                (u, d, alg),
                &mut q.end,
                (0, key.digest.as_bytes(), key.key_id.as_str(), ""),
            );
        }
        q.head = q.end;
        for otk in otks {
            append(
                txn,
                (u, d, alg),
                &mut q.end,
                (
                    otk.seq,
                    otk.key_json.digest().as_bytes(),
                    otk.key_id.as_str(),
                    otk.key_json.canonical(),
                ),
            );
        }
        record.set_queue(alg, q);
    }
    for (alg, fb) in &snapshot.fallback_keys {
        record.fallbacks.insert(
            alg.as_str().to_owned(),
            Fallback {
                key_id: fb.key_id.as_str().to_owned(),
                used: fb.used,
                digest: *fb.key_json.digest().as_bytes(),
                json: fb.key_json.canonical().to_owned(),
            },
        );
    }
    store_record(txn, u, d, &record);
    raise_seq_to(txn, queues.max_seq.saturating_add(1))?;
    Ok(Changes::from_devices([snapshot.device.clone()]))
}
