#![doc = include_str!("../README.md")]

pub mod baseline;
mod errors;
mod listen;
mod ops;
mod schema;

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use keyclaim::{
    Algorithm, ChangeNotifier, Changes, ClaimOutcome, ClaimTarget, Device, DeviceSnapshot, Error,
    KeyStore, Limits, OtkCounts, Result, SyncState, Upload, UploadOutcome, UserId, broadcast,
};
use tokio_postgres::NoTls;

pub use schema::SCHEMA_VERSION;

/// The backend's name in errors and logs.
pub(crate) const BACKEND: &str = "postgres";

/// The schema a store uses when [`PostgresOptions::schema`] is not set.
pub const DEFAULT_SCHEMA: &str = "keyclaim";

/// The longest schema name [`PostgresOptions::schema`] accepts, in bytes. The
/// notification channel is named after the schema and PostgreSQL identifiers
/// end at 63 bytes.
pub const MAX_SCHEMA_LEN: usize = 40;

/// How a [`PostgresStore`] connects: schema, pool size, timeouts, limits.
///
/// ```
/// use std::time::Duration;
/// let options = keyclaim_postgres::PostgresOptions::new()
///     .schema("e2e_keys")
///     .pool_size(32)
///     .pool_wait_timeout(Duration::from_secs(5));
/// assert_eq!(options.schema_name(), "e2e_keys");
/// ```
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    schema: String,
    pool_size: usize,
    connect_timeout: Duration,
    pool_wait_timeout: Duration,
    statement_timeout: Option<Duration>,
    notifications: bool,
    transactional_notify: bool,
    pinned_plans: bool,
    limits: Limits,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            schema: DEFAULT_SCHEMA.to_owned(),
            pool_size: 16,
            connect_timeout: Duration::from_secs(10),
            pool_wait_timeout: Duration::from_secs(10),
            statement_timeout: None,
            notifications: true,
            transactional_notify: false,
            pinned_plans: true,
            limits: Limits::default(),
        }
    }
}

impl PostgresOptions {
    /// The defaults: schema [`DEFAULT_SCHEMA`], 16 connections, 10 s
    /// timeouts, no statement timeout, cross-process notifications on, the
    /// SPEC's default [`Limits`].
    pub fn new() -> Self {
        Self::default()
    }

    /// The schema that holds keyclaim's tables, so that keyclaim can live in
    /// a homeserver's existing database. Created on connect when missing.
    /// Lowercase ASCII letters, digits and `_`, not starting with a digit,
    /// at most [`MAX_SCHEMA_LEN`] bytes (checked by
    /// [`PostgresStore::connect_with`]).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The most connections the pool opens (at least 1). Default 16. The
    /// notification listener holds one more connection of its own.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// How long opening one connection may take. Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long an operation waits for a free pooled connection before it
    /// fails with a retryable error. Default 10 s.
    pub fn pool_wait_timeout(mut self, timeout: Duration) -> Self {
        self.pool_wait_timeout = timeout;
        self
    }

    /// A server-side `statement_timeout` for every pooled connection. A
    /// statement cancelled by it fails with a retryable error and applies
    /// nothing. Default none.
    pub fn statement_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// Whether the store listens for other processes' changes (`LISTEN` on
    /// a dedicated connection) and forwards them to its subscribers.
    /// Default on. Changes are always announced to other processes.
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
    /// crate README); a process dying between commit and announcement then
    /// leaves the other workers unwoken for that change.
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
    /// PostgreSQL; the benchmark runs the reference homeserver's statement
    /// ([`baseline`]) that way. Either way connections run with
    /// `enable_seqscan=off`, so that a generic plan made while a table was
    /// small does not keep scanning it whole once it has grown.
    pub fn pinned_plans(mut self, on: bool) -> Self {
        self.pinned_plans = on;
        self
    }

    /// The limits the store enforces (SPEC section 8).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The configured schema name.
    pub fn schema_name(&self) -> &str {
        &self.schema
    }
}

/// The state of a store's connection pool ([`PostgresStore::pool_status`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStatus {
    /// The most connections the pool opens.
    pub max_size: usize,
    /// Connections open now.
    pub size: usize,
    /// Open connections not in use.
    pub available: usize,
    /// Operations waiting for a connection.
    pub waiting: usize,
}

/// A [`KeyStore`] in a PostgreSQL database, shared by any number of
/// processes (homeserver workers) at once.
///
/// Every guarantee of the contract holds across connections and processes:
/// claims lock the oldest keys with `FOR UPDATE SKIP LOCKED` and delete them
/// in the same statement (no key twice, no under-issue), uploads serialize
/// per device on an advisory lock. See the crate documentation.
///
/// `Send + Sync`; share it as `Arc<PostgresStore>` or `Arc<dyn KeyStore>`.
/// Dropping it stops its notification listener; pooled connections close
/// when the last operation using them ends.
pub struct PostgresStore {
    pool: Pool,
    sql: ops::Sql,
    limits: Limits,
    pinned_plans: bool,
    notifier: ChangeNotifier,
    announcer: Option<listen::Announcer>,
    _listener: Option<listen::Listener>,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No URL, password or key material: only what helps in a log.
        let status = self.pool.status();
        f.debug_struct("PostgresStore")
            .field("schema", &self.sql.schema)
            .field("instance", &self.sql.instance)
            .field("pool_size", &status.max_size)
            .field("pool_available", &status.available)
            .field("listening", &self._listener.is_some())
            .field("transactional_notify", &self.sql.transactional_notify)
            .field("pinned_plans", &self.pinned_plans)
            .field("limits", &self.limits)
            .finish()
    }
}

