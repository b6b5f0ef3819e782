//! Criterion micro-benchmarks of the SQLite store, one operation at a time:
//! claim one key (durable and `NORMAL`), upload 50 keys, read counts and the
//! sync state.
//!
//! ```text
//! cargo bench -p keyclaim-benches --bench sqlite
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use keyclaim::{Algorithm, ClaimTarget, Device, KeyId, KeyJson, KeyStore, Limits, Upload};
use keyclaim_sqlite::{SqliteOptions, SqliteStore, Synchronous};

fn key(n: usize, alg: &str) -> (KeyId, KeyJson) {
    let json = serde_json::json!({
        "key": format!("{n:0>43}"),
        "signatures": {"@bench:example.org": {"ed25519:DEVICE": format!("{n:0>86}")}},
    });
    (
        KeyId::parse(format!("{alg}:K{n:010}")).unwrap(),
        KeyJson::from_value(&json).unwrap(),
    )
}

fn device(i: usize) -> Device {
    Device::parse(&format!("@bench{i}:example.org"), "DEVICE").unwrap()
}

fn options(sync: Synchronous) -> SqliteOptions {
    let mut limits = Limits::default();
    limits.max_otks_per_device_algorithm = u64::MAX;
    SqliteOptions::new().limits(limits).synchronous(sync)
}

/// Uploads `n` new keys to `device`, numbered from `next`.
async fn fill(store: &SqliteStore, device: &Device, next: &AtomicUsize, n: usize) {
    let mut left = n;
    while left > 0 {
        let chunk = left.min(1000);
        let from = next.fetch_add(chunk, Ordering::Relaxed);
        let keys = (from..from + chunk).map(|i| key(i, "signed_curve25519"));
        let upload = Upload::from_keys(device.clone(), keys, []).unwrap();
        store.upload(&upload).await.unwrap();
        left -= chunk;
    }
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group("sqlite");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    for (name, sync) in [
        ("claim_one_full", Synchronous::Full),
        ("claim_one_normal", Synchronous::Normal),
    ] {
        let store = rt
            .block_on(SqliteStore::open_with(
                dir.path().join(format!("{name}.sqlite")),
                options(sync),
            ))
            .unwrap();
        let d = device(0);
        let next = AtomicUsize::new(0);
        let target = [ClaimTarget::one(d.clone(), Algorithm::signed_curve25519())];
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    fill(&store, &d, &next, usize::try_from(iters).unwrap()).await;
                    let start = Instant::now();
                    for _ in 0..iters {
                        let out = store.claim(&target).await.unwrap();
                        assert_eq!(out.keys.len(), 1);
                    }
                    start.elapsed()
                })
            });
        });
    }

    let store = rt
        .block_on(SqliteStore::open_with(
            dir.path().join("upload.sqlite"),
            options(Synchronous::Full),
        ))
        .unwrap();
    let next = AtomicUsize::new(0);
    group.bench_function("upload_50_full", |b| {
        b.iter_custom(|iters| {
            let uploads: Vec<Upload> = (0..iters)
                .map(|i| {
                    let from = next.fetch_add(50, Ordering::Relaxed);
                    let keys = (from..from + 50).map(|n| key(n, "signed_curve25519"));
                    Upload::from_keys(device(usize::try_from(i % 100).unwrap()), keys, []).unwrap()
                })
                .collect();
            rt.block_on(async {
                let start = Instant::now();
                for upload in &uploads {
                    store.upload(upload).await.unwrap();
                }
                start.elapsed()
            })
        });
    });

    // Reads: one device with 3 algorithms x 100 keys and 2 fallback keys,
    // in the file the upload benchmark filled (100 devices).
    let d = device(100_000);
    rt.block_on(async {
        for alg in ["signed_curve25519", "alg2", "alg3"] {
            let keys = (0..100).map(|n| key(n, alg));
            let fallback = [key(1_000_000, alg)];
            let fallback = if alg == "alg3" {
                &fallback[..0]
            } else {
                &fallback[..]
            };
            let upload = Upload::from_keys(d.clone(), keys, fallback.iter().cloned()).unwrap();
            store.upload(&upload).await.unwrap();
        }
    });
    group.bench_function("otk_counts", |b| {
        b.to_async(&rt)
            .iter(|| async { store.otk_counts(&d).await.unwrap() });
    });
    group.bench_function("sync_state", |b| {
        b.to_async(&rt)
            .iter(|| async { store.sync_state(&d).await.unwrap() });
    });
    group.finish();
}

criterion_group!(sqlite, benches);
criterion_main!(sqlite);
