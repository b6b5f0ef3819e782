//! The settings of a [`PostgresStore`](crate::PostgresStore): a builder of
//! `#[must_use]` setters, `get_<option>` getters, and parsing from a store
//! URL. (Over 500 lines: half of it is the unit tests of `from_url`.)

use std::time::Duration;

use keyclaim::backend::url::UrlOptions;
use keyclaim::{Error, Limits, Result};

use crate::tls::{RootCertificates, SslMode};

/// The prefix of keyclaim's own parameters in a store URL.
const URL_PREFIX: &str = "keyclaim_";

/// How a [`PostgresStore`](crate::PostgresStore) connects: schema, pool
/// size, timeouts, notifications, planner settings, limits. Build with
/// [`PostgresOptions::new`] and the setters, or parse a store URL with
/// [`PostgresOptions::from_url`]:
///
/// ```
/// use std::time::Duration;
/// let options = keyclaim_postgres::PostgresOptions::new()
///     .schema("e2e_keys")
///     .pool_size(32)
///     .pool_wait_timeout(Duration::from_secs(5));
/// assert_eq!(options.get_schema(), "e2e_keys");
/// assert_eq!(options.get_pool_size(), 32);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostgresOptions {
    schema: String,
    pool_size: usize,
    connect_timeout: Duration,
    pool_wait_timeout: Duration,
    statement_timeout: Option<Duration>,
    notifications: bool,
    transactional_notify: bool,
    pinned_plans: bool,
    allow_unsafe_server: bool,
    count_compaction_interval: Duration,
    claim_batching: bool,
    claim_batch_targets: usize,
    claim_batches_in_flight: usize,
    claim_queue_limit: usize,
    ssl_mode: Option<SslMode>,
    root_certificates: Option<RootCertificates>,
    limits: Limits,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            schema: Self::DEFAULT_SCHEMA.to_owned(),
            pool_size: 16,
            connect_timeout: Duration::from_secs(10),
            pool_wait_timeout: Duration::from_secs(10),
            statement_timeout: None,
            notifications: true,
            transactional_notify: false,
            pinned_plans: true,
            allow_unsafe_server: false,
            count_compaction_interval: Duration::from_secs(1),
            claim_batching: true,
            claim_batch_targets: 256,
            claim_batches_in_flight: 4,
            claim_queue_limit: 4096,
            ssl_mode: None,
            root_certificates: None,
            limits: Limits::default(),
        }
    }
}

impl PostgresOptions {
    /// The schema a store uses when [`PostgresOptions::schema`] is not set.
    pub const DEFAULT_SCHEMA: &str = "keyclaim";

    /// The longest schema name [`PostgresOptions::schema`] accepts, in
    /// bytes. The notification channel is named after the schema and
    /// PostgreSQL identifiers end at 63 bytes.
    pub const MAX_SCHEMA_LEN: usize = 40;

    /// The defaults: schema [`PostgresOptions::DEFAULT_SCHEMA`], 16
    /// connections, 10 s timeouts, no statement timeout, cross-process
    /// notifications on and sent after the commit, pinned plans, a server
    /// with `fsync = off` refused, claim batching on (256 targets a batch,
    /// 4 batches in flight, 4,096 claims waiting), the contract's default
    /// [`Limits`].
    pub fn new() -> Self {
        Self::default()
    }

    /// The schema that holds keyclaim's tables, so that keyclaim can live in
    /// a homeserver's existing database. Created on connect when missing.
    /// Lowercase ASCII letters, digits and `_`, not starting with a digit
    /// or `pg_`, at most [`PostgresOptions::MAX_SCHEMA_LEN`] bytes (checked
    /// by [`PostgresStore::connect_with`](crate::PostgresStore::connect_with)).
    #[must_use]
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The most connections the pool opens (at least 1). Default 16. The
    /// notification listener holds one more connection of its own. With 2
    /// or more, one of them is kept for claims of more targets than
    /// [`PostgresOptions::claim_batch_targets`] (a big room's): other
    /// operations use the rest, so such a claim never queues behind them
    /// for a connection.
    #[must_use]
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// How long opening one connection may take. Default 10 s.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long an operation waits for a free pooled connection before it
    /// fails with a retryable error. Default 10 s.
    #[must_use]
    pub fn pool_wait_timeout(mut self, timeout: Duration) -> Self {
        self.pool_wait_timeout = timeout;
        self
    }

