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
//!   and makes the writer reopen the file ([`crate::slot`]).
//!
//! A batch that wrote nothing is dropped instead of committed (no fsync).
//! A batch is what queued up while the previous one ran: a lone operation
//! is committed at once, the writer never waits for company unless
//! `linger` is set (off by default).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use keyclaim::transfer::DeviceSnapshot;
use keyclaim::{
    Changes, ClaimTarget, Device, DeviceId, Error, FallbackTarget, Limits, ResetScope, Result,
    Upload, UploadOutcome, UserId,
};
use redb::{Database, WriteTransaction};
use tokio::sync::oneshot;

use keyclaim::backend::RawClaim;

use crate::RedbDurability;
use crate::error::{self, Fatal, needs_reopen};
use crate::ops::{self, WriteTables};
use crate::queue::{JobQueue, Taken};
use crate::slot::DbSlot;

/// One mutating operation.
#[derive(Debug)]
pub(crate) enum Op {
    Upload(Upload),
    /// A claim (section 4), or its one-time step (R12.1) without
    /// `fall_back`.
    Claim {
        targets: Arc<[ClaimTarget]>,
        fall_back: bool,
    },
    /// The fallback step of a split claim (R12.2).
    ClaimFallbacks(Arc<[FallbackTarget]>),
    /// A key reset (R13.1).
    Reset(Device, ResetScope),
    /// A dehydrated device's replacement (R14.1): the previous device's
    /// deletion and the upload, in the one transaction of the batch.
    Replace {
        previous: Option<DeviceId>,
        upload: Upload,
    },
    DeleteDevice(Device),
    DeleteUser(UserId),
    Import(DeviceSnapshot),
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Self::Upload(_) => "upload",
            Self::Claim {
                fall_back: true, ..
            } => "claim",
            Self::Claim {
                fall_back: false, ..
            } => "claim_one_time_keys",
            Self::ClaimFallbacks(_) => "claim_fallback_keys",
            Self::Reset(..) => "reset_one_time_keys",
            Self::Replace { .. } => "replace_device",
            Self::DeleteDevice(_) => "delete_device",
            Self::DeleteUser(_) => "delete_user",
            Self::Import(_) => "import_device",
        }
    }
}

/// What an operation answers.
#[derive(Debug)]
pub(crate) enum Reply {
    Upload(UploadOutcome),
    Claim(RawClaim),
    Changes(Changes),
}

impl Reply {
    /// Whether the operation wrote anything.
    fn wrote(&self) -> bool {
        match self {
            Self::Upload(o) => !o.changes.is_empty(),
            Self::Claim(o) => o.changed_any(),
            Self::Changes(c) => !c.is_empty(),
        }
    }
}

/// An operation on its way to the writer, with where to answer.
pub(crate) struct Job {
    pub(crate) op: Op,
    pub(crate) reply: oneshot::Sender<Result<Reply>>,
    /// The caller's span, entered while the operation runs.
    pub(crate) span: tracing::Span,
}

