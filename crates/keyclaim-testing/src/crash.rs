//! A SIGKILL crash test for any persistent store (R3.1, R4.2, R10.1,
//! R10.2), and the child-process helpers it is made of.
//!
//! A child process (the test binary run again under a child role, see
//! [`crate::process`]) uploads and claims in a loop ([`child_workload`]),
//! reporting every intent and every acknowledged result on stdout
//! ([`report`]); the parent SIGKILLs it at a random moment
//! ([`kill_at_random_moment`]), again and again, reads what it reported
//! into a [`Ledger`], and after each kill opens the store and checks it
//! ([`Ledger::check`]): no key reported as claimed is ever issued again or
//! forgotten, every acknowledged upload not claimed is still there, and an
//! unacknowledged upload is there whole or not at all.
//!
//! The store's opening is the test's own: a backend's crash test is the
//! child role (open, [`child_workload`]) and the parent's loop (kill,
//! absorb, open, check), with [`crash_limits`] on both sides.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use keyclaim::{Algorithm, ClaimTarget, Device, KeyId, KeyJson, KeyStore, Limits, Upload};
use rand::Rng as _;

/// Every result line a child reports starts with this marker, so that lines
/// of the test harness (and a harness prefix on the same line) are ignored.
pub const MARK: &str = "@@kc ";

/// How long a child works before it stops on its own (it is killed long
/// before).
pub const CHILD_LIFETIME: Duration = Duration::from_secs(30);

/// How many devices the child's uploads and claims go to.
const DEVICES: usize = 4;

/// Starts the test binary again as a child with `role`, running only the
/// test `test` (which acts the role out), with the given environment; its
/// stdout is piped.
pub fn spawn_child(test: &str, role: &str, env: &[(&str, String)]) -> Child {
    let mut cmd = crate::process::child_command(test, role);
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("start a child process")
}

