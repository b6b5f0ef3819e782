//! Criterion micro-benchmarks of one `RedbStore` call at a time, durable
//! commits (the default): claim one key, upload 50 keys, read counts.
//!
//! ```text
//! cargo bench -p keyclaim-benches --bench redb
//! ```
//!
//! One call at a time means one batch per call, so claim and upload pay a
//! whole fsync each; the concurrency benchmark shows what group commit
//! makes of many callers.

#![allow(
    missing_docs,
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use keyclaim::{Algorithm, ClaimTarget, Device, KeyId, KeyJson, KeyStore, Limits, Upload};
use keyclaim_redb::{RedbOptions, RedbStore};

const SC: &str = "signed_curve25519";

fn key(n: u64) -> (KeyId, KeyJson) {
    let id = KeyId::parse(format!("{SC}:K{n:010}")).unwrap();
    let json = KeyJson::from_value(&serde_json::json!({
        "key": format!("publickeymaterial{n:030}"),
        "signatures": {"@bench:example.org": {"ed25519:DEV": "c2lnbmF0dXJlc2lnbmF0dXJl"}},
    }))
    .unwrap();
    (id, json)
}

fn device(i: u64) -> Device {
    Device::parse("@bench:example.org", &format!("DEV{i:06}")).unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn open(rt: &tokio::runtime::Runtime, dir: &tempfile::TempDir, name: &str) -> RedbStore {
    let mut limits = Limits::default();
    limits.max_otks_per_device_algorithm = u64::MAX;
    rt.block_on(RedbStore::open_with(
        dir.path().join(name),
        RedbOptions::new().limits(limits),
    ))
    .unwrap()
}

fn benches(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("redb");
    group.measurement_time(Duration::from_secs(5));
    group.sample_size(20);

    // Claim one key: the keys are uploaded (untimed) before each run.
    let store = open(&rt, &dir, "claim.redb");
    let mut next_key = 0u64;
    group.bench_function("claim_one", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let dev = device(0);
                let mut left = iters;
                while left > 0 {
                    let chunk = left.min(1000);
                    let first = next_key;
                    let keys = (0..chunk).map(|i| key(first + i));
                    next_key += chunk;
                    left -= chunk;
                    store
                        .upload(&Upload::from_keys(dev.clone(), keys, []).unwrap())
                        .await
                        .unwrap();
                }
                let target = ClaimTarget::one(dev, Algorithm::parse(SC).unwrap());
                let start = Instant::now();
                for _ in 0..iters {
                    let out = store.claim(std::slice::from_ref(&target)).await.unwrap();
                    assert_eq!(out.keys.len(), 1);
                }
                start.elapsed()
            })
        });
    });

    // Upload 50 new keys to a device.
    let store = open(&rt, &dir, "upload.redb");
    let mut n = 0u64;
    group.bench_function("upload_50", |b| {
        b.iter(|| {
            let keys = (0..50).map(|i| key(n + i));
            let upload = Upload::from_keys(device(n / 5000), keys, []).unwrap();
            n += 50;
            rt.block_on(store.upload(&upload)).unwrap();
        });
    });

    // Counts of one device among 1000 devices with keys.
    let store = open(&rt, &dir, "counts.redb");
    rt.block_on(async {
        for d in 0..1000 {
            let keys = (0..20).map(|i| key(d * 100 + i));
            store
                .upload(&Upload::from_keys(device(d), keys, []).unwrap())
                .await
                .unwrap();
        }
    });
    let dev = device(500);
    group.bench_function("otk_counts", |b| {
        b.iter(|| {
            let counts = rt.block_on(store.otk_counts(&dev)).unwrap();
            assert_eq!(counts.get_str(SC), 20);
        });
    });
    group.bench_function("sync_state", |b| {
        b.iter(|| rt.block_on(store.sync_state(&dev)).unwrap());
    });
    group.finish();
}

criterion_group!(micro, benches);
criterion_main!(micro);
