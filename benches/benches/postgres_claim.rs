//! Claim throughput and bulk-claim latency: keyclaim's `SKIP LOCKED` claim
//! against the reference homeserver's statement shape
//! ([`keyclaim_benches::baseline::PostgresBaseline`]), side by side on the
//! same server.
//!
//! Run: `cargo bench -p keyclaim-benches --bench postgres_claim`. Uses
//! `KEYCLAIM_BENCH_POSTGRES_URL` if set (give it a server with durable
//! settings: `fsync=on`, `synchronous_commit=on`; the header shows what the
//! server runs with), else starts a throwaway cluster, durable unless
//! `KEYCLAIM_BENCH_DURABLE=0` (`fsync=off`). Knobs:
//! `KEYCLAIM_BENCH_CLAIMS` (claims per run, default 4000),
//! `KEYCLAIM_BENCH_BULK_RUNS` (1,000-device claims, default 25),
//! `KEYCLAIM_BENCH_ONLY` (`hot`, `distinct` or `bulk`: one part only),
//! `KEYCLAIM_BENCH_REPEAT` (runs per cell, default 3: the table shows the
//! median claims/s and the total of short claims; the two approaches take
//! turns going first, so that a busy machine's swings hit both alike).
//!
//! For each approach, scenario (one hot device, or one device per claimer)
//! and concurrency C in 1, 8, 64: the device(s) hold more keys than the run
//! claims, so every single-key claim should get one; a claim that gets none
//! came away short (under-issue).
//!
//! Both approaches run on the same server, each on tables of its own in a
//! schema of its own, filled alike, each through its own pool: keyclaim's
//! store with its defaults, the baseline with PostgreSQL choosing between
//! custom and generic plans, with `enable_seqscan=off` as keyclaim (with
//! the server's plain defaults it sometimes chose plans that cut its
//! throughput several-fold, which would flatter keyclaim).
//! `KEYCLAIM_BENCH_BASELINE_PINNED=1` gives it keyclaim's pinned generic
//! plans instead.
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyclaim::{ClaimTarget, Device, KeyId, KeyJson, KeyStore, Limits, Upload};
use keyclaim_benches::baseline::{Baseline, PostgresBaseline};
use keyclaim_benches::{env_or, load_average};
use keyclaim_postgres::{PostgresOptions, PostgresStore};
use keyclaim_testing::postgres as testing;

const SC: &str = "signed_curve25519";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Approach {
    Keyclaim,
    Baseline,
}

const APPROACHES: [Approach; 2] = [Approach::Baseline, Approach::Keyclaim];

impl Approach {
    fn name(self) -> &'static str {
        match self {
            Self::Keyclaim => "keyclaim (SKIP LOCKED)",
            Self::Baseline => "baseline (ROW_NUMBER)",
        }
    }

    async fn claim(self, stores: &Stores, targets: &[ClaimTarget]) -> usize {
        match self {
            Self::Keyclaim => stores
                .keyclaim
                .claim(targets)
                .await
                .expect("claim")
                .keys
                .iter()
                .filter(|k| !k.fallback)
                .count(),
            Self::Baseline => stores
                .baseline
                .claim(targets)
                .await
                .expect("baseline claim")
                .len(),
        }
    }

    /// Uploads `n` keys to `device`, 1000 per upload.
    async fn fill(self, stores: &Stores, device: &Device, n: usize) {
        let mut i = 0;
        while i < n {
            let end = (i + 1000).min(n);
            let keys: Vec<_> = (i..end).map(key).collect();
            match self {
                Self::Keyclaim => {
                    let upload = Upload::from_keys(device.clone(), keys, []).expect("upload");
                    stores.keyclaim.upload(&upload).await.expect("fill upload");
                }
                Self::Baseline => {
                    stores
                        .baseline
                        .upload(device, &keys)
                        .await
                        .expect("fill baseline upload");
                }
            }
            i = end;
        }
    }
}

