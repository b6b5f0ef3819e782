#![doc = include_str!("../README.md")]

mod combine;
mod counts;
mod error;
mod listen;
mod ops;
mod options;
mod schema;
mod session;
mod tls;

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The deadpool-postgres this crate builds on: a host's pool for
/// [`PostgresStore::with_pool`] must be of this version.
pub use deadpool_postgres;
use deadpool_postgres::{Manager, ManagerConfig, Pool, QueueMode, RecyclingMethod, Runtime};
use keyclaim::backend::{Backend, StoreCore, async_trait};
use keyclaim::transfer::DeviceSnapshot;
use keyclaim::{
    Algorithm, Changes, ClaimOutcome, ClaimTarget, Device, DeviceId, FallbackTarget, ResetScope,
    Result, StoredFallback, SyncState, Upload, UploadOutcome, UserId,
};
pub use options::PostgresOptions;
pub use schema::SCHEMA_VERSION;
pub use tls::{RootCertificates, SslMode};

/// The backend's name in errors and logs.
pub(crate) const BACKEND: &str = "postgres";

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
    /// Operations waiting for a connection: for the pool's, and on
    /// keyclaim's own pool for a turn at the connections other than the one
    /// kept for large claims.
    pub waiting: usize,
    /// Claims waiting for a batch (see [`PostgresOptions::claim_batching`]).
    pub claims_queued: usize,
}

/// A [`KeyStore`](keyclaim::KeyStore) in a PostgreSQL database, shared by any number of
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
    connections: session::Connections,
    sql: ops::Sql,
    core: StoreCore,
    pinned_plans: bool,
    announcer: Option<Arc<listen::Announcer>>,
    combiner: combine::Combiner,
    _listener: Option<listen::Listener>,
    compactor: counts::Compactor,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No URL, password or key material: only what helps in a log.
        let status = self.connections.pool().status();
        f.debug_struct("PostgresStore")
            .field("schema", &self.sql.schema)
            .field("instance", &self.sql.instance)
            .field("pool_size", &status.max_size)
            .field("pool_available", &status.available)
            .field("host_pool", &self.connections.host_pool())
            .field("listening", &self._listener.is_some())
            .field("transactional_notify", &self.sql.transactional_notify)
            .field("pinned_plans", &self.pinned_plans)
            .field("claim_batching", &self.combiner.batching())
            .field("limits", self.core.limits())
            .finish()
    }
}

impl PostgresStore {
    /// Connects with the default [`PostgresOptions`] (schema `keyclaim`),
    /// creating or migrating the tables.
    ///
    /// `url` is a libpq-style connection string, as a URL
    /// (`postgresql://user:pass@host:5432/db`) or as `key=value` pairs
    /// (`host=/run/postgresql dbname=synapse`). TLS follows libpq's
    /// `sslmode` and `sslrootcert` there (`?sslmode=verify-full&sslrootcert=/etc/ssl/db-ca.pem`),
    /// or [`PostgresOptions::ssl_mode`] and
    /// [`PostgresOptions::root_certificates`]: see [`SslMode`]. A store URL
    /// that carries keyclaim's options (`?keyclaim_schema=...`) goes through
    /// [`PostgresOptions::from_url`] first.
    ///
    /// # Errors
    /// [`Error::Storage`] when the server cannot be reached (retryable);
    /// [`Error::InvalidConfig`] when the connection string is invalid, the
    /// server is refused (R10.5, see [`PostgresStore::connect_with`]), or
    /// TLS fails: the server's certificate refused, no TLS where the
    /// `sslmode` needs it, root certificates that cannot be read;
    /// [`Error::UnsupportedVersion`] when the schema was written by a newer
    /// keyclaim.
    ///
    /// [`Error::Storage`]: keyclaim::Error::Storage
    /// [`Error::InvalidConfig`]: keyclaim::Error::InvalidConfig
    /// [`Error::UnsupportedVersion`]: keyclaim::Error::UnsupportedVersion
    pub async fn connect(url: &str) -> Result<PostgresStore> {
        Self::connect_with(url, PostgresOptions::default()).await
    }

