//! One import run, whatever the source database: resume from the
//! checkpoint, import device by device, then check the target and compare
//! counts with the source (R17.1).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use keyclaim::transfer::{
    CheckReport, Checkpoint, CountComparison, ImportTally, RowSource, check_store, compare_counts,
    import_devices,
};
use keyclaim::{Device, KeyStore, Result};

use crate::merge::{KeyTables, Merged, Position};

/// Called after each page of rows with the running totals.
pub type Progress = Arc<dyn Fn(&ImportTally) + Send + Sync>;

/// How to run an import.
#[derive(Clone)]
#[non_exhaustive]
pub struct ImportOptions {
    /// Rows read per query of each table (default 1000). Memory holds about
    /// one device's keys plus two pages of rows.
    pub page: usize,
    /// A checkpoint file: the last device imported is saved there, an
    /// interrupted import resumes after it, and a finished import that
    /// checked out removes it.
    pub checkpoint: Option<PathBuf>,
    /// Stop after this many devices were written (the run reports
    /// `complete: false` and skips the final checks).
    pub stop_after_devices: Option<u64>,
    /// Called after each page of rows with the running totals.
    pub progress: Option<Progress>,
}

impl Default for ImportOptions {
    fn default() -> Self {
        Self {
            page: 1000,
            checkpoint: None,
            stop_after_devices: None,
            progress: None,
        }
    }
}

impl fmt::Debug for ImportOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImportOptions")
            .field("page", &self.page)
            .field("checkpoint", &self.checkpoint)
            .field("stop_after_devices", &self.stop_after_devices)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

impl ImportOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rows per query (at least 1).
    pub fn page(mut self, rows: usize) -> Self {
        self.page = rows.max(1);
        self
    }

    /// Resume from and save to this checkpoint file.
    pub fn checkpoint(mut self, path: impl Into<PathBuf>) -> Self {
        self.checkpoint = Some(path.into());
        self
    }

    /// Stop after this many devices (to import in slices).
    pub fn stop_after_devices(mut self, devices: u64) -> Self {
        self.stop_after_devices = Some(devices);
        self
    }

    /// Report progress to this function.
    pub fn progress(mut self, progress: impl Fn(&ImportTally) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(progress));
        self
    }
}

/// What an import did and found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportReport {
    /// The checkpoint's device this run resumed after, if any.
    pub resumed_after: Option<Device>,
    /// What this run wrote and left out.
    pub tally: ImportTally,
    /// Whether the source was read to its end.
    pub complete: bool,
    /// The target's invariant check (`None` when the run stopped early).
    pub check: Option<CheckReport>,
    /// Per-device counts, source against target, over the whole source
    /// (`None` when the run stopped early).
    pub counts: Option<CountComparison>,
}

impl ImportReport {
    /// Whether the import finished, the target has no problems and every
    /// device's counts match the source's.
    pub fn ok(&self) -> bool {
        self.complete
            && self.check.as_ref().is_some_and(|c| c.problems.is_empty())
            && self.counts.as_ref().is_some_and(CountComparison::matched)
    }
}

impl fmt::Display for ImportReport {
    /// A summary for people: totals, the skipped rows' examples, the
    /// checks. Names IDs, never key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.tally;
        if let Some(d) = &self.resumed_after {
            writeln!(f, "resumed after {d}")?;
        }
        writeln!(
            f,
            "imported {} devices: {} one-time keys, {} fallback keys ({} used)",
            t.devices, t.one_time_keys, t.fallback_keys, t.used_fallback_keys
        )?;
        writeln!(
            f,
            "skipped {} devices, {} one-time keys, {} fallback keys",
            t.skipped_devices, t.skipped_one_time_keys, t.skipped_fallback_keys
        )?;
        for s in &t.skips {
            writeln!(f, "  skipped {s}")?;
        }
        if !self.complete {
            writeln!(
                f,
                "stopped before the end of the source; run again to resume"
            )?;
        }
        if let Some(c) = &self.check {
            writeln!(
                f,
                "check: {} devices, {} one-time keys, {} problems",
                c.devices,
                c.one_time_keys,
                c.problems.len()
            )?;
            for p in &c.problems {
                writeln!(f, "  {}: {}", p.device, p.what)?;
            }
        }
        if let Some(c) = &self.counts {
            if c.matched() {
                writeln!(f, "counts match the source for all {} devices", c.devices)?;
            } else {
                writeln!(
                    f,
                    "COUNTS DIFFER for {} of {} devices, e.g.:",
                    c.mismatched, c.devices
                )?;
                for m in &c.examples {
                    writeln!(f, "  {}: {}", m.device, m.what)?;
                }
            }
        }
        Ok(())
    }
}

/// Devices named in a count comparison's examples.
const MAX_MISMATCH_EXAMPLES: usize = 20;
/// Devices per page of the target's check.
const CHECK_PAGE: usize = 500;

/// Imports from `tables` into `store` as `options` say, then checks.
pub(crate) async fn run<T, S>(
    tables: &T,
    store: &S,
    options: &ImportOptions,
) -> Result<ImportReport>
where
    T: KeyTables + ?Sized,
    S: KeyStore + ?Sized,
{
    run_rows(|at| Merged::new(tables, at, options.page), store, options).await
}

/// Imports the rows `rows(at)` reads (every device after `at`, in (user ID,
/// device ID) byte order) into `store` as `options` say, then checks: the
/// run shared by every source.
pub(crate) async fn run_rows<R, F, S>(
    rows: F,
    store: &S,
    options: &ImportOptions,
) -> Result<ImportReport>
where
    R: RowSource,
    F: Fn(Position) -> R,
    S: KeyStore + ?Sized,
{
    let checkpoint = options.checkpoint.as_ref().map(Checkpoint::new);
    let resumed_after = match &checkpoint {
        Some(c) => c.load()?,
        None => None,
    };
    let start = match &resumed_after {
        Some(d) => Position::AfterDevice(
            d.user_id.as_str().to_owned(),
            d.device_id.as_str().to_owned(),
        ),
        None => Position::Start,
    };
    let mut source = rows(start);
    let outcome = import_devices(
        &mut source,
        store,
        options.stop_after_devices,
        |tally, last| {
            if let Some(c) = &checkpoint {
                c.save(last)?;
            }
            if let Some(p) = &options.progress {
                p(tally);
            }
            Ok(())
        },
    )
    .await?;
    let mut report = ImportReport {
        resumed_after,
        tally: outcome.tally,
        complete: outcome.complete,
        check: None,
        counts: None,
    };
    if !report.complete {
        return Ok(report);
    }
    report.check = Some(check_store(store, CHECK_PAGE).await?);
    let mut again = rows(Position::Start);
    report.counts = Some(compare_counts(&mut again, store, MAX_MISMATCH_EXAMPLES).await?);
    if report.ok()
        && let Some(c) = &checkpoint
    {
        c.clear()?;
    }
    Ok(report)
}