/// The two approaches' handles (see the module docs).
struct Stores {
    keyclaim: PostgresStore,
    baseline: PostgresBaseline,
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

struct RunResult {
    claims_per_s: f64,
    short: usize,
}

async fn run(
    stores: &Arc<Stores>,
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
        approach
            .fill(stores, d, per_device + per_device / 4 + 10)
            .await;
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let stores = stores.clone();
        let target = vec![ClaimTarget::one(
            devices[if hot { 0 } else { i }].clone(),
            keyclaim::Algorithm::signed_curve25519(),
        )];
        tasks.push(tokio::spawn(async move {
            let mut short = 0;
            for _ in 0..per_claimer {
                if approach.claim(&stores, &target).await == 0 {
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

async fn bulk(stores: &Stores, approach: Approach, runs: usize, tag: &str) -> (Duration, Duration) {
    let devices: Vec<Device> = (0..1000)
        .map(|i| device(&format!("bulk{i}-{tag}")))
        .collect();
    for d in &devices {
        approach.fill(stores, d, runs + 2).await;
    }
    let targets: Vec<ClaimTarget> = devices
        .iter()
        .map(|d| ClaimTarget::one(d.clone(), keyclaim::Algorithm::signed_curve25519()))
        .collect();
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let got = approach.claim(stores, &targets).await;
        times.push(start.elapsed());
        assert_eq!(got, 1000, "a lone bulk claim gets a key from every device");
    }
    times.sort();
    (times[times.len() / 2], times[times.len() * 9 / 10])
}

fn main() {
    let claims = env_or::<usize>("KEYCLAIM_BENCH_CLAIMS", 4000);
    let bulk_runs = env_or::<usize>("KEYCLAIM_BENCH_BULK_RUNS", 25);
    let repeat = env_or::<usize>("KEYCLAIM_BENCH_REPEAT", 3).max(1);
    let durable = std::env::var("KEYCLAIM_BENCH_DURABLE").map_or(true, |v| v != "0");
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
        let schema = testing::unique_schema("kc_bench");
        let options = PostgresOptions::new()
            .schema(schema)
            .pool_size(72)
            .limits(limits)
            // KEYCLAIM_BENCH_DURABLE=0 runs a throwaway server with fsync = off,
            // which keyclaim refuses unless told (R10.5).
            .allow_unsafe_server(!durable);
        let keyclaim = PostgresStore::connect_with(&url, options)
            .await
            .expect("connect");
        let baseline_pinned =
            std::env::var("KEYCLAIM_BENCH_BASELINE_PINNED").is_ok_and(|v| v == "1");
        let baseline = PostgresBaseline::connect(
            &url,
            &testing::unique_schema("kc_bench_base"),
            72,
            baseline_pinned,
        )
        .await
        .expect("connect the baseline");
        let stores = Arc::new(Stores { keyclaim, baseline });
        println!(
            "keyclaim-postgres claim benchmark: {claims} single-key claims per run, server {} ({}), baseline plans {}, load average {}",
            if _cluster.is_some() {
                "throwaway cluster"
            } else {
                "KEYCLAIM_BENCH_POSTGRES_URL"
            },
            server_settings(&url).await,
            if baseline_pinned {
                "pinned generic"
            } else {
                "PostgreSQL's choice"
            },
            load_average(),
        );
        println!();
        println!("| scenario | C | approach | claims/s (median of {repeat}) | short claims |");
        println!("| --- | ---: | --- | ---: | ---: |");
        let only = std::env::var("KEYCLAIM_BENCH_ONLY").unwrap_or_default();
        let mut n = 0;
        for hot in [true, false] {
            let part = if hot { "hot" } else { "distinct" };
            if !only.is_empty() && only != part {
                continue;
            }
            for concurrency in [1, 8, 64] {
                let mut rates = [Vec::new(), Vec::new()];
                let mut shorts = [0, 0];
                for rep in 0..repeat {
                    let order = if rep % 2 == 0 { [0, 1] } else { [1, 0] };
                    for i in order {
                        n += 1;
                        let r = run(
                            &stores,
                            APPROACHES[i],
                            hot,
                            concurrency,
                            claims,
                            &format!("r{n}"),
                        )
                        .await;
                        rates[i].push(r.claims_per_s);
                        shorts[i] += r.short;
                    }
                }
                for i in 0..2 {
                    rates[i].sort_by(f64::total_cmp);
                    println!(
                        "| {} | {concurrency} | {} | {:.0} | {} of {} |",
                        if hot {
                            "one hot device"
                        } else {
                            "distinct devices"
                        },
                        APPROACHES[i].name(),
                        rates[i][rates[i].len() / 2],
                        shorts[i],
                        (claims / concurrency) * concurrency * repeat,
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
            let (p50, p90) = bulk(&stores, approach, bulk_runs, &format!("b{n}")).await;
            println!(
                "| {} | {:.1} ms | {:.1} ms |",
                approach.name(),
                p50.as_secs_f64() * 1e3,
                p90.as_secs_f64() * 1e3
            );
        }
        println!();
        println!("load average at the end: {}", load_average());
    });
}

/// The server's durability settings, for the header.
async fn server_settings(url: &str) -> String {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect for settings");
    tokio::spawn(connection);
    let mut out = Vec::new();
    for name in [
        "server_version",
        "fsync",
        "synchronous_commit",
        "full_page_writes",
    ] {
        let row = client
            .query_one(&format!("SHOW {name}"), &[])
            .await
            .expect("SHOW");
        out.push(format!("{name}={}", row.get::<_, String>(0)));
    }
    out.join(" ")
}
