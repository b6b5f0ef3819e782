//! What parsing a hostile body costs, in bytes allocated: a counting global
//! allocator records the peak of live heap bytes while the facade serves
//! each hostile body of `keyclaim_reliability::hostile` over an empty memory
//! store, and the peak's growth must stay within 4 times the body's size
//! (contract section 8: the facade parses straight into what it keeps, not
//! into a JSON tree, which costs up to about 90 times a body of small
//! objects). Bytes, not time: the figure is the same on every run.
//!
//! One test in its own binary: the allocator's peak is the process's.
// A test: a failed expectation is how it reports.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;

use keyclaim_memory::MemoryStore;
use keyclaim_reliability::{block_on, hostile};
use peak_alloc::PeakAlloc;

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

/// Cases served that name many devices in few bytes each, within the
/// limits of R8.2: what the facade keeps of them is the store call's input,
/// one `ClaimTarget` or `Device` per name (about 80 bytes and the heap of its
/// IDs, against 8 to 20 bytes of body), and they count the store's work and
/// the answer too (a `DeviceSnapshot` and a JSON answer per device). That is
/// bounded by the limits, not by the body, and is no tree: a body of the
/// same shape whose names ask for nothing
/// (`claim_users_without_devices_1mib`,
/// `counts_many_users_without_devices_1mib`) is held to the bound, and so
/// is every body refused, however many devices it names before its fault
/// (it is checked through before anything is built).
const KEEPS_WHAT_IT_NAMES: &[&str] = &["claim_with_targets_in_1mib", "counts_many_10000_devices"];

#[test]
fn hostile_bodies_cost_at_most_four_times_their_size() {
    let mut failures = Vec::new();
    let mut lines = Vec::new();
    for case in hostile::CASES {
        let body = (case.body)();
        let store = Arc::new(MemoryStore::new());
        let api = hostile::api(case, Arc::clone(&store));
        let before = ALLOC.current_usage();
        ALLOC.reset_peak_usage();
        let answer = block_on(hostile::serve(&api, case.endpoint, &body)).unwrap();
        let growth = ALLOC.peak_usage().saturating_sub(before);
        let outcome = match &answer {
            Ok(_) => "served".to_owned(),
            Err(e) => e.errcode().to_owned(),
        };
        drop(answer);
        let ratio = growth as f64 / body.len() as f64;
        lines.push(format!(
            "{:<48} {:>9} bytes {:>10} peak {:>6.2}x {outcome}",
            case.name,
            body.len(),
            growth,
            ratio
        ));
        if growth > 4 * body.len().max(4096) && !KEEPS_WHAT_IT_NAMES.contains(&case.name) {
            failures.push(format!(
                "{}: {growth} bytes at peak for a body of {} bytes ({ratio:.1}x)",
                case.name,
                body.len()
            ));
        }
    }
    eprintln!("{}", lines.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
