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
//!   every operation of the batch gets the error (none of them was applied).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use keyclaim::{
    ChangeNotifier, Changes, ClaimOutcome, ClaimTarget, Device, DeviceSnapshot, Error, Limits,
    Result, Upload, UploadOutcome, UserId,
};
use redb::{Database, WriteTransaction};
use tokio::sync::oneshot;

use crate::ops::{self, Fatal, WriteTables};
use crate::{BACKEND, RedbDurability, WriterStats};

/// One mutating operation.
#[derive(Debug)]
pub(crate) enum Op {
    Upload(Upload),
    Claim(Vec<ClaimTarget>),
    DeleteDevice(Device),
    DeleteUser(UserId),
    Import(DeviceSnapshot),
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Self::Upload(_) => "upload",
            Self::Claim(_) => "claim",
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
    Claim(ClaimOutcome),
    Changes(Changes),
}

impl Reply {
    fn changes(&self) -> &Changes {
        match self {
            Self::Upload(o) => &o.changes,
            Self::Claim(o) => &o.changes,
            Self::Changes(c) => c,
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

/// The handle of the writer thread. Dropping it closes the queue, lets the
/// thread finish what was queued, and joins it.
#[derive(Debug)]
pub(crate) struct Writer {
    tx: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
}

/// What the writer has done so far.
#[derive(Debug, Default)]
struct Counters {
    commits: AtomicU64,
    operations: AtomicU64,
    largest_batch: AtomicU64,
    failed_batches: AtomicU64,
}

impl Counters {
    fn committed(&self, ops: usize) {
        let ops = ops as u64;
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.operations.fetch_add(ops, Ordering::Relaxed);
        self.largest_batch.fetch_max(ops, Ordering::Relaxed);
    }
}

impl Writer {
    /// Starts the writer thread on `db`.
    ///
    /// # Errors
    /// [`Error::Storage`] when the thread cannot be spawned.
    pub(crate) fn start(
        db: Arc<Database>,
        config: WriterConfig,
        notifier: ChangeNotifier,
    ) -> Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let counters = Arc::new(Counters::default());
        let thread_counters = Arc::clone(&counters);
        let thread = std::thread::Builder::new()
            .name("keyclaim-redb-writer".into())
            .spawn(move || run(&db, &rx, &config, &notifier, &thread_counters))
            .map_err(|e| Error::storage(BACKEND, "open", false, e))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            counters,
        })
    }

