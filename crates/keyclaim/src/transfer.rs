//! Streaming export and import of a store's whole state, a copy between
//! stores with verification, and an invariant check: what `keyclaim migrate`
//! and `keyclaim check` are built on, for homeserver code to call too; and
//! the storage-independent part of importing another homeserver's keys
//! (R17.1: [`import_devices`], [`compare_counts`]).

use std::collections::{BTreeMap, HashSet};

mod checkpoint;
mod import;

pub use checkpoint::Checkpoint;
pub use import::{
    Completed, CountComparison, CountMismatch, DeviceAssembler, ImportOutcome, ImportTally,
    MAX_SKIP_EXAMPLES, RowSource, RowsInMemory, Skip, SkipReason, SourceFallback, SourceOtk,
    SourceRow, compare_counts, import_devices,
};

use crate::error::Result;
use crate::ids::Device;
pub use crate::key_json::KeyDigest;
use crate::store::KeyStore;
pub use crate::types::{
    AlgorithmQueue, DeviceSnapshot, IssuedKey, SnapshotQueues, StoredFallback, StoredOtk,
};

/// Pages through a store's devices in (user ID, device ID) byte order.
///
/// Each page is read with [`KeyStore::export_devices`]; each snapshot is
/// consistent in itself. Writes that happen while exporting may or may not be
/// seen: stop writers (or accept that) for an exact copy.
#[derive(Debug, Clone)]
pub struct Exporter {
    after: Option<Device>,
    page: usize,
    done: bool,
}

impl Exporter {
    /// Starts at the first device, `page` devices per batch (at least 1).
    pub fn new(page: usize) -> Self {
        Self::resume(None, page)
    }

    /// Resumes after a device (the last one an earlier run finished).
    pub fn resume(after: Option<Device>, page: usize) -> Self {
        Self {
            after,
            page: page.max(1),
            done: false,
        }
    }

    /// The last device returned so far (where a resumed run would start).
    pub fn position(&self) -> Option<&Device> {
        self.after.as_ref()
    }

    /// The next batch, or `None` when every device was returned.
    ///
    /// # Errors
    /// The store's errors.
    pub async fn next_batch<S: KeyStore + ?Sized>(
        &mut self,
        store: &S,
    ) -> Result<Option<Vec<DeviceSnapshot>>> {
        if self.done {
            return Ok(None);
        }
        let batch = store.export_devices(self.after.as_ref(), self.page).await?;
        match batch.last() {
            None => {
                self.done = true;
                Ok(None)
            }
            Some(last) => {
                self.after = Some(last.device.clone());
                if batch.len() < self.page {
                    self.done = true;
                }
                Ok(Some(batch))
            }
        }
    }
}

/// What a copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Devices copied.
    pub devices: u64,
    /// OTKs copied.
    pub one_time_keys: u64,
    /// Fallback keys copied.
    pub fallback_keys: u64,
    /// Remembered issued keys copied.
    pub issued_keys: u64,
}

impl CopyReport {
    fn add(&mut self, s: &DeviceSnapshot) {
        self.devices += 1;
        self.one_time_keys += s.one_time_keys.len() as u64;
        self.fallback_keys += s.fallback_keys.len() as u64;
        self.issued_keys += s.issued.values().map(|v| v.len() as u64).sum::<u64>();
    }
}

/// Copies every device of `from` into `to` (replacing those devices' state
/// there), in batches of `page` devices, starting after `resume_after`.
/// `progress` is called after each batch with the running totals and the
/// last device copied (store it to resume an interrupted copy).
///
/// Each device is imported atomically; a device is never half copied. The
/// copy is resumable: run it again from the last reported device.
///
/// # Errors
/// The first error of either store; what was copied before it stays.
pub async fn copy_store<A, B>(
    from: &A,
    to: &B,
    page: usize,
    resume_after: Option<Device>,
    mut progress: impl FnMut(&CopyReport, Option<&Device>),
) -> Result<CopyReport>
where
    A: KeyStore + ?Sized,
    B: KeyStore + ?Sized,
{
    let mut exporter = Exporter::resume(resume_after, page);
    let mut report = CopyReport::default();
    while let Some(batch) = exporter.next_batch(from).await? {
        for snapshot in &batch {
            to.import_device(snapshot).await?;
            report.add(snapshot);
        }
        progress(&report, exporter.position());
    }
    Ok(report)
}

