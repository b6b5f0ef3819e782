//! The file layout: table definitions, the format version, the migration
//! from older formats, and the key bounds that turn "everything of one
//! device" into one key range.
//!
//! Every table's key starts with `(user ID, device ID)`, so that a device's
//! or a user's rows are one contiguous range in each table (deletion is a
//! range deletion, R7.1, R7.2). Strings compare by their bytes inside redb's
//! tuple keys, element by element, which is the byte order R2.7 asks for.
//!
//! # Format version 2
//!
//! | table | key | value | what for |
//! | --- | --- | --- | --- |
//! | `meta` | name | `u64` | format version, the upload sequence counter (R3.5) |
//! | `otk_queue` | (user, device, algorithm) | (first, head, end) | the queue of a (device, algorithm); absent when empty |
//! | `otk_keys` | (user, device, algorithm, pos) | (seq, key ID, digest, canonical JSON) | every key of a queue, in claim order |
//! | `otk_ids` | (user, device, key ID, pos) | digest | re-upload checks (R3.2, R3.4) |
//! | `fallbacks` | (user, device, algorithm) | (key ID, JSON, used, digest) | R4.4, R5.x, R6.3 |
//!
//! A (device, algorithm) queue numbers its keys with positions `pos`,
//! handed out in upload order (upload sequence, then key ID: R3.5) without
//! gaps. The keys at `head..end` are stored (claimable, counted: R6.1, R8.1);
//! the keys at `first..head` were issued and are the remembered issued keys
//! (R3.4). A claim reads the key at `head` and rewrites the small queue
//! record, and nothing else: redb's copy-on-write B-trees rewrite every
//! modified leaf and its path to the root on each commit, so a claim that
//! removed the key from two tables and inserted it into two more dirtied
//! four leaves of its own per device; now the claims of a batch share the
//! few leaves of `otk_queue`. Exactly the newest `remembered_issued_keys`
//! issued keys are remembered (R3.4); the rows of older ones are removed in
//! one contiguous range by the next upload once more than [`PRUNE_CHUNK`]
//! wait (a claim adds no row, so claims never prune). A
//! remembered key imported or migrated without its JSON has an empty JSON
//! text; it is never handed out again.
//!
//! Counts (R6.4) are `end - head` of the device's queue records: one short
//! range read.
//!
//! A key reset (R13.1) may remove stored keys from the middle of `head..end`.
//! Positions stay without gaps (a claim reads `head..` position by position):
//! the stored keys after the first removed one move down, keeping their
//! order and upload sequence, and `end` shrinks by the number removed. The
//! format is unchanged.
//!
//! # Format version 1
//!
//! Version 1 deleted a claimed key from `otks` and `otk_index` and inserted
//! it into `issued` and `issued_index`, with per-(device, algorithm) counts in
//! `alg_counts`. Opening a version 1 file migrates it to version 2 in one
//! write transaction ([`migrate_v1`]): a crash during the migration leaves
//! the version 1 file as it was.

use std::collections::BTreeMap;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use keyclaim::{Error, Result};

use crate::BACKEND;
use crate::error::storage;

/// The newest file format this build reads and writes.
pub const FORMAT_VERSION: u64 = 2;

/// `meta` key of the format version.
pub(crate) const META_VERSION: &str = "format_version";
/// `meta` key of the next sequence number (upload positions, R3.5).
pub(crate) const META_NEXT_SEQ: &str = "next_seq";

/// How many rows of forgotten issued keys a queue may hold before an upload
/// removes them, in one range, down to the remembered limit.
pub(crate) const PRUNE_CHUNK: u64 = 64;

/// A digest of key JSON without signatures, as stored.
pub(crate) type Digest = [u8; 32];

pub(crate) const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");

/// (user, device, algorithm): the key of a queue and of a fallback key.
pub(crate) type DeviceAlgKey<'a> = (&'a str, &'a str, &'a str);

/// A queue's positions `(first, head, end)`: `first..head` are remembered
/// issued keys, `head..end` stored keys.
pub(crate) type Queue = (u64, u64, u64);
pub(crate) const OTK_QUEUE: TableDefinition<'_, DeviceAlgKey<'_>, Queue> =
    TableDefinition::new("otk_queue");

/// (user, device, algorithm, pos) -> (seq, key ID, digest, canonical JSON).
pub(crate) type OtkKey<'a> = (&'a str, &'a str, &'a str, u64);
pub(crate) type OtkValue<'a> = (u64, &'a str, Digest, &'a str);
pub(crate) const OTK_KEYS: TableDefinition<'_, OtkKey<'_>, OtkValue<'_>> =
    TableDefinition::new("otk_keys");

