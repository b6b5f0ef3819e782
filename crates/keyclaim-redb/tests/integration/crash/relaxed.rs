//! Relaxed durability keeps its promise: commits become durable within
//! `flush_every`, also when the batch that finds the flush due writes
//! nothing (R10.1 as the relaxed mode documents it).
//!
//! The child uploads (a non-durable commit), then stalls its writer (a
//! test hook) while it holds a claim that finds nothing, until the flush is
//! due: that batch is the first the writer runs with the flush due, and it
//! writes nothing. The child then waits for the writer's flush and says
//! `@@ ready`; the parent SIGKILLs it, so the file is reopened without the
//! flush at close, and the upload must be there.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keyclaim::{ClaimTarget, KeyStore, Upload};
use keyclaim_conformance::fixtures::{SC, alg, dev, otks};
use keyclaim_redb::faults::Faults;
use keyclaim_redb::{RedbDurability, RedbOptions, RedbStore};

use super::{child_args, emit, spawn_child};
use crate::rt;

const TEST: &str = "crash::relaxed::sigkill_after_an_idle_due_batch_keeps_relaxed_commits";
const ROLE: &str = "crash-relaxed";
const USER: &str = "@relaxed:example.org";
const FLUSH_EVERY: Duration = Duration::from_millis(500);
const KEYS: [&str; 5] = ["A", "B", "C", "D", "E"];

/// The child role: a non-durable commit, an idle batch once the flush is
/// due, then the wait for the flush; killed after `@@ ready`.
fn relaxed_child() {
    let (path, _) = child_args();
    rt().block_on(async move {
        let faults = Faults::new();
        let options = RedbOptions::new()
            .durability(RedbDurability::Relaxed {
                flush_every: FLUSH_EVERY,
            })
            .faults(faults.clone());
        let store = Arc::new(RedbStore::open_with(&path, options).await.expect("open"));
        let upload = Upload::from_keys(dev(USER, "KEPT"), otks(SC, &KEYS), []).unwrap();
        store.upload(&upload).await.expect("upload");
        let committed = Instant::now();
        let stall = faults.stall_writer();
        let idle = tokio::spawn({
            let store = Arc::clone(&store);
            async move {
                let target = [ClaimTarget::one(dev(USER, "EMPTY"), alg(SC))];
                store.claim(&target).await
            }
        });
        keyclaim_testing::wait_until("the writer stalls", Duration::from_secs(30), || {
            faults.writer_stalled()
        })
        .await;
        // The writer holds the claim; the flush falls due meanwhile.
        tokio::time::sleep(FLUSH_EVERY.saturating_sub(committed.elapsed())).await;
        let stats = store.writer_stats();
        assert_eq!(stats.flushes, 0, "flushed before the due batch: {stats:?}");
        drop(stall);
        let out = idle.await.unwrap().expect("claim");
        assert!(out.keys.is_empty());
        // Relaxed mode flushes within FLUSH_EVERY of the upload, long past;
        // the bound only keeps a writer that never flushes from hanging.
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.writer_stats().flushes == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        emit(&format!("@@ flushes {}", store.writer_stats().flushes));
        emit("@@ ready");
        std::future::pending::<()>().await;
    });
}

/// A due batch that writes nothing still makes the earlier non-durable
/// commits durable: after a SIGKILL (no flush at close) the upload is
/// there.
#[test]
fn sigkill_after_an_idle_due_batch_keeps_relaxed_commits() {
    if keyclaim_testing::process::is_child(ROLE) {
        relaxed_child();
        return;
    }
    let dir = keyclaim_testing::temp_dir();
    let path = dir.path().join("relaxed.redb");
    let child = spawn_child(TEST, ROLE, &path, 0);
    child.wait_ready();
    let lines = child.kill();
    let runtime = rt();
    runtime.block_on(async {
        let store = RedbStore::open(&path).await.unwrap();
        let counts = store.otk_counts(&dev(USER, "KEPT")).await.unwrap();
        assert_eq!(
            counts.get_str(SC),
            KEYS.len() as u64,
            "a relaxed commit was not flushed within flush_every (child said {lines:?})"
        );
    });
}
