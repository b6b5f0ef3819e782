//! Dehydrated-device replacement under SIGKILL (R14.1, R10.1).
//!
//! The child keeps one dehydrated device per user for three users,
//! concurrently (so that group commit puts their operations in one batch).
//! Each step either replaces the user's device (`replace_device`: the
//! previous device goes, a new one, often with the same device ID, gets
//! 1 to 24 one-time keys and a fallback key, all with names new to the
//! store), claims one of its one-time keys (`claim_one_time_keys`), or
//! claims its fallback key marking it used (`claim_fallback_keys`). After
//! each kill the parent checks, per user:
//!
//! - at most one device holds anything: never the previous device beside
//!   the new one;
//! - its one-time keys, fallback key and used flag are exactly those of the
//!   acknowledged state, or of the state after the operation in flight at
//!   the kill: never some keys of the old device and some of the new;
//! - counts, unused fallback types (through `counts_many`, R16.1) and the
//!   fallback read (R15.1) agree with the export.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use keyclaim::transfer::DeviceSnapshot;
use keyclaim::{ClaimTarget, Device, FallbackTarget, KeyStore, Upload};
use keyclaim_conformance::fixtures::{SC, alg, dev, kid, signed, signed_fallback};
use keyclaim_redb::RedbStore;

use super::{Rng, child_args, emit, kill_and_check, split_names};
use crate::rt;

const TEST: &str =
    "crash::replace::sigkill_during_device_replacement_leaves_old_or_new_never_a_mix";
const USERS: usize = 3;
/// The device IDs a replacement picks from: a third of the replacements
/// keep the previous device ID (R14.1 with `previous` equal to the new).
const DEVICE_IDS: [&str; 3] = ["DEHYDRATED_A", "DEHYDRATED_B", "DEHYDRATED_C"];

fn user(task: usize) -> String {
    format!("@dehydrated{task}:example.org")
}

/// What a user's one device holds.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Held {
    device_id: String,
    /// Stored one-time key names; name order is claim order.
    otks: BTreeSet<String>,
    fallback: String,
    fallback_used: bool,
}

/// The child role: replacements and claims until killed (or 20 s pass).
fn replace_child() {
    let (path, iter) = child_args();
    rt().block_on(async move {
        let store = Arc::new(RedbStore::open(&path).await.expect("open after crash"));
        let found = store.export_devices(None, usize::MAX).await.unwrap();
        emit("@@ ready");
        let deadline = Instant::now() + Duration::from_secs(20);
        let tasks = (0..USERS).map(|task| {
            let store = Arc::clone(&store);
            let mut current: Option<Device> = found
                .iter()
                .find(|s| s.device.user_id.as_str() == user(task))
                .map(|s| s.device.clone());
            async move {
                let mut rng = Rng(iter * 1000 + task as u64);
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let step = rng.below(4);
                    match current.clone() {
                        Some(device) if step == 0 => {
                            emit(&format!("@@ CI {task}"));
                            let target = ClaimTarget::one(device, alg(SC));
                            let out = store.claim_one_time_keys(&[target]).await.expect("claim");
                            let ids: Vec<&str> = out.keys.iter().map(|k| k.key_id.name()).collect();
                            emit(&format!("@@ CA {task} {}", ids.join(",")));
                        }
                        Some(device) if step == 1 => {
                            emit(&format!("@@ FI {task}"));
                            let target = FallbackTarget {
                                device,
                                algorithm: alg(SC),
                                mark_used: true,
                            };
                            store
                                .claim_fallback_keys(&[target])
                                .await
                                .expect("fallback claim");
                            emit(&format!("@@ FA {task}"));
                        }
                        _ => {
                            n += 1;
                            let tag = format!("{iter:04}-{n:05}");
                            let device_id = DEVICE_IDS[rng.below(3) as usize];
                            let names: Vec<String> = (0..1 + rng.below(24))
                                .map(|i| format!("{tag}-{i:02}"))
                                .collect();
                            let fallback = format!("{tag}-fb");
                            emit(&format!(
                                "@@ RI {task} {device_id} {fallback} {}",
                                names.join(",")
                            ));
                            let device = dev(&user(task), device_id);
                            let keys = names
                                .iter()
                                .map(|name| (kid(&format!("{SC}:{name}")), signed(name, "sig")));
                            let fallbacks = [(
                                kid(&format!("{SC}:{fallback}")),
                                signed_fallback(&fallback, "sig"),
                            )];
                            let upload =
                                Upload::from_keys(device.clone(), keys, fallbacks).unwrap();
                            let previous = current.as_ref().map(|d| &d.device_id);
                            store
                                .replace_device(previous, &upload)
                                .await
                                .expect("replace");
                            emit(&format!("@@ RA {task}"));
                            current = Some(device);
                        }
                    }
                }
            }
        });
        join_all(tasks).await;
    });
}

/// The operation of a user in flight at the kill.
enum Pending {
    None,
    Replace(Held),
    Claim,
    Fallback,
}

/// `held` after its oldest one-time key was claimed.
fn after_claim(held: &Option<Held>) -> Option<Held> {
    held.clone().map(|mut h| {
        h.otks.pop_first();
        h
    })
}

/// `held` after its fallback key was claimed and marked used.
fn after_fallback(held: &Option<Held>) -> Option<Held> {
    held.clone().map(|mut h| {
        h.fallback_used = true;
        h
    })
}

