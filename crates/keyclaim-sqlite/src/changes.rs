//! Change reports across processes (R11.2).
//!
//! Core tells a store handle's subscribers about the changes made through
//! that handle (R11.1). The other processes on the same file (a homeserver's
//! workers) hear of them through the file itself:
//!
//! - every batch that changed devices appends one row to `change_log`, in
//!   its own transaction, so the row commits exactly when the changes do:
//!   its `id` (`AUTOINCREMENT`: increasing, never reused), the `origin` (a
//!   random number per store handle), the wall-clock time and the changed
//!   devices ([`ChangeLog`]);
//! - each handle runs a thread with its own read connection that checks
//!   `PRAGMA data_version` every [`SqliteOptions::change_poll_interval`]
//!   (a look at shared memory, no I/O); when another connection committed
//!   since, it reads the rows after the last one it saw, a few at a time,
//!   and forwards those of other origins to its subscribers with
//!   [`StoreCore::announce_remote`] ([`Watcher`]). Its own rows it skips:
//!   core reported them right after the commit.
//!
//! Rows are appended under the write lock and committed in id order, so a
//! watcher that reads the rows after the last id it saw never misses one
//! that commits later. Writers delete rows older than [`RETENTION`] (once
//! per [`PRUNE_EVERY`], inside a batch's transaction): the table holds a few
//! seconds of changes. A watcher that stalls for longer than that misses
//! rows: it sees a gap in the ids, logs a warning and tells its
//! subscribers with one [`Changes::unknown`] event that changes were missed,
//! so that they re-read what they watch (R11.3). Memory stays bounded: the
//! watcher holds one row at a time, and core's notifier bounds what a slow
//! subscriber holds (R11.3).

use std::collections::BTreeSet;
use std::hash::{BuildHasher as _, Hasher as _};
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{RecvTimeoutError, Sender};
use keyclaim::backend::{StoreCore, decode};
use keyclaim::{Changes, Device, Error, Result};
use rusqlite::{Connection, params};
use tokio::sync::oneshot;

use crate::SqliteOptions;
use crate::error::{self, SqlContext as _};
use crate::schema::{self, Role};

/// How long a row stays in `change_log`.
pub(crate) const RETENTION: Duration = Duration::from_secs(10);

/// How often a writer deletes old rows.
pub(crate) const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// How many rows a watcher reads per query.
const ROWS_PER_READ: i64 = 16;

const SQL_APPEND: &str = "INSERT INTO change_log (origin, at_ms, devices) VALUES (?1, ?2, ?3)";
const SQL_PRUNE: &str = "DELETE FROM change_log WHERE at_ms < ?1";
/// The last id ever given to a row (`AUTOINCREMENT` keeps it in
/// `sqlite_sequence`, also after the row is pruned): the rows after it are
/// numbered without gaps, so a gap is a row pruned before it was read.
const SQL_LAST: &str =
    "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'change_log'), 0)";
const SQL_AFTER: &str =
    "SELECT id, origin, devices FROM change_log WHERE id > ?1 ORDER BY id LIMIT ?2";

/// A new random origin for a store handle, from the standard library's
/// per-process random hash keys.
pub(crate) fn new_origin() -> i64 {
    static HANDLES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u64(HANDLES.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    i64::from_ne_bytes(hasher.finish().to_ne_bytes())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The writer's side: appends a batch's changed devices to `change_log`
/// inside the batch's transaction, and prunes old rows.
#[derive(Debug)]
pub(crate) struct ChangeLog {
    origin: i64,
    next_prune: Instant,
}

impl ChangeLog {
    /// The log of the store handle `origin`.
    pub(crate) fn new(origin: i64) -> Self {
        Self {
            origin,
            next_prune: Instant::now(),
        }
    }

    /// Records that `devices` changed, inside the open transaction that
    /// changed them; nothing when there are none. Deletes rows older than
    /// [`RETENTION`] when that is due.
    pub(crate) fn record<'a>(
        &mut self,
        conn: &Connection,
        devices: impl IntoIterator<Item = &'a Device>,
    ) -> rusqlite::Result<()> {
        let devices: BTreeSet<&Device> = devices.into_iter().collect();
        if devices.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        conn.prepare_cached(SQL_APPEND)?
            .execute(params![self.origin, now, encode(devices)])?;
        if Instant::now() >= self.next_prune {
            self.next_prune = Instant::now() + PRUNE_EVERY;
            let cutoff = now.saturating_sub(i64::try_from(RETENTION.as_millis()).unwrap_or(0));
            conn.prepare_cached(SQL_PRUNE)?.execute([cutoff])?;
        }
        Ok(())
    }
}

/// The devices of a row: for each, the byte lengths of its user ID and its
/// device ID and the two IDs, as `<len>:<user ID><len>:<device ID>`.
fn encode<'a>(devices: impl IntoIterator<Item = &'a Device>) -> String {
    let mut out = String::new();
    for d in devices {
        for id in [d.user_id.as_str(), d.device_id.as_str()] {
            out.push_str(&id.len().to_string());
            out.push(':');
            out.push_str(id);
        }
    }
    out
}

/// The devices of a row written by [`encode`].
fn decode_devices(text: &str) -> Result<Vec<Device>> {
    let bad = || Error::corrupt("a change_log row's devices do not read back");
    let mut rest = text;
    let mut next = || -> Result<Option<&str>> {
        if rest.is_empty() {
            return Ok(None);
        }
        let (len, tail) = rest.split_once(':').ok_or_else(bad)?;
        let len: usize = len.parse().map_err(|_| bad())?;
        let id = tail.get(..len).ok_or_else(bad)?;
        rest = &tail[len..];
        Ok(Some(id))
    };
    let mut out = Vec::new();
    while let Some(user) = next()? {
        let device = next()?.ok_or_else(bad)?;
        out.push(decode::device(user, device)?);
    }
    Ok(out)
}

