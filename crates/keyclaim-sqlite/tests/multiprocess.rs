//! Several OS processes on one SQLite file (R10.3): two claimers and an
//! uploader run at once; afterwards no key was issued twice, none was lost,
//! and the counts are exact. A claim in one process reaches the subscribers
//! of another (R11.2). Two processes of 64 claimers each both make progress.
//!
//! The test binary runs itself again for each child
//! (`keyclaim_testing::process`): the test below is a claimer or the
//! uploader when started with that child role, and the parent in every
//! other run.

// A test: a failed expectation is how it reports.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{collect_stdout, device, key, report, result_lines, spawn_child};
use keyclaim::{Algorithm, ClaimTarget, KeyStore, Limits, Upload};
use keyclaim_sqlite::{SqliteOptions, SqliteStore};
use rand::Rng as _;

const DB: &str = "KEYCLAIM_MP_DB";
const DONE: &str = "KEYCLAIM_MP_DONE";
const DEVICES: usize = 4;
const INITIAL_PER_DEVICE: usize = 150;
const UPLOADS: usize = 60;
const KEYS_PER_UPLOAD: usize = 8;

fn options() -> SqliteOptions {
    let mut limits = Limits::default();
    limits.max_otks_per_device_algorithm = 10_000;
    SqliteOptions::new().limits(limits)
}

/// The child processes' body: `role` is `claimer` or `uploader`.
fn multi_process_child(role: &str) {
    let db = PathBuf::from(std::env::var(DB).expect("db path"));
    let done = PathBuf::from(std::env::var(DONE).expect("done path"));
    keyclaim_testing::runtime(2).block_on(async move {
        let store = SqliteStore::open_with(&db, options()).await.expect("open");
        match role {
            "claimer" => claimer(&store, &done).await,
            "uploader" => uploader(&store).await,
            other => panic!("unknown role {other}"),
        }
    });
}

