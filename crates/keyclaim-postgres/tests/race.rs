//! Many connections in two pools (two workers) claim one hot device at
//! once: no key is handed out twice and nobody comes away short while keys
//! remain (R4.2, R4.3 across connections).

// Tests report failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::Arc;

use keyclaim::{ClaimTarget, ClaimedKey, Device, KeyStore, Limits};
use keyclaim_conformance::fixtures::{alg, dev, numbered_otks, otks, put};
use keyclaim_postgres::{PostgresOptions, PostgresStore};
use keyclaim_testing::postgres::{unique_schema, with_server};
use tokio::sync::Barrier;

const SC: &str = "signed_curve25519";
/// Concurrent claimers, spread over both workers.
const CLAIMERS: usize = 64;
/// Connections per worker's pool: 2 x 32 = all 64 claimers at once.
const POOL: usize = 32;

/// Two independent stores (own pools, own listeners) on one fresh schema.
async fn two_workers(url: &str) -> (Arc<PostgresStore>, Arc<PostgresStore>) {
    let mut limits = Limits::default();
    limits.max_otks_per_device_algorithm = 10_000;
    let options = PostgresOptions::new()
        .schema(unique_schema("kc_race"))
        .pool_size(POOL)
        .limits(limits);
    let one = PostgresStore::connect_with(url, options.clone())
        .await
        .expect("worker 1");
    let two = PostgresStore::connect_with(url, options)
        .await
        .expect("worker 2");
    (Arc::new(one), Arc::new(two))
}

/// Fills `device` with `n` OTKs over several uploads (several sequence
/// values) and a fallback key.
async fn fill(store: &PostgresStore, device: &Device, round: usize, n: usize) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for chunk in 0..n.div_ceil(100) {
        let keys = numbered_otks(SC, &format!("R{round}C{chunk}-"), 100.min(n - chunk * 100));
        all.extend(keys.iter().map(|(id, _)| id.to_string()));
        put(store, device, keys, otks(SC, &["FB"])).await;
    }
    all
}

/// Runs `per_claimer[i]` claims on claimer `i`, all claimers released at
/// once; returns every claim's answer (with the count it asked for).
async fn claim_storm(
    workers: (&Arc<PostgresStore>, &Arc<PostgresStore>),
    per_claimer: Vec<Vec<Vec<ClaimTarget>>>,
) -> Vec<(Vec<ClaimTarget>, Vec<ClaimedKey>)> {
    let barrier = Arc::new(Barrier::new(per_claimer.len()));
    let mut tasks = Vec::new();
    for (i, claims) in per_claimer.into_iter().enumerate() {
        let store = if i % 2 == 0 {
            workers.0.clone()
        } else {
            workers.1.clone()
        };
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut out = Vec::new();
            for targets in claims {
                let got = store.claim(&targets).await.expect("claim succeeds");
                out.push((targets, got.keys));
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("claimer task"));
    }
    all
}

/// Checks that the hot device's OTKs went out exactly once each, every
/// claim got exactly what it asked of the hot device, and none got its
/// fallback key.
fn check_exact(
    hot: &Device,
    stored: &BTreeSet<String>,
    answers: &[(Vec<ClaimTarget>, Vec<ClaimedKey>)],
) {
    let mut issued = BTreeSet::new();
    let mut short = 0;
    for (targets, keys) in answers {
        let asked: u32 = targets
            .iter()
            .filter(|t| &t.device == hot)
            .map(|t| t.count)
            .sum();
        let got: Vec<&ClaimedKey> = keys.iter().filter(|k| &k.device == hot).collect();
        assert!(
            got.iter().all(|k| !k.fallback),
            "a claim got the fallback key while OTKs remained (under-issue)"
        );
        if got.len() != asked as usize {
            short += 1;
        }
        for k in got {
            assert!(
                issued.insert(k.key_id.to_string()),
                "{} handed out twice",
                k.key_id
            );
        }
    }
    assert_eq!(short, 0, "claims came away short while keys remained");
    assert_eq!(&issued, stored, "every key issued exactly once");
}

#[test]
fn hot_device_claims_across_two_pools() {
    with_server(
        "race::hot_device_claims_across_two_pools",
        |url| async move {
            let (one, two) = two_workers(&url).await;
            let hot = dev("@hot:example.org", "HOT");
            for round in 0..3 {
                // Exactly as many single-key claims as keys.
                let n = CLAIMERS * 10;
                let stored = fill(&one, &hot, round, n).await;
                let plan = (0..CLAIMERS)
                    .map(|_| {
                        (0..10)
                            .map(|_| vec![ClaimTarget::one(hot.clone(), alg(SC))])
                            .collect()
                    })
                    .collect();
                let answers = claim_storm((&one, &two), plan).await;
                check_exact(&hot, &stored, &answers);
                // Now empty: the next claim gets the fallback key.
                let after = two
                    .claim(&[ClaimTarget::one(hot.clone(), alg(SC))])
                    .await
                    .expect("claim");
                assert!(after.keys.len() == 1 && after.keys[0].fallback);
                assert_eq!(one.otk_counts(&hot).await.expect("counts").get_str(SC), 0);
            }
        },
    );
}

#[test]
fn hot_device_claims_with_counts_and_other_targets() {
    with_server(
        "race::hot_device_claims_with_counts_and_other_targets",
        |url| async move {
            let (one, two) = two_workers(&url).await;
            let hot = dev("@hot:example.org", "HOT");
            // Counts 1..=5 that add up to exactly the stored number, each claim
            // also naming a cold device of its own.
            let mut plan: Vec<Vec<Vec<ClaimTarget>>> = vec![Vec::new(); CLAIMERS];
            let mut total = 0usize;
            for i in 0..CLAIMERS * 6 {
                let count = (i % 5) as u32 + 1;
                total += count as usize;
                let cold = dev(&format!("@cold{i}:example.org"), "COLD");
                plan[i % CLAIMERS].push(vec![
                    ClaimTarget::one(cold, alg(SC)),
                    ClaimTarget {
                        device: hot.clone(),
                        algorithm: alg(SC),
                        count,
                    },
                ]);
            }
            let stored = fill(&one, &hot, 0, total).await;
            let answers = claim_storm((&one, &two), plan).await;
            check_exact(&hot, &stored, &answers);
        },
    );
}
