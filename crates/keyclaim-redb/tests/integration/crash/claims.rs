//! Uploads and claims under SIGKILL (R3.1, R4.2, R10.1, R10.2).
//!
//! The child runs uploads and claims on four devices concurrently (so that
//! group commit batches them). After each kill the parent checks:
//!
//! - the file opens cleanly;
//! - every acknowledged upload is there, unless an acknowledged claim took
//!   it (nothing acknowledged is lost);
//! - no key an acknowledged claim returned is there again (never issued
//!   twice), and every claim returned the oldest keys;
//! - the one operation per device that was in flight at the kill is there
//!   whole or not at all (R3.1).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use keyclaim::{ClaimTarget, KeyStore, Upload};
use keyclaim_conformance::fixtures::{SC, alg, dev, kid, signed};
use keyclaim_redb::RedbStore;

use super::{Rng, child_args, emit, kill_and_check, split_names};
use crate::rt;

const TEST: &str = "crash::claims::sigkill_at_random_moments_loses_nothing_and_never_double_issues";
const TASKS: usize = 4;
const USER: &str = "@crash:example.org";

/// The child role: uploads and claims until killed (or 20 s pass).
fn crash_child() {
    let (path, iter) = child_args();
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
    let mut expected: Vec<BTreeSet<String>> = vec![BTreeSet::new(); TASKS];
    let mut in_flight_seen = 0;
    let (kills, acks) = kill_and_check(TEST, "crash", |iter, lines, store, runtime| {
        let (base, pending, acks) = replay(lines, &expected);
        runtime.block_on(async {
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
        });
        acks
    });
    eprintln!(
        "crash test: {kills} kills, {acks} acknowledged operations, \
         {in_flight_seen} unacknowledged operations found committed"
    );
}
