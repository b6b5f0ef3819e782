//! Operator tools: `stats`, `migrate`, `import`, `check`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use keyclaim::transfer::{Checkpoint, Exporter};
use keyclaim_import::ImportOptions;

use crate::stores::StoreUrl;

/// Totals of a store and a histogram of OTKs per device.
pub(crate) async fn stats(url: &StoreUrl) -> Result<String, String> {
    let store = url.open().await.map_err(|e| e.to_string())?;
    let mut exporter = Exporter::new(500);
    let (mut devices, mut otks, mut used, mut unused, mut issued) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let buckets: [(u64, &str); 7] = [
        (0, "0"),
        (1, "1-9"),
        (10, "10-49"),
        (50, "50-99"),
        (100, "100-249"),
        (250, "250-499"),
        (500, "500+"),
    ];
    let mut hist: BTreeMap<u64, u64> = BTreeMap::new();
    let mut by_alg: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(batch) = exporter
        .next_batch(&*store)
        .await
        .map_err(|e| e.to_string())?
    {
        for s in batch {
            devices += 1;
            let n = s.one_time_keys.len() as u64;
            otks += n;
            for k in &s.one_time_keys {
                *by_alg
                    .entry(k.key_id.algorithm_str().to_owned())
                    .or_default() += 1;
            }
            for f in s.fallback_keys.values() {
                if f.used {
                    used += 1;
                } else {
                    unused += 1;
                }
            }
            issued += s.issued.values().map(|v| v.len() as u64).sum::<u64>();
            let bucket = buckets
                .iter()
                .rev()
                .find(|(lo, _)| n >= *lo)
                .map_or(0, |(lo, _)| *lo);
            *hist.entry(bucket).or_default() += 1;
        }
    }
    let mut out = format!(
        "store {url}\n  devices with keys     {devices}\n  one-time keys         {otks}\n  fallback keys unused  {unused}\n  fallback keys used    {used}\n  remembered issued     {issued}\n"
    );
    if !by_alg.is_empty() {
        out.push_str("  one-time keys by algorithm:\n");
        for (alg, n) in &by_alg {
            out.push_str(&format!("    {alg:<24} {n}\n"));
        }
    }
    out.push_str("  one-time keys per device:\n");
    let max = hist.values().copied().max().unwrap_or(0).max(1);
    for (lo, label) in buckets {
        let n = hist.get(&lo).copied().unwrap_or(0);
        let width = usize::try_from(n * 40 / max).unwrap_or(40);
        out.push_str(&format!("    {label:>8} {n:>9} {}\n", "#".repeat(width)));
    }
    Ok(out)
}

/// Invariant check; `Ok(false)` when problems were found.
pub(crate) async fn check(url: &StoreUrl) -> Result<(bool, String), String> {
    let store = url.open().await.map_err(|e| e.to_string())?;
    let report = keyclaim::transfer::check_store(&*store, 500)
        .await
        .map_err(|e| e.to_string())?;
    let mut out = format!(
        "checked {url}: {} devices, {} one-time keys, {} problems\n",
        report.devices,
        report.one_time_keys,
        report.problems.len()
    );
    for p in &report.problems {
        out.push_str(&format!("  {}: {}\n", p.device, p.what));
    }
    Ok((report.problems.is_empty(), out))
}

