//! The claim combiner: claims of concurrent callers sharing statements.
//!
//! The deterministic cases hold the combiner's only slot with a claim that
//! waits for a key the test has locked, queue claims behind it one by one
//! (so their arrival order is known), and then release the lock: the queued
//! claims run as one batch. They check the answers of a batch (R4.2, R4.4,
//! R4.5, R11.1), a batch whose statement fails for one claim, claims
//! abandoned before their batch (R10.6), a device deleted while its batch
//! runs, the queue's bound (R10.6) and claims larger than a batch. The races
//! check combined claims against uploads, deletions and key resets of the
//! same devices, and callers cancelled at any point.

// Tests report failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keyclaim::{
    ClaimOutcome, ClaimTarget, ClaimedKey, Device, Error, KeyStore, Limits, ResetScope,
};
use keyclaim_conformance::fixtures::{alg, dev, numbered_otks, otks, put};
use keyclaim_postgres::{PostgresOptions, PostgresStore};
use keyclaim_testing::postgres::{unique_schema, with_server};

mod common;
use common::{blocked_by, raw};
use tokio::task::JoinHandle;

const SC: &str = "signed_curve25519";
/// How long a condition may take to come true before a case fails.
const DEADLINE: Duration = Duration::from_secs(30);

/// A store with `options` in a schema of its own (on the test server,
/// whose `fsync = off` is allowed).
async fn store_with(url: &str, options: PostgresOptions) -> Arc<PostgresStore> {
    let options = options
        .schema(unique_schema("kc_comb"))
        .allow_unsafe_server(true);
    Arc::new(
        PostgresStore::connect_with(url, options)
            .await
            .expect("connect"),
    )
}

/// A store whose combiner runs one batch at a time.
async fn one_slot(url: &str, options: PostgresOptions) -> Arc<PostgresStore> {
    store_with(url, options.pool_size(8).claim_batches_in_flight(1)).await
}

/// Waits until `done` holds, failing the case after [`DEADLINE`].
async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits until `locker`'s session blocks another one.
async fn wait_blocked(watcher: &tokio_postgres::Client, locker: &tokio_postgres::Client) {
    let pid: i32 = locker
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    wait_until("a session waits for the locker", async || {
        blocked_by(watcher, pid).await > 0
    })
    .await;
}

/// The combiner's only slot, held by a claim waiting for a key the test's
/// own transaction has locked.
struct Held {
    locker: tokio_postgres::Client,
    holder: JoinHandle<ClaimOutcome>,
    device: Device,
}

impl Held {
    async fn take(store: &Arc<PostgresStore>, url: &str) -> Held {
        let device = dev("@holder:example.org", "HOLDER");
        put(&**store, &device, otks(SC, &["H"]), Vec::new()).await;
        let (locker, watcher) = (raw(url).await, raw(url).await);
        locker.batch_execute("BEGIN").await.expect("begin");
        let locked = locker
            .execute(
                &format!(
                    "SELECT 1 FROM {}.otk WHERE device_id = 'HOLDER' FOR UPDATE",
                    store.schema()
                ),
                &[],
            )
            .await
            .expect("lock the holder's key");
        assert_eq!(locked, 1);
        let holder = {
            let (store, device) = (store.clone(), device.clone());
            tokio::spawn(async move {
                store
                    .claim(&[ClaimTarget::one(device, alg(SC))])
                    .await
                    .expect("the holder's claim")
            })
        };
        // The holder's claim skipped the locked key, came away short, and
        // now waits for it (R4.3), in the only slot.
        wait_blocked(&watcher, &locker).await;
        Held {
            locker,
            holder,
            device,
        }
    }

    /// Rolls the lock back: the holder gets its key and frees the slot.
    async fn release(self) {
        self.locker
            .batch_execute("ROLLBACK")
            .await
            .expect("rollback");
        let got = self.holder.await.expect("holder task");
        assert_eq!(ids(&got.keys), [(format!("{SC}:H"), false)]);
        assert_eq!(got.changes.devices(), [self.device]);
    }
}

/// Starts `claim` and waits until it is queued behind the others, so that
/// claims queue in the order they are started.
async fn queue<T: Send + 'static>(
    store: &Arc<PostgresStore>,
    claim: impl Future<Output = T> + Send + 'static,
) -> JoinHandle<T> {
    let before = store.pool_status().claims_queued;
    let task = tokio::spawn(claim);
    wait_until("the claim is queued", async || {
        store.pool_status().claims_queued > before
    })
    .await;
    task
}

