//! The settings of a [`RedbStore`](crate::RedbStore): a builder of
//! `#[must_use]` setters, `get_<option>` getters, and parsing from a store
//! URL.

use std::path::PathBuf;
use std::time::Duration;

use keyclaim::backend::url::{self, UrlOptions};
use keyclaim::{Error, Limits, Result};

/// How long relaxed mode waits at most before making commits durable, by
/// default.
const DEFAULT_FLUSH_EVERY: Duration = Duration::from_millis(100);

/// How many operations may wait for the writer, by default: four full
/// batches of the default size.
const DEFAULT_MAX_QUEUED: usize = 1024;

/// How commits reach the disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum RedbDurability {
    /// Every commit is durable when it returns (redb's
    /// `Durability::Immediate`, one fsync per batch): an operation that
    /// returned `Ok` survives a crash of the process and of the machine
    /// (R10.1). The default.
    #[default]
    Immediate,
    /// Batches commit without an fsync (redb's `Durability::None`), and an
    /// empty durable commit at least every `flush_every` makes them durable.
    ///
    /// **Not durable:** a crash (even of the process alone) loses the
    /// operations of the last `flush_every`, although they returned `Ok`;
    /// a claimed key can then be handed out again after the restart, which
    /// breaks R4.2 and R10.1. For tests, benchmarks and throw-away data.
    Relaxed {
        /// The longest time a returned operation may stay non-durable.
        flush_every: Duration,
    },
}

impl RedbDurability {
    /// [`RedbDurability::Relaxed`] with a flush every 100 ms.
    pub const fn relaxed() -> Self {
        Self::Relaxed {
            flush_every: DEFAULT_FLUSH_EVERY,
        }
    }
}

/// Settings of a [`RedbStore`](crate::RedbStore); [`RedbOptions::default`]
/// is durable. Build with [`RedbOptions::new`] and the setters, or parse a
/// store URL with [`RedbOptions::from_url`]:
///
/// ```
/// use keyclaim_redb::{RedbDurability, RedbOptions};
/// let options = RedbOptions::new()
///     .durability(RedbDurability::Immediate)
///     .max_batch(256);
/// assert_eq!(options.get_max_batch(), 256);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedbOptions {
    limits: Limits,
    durability: RedbDurability,
    max_batch: usize,
    max_queued: usize,
    cache_size: Option<usize>,
    linger: Duration,
    #[cfg(feature = "fault-injection")]
    faults: Option<crate::faults::Faults>,
}

impl Default for RedbOptions {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            durability: RedbDurability::Immediate,
            max_batch: 256,
            max_queued: DEFAULT_MAX_QUEUED,
            cache_size: None,
            linger: Duration::ZERO,
            #[cfg(feature = "fault-injection")]
            faults: None,
        }
    }
}

impl RedbOptions {
    /// The defaults: durable, default limits, batches of up to 256.
    pub fn new() -> Self {
        Self::default()
    }

    /// The limits the store enforces (R8.1 to R8.3).
    #[must_use]
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// How commits reach the disk. Default [`RedbDurability::Immediate`].
    #[must_use]
    pub fn durability(mut self, durability: RedbDurability) -> Self {
        self.durability = durability;
        self
    }

    /// The most operations the writer puts into one write transaction (at
    /// least 1). Default 256.
    #[must_use]
    pub fn max_batch(mut self, max_batch: usize) -> Self {
        self.max_batch = max_batch.max(1);
        self
    }

    /// The most operations that may wait in the writer's queue (at least 1).
    /// Beyond it an operation fails at once with a retryable
    /// [`Error::Storage`] instead of queueing (R10.6): under overload the
    /// caller backs off, and queued work and memory stay bounded. Default
    /// 1,024, four full batches of the default size.
    #[must_use]
    pub fn max_queued(mut self, max_queued: usize) -> Self {
        self.max_queued = max_queued.max(1);
        self
    }

    /// How long the writer may wait for more operations before it starts a
    /// batch, when fewer are queued than the previous batch held (the
    /// callers of the previous batch may be sending their next operation
    /// just then). Default zero, off: a batch is what queued up while the
    /// previous one ran, and an operation that finds the writer idle is
    /// committed at once.
    #[must_use]
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// redb's page cache in bytes. Unset, redb's default (1 GiB, an upper
    /// bound that is only used as the file grows) applies.
    #[must_use]
    pub fn cache_size(mut self, bytes: usize) -> Self {
        self.cache_size = Some(bytes);
        self
    }

