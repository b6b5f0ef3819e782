//! keyclaim over any ordered key-value engine.

pub mod engine;
pub mod engine_suite;
mod memory;

pub use engine::{BatchOp, EngineError, EngineResult, KvEngine, Space, WriteBatch};
pub use memory::MemoryEngine;

/// The newest layout format this build reads and writes.
pub const FORMAT_VERSION: u64 = 1;

#[cfg(test)]
mod engine_contract {
    crate::engine_tests!(crate::MemoryEngine::new());
}
