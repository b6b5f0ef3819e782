//! The settings of a [`RocksStore`](crate::RocksStore): the key-value
//! layer's options and the names of keyclaim's column families.

use std::path::PathBuf;

use keyclaim::backend::url::{self, UrlOptions};
use keyclaim::{Limits, Result};
use keyclaim_kv::{KvOptions, Space};

/// The prefix of the default column family names: `keyclaim_meta`,
/// `keyclaim_devices`, `keyclaim_keys`, `keyclaim_ids`.
pub const DEFAULT_PREFIX: &str = "keyclaim_";

/// Settings of a [`RocksStore`](crate::RocksStore); [`RocksOptions::default`]
/// is durable (synced write-ahead log writes) and uses the column families
/// `keyclaim_meta`, `keyclaim_devices`, `keyclaim_keys` and `keyclaim_ids`:
///
/// ```
/// use keyclaim_kv::Space;
/// use keyclaim_rocksdb::RocksOptions;
/// let options = RocksOptions::new()
///     .column_family_prefix("e2e_")
///     .column_family(Space::Keys, "e2e_one_time_keys")
///     .max_batch(64);
/// assert_eq!(options.get_column_family(Space::Meta), "e2e_meta");
/// assert_eq!(options.get_column_family(Space::Keys), "e2e_one_time_keys");
/// assert!(options.get_durable());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RocksOptions {
    kv: KvOptions,
    column_families: [String; Space::COUNT],
}

impl Default for RocksOptions {
    fn default() -> Self {
        Self {
            kv: KvOptions::default(),
            column_families: Space::ALL.map(|space| format!("{DEFAULT_PREFIX}{}", space.name())),
        }
    }
}

impl RocksOptions {
    /// The defaults: durable, default limits, the key-value layer's default
    /// batch and queue sizes, column families named `keyclaim_<space>`.
    pub fn new() -> Self {
        Self::default()
    }

    /// The limits the store enforces (section 8), among them how many
    /// issued keys are remembered per device and algorithm (R3.4).
    #[must_use]
    pub fn limits(mut self, limits: Limits) -> Self {
        self.kv = self.kv.limits(limits);
        self
    }

    /// Whether every batch is a synced write-ahead log write
    /// (`WriteOptions::set_sync(true)`). Default `true`: an operation that
    /// returned `Ok` survives a crash of the process and of the machine
    /// (R10.1).
    ///
    /// **`false` is not durable:** the log is written but not synced, so a
    /// machine crash (not a process crash) can lose acknowledged claims and
    /// hand their keys out again, which breaks R4.2 and R10.1. For tests,
    /// benchmarks and throw-away data.
    #[must_use]
    pub fn durable(mut self, durable: bool) -> Self {
        self.kv = self.kv.durable(durable);
        self
    }

    /// The most operations the writer puts into one write batch (at least
    /// 1); see [`KvOptions::max_batch`].
    #[must_use]
    pub fn max_batch(mut self, max_batch: usize) -> Self {
        self.kv = self.kv.max_batch(max_batch);
        self
    }

    /// The most operations that may wait for the writer (at least 1);
    /// beyond it an operation fails at once with a retryable error (R10.6).
    /// See [`KvOptions::max_queued`].
    #[must_use]
    pub fn max_queued(mut self, max_queued: usize) -> Self {
        self.kv = self.kv.max_queued(max_queued);
        self
    }

    /// All the key-value layer's options at once (limits, durability,
    /// batch and queue sizes).
    #[must_use]
    pub fn kv(mut self, kv: KvOptions) -> Self {
        self.kv = kv;
        self
    }

    /// Names every column family `<prefix><space>` (`meta`, `devices`,
    /// `keys`, `ids`; see [`Space::name`]), replacing names set before.
    #[must_use]
    pub fn column_family_prefix(mut self, prefix: &str) -> Self {
        self.column_families = Space::ALL.map(|space| format!("{prefix}{}", space.name()));
        self
    }

    /// Names the column family that holds `space`. The four names must
    /// differ, and no other code may write to these column families.
    #[must_use]
    pub fn column_family(mut self, space: Space, name: impl Into<String>) -> Self {
        self.column_families[space.index()] = name.into();
        self
    }

    /// The key-value layer's options.
    pub fn get_kv(&self) -> &KvOptions {
        &self.kv
    }

    /// The configured limits.
    pub fn get_limits(&self) -> &Limits {
        self.kv.get_limits()
    }