    /// Test-only (feature `fault-injection`): faults to inject into the
    /// store, see [`crate::faults`].
    #[cfg(feature = "fault-injection")]
    #[must_use]
    pub fn faults(mut self, faults: crate::faults::Faults) -> Self {
        self.faults = Some(faults);
        self
    }

    /// Test-only (feature `fault-injection`): the faults to inject, if any.
    #[cfg(feature = "fault-injection")]
    pub fn get_faults(&self) -> Option<&crate::faults::Faults> {
        self.faults.as_ref()
    }

    /// The configured limits.
    pub fn get_limits(&self) -> &Limits {
        &self.limits
    }

    /// The configured durability.
    pub fn get_durability(&self) -> RedbDurability {
        self.durability
    }

    /// The configured largest batch.
    pub fn get_max_batch(&self) -> usize {
        self.max_batch
    }

    /// The configured bound of the writer's queue.
    pub fn get_max_queued(&self) -> usize {
        self.max_queued
    }

    /// The configured linger time.
    pub fn get_linger(&self) -> Duration {
        self.linger
    }

    /// The configured page cache size in bytes; `None` is redb's default.
    pub fn get_cache_size(&self) -> Option<usize> {
        self.cache_size
    }

    /// Parses a store URL into the file's path and the options:
    ///
    /// ```text
    /// redb:PATH
    /// redb:PATH?OPTION=VALUE&OPTION=VALUE...
    /// ```
    ///
    /// `PATH` is relative or absolute, taken as written up to the first `?`
    /// (no percent-decoding, so it cannot contain `?`); `redb:///abs/path`
    /// is also accepted, for `/abs/path`. The options, each at most once, in
    /// any order:
    ///
    /// | option | value | setter |
    /// | --- | --- | --- |
    /// | `durability` | `immediate` or `relaxed` | [`RedbOptions::durability`] |
    /// | `flush_every_ms` | milliseconds, with `durability=relaxed` only (default 100) | the `flush_every` of [`RedbDurability::Relaxed`] |
    /// | `max_batch` | an integer, at least 1 | [`RedbOptions::max_batch`] |
    /// | `max_queued` | an integer, at least 1 | [`RedbOptions::max_queued`] |
    /// | `linger_us` | microseconds | [`RedbOptions::linger`] |
    /// | `cache_size` | bytes | [`RedbOptions::cache_size`] |
    ///
    /// Options not given keep their defaults; the limits are always the
    /// defaults (set them with [`RedbOptions::limits`] afterwards).
    ///
    /// ```
    /// use keyclaim_redb::{RedbDurability, RedbOptions};
    /// let (path, options) =
    ///     RedbOptions::from_url("redb:/var/lib/keys.redb?durability=relaxed&max_batch=64")?;
    /// assert_eq!(path, std::path::Path::new("/var/lib/keys.redb"));
    /// assert_eq!(options.get_durability(), RedbDurability::relaxed());
    /// assert_eq!(options.get_max_batch(), 64);
    /// # Ok::<(), keyclaim::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for another scheme, an empty path, an
    /// unknown or repeated option, or a value that does not parse.
    pub fn from_url(url: &str) -> Result<(PathBuf, RedbOptions)> {
        let (path, query) = url::file_url("redb", url)?;
        let query = UrlOptions::parse("redb", query)?;
        let mut options = RedbOptions::new();
        for (name, value) in query.iter() {
            options = options.with_url_option(&query, name, value)?;
        }
        let relaxed = query.iter().any(|o| o == ("durability", "relaxed"));
        if query.iter().any(|(name, _)| name == "flush_every_ms") && !relaxed {
            return Err(Error::invalid_config(
                "redb URL option `flush_every_ms` needs `durability=relaxed`",
            ));
        }
        Ok((PathBuf::from(path), options))
    }

