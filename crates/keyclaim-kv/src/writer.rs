//! Group commit: one thread owns every write of a store.
//!
//! Mutating operations are sent over a bounded channel to one writer
//! thread, which takes every operation waiting (up to the batch size), runs
//! them one after another against a [`Txn`] (the engine seen through the
//! writes of the batch so far), and writes the batch's changes with one
//! [`KvEngine::write`], durable by default: one sync for all of them. While
//! it writes, new operations queue up and form the next batch.
//!
//! - An operation that fails (a rejection, corrupt data, an engine read
//!   error) drops its own writes and fails alone; its batch-mates go on.
//!   Every check and decode happens before the batch is written (R10.7).
//! - Answers are sent only after the engine's write returned `Ok`; if it
//!   fails, every operation of the batch gets a retryable error, and none
//!   was applied (the engine's rule 2).
//! - Reads that need more than one engine read to be consistent (exports)
//!   hold the store's gate for reading; the writer holds it for writing
//!   while the engine applies a batch. Single-record reads need no gate:
//!   the engine applies a batch whole.
//! - The channel is bounded (`max_queued`): an operation that finds it full
//!   fails at once with a retryable error (R10.6). An operation whose caller
//!   has gone away (its future was dropped) before the writer ran it is
//!   dropped unapplied: a claim never uses up keys for nobody.
//! - A panic while running a batch fails that batch (its callers get a
//!   non-retryable error: a panic inside the engine's write may have applied
//!   it) and the writer goes on with the next one; the layer keeps no state
//!   between batches that a panic could leave half-way. Should the thread
//!   end all the same, the channel is closed, and later operations fail at
//!   once with [`Error::Closed`].

use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use keyclaim::backend::writer::{self, FromWriteReply, WriteOp, WriteReply};
use keyclaim::{Error, Limits, Result};
use tokio::sync::oneshot;

use crate::BACKEND;
use crate::Shared;
use crate::engine::{EngineError, KvEngine};
use crate::error;
use crate::ops;
use crate::txn::Txn;

/// An operation on its way to the writer, with where to answer.
struct Job {
    op: WriteOp,
    reply: oneshot::Sender<Result<WriteReply>>,
    /// The caller's span, entered while the operation runs.
    span: tracing::Span,
}

/// The writer's settings.
#[derive(Clone, Debug)]
pub(crate) struct WriterConfig {
    pub(crate) limits: Limits,
    pub(crate) durable: bool,
    pub(crate) max_batch: usize,
    pub(crate) max_queued: usize,
}

/// What the writer thread has done since the store was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriterStats {
    /// Batches run to the end: engine writes, or batches dropped because
    /// none of their operations wrote anything.
    pub batches: u64,
    /// Operations in those batches (failed ones included).
    pub operations: u64,
    /// The most operations one batch held.
    pub largest_batch: u64,
    /// Engine writes that failed (every operation of the batch failed).
    pub failed_batches: u64,
    /// Panics while running a batch (each failed its batch).
    pub panics: u64,
    /// Operations refused because the queue was full (R10.6).
    pub refused: u64,
    /// Operations dropped unapplied because their caller had gone away
    /// before the writer ran them (R10.6).
    pub abandoned: u64,
}

#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    operations: AtomicU64,
    largest_batch: AtomicU64,
    failed_batches: AtomicU64,
    panics: AtomicU64,
    refused: AtomicU64,
    abandoned: AtomicU64,
}

/// The handle of the writer thread. Dropping it closes the channel, lets
/// the thread finish what was queued, and joins it.
#[derive(Debug)]
pub(crate) struct Writer {
    sender: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
    capacity: usize,
}