fn ids(keys: &[ClaimedKey]) -> Vec<(String, bool)> {
    keys.iter()
        .map(|k| (k.key_id.to_string(), k.fallback))
        .collect()
}

fn target(device: &Device, count: u32) -> ClaimTarget {
    ClaimTarget {
        device: device.clone(),
        algorithm: alg(SC),
        count,
    }
}

/// Devices `@u<i>:example.org`/`D<i>` for each `i` of `range`, each given
/// `one_time` OTKs and the fallback key `FB`.
async fn devices_with(
    store: &PostgresStore,
    range: std::ops::Range<usize>,
    one_time: usize,
) -> Vec<Device> {
    let mut devices = Vec::new();
    for i in range {
        let d = dev(&format!("@u{i}:example.org"), &format!("D{i}"));
        put(
            store,
            &d,
            numbered_otks(SC, "K", one_time),
            otks(SC, &["FB"]),
        )
        .await;
        devices.push(d);
    }
    devices
}

/// Queues a claim of one key of each device, in order.
async fn queue_each(
    store: &Arc<PostgresStore>,
    devices: &[Device],
) -> Vec<JoinHandle<keyclaim::Result<ClaimOutcome>>> {
    let mut tasks = Vec::new();
    for d in devices {
        tasks.push(queue(store, claim_of(store, vec![target(d, 1)])).await);
    }
    tasks
}

/// Starts a claim of `targets`.
fn claim_of(
    store: &Arc<PostgresStore>,
    targets: Vec<ClaimTarget>,
) -> impl Future<Output = keyclaim::Result<ClaimOutcome>> + Send + 'static {
    let store = store.clone();
    async move { store.claim(&targets).await }
}

async fn count(store: &PostgresStore, device: &Device) -> u64 {
    store
        .otk_counts(device)
        .await
        .expect("counts")
        .get(&alg(SC))
}

/// One batch answers each claim as if the claims had run one after
/// another in arrival order: the oldest keys to the first (R4.2), the
/// available keys to one asking too many, the fallback key (marked used)
/// only to a claim that got no OTK (R4.4, R4.5), nothing to a one-time
/// claim (R12.1); each claim reports the devices it changed (R11.1).
#[test]
fn a_batch_answers_each_claim_in_arrival_order() {
    with_server(
        "combine::a_batch_answers_each_claim_in_arrival_order",
        |url| async move {
            let store = one_slot(&url, PostgresOptions::new()).await;
            let hot = dev("@hot:example.org", "HOT");
            let other = dev("@other:example.org", "OTHER");
            put(&*store, &hot, numbered_otks(SC, "K", 3), otks(SC, &["FB"])).await;
            put(&*store, &hot, numbered_otks(SC, "L", 3), Vec::new()).await;
            put(&*store, &other, otks(SC, &["O"]), Vec::new()).await;
            let held = Held::take(&store, &url).await;
            let a = queue(
                &store,
                claim_of(&store, vec![target(&hot, 2), target(&other, 1)]),
            )
            .await;
            let b = queue(&store, claim_of(&store, vec![target(&hot, 1)])).await;
            // The same device twice in one claim: one after the other.
            let c = queue(
                &store,
                claim_of(&store, vec![target(&hot, 1), target(&hot, 1)]),
            )
            .await;
            let d = queue(&store, claim_of(&store, vec![target(&hot, 3)])).await;
            let e = queue(&store, claim_of(&store, vec![target(&hot, 1)])).await;
            let f = {
                let (store2, hot) = (store.clone(), hot.clone());
                queue(&store, async move {
                    store2.claim_one_time_keys(&[target(&hot, 1)]).await
                })
                .await
            };
            let g = queue(&store, claim_of(&store, vec![target(&hot, 1)])).await;
            held.release().await;
            let k = |name: &str| (format!("{SC}:{name}"), false);
            let fb = (format!("{SC}:FB"), true);
            let a = a.await.unwrap().expect("a");
            assert_eq!(ids(&a.keys), [k("K000000"), k("K000001"), k("O")]);
            assert_eq!(a.changes.devices(), [hot.clone(), other.clone()]);
            let b = b.await.unwrap().expect("b");
            assert_eq!(ids(&b.keys), [k("K000002")]);
            assert_eq!(b.changes.devices(), std::slice::from_ref(&hot));
            let c = c.await.unwrap().expect("c");
            assert_eq!(ids(&c.keys), [k("L000000"), k("L000001")]);
            let d = d.await.unwrap().expect("d");
            assert_eq!(ids(&d.keys), [k("L000002")], "the keys left, no fallback");
            assert_eq!(d.changes.devices(), std::slice::from_ref(&hot));
            let e = e.await.unwrap().expect("e");
            assert_eq!(ids(&e.keys), std::slice::from_ref(&fb));
            assert_eq!(
                e.changes.devices(),
                std::slice::from_ref(&hot),
                "it marked the key used"
            );
            let f = f.await.unwrap().expect("f");
            assert!(f.keys.is_empty());
            assert_eq!(f.misses, [target(&hot, 1)]);
            assert!(f.changes.is_empty());
            let g = g.await.unwrap().expect("g");
            assert_eq!(ids(&g.keys), [fb]);
            assert!(g.changes.is_empty(), "the key was used already");
            assert_eq!(count(&store, &hot).await, 0);
            assert!(store.unused_fallback_types(&hot).await.unwrap().is_empty());
        },
    );
}