/// Copies `from` into `to` with a progress bar, resumable through a
/// checkpoint file, then verifies the copy.
pub(crate) async fn migrate(
    from: &StoreUrl,
    to: &StoreUrl,
    batch: usize,
    checkpoint: Option<&PathBuf>,
    quiet: bool,
) -> Result<(bool, String), String> {
    if from == to {
        return Err("source and target are the same store".into());
    }
    let src = from.open().await.map_err(|e| format!("{from}: {e}"))?;
    let dst = to.open().await.map_err(|e| format!("{to}: {e}"))?;
    let checkpoint = checkpoint.map(Checkpoint::new);
    let resume = match &checkpoint {
        Some(c) => c.load().map_err(|e| e.to_string())?,
        None => None,
    };
    let pb = spinner(quiet);
    let mut save_err = None;
    let report = keyclaim::transfer::copy_store(&*src, &*dst, batch, resume.clone(), |r, last| {
        pb.set_message(format!(
            "{} devices, {} one-time keys copied",
            r.devices, r.one_time_keys
        ));
        pb.tick();
        if let (Some(c), Some(last)) = (&checkpoint, last)
            && let Err(e) = c.save(last)
        {
            save_err = Some(e.to_string());
        }
    })
    .await
    .map_err(|e| e.to_string())?;
    pb.finish_and_clear();
    if let Some(e) = save_err {
        return Err(format!("could not write the checkpoint: {e}"));
    }
    let diff = keyclaim::transfer::diff_stores(&*src, &*dst, batch, 20)
        .await
        .map_err(|e| e.to_string())?;
    let mut out = format!(
        "copied {from} -> {to}{}: {} devices, {} one-time keys, {} fallback keys, {} remembered issued keys\n",
        if resume.is_some() { " (resumed)" } else { "" },
        report.devices,
        report.one_time_keys,
        report.fallback_keys,
        report.issued_keys
    );
    if diff.is_empty() {
        out.push_str("verified: the target holds exactly the source's state\n");
        if let Some(c) = &checkpoint {
            c.clear().map_err(|e| e.to_string())?;
        }
    } else {
        out.push_str(&format!(
            "VERIFY FAILED: {} devices differ, e.g.:\n",
            diff.len()
        ));
        for d in &diff {
            out.push_str(&format!("  {d}\n"));
        }
    }
    Ok((diff.is_empty(), out))
}

/// A progress spinner, hidden with `quiet`.
fn spinner(quiet: bool) -> ProgressBar {
    let pb = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    pb
}

/// Where `keyclaim import` reads from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ImportSource {
    /// A Synapse SQLite database file.
    SynapseSqlite,
    /// A Synapse PostgreSQL database URL.
    SynapsePostgres,
    /// A RocksDB directory of the conduwuit family.
    ConduwuitRocksdb,
}

impl ImportSource {
    pub(crate) fn parse(kind: &str) -> Result<Self, String> {
        match kind {
            "synapse-sqlite" => Ok(Self::SynapseSqlite),
            "synapse-postgres" => Ok(Self::SynapsePostgres),
            "conduwuit-rocksdb" => Ok(Self::ConduwuitRocksdb),
            other => Err(format!(
                "unknown import source {other:?}: use synapse-sqlite PATH, synapse-postgres URL \
                 or conduwuit-rocksdb DIR"
            )),
        }
    }
}

/// Imports a homeserver's database into `to` with a progress display, resumable
/// through a checkpoint file; `Ok(false)` when the final check failed.
pub(crate) async fn import(
    kind: ImportSource,
    source: &str,
    to: &StoreUrl,
    checkpoint: Option<&PathBuf>,
    quiet: bool,
) -> Result<(bool, String), String> {
    let dst = to.open().await.map_err(|e| format!("{to}: {e}"))?;
    let pb = spinner(quiet);
    let shown = pb.clone();
    let mut options = ImportOptions::new().progress(move |t| {
        shown.set_message(format!(
            "{} devices, {} one-time keys imported",
            t.devices, t.one_time_keys
        ));
        shown.tick();
    });
    if let Some(path) = checkpoint {
        options = options.checkpoint(path);
    }
    let (report, shown_source) = match kind {
        ImportSource::SynapseSqlite => (
            keyclaim_import::synapse::import_sqlite(source, &*dst, &options).await,
            source.to_owned(),
        ),
        ImportSource::SynapsePostgres => (
            keyclaim_import::synapse::import_postgres(source, &*dst, &options).await,
            keyclaim_open::redacted(source),
        ),
        ImportSource::ConduwuitRocksdb => {
            // Which column families were read, when they can be told.
            let shown = match keyclaim_import::conduwuit::layout(source).await {
                Ok(layout) => format!("{source} ({layout})"),
                Err(_) => source.to_owned(),
            };
            (
                keyclaim_import::conduwuit::import_rocksdb(source, &*dst, &options).await,
                shown,
            )
        }
    };
    pb.finish_and_clear();
    let report = report.map_err(|e| e.to_string())?;
    let verdict = if report.ok() {
        "verified: check passed and counts match the source"
    } else {
        "VERIFY FAILED"
    };
    Ok((
        report.ok(),
        format!("imported {shown_source} -> {to}\n{report}{verdict}\n"),
    ))
}