impl Writer {
    /// Starts the writer thread.
    ///
    /// # Errors
    /// [`Error::Storage`] when the thread cannot be spawned.
    pub(crate) fn start<E: KvEngine>(shared: Arc<Shared<E>>, config: WriterConfig) -> Result<Self> {
        let capacity = config.max_queued.max(1);
        let (sender, receiver) = crossbeam_channel::bounded(capacity);
        let counters = Arc::new(Counters::default());
        let thread_counters = Arc::clone(&counters);
        let thread = std::thread::Builder::new()
            .name("keyclaim-kv-writer".into())
            .spawn(move || run(&shared, &receiver, &config, &thread_counters))
            .map_err(|e| error::task_failed("open", e))?;
        Ok(Self {
            sender: Some(sender),
            thread: Some(thread),
            counters,
            capacity,
        })
    }

    /// A snapshot of the counters.
    pub(crate) fn stats(&self) -> WriterStats {
        let c = &self.counters;
        WriterStats {
            batches: c.batches.load(Ordering::Relaxed),
            operations: c.operations.load(Ordering::Relaxed),
            largest_batch: c.largest_batch.load(Ordering::Relaxed),
            failed_batches: c.failed_batches.load(Ordering::Relaxed),
            panics: c.panics.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            abandoned: c.abandoned.load(Ordering::Relaxed),
        }
    }

    /// Queues an operation and waits for its answer. Never blocks the
    /// calling thread: a full queue refuses the operation at once. Dropping
    /// the future before the writer ran the operation leaves it unapplied.
    pub(crate) async fn submit<T: FromWriteReply>(&self, op: WriteOp) -> Result<T> {
        let name = op.name();
        let (reply, rx) = oneshot::channel();
        let job = Job {
            op,
            reply,
            span: tracing::Span::current(),
        };
        let Some(sender) = &self.sender else {
            return Err(Error::Closed);
        };
        match sender.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Disconnected(_)) => return Err(Error::Closed),
            Err(TrySendError::Full(_)) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                return Err(writer::queue_full(
                    BACKEND,
                    name,
                    "key-value writer's",
                    self.capacity,
                ));
            }
        }
        // The writer drops a job unanswered only when it panics.
        rx.await
            .map_err(|_| writer::writer_panicked(BACKEND, name))??
            .into_answer(BACKEND, name)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.sender.take();
        if let Some(thread) = self.thread.take() {
            // The thread catches the panics of its batches; should one
            // escape all the same, its callers were failed already.
            let _ = thread.join();
        }
    }
}

/// The writer loop: take a batch, run it, answer; until every sender is
/// gone and the channel is drained.
fn run<E: KvEngine>(
    shared: &Shared<E>,
    receiver: &Receiver<Job>,
    config: &WriterConfig,
    counters: &Counters,
) {
    let max_batch = config.max_batch.max(1);
    while let Some(first) = next_job(receiver) {
        let mut batch = Vec::with_capacity(max_batch.min(receiver.len() + 1));
        batch.push(first);
        while batch.len() < max_batch {
            match receiver.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        drop_abandoned(&mut batch, counters);
        if batch.is_empty() {
            continue;
        }
        let ran = panic::catch_unwind(AssertUnwindSafe(|| {
            run_batch(shared, &mut batch, config, counters)
        }));
        if ran.is_err() {
            counters.panics.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                ops = batch.len(),
                "the key-value writer panicked; its batch failed"
            );
            // Dropped unanswered: the callers get `writer_panicked`.
            drop(batch);
        }
    }
}

/// How many times the writer yields its CPU, waiting for the next job,
/// before it sleeps.
const YIELDS_BEFORE_SLEEP: u32 = 8;

/// The next job, or `None` once every sender is gone and the channel is
/// drained. The callers of the previous batch send their next operations
/// right after their answers: the writer yields its CPU to them a few times
/// before it sleeps, so that it neither spins nor pays a sleep and a wake-up
/// per batch while callers keep it busy.
fn next_job(receiver: &Receiver<Job>) -> Option<Job> {
    for _ in 0..YIELDS_BEFORE_SLEEP {
        match receiver.try_recv() {
            Ok(job) => return Some(job),
            Err(crossbeam_channel::TryRecvError::Disconnected) => return None,
            Err(crossbeam_channel::TryRecvError::Empty) => std::thread::yield_now(),
        }
    }
    receiver.recv().ok()
}