    /// A snapshot of the counters.
    pub(crate) fn stats(&self) -> WriterStats {
        WriterStats {
            commits: self.counters.commits.load(Ordering::Relaxed),
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
        self.tx
            .as_ref()
            .ok_or(Error::Closed)?
            .send(job)
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Closes the queue and waits for the thread to finish it.
    pub(crate) fn shutdown(&mut self) {
        self.tx = None;
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
fn run(
    db: &Database,
    rx: &Receiver<Job>,
    config: &WriterConfig,
    notifier: &ChangeNotifier,
    counters: &Counters,
) {
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
        let first = match (flush_every, unflushed_since) {
            (Some(every), Some(since)) => {
                let wait = every.saturating_sub(since.elapsed());
                match rx.recv_timeout(wait) {
                    Ok(job) => Some(job),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            _ => match rx.recv() {
                Ok(job) => Some(job),
                Err(_) => break,
            },
        };
        let Some(first) = first else {
            if flush(db).is_ok() {
                unflushed_since = None;
            }
            continue;
        };
        let batch = gather(rx, first, config, last_batch);
        last_batch = batch.len();
        let durable = match (flush_every, unflushed_since) {
            (Some(every), Some(since)) => since.elapsed() >= every,
            (Some(_), None) => false,
            (None, _) => true,
        };
        if run_batch(db, batch, config, notifier, counters, durable) {
            if durable {
                unflushed_since = None;
            } else if unflushed_since.is_none() {
                unflushed_since = Some(Instant::now());
            }
        }
    }
    if unflushed_since.is_some() {
        let _ = flush(db);
    }
}

/// Collects a batch: everything already queued, then, when the previous
/// batch was bigger than what is queued now, up to `config.linger` more for
/// the callers of the previous batch, who are sending their next operation
/// just now. Without that wait, the writer would start a transaction for the
/// first one or two callers back and make the rest wait a whole commit.
fn gather(rx: &Receiver<Job>, first: Job, config: &WriterConfig, last_batch: usize) -> Vec<Job> {
    let mut batch = vec![first];
    while batch.len() < config.max_batch {
        match rx.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    let want = last_batch.min(config.max_batch);
    if batch.len() < want && !config.linger.is_zero() {
        let deadline = Instant::now() + config.linger;
        while batch.len() < want {
            match rx.recv_deadline(deadline) {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
    }
    batch
}

/// An empty durable commit, which makes every earlier non-durable commit
/// durable.
fn flush(db: &Database) -> Result<(), Fatal> {
    let txn = db.begin_write()?;
    txn.commit()?;
    Ok(())
}

/// Runs one batch; answers every job. Returns whether anything committed.
fn run_batch(
    db: &Database,
    batch: Vec<Job>,
    config: &WriterConfig,
    notifier: &ChangeNotifier,
    counters: &Counters,
    durable: bool,
) -> bool {
    let span = tracing::debug_span!("keyclaim_redb.batch", ops = batch.len());
    let _enter = span.enter();
    let ops: Vec<&Job> = batch.iter().collect();
    match execute(db, &ops, config, durable) {
        Ok(results) => {
            counters.committed(batch.len());
            answer(batch, results, notifier);
            true
        }
        Err(BatchError::Commit(e)) => {
            tracing::warn!(error = %e, "batch commit failed");
            counters.failed_batches.fetch_add(1, Ordering::Relaxed);
            fail_all(batch, &e);
            false
        }
        Err(BatchError::Op(e)) if batch.len() == 1 => {
            counters.failed_batches.fetch_add(1, Ordering::Relaxed);
            fail_all(batch, &e);
            false
        }
        Err(BatchError::Op(e)) => {
            // Some operation failed half-way; the transaction was dropped.
            // Run each alone so that only the failing one fails.
            tracing::warn!(error = %e, "operation failed inside a batch; retrying one by one");
            counters.failed_batches.fetch_add(1, Ordering::Relaxed);
            let mut any = false;
            for job in batch {
                match execute(db, &[&job], config, durable) {
                    Ok(results) => {
                        counters.committed(1);
                        answer(vec![job], results, notifier);
                        any = true;
                    }
                    Err(BatchError::Commit(e) | BatchError::Op(e)) => {
                        counters.failed_batches.fetch_add(1, Ordering::Relaxed);
                        fail_all(vec![job], &e);
                    }
                }
            }
            any
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

/// Runs the jobs in one write transaction and commits it. On `Ok`, every
/// result is final (rejections included) and the commit has returned.
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
        tables.finish().map_err(commit_err)?;
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
        Op::Upload(upload) => ops::upload(tables, upload, limits)?.map(Reply::Upload),
        Op::Claim(targets) => Ok(Reply::Claim(ops::claim(tables, targets, limits)?)),
        Op::DeleteDevice(device) => Ok(Reply::Changes(ops::delete_device(tables, device)?)),
        Op::DeleteUser(user) => Ok(Reply::Changes(ops::delete_user(tables, user)?)),
        Op::Import(snapshot) => Ok(Reply::Changes(ops::import_device(tables, snapshot)?)),
    })
}

/// Sends committed results: change notifications first, so that a caller
/// that subscribed before its call sees the event when the call returns.
fn answer(batch: Vec<Job>, results: Vec<Result<Reply>>, notifier: &ChangeNotifier) {
    for (job, result) in batch.into_iter().zip(results) {
        if let Ok(reply) = &result {
            notifier.notify(reply.changes());
        }
        // The caller may have gone away (its future was dropped); the
        // operation is committed all the same.
        let _ = job.reply.send(result);
    }
}

fn fail_all(batch: Vec<Job>, error: &Arc<Error>) {
    for job in batch {
        let _ = job.reply.send(Err(clone_error(error, job.op.name())));
    }
}

/// Every caller of a failed batch gets its own error value, with the shared
/// cause as its source.
fn clone_error(error: &Arc<Error>, op: &'static str) -> Error {
    match &**error {
        Error::Corrupt(what) => Error::Corrupt(what.clone()),
        Error::UnsupportedVersion {
            backend,
            found,
            supported,
        } => Error::UnsupportedVersion {
            backend,
            found: *found,
            supported: *supported,
        },
        Error::Closed => Error::Closed,
        other => Error::storage(
            BACKEND,
            op,
            other.is_retryable(),
            SharedError(Arc::clone(error)),
        ),
    }
}

/// A shared error as a source.
#[derive(Debug)]
struct SharedError(Arc<Error>);

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// How long relaxed mode waits at most before making commits durable, by
/// default.
pub(crate) const DEFAULT_FLUSH_EVERY: Duration = Duration::from_millis(100);
