//! Engine faults: a failed batch write is a retryable error and nothing of
//! the batch is acknowledged or applied; a failed read is a retryable error;
//! a panicking engine fails the batch it was in, and the store goes on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use keyclaim::{ClaimTarget, Error, KeyStore};
use keyclaim_conformance::fixtures::{SC, alg, dev, numbered_otks, put, upload_of};
use keyclaim_kv::{
    EngineError, EngineResult, KvEngine, KvOptions, KvStore, MemoryEngine, Space, Visitor,
    WriteBatch,
};
use parking_lot::{Condvar, Mutex};

use crate::{rt, within};

/// A [`MemoryEngine`] with faults switched on and off by the test.
#[derive(Default)]
pub(crate) struct FaultyEngine {
    pub(crate) inner: MemoryEngine,
    /// Writes fail.
    pub(crate) fail_writes: AtomicBool,
    /// Reads (gets and scans) fail.
    pub(crate) fail_reads: AtomicBool,
    /// The next write panics.
    pub(crate) panic_next_write: AtomicBool,
    /// Writes wait while this is set (see [`FaultyEngine::hold`]).
    held: Mutex<bool>,
    released: Condvar,
    /// Writes that are waiting or have waited.
    pub(crate) writes_started: AtomicUsize,
}

impl FaultyEngine {
    /// Makes writes wait until [`FaultyEngine::release`].
    pub(crate) fn hold(&self) {
        *self.held.lock() = true;
    }

    pub(crate) fn release(&self) {
        *self.held.lock() = false;
        self.released.notify_all();
    }

    fn injected(what: &str) -> EngineError {
        EngineError::new(format!("injected {what} failure"))
    }

    fn read_fault(&self) -> EngineResult<()> {
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(Self::injected("read"));
        }
        Ok(())
    }
}

impl KvEngine for FaultyEngine {
    fn get(&self, space: Space, key: &[u8]) -> EngineResult<Option<Vec<u8>>> {
        self.read_fault()?;
        self.inner.get(space, key)
    }

    fn scan(
        &self,
        space: Space,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut Visitor<'_>,
    ) -> EngineResult<()> {
        self.read_fault()?;
        self.inner.scan(space, start, end, visit)
    }

    fn write(&self, batch: &WriteBatch, durable: bool) -> EngineResult<()> {
        self.writes_started.fetch_add(1, Ordering::SeqCst);
        let mut held = self.held.lock();
        while *held {
            self.released.wait(&mut held);
        }
        drop(held);
        assert!(
            !self.panic_next_write.swap(false, Ordering::SeqCst),
            "injected panic in the engine's write"
        );
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(Self::injected("write"));
        }
        self.inner.write(batch, durable)
    }
}

/// A store over a shared [`FaultyEngine`].
pub(crate) async fn faulty_store(
    options: KvOptions,
) -> (Arc<FaultyEngine>, KvStore<Arc<FaultyEngine>>) {
    let engine = Arc::new(FaultyEngine::default());
    let store = KvStore::open_with(Arc::clone(&engine), options)
        .await
        .unwrap();
    (engine, store)
}

fn assert_retryable_storage(result: keyclaim::Result<impl std::fmt::Debug>, what: &str) {
    match result {
        Err(e @ Error::Storage { .. }) => assert!(e.is_retryable(), "{what}: {e:?}"),
        other => panic!("{what}: expected a retryable storage error, got {other:?}"),
    }
}

#[test]
fn the_engine_suite_passes_on_the_fault_wrapper_without_faults() {
    keyclaim_kv::engine_suite::run(FaultyEngine::default);
}

#[test]
fn a_failed_batch_write_acknowledges_and_applies_nothing() {
    rt().block_on(async {
        let (engine, store) = faulty_store(KvOptions::new()).await;
        let a = dev("@a:x", "A");
        put(&store, &a, numbered_otks(SC, "k", 3), vec![]).await;
        engine.fail_writes.store(true, Ordering::SeqCst);
        // Claims and an upload, concurrently: some share a batch.
        let b = dev("@b:x", "B");
        let up = upload_of(&b, numbered_otks(SC, "b", 2), vec![]);
        let target = [ClaimTarget::one(a.clone(), alg(SC))];
        let (c1, c2, u) = tokio::join!(
            store.claim(&target),
            store.claim(&target),
            store.upload(&up)
        );
        assert_retryable_storage(c1, "claim");
        assert_retryable_storage(c2, "claim");
        assert_retryable_storage(u, "upload");
        assert_retryable_storage(store.delete_device(&a).await, "delete");
        engine.fail_writes.store(false, Ordering::SeqCst);
        assert_eq!(store.otk_counts(&a).await.unwrap().get_str(SC), 3);
        assert_eq!(store.otk_counts(&b).await.unwrap().get_str(SC), 0);
        // The keys the failed claims read are handed out now, in order.
        let out = store.claim(&target).await.unwrap();
        assert_eq!(out.keys[0].key_id.as_str(), "signed_curve25519:k000000");
        assert!(store.writer_stats().failed_batches >= 2);
    });
}

#[test]
fn a_failed_read_is_a_retryable_error() {
    rt().block_on(async {
        let (engine, store) = faulty_store(KvOptions::new()).await;
        let a = dev("@a:x", "A");
        put(&store, &a, numbered_otks(SC, "k", 2), vec![]).await;
        engine.fail_reads.store(true, Ordering::SeqCst);
        assert_retryable_storage(store.sync_state(&a).await, "sync_state");
        assert_retryable_storage(
            store.counts_many(std::slice::from_ref(&a)).await,
            "counts_many",
        );
        assert_retryable_storage(store.fallback_keys(&a).await, "fallback_keys");
        assert_retryable_storage(store.export_devices(None, 10).await, "export");
        assert_retryable_storage(
            store.claim(&[ClaimTarget::one(a.clone(), alg(SC))]).await,
            "claim",
        );
        engine.fail_reads.store(false, Ordering::SeqCst);
        assert_eq!(store.otk_counts(&a).await.unwrap().get_str(SC), 2);
    });
}

#[test]
fn a_panic_in_the_engine_fails_its_batch_and_the_store_goes_on() {
    rt().block_on(async {
        let (engine, store) = faulty_store(KvOptions::new()).await;
        let a = dev("@a:x", "A");
        engine.panic_next_write.store(true, Ordering::SeqCst);
        let up = upload_of(&a, numbered_otks(SC, "k", 2), vec![]);
        match within("upload", store.upload(&up)).await {
            Err(e @ Error::Storage { .. }) => assert!(!e.is_retryable(), "{e:?}"),
            other => panic!("expected a storage error, got {other:?}"),
        }
        assert_eq!(store.writer_stats().panics, 1);
        // The panic came before the engine applied anything.
        assert_eq!(store.otk_counts(&a).await.unwrap().get_str(SC), 0);
        put(&store, &a, numbered_otks(SC, "k", 2), vec![]).await;
        assert_eq!(store.otk_counts(&a).await.unwrap().get_str(SC), 2);
    });
}
