//! Group commit: one thread owns every write.
//!
//! redb runs one write transaction at a time and each durable commit costs
//! an fsync. So mutating operations are sent over a channel to one writer
//! thread, which takes every operation waiting in the queue (up to the batch
//! size) into one write transaction and commits once for all of them. While
//! it commits, new operations queue up and form the next batch.
//!
//! Each operation stays atomic on its own:
//!
//! - a request the rules reject (conflict, a limit) is decided from the
//!   transaction's current state before the operation writes anything, so
//!   it fails alone and its batch-mates go on;
//! - a storage failure in the middle of an operation aborts the batch's
//!   transaction; the operations of that batch are then run again, each in
//!   a transaction of its own, so that only the failing one fails;
//! - replies are sent only after the commit returned; if the commit fails,
//!   every operation of the batch gets the error (none of them was applied);
//! - an I/O failure (after which redb refuses the handle) fails the batch
//!   and makes the writer reopen the file ([`crate::slot`]);
//! - a panic in the writer thread fails the batch it was running (its
//!   callers get a non-retryable [`Error::Storage`]: whether the operation
//!   was applied is unknown); the writer then reopens the file, since redb
//!   may have been left half-way, and goes on with the next batch. Should the
//!   thread end all the same, the queue is closed and every queued or later
//!   operation fails at once: no caller ever waits for a writer that is gone.
//!
//! The queue is bounded (`max_queued`): an operation that finds it full
//! fails at once with a retryable error (R10.6). An operation whose caller
//! has gone away (its future was dropped, say on an HTTP timeout) before
//! the writer took it is dropped unapplied, whatever its kind: a claim
//! never uses up keys for nobody. Once taken into a batch an operation
//! runs to its end.
//!
//! A batch that wrote nothing is dropped instead of committed (no fsync),
//! unless relaxed mode's flush is due ([`crate::flush`]).
//! A batch is what queued up while the previous one ran: a lone operation
//! is committed at once, the writer never waits for company unless
//! `linger` is set (off by default).

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use keyclaim::backend::writer::{self, FromWriteReply, WriteOp, WriteReply};
use keyclaim::{Error, Limits, Result};
use redb::{Database, WriteTransaction};
use tokio::sync::oneshot;

use crate::error::{self, Fatal, needs_reopen};
use crate::flush::{Commit, FlushClock};
use crate::hooks::Hooks;
use crate::ops::{self, WriteTables};
use crate::queue::{JobQueue, Refused, Taken};
use crate::slot::DbSlot;
use crate::{BACKEND, RedbDurability};

/// An operation on its way to the writer, with where to answer.
pub(crate) struct Job {
    pub(crate) op: WriteOp,
    pub(crate) reply: oneshot::Sender<Result<WriteReply>>,
    /// The caller's span, entered while the operation runs.
    pub(crate) span: tracing::Span,
}

/// The writer's settings.
#[derive(Clone, Debug)]
pub(crate) struct WriterConfig {
    pub(crate) limits: Limits,
    pub(crate) durability: RedbDurability,
    pub(crate) max_batch: usize,
    pub(crate) max_queued: usize,
    pub(crate) linger: Duration,
    pub(crate) hooks: Hooks,
}

/// What the writer thread has done since the store was opened: how well
/// group commit is batching.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriterStats {
    /// Batches run to the end: write transactions committed, or dropped
    /// because none of their operations wrote anything (retried uploads,
    /// claims that found nothing, rejections).
    pub batches: u64,
    /// Operations in those batches (rejected ones included).
    pub operations: u64,
    /// The most operations one batch held.
    pub largest_batch: u64,
    /// Transactions abandoned or whose commit failed (a batch whose
    /// operations were then retried one by one counts once, and each
    /// failing retry once more).
    pub failed_batches: u64,
    /// Panics of the writer thread: each failed the batch it was running,
    /// and the writer reopened the file and went on.
    pub panics: u64,
    /// Operations refused because the queue was full (R10.6).
    pub refused: u64,
    /// Operations dropped unapplied because their caller had gone away
    /// before the writer took them (R10.6).
    pub abandoned: u64,
    /// Relaxed mode: flushes, each of which made every earlier non-durable
    /// commit durable (an empty durable commit, or a batch committed
    /// durably because a flush was due).
    pub flushes: u64,
    /// Relaxed mode: flushes that failed (each is tried again after a
    /// back-off).
    pub failed_flushes: u64,
    /// Times the writer closed the file and opened it again, after an I/O
    /// error or a panic (those that succeeded).
    pub reopens: u64,
}

