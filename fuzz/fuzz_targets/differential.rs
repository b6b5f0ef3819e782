//! An `arbitrary` sequence of operations applied to every backend and the
//! reference model at once; see `keyclaim_reliability::differential`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(violation) = keyclaim_reliability::differential::check(data) {
        panic!("{violation}");
    }
});
