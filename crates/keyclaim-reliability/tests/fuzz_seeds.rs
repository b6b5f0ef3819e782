//! The fuzz targets' logic over their checked-in seed corpora
//! (`fuzz/seeds/<target>/`), so that `cargo test` (and CI) runs every check a
//! fuzz target runs, on every seed, without a fuzzer.
// A test: a failed expectation is how it reports.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use keyclaim_reliability::{Violation, corpus, wire, wire_more};

fn run_seeds(target: &str, check: impl Fn(&[u8]) -> Result<(), Violation>) {
    let seeds = corpus::seeds(target).expect("read the seed corpus");
    assert!(!seeds.is_empty(), "no seeds for {target}");
    let failures: Vec<String> = seeds
        .iter()
        .filter_map(|(name, bytes)| check(bytes).err().map(|v| format!("{target}/{name}: {v}")))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn wire_upload_seeds() {
    run_seeds("wire_upload", wire::check_upload);
}

#[test]
fn wire_claim_seeds() {
    run_seeds("wire_claim", wire::check_claim);
}

#[test]
fn wire_claim_with_seeds() {
    run_seeds("wire_claim_with", wire_more::check_claim_with);
}

#[test]
fn wire_reset_seeds() {
    run_seeds("wire_reset", wire_more::check_reset);
}

#[test]
fn wire_replace_dehydrated_seeds() {
    run_seeds(
        "wire_replace_dehydrated",
        wire_more::check_replace_dehydrated,
    );
}

#[test]
fn wire_counts_many_seeds() {
    run_seeds("wire_counts_many", wire_more::check_counts_many);
}

#[test]
fn differential_seeds_memory() {
    run_seeds(
        "differential",
        keyclaim_reliability::differential::check_memory_only,
    );
}

#[test]
fn differential_seeds_all_backends() {
    run_seeds("differential", keyclaim_reliability::differential::check);
}

/// The differential check is not vacuous: a memory store configured with a
/// different claim clamp (2 instead of 3) is caught on some seed.
#[test]
fn differential_notices_a_store_that_differs() {
    use keyclaim_reliability::differential::{MemorySubject, Subject, decode, limits, run};
    let seeds = corpus::seeds("differential").expect("read the seed corpus");
    let caught = seeds.iter().any(|(_, bytes)| {
        let ops = decode(bytes);
        let mut off = limits();
        off.max_claim_count = 2;
        keyclaim_reliability::block_on(async {
            let mut subjects: Vec<Box<dyn Subject>> = vec![
                Box::new(MemorySubject::new(limits())),
                Box::new(MemorySubject::new(off)),
            ];
            run(&ops, &mut subjects).await
        })
        .expect("runtime")
        .is_err()
    });
    assert!(caught, "no seed told the two stores apart");
}

/// The fuzz targets' store, copied from a template built once, is the store
/// that the uploads and claims of `build_populated_store` make: the same
/// state, and the same answers to what a fuzz input does next (a claim of
/// every device and algorithm until nothing is left, and a new upload, which
/// must sort after the copied keys as after uploaded ones, R3.5).
#[test]
fn the_copied_populated_store_is_the_built_one() {
    use keyclaim::{Algorithm, ClaimTarget, KeyStore as _, KeysApi};
    use keyclaim_reliability::{block_on, snapshot_all};

    block_on(async {
        let built = wire::build_populated_store().await.unwrap();
        // Twice: the template is built by the first call in this process.
        for _ in 0..2 {
            let copied = wire::populated_store().await.unwrap();
            let state = snapshot_all(&*copied).await.unwrap();
            assert_eq!(state, snapshot_all(&*built).await.unwrap());
            assert!(!state.is_empty());
        }
        let (built, copied) = (
            wire::build_populated_store().await.unwrap(),
            wire::populated_store().await.unwrap(),
        );
        let body =
            br#"{"one_time_keys": {"signed_curve25519:NEW1": {"key": "n1", "signatures": {}}}}"#;
        let (a, b) = (KeysApi::new(built.clone()), KeysApi::new(copied.clone()));
        let (ua, ub) = (
            a.upload(wire::UPLOAD_USER, wire::UPLOAD_DEVICE, body)
                .await
                .unwrap(),
            b.upload(wire::UPLOAD_USER, wire::UPLOAD_DEVICE, body)
                .await
                .unwrap(),
        );
        assert_eq!(ua, ub);
        let state = snapshot_all(&*built).await.unwrap();
        let mut claims = 0;
        for snapshot in &state {
            let algorithms: std::collections::BTreeSet<Algorithm> = snapshot
                .one_time_keys
                .iter()
                .map(|k| k.key_id.algorithm())
                .chain(snapshot.fallback_keys.keys().cloned())
                .collect();
            for algorithm in algorithms {
                let target = [ClaimTarget::one(snapshot.device.clone(), algorithm)];
                for _ in 0..8 {
                    let (x, y) = (
                        built.claim(&target).await.unwrap(),
                        copied.claim(&target).await.unwrap(),
                    );
                    assert_eq!(format!("{x:?}"), format!("{y:?}"));
                    claims += 1;
                }
            }
        }
        assert!(claims >= 40, "{claims} claims");
        assert_eq!(
            snapshot_all(&*built).await.unwrap(),
            snapshot_all(&*copied).await.unwrap()
        );
    })
    .unwrap();
}