/// Runs one batch and answers every job (taken out of `batch`).
fn run_batch<E: KvEngine>(
    shared: &Shared<E>,
    batch: &mut Vec<Job>,
    config: &WriterConfig,
    counters: &Counters,
) {
    let span = tracing::debug_span!("keyclaim.kv.batch", ops = batch.len());
    let _enter = span.enter();
    let engine: &dyn KvEngine = &shared.engine;
    let mut txn = Txn::new(engine);
    let mut results = Vec::with_capacity(batch.len());
    for job in batch.iter() {
        let _enter = job.span.enter();
        txn.begin(job.op.name());
        let result = apply(&mut txn, &job.op, &config.limits);
        if result.is_ok() {
            txn.keep();
        } else {
            txn.drop_current();
        }
        results.push(result);
    }
    let writes = txn.into_batch();
    let written = if writes.is_empty() {
        // Only retries, reads and rejections: nothing to write or sync.
        Ok(())
    } else {
        let _gate = shared.gate.write();
        shared.engine.write(&writes, config.durable)
    };
    let jobs = std::mem::take(batch);
    let n = jobs.len() as u64;
    match written {
        Ok(()) => {
            counters.batches.fetch_add(1, Ordering::Relaxed);
            counters.operations.fetch_add(n, Ordering::Relaxed);
            counters.largest_batch.fetch_max(n, Ordering::Relaxed);
            for (job, result) in jobs.into_iter().zip(results) {
                // The caller may have gone away; the operation is applied
                // all the same.
                let _ = job.reply.send(result);
            }
        }
        Err(e) => fail_all(jobs, e, counters),
    }
}

/// Answers every job of a batch whose engine write failed: nothing of it
/// was applied, each gets a retryable error.
fn fail_all(jobs: Vec<Job>, e: EngineError, counters: &Counters) {
    tracing::warn!(error = %e, ops = jobs.len(), "the engine's batch write failed");
    counters.failed_batches.fetch_add(1, Ordering::Relaxed);
    let cause = Arc::new(e);
    for job in jobs {
        let _ = job
            .reply
            .send(Err(error::for_batch_mate(&cause, job.op.name())));
    }
}

/// One operation on the batch's transaction.
fn apply(txn: &mut Txn<'_>, op: &WriteOp, limits: &Limits) -> Result<WriteReply> {
    Ok(match op {
        WriteOp::Upload(upload) => WriteReply::Upload(ops::upload(txn, upload, None, limits)?),
        WriteOp::Claim { targets, fall_back } => {
            WriteReply::Claim(ops::claim(txn, targets, *fall_back)?)
        }
        WriteOp::ClaimFallbacks(targets) => WriteReply::Claim(ops::claim_fallbacks(txn, targets)?),
        WriteOp::Reset(device, scope) => {
            WriteReply::Upload(ops::reset_one_time_keys(txn, device, scope)?)
        }
        WriteOp::Replace { previous, upload } => {
            WriteReply::Upload(ops::upload(txn, upload, previous.as_ref(), limits)?)
        }
        WriteOp::DeleteDevice(device) => WriteReply::Changes(ops::delete_device(txn, device)?),
        WriteOp::DeleteUser(user) => WriteReply::Changes(ops::delete_user(txn, user)?),
        WriteOp::Import(snapshot) => WriteReply::Changes(ops::import_device(txn, snapshot)?),
    })
}

/// Drops, unapplied, the jobs whose caller has gone away (R10.6).
fn drop_abandoned(batch: &mut Vec<Job>, counters: &Counters) {
    let before = batch.len();
    batch.retain(|job| !job.reply.is_closed());
    let dropped = (before - batch.len()) as u64;
    if dropped > 0 {
        counters.abandoned.fetch_add(dropped, Ordering::Relaxed);
        tracing::debug!(dropped, "dropped operations whose callers have gone away");
    }
}
