//! Arbitrary bytes as a `POST /keys/claim` body; see
//! `keyclaim_reliability::wire` for what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(violation) = keyclaim_reliability::wire::check_claim(data) {
        panic!("{violation}");
    }
});
