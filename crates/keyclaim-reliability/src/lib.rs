//! keyclaim's reliability tools, as a library so that the fuzz
//! targets in `fuzz/`, this crate's tests and its binaries share one
//! implementation:
//!
//! - [`wire`]: the logic of the `wire_upload` and `wire_claim` fuzz targets
//!   (arbitrary bytes into [`keyclaim::KeysApi`] over a pre-populated memory
//!   store, with oracles for both the success and the error paths);
//! - [`wire_more`]: the logic of the `wire_claim_with`, `wire_reset`,
//!   `wire_replace_dehydrated` and `wire_counts_many` fuzz targets (the same
//!   store, with the reference model as the oracle on success);
//! - [`differential`]: the logic of the `differential` fuzz target (one
//!   operation sequence against every backend and the reference model);
//! - [`bounds`]: hostile requests that contract section 8's limits refuse, with
//!   their peak memory measured (the `bounds` binary);
//! - [`hostile`]: hostile bodies for the claims with options, key resets,
//!   dehydrated device replacements and bulk counts, each with the answer it
//!   must get (checked by this crate's tests, measured by `bounds`);
//! - [`faults`]: persistent backends over storage that fails (a full disk,
//!   `EIO` on write or sync through the [`eio`] shim, a failing engine batch
//!   of the key-value layer in [`kv_fault`]);
//! - [`soak`]: a long mixed workload with SIGKILLs and invariant checks
//!   (the `soak` binary);
//! - [`corpus`]: the checked-in seed corpora under `fuzz/seeds/`, which this
//!   crate's tests run through the same checks, so that CI exercises the fuzz
//!   targets' logic without a fuzzer.
//!
//! Every check returns a [`Violation`] instead of panicking; the fuzz targets
//! turn it into a panic (a crash for libFuzzer), the tests into a failure.

pub mod backends;
pub mod bounds;
pub mod corpus;
pub mod differential;
pub mod eio;
pub mod faults;
pub mod hostile;
pub mod kv_fault;
pub mod soak;
mod util;
pub mod wire;
pub mod wire_more;
pub mod workload;

pub use util::{Violation, block_on, chain, snapshot_all};
