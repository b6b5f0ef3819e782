//! Concurrency benchmark: claims per second with C = 1, 8, 64 concurrent
//! claimers, on distinct devices and on one hot device, for the group-commit
//! [`RedbStore`] and the one-write-transaction-per-claim
//! [`RedbBaseline`], side by side on the same settings (durable commits,
//! a fresh file each per cell in the same directory).
//!
//! ```text
//! cargo bench -p keyclaim-benches --bench redb_concurrency
//! ```
//!
//! Each cell fills both stores alike, then runs `KEYCLAIM_BENCH_ROUNDS`
//! rounds (default 3) in which the two take turns for `KEYCLAIM_BENCH_SECS`
//! each (default 2), and reports the medians and the median of the
//! per-round ratios, so that load from elsewhere on the machine hits both
//! about alike.
//!
//! Environment: `KEYCLAIM_BENCH_DIR` (where the files go; default the
//! system temp dir: put it on the disk you care about), `KEYCLAIM_BENCH_POOL`
//! (OTKs uploaded to each store before each cell; default 200000, and
//! 600000 for C >= 64, whose group commit store claims more than 200000 in
//! its 3 x 2 s), `KEYCLAIM_BENCH_C` (claimer counts,
//! default `1,8,64`), `KEYCLAIM_BENCH_DEVICES` (`distinct`, `hot` or
//! `both`, the default), `KEYCLAIM_BENCH_STORES` (`group`, `baseline` or
//! `both`, the default; a skipped store shows as 0), `KEYCLAIM_BENCH_LINGER_US`
//! (the group commit store's `RedbOptions::linger` in microseconds, default
//! 0, its default).
//!
//! Each claimer loops claims of one key until the time is up. Every claim
//! must return exactly one OTK (the pool must not run dry); the benchmark
//! fails otherwise.

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keyclaim::{Algorithm, ClaimTarget, Device, KeyId, KeyJson, KeyStore, Limits, Upload};
use keyclaim_benches::baseline::{Baseline, RedbBaseline};
use keyclaim_benches::{env_or, median};
use keyclaim_redb::{RedbOptions, RedbStore};

const SC: &str = "signed_curve25519";

fn limits() -> Limits {
    // The pool of one hot device is far beyond the default 500 per device.
    let mut limits = Limits::default();
    limits.max_otks_per_device_algorithm = u64::MAX;
    limits
}

fn device(i: usize) -> Device {
    Device::parse("@bench:example.org", &format!("DEV{i:04}")).unwrap()
}

fn key(n: u64) -> (KeyId, KeyJson) {
    let id = KeyId::parse(format!("{SC}:K{n:010}")).unwrap();
    let json = KeyJson::from_value(&serde_json::json!({
        "key": format!("publickeymaterial{n:030}"),
        "signatures": {"@bench:example.org": {"ed25519:DEV": "c2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJl"}},
    }))
    .unwrap();
    (id, json)
}

/// The group commit store or the baseline.
#[derive(Clone)]
enum Claimer {
    Group(Arc<RedbStore>),
    Baseline(RedbBaseline),
}

impl Claimer {
    /// Uploads `pool` OTKs spread over `devices` devices, 1000 per upload.
    async fn fill(&self, devices: usize, pool: u64) {
        let per = pool / devices as u64 + 1;
        let mut n = 0;
        for d in 0..devices {
            let mut left = per;
            while left > 0 {
                let chunk = left.min(1000);
                let first = n;
                let keys: Vec<_> = (0..chunk).map(|i| key(first + i)).collect();
                n += chunk;
                left -= chunk;
                match self {
                    Self::Group(store) => {
                        let upload = Upload::from_keys(device(d), keys, []).unwrap();
                        store.upload(&upload).await.unwrap();
                    }
                    Self::Baseline(baseline) => baseline.upload(&device(d), &keys).await.unwrap(),
                }
            }
        }
    }

    /// Claims one key; whether it got an OTK.
    async fn claim_one(&self, device: &Device, algorithm: &Algorithm) -> bool {
        match self {
            Self::Group(store) => {
                let target = ClaimTarget::one(device.clone(), algorithm.clone());
                let out = store.claim(&[target]).await.unwrap();
                out.keys.len() == 1 && !out.keys[0].fallback
            }
            Self::Baseline(baseline) => baseline
                .claim_one(device, algorithm)
                .await
                .unwrap()
                .is_some(),
        }
    }
}

