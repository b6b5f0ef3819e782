//! The session every pooled connection runs in, and the server check at
//! connect (R10.5: the guarantees do not depend on how the server is tuned).
//!
//! - **READ COMMITTED**: the claim statement's `SKIP LOCKED` walk and its
//!   fallback marking (see [`crate::ops`]) and the uploads' facts, read after
//!   the device's lock is granted, rely on each statement taking a fresh
//!   snapshot. A server, database or role that defaults to `repeatable read`
//!   would make an upload plan against what was there before the upload
//!   that held the lock committed. Every connection sets
//!   `default_transaction_isolation` in its startup options, which take
//!   precedence over the server's, the database's and the role's settings.
//! - **Synchronous commit**: a write returns only once its commit is flushed
//!   (R4.2, R10.1). `synchronous_commit = off` acknowledges a commit that a
//!   crash of the server can lose, so that a claimed key could be handed out
//!   again; `local` and `remote_write` wait for less than `on` where
//!   synchronous standbys are configured. [`SESSION_SETUP`] raises those to
//!   `on` on every new connection and keeps `on` and `remote_apply`.
//! - **fsync** and **full_page_writes**: a server running with `fsync = off`
//!   cannot keep a commit through a crash of its machine, whatever the
//!   session does; one with `full_page_writes = off` cannot repair a page
//!   torn by such a crash. [`check`] refuses either at connect with [`Error::InvalidConfig`] unless
//!   [`PostgresOptions::allow_unsafe_server`] is set (test servers).
//!
//! On a homeserver's own pool ([`crate::PostgresStore::with_pool`])
//! keyclaim cannot set a connection's session: it sets the same values per
//! transaction instead ([`Settings::Transaction`]), and runs every
//! statement inside such a transaction. The operations reach the server
//! only through [`Conn`], which does that on a host's pool and adds nothing
//! on keyclaim's own; its statements name their tables unqualified, found
//! through the transaction's `search_path`, and PostgreSQL parses a cached
//! prepared statement again when it runs under another `search_path` than
//! it was planned with, so statements cached per connection name the right
//! tables whatever the host's `search_path` is.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use deadpool_postgres::{
    ClientWrapper, Hook, HookError, Object, Pool, PoolError, TimeoutType, Transaction,
};
use keyclaim::{Error, Result};
use tokio_postgres::types::ToSql;
use tokio_postgres::{IsolationLevel, Row};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::PostgresOptions;
use crate::error::{self, pg};

/// The planner settings of every keyclaim session, given as startup
/// options on keyclaim's own pool and with `SET LOCAL` on a host's.
///
/// - `enable_seqscan`: every statement is written for index and TID
///   lookups. A cached generic plan made while a table was small could
///   otherwise keep a sequential scan (e.g. `ctid = ANY(...)` as a filter
///   over the whole `otk` table) long after the table has grown.
/// - `enable_sort`: a walk over a device's keys names the index that
///   serves it by its `ORDER BY` (the claim walk in `ops::claim`,
///   `key_probe` in `ops`). With statistics that say a device holds about
///   one key (always, in a store whose device IDs are unique: the planner
///   takes user and device ID as independent), a sort of the keys read
///   through another index costs next to nothing, and the planner picks
///   either plan; on a large device the sort then reads and orders all its
///   keys on every claim (R4.7). With sorts off, only the named index
///   serves the walk, whatever the statistics.
/// - `jit`: a statement that has to sort (the issued memory's numbering)
///   carries the cost the planner gives a disabled sort, far above the
///   threshold of JIT compilation, which would then compile it on every
///   execution, where the statement itself runs in a millisecond.
///   keyclaim's statements are all small: JIT never pays for them.
const PLANNER_SETTINGS: [(&str, &str); 3] = [
    ("enable_seqscan", "off"),
    ("enable_sort", "off"),
    ("jit", "off"),
];

