// Over 500 lines: about 190 are the unit tests of group commit, kept beside it.
//! The writer thread and its group commit.
//!
//! One thread owns the write connection. Mutating operations arrive over a
//! channel, each with a oneshot for its answer. The thread takes what has
//! queued up (while the previous transaction was being committed and synced)
//! into one `BEGIN IMMEDIATE` transaction, runs each operation inside its own
//! `SAVEPOINT`, so that a failing operation (a conflict, a limit) rolls back
//! only itself, then commits once: one sync of the WAL for the whole batch.
//!
//! Operations that can fail only when storage fails (claims: their input was
//! checked before they were queued) run without a savepoint of their own,
//! which saves the savepoint's statements and its copies of the pages it
//! touches. If one of them fails after all, the whole transaction is rolled
//! back and the batch runs again, this time every operation in its own
//! savepoint: the outcome is the same as if savepoints had been used from the
//! start. Operations run more than once this way are pure functions of the
//! store's state, and only the answer of the last run is kept.
//! Answers are sent only after `COMMIT` succeeded; if the transaction fails as
//! a whole, every operation of the batch gets the error and nothing of it was
//! applied.
//!
//! Overload and abandoned operations (R10.6): the channel holds at most
//! [`SqliteOptions::max_queued`] operations; past that, [`Writer::submit`]
//! fails at once with a retryable error. An operation whose caller has gone
//! away (its future was dropped, so its answer's receiver is closed) is not
//! run: it is dropped when the writer takes it from the channel, and, since
//! the writer may then wait for the file's lock for a long time, checked
//! again inside the transaction right before it would run. So a claim that
//! timed out while it waited never uses up keys for nobody; one whose caller
//! goes away while it runs or commits is applied (R4.2).
//!
//! No transaction outlives its batch: if one is still open afterwards (its
//! `ROLLBACK` failed), the writer closes the connection, which rolls it back
//! and releases the file's write lock, and opens a new one for the next
//! batch ([`WriteConnection`]).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use keyclaim::backend::writer;
use keyclaim::{Changes, ClaimOutcome, Device, Error, Limits, Result, UploadOutcome};
use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::changes::ChangeLog;
use crate::error::{self, BatchFailure};
use crate::schema::{self, Role};
use crate::{BACKEND, SqliteOptions};

/// Whether an operation can fail for reasons of its own, and so needs a
/// savepoint in a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fallible {
    /// It can fail on its input or the store's state (a conflict, a limit):
    /// always run in its own savepoint.
    OnInput,
    /// It fails only when storage fails: run without a savepoint unless the
    /// batch is being run again after such a failure.
    OnStorageOnly,
}

/// What a mutating operation answers: it names the devices it changed
/// (R11.1), which the batch records for the other processes (R11.2).
pub(crate) trait Answer: Send + 'static {
    /// The devices the operation changed.
    fn changed(&self) -> &[Device];
}

impl Answer for Changes {
    fn changed(&self) -> &[Device] {
        self.devices()
    }
}

impl Answer for UploadOutcome {
    fn changed(&self) -> &[Device] {
        self.changes.devices()
    }
}

impl Answer for ClaimOutcome {
    fn changed(&self) -> &[Device] {
        self.changes.devices()
    }
}

/// An operation that changes nothing (tests).
impl Answer for () {
    fn changed(&self) -> &[Device] {
        &[]
    }
}

/// One queued mutating operation, type-erased.
pub(crate) trait Job: Send {
    /// Runs the operation inside the open transaction (and its savepoint,
    /// if any); keeps the result, replacing that of an earlier run; returns
    /// whether it succeeded. May be called again when the batch is rerun.
    fn run(&mut self, conn: &Connection, limits: &Limits) -> bool;
    /// Whether the operation needs a savepoint on the batch's first run.
    fn fallible(&self) -> Fallible;
    /// Whether its caller has gone away (dropped the answer's receiver):
    /// then it must not be applied (R10.6).
    fn abandoned(&self) -> bool;
    /// The devices its last run changed, if it succeeded.
    fn changed(&self) -> &[Device];
    /// Sends the answer: the kept result if the transaction committed (or if
    /// the operation failed on its own), else the batch's failure.
    fn reply(self: Box<Self>, batch: Result<(), BatchFailure>);
}

