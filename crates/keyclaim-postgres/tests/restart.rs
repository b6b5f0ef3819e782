//! The PostgreSQL server is stopped and started during a workload, twice
//! (a clean `fast` shutdown, then an `immediate` one, which the server
//! recovers from as from a crash): operations fail with retryable errors
//! while it is down and succeed afterwards, the pool recovers by itself,
//! no acknowledged write is lost and no key is handed out twice. Needs a
//! private cluster (it cannot stop a shared server).

// Tests report failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use keyclaim::{ClaimTarget, Error, KeyStore, Upload};
use keyclaim_conformance::fixtures::{alg, dev, kid, numbered_otks, put, signed};
use keyclaim_postgres::{PostgresOptions, PostgresStore};
use keyclaim_testing::postgres::Cluster;
use keyclaim_testing::wait_until;

const SC: &str = "signed_curve25519";
const PREFILL: usize = 1500;
/// The bound on each wait for the workload to get somewhere: generous, so
/// that only a workload that is stuck reaches it.
const WAIT: Duration = Duration::from_secs(30);

/// What a worker loop saw.
#[derive(Debug, Default)]
struct Tally {
    ok: AtomicUsize,
    retryable_errors: AtomicUsize,
}

fn check_error(what: &str, error: &Error, tally: &Tally) {
    assert!(
        error.is_retryable(),
        "{what} failed with a permanent error: {error:?}"
    );
    tally.retryable_errors.fetch_add(1, Ordering::Relaxed);
}

#[test]
fn server_restart_during_workload() {
    let Some(cluster) = keyclaim_testing::require(
        "restart::server_restart_during_workload (needs a private PostgreSQL cluster)",
        Cluster::start(true),
    ) else {
        return;
    };
    keyclaim_testing::runtime(4).block_on(run(&cluster));
}

