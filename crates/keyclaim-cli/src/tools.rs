//! Operator tools: `stats`, `migrate`, `check`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use keyclaim::transfer::Exporter;
use keyclaim::{Device, DeviceId, UserId};

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
    let resume = match checkpoint {
        Some(path) if path.exists() => {
            let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
            parse_checkpoint(&text)?
        }
        _ => None,
    };
    let pb = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    let mut save_err = None;
    let report = keyclaim::transfer::copy_store(&*src, &*dst, batch, resume.clone(), |r, last| {
        pb.set_message(format!(
            "{} devices, {} one-time keys copied",
            r.devices, r.one_time_keys
        ));
        pb.tick();
        if let (Some(path), Some(last)) = (checkpoint, last) {
            let line = format!("{}\n{}\n", last.user_id, last.device_id);
            if let Err(e) = std::fs::write(path, line) {
                save_err = Some(e.to_string());
            }
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
        if let Some(path) = checkpoint {
            let _ = std::fs::remove_file(path);
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

fn parse_checkpoint(text: &str) -> Result<Option<Device>, String> {
    let mut lines = text.lines();
    match (lines.next(), lines.next()) {
        (Some(u), Some(d)) => {
            let user = UserId::parse(u).map_err(|e| format!("checkpoint: {e}"))?;
            let device = DeviceId::parse(d).map_err(|e| format!("checkpoint: {e}"))?;
            Ok(Some(Device::new(user, device)))
        }
        _ => Ok(None),
    }
}
