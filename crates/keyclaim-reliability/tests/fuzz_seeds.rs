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
