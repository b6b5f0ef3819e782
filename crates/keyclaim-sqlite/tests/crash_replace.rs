//! Crash test of device replacement (R14.1, R10.1, R10.2): a child process
//! replaces each of a few users' dehydrated device again and again (with a
//! new device ID, then with the same one), reporting every replacement it
//! starts and every one acknowledged on stdout; the parent SIGKILLs it at a
//! random moment, again and again, and after each kill checks that the file
//! opens cleanly and that every user holds exactly one whole generation: the
//! last acknowledged one or the one in flight, never a mix (both devices,
//! keys of two generations on one device, or a part of one).
//!
//! The test binary runs itself again for each child
//! (`keyclaim_testing::process`), as `tests/crash.rs` does.
//!
//! `KEYCLAIM_CRASH_ITERATIONS` sets the number of kills (default 25), e.g.
//! `KEYCLAIM_CRASH_ITERATIONS=500 cargo test -p keyclaim-sqlite --release --test crash_replace`.

// A test: a failed expectation is how it reports.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{crash_iterations, key, kill_at_random_moment, report, result_lines};
use keyclaim::{Device, DeviceId, KeyStore, Upload};
use keyclaim_sqlite::SqliteStore;

const DB: &str = "KEYCLAIM_CRASH_DB";
const RUN: &str = "KEYCLAIM_CRASH_RUN";
/// Users, each replacing its device in a loop of its own, so that
/// replacements of several users share the writer's batches.
const USERS: usize = 3;
/// One-time keys per generation: enough for a replacement to span several
/// pages of the file.
const KEYS: usize = 40;
const CHILD_LIFETIME: Duration = Duration::from_secs(30);

fn user(u: usize) -> String {
    format!("@dehydrated{u}:example.org")
}

/// The device ID of generation `n` of run `run`: generations 2k and 2k + 1
/// share one, so every other replacement keeps the device (previous == new).
fn device_id(run: &str, n: u64) -> String {
    format!("R{run}N{}", n / 2)
}

/// A generation's one-time key IDs and its fallback key ID, derived from its
/// name alone, so that the parent knows them from the child's report.
fn generation_keys(generation: &str) -> (BTreeSet<String>, String) {
    let otks = (0..KEYS).map(|j| format!("{generation}k{j}")).collect();
    (otks, format!("{generation}fb"))
}

fn upload_of(device: Device, generation: &str) -> Upload {
    let (otks, fallback) = generation_keys(generation);
    Upload::from_keys(device, otks.iter().map(|id| key(id)), [key(&fallback)]).expect("upload")
}

