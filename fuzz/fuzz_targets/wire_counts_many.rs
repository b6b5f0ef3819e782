//! Arbitrary bytes as a bulk counts body; see
//! `keyclaim_reliability::wire_more` for what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(violation) = keyclaim_reliability::wire_more::check_counts_many(data) {
        panic!("{violation}");
    }
});
