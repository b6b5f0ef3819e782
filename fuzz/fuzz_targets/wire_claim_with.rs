//! A selector byte (options) and a `POST /keys/claim` body; see
//! `keyclaim_reliability::wire_more` for what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(violation) = keyclaim_reliability::wire_more::check_claim_with(data) {
        panic!("{violation}");
    }
});