/// How many times a crash test kills its child: `KEYCLAIM_CRASH_ITERATIONS`,
/// `default` unless set.
pub fn crash_iterations(default: usize) -> usize {
    std::env::var("KEYCLAIM_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Starts the child `role` of the test `test` (see [`spawn_child`]),
/// SIGKILLs it at a random moment, mostly mid-work, and for every fifth
/// `run` early, while it may still be opening the store; answers its whole
/// stdout.
pub fn kill_at_random_moment(test: &str, role: &str, env: &[(&str, String)], run: usize) -> String {
    let mut child = spawn_child(test, role, env);
    let out = collect_stdout(&mut child);
    let wait_ms = if run.is_multiple_of(5) {
        rand::rng().random_range(0..40)
    } else {
        rand::rng().random_range(40..400)
    };
    std::thread::sleep(Duration::from_millis(wait_ms));
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

/// Limits under which a store remembers every issued key, so that a key
/// that is gone can be told claimed (remembered) from lost (nowhere): open
/// the store with these in the child and in the parent.
pub fn crash_limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_otks_per_device_algorithm = 1_000_000;
    limits.remembered_issued_keys = 100_000_000;
    limits
}

/// The child's body once its store is open: three tasks upload and three
/// claim, reporting every step, until [`CHILD_LIFETIME`] is over (the
/// parent kills it long before). `run` names its uploads apart from the
/// other children's. Reports `READY` first.
pub async fn child_workload<S: KeyStore + ?Sized>(store: Arc<S>, run: &str) {
    let out = Arc::new(Mutex::new(()));
    report(&out, &["READY"]);
    let mut tasks = Vec::new();
    for t in 0..3 {
        let (store, out) = (Arc::clone(&store), Arc::clone(&out));
        let prefix = format!("r{run}t{t}");
        tasks.push(tokio::spawn(async move {
            uploads(&*store, &out, &prefix).await
        }));
    }
    for _ in 0..3 {
        let (store, out) = (Arc::clone(&store), Arc::clone(&out));
        tasks.push(tokio::spawn(async move { claims(&*store, &out).await }));
    }
    for t in tasks {
        t.await.expect("task");
    }
}

async fn uploads<S: KeyStore + ?Sized>(store: &S, out: &Mutex<()>, prefix: &str) {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < CHILD_LIFETIME {
        let (d, size) = {
            let mut rng = rand::rng();
            (
                device(rng.random_range(0..DEVICES)),
                rng.random_range(1..=8),
            )
        };
        let batch = format!("{prefix}n{n}");
        n += 1;
        let keys: Vec<_> = (0..size).map(|j| key(&format!("{batch}k{j}"))).collect();
        let mut words = vec!["P".to_owned(), batch.clone(), d.device_id.to_string()];
        words.extend(keys.iter().map(|(id, _)| id.to_string()));
        report(out, &words.iter().map(String::as_str).collect::<Vec<_>>());
        let upload = Upload::from_keys(d, keys, []).expect("upload");
        match store.upload(&upload).await {
            Ok(_) => report(out, &["U", &batch]),
            Err(e) if e.is_retryable() => {}
            Err(e) => panic!("upload failed: {e}"),
        }
    }
}

async fn claims<S: KeyStore + ?Sized>(store: &S, out: &Mutex<()>) {
    let start = Instant::now();
    let alg = Algorithm::signed_curve25519();
    while start.elapsed() < CHILD_LIFETIME {
        let targets: Vec<ClaimTarget> = {
            let mut rng = rand::rng();
            (0..rng.random_range(1..=3))
                .map(|_| ClaimTarget {
                    device: device(rng.random_range(0..DEVICES)),
                    algorithm: alg.clone(),
                    count: rng.random_range(1..=3),
                })
                .collect()
        };
        match store.claim(&targets).await {
            Ok(outcome) => {
                for k in &outcome.keys {
                    report(out, &["C", k.device.device_id.as_str(), k.key_id.as_str()]);
                }
                if outcome.keys.is_empty() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            Err(e) if e.is_retryable() => {}
            Err(e) => panic!("claim failed: {e}"),
        }
    }
}

/// A key: (device ID, key ID).
type Key = (String, String);

/// What the parent learned from every child so far.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Uploads announced, by batch: the device and key IDs.
    pending: BTreeMap<String, (String, Vec<String>)>,
    /// Batches whose upload was acknowledged.
    acked: BTreeSet<String>,
    /// Keys whose claim was acknowledged (each at most once, ever).
    claimed: BTreeSet<Key>,
    /// Kills after the child reported `READY`.
    kills_after_ready: usize,
}

impl Ledger {
    /// Reads one child's output; panics on a key reported claimed twice.
    pub fn absorb(&mut self, output: &str) {
        for line in result_lines(output) {
            match line[0].as_str() {
                "READY" => self.kills_after_ready += 1,
                "P" => {
                    let keys = line[3..].to_vec();
                    self.pending
                        .insert(line[1].clone(), (line[2].clone(), keys));
                }
                "U" => {
                    assert!(
                        self.pending.contains_key(&line[1]),
                        "ack of an unknown upload"
                    );
                    self.acked.insert(line[1].clone());
                }
                "C" => {
                    let k = (line[1].clone(), line[2].clone());
                    assert!(self.claimed.insert(k.clone()), "key issued twice: {k:?}");
                }
                other => panic!("unexpected report {other}"),
            }
        }
    }

    /// A summary line: kills, uploads announced and acknowledged, keys
    /// claimed; panics unless the children did work before dying.
    pub fn summary(&self, kills: usize) -> String {
        assert!(
            self.kills_after_ready > 0 && !self.claimed.is_empty(),
            "the children did work before dying"
        );
        format!(
            "crash test: {kills} kills ({} after the child was ready), {} uploads \
             announced, {} acknowledged, {} keys claimed",
            self.kills_after_ready,
            self.pending.len(),
            self.acked.len(),
            self.claimed.len(),
        )
    }

    /// Checks the store (opened with [`crash_limits`] after the kill of
    /// child `run`) against everything the children reported; panics with
    /// the first broken promise.
    pub async fn check(&self, store: &dyn KeyStore, run: usize) {
        let mut stored: BTreeSet<Key> = BTreeSet::new();
        let mut issued: BTreeSet<Key> = BTreeSet::new();
        for snap in store.export_devices(None, 1000).await.expect("export") {
            let d = snap.device.device_id.to_string();
            let counts = store.otk_counts(&snap.device).await.expect("counts");
            assert_eq!(
                counts.total(),
                snap.one_time_keys.len() as u64,
                "run {run}: counts exact"
            );
            for otk in &snap.one_time_keys {
                assert!(stored.insert((d.clone(), otk.key_id.to_string())));
            }
            for keys in snap.issued.values() {
                for k in keys {
                    issued.insert((d.clone(), k.key_id.to_string()));
                }
            }
        }
        for k in &self.claimed {
            assert!(
                !stored.contains(k),
                "run {run}: claimed key {k:?} is stored again"
            );
            assert!(
                issued.contains(k),
                "run {run}: claimed key {k:?} not remembered as issued"
            );
        }
        for k in &stored {
            assert!(
                !issued.contains(k),
                "run {run}: {k:?} both stored and issued"
            );
        }
        for (batch, (d, keys)) in &self.pending {
            let present = keys
                .iter()
                .filter(|id| {
                    let k = (d.clone(), (*id).clone());
                    stored.contains(&k) || issued.contains(&k)
                })
                .count();
            if self.acked.contains(batch) {
                assert_eq!(
                    present,
                    keys.len(),
                    "run {run}: acknowledged upload {batch} lost keys"
                );
            } else {
                assert!(
                    present == 0 || present == keys.len(),
                    "run {run}: upload {batch} applied in part ({present} of {})",
                    keys.len()
                );
            }
        }
    }
}
