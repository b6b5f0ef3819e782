//! Claim throughput and bulk-claim latency: keyclaim's `SKIP LOCKED` claim
//! against the reference homeserver's statement shape
//! ([`keyclaim_postgres::baseline`]), side by side on the same server.
//!
//! Run: `cargo bench -p keyclaim-postgres --bench claim`. Uses
//! `KEYCLAIM_BENCH_POSTGRES_URL` if set, else starts a throwaway cluster
//! (`KEYCLAIM_BENCH_DURABLE=1` for `fsync=on`; default off). Knobs:
//! `KEYCLAIM_BENCH_CLAIMS` (claims per run, default 4000),
//! `KEYCLAIM_BENCH_BULK_RUNS` (1,000-device claims, default 25),
//! `KEYCLAIM_BENCH_ONLY` (`hot`, `distinct` or `bulk`: one part only).
//!
//! For each approach, scenario (one hot device, or one device per claimer)
//! and concurrency C in 1, 8, 64: the device(s) hold more keys than the run
//! claims, so every single-key claim should get one; a claim that gets none
//! came away short (under-issue).
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyclaim::{ClaimTarget, Device, KeyId, KeyJson, KeyStore, Limits, Upload};
use keyclaim_postgres::{PostgresOptions, PostgresStore, baseline, testing};

const SC: &str = "signed_curve25519";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Approach {
    Keyclaim,
    Baseline,
}