    /// Applies one `name=value` option of a store URL.
    fn with_url_option(self, query: &UrlOptions<'_>, name: &str, value: &str) -> Result<Self> {
        Ok(match name {
            "durability" => {
                let durability = match (value, self.durability) {
                    ("immediate", _) => RedbDurability::Immediate,
                    // Keeps a `flush_every_ms` given before.
                    ("relaxed", relaxed @ RedbDurability::Relaxed { .. }) => relaxed,
                    ("relaxed", _) => RedbDurability::relaxed(),
                    _ => return Err(query.bad_value(name, value, "`immediate` or `relaxed`")),
                };
                self.durability(durability)
            }
            // Checked against `durability` once every option is read.
            "flush_every_ms" => self.durability(RedbDurability::Relaxed {
                flush_every: Duration::from_millis(query.number(name, value)?),
            }),
            "max_batch" => self.max_batch(query.positive(name, value)?),
            "max_queued" => self.max_queued(query.positive(name, value)?),
            "linger_us" => self.linger(Duration::from_micros(query.number(name, value)?)),
            "cache_size" => self.cache_size(query.number(name, value)?),
            _ => {
                return Err(query.unknown(
                    name,
                    &[
                        "durability",
                        "flush_every_ms",
                        "max_batch",
                        "max_queued",
                        "linger_us",
                        "cache_size",
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

    fn parse(url: &str) -> (PathBuf, RedbOptions) {
        match RedbOptions::from_url(url) {
            Ok(parsed) => parsed,
            Err(e) => panic!("{url}: {e}"),
        }
    }

    fn invalid(url: &str) -> String {
        match RedbOptions::from_url(url) {
            Err(Error::InvalidConfig { reason }) => reason,
            other => panic!("{url}: expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn a_bare_path_has_the_defaults() {
        let (path, options) = parse("redb:keys.redb");
        assert_eq!(path, Path::new("keys.redb"));
        assert_eq!(options, RedbOptions::default());
        assert_eq!(
            parse("redb:/var/lib/k.redb?").0,
            Path::new("/var/lib/k.redb")
        );
        assert_eq!(
            parse("redb:///var/lib/k.redb").0,
            Path::new("/var/lib/k.redb")
        );
    }

    #[test]
    fn every_option_is_parsed() {
        let (path, options) = parse(
            "redb:/tmp/k.redb?durability=relaxed&flush_every_ms=250&max_batch=32\
             &max_queued=64&linger_us=150&cache_size=1048576",
        );
        assert_eq!(path, Path::new("/tmp/k.redb"));
        let want = RedbOptions::new()
            .durability(RedbDurability::Relaxed {
                flush_every: Duration::from_millis(250),
            })
            .max_batch(32)
            .max_queued(64)
            .linger(Duration::from_micros(150))
            .cache_size(1 << 20);
        assert_eq!(options, want);
    }

    #[test]
    fn durability_values() {
        let durability = |url| parse(url).1.get_durability();
        assert_eq!(
            durability("redb:k?durability=immediate"),
            RedbDurability::Immediate
        );
        assert_eq!(
            durability("redb:k?durability=relaxed"),
            RedbDurability::relaxed()
        );
        // The order of the options does not matter.
        assert_eq!(
            durability("redb:k?flush_every_ms=5&durability=relaxed"),
            RedbDurability::Relaxed {
                flush_every: Duration::from_millis(5)
            }
        );
    }

    #[test]
    fn other_schemes_and_empty_paths_are_refused() {
        for url in [
            "sqlite:k.db",
            "memory:",
            "postgres://localhost/k",
            "REDB:k",
            "k.redb",
            "",
            "redb:",
            "redb:?max_batch=3",
            "redb://host/k.redb",
            "redb://",
        ] {
            invalid(url);
        }
    }

    #[test]
    fn unknown_repeated_and_malformed_options_are_refused() {
        assert!(invalid("redb:k?limits=3").contains("unknown"));
        assert!(invalid("redb:k?Durability=relaxed").contains("unknown"));
        assert!(invalid("redb:k?max_batch=3&max_batch=4").contains("twice"));
        assert!(invalid("redb:k?max_batch").contains("="));
        assert!(invalid("redb:k?flush_every_ms=10").contains("relaxed"));
        assert!(invalid("redb:k?durability=immediate&flush_every_ms=10").contains("relaxed"));
        assert!(invalid("redb:k?flush_every_ms=10&durability=immediate").contains("relaxed"));
    }

    #[test]
    fn bad_values_are_refused() {
        for url in [
            "redb:k?durability=none",
            "redb:k?durability=",
            "redb:k?max_batch=0",
            "redb:k?max_batch=-1",
            "redb:k?max_batch=+3",
            "redb:k?max_batch=1.5",
            "redb:k?max_queued=0",
            "redb:k?max_batch=99999999999999999999999",
            "redb:k?linger_us=1ms",
            "redb:k?cache_size=1GiB",
            "redb:k?durability=relaxed&flush_every_ms=x",
        ] {
            assert!(invalid(url).contains("value"), "{url}");
        }
    }
}
