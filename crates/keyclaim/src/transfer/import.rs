//! Import from another homeserver's key tables (R17.1), independent of how
//! they are stored: rows shaped like the reference homeserver's (Synapse's
//! `e2e_one_time_keys_json` and `e2e_fallback_keys_json`) are grouped into
//! one [`DeviceSnapshot`] per device and written with
//! [`KeyStore::import_device`], which replaces a device's whole state, so
//! that importing a device again is harmless and an interrupted import
//! resumes after the last device it finished.
//!
//! Memory holds one device and one page of rows at a time, whatever the
//! source's size.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fmt;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::ids::{Algorithm, Device, DeviceId, KeyId, UserId};
use crate::key_json::KeyJson;
use crate::limits::{Limits, OtkCap};
use crate::store::KeyStore;
use crate::types::{DeviceSnapshot, StoredFallback, StoredOtk};

/// How many [`Skip`]s an [`ImportTally`] keeps as examples.
pub const MAX_SKIP_EXAMPLES: usize = 50;

/// One stored one-time key, as the reference homeserver keeps it: the
/// algorithm and the key's name in separate columns, the upload time in
/// milliseconds, the key JSON as text.
#[derive(Clone, PartialEq, Eq)]
pub struct SourceOtk {
    /// The user ID, unvalidated.
    pub user_id: String,
    /// The device ID, unvalidated.
    pub device_id: String,
    /// The algorithm (the part of the key ID before `:`).
    pub algorithm: String,
    /// The key's name (the part of the key ID after `:`).
    pub key_id: String,
    /// When it was uploaded: the claim order is this time, then key ID.
    pub ts_added_ms: i64,
    /// The key JSON as stored.
    pub key_json: String,
}

/// One stored fallback key, as the reference homeserver keeps it.
#[derive(Clone, PartialEq, Eq)]
pub struct SourceFallback {
    /// The user ID, unvalidated.
    pub user_id: String,
    /// The device ID, unvalidated.
    pub device_id: String,
    /// The algorithm (the part of the key ID before `:`).
    pub algorithm: String,
    /// The key's name (the part of the key ID after `:`).
    pub key_id: String,
    /// The key JSON as stored.
    pub key_json: String,
    /// Whether a claim has handed it out since it was uploaded.
    pub used: bool,
}

// Debug names IDs and sizes, never key material.
impl fmt::Debug for SourceOtk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceOtk")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("algorithm", &self.algorithm)
            .field("key_id", &self.key_id)
            .field("ts_added_ms", &self.ts_added_ms)
            .field("key_json_len", &self.key_json.len())
            .finish()
    }
}

impl fmt::Debug for SourceFallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceFallback")
            .field("user_id", &self.user_id)
            .field("device_id", &self.device_id)
            .field("algorithm", &self.algorithm)
            .field("key_id", &self.key_id)
            .field("used", &self.used)
            .field("key_json_len", &self.key_json.len())
            .finish()
    }
}

/// One row of a source: a one-time key or a fallback key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceRow {
    /// A one-time key.
    OneTimeKey(SourceOtk),
    /// A fallback key.
    Fallback(SourceFallback),
}

impl SourceRow {
    /// The row's user ID, unvalidated.
    pub fn user_id(&self) -> &str {
        match self {
            Self::OneTimeKey(k) => &k.user_id,
            Self::Fallback(k) => &k.user_id,
        }
    }

    /// The row's device ID, unvalidated.
    pub fn device_id(&self) -> &str {
        match self {
            Self::OneTimeKey(k) => &k.device_id,
            Self::Fallback(k) => &k.device_id,
        }
    }

    /// The full key ID, `<algorithm>:<name>`, unvalidated.
    pub fn full_key_id(&self) -> String {
        match self {
            Self::OneTimeKey(k) => format!("{}:{}", k.algorithm, k.key_id),
            Self::Fallback(k) => format!("{}:{}", k.algorithm, k.key_id),
        }
    }

    fn is_fallback(&self) -> bool {
        matches!(self, Self::Fallback(_))
    }
}