    /// A server-side `statement_timeout` for every pooled connection. A
    /// statement cancelled by it fails with a retryable error and applies
    /// nothing. Default none.
    #[must_use]
    pub fn statement_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// Whether the store listens for other processes' changes (`LISTEN` on
    /// a dedicated connection) and forwards them to its subscribers (R11.1).
    /// Default on. Changes are always announced to other processes.
    #[must_use]
    pub fn notifications(mut self, on: bool) -> Self {
        self.notifications = on;
        self
    }

    /// Whether each mutation sends its cross-process notification inside
    /// its own transaction (`pg_notify` before `COMMIT`: delivered exactly
    /// when the change commits, even if this process dies right after).
    /// Default off: notifications are sent right after the commit, batched,
    /// because PostgreSQL serializes the commits of all notifying
    /// transactions in a database, which caps claim throughput (see the
    /// crate documentation); a process dying between commit and
    /// announcement then leaves the other workers unwoken for that change.
    #[must_use]
    pub fn transactional_notify(mut self, on: bool) -> Self {
        self.transactional_notify = on;
        self
    }

    /// Whether pooled connections pin every prepared statement to one
    /// generic plan (`plan_cache_mode=force_generic_plan`). Default on.
    ///
    /// keyclaim's statements are written for one plan shape (index scans
    /// under `LATERAL`, TID scans), whatever the number of claim targets.
    /// Left to itself, PostgreSQL plans a prepared statement afresh on every
    /// call while a custom plan looks cheaper than the generic one, which it
    /// always does for a claim of one target: planning the claim statement
    /// then cost more server time than executing it (measured: 0.61 ms
    /// against 0.28 ms per claim).
    ///
    /// Off leaves the choice between custom and generic plans to
    /// PostgreSQL, as the reference homeserver's statement runs in the
    /// benchmark. Either way connections run with `enable_seqscan=off`, so
    /// that a generic plan made while a table was small does not keep
    /// scanning it whole once it has grown, and `enable_sort=off`, so that
    /// a walk over a device's keys goes through the index its `ORDER BY`
    /// names, never through a sort of all the device's keys.
    #[must_use]
    pub fn pinned_plans(mut self, on: bool) -> Self {
        self.pinned_plans = on;
        self
    }

    /// Whether to use a server that runs with `fsync = off` or
    /// `full_page_writes = off`. Default off:
    /// connecting to such a server fails with
    /// [`Error::InvalidConfig`], because a
    /// crash of its machine can lose committed claims, whose keys would then
    /// be handed out again (R10.5). On is for throwaway test servers only;
    /// it relaxes nothing else (every connection still runs with synchronous
    /// commit on and READ COMMITTED).
    #[must_use]
    pub fn allow_unsafe_server(mut self, on: bool) -> Self {
        self.allow_unsafe_server = on;
        self
    }

