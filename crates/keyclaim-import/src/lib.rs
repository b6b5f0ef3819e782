#![doc = include_str!("../README.md")]

mod blocking;
pub mod conduwuit;
mod merge;
mod run;
pub mod synapse;

pub use run::{ImportOptions, ImportReport, Progress};