async fn run(cluster: &Cluster) {
    let mut limits = keyclaim::Limits::default();
    limits.max_otks_per_device_algorithm = 5000;
    let options = PostgresOptions::new()
        .schema("kc_restart")
        .limits(limits)
        .pool_size(4)
        .connect_timeout(Duration::from_secs(2))
        .pool_wait_timeout(Duration::from_secs(2));
    let store = Arc::new(
        PostgresStore::connect_with(&cluster.url(), options.clone())
            .await
            .expect("connect"),
    );
    let other_worker = PostgresStore::connect_with(&cluster.url(), options.clone())
        .await
        .expect("connect a second worker");
    let (uploads_to, claims_from) = (dev("@up:x", "UP"), dev("@claim:x", "CL"));
    let mut prefill = BTreeSet::new();
    for chunk in 0..PREFILL / 100 {
        let keys = numbered_otks(SC, &format!("P{chunk}-"), 100);
        prefill.extend(keys.iter().map(|(id, _)| id.to_string()));
        put(&*store, &claims_from, keys, vec![]).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let upload_tally = Arc::new(Tally::default());
    let claim_tally = Arc::new(Tally::default());

    // Uploader: one new key per upload; a failed upload is retried until it
    // succeeds (a retry of a lost response must succeed, R3.2).
    let uploader = {
        let (store, stop, tally, device) = (
            store.clone(),
            stop.clone(),
            upload_tally.clone(),
            uploads_to.clone(),
        );
        tokio::spawn(async move {
            let mut acked = BTreeSet::new();
            let mut pending = None;
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let id = kid(&format!("{SC}:U{i:06}"));
                let upload = Upload::from_keys(
                    device.clone(),
                    [(id.clone(), signed(&format!("u{i}"), "s"))],
                    [],
                )
                .expect("upload");
                match store.upload(&upload).await {
                    Ok(_) => {
                        pending = None;
                        acked.insert(id.to_string());
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                    }
                    Err(e) => {
                        pending = Some(id.to_string());
                        check_error("upload", &e, &tally);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            (acked, pending)
        })
    };
    // Claimer: single-key claims from the prefilled device.
    let claimer = {
        let (store, stop, tally, device) = (
            store.clone(),
            stop.clone(),
            claim_tally.clone(),
            claims_from.clone(),
        );
        tokio::spawn(async move {
            let mut claimed = Vec::new();
            let mut failed = 0usize;
            while !stop.load(Ordering::Relaxed) {
                match store
                    .claim(&[ClaimTarget::one(device.clone(), alg(SC))])
                    .await
                {
                    Ok(out) => {
                        claimed.extend(out.keys.into_iter().map(|k| k.key_id.to_string()));
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(e) => {
                        check_error("claim", &e, &tally);
                        failed += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            (claimed, failed)
        })
    };

    // Both loops succeed again after `(up_ok, cl_ok)` successes.
    let both_succeed = |(up_ok, cl_ok): (usize, usize)| {
        upload_tally.ok.load(Ordering::Relaxed) > up_ok
            && claim_tally.ok.load(Ordering::Relaxed) > cl_ok
    };
    let oks = || {
        (
            upload_tally.ok.load(Ordering::Relaxed),
            claim_tally.ok.load(Ordering::Relaxed),
        )
    };
    for fast in [true, false] {
        let before = oks();
        wait_until("the workload runs before the stop", WAIT, || {
            both_succeed(before)
        })
        .await;
        let (up_err, cl_err) = (
            upload_tally.retryable_errors.load(Ordering::Relaxed),
            claim_tally.retryable_errors.load(Ordering::Relaxed),
        );
        cluster.stop(fast).expect("stop the server");
        // While it is down every operation fails, retryably.
        let counts = store.otk_counts(&uploads_to).await;
        assert!(
            counts.as_ref().is_err_and(Error::is_retryable),
            "read while down: {counts:?}"
        );
        wait_until("uploads and claims fail while down", WAIT, || {
            upload_tally.retryable_errors.load(Ordering::Relaxed) > up_err
                && claim_tally.retryable_errors.load(Ordering::Relaxed) > cl_err
        })
        .await;
        let down = oks();
        cluster.start_server().expect("start the server again");
        // And succeed again once it is back, through the same pool.
        wait_until("the store recovers after the restart", WAIT, || {
            both_succeed(down)
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    let (acked, pending) = uploader.await.expect("uploader");
    let (claimed, failed_claims) = claimer.await.expect("claimer");

    // No acknowledged upload lost: the device holds exactly the acked keys.
    let exported = store.export_devices(None, 10).await.expect("export");
    let mut held: BTreeSet<String> = exported
        .iter()
        .find(|s| s.device == uploads_to)
        .map(|s| {
            s.one_time_keys
                .iter()
                .map(|k| k.key_id.to_string())
                .collect()
        })
        .unwrap_or_default();
    // An upload that failed and was not retried before the stop may or may
    // not have committed.
    if let Some(pending) = pending {
        held.remove(&pending);
    }
    assert_eq!(held, acked, "acknowledged uploads survive the restarts");

    // No acknowledged claim undone, no key twice; a claim that failed may
    // or may not have consumed its key (its outcome is unknown).
    let claimed_set: BTreeSet<String> = claimed.iter().cloned().collect();
    assert_eq!(
        claimed_set.len(),
        claimed.len(),
        "a key was handed out twice"
    );
    let left: BTreeSet<String> = exported
        .iter()
        .find(|s| s.device == claims_from)
        .map(|s| {
            s.one_time_keys
                .iter()
                .map(|k| k.key_id.to_string())
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_disjoint(&claimed_set), "a claimed key came back");
    assert!(left.is_subset(&prefill) && claimed_set.is_subset(&prefill));
    let accounted = left.len() + claimed_set.len();
    assert!(
        accounted <= PREFILL && accounted + failed_claims >= PREFILL,
        "keys unaccounted for: {} left + {} claimed, {failed_claims} failed claims, {PREFILL} stored",
        left.len(),
        claimed_set.len()
    );

    // The other worker's listener reconnects: it hears this worker again
    // (changes made while it was still away are not replayed, so keep
    // making changes until one arrives).
    let mut events = other_worker.subscribe();
    let late = dev("@late:x", "L");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut heard = false;
    for i in 0.. {
        if heard || tokio::time::Instant::now() > deadline {
            break;
        }
        put(
            &*store,
            &late,
            numbered_otks(SC, &format!("L{i}-"), 1),
            vec![],
        )
        .await;
        let wait = tokio::time::sleep(Duration::from_millis(500));
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => break,
                event = events.recv() => match event {
                    Ok(changes) if changes.contains(&late) => { heard = true; break; }
                    Ok(_) | Err(keyclaim::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(e) => panic!("event channel: {e}"),
                },
            }
        }
    }
    assert!(heard, "no cross-worker event after the restarts");
    eprintln!(
        "restart: {} uploads acked, {} keys claimed, retryable errors: {} uploads, {} claims",
        acked.len(),
        claimed.len(),
        upload_tally.retryable_errors.load(Ordering::Relaxed),
        claim_tally.retryable_errors.load(Ordering::Relaxed)
    );
}