/// The writer's settings.
#[derive(Clone, Debug)]
pub(crate) struct WriterConfig {
    pub(crate) limits: Limits,
    pub(crate) durability: RedbDurability,
    pub(crate) max_batch: usize,
    pub(crate) linger: Duration,
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
        let queue = Arc::new(JobQueue::new());
        let counters = Arc::new(Counters::default());
        let thread_counters = Arc::clone(&counters);
        let thread_queue = Arc::clone(&queue);
        let thread = std::thread::Builder::new()
            .name("keyclaim-redb-writer".into())
            .spawn(move || run(&slot, &thread_queue, &config, &thread_counters))
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
        }
    }

    /// Queues an operation and waits for its answer. Never blocks the
    /// calling thread: the queue is unbounded and the answer is awaited.
    pub(crate) async fn submit(&self, op: Op) -> Result<Reply> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            op,
            reply,
            span: tracing::Span::current(),
        };
        self.queue.push(job).map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Closes the queue and waits for the thread to finish it.
    pub(crate) fn shutdown(&mut self) {
        self.queue.close();
        if let Some(thread) = self.thread.take() {
            // A panicked writer has already failed its callers (their reply
            // senders were dropped); nothing more to report here.
            let _ = thread.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The writer loop: take a batch, run it, answer; flush relaxed commits.
fn run(slot: &DbSlot, queue: &JobQueue<Job>, config: &WriterConfig, counters: &Counters) {
    let flush_every = match config.durability {
        RedbDurability::Immediate => None,
        RedbDurability::Relaxed { flush_every } => Some(flush_every),
    };
    // Relaxed mode: when the newest commit that is not yet durable was made.
    let mut unflushed_since: Option<Instant> = None;
    // The size of the previous batch: about how many callers are waiting
    // on the writer at a time.
    let mut last_batch = 1;
    loop {
        let deadline = match (flush_every, unflushed_since) {
            (Some(every), Some(since)) => Some(since + every),
            _ => None,
        };
        let mut batch = match queue.take(config.max_batch, deadline) {
            Taken::Items(batch) => batch,
            Taken::TimedOut => {
                if flush(slot).is_ok() {
                    unflushed_since = None;
                }
                continue;
            }
            Taken::Closed => break,
        };
        if !config.linger.is_zero() && batch.len() < last_batch {
            // Opt-in: wait a little for the rest of the previous batch's
            // callers, whose next operations are on their way.
            queue.top_up(&mut batch, config.max_batch, last_batch, config.linger);
        }
        last_batch = batch.len();
        let durable = match (flush_every, unflushed_since) {
            (Some(every), Some(since)) => since.elapsed() >= every,
            (Some(_), None) => false,
            (None, _) => true,
        };
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
        let ran = run_batch(&db, batch, config, counters, durable);
        drop(db);
        if ran.committed {
            if durable {
                unflushed_since = None;
            } else if unflushed_since.is_none() {
                unflushed_since = Some(Instant::now());
            }
        }
        if ran.needs_reopen {
            // redb refuses every later operation on this handle: reopen
            // now (if it fails, the next batch tries again). Non-durable
            // commits of relaxed mode are lost with the handle.
            unflushed_since = None;
            if let Err(e) = slot.reopen() {
                tracing::warn!(error = %e, "reopening the redb file failed");
            }
        }
    }
    if unflushed_since.is_some() {
        let _ = flush(slot);
    }
}

/// An empty durable commit, which makes every earlier non-durable commit
/// durable.
fn flush(slot: &DbSlot) -> Result<(), Fatal> {
    let span = tracing::debug_span!("keyclaim.redb.flush");
    let _enter = span.enter();
    let db = slot.get("flush").map_err(Fatal::Other)?;
    let txn = db.begin_write()?;
    txn.commit()?;
    Ok(())
}

/// What running a batch did.
#[derive(Debug, Default)]
struct Ran {
    /// Some transaction committed.
    committed: bool,
    /// Some failure was an I/O error: the handle must be reopened.
    needs_reopen: bool,
}

/// Runs one batch; answers every job.
fn run_batch(
    db: &Database,
    batch: Vec<Job>,
    config: &WriterConfig,
    counters: &Counters,
    durable: bool,
) -> Ran {
    let span = tracing::debug_span!("keyclaim.redb.batch", ops = batch.len());
    let _enter = span.enter();
    let ops: Vec<&Job> = batch.iter().collect();
    match execute(db, &ops, config, durable) {
        Ok(results) => {
            counters.committed(batch.len());
            answer(batch, results);
            Ran {
                committed: true,
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
        Err(BatchError::Op(e)) if batch.len() == 1 || needs_reopen(&e) => {
            // Alone, or an I/O failure, after which the handle refuses
            // everything: no point in running the others one by one.
            counters.failed_batches.fetch_add(1, Ordering::Relaxed);
            fail_all(batch, &e);
            Ran {
                committed: false,
                needs_reopen: needs_reopen(&e),
            }
        }
        Err(BatchError::Op(e)) => {
            // Some operation failed half-way; the transaction was dropped.
            // Run each alone so that only the failing one fails.
            tracing::warn!(error = %e, "operation failed inside a batch; retrying one by one");
            counters.failed_batches.fetch_add(1, Ordering::Relaxed);
            let mut ran = Ran::default();
            for job in batch {
                if ran.needs_reopen {
                    fail_all(vec![job], &e);
                    continue;
                }
                match execute(db, &[&job], config, durable) {
                    Ok(results) => {
                        counters.committed(1);
                        answer(vec![job], results);
                        ran.committed = true;
                    }
                    Err(BatchError::Commit(e) | BatchError::Op(e)) => {
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
    Op(Arc<Error>),
    /// Opening the transaction or committing it failed.
    Commit(Arc<Error>),
}

/// Runs the jobs in one write transaction and commits it (or drops it when
/// no job wrote anything: an operation writes iff it reports changes, or
/// takes a sequence number). On `Ok`, every result is final (rejections
/// included) and the commit has returned.
fn execute(
    db: &Database,
    jobs: &[&Job],
    config: &WriterConfig,
    durable: bool,
) -> std::result::Result<Vec<Result<Reply>>, BatchError> {
    let commit_err = |f: Fatal| BatchError::Commit(Arc::new(f.into_error("commit")));
    let mut txn: WriteTransaction = db.begin_write().map_err(|e| commit_err(e.into()))?;
    if !durable {
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
                    return Err(BatchError::Op(Arc::new(e)));
                }
            }
        }
        let wrote = tables.finish().map_err(commit_err)?
            || results.iter().any(|r| r.as_ref().is_ok_and(Reply::wrote));
        if !wrote {
            // Only reads, retries and rejections: nothing to make durable,
            // so no commit and no fsync.
            drop(tables);
            txn.abort().map_err(|e| commit_err(e.into()))?;
            return Ok(results);
        }
    }
    txn.commit().map_err(|e| commit_err(e.into()))?;
    Ok(results)
}

/// One operation on the batch's tables.
fn apply(
    tables: &mut WriteTables<'_>,
    op: &Op,
    limits: &Limits,
) -> std::result::Result<Result<Reply>, Fatal> {
    Ok(match op {
        Op::Upload(upload) => ops::upload(tables, upload, None, limits)?.map(Reply::Upload),
        Op::Claim { targets, fall_back } => {
            Ok(Reply::Claim(ops::claim(tables, targets, *fall_back)?))
        }
        Op::ClaimFallbacks(targets) => Ok(Reply::Claim(ops::claim_fallbacks(tables, targets)?)),
        Op::Reset(device, scope) => Ok(Reply::Upload(ops::reset_one_time_keys(
            tables, device, scope,
        )?)),
        Op::Replace { previous, upload } => {
            ops::upload(tables, upload, previous.as_ref(), limits)?.map(Reply::Upload)
        }
        Op::DeleteDevice(device) => Ok(Reply::Changes(ops::delete_device(tables, device)?)),
        Op::DeleteUser(user) => Ok(Reply::Changes(ops::delete_user(tables, user)?)),
        Op::Import(snapshot) => Ok(Reply::Changes(ops::import_device(tables, snapshot)?)),
    })
}

/// Sends committed results. (Core reports the changes, R11.1.)
fn answer(batch: Vec<Job>, results: Vec<Result<Reply>>) {
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
