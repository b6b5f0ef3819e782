//! `keyclaim bench --scale`: how claim and upload latency grow with the
//! number of stored keys (10^4 .. 10^7), per backend.

use std::time::{Duration, Instant};

use keyclaim::{Algorithm, ClaimTarget};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::stats::Samples;
use super::{BenchArgs, Setting, bar, device, open_backend, upload_of, workload};

const KEYS_PER_DEVICE: usize = 50;
const CLAIMS: usize = 2000;
const UPLOADS: usize = 200;
/// After each fill: time for the store's background I/O (SQLite's WAL
/// checkpoints, the kernel's write-back of the fill) to drain, so that the
/// measured claims do not queue behind the fill's writes.
const SETTLE: Duration = Duration::from_secs(5);
/// Unmeasured claims after the settling pause (caches, the WAL's size).
const WARMUP_CLAIMS: usize = 200;
/// Devices of one bulk count read (R16.1), and how many reads are timed.
const COUNTS_DEVICES: usize = 10_000;
const COUNTS_READS: usize = 20;

pub(crate) async fn run(
    args: &BenchArgs,
    names: &[String],
    postgres: Option<&str>,
) -> Result<bool, String> {
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let sizes: Vec<u64> = [10_000u64, 100_000, 1_000_000, 10_000_000]
        .into_iter()
        .filter(|n| *n <= args.scale_max)
        .collect();
    println!(
        "\nkeyclaim bench --scale: p50/p99 latency of one claim (C=1), one 50-key upload and one count read of {COUNTS_DEVICES} devices, by stored keys\n"
    );
    println!(
        "{:<10} {:>12} {:>12} {:>12} {:>12} {:>12} {:>14} {:>14}",
        "backend",
        "stored keys",
        "claim p50",
        "claim p99",
        "upload p50",
        "upload p99",
        "claim p50 / 10^4",
        "counts_many p50"
    );
    let mut json_rows = Vec::new();
    for name in names {
        let setting = Setting {
            dir: &dir,
            args,
            tag: "scale",
            postgres,
        };
        let b = open_backend(name, &setting).await?;
        let measured = measure(name, &b, &sizes, args, &mut json_rows).await;
        drop(b);
        super::clean_up(name, &setting).await;
        measured?;
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&json_rows).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(true)
}

/// One backend's rows: fills its store to each of `sizes` stored keys in
/// turn and measures there, printing a row per size and adding it to
/// `json_rows`.
async fn measure(
    name: &str,
    b: &super::BackendUnderTest,
    sizes: &[u64],
    args: &BenchArgs,
    json_rows: &mut Vec<serde_json::Value>,
) -> Result<(), String> {
    let mut filled = 0usize;
    let mut base_p50 = None;
    let mut fresh = 0usize;
    for &n in sizes {
        if name == "memory" && n > 1_000_000 {
            continue;
        }
        let target_devices = usize::try_from(n).unwrap_or(usize::MAX) / KEYS_PER_DEVICE;
        let pb = bar(
            args.quiet,
            (target_devices - filled) as u64,
            &format!("{name}: fill to {n} keys"),
        );
        let tick = pb.clone();
        let start = filled;
        let store = b.store.clone();
        // Fill devices start..target_devices.
        workload::parallel(target_devices - start, args.clients.max(1), move |i| {
            let store = store.clone();
            let upload =
                device("s", start + i).and_then(|d| upload_of(&d, "S", KEYS_PER_DEVICE, false));
            tick.inc(1);
            async move {
                store.upload(&upload?).await?;
                Ok(())
            }
        })
        .await
        .map_err(|e| e.to_string())?;
        pb.finish_and_clear();
        filled = target_devices;
        let mut rng = StdRng::seed_from_u64(n);
        let mut claims = Samples::default();
        let alg = Algorithm::signed_curve25519();
        tokio::time::sleep(SETTLE).await;
        for _ in 0..WARMUP_CLAIMS {
            let d = device("s", rng.random_range(0..filled)).map_err(|e| e.to_string())?;
            b.store
                .claim(&[ClaimTarget::one(d, alg.clone())])
                .await
                .map_err(|e| e.to_string())?;
        }
        for _ in 0..CLAIMS {
            let d = device("s", rng.random_range(0..filled)).map_err(|e| e.to_string())?;
            let t0 = Instant::now();
            b.store
                .claim(&[ClaimTarget::one(d, alg.clone())])
                .await
                .map_err(|e| e.to_string())?;
            claims.record(t0.elapsed());
        }
        let mut uploads = Samples::default();
        for _ in 0..UPLOADS {
            fresh += 1;
            let u = device("fresh", fresh)
                .and_then(|d| upload_of(&d, "N", KEYS_PER_DEVICE, false))
                .map_err(|e| e.to_string())?;
            let t0 = Instant::now();
            b.store.upload(&u).await.map_err(|e| e.to_string())?;
            uploads.record(t0.elapsed());
        }
        let mut counts = Samples::default();
        for _ in 0..COUNTS_READS {
            let ask = (0..COUNTS_DEVICES)
                .map(|_| device("s", rng.random_range(0..filled)))
                .collect::<keyclaim::Result<Vec<_>>>()
                .map_err(|e| e.to_string())?;
            let t0 = Instant::now();
            b.store.counts_many(&ask).await.map_err(|e| e.to_string())?;
            counts.record(t0.elapsed());
        }
        let m = counts.summary(Duration::ZERO);
        let c = claims.summary(Duration::ZERO);
        let u = uploads.summary(Duration::ZERO);
        let base = *base_p50.get_or_insert(c.p50_ms);
        let ratio = if base > 0.0 { c.p50_ms / base } else { 0.0 };
        println!(
            "{:<10} {:>12} {:>10.3}ms {:>10.3}ms {:>10.3}ms {:>10.3}ms {:>15.2}x {:>12.3}ms",
            name, n, c.p50_ms, c.p99_ms, u.p50_ms, u.p99_ms, ratio, m.p50_ms
        );
        json_rows.push(serde_json::json!({
            "backend": name, "stored_keys": n,
            "claim_p50_ms": c.p50_ms, "claim_p99_ms": c.p99_ms,
            "upload_p50_ms": u.p50_ms, "upload_p99_ms": u.p99_ms,
            "claim_p50_ratio_to_1e4": ratio,
            "counts_many_devices": COUNTS_DEVICES,
            "counts_many_p50_ms": m.p50_ms, "counts_many_p99_ms": m.p99_ms,
        }));
    }
    Ok(())
}