    /// Whether batches are synced write-ahead log writes.
    pub fn get_durable(&self) -> bool {
        self.kv.get_durable()
    }

    /// The name of the column family that holds `space`.
    pub fn get_column_family(&self, space: Space) -> &str {
        &self.column_families[space.index()]
    }

    /// Every column family name, indexed by [`Space::index`].
    pub fn get_column_families(&self) -> &[String; Space::COUNT] {
        &self.column_families
    }

    /// Checks that the four column family names are distinct and not
    /// empty, and not RocksDB's `default` column family.
    ///
    /// # Errors
    /// [`keyclaim::Error::InvalidConfig`] naming the offending name.
    pub fn validate(&self) -> Result<()> {
        for (i, name) in self.column_families.iter().enumerate() {
            if name.is_empty() || name == rocksdb::DEFAULT_COLUMN_FAMILY_NAME {
                return Err(keyclaim::Error::invalid_config(format!(
                    "rocksdb column family name {name:?} is reserved or empty"
                )));
            }
            if self.column_families[..i].contains(name) {
                return Err(keyclaim::Error::invalid_config(format!(
                    "rocksdb column family {name:?} is named for two key spaces"
                )));
            }
        }
        Ok(())
    }

    /// Parses a store URL `rocksdb:PATH[?OPTIONS]` into the database's
    /// directory and options, each option at most once:
    ///
    /// | option | value | setter |
    /// | --- | --- | --- |
    /// | `durable` | `on` or `off` | [`RocksOptions::durable`] |
    /// | `max_batch` | an integer, at least 1 | [`RocksOptions::max_batch`] |
    /// | `max_queued` | an integer, at least 1 | [`RocksOptions::max_queued`] |
    /// | `cf_prefix` | a column family name prefix | [`RocksOptions::column_family_prefix`] |
    ///
    /// ```
    /// use keyclaim_rocksdb::RocksOptions;
    /// let (path, options) = RocksOptions::from_url("rocksdb:/var/lib/keys?durable=off")?;
    /// assert_eq!(path, std::path::Path::new("/var/lib/keys"));
    /// assert!(!options.get_durable());
    /// # Ok::<(), keyclaim::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`keyclaim::Error::InvalidConfig`] for another scheme, an empty
    /// path, an unknown or repeated option, or a value that does not parse.
    pub fn from_url(url: &str) -> Result<(PathBuf, RocksOptions)> {
        let (path, query) = url::file_url("rocksdb", url)?;
        let query = UrlOptions::parse("rocksdb", query)?;
        let mut options = RocksOptions::new();
        for (name, value) in query.iter() {
            options = match name {
                "durable" => options.durable(query.on_off(name, value)?),
                "max_batch" => options.max_batch(query.positive(name, value)?),
                "max_queued" => options.max_queued(query.positive(name, value)?),
                "cf_prefix" => options.column_family_prefix(value),
                _ => {
                    return Err(
                        query.unknown(name, &["durable", "max_batch", "max_queued", "cf_prefix"])
                    );
                }
            };
        }
        options.validate()?;
        Ok((PathBuf::from(path), options))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_options_parse_and_bad_ones_are_refused() {
        let (path, options) = RocksOptions::from_url("rocksdb:keys").unwrap();
        assert_eq!(path, PathBuf::from("keys"));
        assert_eq!(options, RocksOptions::new());
        let (_, options) =
            RocksOptions::from_url("rocksdb:///abs/keys?max_batch=8&cf_prefix=kc_").unwrap();
        assert_eq!(options.get_kv().get_max_batch(), 8);
        assert_eq!(options.get_column_family(Space::Ids), "kc_ids");
        for bad in [
            "rocksdb:",
            "redb:keys",
            "rocksdb:keys?max_batch=0",
            "rocksdb:keys?durable=maybe",
            "rocksdb:keys?nope=1",
            "rocksdb:keys?durable=on&durable=off",
        ] {
            assert!(
                matches!(
                    RocksOptions::from_url(bad),
                    Err(keyclaim::Error::InvalidConfig { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn column_family_names_must_differ() {
        assert!(RocksOptions::new().validate().is_ok());
        let same = RocksOptions::new().column_family(Space::Keys, "keyclaim_ids");
        assert!(same.validate().is_err());
        let default = RocksOptions::new().column_family(Space::Meta, "default");
        assert!(default.validate().is_err());
        assert!(
            RocksOptions::new()
                .column_family_prefix("")
                .validate()
                .is_ok()
        );
    }
}