/// The setting that tells the count trigger of schema version 4 that this
/// session's statements count the keys they change themselves (R6.2, see
/// [`crate::counts::V4`]): every keyclaim statement that changes `otk`
/// writes its count rows in the same statement, and the trigger counts
/// only the writes of other sessions. Without it in a keyclaim session the
/// keys would be counted twice, so [`check`] refuses a session where it did
/// not take.
const COUNTED: (&str, &str) = ("keyclaim.counted", "on");

/// `SET [LOCAL] name = value;` for each of [`PLANNER_SETTINGS`].
fn set_planner_settings(scope: &str) -> String {
    PLANNER_SETTINGS
        .iter()
        .map(|(name, value)| format!(" SET {scope}{name} = {value};"))
        .collect()
}

/// The server options of every connection: the schema as `search_path`,
/// the planner settings, [`COUNTED`], READ COMMITTED, the statement
/// timeout.
pub(crate) fn startup_options(options: &PostgresOptions, existing: Option<&str>) -> String {
    let mut server_options = existing.unwrap_or_default().to_owned();
    // The schema is fixed per connection, so every statement is a plain
    // constant (prepared once per connection, never built per call).
    server_options.push_str(&format!(" -c search_path={}", options.get_schema()));
    for (name, value) in PLANNER_SETTINGS.into_iter().chain([COUNTED]) {
        server_options.push_str(&format!(" -c {name}={value}"));
    }
    if options.get_pinned_plans() {
        // One generic plan per statement and connection, made once (and
        // again after an `ANALYZE`): see `PostgresOptions::pinned_plans`.
        server_options.push_str(" -c plan_cache_mode=force_generic_plan");
    }
    // R10.5, see the module docs. The backslash keeps the space in the value.
    server_options.push_str(r" -c default_transaction_isolation=read\ committed");
    if let Some(timeout) = options.get_statement_timeout() {
        server_options.push_str(&format!(" -c statement_timeout={}", timeout.as_millis()));
    }
    server_options.trim().to_owned()
}

/// Run on every new pooled connection: synchronous commit at least `on`
/// (see the module docs), for the session.
const SESSION_SETUP: &str = "SELECT set_config('synchronous_commit', 'on', false)
    WHERE current_setting('synchronous_commit') NOT IN ('on', 'remote_apply')";

/// The pool's hook that runs [`SESSION_SETUP`] on each new connection; a
/// failure is the connection's failure (retryable when the server is).
pub(crate) fn setup_hook() -> Hook {
    Hook::async_fn(|client, _| {
        Box::pin(async move {
            client
                .batch_execute(SESSION_SETUP)
                .await
                .map_err(HookError::Backend)
        })
    })
}

/// What [`check`] reads, in a session of the pool.
const SERVER_SETTINGS: &str = "SELECT current_setting('fsync'),
    current_setting('synchronous_commit'), current_setting('transaction_isolation'),
    current_setting('full_page_writes'), current_setting('keyclaim.counted', true)";