/// A batch whose statement fails (an injected failure when one claim's key
/// is deleted) runs its claims again one by one: the others get their keys,
/// only that claim fails, and its key stays stored.
#[test]
fn a_failing_batch_fails_only_the_claim_that_fails() {
    with_server(
        "combine::a_failing_batch_fails_only_the_claim_that_fails",
        |url| async move {
            let store = one_slot(&url, PostgresOptions::new()).await;
            let schema = store.schema().to_owned();
            let raw = raw(&url).await;
            raw.batch_execute(&format!(
                "CREATE FUNCTION {schema}.poison() RETURNS trigger LANGUAGE plpgsql AS
                   $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$;
                 CREATE TRIGGER poison BEFORE DELETE ON {schema}.otk FOR EACH ROW
                   WHEN (OLD.device_id = 'D1') EXECUTE FUNCTION {schema}.poison();"
            ))
            .await
            .expect("the injected failure");
            let devices = devices_with(&store, 0..3, 1).await;
            let held = Held::take(&store, &url).await;
            let tasks = queue_each(&store, &devices).await;
            held.release().await;
            let mut answers = Vec::new();
            for t in tasks {
                answers.push(t.await.unwrap());
            }
            for (d, answer) in devices.iter().zip(&answers) {
                if d.device_id.as_str() == "D1" {
                    let e = answer.as_ref().expect_err("the poisoned claim fails");
                    assert!(
                        matches!(e, Error::Storage { .. })
                            && !e.is_retryable()
                            && format!("{e:?}").contains("injected failure"),
                        "{e:?}"
                    );
                    assert_eq!(count(&store, d).await, 1, "its key stays stored");
                    assert_eq!(store.unused_fallback_types(d).await.unwrap(), [alg(SC)]);
                } else {
                    let got = answer.as_ref().expect("the others succeed");
                    assert_eq!(ids(&got.keys), [(format!("{SC}:K000000"), false)]);
                    assert_eq!(count(&store, d).await, 0);
                }
            }
        },
    );
}

/// Claims whose callers went away while they waited for their batch are
/// not applied (R10.6): their keys stay stored, their fallback keys unused;
/// the other claims of the batch are answered.
#[test]
fn claims_abandoned_before_their_batch_are_not_applied() {
    with_server(
        "combine::claims_abandoned_before_their_batch_are_not_applied",
        |url| async move {
            let store = one_slot(&url, PostgresOptions::new()).await;
            let devices = devices_with(&store, 0..6, 1).await;
            let held = Held::take(&store, &url).await;
            let tasks = queue_each(&store, &devices).await;
            let mut kept = Vec::new();
            for (i, task) in tasks.into_iter().enumerate() {
                if i % 2 == 1 {
                    task.abort();
                    let e = task.await.expect_err("aborted");
                    assert!(e.is_cancelled(), "task {i}: {e}");
                } else {
                    kept.push((i, task));
                }
            }
            assert_eq!(
                store.pool_status().claims_queued,
                6,
                "abandoned, still queued"
            );
            held.release().await;
            let mut answered = Vec::new();
            for (i, task) in kept {
                answered.push((i, task.await.unwrap().expect("claim")));
            }
            // Every claim has left the queue once the batch is done.
            assert_eq!(store.pool_status().claims_queued, 0);
            assert_eq!(
                answered.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
                [0, 2, 4]
            );
            // A claim that runs after the batch proves it done.
            let after = store.claim(&[target(&devices[0], 1)]).await.unwrap();
            assert_eq!(ids(&after.keys), [(format!("{SC}:FB"), true)]);
            for (i, d) in devices.iter().enumerate().skip(1) {
                let kept = u64::from(i % 2 == 1);
                assert_eq!(count(&store, d).await, kept, "device {i}");
                let unused = store.unused_fallback_types(d).await.unwrap();
                assert_eq!(unused, [alg(SC)], "device {i}");
            }
        },
    );
}

