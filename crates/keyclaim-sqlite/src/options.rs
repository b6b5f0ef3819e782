//! The settings of a [`SqliteStore`](crate::SqliteStore): a builder of
//! `#[must_use]` setters, `get_<option>` getters, and parsing from a store
//! URL.

use std::path::PathBuf;
use std::time::Duration;

use keyclaim::backend::url::{self, UrlOptions};
use keyclaim::{Limits, Result};

/// The default of [`SqliteOptions::max_queued`].
const DEFAULT_MAX_QUEUED: usize = 1024;

/// How hard SQLite works to make a commit durable (`PRAGMA synchronous`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Synchronous {
    /// `synchronous = FULL` (the default): every commit syncs the WAL to the
    /// disk before the operation returns, so a returned write survives a
    /// crash of the process and of the machine (R10.1). Group commit shares
    /// one sync among every operation of a batch.
    #[default]
    Full,
    /// `synchronous = NORMAL`: commits do not wait for the disk; the WAL is
    /// synced at checkpoints. Faster. A returned write still survives a crash
    /// of the process (SIGKILL), but the last commits before a power loss or
    /// an OS crash may be lost (the file stays consistent). **Not durable
    /// across machine crashes**: pick it only if losing a few just-returned
    /// claims or uploads after a power loss is acceptable (a lost claim may
    /// then hand the same key out again).
    Normal,
}

/// Tuning of a [`SqliteStore`](crate::SqliteStore). Build with
/// [`SqliteOptions::new`] (or `default()`) and the setters, or parse a store
/// URL with [`SqliteOptions::from_url`]:
///
/// ```
/// use std::time::Duration;
/// use keyclaim_sqlite::{SqliteOptions, Synchronous};
///
/// let options = SqliteOptions::new()
///     .synchronous(Synchronous::Full)
///     .busy_timeout(Duration::from_secs(10))
///     .read_connections(4)
///     .max_batch(256);
/// assert_eq!(options.get_synchronous(), Synchronous::Full);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqliteOptions {
    limits: Limits,
    synchronous: Synchronous,
    busy_timeout: Duration,
    read_connections: usize,
    max_batch: usize,
    checkpoint_interval: Option<Duration>,
    wal_size_limit: u64,
    max_queued: usize,
    change_poll_interval: Option<Duration>,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            synchronous: Synchronous::Full,
            busy_timeout: Duration::from_secs(10),
            read_connections: 4,
            max_batch: 256,
            checkpoint_interval: Some(Duration::from_millis(100)),
            wal_size_limit: 64 << 20,
            max_queued: DEFAULT_MAX_QUEUED,
            change_poll_interval: Some(Duration::from_millis(50)),
        }
    }
}

impl SqliteOptions {
    /// The defaults: [`Limits::default`], [`Synchronous::Full`], a 10 s busy
    /// timeout, 4 read connections, batches of at most 256 operations, a
    /// checkpoint every 100 ms, a WAL cut back to 64 MiB, at most 1,024
    /// operations waiting for the writer and 1,024 for the readers, other
    /// processes' changes looked for every 50 ms.
    pub fn new() -> Self {
        Self::default()
    }

    /// The limits the store enforces (contract section 8). They are not
    /// stored in the file: every process opening it should pass the same.
    #[must_use]
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Durability of commits; see [`Synchronous`].
    #[must_use]
    pub fn synchronous(mut self, synchronous: Synchronous) -> Self {
        self.synchronous = synchronous;
        self
    }

    /// How long a connection waits for another process's lock before the
    /// operation fails with a retryable [`keyclaim::Error::Storage`].
    #[must_use]
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// How many read connections (and read threads) the store keeps; at
    /// least one.
    #[must_use]
    pub fn read_connections(mut self, n: usize) -> Self {
        self.read_connections = n.max(1);
        self
    }

