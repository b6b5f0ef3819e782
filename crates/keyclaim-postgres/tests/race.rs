//! Races across connections in two pools (two workers): many claimers on
//! one hot device (no key handed out twice, nobody short while keys remain:
//! R4.2, R4.3); a device replacement racing the claims of the previous
//! device (R14.1 with R4.2); fallback claims racing the upload that
//! replaces the fallback key (R12.2: the key answered is the key marked);
//! claims meeting keys locked by transactions that roll back (R4.3); claims
//! whose connections are killed (R4.2, R10.4).

// Tests report failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keyclaim::{ClaimTarget, ClaimedKey, Device, FallbackTarget, KeyStore, Limits};
use keyclaim_conformance::fixtures::{alg, dev, numbered_otks, otks, put, upload_of};
use keyclaim_postgres::{PostgresOptions, PostgresStore};
use keyclaim_testing::postgres::{unique_schema, with_server};

mod common;
use common::{blocked_by, raw, with_param};
use tokio::sync::Barrier;

const SC: &str = "signed_curve25519";
/// Concurrent claimers, spread over both workers.
const CLAIMERS: usize = 64;
/// Connections per worker's pool: 2 x 32 = all 64 claimers at once.
const POOL: usize = 32;

/// Two independent stores (own pools, own listeners) on one fresh schema.
async fn two_workers(url: &str) -> (Arc<PostgresStore>, Arc<PostgresStore>) {
    let mut limits = Limits::default();
    limits.max_otks_per_device_algorithm = 10_000;
    let options = PostgresOptions::new()
        .schema(unique_schema("kc_race"))
        .pool_size(POOL)
        .allow_unsafe_server(true)
        .limits(limits);
    let one = PostgresStore::connect_with(url, options.clone())
        .await
        .expect("worker 1");
    let two = PostgresStore::connect_with(url, options)
        .await
        .expect("worker 2");
    (Arc::new(one), Arc::new(two))
}

/// Fills `device` with `n` OTKs over several uploads (several sequence
/// values) and a fallback key.
async fn fill(store: &PostgresStore, device: &Device, round: usize, n: usize) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for chunk in 0..n.div_ceil(100) {
        let keys = numbered_otks(SC, &format!("R{round}C{chunk}-"), 100.min(n - chunk * 100));
        all.extend(keys.iter().map(|(id, _)| id.to_string()));
        put(store, device, keys, otks(SC, &["FB"])).await;
    }
    all
}

/// Runs `per_claimer[i]` claims on claimer `i`, all claimers released at
/// once; returns every claim's answer (with the count it asked for).
async fn claim_storm(
    workers: (&Arc<PostgresStore>, &Arc<PostgresStore>),
    per_claimer: Vec<Vec<Vec<ClaimTarget>>>,
) -> Vec<(Vec<ClaimTarget>, Vec<ClaimedKey>)> {
    let barrier = Arc::new(Barrier::new(per_claimer.len()));
    let mut tasks = Vec::new();
    for (i, claims) in per_claimer.into_iter().enumerate() {
        let store = if i % 2 == 0 {
            workers.0.clone()
        } else {
            workers.1.clone()
        };
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut out = Vec::new();
            for targets in claims {
                let got = store.claim(&targets).await.expect("claim succeeds");
                out.push((targets, got.keys));
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("claimer task"));
    }
    all
}

/// Checks that the hot device's OTKs went out exactly once each, every
/// claim got exactly what it asked of the hot device, and none got its
/// fallback key.
fn check_exact(
    hot: &Device,
    stored: &BTreeSet<String>,
    answers: &[(Vec<ClaimTarget>, Vec<ClaimedKey>)],
) {
    let mut issued = BTreeSet::new();
    let mut short = 0;
    for (targets, keys) in answers {
        let asked: u32 = targets
            .iter()
            .filter(|t| &t.device == hot)
            .map(|t| t.count)
            .sum();
        let got: Vec<&ClaimedKey> = keys.iter().filter(|k| &k.device == hot).collect();
        assert!(
            got.iter().all(|k| !k.fallback),
            "a claim got the fallback key while OTKs remained (under-issue)"
        );
        if got.len() != asked as usize {
            short += 1;
        }
        for k in got {
            assert!(
                issued.insert(k.key_id.to_string()),
                "{} handed out twice",
                k.key_id
            );
        }
    }
    assert_eq!(short, 0, "claims came away short while keys remained");
    assert_eq!(&issued, stored, "every key issued exactly once");
}

