//! Arbitrary bytes as a `POST /keys/reset` body; see
//! `keyclaim_reliability::wire_more` for what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(violation) = keyclaim_reliability::wire_more::check_reset(data) {
        panic!("{violation}");
    }
});