impl PostgresStore {
    /// Connects with the default [`PostgresOptions`] (schema `keyclaim`),
    /// creating or migrating the tables.
    ///
    /// `url` is a libpq-style connection string, as a URL
    /// (`postgresql://user:pass@host:5432/db`) or as `key=value` pairs
    /// (`host=/run/postgresql dbname=synapse`). TLS is not supported: use a
    /// unix socket or a trusted network.
    ///
    /// # Errors
    /// [`Error::Storage`] when the server cannot be reached (retryable) or
    /// the URL is invalid (not retryable); [`Error::UnsupportedVersion`]
    /// when the schema was written by a newer keyclaim.
    pub async fn connect(url: &str) -> Result<PostgresStore> {
        Self::connect_with(url, PostgresOptions::default()).await
    }

    /// Connects with the given options, creating or migrating the tables.
    ///
    /// Safe when several processes connect at once: migrations run under an
    /// advisory lock, one process at a time.
    ///
    /// # Errors
    /// As [`PostgresStore::connect`]; also [`Error::Storage`] (not
    /// retryable) for an invalid schema name.
    #[tracing::instrument(name = "keyclaim_postgres::connect", skip_all, fields(schema = %options.schema))]
    pub async fn connect_with(url: &str, options: PostgresOptions) -> Result<PostgresStore> {
        validate_schema(&options.schema)?;
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| Error::storage(BACKEND, "connect", false, e))?;
        config.connect_timeout(options.connect_timeout);
        if config.get_application_name().is_none() {
            config.application_name("keyclaim");
        }
        let listen_config = config.clone();
        let mut server_options = config.get_options().unwrap_or_default().to_owned();
        // The schema is fixed per connection, so every statement is a plain
        // constant (prepared once per connection, never built per call).
        server_options.push_str(&format!(" -c search_path={}", options.schema));
        // Every statement is written for index and TID lookups. A cached
        // generic plan made while a table was small could otherwise keep a
        // sequential scan (e.g. `ctid = ANY(...)` as a filter over the whole
        // `otk` table) long after the table has grown.
        server_options.push_str(" -c enable_seqscan=off");
        if options.pinned_plans {
            // One generic plan per statement and connection, made once (and
            // again after an `ANALYZE`): see `PostgresOptions::pinned_plans`.
            server_options.push_str(" -c plan_cache_mode=force_generic_plan");
        }
        if let Some(timeout) = options.statement_timeout {
            server_options.push_str(&format!(" -c statement_timeout={}", timeout.as_millis()));
        }
        config.options(server_options.trim());

        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.pool_wait_timeout))
            .create_timeout(Some(options.connect_timeout))
            .recycle_timeout(Some(options.connect_timeout))
            .build()
            .map_err(|e| Error::storage(BACKEND, "connect", false, e))?;

        {
            let mut client = pool.get().await.map_err(|e| errors::pool("connect", e))?;
            schema::migrate(&mut client, &options.schema).await?;
        }

        let sql = ops::Sql::new(&options.schema, instance_id(), options.transactional_notify);
        let announcer = (!options.transactional_notify).then(|| {
            listen::Announcer::start(pool.clone(), sql.channel.clone(), sql.instance.clone())
        });
        let notifier = ChangeNotifier::new();
        let listener = if options.notifications {
            Some(
                listen::Listener::start(
                    listen_config,
                    sql.channel.clone(),
                    sql.instance.clone(),
                    notifier.clone(),
                    options.connect_timeout,
                )
                .await?,
            )
        } else {
            None
        };
        tracing::debug!(schema = %options.schema, "connected");
        Ok(PostgresStore {
            pool,
            sql,
            limits: options.limits,
            pinned_plans: options.pinned_plans,
            notifier,
            announcer,
            _listener: listener,
        })
    }

    /// The schema this store's tables live in.
    pub fn schema(&self) -> &str {
        &self.sql.schema
    }

    /// The connection pool's state, for metrics.
    pub fn pool_status(&self) -> PoolStatus {
        let status = self.pool.status();
        PoolStatus {
            max_size: status.max_size,
            size: status.size,
            available: status.available,
            waiting: status.waiting,
        }
    }

    /// Tells this handle's subscribers about a committed change, and the
    /// other workers unless the transaction already did.
    fn changed(&self, changes: &Changes) {
        self.notifier.notify(changes);
        if let Some(announcer) = &self.announcer {
            announcer.announce(changes);
        }
    }

    /// A pooled connection, or a retryable error.
    async fn client(&self, op: &'static str) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|e| errors::pool(op, e))
    }
}