/// A batch meeting a device whose deletion is under way (its keys locked
/// by the deleting transaction) waits for the deletion (R4.3), then hands
/// out none of that device's OTKs, and the other claims of the batch their
/// keys.
#[test]
fn a_device_deleted_while_its_batch_runs() {
    with_server(
        "combine::a_device_deleted_while_its_batch_runs",
        |url| async move {
            let store = one_slot(&url, PostgresOptions::new()).await;
            let schema = store.schema().to_owned();
            let devices = devices_with(&store, 1..4, 2).await;
            let held = Held::take(&store, &url).await;
            let tasks = queue_each(&store, &devices).await;
            // A deletion of D2, as delete_device makes it, left open.
            let (deleter, watcher) = (raw(&url).await, raw(&url).await);
            deleter
                .batch_execute(&format!(
                    "BEGIN;
                     DELETE FROM {schema}.otk WHERE user_id = '@u2:example.org' AND device_id = 'D2';
                     DELETE FROM {schema}.fallback WHERE user_id = '@u2:example.org' AND device_id = 'D2';
                     DELETE FROM {schema}.issued WHERE user_id = '@u2:example.org' AND device_id = 'D2';"
                ))
                .await
                .expect("the open deletion");
            held.release().await;
            // The batch found D2's keys locked and now waits for them.
            wait_blocked(&watcher, &deleter).await;
            deleter.batch_execute("COMMIT").await.expect("commit");
            let mut answers = Vec::new();
            for t in tasks {
                answers.push(t.await.unwrap().expect("claims succeed"));
            }
            assert_eq!(ids(&answers[0].keys), [(format!("{SC}:K000000"), false)]);
            assert_eq!(ids(&answers[2].keys), [(format!("{SC}:K000000"), false)]);
            assert!(
                answers[1].keys.iter().all(|k| k.fallback),
                "no OTK of the deleted device: {:?}",
                answers[1].keys
            );
            assert_eq!(count(&store, &devices[1]).await, 0);
            assert_eq!(count(&store, &devices[0]).await, 1);
            assert_eq!(count(&store, &devices[2]).await, 1);
        },
    );
}

/// Past the queue's bound a claim fails at once with a retryable error
/// (R10.6); a claim larger than a batch does not queue: it runs at once
/// while the slot is held.
#[test]
fn the_queue_is_bounded_and_large_claims_go_alone() {
    with_server(
        "combine::the_queue_is_bounded_and_large_claims_go_alone",
        |url| async move {
            let options = PostgresOptions::new()
                .claim_queue_limit(2)
                .claim_batch_targets(3);
            let store = one_slot(&url, options).await;
            let devices = devices_with(&store, 0..6, 1).await;
            let held = Held::take(&store, &url).await;
            let queued = queue_each(&store, &devices[..2]).await;
            let refused = store
                .claim(&[target(&devices[2], 1)])
                .await
                .expect_err("the queue is full");
            assert!(refused.is_retryable(), "{refused}");
            assert_eq!(count(&store, &devices[2]).await, 1);
            // Four targets, more than a batch: it runs now.
            let large: Vec<ClaimTarget> = devices[2..].iter().map(|d| target(d, 1)).collect();
            let got = store.claim(&large).await.expect("the large claim");
            assert_eq!(got.keys.len(), 4);
            assert_eq!(store.pool_status().claims_queued, 2);
            held.release().await;
            for t in queued {
                assert_eq!(t.await.unwrap().expect("queued claim").keys.len(), 1);
            }
        },
    );
}

