//! Crash test (R3.1, R4.2, R10.1, R10.2): a child process uploads and claims
//! in a loop, reporting every acknowledged result on stdout; the parent
//! SIGKILLs it at a random moment, again and again, and after each kill
//! checks that the file opens cleanly, that no key reported as claimed is
//! ever issued again, that every acknowledged upload not claimed is still
//! there, and that unacknowledged uploads are all there or not at all.
//!
//! The test binary runs itself again for each child
//! (`keyclaim_testing::process`): the test below is the child when started
//! with a child role, and the parent in every other run.
//!
//! `KEYCLAIM_CRASH_ITERATIONS` sets the number of kills (default 25), e.g.
//! `KEYCLAIM_CRASH_ITERATIONS=500 cargo test -p keyclaim-sqlite --release --test crash`.

// A test: a failed expectation is how it reports.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{crash_iterations, device, key, kill_at_random_moment, report, result_lines};
use keyclaim::{Algorithm, ClaimTarget, KeyStore, Limits, Upload};
use keyclaim_sqlite::{SqliteOptions, SqliteStore};
use rand::Rng as _;

const DB: &str = "KEYCLAIM_CRASH_DB";
const RUN: &str = "KEYCLAIM_CRASH_RUN";
const DEVICES: usize = 4;

/// Limits under which the store remembers every issued key, so that a key
/// that is gone can be told claimed (remembered) from lost (nowhere).
fn options() -> SqliteOptions {
    let mut limits = Limits::default();
    limits.max_otks_per_device_algorithm = 1_000_000;
    limits.remembered_issued_keys = 100_000_000;
    SqliteOptions::new().limits(limits)
}

/// The child's body: uploads and claims until killed.
fn crash_child() {
    let db = PathBuf::from(std::env::var(DB).expect("db path"));
    let run = std::env::var(RUN).expect("run number");
    keyclaim_testing::runtime(2).block_on(async move {
        let store = Arc::new(SqliteStore::open_with(&db, options()).await.expect("open"));
        let out = Arc::new(Mutex::new(()));
        report(&out, &["READY"]);
        let mut tasks = Vec::new();
        for t in 0..3 {
            let (store, out, run) = (store.clone(), out.clone(), run.clone());
            tasks.push(tokio::spawn(async move {
                uploads(&store, &out, &format!("r{run}t{t}")).await
            }));
        }
        for _ in 0..3 {
            let (store, out) = (store.clone(), out.clone());
            tasks.push(tokio::spawn(async move { claims(&store, &out).await }));
        }
        for t in tasks {
            t.await.expect("task");
        }
    });
}

const CHILD_LIFETIME: Duration = Duration::from_secs(30);

async fn uploads(store: &SqliteStore, out: &Mutex<()>, prefix: &str) {
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

async fn claims(store: &SqliteStore, out: &Mutex<()>) {
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

type Key = (String, String);

/// What the parent learned from every child so far.
#[derive(Default)]
struct Ledger {
    /// Uploads announced, by batch: the device and key IDs.
    pending: BTreeMap<String, (String, Vec<String>)>,
    /// Batches whose upload was acknowledged.
    acked: BTreeSet<String>,
    /// Keys whose claim was acknowledged (each at most once, ever).
    claimed: BTreeSet<Key>,
}

impl Ledger {
    fn absorb(&mut self, output: &str) {
        for line in result_lines(output) {
            match line[0].as_str() {
                "READY" => {}
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
}

#[test]
fn sigkill_at_random_moments_loses_nothing() {
    if keyclaim_testing::process::is_child("crash") {
        return crash_child();
    }
    let dir = keyclaim_testing::temp_dir();
    let db = dir.path().join("crash.sqlite");
    let rt = keyclaim_testing::runtime(2);
    let mut ledger = Ledger::default();
    let mut kills_after_ready = 0;
    let mut total_claims = 0;
    for run in 0..crash_iterations() {
        let output = kill_at_random_moment(
            "sigkill_at_random_moments_loses_nothing",
            "crash",
            &[(DB, db.display().to_string()), (RUN, run.to_string())],
            run,
        );
        if output.contains("READY") {
            kills_after_ready += 1;
        }
        let before = ledger.claimed.len();
        ledger.absorb(&output);
        total_claims += ledger.claimed.len() - before;
        rt.block_on(check(&db, &ledger, run));
    }
    assert!(common::integrity_ok(&db));
    eprintln!(
        "crash test: {} kills ({kills_after_ready} after the child was ready), {} uploads \
         announced, {} acknowledged, {total_claims} keys claimed",
        crash_iterations(),
        ledger.pending.len(),
        ledger.acked.len(),
    );
    assert!(
        kills_after_ready > 0 && total_claims > 0,
        "the children did work before dying"
    );
}

async fn check(db: &std::path::Path, ledger: &Ledger, run: usize) {
    assert!(
        common::integrity_ok(db),
        "run {run}: integrity_check failed"
    );
    let store = SqliteStore::open_with(db, options())
        .await
        .unwrap_or_else(|e| panic!("run {run}: the file does not open cleanly: {e}"));
    let mut stored: BTreeSet<Key> = BTreeSet::new();
    let mut issued: BTreeSet<Key> = BTreeSet::new();
    for snap in store.export_devices(None, 1000).await.unwrap() {
        let d = snap.device.device_id.to_string();
        let counts = store.otk_counts(&snap.device).await.unwrap();
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
    for k in &ledger.claimed {
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
    for (batch, (d, keys)) in &ledger.pending {
        let present = keys
            .iter()
            .filter(|id| {
                let k = (d.clone(), (*id).clone());
                stored.contains(&k) || issued.contains(&k)
            })
            .count();
        if ledger.acked.contains(batch) {
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
