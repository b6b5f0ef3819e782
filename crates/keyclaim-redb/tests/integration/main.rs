//! The redb backend's tests, in one binary (to keep build times down):
//! the conformance suite, opening rules, batch-mate isolation and the
//! SIGKILL crash test.

mod batch;
mod conformance;
mod crash;
mod open;