/// Combined claims of a few devices racing uploads, deletions and key
/// resets of the same devices: no key is handed out twice, every key
/// handed out was uploaded to its device, claims fail only with retryable
/// errors (a deadlock with a deletion), and the store stays sound.
#[test]
fn combined_claims_racing_uploads_deletions_and_resets() {
    with_server(
        "combine::combined_claims_racing_uploads_deletions_and_resets",
        |url| async move {
            let mut limits = Limits::default();
            limits.max_otks_per_device_algorithm = 10_000;
            let options = PostgresOptions::new()
                .schema(unique_schema("kc_comb"))
                .pool_size(8)
                .claim_batches_in_flight(2)
                .allow_unsafe_server(true)
                .limits(limits);
            let store = Arc::new(PostgresStore::connect_with(&url, options).await.unwrap());
            let devices = devices_with(&store, 0..4, 0).await;
            let stop = Arc::new(AtomicBool::new(false));
            let mut claimers = Vec::new();
            for c in 0..32usize {
                let (store, devices, stop) = (store.clone(), devices.clone(), stop.clone());
                claimers.push(tokio::spawn(async move {
                    let mut answers: Vec<Vec<ClaimedKey>> = Vec::new();
                    let mut retryable = 0;
                    let mut i = c;
                    while !stop.load(Ordering::SeqCst) {
                        let targets = vec![
                            target(&devices[i % 4], 1 + (i % 3) as u32),
                            target(&devices[(i / 4) % 4], 1),
                        ];
                        match store.claim(&targets).await {
                            Ok(out) => answers.push(out.keys),
                            Err(e) if e.is_retryable() => retryable += 1,
                            Err(e) => panic!("claim failed: {e}"),
                        }
                        i += 7;
                    }
                    (answers, retryable)
                }));
            }
            let mut uploaded: BTreeSet<(Device, String)> = BTreeSet::new();
            for round in 0..60usize {
                let d = &devices[round % 4];
                let keys = numbered_otks(SC, &format!("R{round}-"), 40);
                uploaded.extend(keys.iter().map(|(id, _)| (d.clone(), id.to_string())));
                put(&*store, d, keys, otks(SC, &[&format!("FB{round}")])).await;
                let other = &devices[(round + 1) % 4];
                let outcome = match round % 3 {
                    0 => store.delete_device(other).await.map(|_| ()),
                    1 => store
                        .reset_one_time_keys(other, &ResetScope::All)
                        .await
                        .map(|_| ()),
                    _ => store.otk_counts(other).await.map(|_| ()),
                };
                if let Err(e) = outcome {
                    assert!(e.is_retryable(), "{e}");
                }
            }
            stop.store(true, Ordering::SeqCst);
            let mut issued: BTreeSet<(Device, String)> = BTreeSet::new();
            let mut claims = 0;
            for t in claimers {
                let (answers, _retryable) = t.await.unwrap();
                claims += answers.len();
                for key in answers.into_iter().flatten().filter(|k| !k.fallback) {
                    let id = (key.device.clone(), key.key_id.to_string());
                    assert!(uploaded.contains(&id), "{id:?} was never uploaded");
                    assert!(issued.insert(id.clone()), "{id:?} handed out twice");
                }
            }
            assert!(claims > 0 && !issued.is_empty());
            let report = keyclaim::transfer::check_store(&*store, 100).await.unwrap();
            assert!(report.problems.is_empty(), "{:?}", report.problems);
        },
    );
}

