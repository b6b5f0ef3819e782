//! Arbitrary bytes as a `POST /keys/upload` body; see
//! `keyclaim_reliability::wire` for what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(violation) = keyclaim_reliability::wire::check_upload(data) {
        panic!("{violation}");
    }
});
