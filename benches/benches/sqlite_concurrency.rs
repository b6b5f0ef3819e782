//! Concurrency benchmark: C concurrent claimers (C = 1, 8, 64), on distinct
//! devices and on one hot device, durable settings (`synchronous = FULL`),
//! `SqliteStore` (group commit) side by side with the baseline that does one
//! transaction per claim (`keyclaim_benches::baseline::SqliteBaseline`), each
//! on a file of its own in the same directory. Prints a table of claims per
//! second, p50 latency and the ratios.
//!
//! ```text
//! cargo bench -p keyclaim-benches --bench sqlite_concurrency
//! KEYCLAIM_BENCH_ROUNDS=5 KEYCLAIM_BENCH_DIR=/var/tmp cargo bench -p keyclaim-benches --bench sqlite_concurrency
//! ```
//!
//! Each (scenario, C) gets a pair of files, filled alike; every round runs
//! both claimers (alternating which goes first) and the table shows the
//! median over rounds.
//! A round is 256 baseline claims and 8,192 keyclaim claims (256 at C = 1),
//! long enough that the start and the tail of a round (when fewer than C
//! claimers are still running) weigh little in keyclaim's rate.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyclaim::{Algorithm, ClaimTarget, Device, KeyId, KeyJson, KeyStore, Limits, Upload};
use keyclaim_benches::baseline::{Baseline, SqliteBaseline};
use keyclaim_benches::{env_or, load_average, median};
use keyclaim_sqlite::{SqliteOptions, SqliteStore, Synchronous};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Distinct,
    Hot,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Self::Distinct => "distinct devices",
            Self::Hot => "one hot device",
        }
    }

    fn device_of(self, task: usize) -> Device {
        let i = match self {
            Self::Distinct => task,
            Self::Hot => 0,
        };
        Device::parse(&format!("@bench{i}:example.org"), &format!("DEVICE{i}")).unwrap()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Claimer {
    Baseline,
    Keyclaim,
}

/// One run's result.
#[derive(Clone, Copy)]
struct Run {
    claims_per_sec: f64,
    p50: Duration,
    p99: Duration,
}

fn key_json(n: usize) -> KeyJson {
    // Shaped like a real signed curve25519 key (about 200 bytes).
    let json = serde_json::json!({
        "key": format!("{n:0>43}"),
        "signatures": {"@bench:example.org": {"ed25519:DEVICE": format!("{n:0>86}")}},
    });
    KeyJson::from_value(&json).unwrap()
}

fn options() -> SqliteOptions {
    let mut limits = Limits::default();
    limits.max_otks_per_device_algorithm = 10_000_000;
    SqliteOptions::new()
        .limits(limits)
        .synchronous(Synchronous::Full)
}

/// Uploads the same `n` keys to the store and to the baseline.
async fn populate(store: &SqliteStore, baseline: &SqliteBaseline, device: &Device, n: usize) {
    let mut next = 0;
    while next < n {
        let chunk = (n - next).min(1000);
        let keys: Vec<(KeyId, KeyJson)> = (next..next + chunk)
            .map(|i| {
                (
                    KeyId::parse(format!("signed_curve25519:K{i:08}")).unwrap(),
                    key_json(i),
                )
            })
            .collect();
        baseline.upload(device, &keys).await.unwrap();
        store
            .upload(&Upload::from_keys(device.clone(), keys, []).unwrap())
            .await
            .unwrap();
        next += chunk;
    }
}

/// Runs `c` claimers, each making `per_task` one-target claims.
async fn run(
    claimer: Claimer,
    scenario: Scenario,
    c: usize,
    per_task: usize,
    store: &Arc<SqliteStore>,
    baseline: &SqliteBaseline,
) -> Run {
    let alg = Algorithm::signed_curve25519();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..c {
        let device = scenario.device_of(t);
        let (store, baseline, alg) = (store.clone(), baseline.clone(), alg.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_task);
            for _ in 0..per_task {
                let t0 = Instant::now();
                let got = match claimer {
                    Claimer::Keyclaim => {
                        let target = ClaimTarget::one(device.clone(), alg.clone());
                        store.claim(&[target]).await.unwrap().keys.len()
                    }
                    Claimer::Baseline => {
                        usize::from(baseline.claim_one(&device, &alg).await.unwrap().is_some())
                    }
                };
                latencies.push(t0.elapsed());
                assert_eq!(got, 1, "the device ran out of keys: populate more");
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
    Run {
        claims_per_sec: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: at(0.5),
        p99: at(0.99),
    }
}

fn ms(d: f64) -> String {
    format!("{:.2} ms", d * 1e3)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing
    // like it: then run a tiny smoke version.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let knob = |name, default: usize, in_smoke| {
        if smoke {
            in_smoke
        } else {
            env_or(name, default)
        }
    };
    let rounds = knob("KEYCLAIM_BENCH_ROUNDS", 9, 1);
    let baseline_claims = knob("KEYCLAIM_BENCH_BASELINE_CLAIMS", 256, 16);
    let keyclaim_claims = knob("KEYCLAIM_BENCH_CLAIMS", 8192, 64);
    let warmup = knob("KEYCLAIM_BENCH_WARMUP", 512, 8);
    let dir = match std::env::var("KEYCLAIM_BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d).unwrap(),
        Err(_) => tempfile::tempdir().unwrap(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    println!(
        "keyclaim-sqlite concurrency benchmark: synchronous=FULL, WAL, {rounds} round(s), \
         one-target claims; {warmup} warm-up claims each, then per round baseline \
         {baseline_claims} claims, keyclaim {keyclaim_claims} claims (C=1: {baseline_claims}); \
         medians over rounds"
    );
    println!("load average before: {}", load_average());
    println!(
        "{:<17} {:>3} | {:>14} {:>10} {:>10} | {:>14} {:>10} {:>10} | {:>7} {:>9}",
        "scenario",
        "C",
        "baseline cl/s",
        "p50",
        "p99",
        "keyclaim cl/s",
        "p50",
        "p99",
        "ratio",
        "p50 ratio"
    );
    for scenario in [Scenario::Distinct, Scenario::Hot] {
        for c in [1usize, 8, 64] {
            let per_task_base = baseline_claims.div_ceil(c);
            let kc_total = if c == 1 {
                baseline_claims
            } else {
                keyclaim_claims
            };
            let per_task_kc = kc_total.div_ceil(c);
            let tag = format!(
                "{}-{c}",
                if scenario == Scenario::Hot {
                    "hot"
                } else {
                    "distinct"
                }
            );
            let path = dir.path().join(format!("bench-{tag}.sqlite"));
            let base_path = dir.path().join(format!("baseline-{tag}.sqlite"));
            let (mut base_runs, mut kc_runs) = (Vec::new(), Vec::new());
            rt.block_on(async {
                let store = Arc::new(SqliteStore::open_with(&path, options()).await.unwrap());
                // synchronous = FULL, as the store's options.
                let baseline = SqliteBaseline::open(&base_path, true).await.unwrap();
                // Enough keys for the warm-up and every round of both claimers.
                let warm_per_task = warmup.div_ceil(c);
                let per_device = rounds * (per_task_base + per_task_kc) + 2 * warm_per_task;
                let devices = if scenario == Scenario::Hot { 1 } else { c };
                let per_device = if scenario == Scenario::Hot {
                    per_device * c
                } else {
                    per_device
                };
                for d in 0..devices {
                    populate(&store, &baseline, &scenario.device_of(d), per_device).await;
                }
                // Warm-up, not measured: caches, and the WAL grown to its
                // steady-state size (it is reused, never shrunk, afterwards),
                // so that no measured commit pays for growing the file.
                for claimer in [Claimer::Baseline, Claimer::Keyclaim] {
                    run(claimer, scenario, c, warm_per_task, &store, &baseline).await;
                }
                for round in 0..rounds {
                    let order = if round % 2 == 0 {
                        [Claimer::Baseline, Claimer::Keyclaim]
                    } else {
                        [Claimer::Keyclaim, Claimer::Baseline]
                    };
                    for claimer in order {
                        let per_task = match claimer {
                            Claimer::Baseline => per_task_base,
                            Claimer::Keyclaim => per_task_kc,
                        };
                        let r = run(claimer, scenario, c, per_task, &store, &baseline).await;
                        match claimer {
                            Claimer::Baseline => base_runs.push(r),
                            Claimer::Keyclaim => kc_runs.push(r),
                        }
                    }
                }
            });
            let stat = |runs: &[Run], f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
            let (b_rate, k_rate) = (
                stat(&base_runs, |r| r.claims_per_sec),
                stat(&kc_runs, |r| r.claims_per_sec),
            );
            let (b_p50, k_p50) = (
                stat(&base_runs, |r| r.p50.as_secs_f64()),
                stat(&kc_runs, |r| r.p50.as_secs_f64()),
            );
            let (b_p99, k_p99) = (
                stat(&base_runs, |r| r.p99.as_secs_f64()),
                stat(&kc_runs, |r| r.p99.as_secs_f64()),
            );
            println!(
                "{:<17} {:>3} | {:>14.0} {:>10} {:>10} | {:>14.0} {:>10} {:>10} | {:>6.1}x {:>8.2}x",
                scenario.name(),
                c,
                b_rate,
                ms(b_p50),
                ms(b_p99),
                k_rate,
                ms(k_p50),
                ms(k_p99),
                // Per round, both claimers ran back to back; the median of
                // the per-round ratios is steadier on a shared machine than
                // the ratio of medians.
                median(
                    kc_runs
                        .iter()
                        .zip(&base_runs)
                        .map(|(k, b)| k.claims_per_sec / b.claims_per_sec)
                        .collect()
                ),
                median(
                    kc_runs
                        .iter()
                        .zip(&base_runs)
                        .map(|(k, b)| k.p50.as_secs_f64() / b.p50.as_secs_f64())
                        .collect()
                ),
            );
        }
    }
    println!("load average after: {}", load_average());
    println!(
        "ratio = keyclaim claims/s / baseline claims/s, p50 ratio = keyclaim p50 / baseline p50 \
         (lower is better); both the median over rounds of the ratio within each round"
    );
}