/// The handle of the writer thread. Dropping it closes the queue, lets the
/// thread finish what was queued, and joins it.
#[derive(Debug)]
pub(crate) struct Writer {
    queue: Arc<JobQueue<Job>>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
}

/// What the writer has done so far.
#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    operations: AtomicU64,
    largest_batch: AtomicU64,
    failed_batches: AtomicU64,
    panics: AtomicU64,
    refused: AtomicU64,
    abandoned: AtomicU64,
    flushes: AtomicU64,
    failed_flushes: AtomicU64,
    reopens: AtomicU64,
}

impl Counters {
    fn committed(&self, ops: usize) {
        let ops = ops as u64;
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.operations.fetch_add(ops, Ordering::Relaxed);
        self.largest_batch.fetch_max(ops, Ordering::Relaxed);
    }
}

impl Writer {
    /// Starts the writer thread on `db`.
    ///
    /// # Errors
    /// [`Error::Storage`] when the thread cannot be spawned.
    pub(crate) fn start(slot: Arc<DbSlot>, config: WriterConfig) -> Result<Self> {
        let queue = Arc::new(JobQueue::new(config.max_queued));
        let counters = Arc::new(Counters::default());
        let thread_counters = Arc::clone(&counters);
        let thread_queue = Arc::clone(&queue);
        let thread = std::thread::Builder::new()
            .name("keyclaim-redb-writer".into())
            .spawn(move || {
                let _close = CloseOnExit(&thread_queue);
                supervise(&slot, &thread_queue, &config, &thread_counters);
            })
            .map_err(|e| error::task_failed("open", e))?;
        Ok(Self {
            queue,
            thread: Some(thread),
            counters,
        })
    }

    /// A snapshot of the counters.
    pub(crate) fn stats(&self) -> WriterStats {
        WriterStats {
            batches: self.counters.batches.load(Ordering::Relaxed),
            operations: self.counters.operations.load(Ordering::Relaxed),
            largest_batch: self.counters.largest_batch.load(Ordering::Relaxed),
            failed_batches: self.counters.failed_batches.load(Ordering::Relaxed),
            panics: self.counters.panics.load(Ordering::Relaxed),
            refused: self.counters.refused.load(Ordering::Relaxed),
            abandoned: self.counters.abandoned.load(Ordering::Relaxed),
            flushes: self.counters.flushes.load(Ordering::Relaxed),
            failed_flushes: self.counters.failed_flushes.load(Ordering::Relaxed),
            reopens: self.counters.reopens.load(Ordering::Relaxed),
        }
    }

    /// Queues an operation and waits for its answer. Never blocks the
    /// calling thread: a full queue refuses the operation at once, and the
    /// answer is awaited. Dropping the future before the writer took the
    /// operation leaves it unapplied.
    pub(crate) async fn submit<T: FromWriteReply>(&self, op: WriteOp) -> Result<T> {
        let name = op.name();
        let (reply, rx) = oneshot::channel();
        let job = Job {
            op,
            reply,
            span: tracing::Span::current(),
        };
        match self.queue.push(job) {
            Ok(()) => {}
            Err(Refused::Closed(_)) => return Err(Error::Closed),
            Err(Refused::Full(_)) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                return Err(writer::queue_full(
                    BACKEND,
                    name,
                    "redb writer's",
                    self.queue.capacity(),
                ));
            }
        }
        // The writer drops a job unanswered only when it panics.
        rx.await
            .map_err(|_| writer::writer_panicked(BACKEND, name))??
            .into_answer(BACKEND, name)
    }

    /// Closes the queue and waits for the thread to finish it.
    pub(crate) fn shutdown(&mut self) {
        self.queue.close();
        if let Some(thread) = self.thread.take() {
            // The thread catches its panics; should one escape all the same,
            // its callers have already been failed (see `CloseOnExit`).
            let _ = thread.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Closes the queue when the writer thread ends, however it ends, and drops
/// what is still queued: their callers get an error at once, and so does
/// every later operation, instead of waiting for a thread that is gone.
/// (After a normal shutdown the queue is already closed and empty.)
struct CloseOnExit<'a>(&'a JobQueue<Job>);

impl Drop for CloseOnExit<'_> {
    fn drop(&mut self) {
        self.0.close();
        while let Taken::Items(jobs) = self.0.take(usize::MAX, None) {
            drop(jobs);
        }
    }
}