/// Checks the server and the session of a pooled connection (R10.5), before
/// anything is created: refuses `fsync = off` and `full_page_writes = off`
/// unless allowed, and a session
/// whose settings did not take (for instance behind a proxy that drops
/// startup options).
pub(crate) async fn check(client: &mut Conn, options: &PostgresOptions) -> Result<()> {
    let op = "connect";
    let rows = client
        .query_alone(SERVER_SETTINGS, &[])
        .await
        .map_err(pg(op))?;
    let row = rows
        .first()
        .ok_or_else(|| Error::corrupt("no answer to the server settings"))?;
    let fsync: &str = row.try_get(0).map_err(pg(op))?;
    let sync_commit: &str = row.try_get(1).map_err(pg(op))?;
    let isolation: &str = row.try_get(2).map_err(pg(op))?;
    let full_page_writes: &str = row.try_get(3).map_err(pg(op))?;
    let counted: Option<&str> = row.try_get(4).map_err(pg(op))?;
    // Without full-page writes, a page torn by a crash of the machine
    // mid-write cannot be repaired from the WAL: committed rows can be lost
    // or corrupted as with fsync off.
    let unsafe_setting = if fsync != "on" {
        Some(("fsync", fsync))
    } else if full_page_writes != "on" {
        Some(("full_page_writes", full_page_writes))
    } else {
        None
    };
    if let Some((setting, value)) = unsafe_setting {
        if !options.get_allow_unsafe_server() {
            return Err(Error::invalid_config(format!(
                "the PostgreSQL server runs with {setting} = {value}: a crash of its machine \
                 can lose committed claims and hand their keys out again (R10.5). Turn \
                 {setting} on, or, for a throwaway test server only, set \
                 PostgresOptions::allow_unsafe_server (keyclaim_allow_unsafe_server=on)"
            )));
        }
        tracing::warn!(
            setting,
            value,
            "keyclaim connected to a server that can lose commits in a crash of its \
             machine (allow_unsafe_server)"
        );
    }
    if !matches!(sync_commit, "on" | "remote_apply")
        || isolation != "read committed"
        || counted != Some(COUNTED.1)
    {
        return Err(Error::invalid_config(format!(
            "keyclaim's session settings did not take (synchronous_commit = {sync_commit}, \
             transaction isolation {isolation}, {} = {}; R10.5 needs on and read \
             committed, the counts (R6.2) {}): \
             connect to PostgreSQL directly or through a proxy that passes startup options \
             (on a host's pool: one that passes SET LOCAL)",
            COUNTED.0,
            counted.unwrap_or("unset"),
            COUNTED.1
        )));
    }
    Ok(())
}

/// How a store's connections get keyclaim's session settings (R10.5).
#[derive(Clone, Debug)]
pub(crate) enum Settings {
    /// keyclaim's own pool: every connection starts with them (startup
    /// options and [`setup_hook`]); a single statement runs in its own
    /// implicit transaction.
    Connection,
    /// A host's pool ([`crate::PostgresStore::with_pool`]): its
    /// connections keep the host's session settings, and keyclaim sets its
    /// own per transaction, with this `SET LOCAL` batch right after
    /// `BEGIN ISOLATION LEVEL READ COMMITTED`; every statement runs inside
    /// such a transaction. Nothing outlives it.
    Transaction(Arc<str>),
}

impl Settings {
    /// The per-transaction settings of a store on a host's pool: the same
    /// values as [`startup_options`] and [`SESSION_SETUP`] give a
    /// connection of keyclaim's own pool.
    pub(crate) fn per_transaction(options: &PostgresOptions) -> Settings {
        let mut sql = format!(
            "SET LOCAL search_path = {};{} SET LOCAL {} = {};",
            options.get_schema(),
            set_planner_settings("LOCAL "),
            COUNTED.0,
            COUNTED.1
        );
        if options.get_pinned_plans() {
            sql.push_str(" SET LOCAL plan_cache_mode = force_generic_plan;");
        }
        if let Some(timeout) = options.get_statement_timeout() {
            sql.push_str(&format!(
                " SET LOCAL statement_timeout = {};",
                timeout.as_millis()
            ));
        }
        sql.push_str(
            " SELECT set_config('synchronous_commit', 'on', true) \
             WHERE current_setting('synchronous_commit') NOT IN ('on', 'remote_apply');",
        );
        Settings::Transaction(sql.into())
    }

    /// The session settings for a connection taken out of a host's pool
    /// for good (the migration's, closed after it): [`startup_options`]'
    /// search path, planner settings and isolation, and synchronous commit,
    /// for the session. Not the pinned plans (the migration prepares
    /// nothing twice), the statement timeout (a migration may take long;
    /// `schema::migrate` lifts it) or [`COUNTED`] (the migration writes no
    /// keys).
    pub(crate) fn for_detached_session(options: &PostgresOptions) -> String {
        format!(
            "SET search_path = {};{} \
             SET default_transaction_isolation = 'read committed'; \
             SELECT set_config('synchronous_commit', 'on', false) \
             WHERE current_setting('synchronous_commit') NOT IN ('on', 'remote_apply');",
            options.get_schema(),
            set_planner_settings("")
        )
    }
}