    /// How often the store folds the per-device count rows its writes
    /// added (see [`PostgresStore::compact_counts`]), when it wrote since
    /// the last round; every 30 intervals when it did not. Default 1 s.
    /// Counts are exact either way (R6.2); between rounds,
    /// [`counts_many`](keyclaim::KeyStore::counts_many) reads one more row
    /// per write that touched a device it asks for.
    ///
    /// [`PostgresStore::compact_counts`]: crate::PostgresStore::compact_counts
    #[must_use]
    pub fn count_compaction_interval(mut self, interval: Duration) -> Self {
        self.count_compaction_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Whether claims of concurrent callers share statements. Default on.
    ///
    /// A claim statement costs a round trip and a commit whatever its
    /// number of targets. With batching on, a claim runs at once when fewer
    /// than [`PostgresOptions::claim_batches_in_flight`] claims or batches
    /// are running and none waits (so a lone client waits for nothing);
    /// otherwise it queues, and the claims that queued while the running
    /// ones ran go out together as one statement, each caller answered its
    /// own keys (oldest first, in arrival order for claims of the same
    /// device: R4.2). A failing batch runs its claims again one by one, so
    /// a claim fails only on its own failure; a claim whose caller went away
    /// before its batch started is not applied (R10.6). Off: every claim
    /// takes a pooled connection and runs its own statement. Applies to
    /// [`KeyStore::claim`](keyclaim::KeyStore::claim) and the one-time step
    /// of split claims, not to their fallback step.
    #[must_use]
    pub fn claim_batching(mut self, on: bool) -> Self {
        self.claim_batching = on;
        self
    }

    /// The most targets in one claim batch (at least 1). Default 256. A
    /// claim of more targets runs alone, at once, on a connection of its
    /// own, so that a claim of thousands of devices neither waits for small
    /// claims nor delays them.
    #[must_use]
    pub fn claim_batch_targets(mut self, targets: usize) -> Self {
        self.claim_batch_targets = targets.max(1);
        self
    }

    /// The most claim batches (or lone claims) running at once, each on a
    /// pooled connection (at least 1). Default 4. More batches in flight
    /// make them smaller; keep it below the pool size, which the other
    /// operations and claims larger than a batch share.
    #[must_use]
    pub fn claim_batches_in_flight(mut self, batches: usize) -> Self {
        self.claim_batches_in_flight = batches.max(1);
        self
    }

    /// The most claims waiting for a batch. Default 4,096. A claim that
    /// finds the queue full fails at once with a retryable error (R10.6).
    #[must_use]
    pub fn claim_queue_limit(mut self, claims: usize) -> Self {
        self.claim_queue_limit = claims;
        self
    }

    /// Whether and how connections use TLS (libpq's `sslmode`; see
    /// [`SslMode`]). Set here, it wins over the connection string's
    /// `sslmode`; unset, the connection string's applies, else
    /// [`SslMode::Prefer`] (or [`SslMode::VerifyFull`] with the system's
    /// root certificates). Applies to the pool and to the notification
    /// listener's connection alike.
    #[must_use]
    pub fn ssl_mode(mut self, mode: SslMode) -> Self {
        self.ssl_mode = Some(mode);
        self
    }

    /// The certificates the server's certificate must chain to (libpq's
    /// `sslrootcert`; see [`RootCertificates`]). Set here, they win over
    /// the connection string's `sslrootcert`. Needed by
    /// [`SslMode::VerifyCa`] and [`SslMode::VerifyFull`]; with
    /// [`SslMode::Require`] they make it check the chain as
    /// [`SslMode::VerifyCa`] does (as libpq).
    #[must_use]
    pub fn root_certificates(mut self, roots: RootCertificates) -> Self {
        self.root_certificates = Some(roots);
        self
    }

    /// The limits the store enforces (R8.1 to R8.3).
    #[must_use]
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The configured schema name.
    pub fn get_schema(&self) -> &str {
        &self.schema
    }

    /// The configured largest pool.
    pub fn get_pool_size(&self) -> usize {
        self.pool_size
    }

    /// The configured connect timeout.
    pub fn get_connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The configured wait for a pooled connection.
    pub fn get_pool_wait_timeout(&self) -> Duration {
        self.pool_wait_timeout
    }

    /// The configured server-side statement timeout; `None` is none.
    pub fn get_statement_timeout(&self) -> Option<Duration> {
        self.statement_timeout
    }

    /// Whether the store listens for other processes' changes.
    pub fn get_notifications(&self) -> bool {
        self.notifications
    }

    /// Whether notifications are sent inside each mutating transaction.
    pub fn get_transactional_notify(&self) -> bool {
        self.transactional_notify
    }

    /// Whether prepared statements are pinned to one generic plan.
    pub fn get_pinned_plans(&self) -> bool {
        self.pinned_plans
    }

    /// Whether a server running with `fsync = off` is accepted.
    pub fn get_allow_unsafe_server(&self) -> bool {
        self.allow_unsafe_server
    }

    /// The configured count compaction interval.
    pub fn get_count_compaction_interval(&self) -> Duration {
        self.count_compaction_interval
    }

    /// Whether claims of concurrent callers share statements.
    pub fn get_claim_batching(&self) -> bool {
        self.claim_batching
    }

    /// The configured most targets in one claim batch.
    pub fn get_claim_batch_targets(&self) -> usize {
        self.claim_batch_targets
    }

    /// The configured most claim batches running at once.
    pub fn get_claim_batches_in_flight(&self) -> usize {
        self.claim_batches_in_flight
    }

    /// The configured most claims waiting for a batch.
    pub fn get_claim_queue_limit(&self) -> usize {
        self.claim_queue_limit
    }

    /// The TLS mode set with [`PostgresOptions::ssl_mode`], if any.
    pub fn get_ssl_mode(&self) -> Option<SslMode> {
        self.ssl_mode
    }

    /// The root certificates set with
    /// [`PostgresOptions::root_certificates`], if any.
    pub fn get_root_certificates(&self) -> Option<&RootCertificates> {
        self.root_certificates.as_ref()
    }

    /// The configured limits.
    pub fn get_limits(&self) -> &Limits {
        &self.limits
    }

    /// Parses a store URL into the connection URL and the options:
    ///
    /// ```text
    /// postgres://[USER[:PASSWORD]@][HOST][:PORT][/DBNAME][?PARAM=VALUE&PARAM=VALUE...]
    /// postgresql://...
    /// ```
    ///
    /// Parameters whose name starts with `keyclaim_` are keyclaim's options
    /// and are removed; every other parameter (libpq's, such as `sslmode`,
    /// `sslrootcert`, `application_name` or `host=/run/postgresql`) stays,
    /// in its order, in the returned connection URL, which
    /// [`PostgresStore::connect_with`](crate::PostgresStore::connect_with)
    /// hands to tokio-postgres. The query starts at the first `?` after
    /// the user information, as tokio-postgres reads it. keyclaim's options,
    /// each at most once, in any order:
    ///
    /// | parameter | value | setter |
    /// | --- | --- | --- |
    /// | `keyclaim_schema` | a schema name | [`PostgresOptions::schema`] |
    /// | `keyclaim_pool_size` | an integer, at least 1 | [`PostgresOptions::pool_size`] |
    /// | `keyclaim_connect_timeout_ms` | milliseconds, at least 1 | [`PostgresOptions::connect_timeout`] |
    /// | `keyclaim_pool_wait_timeout_ms` | milliseconds (0: fail at once when no connection is free) | [`PostgresOptions::pool_wait_timeout`] |
    /// | `keyclaim_statement_timeout_ms` | milliseconds (0: none, as in PostgreSQL) | [`PostgresOptions::statement_timeout`] |
    /// | `keyclaim_notifications` | `on` or `off` | [`PostgresOptions::notifications`] |
    /// | `keyclaim_transactional_notify` | `on` or `off` | [`PostgresOptions::transactional_notify`] |
    /// | `keyclaim_pinned_plans` | `on` or `off` | [`PostgresOptions::pinned_plans`] |
    /// | `keyclaim_allow_unsafe_server` | `on` or `off` | [`PostgresOptions::allow_unsafe_server`] |
    /// | `keyclaim_count_compaction_interval_ms` | milliseconds, at least 1 | [`PostgresOptions::count_compaction_interval`] |
    /// | `keyclaim_claim_batching` | `on` or `off` | [`PostgresOptions::claim_batching`] |
    /// | `keyclaim_claim_batch_targets` | an integer, at least 1 | [`PostgresOptions::claim_batch_targets`] |
    /// | `keyclaim_claim_batches_in_flight` | an integer, at least 1 | [`PostgresOptions::claim_batches_in_flight`] |
    /// | `keyclaim_claim_queue_limit` | an integer | [`PostgresOptions::claim_queue_limit`] |
    ///
    /// Options not given keep their defaults; the limits are always the
    /// defaults (set them with [`PostgresOptions::limits`] afterwards).
    /// libpq's own `connect_timeout` parameter is overridden by the
    /// connect timeout option.
    ///
    /// ```
    /// use keyclaim_postgres::PostgresOptions;
    /// let (url, options) = PostgresOptions::from_url(
    ///     "postgresql://synapse@db/synapse?sslmode=disable&keyclaim_schema=e2e_keys&keyclaim_pool_size=32",
    /// )?;
    /// assert_eq!(url, "postgresql://synapse@db/synapse?sslmode=disable");
    /// assert_eq!(options.get_schema(), "e2e_keys");
    /// assert_eq!(options.get_pool_size(), 32);
    /// # Ok::<(), keyclaim::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for another scheme, an unknown or repeated
    /// `keyclaim_` parameter, one without `=VALUE`, a value that does not
    /// parse, or an invalid schema name. The rest of the URL is checked
    /// when connecting (an invalid one is [`Error::InvalidConfig`] there too).
    pub fn from_url(url: &str) -> Result<(String, PostgresOptions)> {
        let Some(rest) = ["postgres://", "postgresql://"]
            .iter()
            .find_map(|scheme| url.strip_prefix(scheme))
        else {
            return Err(Error::invalid_config(format!(
                "{url:?} is not a postgres:// or postgresql:// URL"
            )));
        };
        // tokio-postgres reads everything up to the first `@` as user
        // information, so a `?` there (in a password) does not start the
        // query.
        let after_user = rest.find('@').map_or(0, |at| at + 1);
        let query_start = rest[after_user..]
            .find('?')
            .map(|q| url.len() - rest.len() + after_user + q);
        let Some(query_start) = query_start else {
            return Ok((url.to_owned(), PostgresOptions::new()));
        };
        let (query, kept) = UrlOptions::parse_filtered("postgres", &url[query_start + 1..], |p| {
            p.starts_with(URL_PREFIX)
        })?;
        let mut options = PostgresOptions::new();
        for (name, value) in query.iter() {
            options = options.with_url_option(&query, name, value)?;
        }
        validate_schema(&options.schema)?;
        let mut connection = url[..query_start].to_owned();
        if !kept.is_empty() {
            connection.push('?');
            connection.push_str(&kept.join("&"));
        }
        Ok((connection, options))
    }

    /// Applies one `keyclaim_NAME=VALUE` parameter of a store URL.
    fn with_url_option(self, query: &UrlOptions<'_>, name: &str, value: &str) -> Result<Self> {
        Ok(match &name[URL_PREFIX.len()..] {
            "schema" => self.schema(value),
            "pool_size" => self.pool_size(query.positive(name, value)?),
            "count_compaction_interval_ms" => {
                self.count_compaction_interval(Duration::from_millis(query.positive(name, value)?))
            }
            "connect_timeout_ms" => {
                self.connect_timeout(Duration::from_millis(query.positive(name, value)?))
            }
            "pool_wait_timeout_ms" => {
                self.pool_wait_timeout(Duration::from_millis(query.number(name, value)?))
            }
            "statement_timeout_ms" => self.statement_timeout(
                Some(Duration::from_millis(query.number(name, value)?)).filter(|t| !t.is_zero()),
            ),
            "notifications" => self.notifications(query.on_off(name, value)?),
            "transactional_notify" => self.transactional_notify(query.on_off(name, value)?),
            "pinned_plans" => self.pinned_plans(query.on_off(name, value)?),
            "allow_unsafe_server" => self.allow_unsafe_server(query.on_off(name, value)?),
            "claim_batching" => self.claim_batching(query.on_off(name, value)?),
            "claim_batch_targets" => self.claim_batch_targets(query.positive(name, value)?),
            "claim_batches_in_flight" => self.claim_batches_in_flight(query.positive(name, value)?),
            "claim_queue_limit" => self.claim_queue_limit(query.number(name, value)?),
            _ => {
                return Err(query.unknown(
                    name,
                    &[
                        "keyclaim_schema",
                        "keyclaim_pool_size",
                        "keyclaim_connect_timeout_ms",
                        "keyclaim_pool_wait_timeout_ms",
                        "keyclaim_statement_timeout_ms",
                        "keyclaim_notifications",
                        "keyclaim_transactional_notify",
                        "keyclaim_pinned_plans",
                        "keyclaim_allow_unsafe_server",
                        "keyclaim_count_compaction_interval_ms",
                        "keyclaim_claim_batching",
                        "keyclaim_claim_batch_targets",
                        "keyclaim_claim_batches_in_flight",
                        "keyclaim_claim_queue_limit",
                    ],
                ));
            }
        })
    }
}

/// Checks a schema name: it is put into `search_path` and a channel name
/// unquoted, so only a conservative alphabet is accepted.
pub(crate) fn validate_schema(schema: &str) -> Result<()> {
    let max = PostgresOptions::MAX_SCHEMA_LEN;
    let ok = !schema.is_empty()
        && schema.len() <= max
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !schema.as_bytes()[0].is_ascii_digit()
        && !schema.starts_with("pg_");
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_config(format!(
            "invalid schema name {schema:?}: use 1 to {max} lowercase ASCII letters, \
             digits or '_', not starting with a digit or 'pg_'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> (String, PostgresOptions) {
        match PostgresOptions::from_url(url) {
            Ok(parsed) => parsed,
            Err(e) => panic!("{url}: {e}"),
        }
    }

    fn invalid(url: &str) -> String {
        match PostgresOptions::from_url(url) {
            Err(Error::InvalidConfig { reason }) => reason,
            other => panic!("{url}: expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn a_url_without_keyclaim_parameters_is_kept_whole() {
        for url in [
            "postgres://localhost/db",
            "postgresql://user:secret@db.internal:5433/synapse",
            "postgresql:///synapse?host=/run/postgresql",
            "postgres://u@h/d?sslmode=disable&application_name=hs&connect_timeout=3",
            "postgres://",
        ] {
            let (connection, options) = parse(url);
            assert_eq!(connection, url);
            assert_eq!(options, PostgresOptions::default());
        }
    }

    #[test]
    fn keyclaim_parameters_are_removed_and_the_rest_kept_in_order() {
        let (connection, options) = parse(
            "postgres://u@h/d?keyclaim_schema=e2e&sslmode=disable\
             &keyclaim_pool_size=4&application_name=hs",
        );
        assert_eq!(
            connection,
            "postgres://u@h/d?sslmode=disable&application_name=hs"
        );
        assert_eq!(options, PostgresOptions::new().schema("e2e").pool_size(4));
        // Only keyclaim's parameters: no `?` is left over.
        let (connection, _) = parse("postgresql://h/d?keyclaim_notifications=off");
        assert_eq!(connection, "postgresql://h/d");
        // Empty parameters carry nothing.
        let (connection, _) = parse("postgres://h/d?&sslmode=require&&keyclaim_schema=x&");
        assert_eq!(connection, "postgres://h/d?sslmode=require");
    }

    #[test]
    fn every_option_is_parsed() {
        let (connection, options) = parse(
            "postgresql://h/d?keyclaim_schema=kc_1&keyclaim_pool_size=32\
             &keyclaim_connect_timeout_ms=1500&keyclaim_pool_wait_timeout_ms=0\
             &keyclaim_statement_timeout_ms=250&keyclaim_notifications=off\
             &keyclaim_transactional_notify=on&keyclaim_pinned_plans=off\
             &keyclaim_allow_unsafe_server=on&keyclaim_count_compaction_interval_ms=250\
             &keyclaim_claim_batching=off&keyclaim_claim_batch_targets=64\
             &keyclaim_claim_batches_in_flight=2&keyclaim_claim_queue_limit=0",
        );
        assert_eq!(connection, "postgresql://h/d");
        let want = PostgresOptions::new()
            .schema("kc_1")
            .pool_size(32)
            .connect_timeout(Duration::from_millis(1500))
            .pool_wait_timeout(Duration::ZERO)
            .statement_timeout(Some(Duration::from_millis(250)))
            .notifications(false)
            .transactional_notify(true)
            .pinned_plans(false)
            .allow_unsafe_server(true)
            .count_compaction_interval(Duration::from_millis(250))
            .claim_batching(false)
            .claim_batch_targets(64)
            .claim_batches_in_flight(2)
            .claim_queue_limit(0);
        assert_eq!(options, want);
        assert!(!options.get_claim_batching());
        assert_eq!(options.get_claim_batch_targets(), 64);
        assert_eq!(options.get_claim_batches_in_flight(), 2);
        assert_eq!(options.get_claim_queue_limit(), 0);
        assert_eq!(
            options.get_statement_timeout(),
            Some(Duration::from_millis(250))
        );
        assert!(!options.get_notifications());
        assert!(options.get_transactional_notify());
        assert!(!options.get_pinned_plans());
        assert!(options.get_allow_unsafe_server());
        // The other values of the switches, and a zero statement timeout.
        let (_, options) = parse(
            "postgres://h/d?keyclaim_notifications=on&keyclaim_transactional_notify=off\
             &keyclaim_pinned_plans=on&keyclaim_statement_timeout_ms=0\
             &keyclaim_allow_unsafe_server=off&keyclaim_claim_batching=on\
             &keyclaim_claim_batch_targets=256&keyclaim_claim_batches_in_flight=4\
             &keyclaim_claim_queue_limit=4096",
        );
        assert_eq!(options, PostgresOptions::default());
    }

    #[test]
    fn a_question_mark_in_the_password_does_not_start_the_query() {
        let (connection, options) =
            parse("postgres://u:pa?ss@h/d?keyclaim_schema=x&sslmode=disable");
        assert_eq!(connection, "postgres://u:pa?ss@h/d?sslmode=disable");
        assert_eq!(options.get_schema(), "x");
        // What tokio-postgres reads is unchanged.
        let parsed: tokio_postgres::Config = connection.parse().expect("tokio-postgres parses it");
        assert_eq!(parsed.get_password(), Some(&b"pa?ss"[..]));
        assert_eq!(parsed.get_dbname(), Some("d"));
    }

    #[test]
    fn the_connection_url_parses_in_tokio_postgres() {
        let (connection, _) = parse(
            "postgresql://kc@127.0.0.1:5433/keys?keyclaim_schema=s&application_name=hs\
             &keyclaim_pinned_plans=off",
        );
        let parsed: tokio_postgres::Config = connection.parse().expect("tokio-postgres parses it");
        assert_eq!(parsed.get_application_name(), Some("hs"));
        assert_eq!(parsed.get_ports(), &[5433]);
    }

    #[test]
    fn other_schemes_are_refused() {
        for url in [
            "sqlite:k.db",
            "redb:k.redb",
            "memory:",
            "POSTGRES://h/d",
            "postgres:/h/d",
            "host=/run/postgresql dbname=synapse",
            "",
        ] {
            assert!(invalid(url).contains("not a postgres"), "{url}");
        }
    }

    #[test]
    fn unknown_repeated_and_malformed_parameters_are_refused() {
        assert!(invalid("postgres://h/d?keyclaim_limits=3").contains("unknown"));
        assert!(invalid("postgres://h/d?keyclaim_=3").contains("unknown"));
        assert!(invalid("postgres://h/d?keyclaim_Schema=x").contains("unknown"));
        assert!(invalid("postgres://h/d?keyclaim_schema=a&keyclaim_schema=b").contains("twice"));
        assert!(invalid("postgres://h/d?keyclaim_pool_size").contains("="));
    }

    #[test]
    fn bad_values_are_refused() {
        for url in [
            "postgres://h/d?keyclaim_pool_size=0",
            "postgres://h/d?keyclaim_pool_size=-1",
            "postgres://h/d?keyclaim_pool_size=+3",
            "postgres://h/d?keyclaim_pool_size=",
            "postgres://h/d?keyclaim_pool_size=99999999999999999999999",
            "postgres://h/d?keyclaim_connect_timeout_ms=0",
            "postgres://h/d?keyclaim_connect_timeout_ms=10s",
            "postgres://h/d?keyclaim_pool_wait_timeout_ms=1.5",
            "postgres://h/d?keyclaim_statement_timeout_ms=none",
            "postgres://h/d?keyclaim_notifications=true",
            "postgres://h/d?keyclaim_transactional_notify=ON",
            "postgres://h/d?keyclaim_pinned_plans=",
            "postgres://h/d?keyclaim_allow_unsafe_server=yes",
            "postgres://h/d?keyclaim_claim_batching=1",
            "postgres://h/d?keyclaim_claim_batch_targets=0",
            "postgres://h/d?keyclaim_claim_batches_in_flight=0",
            "postgres://h/d?keyclaim_claim_queue_limit=-1",
        ] {
            assert!(invalid(url).contains("value"), "{url}");
        }
    }

    #[test]
    fn an_invalid_schema_name_is_refused() {
        for schema in ["", "Keys", "1a", "pg_x", "a%2Db", "a-b"] {
            let url = format!("postgres://h/d?keyclaim_schema={schema}");
            assert!(invalid(&url).contains("schema name"), "{url}");
        }
    }

    #[test]
    fn schema_names_are_checked() {
        for good in ["keyclaim", "e2e_keys", "_x", "a1", &"x".repeat(40)] {
            assert!(validate_schema(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "1a",
            "Keyclaim",
            "a-b",
            "a b",
            "a;drop",
            "pg_x",
            &"x".repeat(41),
        ] {
            assert!(
                matches!(validate_schema(bad), Err(Error::InvalidConfig { .. })),
                "{bad}"
            );
        }
    }
}