/// Runs the writer loop until the queue is closed, starting it again after
/// a panic: the panicking batch's jobs were dropped unanswered (their
/// callers get [`error::writer_panicked`]), and the file is reopened, since
/// a panic inside redb may have left its handle half-way.
fn supervise(slot: &DbSlot, queue: &JobQueue<Job>, config: &WriterConfig, counters: &Counters) {
    let mut clock = FlushClock::new(config.durability);
    loop {
        let ran = panic::catch_unwind(AssertUnwindSafe(|| {
            run(slot, queue, config, counters, &mut clock);
        }));
        let Err(payload) = ran else {
            return;
        };
        counters.panics.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            panic = panic_message(payload.as_ref()),
            "the redb writer panicked; its batch failed, reopening the file"
        );
        reopen(slot, counters, &mut clock);
    }
}

/// The text of a panic, when it has one.
fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Closes the file and opens it again (if that fails, the next batch tries
/// again, see [`DbSlot::get_or_reopen`]). Closing the old handle made its
/// non-durable commits durable or, after an I/O error, lost them: nothing is
/// left to flush either way.
fn reopen(slot: &DbSlot, counters: &Counters, clock: &mut FlushClock) {
    clock.reopened();
    match slot.reopen() {
        Ok(()) => {
            counters.reopens.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => tracing::warn!(error = %e, "reopening the redb file failed"),
    }
}

/// The writer loop: take a batch, run it, answer; flush relaxed commits
/// (see [`crate::flush`]).
fn run(
    slot: &DbSlot,
    queue: &JobQueue<Job>,
    config: &WriterConfig,
    counters: &Counters,
    clock: &mut FlushClock,
) {
    // The size of the previous batch: about how many callers are waiting
    // on the writer at a time.
    let mut last_batch = 1;
    loop {
        let mut batch = match queue.take(config.max_batch, clock.deadline()) {
            Taken::Items(batch) => batch,
            Taken::TimedOut => {
                // Nothing came while commits waited to become durable.
                flush(slot, counters, clock);
                continue;
            }
            Taken::Closed => break,
        };
        if !config.linger.is_zero() && batch.len() < last_batch {
            // Opt-in: wait a little for the rest of the previous batch's
            // callers, whose next operations are on their way.
            queue.top_up(&mut batch, config.max_batch, last_batch, config.linger);
        }
        config.hooks.batch_taken();
        last_batch = batch.len();
        drop_abandoned(&mut batch, counters);
        if batch.is_empty() {
            continue;
        }
        let mode = clock.mode(Instant::now());
        let db = match slot.get_or_reopen("write") {
            Ok(db) => db,
            Err(e) => {
                // The file could not be reopened after an I/O error (the
                // disk may still be full): fail this batch, try again with
                // the next one.
                counters.failed_batches.fetch_add(1, Ordering::Relaxed);
                fail_all(batch, &Arc::new(e));
                continue;
            }
        };
        let ran = run_batch(&db, batch, config, counters, mode);
        drop(db);
        if ran.committed {
            if mode == Commit::Flush {
                counters.flushes.fetch_add(1, Ordering::Relaxed);
            }
            clock.committed(mode, Instant::now());
        } else if mode == Commit::Flush {
            // The flush failed with the batch (its callers got the error).
            counters.failed_flushes.fetch_add(1, Ordering::Relaxed);
            clock.flush_failed(Instant::now());
        }
        if ran.needs_reopen {
            // redb refuses every later operation on this handle.
            reopen(slot, counters, clock);
        }
    }
    if clock.unflushed() {
        flush(slot, counters, clock);
    }
}

/// An empty durable commit, which makes every earlier non-durable commit
/// durable. On failure, backs off ([`FlushClock::flush_failed`]), and after
/// an I/O failure reopens the file.
fn flush(slot: &DbSlot, counters: &Counters, clock: &mut FlushClock) {
    let span = tracing::debug_span!("keyclaim.redb.flush");
    let _enter = span.enter();
    let flushed = slot.get("flush").and_then(|db| {
        let txn = db
            .begin_write()
            .map_err(|e| Fatal::from(e).into_error("flush"))?;
        txn.commit().map_err(|e| Fatal::from(e).into_error("flush"))
    });
    match flushed {
        Ok(()) => {
            counters.flushes.fetch_add(1, Ordering::Relaxed);
            clock.flushed();
        }
        Err(e) => {
            tracing::warn!(error = %e, "flushing relaxed commits failed");
            counters.failed_flushes.fetch_add(1, Ordering::Relaxed);
            clock.flush_failed(Instant::now());
            if needs_reopen(&e) {
                reopen(slot, counters, clock);
            }
        }
    }
}

/// What running a batch did.
#[derive(Debug, Default)]
struct Ran {
    /// Some transaction committed.
    committed: bool,
    /// Some failure was an I/O error: the handle must be reopened.
    needs_reopen: bool,
}

/// Runs one batch, committing in `mode`; answers every job.
fn run_batch(
    db: &Database,
    batch: Vec<Job>,
    config: &WriterConfig,
    counters: &Counters,
    mode: Commit,
) -> Ran {
    let span = tracing::debug_span!("keyclaim.redb.batch", ops = batch.len());
    let _enter = span.enter();
    let ops: Vec<&Job> = batch.iter().collect();
    match execute(db, &ops, config, mode) {
        Ok((results, committed)) => {
            counters.committed(batch.len());
            answer(batch, results);
            Ran {
                committed,
                needs_reopen: false,
            }
        }
        Err(BatchError::Commit(e)) => {
            tracing::warn!(error = %e, "batch commit failed");
            counters.failed_batches.fetch_add(1, Ordering::Relaxed);
            fail_all(batch, &e);
            Ran {
                committed: false,
                needs_reopen: needs_reopen(&e),
            }
        }
        Err(BatchError::WriteOp(e)) if batch.len() == 1 || needs_reopen(&e) => {
            // Alone, or an I/O failure, after which the handle refuses
            // everything: no point in running the others one by one.
            counters.failed_batches.fetch_add(1, Ordering::Relaxed);
            fail_all(batch, &e);
            Ran {
                committed: false,
                needs_reopen: needs_reopen(&e),
            }
        }
        Err(BatchError::WriteOp(e)) => {
            // Some operation failed half-way; the transaction was dropped.
            // Run each alone so that only the failing one fails.
            tracing::warn!(error = %e, "operation failed inside a batch; retrying one by one");
            counters.failed_batches.fetch_add(1, Ordering::Relaxed);
            let mut ran = Ran::default();
            let mut mode = mode;
            for job in batch {
                if job.reply.is_closed() {
                    // Not applied yet (the batch's transaction was dropped),
                    // and its caller has gone: drop it (R10.6).
                    counters.abandoned.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if ran.needs_reopen {
                    fail_all(vec![job], &e);
                    continue;
                }
                match execute(db, &[&job], config, mode) {
                    Ok((results, committed)) => {
                        counters.committed(1);
                        answer(vec![job], results);
                        if committed {
                            ran.committed = true;
                            // One durable commit is the flush; the others
                            // need to commit only what they write.
                            if mode == Commit::Flush {
                                mode = Commit::Durable;
                            }
                        }
                    }
                    Err(BatchError::Commit(e) | BatchError::WriteOp(e)) => {
                        counters.failed_batches.fetch_add(1, Ordering::Relaxed);
                        ran.needs_reopen = needs_reopen(&e);
                        fail_all(vec![job], &e);
                    }
                }
            }
            ran
        }
    }
}

enum BatchError {
    /// An operation failed with a storage error or corrupt data; the
    /// transaction was abandoned before commit.
    WriteOp(Arc<Error>),
    /// Opening the transaction or committing it failed.
    Commit(Arc<Error>),
}

/// Runs the jobs in one write transaction and commits it in `mode`, or
/// drops it when no job wrote anything (an operation writes iff it reports
/// changes, or takes a sequence number) unless `mode` is
/// [`Commit::Flush`]. On `Ok`, every result is final (rejections included),
/// the commit has returned, and the flag says whether there was one.
fn execute(
    db: &Database,
    jobs: &[&Job],
    config: &WriterConfig,
    mode: Commit,
) -> std::result::Result<(Vec<Result<WriteReply>>, bool), BatchError> {
    let commit_err = |f: Fatal| BatchError::Commit(Arc::new(f.into_error("commit")));
    let mut txn: WriteTransaction = db.begin_write().map_err(|e| commit_err(e.into()))?;
    if !mode.is_durable() {
        txn.set_durability(redb::Durability::None)
            .map_err(|e| commit_err(e.into()))?;
    }
    let mut results = Vec::with_capacity(jobs.len());
    {
        let mut tables = WriteTables::open(&txn).map_err(commit_err)?;
        for job in jobs {
            let _enter = job.span.enter();
            let op = job.op.name();
            match apply(&mut tables, &job.op, &config.limits) {
                Ok(result) => results.push(result),
                Err(fatal) => {
                    let e = fatal.into_error(op);
                    tracing::warn!(error = %e, op, "operation failed; transaction abandoned");
                    return Err(BatchError::WriteOp(Arc::new(e)));
                }
            }
        }
        let wrote = tables.finish().map_err(commit_err)?
            || results
                .iter()
                .any(|r| r.as_ref().is_ok_and(WriteReply::wrote));
        if !wrote && mode != Commit::Flush {
            // Only reads, retries and rejections: nothing to make durable,
            // so no commit and no fsync.
            drop(tables);
            txn.abort().map_err(|e| commit_err(e.into()))?;
            return Ok((results, false));
        }
    }
    txn.commit().map_err(|e| commit_err(e.into()))?;
    Ok((results, true))
}

/// One operation on the batch's tables.
fn apply(
    tables: &mut WriteTables<'_>,
    op: &WriteOp,
    limits: &Limits,
) -> std::result::Result<Result<WriteReply>, Fatal> {
    Ok(match op {
        WriteOp::Upload(upload) => {
            ops::upload(tables, upload, None, limits)?.map(WriteReply::Upload)
        }
        WriteOp::Claim { targets, fall_back } => {
            Ok(WriteReply::Claim(ops::claim(tables, targets, *fall_back)?))
        }
        WriteOp::ClaimFallbacks(targets) => {
            Ok(WriteReply::Claim(ops::claim_fallbacks(tables, targets)?))
        }
        WriteOp::Reset(device, scope) => Ok(WriteReply::Upload(ops::reset_one_time_keys(
            tables, device, scope,
        )?)),
        WriteOp::Replace { previous, upload } => {
            ops::upload(tables, upload, previous.as_ref(), limits)?.map(WriteReply::Upload)
        }
        WriteOp::DeleteDevice(device) => {
            Ok(WriteReply::Changes(ops::delete_device(tables, device)?))
        }
        WriteOp::DeleteUser(user) => Ok(WriteReply::Changes(ops::delete_user(tables, user)?)),
        WriteOp::Import(snapshot) => Ok(WriteReply::Changes(ops::import_device(tables, snapshot)?)),
    })
}

/// Drops, unapplied, the jobs whose caller has gone away (its future was
/// dropped): a claim nobody waits for must not use up keys (R10.6).
fn drop_abandoned(batch: &mut Vec<Job>, counters: &Counters) {
    let before = batch.len();
    batch.retain(|job| !job.reply.is_closed());
    let dropped = (before - batch.len()) as u64;
    if dropped > 0 {
        counters.abandoned.fetch_add(dropped, Ordering::Relaxed);
        tracing::debug!(dropped, "dropped operations whose callers have gone away");
    }
}

/// Sends committed results. (Core reports the changes, R11.1.)
fn answer(batch: Vec<Job>, results: Vec<Result<WriteReply>>) {
    for (job, result) in batch.into_iter().zip(results) {
        // The caller may have gone away (its future was dropped); the
        // operation is committed all the same.
        let _ = job.reply.send(result);
    }
}

fn fail_all(batch: Vec<Job>, cause: &Arc<Error>) {
    for job in batch {
        let _ = job
            .reply
            .send(Err(error::for_batch_mate(cause, job.op.name())));
    }
}