/// Where a source of rows is read: the rows of all devices in (user ID,
/// device ID) byte order (R2.7), a page at a time.
#[async_trait]
pub trait RowSource: Send {
    /// The next rows, continuing where the previous call ended; an empty
    /// page when every row was returned. All rows of one device may span
    /// several pages, but no row of a device comes after a row of a later
    /// device.
    ///
    /// # Errors
    /// The source's errors.
    async fn next_rows(&mut self) -> Result<Vec<SourceRow>>;
}

/// A [`RowSource`] over rows already in memory, handed out `page` at a time
/// (for tests and small sources).
#[derive(Debug, Clone)]
pub struct RowsInMemory {
    rows: VecDeque<SourceRow>,
    page: usize,
}

impl RowsInMemory {
    /// Rows in (user ID, device ID) order, `page` (at least 1) per call.
    pub fn new(rows: impl IntoIterator<Item = SourceRow>, page: usize) -> Self {
        Self {
            rows: rows.into_iter().collect(),
            page: page.max(1),
        }
    }
}

#[async_trait]
impl RowSource for RowsInMemory {
    async fn next_rows(&mut self) -> Result<Vec<SourceRow>> {
        let n = self.page.min(self.rows.len());
        Ok(self.rows.drain(..n).collect())
    }
}

/// Why a row (or a whole device) was not imported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SkipReason {
    /// The user ID is not valid (R2.1, R2.8): every row of the device.
    InvalidUserId,
    /// The device ID is not valid (R2.2, R2.8): every row of the device.
    InvalidDeviceId,
    /// The algorithm and name do not make a valid key ID (R2.3, R2.8).
    InvalidKeyId,
    /// The key JSON is not JSON or not key JSON (R2.4).
    InvalidKeyJson,
    /// The key JSON is longer than the target's limit (R8.2).
    KeyJsonTooLarge,
    /// A second row with the same key ID (or, for fallback keys, the same
    /// algorithm) for one device; the first one is kept.
    Duplicate,
    /// One-time keys past the target's limit per device and algorithm
    /// (R8.1), or per device when the target caps per device (R8.4): the
    /// ones that would be handed out last are left out.
    OverLimit,
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::InvalidUserId => "invalid user ID",
            Self::InvalidDeviceId => "invalid device ID",
            Self::InvalidKeyId => "invalid key ID",
            Self::InvalidKeyJson => "invalid key JSON",
            Self::KeyJsonTooLarge => "key JSON over the size limit",
            Self::Duplicate => "duplicate",
            Self::OverLimit => "over the one-time key limit",
        })
    }
}

/// A row left out, named by its IDs (never its key material).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skip {
    /// The user ID as stored.
    pub user_id: String,
    /// The device ID as stored.
    pub device_id: String,
    /// The full key ID, or `None` when the whole device was skipped.
    pub key_id: Option<String>,
    /// Whether it is a fallback key.
    pub fallback: bool,
    /// Why.
    pub reason: SkipReason,
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // IDs are shown escaped: they may hold control characters.
        write!(f, "{:?} {:?}", self.user_id, self.device_id)?;
        match &self.key_id {
            Some(k) if self.fallback => write!(f, " fallback key {k:?}")?,
            Some(k) => write!(f, " one-time key {k:?}")?,
            None => write!(f, " (whole device)")?,
        }
        write!(f, ": {}", self.reason)
    }
}

/// What an import assembled and left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportTally {
    /// Devices written to the target.
    pub devices: u64,
    /// One-time keys written.
    pub one_time_keys: u64,
    /// Fallback keys written.
    pub fallback_keys: u64,
    /// Of those, fallback keys marked used.
    pub used_fallback_keys: u64,
    /// Devices left out whole (invalid user or device ID).
    pub skipped_devices: u64,
    /// One-time keys left out (with their device, or alone).
    pub skipped_one_time_keys: u64,
    /// Fallback keys left out (with their device, or alone).
    pub skipped_fallback_keys: u64,
    /// The first [`MAX_SKIP_EXAMPLES`] rows or devices left out.
    pub skips: Vec<Skip>,
}

impl ImportTally {
    fn skip(&mut self, skip: Skip) {
        if skip.fallback {
            self.skipped_fallback_keys += 1;
        } else {
            self.skipped_one_time_keys += 1;
        }
        self.example(skip);
    }

    fn example(&mut self, skip: Skip) {
        if self.skips.len() < MAX_SKIP_EXAMPLES {
            self.skips.push(skip);
        }
    }