/// Where the operations take their pooled connections. A claim of more
/// targets than a batch holds (a big room's, R4.7) does not queue for a
/// connection behind the other operations: on keyclaim's own pool of at
/// least two connections, every other operation first takes one of
/// `pool_size - 1` turns, waiting at most the pool's own wait timeout
/// ([`PostgresOptions::pool_wait_timeout`]), so one connection is kept for
/// large claims. While no large claim runs, the kept connection's turn is
/// lent to a claim (or claim batch) that finds every other turn taken: a
/// claim's work is mostly its commit's WAL flush, and one more batch in
/// flight shares it. A large claim that starts meanwhile waits for the
/// first connection to come back (at most that one claim, unless other
/// large claims or the store's start-up check and count compaction, which
/// take a connection without a turn now and then, see
/// [`Connections::get_without_turn`], hold them). On a host's pool, whose
/// other users keyclaim cannot hold back, every operation takes its
/// connection from the pool alike.
#[derive(Clone, Debug)]
pub(crate) struct Connections {
    pool: Pool,
    settings: Settings,
    /// The permits of the operations other than large claims; `None`: no
    /// connection kept for large claims.
    others: Option<Arc<Semaphore>>,
    /// The turn of the connection kept for large claims, lent to claims
    /// while no large claim runs (one permit; used only with `others`).
    spare: Arc<Semaphore>,
    /// Large claims holding or waiting for a connection.
    large: Arc<AtomicUsize>,
    /// Operations waiting for one of `others`' permits.
    waiting: Arc<AtomicUsize>,
}

/// One operation counted in one of [`Connections`]' counts while it lives.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connections {
    /// The connections of `pool`, in `settings`; one kept for large claims
    /// when the pool is keyclaim's own ([`Settings::Connection`]) and holds
    /// at least two.
    pub(crate) fn new(pool: Pool, settings: Settings) -> Self {
        let size = pool.status().max_size;
        let others = (matches!(settings, Settings::Connection) && size >= 2)
            .then(|| Arc::new(Semaphore::new(size - 1)));
        Self {
            pool,
            settings,
            others,
            spare: Arc::new(Semaphore::new(1)),
            large: Arc::default(),
            waiting: Arc::default(),
        }
    }

    /// Operations waiting for a turn at the connections other than the
    /// one kept for large claims (not counted in the pool's own waiters).
    pub(crate) fn waiting_for_permits(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// The pool.
    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Whether the pool is a host's ([`Settings::Transaction`]).
    pub(crate) fn host_pool(&self) -> bool {
        matches!(self.settings, Settings::Transaction(_))
    }

    /// A pooled connection for any operation but a claim, or a retryable
    /// error when none frees within the pool's wait timeout.
    pub(crate) async fn get(&self, op: &'static str) -> Result<Conn> {
        self.get_with_turn(op, false).await
    }

    /// A pooled connection for a claim or claim batch of at most a batch's
    /// targets: [`Connections::get`], except that when every other turn is
    /// taken and no large claim runs, it takes the kept connection's turn.
    pub(crate) async fn get_for_claims(&self, op: &'static str) -> Result<Conn> {
        self.get_with_turn(op, true).await
    }

    async fn get_with_turn(&self, op: &'static str, claims: bool) -> Result<Conn> {
        let permit = match &self.others {
            // A free turn is taken at once, without a timer.
            Some(others) => Some(match self.free_turn(others, claims) {
                Some(permit) => permit,
                None => self.wait_for_permit(others, op).await?,
            }),
            None => None,
        };
        let mut conn = self.get_without_turn(op).await?;
        conn._permit = permit;
        Ok(conn)
    }

    /// A turn free now: one of `others`, else for `claims` the kept
    /// connection's while no large claim runs.
    fn free_turn(&self, others: &Arc<Semaphore>, claims: bool) -> Option<OwnedSemaphorePermit> {
        others.clone().try_acquire_owned().ok().or_else(|| {
            if claims && self.large.load(Ordering::Relaxed) == 0 {
                self.spare.clone().try_acquire_owned().ok()
            } else {
                None
            }
        })
    }

    /// Waits for one of `others`' permits, at most as long as the pool
    /// waits for a connection; past that, the pool's own timeout error.
    async fn wait_for_permit(
        &self,
        others: &Arc<Semaphore>,
        op: &'static str,
    ) -> Result<OwnedSemaphorePermit> {
        let _waiting = Counted::new(&self.waiting);
        let acquire = others.clone().acquire_owned();
        let acquired = match self.pool.timeouts().wait {
            Some(wait) => tokio::time::timeout(wait, acquire).await.ok(),
            None => Some(acquire.await),
        };
        // The semaphore is never closed.
        acquired
            .and_then(std::result::Result::ok)
            .ok_or_else(|| error::pool(op, PoolError::Timeout(TimeoutType::Wait)))
    }

    /// A pooled connection for a claim of more targets than a batch holds
    /// (see the type's docs), or a retryable error; while it is held or
    /// waited for, claims do not borrow the kept connection's turn.
    pub(crate) async fn get_for_large_claim(&self, op: &'static str) -> Result<Conn> {
        let large = Counted::new(&self.large);
        let mut conn = self.get_without_turn(op).await?;
        conn._large = Some(large);
        Ok(conn)
    }

    /// A pooled connection without waiting for a turn, or a retryable
    /// error: for a large claim, the start-up check and the count
    /// compaction.
    pub(crate) async fn get_without_turn(&self, op: &'static str) -> Result<Conn> {
        let client = self.pool.get().await.map_err(|e| error::pool(op, e))?;
        Ok(Conn::new(client, self.settings.clone()))
    }
}

