//! Concurrency benchmark: claims per second with C = 1, 8, 64 concurrent
//! claimers, on distinct devices and on one hot device, for the group-commit
//! [`RedbStore`] and the one-transaction-per-claim-target
//! [`BaselineStore`], side by side on the same settings (durable commits,
//! a fresh file per cell in the same directory).
//!
//! ```text
//! cargo bench -p keyclaim-redb --bench concurrency
//! ```
//!
//! Environment: `KEYCLAIM_BENCH_DIR` (where the files go; default the
//! system temp dir: put it on the disk you care about), `KEYCLAIM_BENCH_SECS`
//! (seconds per cell, default 3), `KEYCLAIM_BENCH_POOL` (OTKs uploaded
//! before each cell, default 100000), `KEYCLAIM_BENCH_C` (claimer counts,
//! default `1,8,64`), `KEYCLAIM_BENCH_DEVICES` (`distinct`, `hot` or
//! `both`, the default), `KEYCLAIM_BENCH_STORES` (`group`, `baseline` or
//! `both`, the default; a skipped store shows as 0).
//!
//! Each claimer loops `claim([one target])` until the time is up. Every
//! claim must return exactly one OTK (the pool must not run dry); the
//! benchmark fails otherwise.

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keyclaim::{ClaimTarget, Device, KeyId, KeyJson, KeyStore, Limits, Upload};
use keyclaim_redb::baseline::BaselineStore;
use keyclaim_redb::{RedbOptions, RedbStore};

const SC: &str = "signed_curve25519";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

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

/// Uploads `pool` OTKs spread over `devices` devices, 1000 per upload.
async fn fill(store: &dyn KeyStore, devices: usize, pool: u64) {
    let per = pool / devices as u64 + 1;
    let mut n = 0;
    for d in 0..devices {
        let mut left = per;
        while left > 0 {
            let chunk = left.min(1000);
            let first = n;
            let keys = (0..chunk).map(|i| key(first + i));
            n += chunk;
            left -= chunk;
            let upload = Upload::from_keys(device(d), keys, []).unwrap();
            store.upload(&upload).await.unwrap();
        }
    }
}

/// Runs `c` claimers for `secs`; returns claims per second.
async fn claimers(store: Arc<dyn KeyStore>, c: usize, hot: bool, secs: u64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..c {
        let (store, stop, done) = (Arc::clone(&store), Arc::clone(&stop), Arc::clone(&done));
        let target = ClaimTarget::one(
            device(if hot { 0 } else { i }),
            keyclaim::Algorithm::parse(SC).unwrap(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let out = store.claim(std::slice::from_ref(&target)).await.unwrap();
                assert!(
                    out.keys.len() == 1 && !out.keys[0].fallback,
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

#[derive(Clone, Copy)]
enum Kind {
    GroupCommit,
    Baseline,
}

async fn cell(dir: &Path, kind: Kind, c: usize, hot: bool, secs: u64, pool: u64) -> f64 {
    let name = format!(
        "{}-{}-{c}.redb",
        match kind {
            Kind::GroupCommit => "group",
            Kind::Baseline => "baseline",
        },
        if hot { "hot" } else { "distinct" }
    );
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    let options = RedbOptions::new().limits(limits());
    let devices = if hot { 1 } else { c };
    let rate = match kind {
        Kind::GroupCommit => {
            let store = Arc::new(RedbStore::open_with(&path, options).await.unwrap());
            fill(&*store, devices, pool).await;
            let rate = claimers(store.clone() as Arc<dyn KeyStore>, c, hot, secs).await;
            let stats = store.writer_stats();
            eprintln!(
                "  group commit c={c} hot={hot}: {} commits, {} ops, largest batch {}",
                stats.commits, stats.operations, stats.largest_batch
            );
            Arc::try_unwrap(store).unwrap().close().await.unwrap();
            rate
        }
        Kind::Baseline => {
            let store = Arc::new(BaselineStore::open_with(&path, options).await.unwrap());
            fill(&*store, devices, pool).await;
            let rate = claimers(store.clone() as Arc<dyn KeyStore>, c, hot, secs).await;
            Arc::try_unwrap(store).unwrap().close().await.unwrap();
            rate
        }
    };
    let _ = std::fs::remove_file(&path);
    rate
}

fn main() {
    let secs = env_num("KEYCLAIM_BENCH_SECS", 3);
    let pool = env_num("KEYCLAIM_BENCH_POOL", 100_000);
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
        "redb concurrency benchmark: durable commits (Durability::Immediate), {secs} s per cell, \
         files in {}",
        dir.display()
    );
    println!();
    println!("| claimers | devices | group commit claims/s | baseline claims/s | ratio |");
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
            let (group, base) = runtime.block_on(async {
                let group = if stores == "baseline" {
                    0.0
                } else {
                    cell(&dir, Kind::GroupCommit, c, hot, secs, pool).await
                };
                let base = if stores == "group" {
                    0.0
                } else {
                    cell(&dir, Kind::Baseline, c, hot, secs, pool).await
                };
                (group, base)
            });
            println!(
                "| {c} | {} | {group:.0} | {base:.0} | {:.1}x |",
                if hot { "one hot device" } else { "distinct" },
                group / base
            );
        }
    }
}
