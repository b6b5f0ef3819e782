//! What the command-line tests share: running the built `keyclaim` binary.

use std::process::{Command, Output};

/// Runs the built `keyclaim` with `args` and collects its output.
pub(crate) fn keyclaim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keyclaim"))
        .args(args)
        .output()
        .expect("run keyclaim")
}