/// The child's body: replaces every user's device until killed.
fn crash_child() {
    let db = PathBuf::from(std::env::var(DB).expect("db path"));
    let run = std::env::var(RUN).expect("run number");
    keyclaim_testing::runtime(2).block_on(async move {
        let store = Arc::new(SqliteStore::open(&db).await.expect("open"));
        // Where each user's device is now: the previous run may have been
        // killed before or after its last replacement committed.
        let mut current: BTreeMap<String, DeviceId> = BTreeMap::new();
        for snap in store.export_devices(None, 1000).await.expect("export") {
            let previous = current.insert(snap.device.user_id.to_string(), snap.device.device_id);
            assert!(previous.is_none(), "a user with two devices");
        }
        let out = Arc::new(Mutex::new(()));
        report(&out, &["READY"]);
        let mut tasks = Vec::new();
        for u in 0..USERS {
            let (store, out, run) = (store.clone(), out.clone(), run.clone());
            let previous = current.get(&user(u)).cloned();
            tasks.push(tokio::spawn(async move {
                replacements(&store, &out, u, &run, previous).await
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
    });
}

async fn replacements(
    store: &SqliteStore,
    out: &Mutex<()>,
    u: usize,
    run: &str,
    mut previous: Option<DeviceId>,
) {
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < CHILD_LIFETIME {
        let generation = format!("r{run}n{n}");
        let device = Device::parse(&user(u), &device_id(run, n)).expect("device");
        report(
            out,
            &["P", &u.to_string(), &generation, device.device_id.as_str()],
        );
        let upload = upload_of(device.clone(), &generation);
        match store.replace_device(previous.as_ref(), &upload).await {
            Ok(outcome) => {
                assert_eq!(outcome.counts.total(), KEYS as u64, "a whole generation");
                report(out, &["A", &u.to_string(), &generation]);
                previous = Some(device.device_id);
                n += 1;
            }
            // Nothing applied: the same replacement again.
            Err(e) if e.is_retryable() => {}
            Err(e) => panic!("replace_device failed: {e}"),
        }
    }
}

/// A user's state as the parent expects it: one device with one
/// generation's keys, or nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct UserState(Option<Generation>);

#[derive(Clone, Debug, PartialEq, Eq)]
struct Generation {
    device: String,
    otks: BTreeSet<String>,
    fallback: String,
}

impl Generation {
    fn named(generation: &str, device: &str) -> Self {
        let (otks, fallback) = generation_keys(generation);
        Self {
            device: device.to_owned(),
            otks,
            fallback,
        }
    }
}

impl std::fmt::Display for UserState {
    /// Short: the device, and which generations its keys are of.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some(g) = &self.0 else {
            return f.write_str("nothing");
        };
        let of: BTreeSet<&str> = g
            .otks
            .iter()
            .filter_map(|k| k.rsplit_once('k').map(|(generation, _)| generation))
            .collect();
        write!(
            f,
            "{}: {} keys of {of:?}, fallback {}",
            g.device,
            g.otks.len(),
            g.fallback
        )
    }
}

/// What one child reported about one user: the replacements it started, in
/// order, and how many of them (a prefix) were acknowledged.
#[derive(Default)]
struct Reported {
    started: Vec<Generation>,
    acked: usize,
}

fn absorb(output: &str) -> BTreeMap<usize, Reported> {
    let mut users: BTreeMap<usize, Reported> = BTreeMap::new();
    for line in result_lines(output) {
        match line[0].as_str() {
            "READY" => {}
            "P" => {
                let u = line[1].parse().expect("user");
                let r = users.entry(u).or_default();
                assert_eq!(r.acked, r.started.len(), "one replacement at a time");
                // A retry after a retryable error announces the same one.
                let generation = Generation::named(&line[2], &line[3]);
                if r.started.last() != Some(&generation) {
                    r.started.push(generation);
                }
            }
            "A" => {
                let u = line[1].parse().expect("user");
                let r = users.get_mut(&u).expect("an ack of an announced user");
                let (otks, _) = generation_keys(&line[2]);
                assert_eq!(
                    r.started.get(r.acked).map(|g| &g.otks),
                    Some(&otks),
                    "the ack of the replacement in flight"
                );
                r.acked += 1;
            }
            other => panic!("unexpected report {other}"),
        }
    }
    users
}

#[test]
fn sigkill_during_replacements_leaves_old_or_new_never_a_mix() {
    if keyclaim_testing::process::is_child("crash_replace") {
        return crash_child();
    }
    let dir = keyclaim_testing::temp_dir();
    let db = dir.path().join("crash_replace.sqlite");
    let rt = keyclaim_testing::runtime(2);
    // What the last check found for each user.
    let mut verified: Vec<UserState> = vec![UserState::default(); USERS];
    let mut kills_after_ready = 0;
    let (mut acked, mut in_flight_found) = (0, 0);
    for run in 0..crash_iterations() {
        let output = kill_at_random_moment(
            "sigkill_during_replacements_leaves_old_or_new_never_a_mix",
            "crash_replace",
            &[(DB, db.display().to_string()), (RUN, run.to_string())],
            run,
        );
        if output.contains("READY") {
            kills_after_ready += 1;
        }
        let reported = absorb(&output);
        let found = rt.block_on(states(&db, run));
        for (u, before) in verified.iter_mut().enumerate() {
            let now = &found[u];
            let r = reported.get(&u);
            // The last acknowledged state (or, with none acknowledged in
            // this run, the one found before it), and the one in flight.
            let (done, next) = match r {
                Some(r) if r.acked > 0 => (
                    UserState(Some(r.started[r.acked - 1].clone())),
                    r.started.get(r.acked),
                ),
                Some(r) => (before.clone(), r.started.first()),
                None => (before.clone(), None),
            };
            let next = next.map(|g| UserState(Some(g.clone())));
            assert!(
                *now == done || Some(now) == next.as_ref(),
                "run {run}, user {u}: found {now}, expected {done} or {}",
                next.as_ref()
                    .map_or("nothing in flight".to_owned(), ToString::to_string)
            );
            if Some(now) == next.as_ref() {
                in_flight_found += 1;
            }
            acked += r.map_or(0, |r| r.acked);
            *before = now.clone();
        }
    }
    assert!(common::integrity_ok(&db));
    eprintln!(
        "crash_replace test: {} kills ({kills_after_ready} after the child was ready), \
         {acked} replacements acknowledged, {in_flight_found} found applied without an ack",
        crash_iterations(),
    );
    assert!(
        kills_after_ready > 0 && acked > 0,
        "the children did work before dying"
    );
}

/// Every user's state after a kill, read through the store's own reads
/// (export, sync state, fallback read, `counts_many`), which must agree.
async fn states(db: &Path, run: usize) -> Vec<UserState> {
    assert!(
        common::integrity_ok(db),
        "run {run}: integrity_check failed"
    );
    let store = SqliteStore::open(db)
        .await
        .unwrap_or_else(|e| panic!("run {run}: the file does not open cleanly: {e}"));
    let mut found = vec![UserState::default(); USERS];
    let snaps = store.export_devices(None, 1000).await.unwrap();
    let devices: Vec<Device> = snaps.iter().map(|s| s.device.clone()).collect();
    let many = store.counts_many(&devices).await.unwrap();
    for (snap, state) in snaps.into_iter().zip(many) {
        let u = (0..USERS)
            .find(|&u| snap.device.user_id.as_str() == user(u))
            .unwrap_or_else(|| panic!("run {run}: unknown user {}", snap.device.user_id));
        assert!(
            found[u].0.is_none(),
            "run {run}: user {u} holds two devices (a mix of old and new)"
        );
        assert_eq!(
            store.sync_state(&snap.device).await.unwrap(),
            state,
            "run {run}: counts_many agrees with sync_state"
        );
        assert_eq!(
            state.one_time_key_counts.total(),
            snap.one_time_keys.len() as u64,
            "run {run}: counts exact"
        );
        let fallbacks = store.fallback_keys(&snap.device).await.unwrap();
        assert_eq!(fallbacks, snap.fallback_keys, "run {run}: fallback read");
        let [fallback] = fallbacks
            .values()
            .map(|f| f.key_id.name().to_owned())
            .collect::<Vec<_>>()
            .try_into()
            .unwrap_or_else(|f| panic!("run {run}: user {u} fallback keys {f:?}"));
        let otks: BTreeSet<String> = snap
            .one_time_keys
            .iter()
            .map(|k| k.key_id.name().to_owned())
            .collect();
        assert_eq!(
            otks.len(),
            snap.one_time_keys.len(),
            "run {run}: no key twice"
        );
        found[u] = UserState(Some(Generation {
            device: snap.device.device_id.to_string(),
            otks,
            fallback,
        }));
    }
    found
}
