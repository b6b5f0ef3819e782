//! A selector byte (devices, option) and a `PUT /dehydrated_device` body; see
//! `keyclaim_reliability::wire_more` for what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(violation) = keyclaim_reliability::wire_more::check_replace_dehydrated(data) {
        panic!("{violation}");
    }
});