/// Claimers cancelled at any point of their claim: no key is handed out
/// twice and none is lost (every key is still stored or remembered as
/// issued), a key is used up only by a claim that was answered or whose
/// batch had started, and a claimer that was never cancelled never came
/// away short while keys remained.
#[test]
fn claimers_cancelled_mid_batch_lose_no_key() {
    with_server(
        "combine::claimers_cancelled_mid_batch_lose_no_key",
        |url| async move {
            let options = PostgresOptions::new()
                .schema(unique_schema("kc_comb"))
                .pool_size(8)
                .claim_batches_in_flight(2)
                .allow_unsafe_server(true);
            let store = Arc::new(PostgresStore::connect_with(&url, options).await.unwrap());
            let hot = dev("@hot:example.org", "HOT");
            let all: BTreeSet<String> = (0..5)
                .flat_map(|chunk| {
                    let keys = numbered_otks(SC, &format!("C{chunk}-"), 100);
                    keys.into_iter()
                        .map(|(id, _)| id.to_string())
                        .collect::<Vec<_>>()
                })
                .collect();
            for chunk in 0..5 {
                let keys = numbered_otks(SC, &format!("C{chunk}-"), 100);
                put(&*store, &hot, keys, otks(SC, &["FB"])).await;
            }
            let mut tasks = Vec::new();
            for i in 0..200usize {
                let (store, hot) = (store.clone(), hot.clone());
                tasks.push(tokio::spawn(async move {
                    let count = 1 + (i % 2);
                    (count, store.claim(&[target(&hot, count as u32)]).await)
                }));
                if i % 3 == 0 {
                    // Cancel an earlier claimer, wherever it is.
                    tokio::task::yield_now().await;
                    tasks[i / 2].abort();
                }
            }
            let mut answered: BTreeSet<String> = BTreeSet::new();
            let mut cancelled = 0;
            for t in tasks {
                match t.await {
                    Ok((count, out)) => {
                        let keys = out.expect("claim").keys;
                        assert_eq!(keys.len(), count, "short while keys remained");
                        for key in keys {
                            assert!(!key.fallback, "a fallback key while OTKs remained");
                            assert!(answered.insert(key.key_id.to_string()), "twice");
                        }
                    }
                    Err(e) => {
                        assert!(e.is_cancelled());
                        cancelled += 1;
                    }
                }
            }
            // Claims whose callers were cancelled after their batch started
            // may still be running: read both tables in one snapshot.
            let schema = store.schema().to_owned();
            let raw = raw(&url).await;
            let (mut stored, mut issued) = (BTreeSet::new(), BTreeSet::new());
            let rows = raw
                .query(
                    &format!(
                        "SELECT true, key_id FROM {schema}.otk
                         UNION ALL SELECT false, key_id FROM {schema}.issued"
                    ),
                    &[],
                )
                .await
                .unwrap();
            for row in rows {
                let key_id: String = row.get(1);
                if row.get::<_, bool>(0) {
                    stored.insert(key_id);
                } else {
                    issued.insert(key_id);
                }
            }
            assert!(stored.is_disjoint(&issued));
            assert_eq!(&stored | &issued, all);
            assert!(answered.is_subset(&issued));
            // Keys used up for cancelled claimers: at most 2 per claimer.
            assert!(issued.len() - answered.len() <= 2 * cancelled);
            assert!(cancelled > 0, "some claimer was cancelled");
        },
    );
}

/// R4.7: a claim of more targets than a batch holds takes the connection
/// kept for large claims. Every other connection of the store's pool is
/// held by an upload waiting for its device's lock (held by the test), and
/// another upload waits for a connection: the large claim still runs at
/// once, and the uploads go on once the lock is released.
#[test]
fn a_large_claim_does_not_queue_behind_other_operations_for_a_connection() {
    with_server("combine::large_claim_connection", |url| async move {
        let store = two_connections(
            &url,
            PostgresOptions::new()
                .claim_batch_targets(2)
                .pool_wait_timeout(Duration::from_secs(120)),
        )
        .await;
        let devices = devices_with(&store, 0..3, 1).await;
        let busy = dev("@busy:example.org", "B");
        let locker = lock_device(&url, &store, &busy).await;
        let uploads: Vec<_> = (0..2)
            .map(|i| spawn_upload(&store, &busy, &format!("U{i}_")))
            .collect();
        let watcher = raw(&url).await;
        wait_blocked(&watcher, &locker).await;

        let targets: Vec<ClaimTarget> = devices.iter().map(|d| target(d, 1)).collect();
        let outcome = tokio::time::timeout(DEADLINE, store.claim(&targets))
            .await
            .expect("the large claim ran while the other operations held or waited for connections")
            .expect("claim");
        let mut claimed: Vec<String> = outcome
            .keys
            .iter()
            .map(|k| k.device.device_id.to_string())
            .collect();
        claimed.sort();
        assert_eq!(claimed, ["D0", "D1", "D2"]);
        assert!(uploads.iter().all(|u| !u.is_finished()));

        locker.batch_execute("COMMIT").await.expect("commit");
        for u in uploads {
            tokio::time::timeout(DEADLINE, u)
                .await
                .expect("the uploads finish once the lock is free")
                .expect("upload task");
        }
        assert_eq!(count(&store, &busy).await, 4);
    });
}