/// Runs `c` claimers for `secs`; returns claims per second.
async fn claimers(claimer: Claimer, c: usize, hot: bool, secs: u64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..c {
        let (claimer, stop, done) = (claimer.clone(), Arc::clone(&stop), Arc::clone(&done));
        let device = device(if hot { 0 } else { i });
        let algorithm = Algorithm::parse(SC).unwrap();
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                assert!(
                    claimer.claim_one(&device, &algorithm).await,
                    "the key pool ran dry: raise KEYCLAIM_BENCH_POOL"
                );
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// The medians of one cell: group commit claims/s, baseline claims/s, and
/// the median of the per-round ratios.
struct Cell {
    group: f64,
    baseline: f64,
    ratio: f64,
}

/// One cell: both stores on fresh files in `dir`, filled alike, then
/// `rounds` rounds of `secs` each, group commit and baseline taking turns
/// (which one goes first alternates), so that a burst of load from
/// elsewhere on the machine hits both about alike.
async fn cell(
    dir: &Path,
    c: usize,
    hot: bool,
    secs: u64,
    pool: u64,
    rounds: usize,
    which: &str,
) -> Cell {
    let devices = if hot { 1 } else { c };
    let tag = format!("{}-{c}", if hot { "hot" } else { "distinct" });
    let linger = Duration::from_micros(env_or::<u64>("KEYCLAIM_BENCH_LINGER_US", 0));
    let options = RedbOptions::new().limits(limits());
    let group_path = dir.join(format!("group-{tag}.redb"));
    let base_path = dir.join(format!("baseline-{tag}.redb"));
    let _ = std::fs::remove_file(&group_path);
    let _ = std::fs::remove_file(&base_path);
    let group = if which == "baseline" {
        None
    } else {
        let store = Arc::new(
            RedbStore::open_with(&group_path, options.linger(linger))
                .await
                .unwrap(),
        );
        Claimer::Group(Arc::clone(&store)).fill(devices, pool).await;
        Some(store)
    };
    let base = if which == "group" {
        None
    } else {
        let baseline = RedbBaseline::open(&base_path).await.unwrap();
        Claimer::Baseline(baseline.clone())
            .fill(devices, pool)
            .await;
        Some(baseline)
    };
    let before = group.as_ref().map(|g| g.writer_stats()).unwrap_or_default();
    let (mut g_rates, mut b_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let mut g_rate = 0.0;
        let mut b_rate = 0.0;
        for turn in 0..2 {
            if (round + turn) % 2 == 0 {
                if let Some(g) = &group {
                    g_rate = claimers(Claimer::Group(Arc::clone(g)), c, hot, secs).await;
                }
            } else if let Some(b) = &base {
                b_rate = claimers(Claimer::Baseline(b.clone()), c, hot, secs).await;
            }
        }
        g_rates.push(g_rate);
        b_rates.push(b_rate);
        if b_rate > 0.0 {
            ratios.push(g_rate / b_rate);
        }
    }
    if let Some(g) = group {
        let stats = g.writer_stats();
        let (batches, ops) = (
            stats.batches - before.batches,
            stats.operations - before.operations,
        );
        eprintln!(
            "  {tag}: group commit ran {ops} claims in {batches} batches ({:.1} per batch, largest {})",
            ops as f64 / batches.max(1) as f64,
            stats.largest_batch
        );
        Arc::try_unwrap(g).unwrap().close().await.unwrap();
    }
    drop(base);
    let _ = std::fs::remove_file(&group_path);
    let _ = std::fs::remove_file(&base_path);
    Cell {
        group: median(g_rates),
        baseline: median(b_rates),
        ratio: median(ratios),
    }
}

fn main() {
    let secs = env_or::<u64>("KEYCLAIM_BENCH_SECS", 2);
    let pool = std::env::var("KEYCLAIM_BENCH_POOL")
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
    let rounds = env_or::<u64>("KEYCLAIM_BENCH_ROUNDS", 3).max(1) as usize;
    let tmp;
    let dir = match std::env::var_os("KEYCLAIM_BENCH_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            tmp = tempfile::tempdir().unwrap();
            tmp.path().to_owned()
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "redb concurrency benchmark: durable commits (Durability::Immediate), {rounds} rounds \
         of {secs} s per store and cell, medians; files in {}",
        dir.display()
    );
    println!();
    println!(
        "| claimers | devices | group commit claims/s | baseline claims/s | ratio (median of rounds) |"
    );
    println!("| ---: | --- | ---: | ---: | ---: |");
    let cs: Vec<usize> = std::env::var("KEYCLAIM_BENCH_C")
        .unwrap_or_else(|_| "1,8,64".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let devices = std::env::var("KEYCLAIM_BENCH_DEVICES").unwrap_or_else(|_| "both".into());
    let stores = std::env::var("KEYCLAIM_BENCH_STORES").unwrap_or_else(|_| "both".into());
    let hots: Vec<bool> = match devices.as_str() {
        "distinct" => vec![false],
        "hot" => vec![true],
        _ => vec![false, true],
    };
    for hot in hots {
        for &c in &cs {
            let pool = pool.unwrap_or(if c >= 64 { 600_000 } else { 200_000 });
            let r = runtime.block_on(cell(&dir, c, hot, secs, pool, rounds, &stores));
            println!(
                "| {c} | {} | {:.0} | {:.0} | {:.1}x |",
                if hot { "one hot device" } else { "distinct" },
                r.group,
                r.baseline,
                r.ratio
            );
        }
    }
}