/// A [`Job`] running `f` and answering over a oneshot.
struct TypedJob<T, F> {
    op: &'static str,
    fallible: Fallible,
    span: tracing::Span,
    f: F,
    result: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
}

impl<T, F> Job for TypedJob<T, F>
where
    T: Answer,
    F: Fn(&Connection, &Limits) -> Result<T> + Send,
{
    fn changed(&self) -> &[Device] {
        match &self.result {
            Some(Ok(answer)) => answer.changed(),
            _ => &[],
        }
    }

    fn fallible(&self) -> Fallible {
        self.fallible
    }

    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    fn run(&mut self, conn: &Connection, limits: &Limits) -> bool {
        if self.abandoned() {
            // Nobody waits for the answer: do nothing (R10.6). Also on a
            // rerun, whose first run was rolled back.
            self.result = None;
            return true;
        }
        let _entered = self.span.enter();
        let f = &self.f;
        let result = catch_unwind(AssertUnwindSafe(|| f(conn, limits))).unwrap_or_else(|_| {
            tracing::error!(
                op = self.op,
                "keyclaim-sqlite: operation panicked; rolled back"
            );
            Err(error::panicked(self.op))
        });
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn reply(self: Box<Self>, batch: Result<(), BatchFailure>) {
        let answer = match (self.result, batch) {
            // The operation's own failure: rolled back to its savepoint.
            (Some(Err(e)), _) => Err(e),
            (Some(Ok(value)), Ok(())) => Ok(value),
            (_, Err(failure)) => Err(failure.to_error(self.op)),
            (None, Ok(())) => Err(error::did_not_run(self.op)),
        };
        // The caller may have gone away (its future was dropped): fine.
        let _ = self.reply.send(answer);
    }
}

/// The handle on the writer thread. Dropping it closes the channel and joins
/// the thread, which finishes the queued operations and closes the
/// connection (so the file is released when the drop returns).
#[derive(Debug)]
pub(crate) struct Writer {
    tx: Option<Sender<Box<dyn Job>>>,
    thread: Option<JoinHandle<()>>,
    bound: usize,
}

impl Writer {
    /// Starts the thread: it opens the file, migrates it, and then serves
    /// operations. Returns once the file is open and migrated.
    pub(crate) async fn start(path: PathBuf, options: SqliteOptions, origin: i64) -> Result<Self> {
        let bound = options.get_max_queued();
        let (tx, rx) = crossbeam_channel::bounded::<Box<dyn Job>>(bound);
        let (ready_tx, ready_rx) = oneshot::channel::<Result<()>>();
        // Opening and migrating belong to the caller's `keyclaim.sqlite.open`.
        let open_span = tracing::Span::current();
        let thread = std::thread::Builder::new()
            .name("keyclaim-sqlite-writer".into())
            .spawn(move || {
                let conn = open_span.in_scope(|| WriteConnection::open(path, options, origin));
                drop(open_span);
                match conn {
                    Ok(mut conn) => {
                        if ready_tx.send(Ok(())).is_ok() {
                            serve(&mut conn, &rx);
                        }
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(error::spawn_failed)?;
        let writer = Self {
            tx: Some(tx),
            thread: Some(thread),
            bound,
        };
        match ready_rx.await {
            Ok(Ok(())) => Ok(writer),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Closed),
        }
    }

    /// Queues an operation and waits for its answer, which comes after its
    /// transaction committed. `f` may run more than once (see the module
    /// documentation); only its last result counts. Fails at once, with a
    /// retryable error, when the queue is full; dropping the returned
    /// future before the writer runs `f` means it never runs (R10.6).
    pub(crate) async fn submit<T, F>(&self, op: &'static str, fallible: Fallible, f: F) -> Result<T>
    where
        T: Answer,
        F: Fn(&Connection, &Limits) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Box::new(TypedJob {
            op,
            fallible,
            span: tracing::Span::current(),
            f,
            result: None,
            reply,
        });
        match self.tx.as_ref().ok_or(Error::Closed)?.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(writer::queue_full(BACKEND, op, "write", self.bound));
            }
            Err(TrySendError::Disconnected(_)) => return Err(Error::Closed),
        }
        answer.await.map_err(|_| Error::Closed)?
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The thread's loop: wait for one operation, take whatever else has queued
/// up (at most `max_batch` in all), leave out those whose caller has gone
/// away, run the others as one transaction.
fn serve(conn: &mut WriteConnection, rx: &Receiver<Box<dyn Job>>) {
    let max_batch = conn.options.get_max_batch().max(1);
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(max_batch);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // R10.6: nobody waits for these; they are not applied.
        batch.retain(|job| !job.abandoned());
        if !batch.is_empty() {
            serve_batch(conn, &mut batch);
        }
    }
}

/// The writer thread's connection, reopened when a batch leaves it inside a
/// transaction that it cannot end (a `ROLLBACK` that failed, for instance on
/// an I/O error). Such a connection would keep the file's write lock, so that
/// no other process could write, and fail every later batch's `BEGIN`;
/// closing it rolls the transaction back and releases the lock.
pub(crate) struct WriteConnection {
    path: PathBuf,
    options: SqliteOptions,
    conn: Option<Connection>,
    log: ChangeLog,
}

impl WriteConnection {
    /// Opens the file (creating it if needed) and migrates it; the changes
    /// it commits are recorded as made by `origin` (R11.2).
    pub(crate) fn open(path: PathBuf, options: SqliteOptions, origin: i64) -> Result<Self> {
        let conn = schema::open_connection(&path, &options, Role::Writer)?;
        schema::migrate(&conn, options.get_busy_timeout())?;
        Ok(Self {
            path,
            options,
            conn: Some(conn),
            log: ChangeLog::new(origin),
        })
    }

    /// The connection, opened again if it was closed.
    fn get(&mut self) -> Result<(&Connection, &mut ChangeLog), BatchFailure> {
        if self.conn.is_none() {
            let conn = schema::open_connection(&self.path, &self.options, Role::Writer)
                .map_err(BatchFailure::reopen_failed)?;
            tracing::info!("keyclaim-sqlite: reopened the write connection");
            self.conn = Some(conn);
        }
        let conn = self
            .conn
            .as_ref()
            .ok_or_else(BatchFailure::aborted_by_batch_mate)?;
        Ok((conn, &mut self.log))
    }

    /// Makes sure no transaction outlives a batch: if one is still open
    /// (its `ROLLBACK` failed), tries `ROLLBACK` again, and if the connection
    /// is still inside it, closes the connection; the next batch opens a
    /// new one.
    fn settle(&mut self) {
        let Some(conn) = &self.conn else {
            return;
        };
        if conn.is_autocommit() {
            return;
        }
        let retried = conn.execute_batch("ROLLBACK");
        if conn.is_autocommit() {
            return;
        }
        tracing::error!(
            error = ?retried.err(),
            "keyclaim-sqlite: the write connection cannot end its transaction; closing it"
        );
        if let Some(conn) = self.conn.take()
            && let Err((conn, e)) = conn.close()
        {
            // Dropping it tries to close it once more.
            tracing::error!(error = %e, "keyclaim-sqlite: closing the write connection failed");
            drop(conn);
        }
    }
}

/// Runs a batch on the writer's connection (reopened first if it was
/// closed); afterwards no transaction is left open.
fn serve_batch(conn: &mut WriteConnection, batch: &mut Vec<Box<dyn Job>>) {
    let limits = conn.options.get_limits().clone();
    match conn.get() {
        Ok((c, log)) => run_batch(c, batch, &limits, log),
        Err(failure) => {
            tracing::warn!(error = %failure.source, "keyclaim-sqlite: no write connection");
            for job in batch.drain(..) {
                job.reply(Err(failure.clone()));
            }
        }
    }
    conn.settle();
}

/// Runs a batch as one transaction and answers every operation in it.
pub(crate) fn run_batch(
    conn: &Connection,
    batch: &mut Vec<Box<dyn Job>>,
    limits: &Limits,
    log: &mut ChangeLog,
) {
    let span = tracing::debug_span!("keyclaim.sqlite.batch", size = batch.len());
    let _entered = span.enter();
    let outcome = run_transaction(conn, batch, limits, log);
    if let Err(failure) = &outcome {
        tracing::warn!(
            size = batch.len(),
            retryable = failure.retryable,
            error = %failure.source,
            "keyclaim-sqlite: batch transaction failed"
        );
    }
    for job in batch.drain(..) {
        job.reply(outcome.clone());
    }
}

fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

fn run_transaction(
    conn: &Connection,
    batch: &mut [Box<dyn Job>],
    limits: &Limits,
    log: &mut ChangeLog,
) -> Result<(), BatchFailure> {
    let start = Instant::now();
    exec(conn, "BEGIN IMMEDIATE").map_err(BatchFailure::from_sql)?;
    let locked = Instant::now();
    let mut body = run_jobs(conn, batch, limits, Savepoints::WhereFallible);
    let mut rerun = false;
    if matches!(body, Err(Rerun::WithSavepoints)) {
        // An operation without a savepoint failed: start over, every
        // operation in its own savepoint.
        rerun = true;
        if !conn.is_autocommit() {
            exec(conn, "ROLLBACK").map_err(BatchFailure::from_sql)?;
        }
        exec(conn, "BEGIN IMMEDIATE").map_err(BatchFailure::from_sql)?;
        body = run_jobs(conn, batch, limits, Savepoints::Everywhere);
    }
    let ran = Instant::now();
    let body = body
        .map_err(Rerun::into_failure)
        // In the same transaction: the other processes hear of exactly the
        // changes that commit (R11.2).
        .and_then(|()| {
            log.record(conn, batch.iter().flat_map(|job| job.changed()))
                .map_err(BatchFailure::from_sql)
        })
        .and_then(|()| exec(conn, "COMMIT").map_err(BatchFailure::from_sql));
    let committed = Instant::now();
    tracing::debug!(
        size = batch.len(),
        rerun,
        lock_us = micros(locked - start),
        run_us = micros(ran - locked),
        commit_us = micros(committed - ran),
        ok = body.is_ok(),
        "keyclaim-sqlite: batch"
    );
    if body.is_err() && !conn.is_autocommit() {
        // Nothing of the batch may stay behind; the error to report is the
        // one that got us here.
        let _ = exec(conn, "ROLLBACK");
    }
    body
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Which operations of a batch get a savepoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Savepoints {
    /// Those that can fail on their input ([`Fallible::OnInput`]).
    WhereFallible,
    /// All of them (the rerun after a failure).
    Everywhere,
}

/// Why running a batch's operations stopped.
#[derive(Debug)]
enum Rerun {
    /// An operation without a savepoint failed: rerun with savepoints.
    WithSavepoints,
    /// The transaction failed as a whole.
    Failed(BatchFailure),
}

impl Rerun {
    fn into_failure(self) -> BatchFailure {
        match self {
            Self::Failed(failure) => failure,
            // Not reached: the rerun uses savepoints everywhere.
            Self::WithSavepoints => BatchFailure::aborted_by_batch_mate(),
        }
    }
}

impl From<BatchFailure> for Rerun {
    fn from(failure: BatchFailure) -> Self {
        Self::Failed(failure)
    }
}

fn run_jobs(
    conn: &Connection,
    batch: &mut [Box<dyn Job>],
    limits: &Limits,
    savepoints: Savepoints,
) -> Result<(), Rerun> {
    if let [job] = batch {
        // Alone in its transaction: no batch-mate to protect, so no
        // savepoint; if it fails, the whole transaction is rolled back.
        return if job.run(conn, limits) {
            Ok(())
        } else {
            Err(BatchFailure::sole_operation_failed().into())
        };
    }
    for job in batch.iter_mut() {
        if savepoints == Savepoints::WhereFallible && job.fallible() == Fallible::OnStorageOnly {
            if !job.run(conn, limits) {
                return Err(Rerun::WithSavepoints);
            }
            continue;
        }
        exec(conn, "SAVEPOINT op").map_err(BatchFailure::from_sql)?;
        let ok = job.run(conn, limits);
        if conn.is_autocommit() {
            // SQLite ended the whole transaction on this operation's error
            // (I/O error, disk full, ...): the batch-mates' work is gone.
            return Err(BatchFailure::aborted_by_batch_mate().into());
        }
        if !ok {
            exec(conn, "ROLLBACK TO op").map_err(BatchFailure::from_sql)?;
        }
        exec(conn, "RELEASE op").map_err(BatchFailure::from_sql)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Arc;

    use keyclaim::{ClaimTarget, Device, KeyId, KeyJson, Upload};

    fn device(d: &str) -> Device {
        Device::parse("@alice:example.org", d).unwrap()
    }

    fn key(id: &str, k: &str) -> (KeyId, KeyJson) {
        (
            KeyId::parse(id).unwrap(),
            KeyJson::from_value(&serde_json::json!({"key": k, "signatures": {}})).unwrap(),
        )
    }

    fn upload(d: &str, keys: &[(&str, &str)]) -> Upload {
        Upload::from_keys(device(d), keys.iter().map(|(i, k)| key(i, k)), []).unwrap()
    }

    fn job<T: Answer>(
        f: impl Fn(&Connection, &Limits) -> Result<T> + Send + 'static,
    ) -> (Box<dyn Job>, oneshot::Receiver<Result<T>>) {
        job_of(Fallible::OnInput, f)
    }

    fn job_of<T: Answer>(
        fallible: Fallible,
        f: impl Fn(&Connection, &Limits) -> Result<T> + Send + 'static,
    ) -> (Box<dyn Job>, oneshot::Receiver<Result<T>>) {
        let (reply, rx) = oneshot::channel();
        let job = Box::new(TypedJob {
            op: "test",
            fallible,
            span: tracing::Span::none(),
            f,
            result: None,
            reply,
        });
        (job, rx)
    }

    fn open() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteOptions::default();
        let conn =
            schema::open_connection(&dir.path().join("db.sqlite"), &options, Role::Writer).unwrap();
        schema::migrate(&conn, options.get_busy_timeout()).unwrap();
        (dir, conn)
    }

    fn count(conn: &Connection, d: &str) -> u64 {
        crate::ops::otk_counts(conn, &device(d)).unwrap().total()
    }

    #[test]
    fn a_failing_operation_does_not_fail_its_batch_mates() {
        let (_dir, conn) = open();
        let limits = Limits::default();
        let first = upload("A", &[("alg:1", "one")]);
        // Conflicts with `first` (same ID, other content) in the same batch.
        let conflicting = upload("A", &[("alg:1", "other"), ("alg:2", "two")]);
        let third = upload("B", &[("alg:1", "b")]);
        let (j1, r1) = job(move |c, l| crate::ops::upload(c, &first, l));
        let (j2, r2) = job(move |c, l| crate::ops::upload(c, &conflicting, l));
        let (j3, r3) = job(move |c, l| crate::ops::upload(c, &third, l));
        // An operation that writes, then fails: its write must be undone.
        let (j4, r4) = job(|c, l| {
            crate::ops::upload(c, &upload("C", &[("alg:1", "c")]), l)?;
            Err::<(), _>(Error::Closed)
        });
        let (j5, r5) = job(|c, _| {
            crate::ops::claim(c, &[ClaimTarget::one(device("B"), "alg".parse()?)], true)
        });
        let mut batch = vec![j1, j2, j4, j3, j5];
        run_batch(&conn, &mut batch, &limits, &mut ChangeLog::new(0));

        assert!(r1.blocking_recv().unwrap().is_ok());
        assert!(matches!(
            r2.blocking_recv().unwrap(),
            Err(Error::Conflict { .. })
        ));
        assert!(r3.blocking_recv().unwrap().is_ok());
        assert!(matches!(r4.blocking_recv().unwrap(), Err(Error::Closed)));
        assert_eq!(r5.blocking_recv().unwrap().unwrap().keys.len(), 1);
        assert_eq!(
            count(&conn, "A"),
            1,
            "the conflicting upload stored nothing"
        );
        assert_eq!(count(&conn, "B"), 0, "claimed within the batch");
        assert_eq!(
            count(&conn, "C"),
            0,
            "the failed operation's write was rolled back"
        );
        assert!(conn.is_autocommit(), "the transaction is closed");
    }

    /// An operation without a savepoint that fails makes the batch run
    /// again with savepoints: its batch-mates still succeed, once, and its
    /// own writes are undone.
    #[test]
    fn a_failing_operation_without_savepoint_reruns_the_batch_with_savepoints() {
        let (_dir, conn) = open();
        let limits = Limits::default();
        let a = upload("A", &[("alg:1", "one"), ("alg:2", "two")]);
        let (j1, r1) = job(move |c, l| crate::ops::upload(c, &a, l));
        let claim_a = || ClaimTarget::one(device("A"), "alg".parse().unwrap());
        let (j2, r2) = job_of(Fallible::OnStorageOnly, move |c, _| {
            crate::ops::claim(c, &[claim_a()], true)
        });
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&runs);
        let (j3, r3) = job_of(Fallible::OnStorageOnly, move |c, l| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            crate::ops::upload(c, &upload("C", &[("alg:1", "c")]), l)?;
            Err::<(), _>(Error::Closed)
        });
        let b = upload("B", &[("alg:1", "b")]);
        let (j4, r4) = job(move |c, l| crate::ops::upload(c, &b, l));
        let mut batch = vec![j1, j2, j3, j4];
        run_batch(&conn, &mut batch, &limits, &mut ChangeLog::new(0));

        assert!(r1.blocking_recv().unwrap().is_ok());
        let claimed = r2.blocking_recv().unwrap().unwrap();
        assert_eq!(
            claimed.keys.len(),
            1,
            "the claim's answer is its last run's"
        );
        assert!(matches!(r3.blocking_recv().unwrap(), Err(Error::Closed)));
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert!(r4.blocking_recv().unwrap().is_ok());
        assert_eq!(count(&conn, "A"), 1, "one key claimed, once");
        assert_eq!(count(&conn, "B"), 1);
        assert_eq!(
            count(&conn, "C"),
            0,
            "the failed operation's write was undone"
        );
        assert!(conn.is_autocommit());
    }

    /// R10.7: a claim that meets a stored key that does not read back fails
    /// alone, before commit, using up nothing; its batch-mates' claims (run
    /// again, each in its own savepoint) succeed once.
    #[test]
    fn a_claim_meeting_a_corrupt_key_fails_alone_and_takes_nothing() {
        let (_dir, conn) = open();
        let limits = Limits::default();
        for d in ["A", "B", "C"] {
            let up = upload(d, &[("alg:1", d), ("alg:2", d)]);
            crate::ops::upload(&conn, &up, &limits).unwrap();
        }
        let damaged = conn
            .execute(
                "UPDATE one_time_key SET key_json = '{\"key\": ' \
                 WHERE device_id = 'A' AND key_id = 'alg:1'",
                [],
            )
            .unwrap();
        assert_eq!(damaged, 1);
        let claim = |d: &'static str| {
            job_of(Fallible::OnStorageOnly, move |c, _| {
                crate::ops::claim(c, &[ClaimTarget::one(device(d), "alg".parse()?)], true)
            })
        };
        let (jb, rb) = claim("B");
        let (ja, ra) = claim("A");
        let (jc, rc) = claim("C");
        run_batch(
            &conn,
            &mut vec![jb, ja, jc],
            &limits,
            &mut ChangeLog::new(0),
        );
        assert!(matches!(
            ra.blocking_recv().unwrap(),
            Err(Error::Corrupt { .. })
        ));
        assert_eq!(rb.blocking_recv().unwrap().unwrap().keys.len(), 1);
        assert_eq!(rc.blocking_recv().unwrap().unwrap().keys.len(), 1);
        assert_eq!(count(&conn, "A"), 2, "no key of A was used up");
        assert_eq!(count(&conn, "B"), 1);
        assert_eq!(count(&conn, "C"), 1);
        assert!(conn.is_autocommit());
    }

    #[test]
    fn a_failed_commit_fails_every_operation_and_applies_nothing() {
        let (_dir, conn) = open();
        conn.execute_batch(
            "PRAGMA foreign_keys = ON;
             CREATE TEMP TABLE parent (id INTEGER PRIMARY KEY);
             CREATE TEMP TABLE child (p INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);",
        )
        .unwrap();
        let a = upload("A", &[("alg:1", "one")]);
        let (j1, r1) = job(move |c, l| crate::ops::upload(c, &a, l));
        // Violates a deferred foreign key: COMMIT fails.
        let (j2, r2) = job(|c, _| {
            c.execute("INSERT INTO child (p) VALUES (42)", [])
                .map(drop)
                .map_err(|e| error::sql_error("test", e))
        });
        let mut batch = vec![j1, j2];
        run_batch(
            &conn,
            &mut batch,
            &Limits::default(),
            &mut ChangeLog::new(0),
        );
        assert!(matches!(
            r1.blocking_recv().unwrap(),
            Err(Error::Storage { .. })
        ));
        assert!(matches!(
            r2.blocking_recv().unwrap(),
            Err(Error::Storage { .. })
        ));
        assert!(conn.is_autocommit());
        assert_eq!(count(&conn, "A"), 0);
    }

    #[test]
    fn an_operation_that_ends_the_transaction_aborts_the_batch() {
        let (_dir, conn) = open();
        let a = upload("A", &[("alg:1", "one")]);
        let (j1, r1) = job(move |c, l| crate::ops::upload(c, &a, l));
        // Stands for SQLite rolling the transaction back on its own.
        let (j2, r2) = job(|c, _| {
            c.execute_batch("ROLLBACK")
                .map_err(|e| error::sql_error("test", e))
        });
        let b = upload("B", &[("alg:1", "two")]);
        let (j3, r3) = job(move |c, l| crate::ops::upload(c, &b, l));
        let mut batch = vec![j1, j2, j3];
        run_batch(
            &conn,
            &mut batch,
            &Limits::default(),
            &mut ChangeLog::new(0),
        );
        let e1 = r1.blocking_recv().unwrap().unwrap_err();
        assert!(e1.is_retryable(), "{e1}");
        assert!(r2.blocking_recv().unwrap().is_err());
        assert!(r3.blocking_recv().unwrap().unwrap_err().is_retryable());
        assert_eq!(count(&conn, "A") + count(&conn, "B"), 0);
    }

    /// A `ROLLBACK` that fails leaves no transaction open: the writer closes
    /// its connection (which rolls back and releases the write lock, so
    /// another process can write at once) and opens a new one for the next
    /// batch, which succeeds; the failed batch left nothing behind.
    #[test]
    fn a_failed_rollback_reopens_the_connection_and_releases_the_lock() {
        use rusqlite::hooks::{AuthAction, AuthContext, Authorization, TransactionOperation};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let mut writer = WriteConnection::open(path.clone(), SqliteOptions::default(), 0).unwrap();
        // SQLite refuses every ROLLBACK on the writer's connection.
        let conn = writer.conn.as_mut().unwrap();
        conn.authorizer(Some(|ctx: AuthContext<'_>| match ctx.action {
            AuthAction::Transaction {
                operation: TransactionOperation::Rollback,
            } => Authorization::Deny,
            _ => Authorization::Allow,
        }))
        .unwrap();
        // A batch that writes and fails, and so must be rolled back.
        let (j1, r1) = job(|c, l| {
            crate::ops::upload(c, &upload("A", &[("alg:1", "a")]), l)?;
            Err::<(), _>(Error::Closed)
        });
        serve_batch(&mut writer, &mut vec![j1]);
        assert!(matches!(r1.blocking_recv().unwrap(), Err(Error::Closed)));

        let other = Connection::open(&path).unwrap();
        other.busy_timeout(Duration::ZERO).unwrap();
        other
            .execute_batch("BEGIN IMMEDIATE; ROLLBACK")
            .expect("the write lock was released");
        let b = upload("B", &[("alg:1", "b")]);
        let (j2, r2) = job(move |c, l| crate::ops::upload(c, &b, l));
        serve_batch(&mut writer, &mut vec![j2]);
        r2.blocking_recv().unwrap().unwrap();
        assert_eq!(count(&other, "A"), 0, "the failed batch left nothing");
        assert_eq!(count(&other, "B"), 1);
    }
}
