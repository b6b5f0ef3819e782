//! The operations, on a [`Source`] (reads) or a [`Txn`] (writes), one file
//! per kind: [`mod@upload`] (uploads and device replacement),
//! [`mod@claim`] (claims and the two steps of a split claim), [`read`]
//! (counts, sync state, fallback keys), [`delete`] (devices, users, key
//! reset) and [`transfer`] (export and import). This file holds what they
//! share: device records, stored keys, the sequence counter.
//!
//! An operation returns `Err` for anything that stops it: a request the
//! rules reject, an engine failure, corrupt data. The writer then drops what
//! the operation wrote to its [`Txn`], so that it fails alone and its
//! batch-mates go on.

mod claim;
mod delete;
mod read;
mod transfer;
mod upload;

use keyclaim::backend::decode;
use keyclaim::transfer::KeyDigest;
use keyclaim::{Error, KeyId, KeyJson, Limits, Result};

pub(crate) use claim::{claim, claim_fallbacks};
pub(crate) use delete::{delete_device, delete_user, reset_one_time_keys};
pub(crate) use read::{counts_many, fallback_keys, sync_state};
pub(crate) use transfer::{export_devices, import_device};
pub(crate) use upload::upload;

use crate::engine::Space;
use crate::schema::{
    DeviceRecord, Digest, KeyRow, META_NEXT_SEQ, decode_u64, device_key, id_row, key_row, parse_key,
};
use crate::txn::{Source, Txn};

/// The record of a device; empty when it has none.
pub(crate) fn load_record(src: &impl Source, user: &str, device: &str) -> Result<DeviceRecord> {
    match src.get(Space::Devices, &device_key(user, device))? {
        Some(value) => DeviceRecord::decode(user, device, &value),
        None => Ok(DeviceRecord::default()),
    }
}

/// Writes a device's record; an empty record is deleted.
pub(crate) fn store_record(txn: &mut Txn<'_>, user: &str, device: &str, record: &DeviceRecord) {
    let key = device_key(user, device);
    if record.is_empty() {
        txn.delete(Space::Devices, key);
    } else {
        txn.put(Space::Devices, key, record.encode());
    }
}

/// A stored key: its key ID, and its JSON checked with the digest stored
/// next to it ([`decode::key_json_with_digest`]). A value that does not
/// decode is [`Error::Corrupt`] naming the key (`what`, e.g. "one-time
/// key") and its device: the claim that meets it fails before anything is
/// written, the export (and so `check`) reports it (R10.7).
pub(crate) fn stored_key(
    (user, device): (&str, &str),
    what: &str,
    key_id: &str,
    json: &str,
    digest: Digest,
) -> Result<(KeyId, KeyJson)> {
    let decoded = decode::key_id(key_id).and_then(|id| {
        let json = decode::key_json_with_digest(json, KeyDigest::from_bytes(digest))?;
        Ok((id, json))
    });
    decoded.map_err(|e| Error::corrupt_because(format!("{what} {key_id} of {user} {device}"), e))
}

/// `limits.remembered_issued_keys` as a queue distance: a key issued at
/// position `pos` of a queue whose head is `head` is remembered while
/// `head - pos <= keep` (R3.4), exactly the newest `keep`.
pub(crate) fn remembered_limit(limits: &Limits) -> u64 {
    u64::try_from(limits.remembered_issued_keys).unwrap_or(u64::MAX)
}

/// The next upload sequence number (R3.5), as stored.
fn next_seq(txn: &Txn<'_>) -> Result<u64> {
    match txn.get(Space::Meta, META_NEXT_SEQ)? {
        Some(v) => decode_u64("next_seq", &v),
        None => Err(Error::corrupt(
            "the key-value store has no sequence counter",
        )),
    }
}

/// Takes the next upload sequence number (R3.5).
pub(crate) fn take_seq(txn: &mut Txn<'_>) -> Result<u64> {
    let seq = next_seq(txn)?;
    set_seq(txn, seq.saturating_add(1));
    Ok(seq)
}

/// Raises the sequence counter to at least `at_least`.
pub(crate) fn raise_seq_to(txn: &mut Txn<'_>, at_least: u64) -> Result<()> {
    if next_seq(txn)? < at_least {
        set_seq(txn, at_least);
    }
    Ok(())
}

fn set_seq(txn: &mut Txn<'_>, next: u64) {
    txn.put(
        Space::Meta,
        META_NEXT_SEQ.to_vec(),
        next.to_be_bytes().to_vec(),
    );
}

/// Appends a key at the end of a queue: its `keys` and `ids` rows.
pub(crate) fn append(
    txn: &mut Txn<'_>,
    (user, device, alg): (&str, &str, &str),
    end: &mut u64,
    row: (u64, &Digest, &str, &str),
) {
    let (seq, digest, key_id, json) = row;
    let pos = *end;
    *end = end.saturating_add(1);
    txn.put(
        Space::Keys,
        key_row(user, device, alg, pos),
        KeyRow::encode(seq, digest, key_id, json),
    );
    txn.put(
        Space::Ids,
        id_row(user, device, key_id, pos),
        digest.to_vec(),
    );
}

/// Removes the rows of a queue's positions `from..to` (their `keys` and
/// `ids` rows) and answers them, decoded, with their positions.
pub(crate) fn remove_queue_rows(
    txn: &mut Txn<'_>,
    (user, device, alg): (&str, &str, &str),
    from: u64,
    to: u64,
) -> Result<Vec<(u64, KeyRow)>> {
    let rows = txn.scan(
        Space::Keys,
        &key_row(user, device, alg, from),
        &key_row(user, device, alg, to),
    )?;
    let mut out = Vec::with_capacity(rows.len());
    for (key, value) in rows {
        let pos = parse_key(Space::Keys, &key, 3, true)?
            .pos
            .unwrap_or(u64::MAX);
        let row = KeyRow::decode(user, device, pos, &value)?;
        txn.delete(Space::Ids, id_row(user, device, &row.key_id, pos));
        txn.delete(Space::Keys, key);
        out.push((pos, row));
    }
    Ok(out)
}