/// Checks a schema name: it is put into `search_path` and a channel name
/// unquoted, so only a conservative alphabet is accepted.
fn validate_schema(schema: &str) -> Result<()> {
    let ok = !schema.is_empty()
        && schema.len() <= MAX_SCHEMA_LEN
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !schema.as_bytes()[0].is_ascii_digit()
        && !schema.starts_with("pg_");
    if ok {
        Ok(())
    } else {
        Err(Error::storage(
            BACKEND,
            "connect",
            false,
            format!(
                "invalid schema name {schema:?}: use 1 to {MAX_SCHEMA_LEN} lowercase ASCII letters, \
                 digits or '_', not starting with a digit or 'pg_'"
            ),
        ))
    }
}

/// A random identifier of this store handle, put into its notifications so
/// that its own listener can skip them.
fn instance_id() -> String {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(nanos);
    format!("{:016x}", hasher.finish())
}

#[async_trait]
impl KeyStore for PostgresStore {
    fn backend_name(&self) -> &'static str {
        BACKEND
    }

    fn limits(&self) -> &Limits {
        &self.limits
    }

    fn subscribe(&self) -> broadcast::Receiver<Changes> {
        self.notifier.subscribe()
    }

    #[tracing::instrument(name = "keyclaim_postgres::upload", skip_all, fields(device = %upload.device, keys = upload.key_count()))]
    async fn upload(&self, upload: &Upload) -> Result<UploadOutcome> {
        self.limits.check_upload(upload)?;
        let mut client = self.client("upload").await?;
        let outcome = ops::upload(&mut client, &self.sql, &self.limits, upload).await?;
        self.changed(&outcome.changes);
        Ok(outcome)
    }

    #[tracing::instrument(name = "keyclaim_postgres::claim", skip_all, fields(targets = targets.len()))]
    async fn claim(&self, targets: &[ClaimTarget]) -> Result<ClaimOutcome> {
        self.limits.check_claim(targets)?;
        let rounds = ops::ClaimRounds::new(targets, &self.limits);
        if rounds.is_empty() {
            return Ok(ClaimOutcome::default());
        }
        let mut client = self.client("claim").await?;
        let outcome = ops::claim(&mut client, &self.sql, &self.limits, targets, &rounds).await?;
        self.changed(&outcome.changes);
        Ok(outcome)
    }

    #[tracing::instrument(name = "keyclaim_postgres::otk_counts", skip_all, fields(%device))]
    async fn otk_counts(&self, device: &Device) -> Result<OtkCounts> {
        let client = self.client("otk_counts").await?;
        Ok(ops::sync_state(&client, &self.sql, device, "otk_counts")
            .await?
            .one_time_key_counts)
    }

    #[tracing::instrument(name = "keyclaim_postgres::unused_fallback_types", skip_all, fields(%device))]
    async fn unused_fallback_types(&self, device: &Device) -> Result<Vec<Algorithm>> {
        let client = self.client("unused_fallback_types").await?;
        Ok(
            ops::sync_state(&client, &self.sql, device, "unused_fallback_types")
                .await?
                .unused_fallback_key_types,
        )
    }

    #[tracing::instrument(name = "keyclaim_postgres::sync_state", skip_all, fields(%device))]
    async fn sync_state(&self, device: &Device) -> Result<SyncState> {
        let client = self.client("sync_state").await?;
        ops::sync_state(&client, &self.sql, device, "sync_state").await
    }

    #[tracing::instrument(name = "keyclaim_postgres::delete_device", skip_all, fields(%device))]
    async fn delete_device(&self, device: &Device) -> Result<Changes> {
        let mut client = self.client("delete_device").await?;
        let changes = ops::delete_device(&mut client, &self.sql, device).await?;
        self.changed(&changes);
        Ok(changes)
    }

    #[tracing::instrument(name = "keyclaim_postgres::delete_user", skip_all, fields(%user))]
    async fn delete_user(&self, user: &UserId) -> Result<Changes> {
        let mut client = self.client("delete_user").await?;
        let changes = ops::delete_user(&mut client, &self.sql, user).await?;
        self.changed(&changes);
        Ok(changes)
    }

    #[tracing::instrument(name = "keyclaim_postgres::export_devices", skip_all, fields(limit))]
    async fn export_devices(
        &self,
        after: Option<&Device>,
        limit: usize,
    ) -> Result<Vec<DeviceSnapshot>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut client = self.client("export_devices").await?;
        ops::export_devices(&mut client, after, limit).await
    }

    #[tracing::instrument(name = "keyclaim_postgres::import_device", skip_all, fields(device = %snapshot.device))]
    async fn import_device(&self, snapshot: &DeviceSnapshot) -> Result<Changes> {
        let mut client = self.client("import_device").await?;
        let changes = ops::import_device(&mut client, &self.sql, snapshot).await?;
        self.changed(&changes);
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_checked() {
        for good in ["keyclaim", "e2e_keys", "_x", "a1"] {
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
            assert!(validate_schema(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync + 'static>() {}
        check::<PostgresStore>();
    }
}