async fn claimer(store: &SqliteStore, done: &Path) {
    let out = Mutex::new(());
    let alg = Algorithm::signed_curve25519();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut claims = 0u64;
    loop {
        assert!(Instant::now() < deadline, "claimer ran too long");
        // Read before the claim: if the uploader had finished before this
        // claim began and the claim finds nothing, the store is empty.
        let finished = done.exists();
        let targets: Vec<ClaimTarget> = {
            let mut rng = rand::rng();
            (0..DEVICES)
                .map(|i| ClaimTarget {
                    device: device(i),
                    algorithm: alg.clone(),
                    count: rng.random_range(1..=3),
                })
                .collect()
        };
        let outcome = match store.claim(&targets).await {
            Ok(o) => o,
            Err(e) if e.is_retryable() => continue,
            Err(e) => panic!("claim failed: {e}"),
        };
        claims += 1;
        for k in &outcome.keys {
            assert!(!k.fallback);
            report(
                &out,
                &["CL", k.device.device_id.as_str(), k.key_id.as_str()],
            );
        }
        if outcome.keys.is_empty() {
            if finished {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    report(&out, &["CLAIMS", &claims.to_string()]);
}

async fn uploader(store: &SqliteStore) {
    let out = Mutex::new(());
    for n in 0..UPLOADS {
        let d = device(n % DEVICES);
        let keys: Vec<_> = (0..KEYS_PER_UPLOAD)
            .map(|j| key(&format!("up{n}-{j}")))
            .collect();
        let upload = Upload::from_keys(d.clone(), keys.clone(), []).expect("upload");
        loop {
            match store.upload(&upload).await {
                Ok(_) => break,
                Err(e) if e.is_retryable() => continue,
                Err(e) => panic!("upload failed: {e}"),
            }
        }
        for (id, _) in &keys {
            report(&out, &["UP", d.device_id.as_str(), id.as_str()]);
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

const TEST: &str = "two_claimer_processes_and_an_uploader_share_one_file";

#[test]
fn two_claimer_processes_and_an_uploader_share_one_file() {
    if let Some(role) = keyclaim_testing::process::child_role() {
        return multi_process_child(&role);
    }
    let dir = keyclaim_testing::temp_dir();
    let db = dir.path().join("shared.sqlite");
    let done = dir.path().join("uploader-done");
    let rt = keyclaim_testing::runtime(2);

    // Every key that was ever stored: (device ID, key ID).
    let mut uploaded: BTreeSet<(String, String)> = BTreeSet::new();
    rt.block_on(async {
        let store = SqliteStore::open_with(&db, options()).await.unwrap();
        for i in 0..DEVICES {
            let keys: Vec<_> = (0..INITIAL_PER_DEVICE)
                .map(|j| key(&format!("init-{j}")))
                .collect();
            for (id, _) in &keys {
                uploaded.insert((device(i).device_id.to_string(), id.to_string()));
            }
            store
                .upload(&Upload::from_keys(device(i), keys, []).unwrap())
                .await
                .unwrap();
        }
    });

    let env = [
        (DB, db.display().to_string()),
        (DONE, done.display().to_string()),
    ];
    let mut claimers = Vec::new();
    for _ in 0..2 {
        let mut child = spawn_child(TEST, "claimer", &env);
        let out = collect_stdout(&mut child);
        claimers.push((child, out));
    }
    let mut up = spawn_child(TEST, "uploader", &env);
    let up_out = collect_stdout(&mut up);
    assert!(up.wait().unwrap().success(), "uploader failed");
    std::fs::write(&done, b"done").unwrap();
    for line in result_lines(&up_out.join().unwrap()) {
        assert_eq!(line[0], "UP");
        assert!(
            uploaded.insert((line[1].clone(), line[2].clone())),
            "uploaded twice"
        );
    }
    assert_eq!(
        uploaded.len(),
        DEVICES * INITIAL_PER_DEVICE + UPLOADS * KEYS_PER_UPLOAD
    );

    let mut claimed: BTreeSet<(String, String)> = BTreeSet::new();
    for (mut child, out) in claimers {
        assert!(child.wait().unwrap().success(), "claimer failed");
        let mut mine = 0;
        for line in result_lines(&out.join().unwrap()) {
            if line[0] == "CL" {
                let k = (line[1].clone(), line[2].clone());
                assert!(uploaded.contains(&k), "claimed a key never uploaded: {k:?}");
                assert!(claimed.insert(k.clone()), "issued twice: {k:?}");
                mine += 1;
            }
        }
        assert!(
            mine > 0,
            "each claimer got keys (they really ran concurrently)"
        );
    }

    rt.block_on(async {
        let store = SqliteStore::open_with(&db, options()).await.unwrap();
        let mut remaining: BTreeMap<String, u64> = BTreeMap::new();
        let mut stored: BTreeSet<(String, String)> = BTreeSet::new();
        for snap in store.export_devices(None, 1000).await.unwrap() {
            for otk in &snap.one_time_keys {
                let k = (snap.device.device_id.to_string(), otk.key_id.to_string());
                assert!(!claimed.contains(&k), "claimed key still stored: {k:?}");
                stored.insert(k);
                *remaining
                    .entry(snap.device.device_id.to_string())
                    .or_default() += 1;
            }
        }
        // None lost: every uploaded key was claimed exactly once or is still there.
        let accounted: BTreeSet<_> = claimed.union(&stored).cloned().collect();
        assert_eq!(accounted, uploaded, "keys lost or invented");
        // The claimers stopped only when the store was empty.
        assert!(stored.is_empty(), "{} keys left", stored.len());
        for i in 0..DEVICES {
            let d = device(i);
            let counts = store.otk_counts(&d).await.unwrap();
            assert_eq!(
                counts.get_str("signed_curve25519"),
                remaining.get(d.device_id.as_str()).copied().unwrap_or(0)
            );
        }
    });
    assert!(common::integrity_ok(&db));
}

const NOTIFY_TEST: &str = "a_claim_in_another_process_wakes_this_processs_subscribers";

/// R11.2: a claim made by another process on the same file reaches this
/// process's subscribers, naming the device.
#[test]
fn a_claim_in_another_process_wakes_this_processs_subscribers() {
    if keyclaim_testing::process::is_child("remote-claimer") {
        let db = PathBuf::from(std::env::var(DB).expect("db path"));
        keyclaim_testing::runtime(2).block_on(async move {
            let store = SqliteStore::open_with(&db, options()).await.expect("open");
            let target = ClaimTarget::one(device(1), Algorithm::signed_curve25519());
            let out = store.claim(&[target]).await.expect("claim");
            assert_eq!(out.keys.len(), 1);
        });
        return;
    }
    let dir = keyclaim_testing::temp_dir();
    let db = dir.path().join("notify.sqlite");
    let rt = keyclaim_testing::runtime(2);
    rt.block_on(async {
        let store = SqliteStore::open_with(&db, options()).await.unwrap();
        let keys = (0..3).map(|j| key(&format!("k{j}")));
        store
            .upload(&Upload::from_keys(device(1), keys, []).unwrap())
            .await
            .unwrap();
        let mut changes = store.subscribe();

        let mut child = spawn_child(
            NOTIFY_TEST,
            "remote-claimer",
            &[(DB, db.display().to_string())],
        );
        let out = collect_stdout(&mut child);
        let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap();
        assert!(status.success(), "the other process failed");
        drop(out.join());
        assert_eq!(store.otk_counts(&device(1)).await.unwrap().total(), 2);

        let heard = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match changes.recv().await {
                    Ok(event) if event.contains(&device(1)) => return,
                    Ok(_) => {}
                    Err(e) => panic!("subscription ended: {e}"),
                }
            }
        })
        .await;
        assert!(
            heard.is_ok(),
            "the other process's claim was not reported here"
        );
    });
}

const FAIRNESS_TEST: &str = "two_processes_with_64_claimers_each_both_make_progress";
const FAIR_DEVICES: usize = 128;
const FAIR_KEYS: usize = 1000;

/// The keys stored on the fairness measurement's devices.
async fn fair_total(store: &SqliteStore) -> u64 {
    let mut n = 0;
    for i in 0..FAIR_DEVICES {
        n += store.otk_counts(&device(i)).await.unwrap().total();
    }
    n
}

/// One process of the fairness measurement: 64 tasks claim one key of a
/// random device each, in a loop, for `KEYCLAIM_FAIRNESS_SECS`; reports its
/// successful claims, failed ones, keys and elapsed milliseconds.
fn fairness_child() {
    let db = PathBuf::from(std::env::var(DB).expect("db path"));
    let secs: u64 = std::env::var("KEYCLAIM_FAIRNESS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    keyclaim_testing::runtime(2).block_on(async move {
        let store =
            std::sync::Arc::new(SqliteStore::open_with(&db, options()).await.expect("open"));
        let start = Instant::now();
        let until = start + Duration::from_secs(secs);
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let store = std::sync::Arc::clone(&store);
                tokio::spawn(async move {
                    let (mut ok, mut failed, mut keys) = (0u64, 0u64, 0u64);
                    while Instant::now() < until {
                        let i = rand::rng().random_range(0..FAIR_DEVICES);
                        let target = ClaimTarget::one(device(i), Algorithm::signed_curve25519());
                        match store.claim(&[target]).await {
                            Ok(out) => {
                                ok += 1;
                                keys += out.keys.len() as u64;
                            }
                            Err(e) => {
                                failed += 1;
                                assert!(e.is_retryable(), "claim failed: {e}");
                            }
                        }
                    }
                    (ok, failed, keys)
                })
            })
            .collect();
        let (mut ok, mut failed, mut keys) = (0, 0, 0);
        for task in tasks {
            let (o, f, k) = task.await.expect("claimer task");
            (ok, failed, keys) = (ok + o, failed + f, keys + k);
        }
        let ms = start.elapsed().as_millis();
        report(
            &Mutex::new(()),
            &[
                "STATS",
                &ok.to_string(),
                &failed.to_string(),
                &keys.to_string(),
                &ms.to_string(),
            ],
        );
    });
}

