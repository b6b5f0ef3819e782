//! The SIGKILL crash test (R3.1, R4.2, R10.1, R10.2).
//!
//! The test re-executes its own binary as a child process (a child role of
//! `keyclaim_testing::process`: the same test, which acts as the child when
//! started with the role and as the parent in every other run) that opens the
//! store and runs uploads and claims on four devices concurrently (so that
//! group commit batches them), printing one line per step: an intent line
//! before each operation and an acknowledgement line after it returned.
//! The parent SIGKILLs the child at a random moment, opens the file, and
//! checks it against what the child reported:
//!
//! - the file opens cleanly;
//! - every acknowledged upload is there, unless an acknowledged claim took
//!   it (nothing acknowledged is lost);
//! - no key an acknowledged claim returned is there again (never issued
//!   twice), and every claim returned the oldest keys;
//! - the one operation per device that was in flight at the kill is there
//!   whole or not at all (R3.1).
//!
//! 20 kills in a normal run; set `KEYCLAIM_CRASH_ITERATIONS` for more.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use keyclaim::{ClaimTarget, KeyStore, Upload};
use keyclaim_conformance::fixtures::{SC, alg, dev, kid, signed};
use keyclaim_redb::RedbStore;

const TEST: &str = "crash::sigkill_at_random_moments_loses_nothing_and_never_double_issues";
const PATH_ENV: &str = "KEYCLAIM_CRASH_PATH";
const ITER_ENV: &str = "KEYCLAIM_CRASH_ITER";
const ITERATIONS_ENV: &str = "KEYCLAIM_CRASH_ITERATIONS";
const TASKS: usize = 4;
const USER: &str = "@crash:example.org";

use crate::rt;

/// splitmix64: enough randomness for timings and operation mixes.
struct Rng(u64);

impl Rng {
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

fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    // A closed pipe means the parent is gone: stop.
    writeln!(out, "{line}").expect("parent gone");
    out.flush().expect("parent gone");
}

/// The child role: uploads and claims until killed (or 20 s pass).
fn crash_child() {
    let path = std::env::var(PATH_ENV).unwrap();
    let iter: u64 = std::env::var(ITER_ENV).unwrap().parse().unwrap();
    rt().block_on(async move {
        let store = Arc::new(RedbStore::open(&path).await.expect("open after crash"));
        emit("@@ ready");
        let deadline = Instant::now() + Duration::from_secs(20);
        let tasks = (0..TASKS).map(|task| {
            let store = Arc::clone(&store);
            async move {
                let device = dev(USER, &format!("D{task}"));
                let mut rng = Rng(iter * 1000 + task as u64);
                let mut n = 0u64;
                while Instant::now() < deadline {
                    if rng.below(2) == 0 {
                        let k = 1 + rng.below(4);
                        let names: Vec<String> = (0..k)
                            .map(|_| {
                                n += 1;
                                format!("{iter:05}-{n:06}")
                            })
                            .collect();
                        emit(&format!("@@ UI {task} {}", names.join(",")));
                        let keys = names
                            .iter()
                            .map(|name| (kid(&format!("{SC}:{name}")), signed(name, "sig")));
                        let upload = Upload::from_keys(device.clone(), keys, []).unwrap();
                        store.upload(&upload).await.expect("upload");
                        emit(&format!("@@ UA {task}"));
                    } else {
                        let c = 1 + rng.below(5);
                        emit(&format!("@@ CI {task} {c}"));
                        let target = ClaimTarget {
                            device: device.clone(),
                            algorithm: alg(SC),
                            count: c as u32,
                        };
                        let out = store.claim(&[target]).await.expect("claim");
                        let ids: Vec<&str> = out.keys.iter().map(|k| k.key_id.name()).collect();
                        emit(&format!("@@ CA {task} {}", ids.join(",")));
                    }
                }
            }
        });
        join_all(tasks).await;
    });
}

enum Pending {
    None,
    Upload(Vec<String>),
    Claim(usize),
}

