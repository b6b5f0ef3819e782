//! Background WAL checkpoints, off the writer's commit path.
//!
//! With SQLite's automatic checkpoints, the commit that pushes the WAL past
//! its threshold also copies the WAL back into the database file and syncs
//! it, so that one batch waits for it. Here a thread with its own connection
//! runs a `PASSIVE` checkpoint at a fixed interval instead (it never blocks
//! the writer or the readers); the writer's automatic checkpoint stays on,
//! with a larger threshold, as a backstop.

use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{RecvTimeoutError, Sender};
use keyclaim::Result;

use crate::SqliteOptions;
use crate::error;
use crate::schema::{self, Role};

/// The handle on the checkpoint thread; dropping it stops and joins it.
#[derive(Debug)]
pub(crate) struct Checkpointer {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts the thread (its connection opens on the thread).
    pub(crate) fn start(path: &Path, options: &SqliteOptions, interval: Duration) -> Result<Self> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let path = path.to_owned();
        let options = options.clone();
        let thread = std::thread::Builder::new()
            .name("keyclaim-sqlite-checkpoint".into())
            .spawn(move || {
                let conn = match schema::open_connection(&path, &options, Role::Checkpointer) {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!(error = %e, "keyclaim-sqlite: no checkpoint thread");
                        return;
                    }
                };
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    let _span = tracing::trace_span!("keyclaim.sqlite.checkpoint").entered();
                    let result = conn
                        .prepare_cached("PRAGMA wal_checkpoint(PASSIVE)")
                        .and_then(|mut s| {
                            s.query_row([], |r| Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))
                        });
                    match result {
                        Ok((log, done)) => {
                            tracing::trace!(log, done, "keyclaim-sqlite: checkpoint")
                        }
                        Err(e) => tracing::debug!(error = %e, "keyclaim-sqlite: checkpoint failed"),
                    }
                }
            })
            .map_err(error::spawn_failed)?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