    /// Connects with the given options, creating or migrating the tables.
    ///
    /// Safe when several processes connect at once: migrations run under an
    /// advisory lock, one process at a time.
    ///
    /// Every pooled connection runs with synchronous commit on and READ
    /// COMMITTED, whatever the server's, database's or role's defaults
    /// (R10.5).
    ///
    /// # Errors
    /// As [`PostgresStore::connect`]; also [`Error::InvalidConfig`] for an
    /// invalid schema name, and for a server running with `fsync = off`
    /// unless [`PostgresOptions::allow_unsafe_server`] is set.
    ///
    /// [`Error::InvalidConfig`]: keyclaim::Error::InvalidConfig
    #[tracing::instrument(
        name = "keyclaim.postgres.connect",
        skip_all,
        fields(schema = %options.get_schema(), sslmode = ?options.get_ssl_mode())
    )]
    pub async fn connect_with(url: &str, options: PostgresOptions) -> Result<PostgresStore> {
        options::validate_schema(options.get_schema())?;
        let (mut config, connector) = client_config(url, &options)?;
        let listen_config = config.clone();
        let server_options = session::startup_options(&options, config.get_options());
        config.options(&server_options);

        let manager = Manager::from_config(
            config,
            connector.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.get_pool_size())
            // The connection used last is handed out first: a few warm
            // server processes serve a light load (their caches and plans
            // hot) instead of every idle one in turn.
            .queue_mode(QueueMode::Lifo)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.get_pool_wait_timeout()))
            .create_timeout(Some(options.get_connect_timeout()))
            .recycle_timeout(Some(options.get_connect_timeout()))
            .post_create(session::setup_hook())
            .build()
            .map_err(error::pool_build)?;
        let listen = options
            .get_notifications()
            .then_some((listen_config, connector));
        Self::start(pool, session::Settings::Connection, listen, options).await
    }

    /// A store on a connection pool the homeserver already has, creating or
    /// migrating keyclaim's tables in [`PostgresOptions::schema`], without a
    /// notification listener: this store's subscribers see its own changes,
    /// not other processes' (R11.1 needs
    /// [`PostgresStore::with_pool_listening`] for those); other processes
    /// are still told about this store's changes.
    ///
    /// **What keyclaim changes on the pool's connections: nothing that
    /// outlives its transactions.** It cannot set startup options or run a
    /// hook on connections it did not open, so every statement it runs is
    /// inside a transaction that it starts as `BEGIN ISOLATION LEVEL READ
    /// COMMITTED` followed by `SET LOCAL` of `search_path` (the schema),
    /// `enable_seqscan = off`, `enable_sort = off`, `jit = off`,
    /// `plan_cache_mode` (with [`PostgresOptions::pinned_plans`]),
    /// `statement_timeout` (when
    /// [`PostgresOptions::statement_timeout`] is set) and
    /// `synchronous_commit = on` (unless already `on` or `remote_apply`):
    /// R10.5 holds whatever the host's session settings are. A transaction
    /// whose operation is dropped half-way rolls back before the
    /// connection is used again. The migration runs on one connection taken
    /// out of the pool for good (its session settings changed, it is closed
    /// afterwards; the pool opens a new one when it needs it).
    ///
    /// **What it needs from them:**
    /// - A role that may create the schema and its tables (or the schema
    ///   created beforehand and owned by or writable for that role), and
    ///   use advisory locks and `pg_notify`.
    /// - Prepared statements that stay on their connection: keyclaim
    ///   prepares each statement once per connection and keeps it in the
    ///   pool's statement cache (`Manager::statement_caches`), named by
    ///   tokio-postgres. So no `pgbouncer` in transaction or statement
    ///   pooling mode unless it tracks prepared statements
    ///   (`max_prepared_statements`, pgbouncer 1.21 and later). Statements
    ///   resolve keyclaim's tables through the `search_path` of the
    ///   transaction they run in, so the host's own `search_path` may be
    ///   anything. Clearing a connection's statement cache or `DISCARD
    ///   ALL` between uses only costs preparing again.
    /// - A pool that is not shut down while the store is in use.
    ///
    /// Options about keyclaim's own pool ([`PostgresOptions::pool_size`],
    /// the timeouts of connecting and of waiting for a connection) do not
    /// apply: the pool's own settings do. The server check of
    /// [`PostgresStore::connect_with`] is made (`fsync`, and that the
    /// settings above take).
    ///
    /// On a host's pool an operation that keyclaim's own pool runs as one
    /// statement costs two more round trips (`BEGIN` with the settings,
    /// and `COMMIT`). keyclaim's own pool hands out the connection used
    /// last first (`QueueMode::Lifo`); deadpool's default hands out the one
    /// idle longest, so that a light load visits every idle server process
    /// in turn, each with cold caches (measured in `docs/benchmarks.md`). A
    /// host pool built with `.queue_mode(QueueMode::Lifo)` avoids it.
    ///
    /// # Errors
    /// As [`PostgresStore::connect_with`].
    #[tracing::instrument(
        name = "keyclaim.postgres.with_pool",
        skip_all,
        fields(schema = %options.get_schema())
    )]
    pub async fn with_pool(pool: Pool, options: PostgresOptions) -> Result<PostgresStore> {
        options::validate_schema(options.get_schema())?;
        let settings = session::Settings::per_transaction(&options);
        Self::start(pool, settings, None, options).await
    }

    /// [`PostgresStore::with_pool`], with a notification listener: one
    /// connection of its own, opened from `listen_url` (a connection string
    /// as [`PostgresStore::connect`] takes, with its TLS settings; usually
    /// the one the host's pool was built from), that `LISTEN`s for other
    /// processes' changes (R11.1), unless
    /// [`PostgresOptions::notifications`] is off. (A pooled connection
    /// cannot listen: the pool does not hand out its notifications.)
    ///
    /// # Errors
    /// As [`PostgresStore::with_pool`]; also as
    /// [`PostgresStore::connect`] for `listen_url`.
    pub async fn with_pool_listening(
        pool: Pool,
        listen_url: &str,
        options: PostgresOptions,
    ) -> Result<PostgresStore> {
        options::validate_schema(options.get_schema())?;
        let listen = client_config(listen_url, &options)?;
        let listen = options.get_notifications().then_some(listen);
        let settings = session::Settings::per_transaction(&options);
        Self::start(pool, settings, listen, options).await
    }

    /// The rest of connecting, on either kind of pool: the server check,
    /// the migration, the background tasks.
    async fn start(
        pool: Pool,
        settings: session::Settings,
        listen: Option<(tokio_postgres::Config, tls::Connector)>,
        options: PostgresOptions,
    ) -> Result<PostgresStore> {
        let schema = options.get_schema();
        let connections = session::Connections::new(pool.clone(), settings);
        {
            let mut conn = connections.get_without_turn("connect").await?;
            session::check(&mut conn, &options).await?;
            schema::migrate(conn.detach(&options).await?, schema).await?;
        }

        let transactional_notify = options.get_transactional_notify();
        let sql = ops::Sql::new(schema, instance_id(), transactional_notify);
        let announcer = (!transactional_notify).then(|| {
            Arc::new(listen::Announcer::start(
                pool.clone(),
                sql.channel.clone(),
                sql.instance.clone(),
                listen::MAX_BACKLOG_DEVICES,
            ))
        });
        let core = StoreCore::new(options.get_limits().clone());
        let combiner = combine::Combiner::new(
            combine::Settings::of(&options),
            connections.clone(),
            sql.clone(),
            core.clone(),
            announcer.clone(),
        );
        let listener = match listen {
            Some((config, connector)) => Some(
                listen::Listener::start(
                    config,
                    connector,
                    sql.channel.clone(),
                    sql.instance.clone(),
                    core.clone(),
                    options.get_connect_timeout(),
                )
                .await?,
            ),
            None => None,
        };
        let compactor =
            counts::Compactor::start(connections.clone(), options.get_count_compaction_interval());
        tracing::debug!(schema, "connected");
        Ok(PostgresStore {
            connections,
            sql,
            core,
            pinned_plans: options.get_pinned_plans(),
            announcer,
            combiner,
            _listener: listener,
            compactor,
        })
    }

    /// The schema this store's tables live in.
    pub fn schema(&self) -> &str {
        &self.sql.schema
    }

    /// Folds the per-device count rows that writes added since the last
    /// compaction now, rather than at the next background round (see
    /// [`PostgresOptions::count_compaction_interval`]); answers the number
    /// of (device, algorithm) pairs folded. Counts are exact either way
    /// (R6.2); folding only keeps [`counts_many`](keyclaim::KeyStore::counts_many)
    /// short. Skips the work when another worker is compacting the schema.
    ///
    /// # Errors
    /// [`Error::Storage`](keyclaim::Error::Storage) when the server fails
    /// (retryable).
    pub async fn compact_counts(&self) -> Result<u64> {
        let mut client = self.client("compact_counts").await?;
        counts::compact(&mut client).await
    }

    /// The connection pool's state, for metrics.
    pub fn pool_status(&self) -> PoolStatus {
        let status = self.connections.pool().status();
        PoolStatus {
            max_size: status.max_size,
            size: status.size,
            available: status.available,
            waiting: status.waiting + self.connections.waiting_for_permits(),
            claims_queued: self.combiner.queued(),
        }
    }

    /// Tells the other workers about a committed change, unless the
    /// transaction already did (R11.2). (Core tells this handle's
    /// subscribers, R11.1.)
    fn changed(&self, changes: &Changes) {
        if let Some(announcer) = &self.announcer {
            announcer.announce(changes);
        }
    }

    /// A claim (R4.4 with `fall_back`, R12.1 without), through the
    /// combiner (which runs it at once on a connection of its own when
    /// batching is off).
    async fn claim_with(
        &self,
        op: &'static str,
        targets: &[ClaimTarget],
        fall_back: bool,
    ) -> Result<ClaimOutcome> {
        self.admit(op)?;
        let outcome = self.combiner.claim(op, targets, fall_back).await?;
        self.changed(&outcome.changes);
        Ok(outcome)
    }

    /// A pooled connection in keyclaim's session, or a retryable error.
    async fn client(&self, op: &'static str) -> Result<session::Conn> {
        self.connections.get(op).await
    }

    /// Lets a mutation in, or refuses it with a retryable error when the
    /// announcements waiting to be sent are at their bound (R10.6): then
    /// nothing of it is applied. Marks the count compaction due.
    fn admit(&self, op: &'static str) -> Result<()> {
        if let Some(announcer) = &self.announcer {
            announcer.room(op)?;
        }
        self.compactor.wrote();
        Ok(())
    }

    /// A pooled connection for a mutation that [`Self::admit`] lets in, or
    /// a retryable error.
    async fn writer(&self, op: &'static str) -> Result<session::Conn> {
        self.admit(op)?;
        self.client(op).await
    }
}

