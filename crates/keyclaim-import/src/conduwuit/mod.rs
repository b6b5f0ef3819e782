//! The conduwuit family's RocksDB (conduit, conduwuit, continuwuity,
//! tuwunel): one-time keys from tuwunel's MSC4225 column family
//! `onetimekeyid4225_otk` (upload order) or the older
//! `onetimekeyid_onetimekeys` (key ID order), fallback keys with their used
//! flag from tuwunel's `userdeviceidalgorithm_fallback` or continuwuity's
//! `fallbackkeyid_fallbackkey`. The encodings, with the source files they
//! come from, are in the crate's README.
//!
//! Reading RocksDB needs the `conduwuit` feature; without it
//! [`import_rocksdb`] returns [`keyclaim::Error::InvalidConfig`] (see
//! [`SUPPORTED`]). The database is opened read-only: nothing in it is
//! created, changed or locked.

mod layout;
#[cfg(feature = "conduwuit")]
mod rocks;
mod walk;

use std::path::Path;

use keyclaim::{KeyStore, Result};

use crate::run::{ImportOptions, ImportReport};

pub use layout::{FallbackLayout, Layout, OtkLayout};

/// Whether this build reads RocksDB (the `conduwuit` feature).
pub const SUPPORTED: bool = cfg!(feature = "conduwuit");

/// Finds which of the family's key column families the RocksDB database at
/// `path` holds, from their names (nothing is opened or read).
///
/// # Errors
/// [`keyclaim::Error::InvalidConfig`] when `path` is not a RocksDB
/// database, not one of the family (no one-time key column family), or
/// this build has no RocksDB ([`SUPPORTED`] is false).
pub async fn layout(path: impl AsRef<Path>) -> Result<Layout> {
    imp::layout(path.as_ref()).await
}

/// Imports every device's one-time and fallback keys from the RocksDB
/// database at `path` (opened read-only) into `store`, then checks the
/// target and compares per-device counts with the source.
///
/// One-time keys keep the best order the source has: upload order from
/// `onetimekeyid4225_otk`, key ID order from `onetimekeyid_onetimekeys`
/// (the order those servers hand them out, R17.1). Fallback keys keep their
/// used flag. Each device is written with [`KeyStore::import_device`]
/// (replacing its state in the target), so a resumed import (with
/// [`ImportOptions::checkpoint`]) ends as a one-shot one.
///
/// # Errors
/// [`keyclaim::Error::InvalidConfig`] as [`layout`] says, and when an SST
/// file uses a compression this build cannot read;
/// [`keyclaim::Error::Corrupt`] for an entry that does not have its
/// column family's shape (naming the column family and the device, never
/// key material); RocksDB's, the store's and the checkpoint file's errors.
/// What was imported before an error stays, and the checkpoint (if any)
/// says where a new run resumes.
pub async fn import_rocksdb<S: KeyStore + ?Sized>(
    path: impl AsRef<Path>,
    store: &S,
    options: &ImportOptions,
) -> Result<ImportReport> {
    imp::import(path.as_ref(), store, options).await
}

#[cfg(feature = "conduwuit")]
mod imp {
    use super::*;
    use crate::run::run_rows;

    pub(super) async fn layout(path: &Path) -> Result<Layout> {
        rocks::layout(path).await
    }

    pub(super) async fn import<S: KeyStore + ?Sized>(
        path: &Path,
        store: &S,
        options: &ImportOptions,
    ) -> Result<ImportReport> {
        let tables = rocks::RocksTables::open(path).await?;
        run_rows(|at| tables.rows(&at, options.page), store, options).await
    }
}

#[cfg(not(feature = "conduwuit"))]
mod imp {
    use super::*;
    use keyclaim::Error;

    fn unsupported() -> Error {
        Error::invalid_config(
            "this build cannot read RocksDB: build keyclaim-import (or keyclaim-cli) with the \
             `conduwuit` feature",
        )
    }

    pub(super) async fn layout(_path: &Path) -> Result<Layout> {
        Err(unsupported())
    }

    pub(super) async fn import<S: KeyStore + ?Sized>(
        _path: &Path,
        _store: &S,
        _options: &ImportOptions,
    ) -> Result<ImportReport> {
        Err(unsupported())
    }
}