impl Approach {
    fn name(self) -> &'static str {
        match self {
            Self::Keyclaim => "keyclaim (SKIP LOCKED)",
            Self::Baseline => "baseline (ROW_NUMBER)",
        }
    }

    async fn claim(self, store: &PostgresStore, targets: &[ClaimTarget]) -> usize {
        match self {
            Self::Keyclaim => store
                .claim(targets)
                .await
                .expect("claim")
                .keys
                .iter()
                .filter(|k| !k.fallback)
                .count(),
            Self::Baseline => baseline::claim(store, targets)
                .await
                .expect("baseline claim")
                .len(),
        }
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn device(name: &str) -> Device {
    Device::parse(&format!("@{name}:bench.example.org"), "DEVICE").expect("device")
}

fn key(i: usize) -> (KeyId, KeyJson) {
    let id = KeyId::parse(format!("{SC}:K{i:08}")).expect("key id");
    let json = KeyJson::from_value(&serde_json::json!({
        "key": format!("curve25519-public-key-material-{i:08}-xxxxxxxxxxxx"),
        "signatures": {"@bench:bench.example.org": {"ed25519:DEVICE": "a-signature-of-about-eighty-eight-characters-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}
    }))
    .expect("key json");
    (id, json)
}

async fn fill(store: &PostgresStore, device: &Device, n: usize) {
    let mut i = 0;
    while i < n {
        let end = (i + 1000).min(n);
        let upload = Upload::from_keys(device.clone(), (i..end).map(key), []).expect("upload");
        store.upload(&upload).await.expect("fill upload");
        i = end;
    }
}

struct RunResult {
    claims_per_s: f64,
    short: usize,
}

async fn run(
    store: &Arc<PostgresStore>,
    approach: Approach,
    hot: bool,
    concurrency: usize,
    claims: usize,
    tag: &str,
) -> RunResult {
    let per_claimer = claims / concurrency;
    let devices: Vec<Device> = if hot {
        vec![device(&format!("hot-{tag}"))]
    } else {
        (0..concurrency)
            .map(|i| device(&format!("d{i}-{tag}")))
            .collect()
    };
    let per_device = if hot { claims } else { per_claimer };
    for d in &devices {
        // More than will be claimed: a claim that gets nothing is short.
        fill(store, d, per_device + per_device / 4 + 10).await;
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let store = store.clone();
        let target = vec![ClaimTarget::one(
            devices[if hot { 0 } else { i }].clone(),
            keyclaim::Algorithm::signed_curve25519(),
        )];
        tasks.push(tokio::spawn(async move {
            let mut short = 0;
            for _ in 0..per_claimer {
                if approach.claim(&store, &target).await == 0 {
                    short += 1;
                }
            }
            short
        }));
    }
    let mut short = 0;
    for t in tasks {
        short += t.await.expect("claimer");
    }
    let elapsed = start.elapsed();
    RunResult {
        claims_per_s: (per_claimer * concurrency) as f64 / elapsed.as_secs_f64(),
        short,
    }
}

async fn bulk(
    store: &PostgresStore,
    approach: Approach,
    runs: usize,
    tag: &str,
) -> (Duration, Duration) {
    let devices: Vec<Device> = (0..1000)
        .map(|i| device(&format!("bulk{i}-{tag}")))
        .collect();
    for d in &devices {
        fill(store, d, runs + 2).await;
    }
    let targets: Vec<ClaimTarget> = devices
        .iter()
        .map(|d| ClaimTarget::one(d.clone(), keyclaim::Algorithm::signed_curve25519()))
        .collect();
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let got = approach.claim(store, &targets).await;
        times.push(start.elapsed());
        assert_eq!(got, 1000, "a lone bulk claim gets a key from every device");
    }
    times.sort();
    (times[times.len() / 2], times[times.len() * 9 / 10])
}

fn main() {
    let claims = env_usize("KEYCLAIM_BENCH_CLAIMS", 4000);
    let bulk_runs = env_usize("KEYCLAIM_BENCH_BULK_RUNS", 25);
    let durable = std::env::var("KEYCLAIM_BENCH_DURABLE").is_ok_and(|v| v == "1");
    let (url, _cluster) = match std::env::var("KEYCLAIM_BENCH_POSTGRES_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let cluster =
                testing::Cluster::start(durable).expect("start a throwaway PostgreSQL cluster");
            (cluster.url(), Some(cluster))
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut limits = Limits::default();
        limits.max_otks_per_device_algorithm = 10_000_000;
        let store = Arc::new(
            PostgresStore::connect_with(
                &url,
                PostgresOptions::new()
                    .schema(testing::unique_schema("kc_bench"))
                    .pool_size(72)
                    .limits(limits),
            )
            .await
            .expect("connect"),
        );
        println!(
            "keyclaim-postgres claim benchmark: {claims} single-key claims per run, server {}",
            if _cluster.is_some() {
                if durable {
                    "throwaway cluster, fsync=on"
                } else {
                    "throwaway cluster, fsync=off"
                }
            } else {
                "KEYCLAIM_BENCH_POSTGRES_URL"
            }
        );
        println!();
        println!("| scenario | C | approach | claims/s | short claims |");
        println!("| --- | ---: | --- | ---: | ---: |");
        let only = std::env::var("KEYCLAIM_BENCH_ONLY").unwrap_or_default();
        let mut n = 0;
        for hot in [true, false] {
            let part = if hot { "hot" } else { "distinct" };
            if !only.is_empty() && only != part {
                continue;
            }
            for concurrency in [1, 8, 64] {
                for approach in [Approach::Baseline, Approach::Keyclaim] {
                    n += 1;
                    let r = run(&store, approach, hot, concurrency, claims, &format!("r{n}")).await;
                    println!(
                        "| {} | {concurrency} | {} | {:.0} | {} |",
                        if hot {
                            "one hot device"
                        } else {
                            "distinct devices"
                        },
                        approach.name(),
                        r.claims_per_s,
                        r.short
                    );
                }
            }
        }
        println!();
        println!("| 1,000-device claim in one request | p50 | p90 |");
        println!("| --- | ---: | ---: |");
        for approach in [Approach::Baseline, Approach::Keyclaim] {
            if !only.is_empty() && only != "bulk" {
                continue;
            }
            n += 1;
            let (p50, p90) = bulk(&store, approach, bulk_runs, &format!("b{n}")).await;
            println!(
                "| {} | {:.1} ms | {:.1} ms |",
                approach.name(),
                p50.as_secs_f64() * 1e3,
                p90.as_secs_f64() * 1e3
            );
        }
    });
}