/// Fairness across processes (R10.3): two processes with 64 claimers each
/// on one file. Both make progress, no key is issued twice (the keys
/// handed out add up to what left the store), and each prints its
/// throughput and error rate. Measure with a longer run:
/// `KEYCLAIM_FAIRNESS_SECS=10 cargo test -p keyclaim-sqlite --release --test
/// multiprocess two_processes -- --nocapture`.
#[test]
fn two_processes_with_64_claimers_each_both_make_progress() {
    if keyclaim_testing::process::is_child("fair-claimer") {
        return fairness_child();
    }
    let dir = keyclaim_testing::temp_dir();
    let db = dir.path().join("fair.sqlite");
    let rt = keyclaim_testing::runtime(2);
    let before = rt.block_on(async {
        let store = SqliteStore::open_with(&db, options()).await.unwrap();
        for i in 0..FAIR_DEVICES {
            let keys = (0..FAIR_KEYS).map(|j| key(&format!("f{j}")));
            store
                .upload(&Upload::from_keys(device(i), keys, []).unwrap())
                .await
                .unwrap();
        }
        fair_total(&store).await
    });
    let env = [(DB, db.display().to_string())];
    let children: Vec<_> = (0..2)
        .map(|_| {
            let mut child = spawn_child(FAIRNESS_TEST, "fair-claimer", &env);
            let out = collect_stdout(&mut child);
            (child, out)
        })
        .collect();
    let mut handed_out = 0;
    for (n, (mut child, out)) in children.into_iter().enumerate() {
        assert!(child.wait().unwrap().success(), "process {n} failed");
        let lines = result_lines(&out.join().unwrap());
        let stats = lines.iter().find(|l| l[0] == "STATS").expect("stats");
        let [ok, failed, keys, ms]: [u64; 4] =
            std::array::from_fn(|i| stats[i + 1].parse().unwrap());
        let secs = ms as f64 / 1000.0;
        eprintln!(
            "process {n}: {ok} claims ({:.0}/s), {failed} failed ({:.2}%), {keys} keys, {secs:.1} s",
            ok as f64 / secs,
            100.0 * failed as f64 / (ok + failed).max(1) as f64,
        );
        assert!(ok > 0, "process {n} starved");
        handed_out += keys;
    }
    let after = rt.block_on(async {
        let store = SqliteStore::open_with(&db, options()).await.unwrap();
        fair_total(&store).await
    });
    assert_eq!(before - after, handed_out, "keys handed out twice or lost");
    assert!(common::integrity_ok(&db));
}