fn split_names(s: Option<&str>) -> Vec<String> {
    s.unwrap_or("")
        .split(',')
        .filter(|x| !x.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Replays the child's report onto the state verified after the previous
/// kill; returns the state every acknowledged operation implies and the
/// operation per device in flight at the kill.
fn replay(
    lines: &[String],
    expected: &[BTreeSet<String>],
) -> (Vec<BTreeSet<String>>, Vec<Pending>, usize) {
    let mut base: Vec<BTreeSet<String>> = expected.to_vec();
    let mut pending: Vec<Pending> = (0..TASKS).map(|_| Pending::None).collect();
    let mut acks = 0;
    for line in lines {
        let Some(rest) = line.strip_prefix("@@ ") else {
            continue;
        };
        let mut parts = rest.split(' ');
        let kind = parts.next().unwrap_or("");
        if kind == "ready" {
            continue;
        }
        let task: usize = parts.next().unwrap().parse().unwrap();
        match kind {
            "UI" => pending[task] = Pending::Upload(split_names(parts.next())),
            "UA" => {
                let Pending::Upload(names) = std::mem::replace(&mut pending[task], Pending::None)
                else {
                    panic!("upload ack without intent: {line}");
                };
                base[task].extend(names);
                acks += 1;
            }
            "CI" => pending[task] = Pending::Claim(parts.next().unwrap().parse().unwrap()),
            "CA" => {
                let Pending::Claim(n) = std::mem::replace(&mut pending[task], Pending::None) else {
                    panic!("claim ack without intent: {line}");
                };
                let ids = split_names(parts.next());
                let oldest: Vec<String> = base[task].iter().take(n).cloned().collect();
                assert_eq!(
                    ids, oldest,
                    "device D{task}: a claim must return the oldest stored keys, each once \
                     (a key missing from the store was issued twice or lost)"
                );
                for id in &ids {
                    base[task].remove(id);
                }
                acks += 1;
            }
            other => panic!("unknown line kind {other}: {line}"),
        }
    }
    (base, pending, acks)
}

#[test]
fn sigkill_at_random_moments_loses_nothing_and_never_double_issues() {
    if keyclaim_testing::process::is_child("crash") {
        return crash_child();
    }
    let iterations: u64 = std::env::var(ITERATIONS_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("crash test: {iterations} kills, seed {seed}");
    let mut rng = Rng(seed);
    let dir = keyclaim_testing::temp_dir();
    let path = dir.path().join("crash.redb");
    let runtime = rt();
    let mut expected: Vec<BTreeSet<String>> = vec![BTreeSet::new(); TASKS];
    let mut total_acks = 0;
    let mut in_flight_seen = 0;
    for iter in 0..iterations {
        let mut child = keyclaim_testing::process::child_command(TEST, "crash")
            .env(PATH_ENV, &path)
            .env(ITER_ENV, iter.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (ready_tx, ready_rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
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
                // libtest may print "test crash::sigkill_... " before the
                // first line of the child's own output.
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
        if iter % 5 == 4 {
            // Sometimes kill early: during start-up, opening or repair.
            std::thread::sleep(Duration::from_millis(rng.below(40)));
        } else {
            ready_rx
                .recv_timeout(Duration::from_secs(30))
                .expect("child did not open the store");
            std::thread::sleep(Duration::from_millis(5 + rng.below(150)));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        let (base, pending, acks) = replay(&lines, &expected);
        total_acks += acks;

        runtime.block_on(async {
            let store = RedbStore::open(&path)
                .await
                .unwrap_or_else(|e| panic!("iteration {iter}: open after SIGKILL failed: {e:?}"));
            for task in 0..TASKS {
                let device = dev(USER, &format!("D{task}"));
                let snap = store
                    .export_devices(None, usize::MAX)
                    .await
                    .unwrap()
                    .into_iter()
                    .find(|s| s.device == device);
                let stored: Vec<String> = snap
                    .map(|s| {
                        s.one_time_keys
                            .iter()
                            .map(|k| k.key_id.name().to_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                let set: BTreeSet<String> = stored.iter().cloned().collect();
                // Claim order is upload order is name order.
                assert_eq!(
                    stored,
                    set.iter().cloned().collect::<Vec<_>>(),
                    "iteration {iter}, D{task}: keys out of upload order"
                );
                let counts = store.otk_counts(&device).await.unwrap();
                assert_eq!(counts.get_str(SC), set.len() as u64, "counts disagree");
                let ok = match &pending[task] {
                    Pending::None => set == base[task],
                    Pending::Upload(names) => {
                        let mut with: BTreeSet<String> = base[task].clone();
                        with.extend(names.iter().cloned());
                        if set != base[task] && set == with {
                            in_flight_seen += 1;
                        }
                        set == base[task] || set == with
                    }
                    Pending::Claim(n) => {
                        let without: BTreeSet<String> =
                            base[task].iter().skip(*n).cloned().collect();
                        if set != base[task] && set == without {
                            in_flight_seen += 1;
                        }
                        set == base[task] || set == without
                    }
                };
                assert!(
                    ok,
                    "iteration {iter}, D{task}: stored keys {set:?} do not match the \
                     acknowledged state {:?} (in flight: {})",
                    base[task],
                    match &pending[task] {
                        Pending::None => "nothing".to_owned(),
                        Pending::Upload(n) => format!("upload {n:?}"),
                        Pending::Claim(n) => format!("claim of {n}"),
                    }
                );
                expected[task] = set;
            }
            store.close().await.unwrap();
        });
    }
    eprintln!(
        "crash test: {iterations} kills, {total_acks} acknowledged operations, \
         {in_flight_seen} unacknowledged operations found committed"
    );
    assert!(
        total_acks >= iterations as usize,
        "the child made too little progress to test anything"
    );
}
