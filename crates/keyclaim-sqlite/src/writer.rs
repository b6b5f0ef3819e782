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

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use keyclaim::{Error, Limits, Result};
use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::SqliteOptions;
use crate::error::{self, BatchFailure};
use crate::schema::{self, Role};

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

/// One queued mutating operation, type-erased.
pub(crate) trait Job: Send {
    /// Runs the operation inside the open transaction (and its savepoint,
    /// if any); keeps the result, replacing that of an earlier run; returns
    /// whether it succeeded. May be called again when the batch is rerun.
    fn run(&mut self, conn: &Connection, limits: &Limits) -> bool;
    /// Whether the operation needs a savepoint on the batch's first run.
    fn fallible(&self) -> Fallible;
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
    T: Send,
    F: Fn(&Connection, &Limits) -> Result<T> + Send,
{
    fn fallible(&self) -> Fallible {
        self.fallible
    }

    fn run(&mut self, conn: &Connection, limits: &Limits) -> bool {
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
}

impl Writer {
    /// Starts the thread: it opens the file, migrates it, and then serves
    /// operations. Returns once the file is open and migrated.
    pub(crate) async fn start(path: PathBuf, options: SqliteOptions) -> Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded::<Box<dyn Job>>();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<()>>();
        // Opening and migrating belong to the caller's `keyclaim.sqlite.open`.
        let open_span = tracing::Span::current();
        let thread = std::thread::Builder::new()
            .name("keyclaim-sqlite-writer".into())
            .spawn(move || {
                let conn = open_span.in_scope(|| -> Result<Connection> {
                    let conn = schema::open_connection(&path, &options, Role::Writer)?;
                    schema::migrate(&conn, options.get_busy_timeout())?;
                    Ok(conn)
                });
                drop(open_span);
                match conn {
                    Ok(conn) => {
                        if ready_tx.send(Ok(())).is_ok() {
                            serve(&conn, &rx, &options);
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
        };
        match ready_rx.await {
            Ok(Ok(())) => Ok(writer),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Closed),
        }
    }

    /// Queues an operation and waits for its answer, which comes after its
    /// transaction committed. `f` may run more than once (see the module
    /// documentation); only its last result counts.
    pub(crate) async fn submit<T, F>(&self, op: &'static str, fallible: Fallible, f: F) -> Result<T>
    where
        T: Send + 'static,
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
        self.tx
            .as_ref()
            .ok_or(Error::Closed)?
            .send(job)
            .map_err(|_| Error::Closed)?;
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
/// up (at most `max_batch` in all), run them as one transaction.
fn serve(conn: &Connection, rx: &Receiver<Box<dyn Job>>, options: &SqliteOptions) {
    let max_batch = options.get_max_batch().max(1);
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(max_batch);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        run_batch(conn, &mut batch, options.get_limits());
    }
}

/// Runs a batch as one transaction and answers every operation in it.
pub(crate) fn run_batch(conn: &Connection, batch: &mut Vec<Box<dyn Job>>, limits: &Limits) {
    let span = tracing::debug_span!("keyclaim.sqlite.batch", size = batch.len());
    let _entered = span.enter();
    let outcome = run_transaction(conn, batch, limits);
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

    fn job<T: Send + 'static>(
        f: impl Fn(&Connection, &Limits) -> Result<T> + Send + 'static,
    ) -> (Box<dyn Job>, oneshot::Receiver<Result<T>>) {
        job_of(Fallible::OnInput, f)
    }

    fn job_of<T: Send + 'static>(
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
        run_batch(&conn, &mut batch, &limits);

        assert!(r1.blocking_recv().unwrap().is_ok());
        assert!(matches!(
            r2.blocking_recv().unwrap(),
            Err(Error::Conflict { .. })
        ));
        assert!(r3.blocking_recv().unwrap().is_ok());
        assert!(matches!(r4.blocking_recv().unwrap(), Err(Error::Closed)));
        assert_eq!(r5.blocking_recv().unwrap().unwrap().len(), 1);
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
        run_batch(&conn, &mut batch, &limits);

        assert!(r1.blocking_recv().unwrap().is_ok());
        let claimed = r2.blocking_recv().unwrap().unwrap();
        assert_eq!(claimed.len(), 1, "the claim's answer is its last run's");
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
                .map_err(|e| error::sql_error("test", e))
        });
        let mut batch = vec![j1, j2];
        run_batch(&conn, &mut batch, &Limits::default());
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
        run_batch(&conn, &mut batch, &Limits::default());
        let e1 = r1.blocking_recv().unwrap().unwrap_err();
        assert!(e1.is_retryable(), "{e1}");
        assert!(r2.blocking_recv().unwrap().is_err());
        assert!(r3.blocking_recv().unwrap().unwrap_err().is_retryable());
        assert_eq!(count(&conn, "A") + count(&conn, "B"), 0);
    }
}