    fn imported(&mut self, snapshot: &DeviceSnapshot) {
        self.devices += 1;
        self.one_time_keys += snapshot.one_time_keys.len() as u64;
        self.fallback_keys += snapshot.fallback_keys.len() as u64;
        self.used_fallback_keys +=
            snapshot.fallback_keys.values().filter(|f| f.used).count() as u64;
    }
}

/// The rows of the device being assembled.
struct Pending {
    user_id: String,
    device_id: String,
    /// The validated device, or why it is not valid.
    device: std::result::Result<Device, SkipReason>,
    otks: Vec<(i64, KeyId, KeyJson)>,
    seen: HashSet<KeyId>,
    fallbacks: BTreeMap<Algorithm, StoredFallback>,
}

/// Groups rows in (user ID, device ID) order into device snapshots, one
/// device at a time, validating every ID and key JSON: what does not
/// validate is left out and counted, never fatal.
///
/// One-time keys are put in the reference homeserver's issue order: upload
/// time (`ts_added_ms`), then key ID in byte order for keys uploaded at the
/// same millisecond (R17.1, R3.5). Keys past the target's limit (per device
/// and algorithm, R8.1, or per device, R8.4) are left out: the ones that
/// would be handed out last.
pub struct DeviceAssembler {
    max_otks: u64,
    per_device: bool,
    max_key_json_bytes: usize,
    current: Option<Pending>,
    tally: ImportTally,
}

impl fmt::Debug for DeviceAssembler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceAssembler")
            .field(
                "current",
                &self
                    .current
                    .as_ref()
                    .map(|p| (&p.user_id, &p.device_id, p.otks.len())),
            )
            .field("tally", &self.tally)
            .finish()
    }
}

impl DeviceAssembler {
    /// An assembler for a target with these limits.
    pub fn new(limits: &Limits) -> Self {
        Self {
            max_otks: limits.max_otks_per_device_algorithm,
            per_device: limits.otk_cap == OtkCap::PerDevice,
            max_key_json_bytes: limits.max_key_json_bytes,
            current: None,
            tally: ImportTally::default(),
        }
    }

    /// What was left out so far ([`ImportTally::devices`] and the key totals
    /// are counted by [`import_devices`], which writes).
    pub fn tally(&self) -> &ImportTally {
        &self.tally
    }

    /// Takes one row. When it belongs to a later device than the rows
    /// before it, the earlier device is complete and returned: its
    /// snapshot, or `None` for a device left out whole.
    ///
    /// # Errors
    /// [`Error::BadRequest`] when the row belongs to an earlier device than
    /// the rows before it: the source is not in (user ID, device ID) byte
    /// order (a database collation other than bytes, for instance).
    pub fn push(&mut self, row: SourceRow) -> Result<Option<Completed>> {
        let done = match &self.current {
            Some(p) => {
                let here = (p.user_id.as_str(), p.device_id.as_str());
                let there = (row.user_id(), row.device_id());
                if there < here {
                    return Err(Error::bad_request(format!(
                        "source rows out of order: device {there:?} after {here:?} \
                         (rows must come in (user ID, device ID) byte order)"
                    )));
                }
                if there > here { self.finish() } else { None }
            }
            None => None,
        };
        if self.current.is_none() {
            self.current = Some(Pending {
                user_id: row.user_id().to_owned(),
                device_id: row.device_id().to_owned(),
                device: validate_device(row.user_id(), row.device_id()),
                otks: Vec::new(),
                seen: HashSet::new(),
                fallbacks: BTreeMap::new(),
            });
        }
        self.add(row);
        Ok(done)
    }

