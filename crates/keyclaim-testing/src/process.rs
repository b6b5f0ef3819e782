//! Child roles: a test runs its own test binary again as a child process.
//!
//! The parent test builds the child's command with [`child_command`]: the
//! same binary, running only the named test, with [`ROLE_VAR`] set to the
//! role and the parent's process ID. The test begins with [`is_child`] (one
//! role) or [`child_role`] (several):
//! in the child it returns the role and the test acts it out; in every
//! other run it returns `None` and the test is the parent, which spawns its
//! children and asserts. No test exists that passes merely because a role
//! variable is absent.

use std::process::{Command, Stdio};

/// The environment variable that gives a re-executed test binary its role:
/// `ROLE@PID`, where PID is the process that started it.
pub const ROLE_VAR: &str = "KEYCLAIM_TEST_CHILD_ROLE";

/// A command that runs this test binary again as a child with `role`,
/// running only the test named `test` (its full path in the binary, e.g.
/// `crash::sigkill_at_random_moments`), with the harness's output capture
/// off and stdin closed. Add the role's own environment and stdio to it.
///
/// # Panics
/// When this binary's path cannot be found.
pub fn child_command(test: &str, role: &str) -> Command {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(ROLE_VAR, format!("{role}@{}", std::process::id()))
        .stdin(Stdio::null());
    cmd
}

/// Whether this process is the child [`child_command`] started with `role`
/// (the test then acts the role out and returns).
///
/// # Panics
/// As [`child_role`], and when the role is another one.
pub fn is_child(role: &str) -> bool {
    match child_role() {
        None => false,
        Some(found) if found == role => true,
        Some(found) => panic!("started with the child role {found:?}, expected {role:?}"),
    }
}

/// The role this process was started with by [`child_command`], or `None`
/// in a normal test run.
///
/// # Panics
/// When [`ROLE_VAR`] is set but not by this process's parent (a variable
/// left in the environment must not turn a parent test into a child).
pub fn child_role() -> Option<String> {
    let value = std::env::var(ROLE_VAR).ok()?;
    let parent = std::os::unix::process::parent_id();
    match value.rsplit_once('@') {
        Some((role, pid)) if pid.parse() == Ok(parent) => Some(role.to_owned()),
        _ => panic!(
            "{ROLE_VAR}={value:?} was not set by this process's parent (PID {parent}): \
             a child role runs only under the test that spawns it; unset {ROLE_VAR}"
        ),
    }
}
