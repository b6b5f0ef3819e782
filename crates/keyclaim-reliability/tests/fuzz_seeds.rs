//! The fuzz targets' logic over their checked-in seed corpora
//! (`fuzz/seeds/<target>/`), so that `cargo test` (and CI) runs every check a
//! fuzz target runs, on every seed, without a fuzzer.
// A test: a failed expectation is how it reports.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use keyclaim_reliability::{Violation, corpus, wire};

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
