//! Helpers for the tests that run child processes: the test binary runs
//! itself again as a child (see `keyclaim_testing::process`).

#![allow(dead_code, unreachable_pub)]

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::thread::JoinHandle;

use keyclaim::{Device, KeyId, KeyJson};

/// Every result line a child reports starts with this marker, so that lines
/// of the test harness (and a harness prefix on the same line) are ignored.
pub const MARK: &str = "@@kc ";

/// Starts the test binary again as a child with `role`, running only the
/// test `test` (which acts the role out), with the given environment; its
/// stdout is piped.
pub fn spawn_child(test: &str, role: &str, env: &[(&str, String)]) -> Child {
    let mut cmd = keyclaim_testing::process::child_command(test, role);
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("start a child process")
}

/// How many times a crash test kills its child: `KEYCLAIM_CRASH_ITERATIONS`,
/// 25 unless set.
pub fn crash_iterations() -> usize {
    std::env::var("KEYCLAIM_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25)
}

/// Starts the child `role` of the test `test` (see [`spawn_child`]),
/// SIGKILLs it at a random moment, mostly mid-work, and for every fifth
/// `run` early, while it may still be opening the file; answers its whole
/// stdout.
pub fn kill_at_random_moment(test: &str, role: &str, env: &[(&str, String)], run: usize) -> String {
    use rand::Rng as _;
    let mut child = spawn_child(test, role, env);
    let out = collect_stdout(&mut child);
    let wait_ms = if run.is_multiple_of(5) {
        rand::rng().random_range(0..40)
    } else {
        rand::rng().random_range(40..400)
    };
    std::thread::sleep(std::time::Duration::from_millis(wait_ms));
    child.kill().expect("SIGKILL the child");
    let status = child.wait().expect("reap the child");
    assert!(!status.success(), "the child was killed, not finished");
    out.join().expect("the child's stdout")
}

/// Reads a child's whole stdout on a thread (so the pipe never fills).
pub fn collect_stdout(child: &mut Child) -> JoinHandle<String> {
    let mut out = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = out.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// The complete result lines (those that end in a newline) of a child's
/// output, without the marker, split into words.
pub fn result_lines(output: &str) -> Vec<Vec<String>> {
    let complete = match output.rfind('\n') {
        Some(i) => &output[..=i],
        None => "",
    };
    complete
        .lines()
        .filter_map(|line| line.find(MARK).map(|i| &line[i + MARK.len()..]))
        .map(|rest| rest.split(' ').map(str::to_owned).collect())
        .collect()
}

/// Writes one result line (marker first) and flushes it, under a lock so
/// that lines of concurrent tasks never interleave.
pub fn report(out: &Mutex<()>, words: &[&str]) {
    let _guard = out
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut stdout = std::io::stdout().lock();
    let line = format!("\n{MARK}{}\n", words.join(" "));
    stdout.write_all(line.as_bytes()).expect("write to stdout");
    stdout.flush().expect("flush stdout");
}

/// The devices the child processes share.
pub fn device(i: usize) -> Device {
    Device::parse(&format!("@user{}:example.org", i % 2), &format!("DEV{i}")).expect("device")
}

/// A signed-looking key JSON whose content is derived from its ID.
pub fn key(id: &str) -> (KeyId, KeyJson) {
    let json = serde_json::json!({
        "key": format!("material-of-{id}"),
        "signatures": {"@user:example.org": {"ed25519:DEV": "sig"}},
    });
    (
        KeyId::parse(format!("signed_curve25519:{id}")).expect("key ID"),
        KeyJson::from_value(&json).expect("key JSON"),
    )
}

/// Whether the file at `path` passes SQLite's `PRAGMA integrity_check`.
pub fn integrity_ok(path: &Path) -> bool {
    let conn = rusqlite::Connection::open(path).expect("open for integrity_check");
    let verdict: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    verdict == "ok"
}