    /// Completes the device being assembled, if any (call it after the last
    /// row).
    pub fn finish(&mut self) -> Option<Completed> {
        let p = self.current.take()?;
        let device = match p.device {
            Ok(d) => d,
            Err(reason) => {
                self.tally.skipped_devices += 1;
                self.tally.example(Skip {
                    user_id: p.user_id.clone(),
                    device_id: p.device_id.clone(),
                    key_id: None,
                    fallback: false,
                    reason,
                });
                return Some(Completed {
                    user_id: p.user_id,
                    device_id: p.device_id,
                    snapshot: None,
                });
            }
        };
        let mut otks = p.otks;
        otks.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        // Stored keys per algorithm, or per device (`None`) under R8.4.
        let mut stored: BTreeMap<Option<Algorithm>, u64> = BTreeMap::new();
        let mut one_time_keys = Vec::with_capacity(otks.len());
        let (mut seq, mut last_ts) = (0u64, None);
        for (ts, key_id, key_json) in otks {
            let capped = (!self.per_device).then(|| key_id.algorithm());
            let n = stored.entry(capped).or_insert(0);
            if *n >= self.max_otks {
                self.tally.skip(Skip {
                    user_id: p.user_id.clone(),
                    device_id: p.device_id.clone(),
                    key_id: Some(key_id.as_str().to_owned()),
                    fallback: false,
                    reason: SkipReason::OverLimit,
                });
                continue;
            }
            *n += 1;
            // Keys of one upload share a sequence number; the key ID orders
            // them (R3.5).
            if last_ts != Some(ts) {
                seq += 1;
                last_ts = Some(ts);
            }
            one_time_keys.push(StoredOtk {
                key_id,
                key_json,
                seq,
            });
        }
        Some(Completed {
            user_id: p.user_id,
            device_id: p.device_id,
            snapshot: Some(DeviceSnapshot {
                device,
                one_time_keys,
                fallback_keys: p.fallbacks,
                issued: BTreeMap::new(),
            }),
        })
    }

    fn add(&mut self, row: SourceRow) {
        let Some(p) = self.current.as_mut() else {
            return;
        };
        let fallback = row.is_fallback();
        if p.device.is_err() {
            // Counted here, reported once for the device by `finish`.
            if fallback {
                self.tally.skipped_fallback_keys += 1;
            } else {
                self.tally.skipped_one_time_keys += 1;
            }
            return;
        }
        let full = row.full_key_id();
        if let Err(reason) = admit(p, &row, &full, self.max_key_json_bytes) {
            self.tally.skip(Skip {
                user_id: p.user_id.clone(),
                device_id: p.device_id.clone(),
                key_id: Some(full),
                fallback,
                reason,
            });
        }
    }
}

/// Validates one row of a device with valid IDs and adds it to the device.
fn admit(
    p: &mut Pending,
    row: &SourceRow,
    full_key_id: &str,
    max_key_json_bytes: usize,
) -> std::result::Result<(), SkipReason> {
    let key_id = KeyId::parse(full_key_id).map_err(|_| SkipReason::InvalidKeyId)?;
    let text = match row {
        SourceRow::OneTimeKey(k) => &k.key_json,
        SourceRow::Fallback(k) => &k.key_json,
    };
    let key_json = KeyJson::from_json_str(text).map_err(|_| SkipReason::InvalidKeyJson)?;
    if key_json.len() > max_key_json_bytes {
        return Err(SkipReason::KeyJsonTooLarge);
    }
    match row {
        SourceRow::OneTimeKey(k) => {
            if !p.seen.insert(key_id.clone()) {
                return Err(SkipReason::Duplicate);
            }
            p.otks.push((k.ts_added_ms, key_id, key_json));
        }
        SourceRow::Fallback(k) => {
            let algorithm = key_id.algorithm();
            if p.fallbacks.contains_key(&algorithm) {
                return Err(SkipReason::Duplicate);
            }
            let used = k.used;
            p.fallbacks.insert(
                algorithm,
                StoredFallback {
                    key_id,
                    key_json,
                    used,
                },
            );
        }
    }
    Ok(())
}

fn validate_device(user_id: &str, device_id: &str) -> std::result::Result<Device, SkipReason> {
    let user = UserId::parse(user_id).map_err(|_| SkipReason::InvalidUserId)?;
    let device = DeviceId::parse(device_id).map_err(|_| SkipReason::InvalidDeviceId)?;
    Ok(Device::new(user, device))
}

/// A device the [`DeviceAssembler`] finished.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completed {
    /// The user ID as stored (where a resumed read starts after).
    pub user_id: String,
    /// The device ID as stored.
    pub device_id: String,
    /// Its state, or `None` when the device was left out whole (invalid
    /// IDs). A snapshot may be empty when every key of the device was left
    /// out.
    pub snapshot: Option<DeviceSnapshot>,
}

