//! SIGKILL crash tests (R10.1, R10.2).
//!
//! Each test re-executes its own binary as a child process (a child role of
//! `keyclaim_testing::process`: the same test, which acts as the child when
//! started with the role and as the parent in every other run). The child
//! opens the store and works on it until killed, printing one line per
//! step: an intent line before each operation and an acknowledgement line
//! after it returned. The parent SIGKILLs the child at a random moment,
//! opens the file, and checks it against what the child reported.
//!
//! - [`claims`]: uploads and claims (R3.1, R4.2);
//! - [`replace`]: dehydrated-device replacement (R14.1) among claims;
//! - [`relaxed`]: relaxed durability keeps its promise to flush (one kill
//!   at a chosen moment, not a random one).
//!
//! 20 kills per test in a normal run; set `KEYCLAIM_CRASH_ITERATIONS` for
//! more.

mod claims;
mod relaxed;
mod replace;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use keyclaim_redb::RedbStore;
use tokio::runtime::Runtime;

use crate::rt;

const ITERATIONS_ENV: &str = "KEYCLAIM_CRASH_ITERATIONS";
/// The child's store file.
const PATH_ENV: &str = "KEYCLAIM_CRASH_PATH";
/// The child's iteration (its key names and random choices depend on it).
const ITER_ENV: &str = "KEYCLAIM_CRASH_ITER";

/// splitmix64: enough randomness for timings and operation mixes.
struct Rng(u64);

impl Rng {
    /// A generator seeded from the clock.
    fn from_clock() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        eprintln!("crash test seed {seed}");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// How many kills a test runs: `KEYCLAIM_CRASH_ITERATIONS`, else 20.
fn iterations() -> u64 {
    std::env::var(ITERATIONS_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

/// Prints one report line of the child.
fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    // A closed pipe means the parent is gone: stop.
    writeln!(out, "{line}").expect("parent gone");
    out.flush().expect("parent gone");
}

/// A child started by [`spawn_child`].
struct Reporting {
    child: Child,
    /// Receives once the child printed `@@ ready`.
    ready: mpsc::Receiver<()>,
    /// Answers the report lines (`@@ ...`) the child printed whole, once
    /// its output ends.
    lines: JoinHandle<Vec<String>>,
}

impl Reporting {
    /// Waits until the child printed `@@ ready`.
    fn wait_ready(&self) {
        self.ready
            .recv_timeout(Duration::from_secs(30))
            .expect("child did not open the store");
    }

    /// SIGKILLs the child; answers its report lines.
    fn kill(mut self) -> Vec<String> {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.lines.join().unwrap()
    }
}

/// Runs the test `test` as a child with `role` on the store file `path`,
/// collecting its report lines.
fn spawn_child(test: &str, role: &str, path: &Path, iter: u64) -> Reporting {
    let mut child = keyclaim_testing::process::child_command(test, role)
        .env(PATH_ENV, path)
        .env(ITER_ENV, iter.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (ready_tx, ready) = mpsc::channel();
    let lines = std::thread::spawn(move || {
        let mut out = BufReader::new(stdout);
        let mut lines = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            match out.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            // A line cut by the kill has no newline and was never
            // acknowledged as whole: drop it.
            if !line.ends_with('\n') {
                break;
            }
            // libtest may print "test crash::... " before the first line of
            // the child's own output.
            let Some(at) = line.find("@@ ") else {
                continue;
            };
            let report = line[at..].trim_end();
            if report == "@@ ready" {
                let _ = ready_tx.send(());
            }
            lines.push(report.to_owned());
        }
        lines
    });
    Reporting {
        child,
        ready,
        lines,
    }
}

/// Runs the test `test` as a child with `role` on the store file `path`,
/// SIGKILLs it at a random moment (every fifth iteration early, during start-up, opening or
/// repair; otherwise 5 to 155 ms after it printed `@@ ready`), and returns
/// the report lines (`@@ ...`) it printed whole.
fn run_and_kill(test: &str, role: &str, path: &Path, iter: u64, rng: &mut Rng) -> Vec<String> {
    let child = spawn_child(test, role, path, iter);
    if iter % 5 == 4 {
        std::thread::sleep(Duration::from_millis(rng.below(40)));
    } else {
        child.wait_ready();
        std::thread::sleep(Duration::from_millis(5 + rng.below(150)));
    }
    child.kill()
}

/// The parent of a crash test: [`iterations`] times, runs the child with
/// `role` on one store file and SIGKILLs it ([`run_and_kill`]), opens the
/// file, and gives `check` the iteration, the child's report lines, the
/// store and a runtime to run its reads on; `check` answers how many
/// acknowledged operations it verified. Asserts that the children made
/// progress; answers the kills and the acknowledged operations.
fn kill_and_check(
    test: &str,
    role: &str,
    mut check: impl FnMut(u64, &[String], &RedbStore, &Runtime) -> usize,
) -> (u64, usize) {
    let iterations = iterations();
    let mut rng = Rng::from_clock();
    let dir = keyclaim_testing::temp_dir();
    let path = dir.path().join("crash.redb");
    let runtime = rt();
    let mut acks = 0;
    for iter in 0..iterations {
        let lines = run_and_kill(test, role, &path, iter, &mut rng);
        let store = runtime
            .block_on(RedbStore::open(&path))
            .unwrap_or_else(|e| panic!("iteration {iter}: open after SIGKILL failed: {e:?}"));
        acks += check(iter, &lines, &store, &runtime);
        runtime.block_on(store.close()).unwrap();
    }
    assert!(
        acks >= iterations as usize,
        "the child made too little progress to test anything"
    );
    (iterations, acks)
}

/// The child's store file and iteration, as [`run_and_kill`] gave them.
fn child_args() -> (String, u64) {
    let path = std::env::var(PATH_ENV).unwrap();
    let iter = std::env::var(ITER_ENV).unwrap().parse().unwrap();
    (path, iter)
}

/// Splits a comma-separated list of names (none when absent or empty).
fn split_names(s: Option<&str>) -> Vec<String> {
    s.unwrap_or("")
        .split(',')
        .filter(|x| !x.is_empty())
        .map(str::to_owned)
        .collect()
}