/// (user, device, key ID, pos) -> digest.
pub(crate) type OtkIdKey<'a> = (&'a str, &'a str, &'a str, u64);
pub(crate) const OTK_IDS: TableDefinition<'_, OtkIdKey<'_>, Digest> =
    TableDefinition::new("otk_ids");

/// (user, device, algorithm) -> (key ID, canonical JSON, used, digest).
pub(crate) type FallbackValue<'a> = (&'a str, &'a str, bool, Digest);
pub(crate) const FALLBACKS: TableDefinition<'_, DeviceAlgKey<'_>, FallbackValue<'_>> =
    TableDefinition::new("fallbacks");

/// The tables of format version 1, for [`migrate_v1`].
pub(crate) mod v1 {
    use redb::TableDefinition;

    use super::Digest;

    /// (user, device, algorithm, seq, key ID) -> canonical key JSON.
    pub(crate) const OTKS: TableDefinition<'_, (&str, &str, &str, u64, &str), &str> =
        TableDefinition::new("otks");
    /// (user, device, key ID) -> (seq, digest).
    pub(crate) const OTK_INDEX: TableDefinition<'_, (&str, &str, &str), (u64, Digest)> =
        TableDefinition::new("otk_index");
    /// (user, device, algorithm) -> (stored OTKs, remembered issued keys).
    pub(crate) const ALG_COUNTS: TableDefinition<'_, (&str, &str, &str), (u64, u64)> =
        TableDefinition::new("alg_counts");
    /// (user, device, algorithm, issue seq) -> (key ID, digest).
    pub(crate) const ISSUED: TableDefinition<'_, (&str, &str, &str, u64), (&str, Digest)> =
        TableDefinition::new("issued");
    /// (user, device, key ID, digest) -> issue seq.
    pub(crate) const ISSUED_INDEX: TableDefinition<'_, (&str, &str, &str, Digest), u64> =
        TableDefinition::new("issued_index");
}

/// The smallest string that sorts after `s` in byte order: `s` followed by
/// a NUL. Every string that starts with `s` and is longer sorts at or after
/// it, every string that sorts after `s` sorts at or after it too; so a tuple
/// whose element is `succ(s)` is an exclusive upper bound of all tuples with
/// `s` in that place.
pub(crate) fn succ(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 1);
    out.push_str(s);
    out.push('\0');
    out
}

/// Creates the tables of a new file, migrates a version 1 file, or checks
/// the format version of an existing one.
///
/// # Errors
/// [`Error::UnsupportedVersion`] when the file was written by a newer (or
/// an unknown) format; [`Error::Storage`] on I/O failures;
/// [`Error::Corrupt`] when a version 1 file does not migrate.
pub(crate) fn init_or_check(db: &Database) -> Result<()> {
    // A read first: a file of an unknown version must not be written to.
    let read = db.begin_read().map_err(storage("open"))?;
    let found = match read.open_table(META) {
        Ok(meta) => match meta.get(META_VERSION).map_err(storage("open"))? {
            Some(v) => Some(v.value()),
            None => {
                return Err(Error::corrupt(
                    "redb file has a meta table without a format version",
                ));
            }
        },
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(storage("open")(e)),
    };
    drop(read);
    match found {
        Some(FORMAT_VERSION) => Ok(()),
        Some(1) => {
            let span = tracing::info_span!("keyclaim.redb.migrate", from = 1, to = FORMAT_VERSION);
            let _enter = span.enter();
            let txn = db.begin_write().map_err(storage("migrate"))?;
            migrate_v1(&txn)?;
            txn.commit().map_err(storage("migrate"))?;
            tracing::info!("migrated a redb key store from format 1 to format {FORMAT_VERSION}");
            Ok(())
        }
        Some(other) => Err(Error::UnsupportedVersion {
            backend: BACKEND,
            found: i64::try_from(other).unwrap_or(i64::MAX),
            supported: FORMAT_VERSION as i64,
        }),
        None => {
            // A new file: create every table and stamp the version in one
            // commit.
            let txn = db.begin_write().map_err(storage("open"))?;
            {
                let mut meta = txn.open_table(META).map_err(storage("open"))?;
                meta.insert(META_VERSION, FORMAT_VERSION)
                    .map_err(storage("open"))?;
                meta.insert(META_NEXT_SEQ, 1).map_err(storage("open"))?;
            }
            create_tables(&txn)?;
            txn.commit().map_err(storage("open"))?;
            Ok(())
        }
    }
}