/// A pooled connection in keyclaim's session (see [`Settings`]): the only
/// way the operations reach the server, so that on a host's pool every
/// statement runs in a transaction with keyclaim's settings.
pub(crate) struct Conn {
    client: Object,
    settings: Settings,
    /// The permit it was taken with (see [`Connections`]), given back with
    /// the connection.
    _permit: Option<OwnedSemaphorePermit>,
    /// The large claim it counts in (see [`Connections`]).
    _large: Option<Counted>,
}

impl Conn {
    /// Wraps a connection of the store's pool.
    fn new(client: Object, settings: Settings) -> Self {
        Self {
            client,
            settings,
            _permit: None,
            _large: None,
        }
    }

    /// Whether the connection is gone (a batch then takes another).
    pub(crate) fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// The connection itself, for tests that run raw statements.
    #[cfg(test)]
    pub(crate) fn raw(&self) -> &Object {
        &self.client
    }

    /// The connection taken out of the pool for good, in keyclaim's
    /// settings for its session (on a host's pool they are set now: the
    /// connection never goes back), for the migration.
    pub(crate) async fn detach(self, options: &PostgresOptions) -> Result<ClientWrapper> {
        let client = Object::take(self.client);
        if let Settings::Transaction(_) = self.settings {
            client
                .batch_execute(&Settings::for_detached_session(options))
                .await
                .map_err(pg("connect"))?;
        }
        Ok(client)
    }