/// Reads a source page by page through an assembler.
struct Reader<'a> {
    source: &'a mut dyn RowSource,
    assembler: DeviceAssembler,
    done: bool,
}

impl<'a> Reader<'a> {
    fn new(source: &'a mut dyn RowSource, limits: &Limits) -> Self {
        Self {
            source,
            assembler: DeviceAssembler::new(limits),
            done: false,
        }
    }

    /// The devices the next page of rows completes (possibly none), or
    /// `None` after the end.
    async fn next(&mut self) -> Result<Option<Vec<Completed>>> {
        if self.done {
            return Ok(None);
        }
        let rows = self.source.next_rows().await?;
        let mut completed = Vec::new();
        if rows.is_empty() {
            self.done = true;
            completed.extend(self.assembler.finish());
        }
        for row in rows {
            completed.extend(self.assembler.push(row)?);
        }
        Ok(Some(completed))
    }
}

/// How [`import_devices`] ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportOutcome {
    /// What was written and left out.
    pub tally: ImportTally,
    /// The last device completed (where a resumed run starts after), if any
    /// device with valid IDs was completed.
    pub last: Option<Device>,
    /// Whether the source was read to its end (`false` when the run stopped
    /// at `stop_after` devices).
    pub complete: bool,
}

/// Reads every row of `source`, assembles devices ([`DeviceAssembler`], with
/// the target's limits) and writes each one with
/// [`KeyStore::import_device`], which replaces the device's state (so a
/// device imported twice ends the same). Devices left with nothing to
/// import (every key invalid) are not written.
///
/// `progress` is called after each page of rows that completed a device,
/// with the running tally and the last device completed: store that device
/// to resume an interrupted import (the source is then read from after it).
/// An error from `progress` stops the import. With `stop_after`, the import
/// stops once that many devices were written (and reports `complete:
/// false`).
///
/// # Errors
/// The source's, the store's and `progress`'s errors, and
/// [`Error::BadRequest`] for rows out of order; what was imported before
/// stays.
pub async fn import_devices<S: KeyStore + ?Sized>(
    source: &mut dyn RowSource,
    store: &S,
    stop_after: Option<u64>,
    mut progress: impl FnMut(&ImportTally, &Device) -> Result<()> + Send,
) -> Result<ImportOutcome> {
    let mut reader = Reader::new(source, store.limits());
    let mut written = ImportTally::default();
    let mut last: Option<Device> = None;
    let tally = |a: &DeviceAssembler, w: &ImportTally| ImportTally {
        devices: w.devices,
        one_time_keys: w.one_time_keys,
        fallback_keys: w.fallback_keys,
        used_fallback_keys: w.used_fallback_keys,
        ..a.tally().clone()
    };
    while let Some(completed) = reader.next().await? {
        let mut moved = false;
        for snapshot in completed.into_iter().filter_map(|c| c.snapshot) {
            if !snapshot.is_empty() {
                store.import_device(&snapshot).await?;
                written.imported(&snapshot);
            }
            last = Some(snapshot.device);
            moved = true;
            if stop_after.is_some_and(|n| written.devices >= n) {
                let t = tally(&reader.assembler, &written);
                if let Some(d) = &last {
                    progress(&t, d)?;
                }
                return Ok(ImportOutcome {
                    tally: t,
                    last,
                    complete: false,
                });
            }
        }
        if moved && let Some(d) = &last {
            progress(&tally(&reader.assembler, &written), d)?;
        }
    }
    Ok(ImportOutcome {
        tally: tally(&reader.assembler, &written),
        last,
        complete: true,
    })
}

/// A device whose state in the target differs from the source's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CountMismatch {
    /// The device.
    pub device: Device,
    /// What differs (counts and fallback algorithms, never key material).
    pub what: String,
}

/// What [`compare_counts`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CountComparison {
    /// Devices of the source compared (those with valid IDs).
    pub devices: u64,
    /// Devices whose counts or unused fallback algorithms differ.
    pub mismatched: u64,
    /// The first of them (up to the `max` asked for).
    pub examples: Vec<CountMismatch>,
}

impl CountComparison {
    /// Whether every device matched.
    pub fn matched(&self) -> bool {
        self.mismatched == 0
    }
}