/// The client configuration and TLS connector of a connection string
/// (see [`PostgresStore::connect`]): `sslmode` and `sslrootcert` taken out
/// and applied, keyclaim's connect timeout, `application_name` defaulting
/// to `keyclaim`.
fn client_config(
    url: &str,
    options: &PostgresOptions,
) -> Result<(tokio_postgres::Config, tls::Connector)> {
    let (url, from_string) = tls::split(url)?;
    let tls = tls::Tls::resolve(
        options.get_ssl_mode(),
        options.get_root_certificates(),
        from_string,
    )?;
    let connector = tls.connector()?;
    let mut config: tokio_postgres::Config = url.parse().map_err(error::bad_url)?;
    config.ssl_mode(tls.pg_mode());
    config.connect_timeout(options.get_connect_timeout());
    if config.get_application_name().is_none() {
        config.application_name("keyclaim");
    }
    Ok((config, connector))
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
impl Backend for PostgresStore {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn core(&self) -> &StoreCore {
        &self.core
    }

    async fn upload(&self, upload: &Upload) -> Result<UploadOutcome> {
        let mut client = self.writer("upload").await?;
        let outcome = ops::upload(&mut client, &self.sql, self.core.limits(), upload).await?;
        self.changed(&outcome.changes);
        Ok(outcome)
    }

    async fn claim(&self, targets: &[ClaimTarget]) -> Result<ClaimOutcome> {
        self.claim_with("claim", targets, true).await
    }

    async fn claim_one_time_keys(&self, targets: &[ClaimTarget]) -> Result<ClaimOutcome> {
        self.claim_with("claim_one_time_keys", targets, false).await
    }

    async fn claim_fallback_keys(&self, targets: &[FallbackTarget]) -> Result<ClaimOutcome> {
        let mut client = self.writer("claim_fallback_keys").await?;
        let outcome = ops::claim_fallback_keys(&mut client, &self.sql, targets).await?;
        self.changed(&outcome.changes);
        Ok(outcome)
    }

    async fn reset_one_time_keys(
        &self,
        device: &Device,
        scope: &ResetScope,
    ) -> Result<UploadOutcome> {
        let mut client = self.writer("reset_one_time_keys").await?;
        let outcome = ops::reset_one_time_keys(&mut client, &self.sql, device, scope).await?;
        self.changed(&outcome.changes);
        Ok(outcome)
    }

    async fn replace_device(
        &self,
        previous: Option<&DeviceId>,
        upload: &Upload,
    ) -> Result<UploadOutcome> {
        let mut client = self.writer("replace_device").await?;
        let outcome =
            ops::replace_device(&mut client, &self.sql, self.core.limits(), previous, upload)
                .await?;
        self.changed(&outcome.changes);
        Ok(outcome)
    }

    async fn fallback_keys(&self, device: &Device) -> Result<BTreeMap<Algorithm, StoredFallback>> {
        let mut client = self.client("fallback_keys").await?;
        ops::fallback_keys(&mut client, device).await
    }

    async fn counts_many(&self, devices: &[Device]) -> Result<Vec<SyncState>> {
        let mut client = self.client("counts_many").await?;
        ops::counts_many(&mut client, devices).await
    }

    async fn sync_state(&self, device: &Device) -> Result<SyncState> {
        let mut client = self.client("sync_state").await?;
        ops::sync_state(&mut client, device, "sync_state").await
    }

    async fn delete_device(&self, device: &Device) -> Result<Changes> {
        let mut client = self.writer("delete_device").await?;
        let changes = ops::delete_device(&mut client, &self.sql, device).await?;
        self.changed(&changes);
        Ok(changes)
    }

    async fn delete_user(&self, user: &UserId) -> Result<Changes> {
        let mut client = self.writer("delete_user").await?;
        let changes = ops::delete_user(&mut client, &self.sql, user).await?;
        self.changed(&changes);
        Ok(changes)
    }

    async fn export_devices(
        &self,
        after: Option<&Device>,
        limit: usize,
    ) -> Result<Vec<DeviceSnapshot>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut client = self.client("export_devices").await?;
        ops::export_devices(&mut client, self.core.limits(), after, limit).await
    }

    async fn import_device(&self, snapshot: &DeviceSnapshot) -> Result<Changes> {
        let mut client = self.writer("import_device").await?;
        let changes =
            ops::import_device(&mut client, &self.sql, self.core.limits(), snapshot).await?;
        self.changed(&changes);
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync + 'static>() {}
        check::<PostgresStore>();
    }
}
