//! What the wire facade adds to a large claim: `KeysApi::claim` against the
//! store's own `claim` for the same 1,000 devices (one key each) of a memory
//! store, and the facade's two halves apart: reading the body (a claim
//! naming 1,000 devices that hold no keys) and writing the answer
//! (`ClaimOutcome::to_wire`).
//!
//! `cargo bench -p keyclaim-benches --bench facade`

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use keyclaim::{Algorithm, ClaimTarget, KeyStore, KeysApi};
use keyclaim_benches::{device, upload};
use keyclaim_memory::MemoryStore;
use serde_json::{Map, Value, json};

/// Devices of one claim.
const CLAIMED: usize = 1_000;
/// Rounds of distinct devices, so that a claim's devices hold one key each.
const ROUNDS: usize = 8;

/// The `POST /keys/claim` body naming devices `from .. from + CLAIMED`.
fn body(from: usize) -> Vec<u8> {
    let mut users = Map::new();
    for i in from..from + CLAIMED {
        let d = device(i).unwrap();
        users.insert(
            d.user_id.as_str().to_owned(),
            json!({ d.device_id.as_str(): "signed_curve25519" }),
        );
    }
    serde_json::to_vec(&json!({ "one_time_keys": Value::Object(users) })).unwrap()
}

fn targets(from: usize) -> Vec<ClaimTarget> {
    let alg = Algorithm::signed_curve25519();
    (from..from + CLAIMED)
        .map(|i| ClaimTarget::one(device(i).unwrap(), alg.clone()))
        .collect()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let store = Arc::new(MemoryStore::new());
    let api = KeysApi::new(store.clone());
    // One key per device of the round about to be claimed, uploaded in the
    // untimed set-up of each iteration.
    let refill = |round: usize| {
        let from = (round % ROUNDS) * CLAIMED;
        rt.block_on(async {
            for i in from..from + CLAIMED {
                let d = device(i).unwrap();
                let u = upload(&d, &format!("R{round}_"), 1, false).unwrap();
                store.upload(&u).await.unwrap();
            }
        });
        from
    };
    let bodies: Vec<Vec<u8>> = (0..ROUNDS).map(|r| body(r * CLAIMED)).collect();
    let lists: Vec<Vec<ClaimTarget>> = (0..ROUNDS).map(|r| targets(r * CLAIMED)).collect();
    let round = AtomicUsize::new(0);
    let mut group = c.benchmark_group("facade");
    group.bench_function("claim_1000_store", |b| {
        b.iter_batched(
            || refill(round.fetch_add(1, Ordering::Relaxed)),
            |from| {
                let got = rt.block_on(store.claim(&lists[from / CLAIMED])).unwrap();
                assert_eq!(got.keys.len(), CLAIMED);
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("claim_1000_facade", |b| {
        b.iter_batched(
            || refill(round.fetch_add(1, Ordering::Relaxed)),
            |from| {
                let got = rt.block_on(api.claim(&bodies[from / CLAIMED])).unwrap();
                assert_eq!(got["one_time_keys"].as_object().unwrap().len(), CLAIMED);
            },
            BatchSize::PerIteration,
        )
    });
    // Devices that never held a key: the store finds nothing, so this is
    // the reading of the body and an empty answer.
    let unknown = body(ROUNDS * CLAIMED);
    group.bench_function("claim_1000_body_only", |b| {
        b.iter(|| {
            let got = rt.block_on(api.claim(&unknown)).unwrap();
            assert!(got["one_time_keys"].as_object().unwrap().is_empty());
        })
    });
    let outcome = {
        let from = refill(round.fetch_add(1, Ordering::Relaxed));
        rt.block_on(store.claim(&lists[from / CLAIMED])).unwrap()
    };
    assert_eq!(outcome.keys.len(), CLAIMED);
    group.bench_function("claim_1000_answer_only", |b| b.iter(|| outcome.to_wire()));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