/// Creates the tables of the current format (opening one creates it).
fn create_tables(txn: &WriteTransaction) -> Result<()> {
    txn.open_table(OTK_QUEUE).map_err(storage("open"))?;
    txn.open_table(OTK_KEYS).map_err(storage("open"))?;
    txn.open_table(OTK_IDS).map_err(storage("open"))?;
    txn.open_table(FALLBACKS).map_err(storage("open"))?;
    Ok(())
}

/// Rewrites a version 1 file as version 2 inside `txn` (the caller commits):
/// per (device, algorithm), the remembered issued keys in issue order, then
/// the stored keys in claim order (seq, key ID), become one queue; the
/// version 1 tables are deleted and the version stamped. Fallback keys and
/// the sequence counter stay as they are.
///
/// # Errors
/// [`Error::Storage`] on redb failures, [`Error::Corrupt`] when a stored key
/// has no index row.
pub(crate) fn migrate_v1(txn: &WriteTransaction) -> Result<()> {
    create_tables(txn)?;
    {
        let mut queues: BTreeMap<(String, String, String), Queue> = BTreeMap::new();
        let mut keys = txn.open_table(OTK_KEYS).map_err(storage("migrate"))?;
        let mut ids = txn.open_table(OTK_IDS).map_err(storage("migrate"))?;
        // Remembered issued keys first: they lie before the head.
        let issued = txn.open_table(v1::ISSUED).map_err(storage("migrate"))?;
        for row in issued.iter().map_err(storage("migrate"))? {
            let (k, v) = row.map_err(storage("migrate"))?;
            let (u, d, a, _) = k.value();
            let (key_id, digest) = v.value();
            let q = queues
                .entry((u.to_owned(), d.to_owned(), a.to_owned()))
                .or_insert((0, 0, 0));
            let pos = q.2;
            q.2 += 1;
            q.1 = q.2;
            keys.insert((u, d, a, pos), (0, key_id, digest, ""))
                .map_err(storage("migrate"))?;
            ids.insert((u, d, key_id, pos), digest)
                .map_err(storage("migrate"))?;
        }
        drop(issued);
        // Then the stored keys, in claim order (the v1 table's order).
        let otks = txn.open_table(v1::OTKS).map_err(storage("migrate"))?;
        let index = txn.open_table(v1::OTK_INDEX).map_err(storage("migrate"))?;
        for row in otks.iter().map_err(storage("migrate"))? {
            let (k, v) = row.map_err(storage("migrate"))?;
            let (u, d, a, seq, key_id) = k.value();
            let digest = index
                .get((u, d, key_id))
                .map_err(storage("migrate"))?
                .map(|e| e.value().1)
                .ok_or_else(|| {
                    Error::corrupt(format!(
                        "format 1 file: one-time key {key_id} of {u} {d} has no index row"
                    ))
                })?;
            let q = queues
                .entry((u.to_owned(), d.to_owned(), a.to_owned()))
                .or_insert((0, 0, 0));
            let pos = q.2;
            q.2 += 1;
            keys.insert((u, d, a, pos), (seq, key_id, digest, v.value()))
                .map_err(storage("migrate"))?;
            ids.insert((u, d, key_id, pos), digest)
                .map_err(storage("migrate"))?;
        }
        drop(otks);
        drop(index);
        let mut queue = txn.open_table(OTK_QUEUE).map_err(storage("migrate"))?;
        for ((u, d, a), q) in &queues {
            queue
                .insert((u.as_str(), d.as_str(), a.as_str()), q)
                .map_err(storage("migrate"))?;
        }
        let mut meta = txn.open_table(META).map_err(storage("migrate"))?;
        meta.insert(META_VERSION, FORMAT_VERSION)
            .map_err(storage("migrate"))?;
    }
    let gone = storage("migrate");
    txn.delete_table(v1::OTKS).map_err(&gone)?;
    txn.delete_table(v1::OTK_INDEX).map_err(&gone)?;
    txn.delete_table(v1::ALG_COUNTS).map_err(&gone)?;
    txn.delete_table(v1::ISSUED).map_err(&gone)?;
    txn.delete_table(v1::ISSUED_INDEX).map_err(&gone)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn succ_bounds_exactly_one_prefix() {
        let d = "DEV";
        let hi = succ(d);
        assert!(d < hi.as_str());
        assert!("DEV\u{1}" > hi.as_str());
        assert!("DEVA" > hi.as_str());
        assert!("DEU\u{10FFFF}" < d);
        // Tuples compare element by element, so (d, anything) < (succ(d), "").
        assert!((d, "\u{10FFFF}\u{10FFFF}") < (hi.as_str(), ""));
    }
}
