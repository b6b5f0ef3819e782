//! The read pool: a few threads, each owning one read connection, taking
//! read jobs from one shared channel.
//!
//! In WAL mode readers never wait for the writer and always see the last
//! committed state as of the start of their read, so a read that begins
//! after a write returned sees that write (R6.2), from any process.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use keyclaim::{Error, Result};
use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::SqliteOptions;
use crate::error;
use crate::schema::{self, Role};

type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

/// The handle on the read threads. Dropping it closes the channel and joins
/// the threads (closing their connections).
#[derive(Debug)]
pub(crate) struct ReadPool {
    tx: Option<Sender<ReadJob>>,
    threads: Vec<JoinHandle<()>>,
}

impl ReadPool {
    /// Starts `options.read_connections` threads (at least one) on an
    /// existing, migrated file; returns once every connection is open.
    pub(crate) async fn start(path: &Path, options: &SqliteOptions) -> Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded::<ReadJob>();
        let mut pool = Self {
            tx: Some(tx),
            threads: Vec::new(),
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

    /// Runs `f` on a read connection and waits for its answer.
    pub(crate) async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let span = tracing::Span::current();
        let job: ReadJob = Box::new(move |conn| {
            let _entered = span.enter();
            let result = catch_unwind(AssertUnwindSafe(|| f(conn)))
                .unwrap_or_else(|_| Err(error::panicked("read")));
            let _ = reply.send(result);
        });
        self.tx
            .as_ref()
            .ok_or(Error::Closed)?
            .send(job)
            .map_err(|_| Error::Closed)?;
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