/// Compares two stores device by device (sequence numbers compared by rank):
/// the devices whose state differs, up to `max` of them.
///
/// # Errors
/// Either store's errors.
pub async fn diff_stores<A, B>(a: &A, b: &B, page: usize, max: usize) -> Result<Vec<Device>>
where
    A: KeyStore + ?Sized,
    B: KeyStore + ?Sized,
{
    let mut left = Exporter::new(page);
    let mut right = Exporter::new(page);
    let mut l: BTreeMap<Device, DeviceSnapshot> = BTreeMap::new();
    let mut r: BTreeMap<Device, DeviceSnapshot> = BTreeMap::new();
    let mut out = Vec::new();
    let (mut l_done, mut r_done) = (false, false);
    loop {
        if !l_done {
            match left.next_batch(a).await? {
                Some(batch) => l.extend(
                    batch
                        .into_iter()
                        .map(|s| (s.device.clone(), s.normalized())),
                ),
                None => l_done = true,
            }
        }
        if !r_done {
            match right.next_batch(b).await? {
                Some(batch) => r.extend(
                    batch
                        .into_iter()
                        .map(|s| (s.device.clone(), s.normalized())),
                ),
                None => r_done = true,
            }
        }
        // Everything up to the smaller of the two positions is complete on both sides.
        let settled = match (l_done, r_done) {
            (true, true) => None,
            (true, false) => right.position().cloned(),
            (false, true) => left.position().cloned(),
            (false, false) => left.position().min(right.position()).cloned(),
        };
        let keys: Vec<Device> = l
            .keys()
            .chain(r.keys())
            .filter(|d| settled.as_ref().is_none_or(|s| *d <= s))
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for d in keys {
            if l.remove(&d) != r.remove(&d) && out.len() < max {
                out.push(d);
            }
        }
        if l_done && r_done {
            return Ok(out);
        }
    }
}

/// A problem [`check_store`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The device concerned.
    pub device: Device,
    /// What is wrong (names key IDs, never key material).
    pub what: String,
}

/// What [`check_store`] looked at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Devices checked.
    pub devices: u64,
    /// OTKs checked.
    pub one_time_keys: u64,
    /// Problems found (empty when the store is sound).
    pub problems: Vec<Problem>,
}

/// Checks a store's invariants device by device: every OTK ID appears once;
/// OTKs are in claim order; each fallback key belongs to its algorithm; no
/// stored OTK is also remembered as issued with the same content (it would be
/// handed out twice); counts agree with the stored keys; no algorithm holds
/// more OTKs than the store's limit.
///
/// # Errors
/// The store's errors.
pub async fn check_store<S: KeyStore + ?Sized>(store: &S, page: usize) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let mut exporter = Exporter::new(page);
    let limit = store.limits().max_otks_per_device_algorithm;
    while let Some(batch) = exporter.next_batch(store).await? {
        for snap in batch {
            report.devices += 1;
            report.one_time_keys += snap.one_time_keys.len() as u64;
            let mut problem = |what: String| {
                report.problems.push(Problem {
                    device: snap.device.clone(),
                    what,
                })
            };
            let mut seen = HashSet::new();
            for otk in &snap.one_time_keys {
                if !seen.insert(&otk.key_id) {
                    problem(format!("one-time key {} is stored twice", otk.key_id));
                }
                let issued = snap.issued.get(&otk.key_id.algorithm()).is_some_and(|v| {
                    v.iter()
                        .any(|i| i.key_id == otk.key_id && i.digest == otk.key_json.digest())
                });
                if issued {
                    problem(format!(
                        "one-time key {} is stored but was already issued",
                        otk.key_id
                    ));
                }
            }
            if snap
                .one_time_keys
                .windows(2)
                .any(|w| (w[0].seq, &w[0].key_id) > (w[1].seq, &w[1].key_id))
            {
                problem("one-time keys are not exported in claim order".to_owned());
            }
            for (alg, fb) in &snap.fallback_keys {
                if fb.key_id.algorithm_str() != alg.as_str() {
                    problem(format!(
                        "fallback key {} is filed under algorithm {alg}",
                        fb.key_id
                    ));
                }
            }
            let counts = store.otk_counts(&snap.device).await?;
            let derived = snap.counts();
            if counts != derived {
                problem(format!(
                    "counts {:?} disagree with the stored keys {:?}",
                    counts.0, derived.0
                ));
            }
            for (alg, n) in &derived.0 {
                if *n > limit {
                    problem(format!(
                        "{n} one-time keys of {alg}, over the limit of {limit}"
                    ));
                }
            }
            let mut unused = store.unused_fallback_types(&snap.device).await?;
            unused.sort();
            if unused != snap.unused_fallback_types() {
                problem("unused fallback types disagree with the stored fallback keys".to_owned());
            }
        }
    }
    Ok(report)
}