    /// The most operations one group-commit transaction takes; at least one.
    /// One operation per transaction (1) turns group commit off.
    #[must_use]
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n.max(1);
        self
    }

    /// Checkpoint the WAL from a background thread at this interval
    /// (default 100 ms), so that commits never wait for a checkpoint; `None`
    /// leaves checkpoints to SQLite's automatic ones, run by the commit that
    /// fills the WAL past 1000 pages.
    #[must_use]
    pub fn checkpoint_interval(mut self, interval: Option<Duration>) -> Self {
        self.checkpoint_interval = interval;
        self
    }

    /// The size in bytes the WAL file is cut back to whenever SQLite starts
    /// it over after a complete checkpoint (default 64 MiB;
    /// `PRAGMA journal_size_limit`). Without it, the WAL file keeps the size
    /// of the largest burst of writes between two checkpoints forever.
    #[must_use]
    pub fn wal_size_limit(mut self, bytes: u64) -> Self {
        self.wal_size_limit = bytes;
        self
    }

    /// The most operations that may wait for the writer thread, and
    /// (separately) the most reads that may wait for a read connection; at
    /// least one. Default 1,024.
    ///
    /// Past it, an operation fails at once with a retryable
    /// [`keyclaim::Error::Storage`] instead of queueing (R10.6): under
    /// overload, or while another process holds the file's write lock, the
    /// callers are told to come back later, and the memory the queues hold
    /// stays bounded (by this many requests, each within the
    /// [`Limits`]). The writer takes up to [`SqliteOptions::max_batch`]
    /// more into the batch it is running.
    #[must_use]
    pub fn max_queued(mut self, n: usize) -> Self {
        self.max_queued = n.max(1);
        self
    }

    /// How often the store looks for changes that other processes (or
    /// other handles) made to the file, to report them to its subscribers
    /// (R11.2); default 50 ms, the most a `/sync` long-poll waits to hear of
    /// them. Each look is a read of SQLite's shared memory when nothing
    /// changed. `None` reports only this handle's own changes. Every handle
    /// records its changes for the others whatever this is.
    #[must_use]
    pub fn change_poll_interval(mut self, interval: Option<Duration>) -> Self {
        self.change_poll_interval = interval;
        self
    }

    /// The configured limits.
    pub fn get_limits(&self) -> &Limits {
        &self.limits
    }

    /// The configured durability.
    pub fn get_synchronous(&self) -> Synchronous {
        self.synchronous
    }

    /// The configured busy timeout.
    pub fn get_busy_timeout(&self) -> Duration {
        self.busy_timeout
    }

    /// The configured number of read connections.
    pub fn get_read_connections(&self) -> usize {
        self.read_connections
    }

    /// The configured largest batch.
    pub fn get_max_batch(&self) -> usize {
        self.max_batch
    }

    /// The configured checkpoint interval.
    pub fn get_checkpoint_interval(&self) -> Option<Duration> {
        self.checkpoint_interval
    }

    /// The configured WAL size limit in bytes.
    pub fn get_wal_size_limit(&self) -> u64 {
        self.wal_size_limit
    }

    /// The configured queue bound.
    pub fn get_max_queued(&self) -> usize {
        self.max_queued
    }

    /// The configured interval of looks for other processes' changes.
    pub fn get_change_poll_interval(&self) -> Option<Duration> {
        self.change_poll_interval
    }

    /// Parses a store URL into the file's path and the options:
    ///
    /// ```text
    /// sqlite:PATH
    /// sqlite:PATH?OPTION=VALUE&OPTION=VALUE...
    /// ```
    ///
    /// `PATH` is relative or absolute, taken as written up to the first `?`
    /// (no percent-decoding, so it cannot contain `?`); `sqlite:///abs/path`
    /// is also accepted, for `/abs/path`. The options, each at most once, in
    /// any order:
    ///
    /// | option | value | setter |
    /// | --- | --- | --- |
    /// | `synchronous` | `full` or `normal` | [`SqliteOptions::synchronous`] |
    /// | `busy_timeout_ms` | milliseconds | [`SqliteOptions::busy_timeout`] |
    /// | `read_connections` | an integer, at least 1 | [`SqliteOptions::read_connections`] |
    /// | `max_batch` | an integer, at least 1 | [`SqliteOptions::max_batch`] |
    /// | `checkpoint_interval_ms` | milliseconds, at least 1, or `off` | [`SqliteOptions::checkpoint_interval`] |
    /// | `wal_size_limit` | bytes | [`SqliteOptions::wal_size_limit`] |
    /// | `max_queued` | an integer, at least 1 | [`SqliteOptions::max_queued`] |
    /// | `change_poll_interval_ms` | milliseconds, at least 1, or `off` | [`SqliteOptions::change_poll_interval`] |
    ///
    /// Options not given keep their defaults; the limits are always the
    /// defaults (set them with [`SqliteOptions::limits`] afterwards).
    ///
    /// ```
    /// use keyclaim_sqlite::{SqliteOptions, Synchronous};
    /// let (path, options) =
    ///     SqliteOptions::from_url("sqlite:/var/lib/keys.sqlite?synchronous=normal&max_batch=64")?;
    /// assert_eq!(path, std::path::Path::new("/var/lib/keys.sqlite"));
    /// assert_eq!(options.get_synchronous(), Synchronous::Normal);
    /// assert_eq!(options.get_max_batch(), 64);
    /// # Ok::<(), keyclaim::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](keyclaim::Error::InvalidConfig) for another
    /// scheme, an empty path, an unknown or repeated option, or a value that
    /// does not parse.
    pub fn from_url(url: &str) -> Result<(PathBuf, SqliteOptions)> {
        let (path, query) = url::file_url("sqlite", url)?;
        let query = UrlOptions::parse("sqlite", query)?;
        let mut options = SqliteOptions::new();
        for (name, value) in query.iter() {
            options = options.with_url_option(&query, name, value)?;
        }
        Ok((PathBuf::from(path), options))
    }

    /// Applies one `name=value` option of a store URL.
    fn with_url_option(self, query: &UrlOptions<'_>, name: &str, value: &str) -> Result<Self> {
        Ok(match name {
            "synchronous" => self.synchronous(match value {
                "full" => Synchronous::Full,
                "normal" => Synchronous::Normal,
                _ => return Err(query.bad_value(name, value, "`full` or `normal`")),
            }),
            "busy_timeout_ms" => {
                self.busy_timeout(Duration::from_millis(query.number(name, value)?))
            }
            "read_connections" => self.read_connections(query.positive(name, value)?),
            "max_batch" => self.max_batch(query.positive(name, value)?),
            "checkpoint_interval_ms" => self.checkpoint_interval(match value {
                "off" => None,
                _ => Some(Duration::from_millis(query.positive(name, value)?)),
            }),
            "wal_size_limit" => self.wal_size_limit(query.number(name, value)?),
            "max_queued" => self.max_queued(query.positive(name, value)?),
            "change_poll_interval_ms" => self.change_poll_interval(match value {
                "off" => None,
                _ => Some(Duration::from_millis(query.positive(name, value)?)),
            }),
            _ => {
                return Err(query.unknown(
                    name,
                    &[
                        "synchronous",
                        "busy_timeout_ms",
                        "read_connections",
                        "max_batch",
                        "checkpoint_interval_ms",
                        "wal_size_limit",
                        "max_queued",
                        "change_poll_interval_ms",
                    ],
                ));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use keyclaim::Error;

    fn parse(url: &str) -> (PathBuf, SqliteOptions) {
        match SqliteOptions::from_url(url) {
            Ok(parsed) => parsed,
            Err(e) => panic!("{url}: {e}"),
        }
    }

    fn invalid(url: &str) -> String {
        match SqliteOptions::from_url(url) {
            Err(Error::InvalidConfig { reason }) => reason,
            other => panic!("{url}: expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn a_bare_path_has_the_defaults() {
        let (path, options) = parse("sqlite:keys.sqlite");
        assert_eq!(path, Path::new("keys.sqlite"));
        assert_eq!(options, SqliteOptions::default());
        assert_eq!(parse("sqlite:./data/k.db").0, Path::new("./data/k.db"));
        assert_eq!(parse("sqlite:/var/lib/k.db?").0, Path::new("/var/lib/k.db"));
        assert_eq!(
            parse("sqlite:///var/lib/k.db").0,
            Path::new("/var/lib/k.db")
        );
    }

    #[test]
    fn every_option_is_parsed() {
        let (path, options) = parse(
            "sqlite:/tmp/k.db?synchronous=normal&busy_timeout_ms=250&read_connections=2\
             &max_batch=32&checkpoint_interval_ms=50&wal_size_limit=1048576&max_queued=16\
             &change_poll_interval_ms=20",
        );
        assert_eq!(path, Path::new("/tmp/k.db"));
        let want = SqliteOptions::new()
            .synchronous(Synchronous::Normal)
            .busy_timeout(Duration::from_millis(250))
            .read_connections(2)
            .max_batch(32)
            .checkpoint_interval(Some(Duration::from_millis(50)))
            .wal_size_limit(1 << 20)
            .max_queued(16)
            .change_poll_interval(Some(Duration::from_millis(20)));
        assert_eq!(options, want);
    }

    #[test]
    fn option_values() {
        let options = |url| parse(url).1;
        assert_eq!(
            options("sqlite:k?synchronous=full").get_synchronous(),
            Synchronous::Full
        );
        assert_eq!(
            options("sqlite:k?checkpoint_interval_ms=off").get_checkpoint_interval(),
            None
        );
        assert_eq!(
            options("sqlite:k?busy_timeout_ms=0").get_busy_timeout(),
            Duration::ZERO
        );
        assert_eq!(options("sqlite:k?wal_size_limit=0").get_wal_size_limit(), 0);
        assert_eq!(
            options("sqlite:k?change_poll_interval_ms=off").get_change_poll_interval(),
            None
        );
        // The order of the options does not matter.
        assert_eq!(
            options("sqlite:k?max_batch=1&synchronous=normal"),
            SqliteOptions::new()
                .synchronous(Synchronous::Normal)
                .max_batch(1)
        );
    }

    #[test]
    fn other_schemes_and_empty_paths_are_refused() {
        for url in [
            "redb:k.redb",
            "memory:",
            "postgres://localhost/k",
            "SQLITE:k",
            "sqlite3:k",
            "k.sqlite",
            "",
            "sqlite:",
            "sqlite:?max_batch=3",
            "sqlite://host/k.db",
            "sqlite://",
        ] {
            invalid(url);
        }
    }

    #[test]
    fn unknown_repeated_and_malformed_options_are_refused() {
        assert!(invalid("sqlite:k?limits=3").contains("unknown"));
        assert!(invalid("sqlite:k?Synchronous=full").contains("unknown"));
        assert!(invalid("sqlite:k?busy_timeout=10").contains("unknown"));
        assert!(invalid("sqlite:k?max_batch=3&max_batch=4").contains("twice"));
        assert!(invalid("sqlite:k?max_batch").contains('='));
    }

    #[test]
    fn bad_values_are_refused() {
        for url in [
            "sqlite:k?synchronous=off",
            "sqlite:k?synchronous=FULL",
            "sqlite:k?synchronous=",
            "sqlite:k?busy_timeout_ms=10s",
            "sqlite:k?busy_timeout_ms=-1",
            "sqlite:k?read_connections=0",
            "sqlite:k?max_batch=0",
            "sqlite:k?max_batch=+3",
            "sqlite:k?max_batch=1.5",
            "sqlite:k?max_batch=99999999999999999999999",
            "sqlite:k?checkpoint_interval_ms=0",
            "sqlite:k?checkpoint_interval_ms=none",
            "sqlite:k?wal_size_limit=64MiB",
            "sqlite:k?wal_size_limit=",
            "sqlite:k?max_queued=0",
            "sqlite:k?change_poll_interval_ms=0",
        ] {
            assert!(invalid(url).contains("value"), "{url}");
        }
    }
}