/// Reads `source` again and compares, device by device, the one-time key
/// counts per algorithm and the unused fallback algorithms that the import
/// should have produced (after leaving out what does not validate, as
/// [`import_devices`] does) with what the target answers (R17.1: the import
/// ends with a check that counts match).
///
/// # Errors
/// The source's and the store's errors.
pub async fn compare_counts<S: KeyStore + ?Sized>(
    source: &mut dyn RowSource,
    store: &S,
    max: usize,
) -> Result<CountComparison> {
    let mut reader = Reader::new(source, store.limits());
    let mut out = CountComparison::default();
    while let Some(completed) = reader.next().await? {
        for snapshot in completed.into_iter().filter_map(|c| c.snapshot) {
            out.devices += 1;
            let state = store.sync_state(&snapshot.device).await?;
            let (want_counts, want_unused) = (snapshot.counts(), snapshot.unused_fallback_types());
            let mut unused = state.unused_fallback_key_types;
            unused.sort();
            if state.one_time_key_counts != want_counts || unused != want_unused {
                out.mismatched += 1;
                if out.examples.len() < max {
                    out.examples.push(CountMismatch {
                        device: snapshot.device.clone(),
                        what: format!(
                            "source {:?} unused fallback {:?}, target {:?} unused fallback {:?}",
                            want_counts.0, want_unused, state.one_time_key_counts.0, unused
                        ),
                    });
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn otk(user: &str, device: &str, id: &str, ts: i64) -> SourceRow {
        let (algorithm, key_id) = id.split_once(':').unwrap();
        SourceRow::OneTimeKey(SourceOtk {
            user_id: user.into(),
            device_id: device.into(),
            algorithm: algorithm.into(),
            key_id: key_id.into(),
            ts_added_ms: ts,
            key_json: format!(r#"{{"key":"k-{key_id}","signatures":{{}}}}"#),
        })
    }

    fn fallback(user: &str, device: &str, id: &str, used: bool) -> SourceRow {
        let (algorithm, key_id) = id.split_once(':').unwrap();
        SourceRow::Fallback(SourceFallback {
            user_id: user.into(),
            device_id: device.into(),
            algorithm: algorithm.into(),
            key_id: key_id.into(),
            key_json: format!(r#"{{"key":"f-{key_id}","fallback":true,"signatures":{{}}}}"#),
            used,
        })
    }

    fn assemble(rows: Vec<SourceRow>, limits: &Limits) -> (Vec<Completed>, ImportTally) {
        let mut a = DeviceAssembler::new(limits);
        let mut out = Vec::new();
        for row in rows {
            out.extend(a.push(row).unwrap());
        }
        out.extend(a.finish());
        (out, a.tally().clone())
    }

    fn ids(s: &DeviceSnapshot) -> Vec<(&str, u64)> {
        s.one_time_keys
            .iter()
            .map(|k| (k.key_id.as_str(), k.seq))
            .collect()
    }

    #[test]
    fn orders_by_upload_time_then_key_id() {
        let rows = vec![
            otk("@a:x", "D", "sc:K9", 10),
            otk("@a:x", "D", "sc:K0", 20),
            fallback("@a:x", "D", "sc:F", true),
            otk("@a:x", "D", "sc:K5", 10),
            otk("@a:x", "D", "other:Z", 5),
        ];
        let (done, tally) = assemble(rows, &Limits::default());
        assert_eq!(done.len(), 1);
        let s = done[0].snapshot.as_ref().unwrap();
        assert_eq!(
            ids(s),
            [("other:Z", 1), ("sc:K5", 2), ("sc:K9", 2), ("sc:K0", 3)]
        );
        assert!(s.fallback_keys.values().all(|f| f.used));
        assert_eq!(tally, ImportTally::default());
    }

    #[test]
    fn skips_what_does_not_validate_and_counts_it() {
        let mut bad_json = otk("@a:x", "D", "sc:J", 1);
        if let SourceRow::OneTimeKey(k) = &mut bad_json {
            k.key_json = r#"{"key": 5}"#.into();
        }
        let rows = vec![
            otk("@a:x", "D", ":NOALG", 1),
            otk("@a:x", "D", "sc:", 1),
            otk("@a:x", "D", "sc:a\0b", 1),
            bad_json,
            otk("@a:x", "D", "sc:OK", 1),
            otk("@a:x", "D", "sc:OK", 2),
            fallback("@a:x", "D", "sc:F1", false),
            fallback("@a:x", "D", "sc:F2", false),
            otk("@a:x", &"L".repeat(300), "sc:K", 1),
            fallback("@a:x", &"L".repeat(300), "sc:F", true),
            otk("@b:x", "D\0", "sc:K", 1),
            otk("nouser", "D", "sc:K", 1),
        ];
        let limits = Limits::default();
        let (done, tally) = assemble(rows, &limits);
        assert_eq!(done.len(), 4);
        let s = done[0].snapshot.as_ref().unwrap();
        assert_eq!(ids(s), [("sc:OK", 1)]);
        assert_eq!(s.fallback_keys.len(), 1);
        assert!(done[1..].iter().all(|c| c.snapshot.is_none()));
        assert_eq!(tally.skipped_devices, 3);
        assert_eq!(tally.skipped_one_time_keys, 5 + 3);
        assert_eq!(tally.skipped_fallback_keys, 1 + 1);
        let reasons: Vec<SkipReason> = tally.skips.iter().map(|s| s.reason).collect();
        assert_eq!(
            reasons,
            [
                SkipReason::InvalidKeyId,
                SkipReason::InvalidKeyId,
                SkipReason::InvalidKeyId,
                SkipReason::InvalidKeyJson,
                SkipReason::Duplicate,
                SkipReason::Duplicate,
                SkipReason::InvalidDeviceId,
                SkipReason::InvalidDeviceId,
                SkipReason::InvalidUserId,
            ]
        );
        // Messages name IDs, never key material.
        assert!(tally.skips.iter().all(|s| !s.to_string().contains("k-")));
    }

    #[test]
    fn leaves_out_keys_past_the_limit_issued_last() {
        let limits = Limits {
            max_otks_per_device_algorithm: 2,
            max_key_json_bytes: 40,
            ..Limits::default()
        };
        let mut big = otk("@a:x", "D", "sc:BIG", 0);
        if let SourceRow::OneTimeKey(k) = &mut big {
            k.key_json = format!(r#"{{"key":"{}","signatures":{{}}}}"#, "x".repeat(40));
        }
        let rows = vec![
            big,
            otk("@a:x", "D", "sc:C", 3),
            otk("@a:x", "D", "sc:A", 1),
            otk("@a:x", "D", "sc:B", 2),
        ];
        let (done, tally) = assemble(rows, &limits);
        let s = done[0].snapshot.as_ref().unwrap();
        assert_eq!(ids(s), [("sc:A", 1), ("sc:B", 2)]);
        let reasons: Vec<_> = tally.skips.iter().map(|s| s.reason).collect();
        assert_eq!(
            reasons,
            [SkipReason::KeyJsonTooLarge, SkipReason::OverLimit]
        );
        assert_eq!(tally.skips[1].key_id.as_deref(), Some("sc:C"));
    }

    #[test]
    fn a_per_device_cap_counts_every_algorithm() {
        let limits = Limits {
            max_otks_per_device_algorithm: 3,
            otk_cap: OtkCap::PerDevice,
            ..Limits::default()
        };
        let rows = vec![
            otk("@a:x", "D", "sc:A", 1),
            otk("@a:x", "D", "alg2:B", 2),
            otk("@a:x", "D", "sc:C", 3),
            otk("@a:x", "D", "alg2:D", 4),
        ];
        let (done, tally) = assemble(rows, &limits);
        let s = done[0].snapshot.as_ref().unwrap();
        assert_eq!(ids(s), [("sc:A", 1), ("alg2:B", 2), ("sc:C", 3)]);
        assert_eq!(tally.skips[0].key_id.as_deref(), Some("alg2:D"));
        assert_eq!(tally.skips[0].reason, SkipReason::OverLimit);
    }

    #[test]
    fn rows_out_of_order_are_an_error() {
        let mut a = DeviceAssembler::new(&Limits::default());
        assert!(a.push(otk("@b:x", "D", "sc:K", 1)).unwrap().is_none());
        assert!(a.push(otk("@b:x", "E", "sc:K", 1)).unwrap().is_some());
        let err = a.push(otk("@a:x", "D", "sc:K", 1)).unwrap_err();
        assert!(err.to_string().contains("out of order"), "{err}");
    }
}