/// Replays the child's report onto the state verified after the previous
/// kill; returns the state every acknowledged operation implies, the
/// operation per user in flight at the kill, and the acknowledgements.
fn replay(lines: &[String], expected: &[Option<Held>]) -> (Vec<Option<Held>>, Vec<Pending>, usize) {
    let mut base = expected.to_vec();
    let mut pending: Vec<Pending> = (0..USERS).map(|_| Pending::None).collect();
    let mut acks = 0;
    for line in lines {
        let mut parts = line.trim_start_matches("@@ ").split(' ');
        let kind = parts.next().unwrap_or("");
        if kind == "ready" {
            continue;
        }
        let task: usize = parts.next().unwrap().parse().unwrap();
        let was = std::mem::replace(&mut pending[task], Pending::None);
        match (kind, was) {
            ("RI", _) => {
                pending[task] = Pending::Replace(Held {
                    device_id: parts.next().unwrap().to_owned(),
                    fallback: parts.next().unwrap().to_owned(),
                    otks: split_names(parts.next()).into_iter().collect(),
                    fallback_used: false,
                });
            }
            ("CI", _) => pending[task] = Pending::Claim,
            ("FI", _) => pending[task] = Pending::Fallback,
            ("RA", Pending::Replace(held)) => {
                base[task] = Some(held);
                acks += 1;
            }
            ("CA", Pending::Claim) => {
                let ids = split_names(parts.next());
                let oldest: Vec<String> = base[task]
                    .iter()
                    .flat_map(|h| h.otks.first().cloned())
                    .collect();
                assert_eq!(ids, oldest, "user {task}: a claim must take the oldest key");
                base[task] = after_claim(&base[task]);
                acks += 1;
            }
            ("FA", Pending::Fallback) => {
                base[task] = after_fallback(&base[task]);
                acks += 1;
            }
            _ => panic!("acknowledgement without its intent: {line}"),
        }
    }
    (base, pending, acks)
}

/// What a user's devices hold after the kill, checked for consistency:
/// at most one device, counts, unused fallback types and the fallback read
/// agreeing with its export.
async fn observe(store: &RedbStore, task: usize, all: &[DeviceSnapshot]) -> Option<Held> {
    let mine: Vec<&DeviceSnapshot> = all
        .iter()
        .filter(|s| s.device.user_id.as_str() == user(task))
        .collect();
    assert!(
        mine.len() <= 1,
        "user {task}: the previous device survived beside the new one: {:?}",
        mine.iter()
            .map(|s| s.device.to_string())
            .collect::<Vec<_>>()
    );
    let asked: Vec<Device> = DEVICE_IDS.iter().map(|d| dev(&user(task), d)).collect();
    let states = store.counts_many(&asked).await.unwrap();
    let snap = mine.first()?;
    let names: Vec<String> = snap
        .one_time_keys
        .iter()
        .map(|k| k.key_id.name().to_owned())
        .collect();
    let otks: BTreeSet<String> = names.iter().cloned().collect();
    assert_eq!(
        names,
        otks.iter().cloned().collect::<Vec<_>>(),
        "user {task}: keys out of upload order"
    );
    assert_eq!(snap.fallback_keys.len(), 1, "user {task}: one fallback key");
    let (_, fallback) = snap.fallback_keys.first_key_value()?;
    for (device, state) in asked.iter().zip(&states) {
        if device == &snap.device {
            assert_eq!(state.one_time_key_counts.get_str(SC), otks.len() as u64);
            assert_eq!(
                state.unused_fallback_key_types.is_empty(),
                fallback.used,
                "user {task}: unused fallback types disagree with the export"
            );
        } else {
            assert!(
                state.one_time_key_counts.is_empty() && state.unused_fallback_key_types.is_empty(),
                "user {task}: {device} holds keys beside {}",
                snap.device
            );
        }
    }
    let read: BTreeMap<_, _> = store.fallback_keys(&snap.device).await.unwrap();
    assert_eq!(
        read, snap.fallback_keys,
        "user {task}: fallback read disagrees"
    );
    Some(Held {
        device_id: snap.device.device_id.as_str().to_owned(),
        otks,
        fallback: fallback.key_id.name().to_owned(),
        fallback_used: fallback.used,
    })
}

#[test]
fn sigkill_during_device_replacement_leaves_old_or_new_never_a_mix() {
    if keyclaim_testing::process::is_child("crash-replace") {
        return replace_child();
    }
    let mut expected: Vec<Option<Held>> = vec![None; USERS];
    let mut replaces_in_flight = 0;
    let mut replaces_found_committed = 0;
    let (kills, acks) = kill_and_check(TEST, "crash-replace", |iter, lines, store, runtime| {
        let (base, pending, acks) = replay(lines, &expected);
        runtime.block_on(async {
            let all = store.export_devices(None, usize::MAX).await.unwrap();
            for task in 0..USERS {
                let found = observe(store, task, &all).await;
                let after = match &pending[task] {
                    Pending::None => None,
                    Pending::Replace(new) => {
                        replaces_in_flight += 1;
                        Some(Some(new.clone()))
                    }
                    Pending::Claim => Some(after_claim(&base[task])),
                    Pending::Fallback => Some(after_fallback(&base[task])),
                };
                let old = found == base[task];
                let new = after.as_ref() == Some(&found);
                if new && !old && matches!(pending[task], Pending::Replace(_)) {
                    replaces_found_committed += 1;
                }
                assert!(
                    old || new,
                    "iteration {iter}, user {task}: found {found:?}, which is neither the \
                     acknowledged state {:?} nor the state after the operation in flight {after:?}",
                    base[task]
                );
                expected[task] = found;
            }
        });
        acks
    });
    eprintln!(
        "replace crash test: {kills} kills, {acks} acknowledged operations, \
         {replaces_in_flight} replacements in flight at a kill, {replaces_found_committed} of \
         them found committed"
    );
}
