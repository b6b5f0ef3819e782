//! End-to-end checks of keyclaim against real Olm (vodozemac).
//!
//! The conformance suite checks keyclaim against our reading of the spec; this
//! crate checks it against the cryptography the keys are for. A
//! [`client::OlmDevice`] is a vodozemac `Account` that generates, signs and
//! uploads its keys the way Matrix clients do, and a claimer verifies the
//! signature over what keyclaim hands back, opens an Olm session with it and
//! sends a message the owner must be able to decrypt. A key served twice, a
//! key altered in storage, or a lost fallback key shows up as a failed
//! signature check or a failed decryption.
//!
//! [`backends`] lists the stores the scenarios in `tests/` run against.

pub mod backends;
pub mod client;

pub use backends::TestBackend;