/// The reader's side: a thread that forwards other handles' changes to this
/// handle's subscribers. Dropping it stops and joins the thread.
#[derive(Debug)]
pub(crate) struct Watcher {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Starts the thread; returns once it knows the last row, so that every
    /// change committed after this returns is reported.
    pub(crate) async fn start(
        path: &Path,
        options: &SqliteOptions,
        interval: Duration,
        origin: i64,
        core: StoreCore,
    ) -> Result<Self> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let (ready_tx, ready_rx) = oneshot::channel::<Result<()>>();
        let (path, options) = (path.to_owned(), options.clone());
        let thread = std::thread::Builder::new()
            .name("keyclaim-sqlite-changes".into())
            .spawn(move || {
                let start = || -> Result<(Connection, i64)> {
                    let conn = schema::open_connection(&path, &options, Role::Reader)?;
                    let last = conn.query_row(SQL_LAST, [], |r| r.get(0)).ctx("open")?;
                    Ok((conn, last))
                };
                let (conn, last) = match start() {
                    Ok(started) => started,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                if ready_tx.send(Ok(())).is_err() {
                    return;
                }
                let mut watch = Watch {
                    conn,
                    origin,
                    core,
                    last,
                    version: None,
                };
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    if let Err(e) = watch.poll() {
                        tracing::debug!(error = %e, "keyclaim-sqlite: reading change_log failed");
                    }
                }
            })
            .map_err(error::spawn_failed)?;
        let watcher = Self {
            stop: Some(stop),
            thread: Some(thread),
        };
        ready_rx.await.map_err(|_| Error::Closed)??;
        Ok(watcher)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The watcher thread's state.
struct Watch {
    conn: Connection,
    origin: i64,
    core: StoreCore,
    /// The last row seen.
    last: i64,
    /// `PRAGMA data_version` at the last poll.
    version: Option<i64>,
}

impl Watch {
    /// Forwards the rows committed since the last poll, if any.
    fn poll(&mut self) -> Result<()> {
        const OP: &str = "change_log";
        let version: i64 = self
            .conn
            .prepare_cached("PRAGMA data_version")
            .ctx(OP)?
            .query_row([], |r| r.get(0))
            .ctx(OP)?;
        if self.version == Some(version) {
            return Ok(());
        }
        loop {
            let mut stmt = self.conn.prepare_cached(SQL_AFTER).ctx(OP)?;
            let mut rows = stmt.query(params![self.last, ROWS_PER_READ]).ctx(OP)?;
            let mut read = 0;
            while let Some(row) = rows.next().ctx(OP)? {
                read += 1;
                let (id, origin): (i64, i64) = (row.get(0).ctx(OP)?, row.get(1).ctx(OP)?);
                if id > self.last.saturating_add(1) {
                    tracing::warn!(
                        missed = id - self.last - 1,
                        "keyclaim-sqlite: change reports of other processes were pruned \
                         before this process read them"
                    );
                    self.core.announce_missed();
                }
                self.last = id;
                if origin == self.origin {
                    continue;
                }
                let text: String = row.get(2).ctx(OP)?;
                match decode_devices(&text) {
                    Ok(devices) => self.core.announce_remote(&Changes::from_devices(devices)),
                    Err(e) => tracing::warn!(id, error = %e, "keyclaim-sqlite: bad change_log row"),
                }
            }
            if read < ROWS_PER_READ {
                break;
            }
        }
        // Only now: a failed read is tried again at the next poll.
        self.version = Some(version);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_read_back_as_written() {
        let devices = [
            Device::parse("@a:x", "D1").unwrap(),
            Device::parse("@b:x.org", "d:2:weird").unwrap(),
            Device::parse("@\u{e9}\u{e9}:x", "\u{1f600}").unwrap(),
        ];
        let text = encode(&devices);
        assert_eq!(decode_devices(&text).unwrap(), devices);
        assert_eq!(decode_devices("").unwrap(), Vec::<Device>::new());
        for bad in ["3:@a:", "x:@a:x2:D1", "4:@a:x", "4:@a:x99:D", "2:\u{e9}"] {
            assert!(
                matches!(decode_devices(bad), Err(Error::Corrupt { .. })),
                "{bad}"
            );
        }
    }

    /// Each batch adds one row naming its devices once; a batch changes
    /// rows older than `RETENTION` away, so the table stays small.
    #[test]
    fn batches_append_one_row_and_old_rows_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteOptions::default();
        let conn =
            schema::open_connection(&dir.path().join("c.sqlite"), &options, Role::Writer).unwrap();
        schema::migrate(&conn, options.get_busy_timeout()).unwrap();
        conn.execute(
            "INSERT INTO change_log (origin, at_ms, devices) VALUES (1, 0, ''), (1, 1, '')",
            [],
        )
        .unwrap();
        let a = Device::parse("@a:x", "A").unwrap();
        let b = Device::parse("@a:x", "B").unwrap();
        let mut log = ChangeLog::new(7);
        log.record(&conn, [&b, &a, &b]).unwrap();
        log.record(&conn, []).unwrap();
        let rows: Vec<(i64, i64, String)> = conn
            .prepare("SELECT id, origin, devices FROM change_log ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(rows.len(), 1, "the old rows are gone: {rows:?}");
        let (id, origin, devices) = &rows[0];
        assert_eq!((*id, *origin), (3, 7), "ids are never reused");
        assert_eq!(decode_devices(devices).unwrap(), [a, b]);
    }

    #[test]
    fn origins_differ() {
        assert_ne!(new_origin(), new_origin());
    }
}