    /// A READ COMMITTED transaction with keyclaim's settings. Dropped
    /// without a commit, it rolls back (also when dropped half-way
    /// through starting).
    pub(crate) async fn transaction(
        &mut self,
    ) -> std::result::Result<Transaction<'_>, tokio_postgres::Error> {
        self.transaction_with(IsolationLevel::ReadCommitted, false)
            .await
    }

    /// A transaction of the given isolation with keyclaim's other
    /// settings.
    pub(crate) async fn transaction_with(
        &mut self,
        isolation: IsolationLevel,
        read_only: bool,
    ) -> std::result::Result<Transaction<'_>, tokio_postgres::Error> {
        let tx = self
            .client
            .build_transaction()
            .isolation_level(isolation)
            .read_only(read_only)
            .start()
            .await?;
        if let Settings::Transaction(sql) = &self.settings {
            tx.batch_execute(sql).await?;
        }
        Ok(tx)
    }

    /// Runs one statement (prepared once per connection) on its own: in
    /// its own implicit transaction on keyclaim's pool (one round trip),
    /// in a transaction with keyclaim's settings on a host's.
    pub(crate) async fn query_alone(
        &mut self,
        statement: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> std::result::Result<Vec<Row>, tokio_postgres::Error> {
        if let Settings::Transaction(_) = self.settings {
            let tx = self.transaction().await?;
            let stmt = tx.prepare_cached(statement).await?;
            let rows = tx.query(&stmt, params).await?;
            tx.commit().await?;
            return Ok(rows);
        }
        let stmt = self.client.prepare_cached(statement).await?;
        self.client.query(&stmt, params).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use deadpool_postgres::{Manager, Pool, Runtime};
    use tokio_postgres::NoTls;

    use super::{Connections, Settings};

    /// A pool of `size` that never connects (nothing here asks it for a
    /// connection).
    fn pool(size: usize) -> Pool {
        let manager = Manager::new(tokio_postgres::Config::new(), NoTls);
        Pool::builder(manager)
            .max_size(size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(60)))
            .build()
            .expect("a pool")
    }

    /// An operation waiting for a turn at the connections other than the
    /// kept one is counted while it waits (the pool's status adds it to
    /// the pool's own waiters), and no longer once it has its turn.
    #[tokio::test]
    async fn operations_waiting_for_a_turn_are_counted() {
        let connections = Connections::new(pool(2), Settings::Connection);
        let Some(others) = connections.others.clone() else {
            panic!("a pool of 2 keeps a connection for large claims");
        };
        let held = others.clone().try_acquire_owned().expect("the one turn");
        assert_eq!(connections.waiting_for_permits(), 0);
        let waiter = {
            let (connections, others) = (connections.clone(), others.clone());
            tokio::spawn(async move { connections.wait_for_permit(&others, "test").await.is_ok() })
        };
        let counted = async {
            while connections.waiting_for_permits() != 1 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), counted)
            .await
            .expect("the waiting operation is counted");
        drop(held);
        assert!(waiter.await.expect("waiter task"), "the turn freed");
        assert_eq!(connections.waiting_for_permits(), 0);
    }

    /// Claims take the kept connection's turn when every other turn is
    /// taken, but not while a large claim runs; other operations never do.
    #[test]
    fn claims_borrow_the_kept_turn_only_while_no_large_claim_runs() {
        let connections = Connections::new(pool(3), Settings::Connection);
        let Some(others) = connections.others.clone() else {
            panic!("a pool of 3 keeps a connection for large claims");
        };
        let taken: Vec<_> = (0..2)
            .map(|_| {
                connections
                    .free_turn(&others, false)
                    .expect("a turn of the others")
            })
            .collect();
        assert!(
            connections.free_turn(&others, false).is_none(),
            "other operations wait"
        );
        let large = super::Counted::new(&connections.large);
        assert!(
            connections.free_turn(&others, true).is_none(),
            "a claim waits while a large claim runs"
        );
        drop(large);
        let lent = connections
            .free_turn(&others, true)
            .expect("the kept connection's turn");
        assert!(
            connections.free_turn(&others, true).is_none(),
            "one turn is lent, not two"
        );
        drop(lent);
        drop(taken);
        assert_eq!(others.available_permits(), 2);
        assert_eq!(connections.spare.available_permits(), 1);
    }

    /// A host's pool keeps no connection for large claims: no turns.
    #[test]
    fn a_hosts_pool_has_no_turns() {
        let connections = Connections::new(pool(4), Settings::Transaction("".into()));
        assert!(connections.others.is_none());
    }
}
