//! The file layout: table definitions, the format version, and the key
//! bounds that turn "everything of one device" into one key range.
//!
//! Every table's key starts with `(user ID, device ID)`, so that a device's
//! or a user's rows are one contiguous range in each table (deletion is a
//! range deletion, R7.1, R7.2). Strings compare by their bytes inside redb's
//! tuple keys, element by element, which is the byte order R2.7 asks for.
//!
//! | table | key | value | what for |
//! | --- | --- | --- | --- |
//! | `meta` | name | `u64` | format version, the sequence counter (R3.5) |
//! | `otks` | (user, device, algorithm, seq, key ID) | canonical JSON | claim pops the first entry of a (device, algorithm) range (R4.2) |
//! | `otk_index` | (user, device, key ID) | (seq, digest) | re-upload checks (R3.2) |
//! | `alg_counts` | (user, device, algorithm) | (stored OTKs, remembered issued keys), not both 0 | counts without a scan (R6.4, R8.1), pruning without a scan (R3.4) |
//! | `fallbacks` | (user, device, algorithm) | (key ID, JSON, used, digest) | R4.4, R5.x, R6.3 |
//! | `issued` | (user, device, algorithm, issue seq) | (key ID, digest) | the remembered issued keys, oldest first (R3.4) |
//! | `issued_index` | (user, device, key ID, digest) | issue seq | R3.4 look-ups |
//!
//! A claim of one key costs about eight B-tree operations: the range read
//! and removal in `otks`, the `otk_index` removal, one read and one write of
//! `alg_counts` per target, two inserts into the issued tables and, once
//! the limit is reached, two removals to forget the oldest issued key.

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use keyclaim::{Error, Result};

use crate::BACKEND;

/// The newest file format this build reads and writes.
pub const FORMAT_VERSION: u64 = 1;

/// `meta` key of the format version.
pub(crate) const META_VERSION: &str = "format_version";
/// `meta` key of the next sequence number (upload positions and issue order).
pub(crate) const META_NEXT_SEQ: &str = "next_seq";

/// A digest of key JSON without signatures, as stored.
pub(crate) type Digest = [u8; 32];

pub(crate) const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");

/// (user, device, algorithm, seq, key ID) -> canonical key JSON.
pub(crate) type OtkKey<'a> = (&'a str, &'a str, &'a str, u64, &'a str);
pub(crate) const OTKS: TableDefinition<'_, OtkKey<'_>, &str> = TableDefinition::new("otks");

/// (user, device, key ID) -> (seq, digest).
pub(crate) type OtkIndexKey<'a> = (&'a str, &'a str, &'a str);
pub(crate) const OTK_INDEX: TableDefinition<'_, OtkIndexKey<'_>, (u64, Digest)> =
    TableDefinition::new("otk_index");

/// (user, device, algorithm) -> (stored OTKs, remembered issued keys);
/// absent when both are 0.
pub(crate) type DeviceAlgKey<'a> = (&'a str, &'a str, &'a str);
pub(crate) type AlgCounts = (u64, u64);
pub(crate) const ALG_COUNTS: TableDefinition<'_, DeviceAlgKey<'_>, AlgCounts> =
    TableDefinition::new("alg_counts");

/// (user, device, algorithm) -> (key ID, canonical JSON, used, digest).
pub(crate) type FallbackValue<'a> = (&'a str, &'a str, bool, Digest);
pub(crate) const FALLBACKS: TableDefinition<'_, DeviceAlgKey<'_>, FallbackValue<'_>> =
    TableDefinition::new("fallbacks");

/// (user, device, algorithm, issue seq) -> (key ID, digest).
pub(crate) type IssuedKey<'a> = (&'a str, &'a str, &'a str, u64);
pub(crate) const ISSUED: TableDefinition<'_, IssuedKey<'_>, (&str, Digest)> =
    TableDefinition::new("issued");

/// (user, device, key ID, digest) -> issue seq.
pub(crate) type IssuedIndexKey<'a> = (&'a str, &'a str, &'a str, Digest);
pub(crate) const ISSUED_INDEX: TableDefinition<'_, IssuedIndexKey<'_>, u64> =
    TableDefinition::new("issued_index");

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

/// Creates the tables of a new file, or checks the format version of an
/// existing one.
///
/// # Errors
/// [`Error::UnsupportedVersion`] when the file was written by a newer
/// format; [`Error::Storage`] on I/O failures.
pub(crate) fn init_or_check(db: &Database) -> Result<()> {
    // A read first: a file of an unknown version must not be written to.
    let read = db.begin_read().map_err(storage("open"))?;
    match read.open_table(META) {
        Ok(meta) => {
            let found = meta
                .get(META_VERSION)
                .map_err(storage("open"))?
                .map(|v| v.value());
            match found {
                Some(FORMAT_VERSION) => return Ok(()),
                Some(other) => {
                    return Err(Error::UnsupportedVersion {
                        backend: BACKEND,
                        found: i64::try_from(other).unwrap_or(i64::MAX),
                        supported: FORMAT_VERSION as i64,
                    });
                }
                None => {
                    return Err(Error::corrupt(
                        "redb file has a meta table without a format version",
                    ));
                }
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(storage("open")(e)),
    }
    drop(read);
    // A new file: create every table and stamp the version in one commit.
    let txn = db.begin_write().map_err(storage("open"))?;
    {
        let mut meta = txn.open_table(META).map_err(storage("open"))?;
        if meta.get(META_VERSION).map_err(storage("open"))?.is_none() {
            meta.insert(META_VERSION, FORMAT_VERSION)
                .map_err(storage("open"))?;
            meta.insert(META_NEXT_SEQ, 1).map_err(storage("open"))?;
        }
        txn.open_table(OTKS).map_err(storage("open"))?;
        txn.open_table(OTK_INDEX).map_err(storage("open"))?;
        txn.open_table(ALG_COUNTS).map_err(storage("open"))?;
        txn.open_table(FALLBACKS).map_err(storage("open"))?;
        txn.open_table(ISSUED).map_err(storage("open"))?;
        txn.open_table(ISSUED_INDEX).map_err(storage("open"))?;
    }
    txn.commit().map_err(storage("open"))?;
    Ok(())
}

/// Maps a redb error to [`Error::Storage`] for operation `op`.
pub(crate) fn storage<E>(op: &'static str) -> impl FnOnce(E) -> Error
where
    E: Into<redb::Error>,
{
    move |e| {
        let e: redb::Error = e.into();
        Error::storage(BACKEND, op, false, e)
    }
}

/// Whether a redb error means "the file is held by another handle".
pub(crate) fn is_already_open(e: &redb::DatabaseError) -> bool {
    matches!(e, redb::DatabaseError::DatabaseAlreadyOpen)
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
