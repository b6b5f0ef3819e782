//! The read pool: a few threads, each owning one read connection, taking
//! read jobs from one shared channel.
//!
//! In WAL mode readers never wait for the writer and always see the last
//! committed state as of the start of their read, so a read that begins
//! after a write returned sees that write (R6.2), from any process.
//!
//! The channel holds at most [`SqliteOptions::max_queued`] reads; past that a
//! read fails at once with a retryable error, and a read whose caller has
//! gone away is not run (R10.6).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::thread::JoinHandle;

use crossbeam_channel::{Sender, TrySendError};
use keyclaim::backend::writer;
use keyclaim::{Error, Result};
use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::error;
use crate::schema::{self, Role};
use crate::{BACKEND, SqliteOptions};

type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

/// The handle on the read threads. Dropping it closes the channel and joins
/// the threads (closing their connections).
#[derive(Debug)]
pub(crate) struct ReadPool {
    tx: Option<Sender<ReadJob>>,
    threads: Vec<JoinHandle<()>>,
    bound: usize,
}

impl ReadPool {
    /// Starts `options.read_connections` threads (at least one) on an
    /// existing, migrated file; returns once every connection is open.
    pub(crate) async fn start(path: &Path, options: &SqliteOptions) -> Result<Self> {
        let bound = options.get_max_queued();
        let (tx, rx) = crossbeam_channel::bounded::<ReadJob>(bound);
        let mut pool = Self {
            tx: Some(tx),
            threads: Vec::new(),
            bound,
        };
        let mut ready = Vec::new();
        for i in 0..options.get_read_connections().max(1) {
            let (ready_tx, ready_rx) = oneshot::channel::<Result<()>>();
            let rx = rx.clone();
            let path = path.to_owned();
            let options = options.clone();
            let thread = std::thread::Builder::new()
                .name(format!("keyclaim-sqlite-reader-{i}"))
                .spawn(
                    move || match schema::open_connection(&path, &options, Role::Reader) {
                        Ok(conn) => {
                            if ready_tx.send(Ok(())).is_ok() {
                                while let Ok(job) = rx.recv() {
                                    job(&conn);
                                }
                            }
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    },
                )
                .map_err(error::spawn_failed)?;
            pool.threads.push(thread);
            ready.push(ready_rx);
        }
        for r in ready {
            r.await.map_err(|_| Error::Closed)??;
        }
        Ok(pool)
    }

    /// Runs `f` on a read connection and waits for its answer. Fails at
    /// once, with a retryable error, when the queue is full; `f` does not
    /// run if the returned future is dropped before a reader takes it.
    pub(crate) async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let span = tracing::Span::current();
        let job: ReadJob = Box::new(move |conn| {
            if reply.is_closed() {
                return;
            }
            let _entered = span.enter();
            let result = catch_unwind(AssertUnwindSafe(|| f(conn)))
                .unwrap_or_else(|_| Err(error::panicked("read")));
            let _ = reply.send(result);
        });
        match self.tx.as_ref().ok_or(Error::Closed)?.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(writer::queue_full(BACKEND, "read", "read", self.bound));
            }
            Err(TrySendError::Disconnected(_)) => return Err(Error::Closed),
        }
        answer.await.map_err(|_| Error::Closed)?
    }
}

impl Drop for ReadPool {
    fn drop(&mut self) {
        drop(self.tx.take());
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    /// R10.6: while every read connection is busy, at most `max_queued`
    /// reads wait; the next one fails at once with a retryable error, and a
    /// read whose caller went away is not run.
    #[test]
    fn the_read_queue_is_bounded_and_abandoned_reads_do_not_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sqlite");
        let options = SqliteOptions::new().read_connections(1).max_queued(2);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            drop(
                crate::SqliteStore::open_with(&path, options.clone())
                    .await
                    .unwrap(),
            );
            let pool = ReadPool::start(&path, &options).await.unwrap();
            // Occupies the only reader until `release` is sent.
            let (release, wait) = crossbeam_channel::bounded::<()>(0);
            let (started_tx, started) = oneshot::channel::<()>();
            let busy = pool.run(move |_| {
                let _ = started_tx.send(());
                let _ = wait.recv();
                Ok(())
            });
            tokio::pin!(busy);
            // Poll it once so that it is queued, then wait until it runs.
            assert!(futures::poll!(busy.as_mut()).is_pending());
            started.await.unwrap();
            let ran = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let read = |ran: std::sync::Arc<std::sync::atomic::AtomicUsize>| {
                pool.run(move |_| {
                    ran.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    Ok(())
                })
            };
            let mut first = Box::pin(read(ran.clone()));
            let mut second = Box::pin(read(ran.clone()));
            assert!(futures::poll!(first.as_mut()).is_pending());
            assert!(futures::poll!(second.as_mut()).is_pending());
            let refused = tokio::time::timeout(Duration::from_secs(5), read(ran.clone()))
                .await
                .expect("a full queue answers at once")
                .unwrap_err();
            assert!(refused.is_retryable(), "{refused}");
            assert!(
                format!("{refused:?}").contains("queue is full"),
                "{refused:?}"
            );
            // The first waiting read's caller goes away.
            drop(first);
            release.send(()).unwrap();
            busy.await.unwrap();
            second.await.unwrap();
            assert_eq!(
                ran.load(std::sync::atomic::Ordering::SeqCst),
                1,
                "only the awaited read ran"
            );
        });
    }
}
