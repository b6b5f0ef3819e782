//! Memory backend micro-benchmarks: claim one key, upload 50 keys, read counts.
//!
//! `cargo bench -p keyclaim-benches --bench memory`

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use keyclaim::{Algorithm, ClaimTarget, KeyStore};
use keyclaim_benches::{device, upload};
use keyclaim_memory::MemoryStore;

const DEVICES: usize = 10_000;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let store = MemoryStore::new();
    // 10,000 devices with 50 keys each: 500,000 stored keys.
    rt.block_on(async {
        for i in 0..DEVICES {
            store
                .upload(&upload(&device(i).unwrap(), "K", 50, true).unwrap())
                .await
                .unwrap();
        }
    });
    let alg = Algorithm::signed_curve25519();
    let next = AtomicUsize::new(0);
    let mut group = c.benchmark_group("memory");
    group.bench_function("claim_one", |b| {
        b.iter(|| {
            let i = next.fetch_add(1, Ordering::Relaxed) % DEVICES;
            let target = [ClaimTarget::one(device(i).unwrap(), alg.clone())];
            rt.block_on(store.claim(&target)).unwrap()
        })
    });
    let round = AtomicUsize::new(0);
    group.bench_function("upload_50", |b| {
        b.iter_batched(
            || {
                let r = round.fetch_add(1, Ordering::Relaxed);
                // A fresh device each time, so that the 500-key limit is never hit.
                upload(&device(DEVICES + r).unwrap(), "U", 50, false).unwrap()
            },
            |u| rt.block_on(store.upload(&u)).unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
    let d = device(7).unwrap();
    group.bench_function("counts", |b| {
        b.iter(|| rt.block_on(store.sync_state(&d)).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