/// While no large claim runs, a claim that finds every other connection
/// taken runs on the one kept for large claims: the store's pool has two
/// connections, an upload waiting for its device's lock (held by the test)
/// holds the other, and a claim of another device still runs at once;
/// a count read, not a claim, still waits for its turn.
#[test]
fn a_claim_runs_on_the_connection_kept_for_large_claims_while_none_runs() {
    with_server("combine::claim_borrows_kept_connection", |url| async move {
        let store = two_connections(
            &url,
            PostgresOptions::new().pool_wait_timeout(Duration::from_millis(300)),
        )
        .await;
        let [free] = <[Device; 1]>::try_from(devices_with(&store, 0..1, 2).await).expect("one");
        let busy = dev("@busy:example.org", "B");
        let (locker, upload) = upload_held_by_lock(&url, &store, &busy).await;

        let outcome = tokio::time::timeout(DEADLINE, store.claim(&[target(&free, 1)]))
            .await
            .expect("the claim ran while the upload held the other connection")
            .expect("claim");
        assert_eq!(outcome.keys.len(), 1);
        assert!(!outcome.keys[0].fallback);
        let err = store
            .otk_counts(&free)
            .await
            .expect_err("a count read waits for the upload's turn");
        assert!(err.is_retryable(), "{err}");
        assert!(!upload.is_finished());

        release(&locker, upload).await;
        assert_eq!(count(&store, &free).await, 1);
        assert_eq!(count(&store, &busy).await, 2);
    });
}

/// R10.6: an operation waiting for a connection (one of the pool's less
/// the one kept for large claims) waits at most `pool_wait_timeout`, then
/// fails with a retryable error, while the kept connection stays free.
#[test]
fn an_operation_waits_for_a_connection_at_most_the_pool_wait_timeout() {
    with_server("combine::connection_wait", |url| async move {
        let store = two_connections(
            &url,
            PostgresOptions::new().pool_wait_timeout(Duration::from_millis(300)),
        )
        .await;
        let [d] = <[Device; 1]>::try_from(devices_with(&store, 0..1, 1).await).expect("one");
        let (locker, upload) = upload_held_by_lock(&url, &store, &d).await;

        let err = store
            .otk_counts(&d)
            .await
            .expect_err("no connection for a count read while the upload holds the only one");
        assert!(err.is_retryable(), "{err}");

        release(&locker, upload).await;
        assert_eq!(count(&store, &d).await, 3);
    });
}

/// An upload of two OTKs to `device` in a task of its own, waiting for the
/// device's lock, which the returned transaction of the test's holds: the
/// upload holds its pooled connection meanwhile.
async fn upload_held_by_lock(
    url: &str,
    store: &Arc<PostgresStore>,
    device: &Device,
) -> (tokio_postgres::Client, JoinHandle<()>) {
    let locker = lock_device(url, store, device).await;
    let upload = spawn_upload(store, device, "U");
    let watcher = raw(url).await;
    wait_blocked(&watcher, &locker).await;
    (locker, upload)
}

/// Releases the lock of [`upload_held_by_lock`] and waits for its upload.
async fn release(locker: &tokio_postgres::Client, upload: JoinHandle<()>) {
    locker.batch_execute("COMMIT").await.expect("commit");
    tokio::time::timeout(DEADLINE, upload)
        .await
        .expect("the upload finishes once the lock is free")
        .expect("upload task");
}

/// Uploads two OTKs named `prefix<j>` to `device` in a task of its own.
fn spawn_upload(store: &Arc<PostgresStore>, device: &Device, prefix: &str) -> JoinHandle<()> {
    let (store, device, keys) = (store.clone(), device.clone(), numbered_otks(SC, prefix, 2));
    tokio::spawn(async move {
        put(&*store, &device, keys, vec![]).await;
    })
}

/// A store with `options` and a pool of two connections, one of them kept
/// for large claims.
async fn two_connections(url: &str, options: PostgresOptions) -> Arc<PostgresStore> {
    store_with(url, options.pool_size(2)).await
}

/// A transaction of the test's own holding `device`'s lock in `store`'s
/// schema, so that the store's uploads of it wait (holding their
/// connections).
async fn lock_device(url: &str, store: &PostgresStore, device: &Device) -> tokio_postgres::Client {
    let locker = raw(url).await;
    locker.batch_execute("BEGIN").await.expect("begin");
    locker
        .query(
            "SELECT pg_advisory_xact_lock(hashtextextended(
                 'keyclaim/' || $1::text || '/' || $2::text || '/' || $3::text, 1))",
            &[
                &store.schema(),
                &device.user_id.as_str(),
                &device.device_id.as_str(),
            ],
        )
        .await
        .expect("the device's lock");
    locker
}