/// Fills `hot` with `per_claimer` keys per claimer, and has every claimer
/// claim `per_claimer` single keys of it: exactly as many claims as keys
/// (see [`check_exact`]).
async fn drain_exactly(
    workers: (&Arc<PostgresStore>, &Arc<PostgresStore>),
    hot: &Device,
    round: usize,
    per_claimer: usize,
) {
    let stored = fill(workers.0, hot, round, CLAIMERS * per_claimer).await;
    let plan = (0..CLAIMERS)
        .map(|_| {
            (0..per_claimer)
                .map(|_| vec![ClaimTarget::one(hot.clone(), alg(SC))])
                .collect()
        })
        .collect();
    let answers = claim_storm(workers, plan).await;
    check_exact(hot, &stored, &answers);
}

#[test]
fn hot_device_claims_across_two_pools() {
    with_server(
        "race::hot_device_claims_across_two_pools",
        |url| async move {
            let (one, two) = two_workers(&url).await;
            let hot = dev("@hot:example.org", "HOT");
            for round in 0..3 {
                drain_exactly((&one, &two), &hot, round, 10).await;
                // Now empty: the next claim gets the fallback key.
                let after = two
                    .claim(&[ClaimTarget::one(hot.clone(), alg(SC))])
                    .await
                    .expect("claim");
                assert!(after.keys.len() == 1 && after.keys[0].fallback);
                assert_eq!(one.otk_counts(&hot).await.expect("counts").get_str(SC), 0);
            }
        },
    );
}

#[test]
fn hot_device_claims_with_counts_and_other_targets() {
    with_server(
        "race::hot_device_claims_with_counts_and_other_targets",
        |url| async move {
            let (one, two) = two_workers(&url).await;
            let hot = dev("@hot:example.org", "HOT");
            // Counts 1..=5 that add up to exactly the stored number, each claim
            // also naming a cold device of its own.
            let mut plan: Vec<Vec<Vec<ClaimTarget>>> = vec![Vec::new(); CLAIMERS];
            let mut total = 0usize;
            for i in 0..CLAIMERS * 6 {
                let count = (i % 5) as u32 + 1;
                total += count as usize;
                let cold = dev(&format!("@cold{i}:example.org"), "COLD");
                plan[i % CLAIMERS].push(vec![
                    ClaimTarget::one(cold, alg(SC)),
                    ClaimTarget {
                        device: hot.clone(),
                        algorithm: alg(SC),
                        count,
                    },
                ]);
            }
            let stored = fill(&one, &hot, 0, total).await;
            let answers = claim_storm((&one, &two), plan).await;
            check_exact(&hot, &stored, &answers);
        },
    );
}

