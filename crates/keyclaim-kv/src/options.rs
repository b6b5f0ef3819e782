//! The settings of a [`KvStore`](crate::KvStore): a builder of
//! `#[must_use]` setters, `get_<option>` getters, and parsing from a store
//! URL's query.

use keyclaim::backend::url::UrlOptions;
use keyclaim::{Limits, Result};

/// How many operations may wait for the writer, by default: four full
/// batches of the default size.
const DEFAULT_MAX_QUEUED: usize = 1024;

/// Settings of a [`KvStore`](crate::KvStore); [`KvOptions::default`] is
/// durable:
///
/// ```
/// use keyclaim_kv::KvOptions;
/// let options = KvOptions::new().max_batch(64).max_queued(256);
/// assert_eq!(options.get_max_batch(), 64);
/// assert!(options.get_durable());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvOptions {
    limits: Limits,
    durable: bool,
    max_batch: usize,
    max_queued: usize,
}

impl Default for KvOptions {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            durable: true,
            max_batch: 256,
            max_queued: DEFAULT_MAX_QUEUED,
        }
    }
}

impl KvOptions {
    /// The defaults: durable, default limits, batches of up to 256, a queue
    /// of 1,024.
    pub fn new() -> Self {
        Self::default()
    }

    /// The limits the store enforces (section 8), among them how many
    /// issued keys are remembered per device and algorithm
    /// ([`Limits::remembered_issued_keys`], R3.4).
    #[must_use]
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Whether every batch is written durably (the engine's `durable`
    /// flag: RocksDB's synced write-ahead log). Default `true`: an operation
    /// that returned `Ok` survives a crash of the process and of the
    /// machine (R10.1).
    ///
    /// **`false` is not durable:** what survives is what the engine's
    /// non-durable writes survive (RocksDB: a crash of the process, not of
    /// the machine); a claimed key can then be handed out again after a
    /// restart, which breaks R4.2 and R10.1. For tests, benchmarks and
    /// throw-away data.
    #[must_use]
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// The most operations the writer puts into one engine batch (at
    /// least 1). Default 256.
    #[must_use]
    pub fn max_batch(mut self, max_batch: usize) -> Self {
        self.max_batch = max_batch.max(1);
        self
    }

    /// The most operations that may wait in the writer's queue (at least
    /// 1). Beyond it an operation fails at once with a retryable
    /// [`keyclaim::Error::Storage`] instead of queueing (R10.6). Default
    /// 1,024.
    #[must_use]
    pub fn max_queued(mut self, max_queued: usize) -> Self {
        self.max_queued = max_queued.max(1);
        self
    }

    /// The configured limits.
    pub fn get_limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether batches are written durably.
    pub fn get_durable(&self) -> bool {
        self.durable
    }

    /// The configured largest batch.
    pub fn get_max_batch(&self) -> usize {
        self.max_batch
    }

    /// The configured bound of the writer's queue.
    pub fn get_max_queued(&self) -> usize {
        self.max_queued
    }

    /// Parses the options of a store URL's query string (without its `?`)
    /// for the backend named `scheme` (in errors), each at most once:
    ///
    /// | option | value | setter |
    /// | --- | --- | --- |
    /// | `durable` | `on` or `off` | [`KvOptions::durable`] |
    /// | `max_batch` | an integer, at least 1 | [`KvOptions::max_batch`] |
    /// | `max_queued` | an integer, at least 1 | [`KvOptions::max_queued`] |
    ///
    /// ```
    /// use keyclaim_kv::KvOptions;
    /// let options = KvOptions::from_query("kv-memory", "durable=off&max_batch=32")?;
    /// assert!(!options.get_durable());
    /// assert_eq!(options.get_max_batch(), 32);
    /// # Ok::<(), keyclaim::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`keyclaim::Error::InvalidConfig`] for an unknown or repeated option,
    /// or a value that does not parse.
    pub fn from_query(scheme: &'static str, query: &str) -> Result<KvOptions> {
        let query = UrlOptions::parse(scheme, query)?;
        let mut options = KvOptions::new();
        for (name, value) in query.iter() {
            options = match name {
                "durable" => options.durable(query.on_off(name, value)?),
                "max_batch" => options.max_batch(query.positive(name, value)?),
                "max_queued" => options.max_queued(query.positive(name, value)?),
                _ => return Err(query.unknown(name, &["durable", "max_batch", "max_queued"])),
            };
        }
        Ok(options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_options_parse_and_bad_ones_are_refused() {
        assert_eq!(KvOptions::from_query("kv", "").ok(), Some(KvOptions::new()));
        let parsed = KvOptions::from_query("kv", "max_queued=8&durable=on").ok();
        assert_eq!(parsed, Some(KvOptions::new().max_queued(8)));
        for bad in [
            "max_batch=0",
            "durable=maybe",
            "limits=3",
            "max_batch=1&max_batch=2",
            "max_queued",
        ] {
            assert!(
                matches!(
                    KvOptions::from_query("kv", bad),
                    Err(keyclaim::Error::InvalidConfig { .. })
                ),
                "{bad}"
            );
        }
    }
}
