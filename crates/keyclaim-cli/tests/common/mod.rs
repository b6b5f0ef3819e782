//! What the command-line tests share: running the built `keyclaim` binary.

#![allow(dead_code)]

use std::process::{Command, Output};

/// The built `keyclaim` with `args`, not yet run. It does not see
/// `KEYCLAIM_POSTGRES_URL`: a bench with PostgreSQL starts its own server
/// unless a test gives it one.
pub(crate) fn keyclaim_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyclaim"));
    cmd.args(args).env_remove("KEYCLAIM_POSTGRES_URL");
    cmd
}

/// Runs the built `keyclaim` with `args` and collects its output.
pub(crate) fn keyclaim(args: &[&str]) -> Output {
    keyclaim_command(args).output().expect("run keyclaim")
}