/// Claims of one device by `claimers` tasks, single-key claims (one-step
/// and, on odd claimers, OTK-only) until a claim answers nothing of the
/// device's OTKs once `stop` is set; counts the OTKs handed out in `issued`.
fn spawn_claimers(
    workers: (&Arc<PostgresStore>, &Arc<PostgresStore>),
    device: &Device,
    claimers: usize,
    issued: &Arc<AtomicUsize>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<ClaimedKey>>> {
    (0..claimers)
        .map(|i| {
            let store = if i % 2 == 0 {
                workers.0.clone()
            } else {
                workers.1.clone()
            };
            let (device, issued, stop) = (device.clone(), issued.clone(), stop.clone());
            tokio::spawn(async move {
                let target = [ClaimTarget::one(device, alg(SC))];
                let mut got = Vec::new();
                loop {
                    // Read before claiming: a claim that starts after the
                    // replacement committed finds no OTK of the device.
                    let stopping = stop.load(Ordering::SeqCst);
                    let keys = if i % 4 == 1 {
                        store
                            .claim_one_time_keys(&target)
                            .await
                            .expect("claim")
                            .keys
                    } else {
                        store.claim(&target).await.expect("claim").keys
                    };
                    let otks = keys.iter().filter(|k| !k.fallback).count();
                    issued.fetch_add(otks, Ordering::SeqCst);
                    got.extend(keys);
                    if otks == 0 && stopping {
                        return got;
                    }
                }
            })
        })
        .collect()
}

/// Replaces a device (by another device of the user, or by itself) while
/// 32 claimers claim its keys: no OTK is handed out twice, every key a
/// claim answered is one the previous device held (or, replacing a device
/// by itself, one of the upload), and nothing of the previous device is
/// left afterwards (its OTKs, fallback key and remembered issued keys).
async fn replace_racing_claims(url: String, same_device: bool) {
    let (one, two) = two_workers(&url).await;
    for round in 0..3 {
        let user = format!("@dehydrated{round}:example.org");
        let old = dev(&user, "OLD");
        let new = if same_device {
            old.clone()
        } else {
            dev(&user, "NEW")
        };
        let n = 3000;
        let mut held = fill(&one, &old, round, n).await;
        held.insert(format!("{SC}:FB"));
        let new_otks = numbered_otks(SC, &format!("NEW{round}-"), 50);
        let new_ids: BTreeSet<String> = new_otks.iter().map(|(id, _)| id.to_string()).collect();
        let upload = upload_of(&new, new_otks, otks(SC, &[&format!("NEWFB{round}")]));

        let issued = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let claimers = spawn_claimers((&one, &two), &old, 32, &issued, &stop);
        // Replace once the claims are under way (a condition, with a deadline).
        let deadline = Instant::now() + Duration::from_secs(60);
        while issued.load(Ordering::SeqCst) < 300 {
            assert!(Instant::now() < deadline, "claims did not get going");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let outcome = two
            .replace_device(Some(&old.device_id), &upload)
            .await
            .expect("replace");
        assert_eq!(outcome.counts.get_str(SC), 50);
        stop.store(true, Ordering::SeqCst);

        let mut seen = BTreeSet::new();
        let mut claimed_new = BTreeSet::new();
        for task in claimers {
            for key in task.await.expect("claimer") {
                let id = key.key_id.to_string();
                assert_eq!(key.device, old);
                if new_ids.contains(&id) || id == format!("{SC}:NEWFB{round}") {
                    assert!(same_device, "{id}: a key of the new device");
                    if !key.fallback {
                        claimed_new.insert(id.clone());
                    }
                } else {
                    assert!(held.contains(&id), "{id} was never the device's");
                }
                if !key.fallback {
                    assert!(seen.insert(id.clone()), "{id} handed out twice");
                }
            }
        }
        let claimed_old = seen.len() - claimed_new.len();
        assert!(
            claimed_old >= 300 && claimed_old < n,
            "the replacement cut into the claims ({claimed_old} of {n} claimed)"
        );

        // Nothing of the previous device is left; the new one holds the
        // upload (less what claims took of it when it is the same device).
        let snapshots = one.export_devices(None, 10).await.expect("export");
        let users: Vec<_> = snapshots
            .iter()
            .filter(|s| s.device.user_id == old.user_id)
            .collect();
        if !same_device {
            assert!(
                users.iter().all(|s| s.device != old),
                "the previous device is gone"
            );
        }
        let snapshot = users
            .iter()
            .find(|s| s.device == new)
            .expect("the new device");
        let stored: BTreeSet<String> = snapshot
            .one_time_keys
            .iter()
            .map(|k| k.key_id.to_string())
            .collect();
        let expected: BTreeSet<String> = new_ids.difference(&claimed_new).cloned().collect();
        assert_eq!(stored, expected, "the new device holds the upload");
        let fallback = &snapshot.fallback_keys[&alg(SC)];
        assert_eq!(fallback.key_id.to_string(), format!("{SC}:NEWFB{round}"));
        for key in snapshot.issued.values().flatten() {
            assert!(
                claimed_new.contains(&key.key_id.to_string()),
                "{}: remembered issued key of the previous device",
                key.key_id
            );
        }
        for key in &seen {
            assert!(!stored.contains(key), "{key} claimed but still stored");
        }
    }
}

#[test]
fn replace_device_racing_claims_of_the_previous_device() {
    with_server(
        "race::replace_device_racing_claims_of_the_previous_device",
        |url| replace_racing_claims(url, false),
    );
}

#[test]
fn replace_device_by_itself_racing_its_claims() {
    with_server("race::replace_device_by_itself_racing_its_claims", |url| {
        replace_racing_claims(url, true)
    });
}

/// Fallback claims that mark the key used (split and one-step claims of a
/// device without OTKs) race the upload replacing the key, on many
/// devices: the new key ends up used exactly when a claim answered it
/// (R12.2, R4.4, R5.1), and every claim answers the old or the new key.
#[test]
fn fallback_claims_racing_a_fallback_replacement() {
    with_server(
        "race::fallback_claims_racing_a_fallback_replacement",
        |url| async move {
            let (one, two) = two_workers(&url).await;
            let mut answered_new_somewhere = false;
            for run in 0..40 {
                let device = dev(&format!("@fb{run}:example.org"), "D");
                put(&one, &device, vec![], otks(SC, &["OLDFB"])).await;
                let barrier = Arc::new(Barrier::new(5));
                let upload = {
                    let (store, barrier) = (one.clone(), barrier.clone());
                    let upload = upload_of(&device, vec![], otks(SC, &["NEWFB"]));
                    tokio::spawn(async move {
                        barrier.wait().await;
                        store.upload(&upload).await.expect("upload");
                    })
                };
                let claims: Vec<_> = (0..4)
                    .map(|i| {
                        let store = if i % 2 == 0 { two.clone() } else { one.clone() };
                        let (barrier, device) = (barrier.clone(), device.clone());
                        tokio::spawn(async move {
                            barrier.wait().await;
                            if i < 2 {
                                let target = ClaimTarget::one(device, alg(SC));
                                return store.claim(&[target]).await.expect("claim").keys;
                            }
                            let target = FallbackTarget {
                                device,
                                algorithm: alg(SC),
                                mark_used: true,
                            };
                            store
                                .claim_fallback_keys(&[target])
                                .await
                                .expect("fallback claim")
                                .keys
                        })
                    })
                    .collect();
                upload.await.expect("uploader");
                let mut answered_new = false;
                for claim in claims {
                    let keys = claim.await.expect("claimer");
                    assert_eq!(keys.len(), 1, "one fallback key: {keys:?}");
                    let id = keys[0].key_id.to_string();
                    assert!(id == format!("{SC}:OLDFB") || id == format!("{SC}:NEWFB"));
                    answered_new |= id == format!("{SC}:NEWFB");
                }
                let stored = one.fallback_keys(&device).await.expect("fallback keys");
                let key = &stored[&alg(SC)];
                assert_eq!(key.key_id.to_string(), format!("{SC}:NEWFB"));
                assert_eq!(
                    key.used, answered_new,
                    "run {run}: the new key is used exactly when a claim answered it"
                );
                answered_new_somewhere |= answered_new;
            }
            assert!(answered_new_somewhere, "some claim ran after an upload");
        },
    );
}

/// Runs `claim` while `locker` holds a lock on OTK rows (taken by
/// `lock_sql`, in an open transaction), waits until the claim waits for
/// `locker` (as `watcher` sees it, outside that transaction: the activity
/// view is read once per transaction), then ends `locker`'s transaction
/// with `end` and returns the claim's keys.
async fn claim_while_locked<F>(
    (locker, watcher): (&tokio_postgres::Client, &tokio_postgres::Client),
    lock_sql: &str,
    end: &str,
    claim: F,
) -> Vec<ClaimedKey>
where
    F: std::future::Future<Output = Vec<ClaimedKey>> + Send + 'static,
{
    locker.batch_execute("BEGIN").await.expect("begin");
    let locked = locker.execute(lock_sql, &[]).await.expect("lock rows");
    assert!(locked > 0, "{lock_sql}: nothing locked");
    let pid: i32 = locker
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let task = tokio::spawn(claim);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if blocked_by(watcher, pid).await > 0 || task.is_finished() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the claim neither waited nor answered"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A claim that answered while the rows were locked answered without
    // waiting for them.
    let answered_early = task.is_finished();
    locker.batch_execute(end).await.expect("end the locker");
    let keys = task.await.expect("claim task");
    assert!(
        !answered_early || keys.iter().all(|k| !k.fallback),
        "the claim answered {keys:?} while a stored key was only locked"
    );
    keys
}

fn ids(keys: &[ClaimedKey]) -> Vec<(String, bool)> {
    keys.iter()
        .map(|k| (k.key_id.name().to_owned(), k.fallback))
        .collect()
}

/// R4.2 and R4.3 with the walks' lower bounds (see the claim module's
/// "Where the walks start"): keys of six uploads; a claim of two takes the
/// two oldest and reads the device's bound; the third oldest is locked by
/// another transaction while a claim of two skips it, takes the fourth and
/// fifth and reads the bound again; once that transaction rolls back, the
/// next claim gets the skipped key, the oldest, and not the sixth. A bound
/// raised past a skipped key would hide it.
#[test]
fn a_key_skipped_while_locked_is_still_the_next_one_claimed() {
    with_server(
        "race::a_key_skipped_while_locked_is_still_the_next_one_claimed",
        |url| async move {
            let (one, _two) = two_workers(&url).await;
            let schema = one.schema().to_owned();
            let locker = raw(&url).await;
            let a = dev("@a:x", "A");
            for key in ["K1", "K2", "K3", "K4", "K5", "K6"] {
                put(&one, &a, otks(SC, &[key]), vec![]).await;
            }
            let claim = |count: u32| {
                let (one, a) = (one.clone(), a.clone());
                async move {
                    let target = ClaimTarget {
                        device: a,
                        algorithm: alg(SC),
                        count,
                    };
                    ids(&one.claim(&[target]).await.expect("claim").keys)
                }
            };
            let key = |name: &str| (name.to_owned(), false);
            assert_eq!(claim(2).await, [key("K1"), key("K2")]);
            locker.batch_execute("BEGIN").await.expect("begin");
            locker
                .batch_execute(&format!(
                    "SELECT 1 FROM {schema}.otk WHERE key_id = '{SC}:K3' FOR UPDATE"
                ))
                .await
                .expect("lock K3");
            assert_eq!(claim(2).await, [key("K4"), key("K5")]);
            locker.batch_execute("ROLLBACK").await.expect("rollback");
            assert_eq!(claim(1).await, [key("K3")]);
            assert_eq!(claim(1).await, [key("K6")]);
        },
    );
}

/// R4.3 when a concurrent transaction that locked keys rolls back (a
/// failing claim, a cancelled deletion): a claim that finds the only keys
/// left locked waits for them, and gets them when the locker rolls back,
/// not the fallback key, nothing, or fewer keys; when the locker commits
/// their deletion instead, the claim falls back.
#[test]
fn a_claim_gets_the_keys_of_a_locker_that_rolls_back() {
    with_server(
        "race::a_claim_gets_the_keys_of_a_locker_that_rolls_back",
        |url| async move {
            let (one, _two) = two_workers(&url).await;
            let schema = one.schema().to_owned();
            let (locker, watcher) = (raw(&url).await, raw(&url).await);
            let sessions = (&locker, &watcher);
            let lock = |user: &str, keys: &str| {
                format!(
                    "SELECT 1 FROM {schema}.otk WHERE user_id = '{user}' AND key_id IN ({keys}) \
                     FOR UPDATE"
                )
            };

            // The device's only key, locked: the claim waits, then gets it.
            let a = dev("@a:x", "A");
            put(&one, &a, otks(SC, &["K1"]), otks(SC, &["F"])).await;
            let (store, target) = (one.clone(), ClaimTarget::one(a.clone(), alg(SC)));
            let keys = claim_while_locked(
                sessions,
                &lock("@a:x", &format!("'{SC}:K1'")),
                "ROLLBACK",
                async move { store.claim(&[target]).await.expect("claim").keys },
            )
            .await;
            assert_eq!(ids(&keys), [("K1".to_owned(), false)]);

            // Two keys, the older locked, a claim of two: both.
            let b = dev("@b:x", "B");
            put(&one, &b, otks(SC, &["K1"]), otks(SC, &["F"])).await;
            put(&one, &b, otks(SC, &["K2"]), vec![]).await;
            let store = one.clone();
            let target = ClaimTarget {
                device: b.clone(),
                algorithm: alg(SC),
                count: 2,
            };
            let keys = claim_while_locked(
                sessions,
                &lock("@b:x", &format!("'{SC}:K1'")),
                "ROLLBACK",
                async move { store.claim(&[target]).await.expect("claim").keys },
            )
            .await;
            assert_eq!(
                ids(&keys),
                [("K1".to_owned(), false), ("K2".to_owned(), false)]
            );

            // Two targets in one claim, one of them locked: both get their key.
            let c = dev("@c:x", "C");
            let d = dev("@d:x", "D");
            put(&one, &c, otks(SC, &["K1"]), otks(SC, &["F"])).await;
            put(&one, &d, otks(SC, &["K1"]), otks(SC, &["F"])).await;
            let store = one.clone();
            let targets = [
                ClaimTarget::one(d.clone(), alg(SC)),
                ClaimTarget::one(c.clone(), alg(SC)),
            ];
            let keys = claim_while_locked(
                sessions,
                &lock("@c:x", &format!("'{SC}:K1'")),
                "ROLLBACK",
                async move { store.claim(&targets).await.expect("claim").keys },
            )
            .await;
            assert_eq!(
                ids(&keys),
                [("K1".to_owned(), false), ("K1".to_owned(), false)]
            );
            assert_eq!((&keys[0].device, &keys[1].device), (&d, &c));

            // The split claim's one-time step (R12.1) waits too.
            let e = dev("@e:x", "E");
            put(&one, &e, otks(SC, &["K1"]), vec![]).await;
            let (store, target) = (one.clone(), ClaimTarget::one(e.clone(), alg(SC)));
            let keys = claim_while_locked(
                sessions,
                &lock("@e:x", &format!("'{SC}:K1'")),
                "ROLLBACK",
                async move {
                    store
                        .claim_one_time_keys(&[target])
                        .await
                        .expect("claim")
                        .keys
                },
            )
            .await;
            assert_eq!(ids(&keys), [("K1".to_owned(), false)]);

            // A locker that deletes the key and commits: the claim falls back.
            let f = dev("@f:x", "F");
            put(&one, &f, otks(SC, &["K1"]), otks(SC, &["F"])).await;
            let (store, target) = (one.clone(), ClaimTarget::one(f.clone(), alg(SC)));
            let keys = claim_while_locked(
                sessions,
                &format!("DELETE FROM {schema}.otk WHERE user_id = '@f:x'"),
                "COMMIT",
                async move { store.claim(&[target]).await.expect("claim").keys },
            )
            .await;
            assert_eq!(ids(&keys), [("F".to_owned(), true)]);

            // Nothing was left behind.
            for device in [&a, &b, &c, &d, &e, &f] {
                assert_eq!(one.otk_counts(device).await.expect("counts").get_str(SC), 0);
            }
        },
    );
}

/// R4.3 under claims that roll back: while 64 claimers take exactly as many
/// keys as a hot device holds, another session keeps locking the device's
/// oldest free keys and rolling back (as failing claims do). Every claim
/// still gets its key, none gets the fallback key, every key goes out once.
#[test]
fn hot_device_claims_racing_lockers_that_roll_back() {
    with_server(
        "race::hot_device_claims_racing_lockers_that_roll_back",
        |url| async move {
            let (one, two) = two_workers(&url).await;
            let hot = dev("@hot:example.org", "HOT");
            let schema = one.schema().to_owned();
            let stop = Arc::new(AtomicBool::new(false));
            let rollbacks = Arc::new(AtomicUsize::new(0));
            let lockers: Vec<_> = (0..2)
                .map(|_| {
                    let (url, schema, stop, rollbacks) =
                        (url.clone(), schema.clone(), stop.clone(), rollbacks.clone());
                    tokio::spawn(async move {
                        let locker = raw(&url).await;
                        let lock = format!(
                            "SELECT 1 FROM {schema}.otk WHERE user_id = '@hot:example.org' \
                             ORDER BY seq, key_id LIMIT 3 FOR UPDATE SKIP LOCKED"
                        );
                        while !stop.load(Ordering::SeqCst) {
                            locker.batch_execute("BEGIN").await.expect("begin");
                            locker.execute(&lock, &[]).await.expect("lock");
                            tokio::time::sleep(Duration::from_millis(2)).await;
                            locker.batch_execute("ROLLBACK").await.expect("rollback");
                            rollbacks.fetch_add(1, Ordering::SeqCst);
                        }
                    })
                })
                .collect();
            for round in 0..3 {
                drain_exactly((&one, &two), &hot, round, 5).await;
            }
            stop.store(true, Ordering::SeqCst);
            for locker in lockers {
                locker.await.expect("locker");
            }
            assert!(rollbacks.load(Ordering::SeqCst) > 0, "the lockers ran");
        },
    );
}

/// R4.2 and R10.4 with connections killed under load: while 32 claimers
/// drain four devices, another session keeps terminating the pools'
/// connections (`pg_terminate_backend`). Claims fail only with retryable
/// errors; no key is handed out twice; a key no answer delivered was
/// consumed by a claim that failed (it is in the issued memory, and there
/// are no more of them than the failed claims asked for); once the killing
/// stops, the pools recover and the claims drain the devices.
#[test]
fn claims_survive_their_connections_being_killed() {
    with_server(
        "race::claims_survive_their_connections_being_killed",
        |url| async move {
            let app = unique_schema("kc_kill");
            let store_url = with_param(&url, "application_name", &app);
            let mut limits = Limits::default();
            limits.max_otks_per_device_algorithm = 10_000;
            limits.remembered_issued_keys = 100_000;
            let options = PostgresOptions::new()
                .schema(unique_schema("kc_kill"))
                .pool_size(16)
                .allow_unsafe_server(true)
                .limits(limits);
            let one = Arc::new(
                PostgresStore::connect_with(&store_url, options.clone())
                    .await
                    .expect("worker 1"),
            );
            let two = Arc::new(
                PostgresStore::connect_with(&store_url, options)
                    .await
                    .expect("worker 2"),
            );
            let devices: Vec<Device> = (0..4)
                .map(|i| dev(&format!("@kill{i}:example.org"), "D"))
                .collect();
            let mut all = BTreeSet::new();
            for d in &devices {
                all.extend(
                    fill(&one, d, 0, 1500)
                        .await
                        .into_iter()
                        .map(|id| (d.clone(), id)),
                );
            }

            let killing = Arc::new(AtomicBool::new(true));
            let handed = Arc::new(AtomicUsize::new(0));
            let killer = {
                let (url, app, killing, handed) =
                    (url.clone(), app.clone(), killing.clone(), handed.clone());
                let total = all.len();
                tokio::spawn(async move {
                    let admin = raw(&url).await;
                    let mut killed = 0i64;
                    // Kill until half the keys went out, then let the pools recover.
                    while handed.load(Ordering::SeqCst) < total / 2 {
                        let n: i64 = admin
                            .query_one(
                                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                                 WHERE application_name = $1",
                                &[&app],
                            )
                            .await
                            .expect("terminate")
                            .get(0);
                        killed += n;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    killing.store(false, Ordering::SeqCst);
                    killed
                })
            };

            let claimers: Vec<_> = (0..32)
                .map(|i| {
                    let store = if i % 2 == 0 { one.clone() } else { two.clone() };
                    let (devices, handed) = (devices.clone(), handed.clone());
                    tokio::spawn(async move {
                        let mut got: Vec<ClaimedKey> = Vec::new();
                        let mut failed_asks = 0u32;
                        let mut errors = 0u32;
                        let mut round = i;
                        loop {
                            round += 1;
                            // One device, or two with two keys each.
                            let targets: Vec<ClaimTarget> = if round % 3 == 0 {
                                (0..2)
                                    .map(|k| ClaimTarget {
                                        device: devices[(round + k) % 4].clone(),
                                        algorithm: alg(SC),
                                        count: 2,
                                    })
                                    .collect()
                            } else {
                                vec![ClaimTarget::one(devices[round % 4].clone(), alg(SC))]
                            };
                            match store.claim(&targets).await {
                                Ok(out) => {
                                    let otks: Vec<ClaimedKey> =
                                        out.keys.into_iter().filter(|k| !k.fallback).collect();
                                    handed.fetch_add(otks.len(), Ordering::SeqCst);
                                    if otks.is_empty() && targets.len() == 1 {
                                        // Check that the other devices are empty too.
                                        let mut rest = 0;
                                        for d in &devices {
                                            rest += store
                                                .otk_counts(d)
                                                .await
                                                .map_or(1, |c| c.get_str(SC));
                                        }
                                        if rest == 0 {
                                            return (got, failed_asks, errors);
                                        }
                                    }
                                    got.extend(otks);
                                }
                                Err(e) => {
                                    assert!(e.is_retryable(), "a non-retryable error: {e:?}");
                                    errors += 1;
                                    failed_asks += targets.iter().map(|t| t.count).sum::<u32>();
                                }
                            }
                        }
                    })
                })
                .collect();

            let mut handed_out: BTreeSet<(Device, String)> = BTreeSet::new();
            let (mut failed_asks, mut errors) = (0u32, 0u32);
            for claimer in claimers {
                let (got, asks, errs) = tokio::time::timeout(Duration::from_secs(300), claimer)
                    .await
                    .expect("the claimers drain the devices within 300 s")
                    .expect("claimer");
                failed_asks += asks;
                errors += errs;
                for key in got {
                    let id = (key.device.clone(), key.key_id.to_string());
                    assert!(handed_out.insert(id.clone()), "{id:?} handed out twice");
                }
            }
            let killed = killer.await.expect("killer");
            assert!(!killing.load(Ordering::SeqCst));
            assert!(killed > 0, "no connection was killed");
            assert!(errors > 0, "no claim met a killed connection");

            // Every key is gone; the ones nobody received were consumed by
            // failed claims, which remembered them as issued.
            for d in &devices {
                assert_eq!(one.otk_counts(d).await.expect("counts").get_str(SC), 0);
            }
            assert!(handed_out.is_subset(&all));
            let lost: BTreeSet<_> = all.difference(&handed_out).cloned().collect();
            assert!(
                lost.len() <= failed_asks as usize,
                "{} keys lost, failed claims asked for {failed_asks}",
                lost.len()
            );
            let mut issued = BTreeSet::new();
            for snapshot in one.export_devices(None, 10).await.expect("export") {
                for key in snapshot.issued.values().flatten() {
                    issued.insert((snapshot.device.clone(), key.key_id.to_string()));
                }
            }
            for key in &lost {
                assert!(
                    issued.contains(key),
                    "{key:?} vanished: neither handed out nor issued"
                );
            }
            // The pools recovered and stay within their size.
            for store in [&one, &two] {
                let status = store.pool_status();
                assert!(status.size <= status.max_size, "{status:?}");
            }
            eprintln!(
                "killed {killed} connections; {errors} claims failed; {} keys consumed undelivered",
                lost.len()
            );
        },
    );
}
