//! An `arbitrary` sequence of operations applied to memory, SQLite, redb and
//! the reference model at once; see `keyclaim_reliability::differential`.
//! `cargo fuzz fmt differential <input>` prints the decoded operations.
#![no_main]

use keyclaim_reliability::differential::{Ops, check_ops};

libfuzzer_sys::fuzz_target!(|ops: Ops| {
    if let Err(violation) = check_ops(&ops) {
        panic!("{violation}");
    }
});
