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
//! - **fsync**: a server running with `fsync = off` cannot keep a commit
//!   through a crash of its machine, whatever the session does. [`check`]
//!   refuses it at connect with [`Error::InvalidConfig`] unless
//!   [`PostgresOptions::allow_unsafe_server`] is set (test servers).

use deadpool_postgres::{Hook, HookError, Object};
use keyclaim::{Error, Result};

use crate::PostgresOptions;
use crate::error::pg;

/// The server options of every connection: the schema as `search_path`,
/// the planner settings, READ COMMITTED, the statement timeout.
pub(crate) fn startup_options(options: &PostgresOptions, existing: Option<&str>) -> String {
    let mut server_options = existing.unwrap_or_default().to_owned();
    // The schema is fixed per connection, so every statement is a plain
    // constant (prepared once per connection, never built per call).
    server_options.push_str(&format!(" -c search_path={}", options.get_schema()));
    // Every statement is written for index and TID lookups. A cached
    // generic plan made while a table was small could otherwise keep a
    // sequential scan (e.g. `ctid = ANY(...)` as a filter over the whole
    // `otk` table) long after the table has grown.
    server_options.push_str(" -c enable_seqscan=off");
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
    current_setting('synchronous_commit'), current_setting('transaction_isolation')";

/// Checks the server and the session of a pooled connection (R10.5), before
/// anything is created: refuses `fsync = off` unless allowed, and a session
/// whose settings did not take (for instance behind a proxy that drops
/// startup options).
pub(crate) async fn check(client: &Object, options: &PostgresOptions) -> Result<()> {
    let op = "connect";
    let row = client
        .query_one(SERVER_SETTINGS, &[])
        .await
        .map_err(pg(op))?;
    let fsync: &str = row.try_get(0).map_err(pg(op))?;
    let sync_commit: &str = row.try_get(1).map_err(pg(op))?;
    let isolation: &str = row.try_get(2).map_err(pg(op))?;
    if fsync != "on" {
        if !options.get_allow_unsafe_server() {
            return Err(Error::invalid_config(format!(
                "the PostgreSQL server runs with fsync = {fsync}: a crash of its machine can \
                 lose committed claims and hand their keys out again (R10.5). Turn fsync on, \
                 or, for a throwaway test server only, set \
                 PostgresOptions::allow_unsafe_server (keyclaim_allow_unsafe_server=on)"
            )));
        }
        tracing::warn!(
            fsync,
            "keyclaim connected to a server without fsync (allow_unsafe_server): \
             a crash of its machine can lose committed claims"
        );
    }
    if !matches!(sync_commit, "on" | "remote_apply") || isolation != "read committed" {
        return Err(Error::invalid_config(format!(
            "keyclaim's session settings did not take (synchronous_commit = {sync_commit}, \
             transaction isolation {isolation}; R10.5 needs on and read committed): \
             connect to PostgreSQL directly or through a proxy that passes startup options"
        )));
    }
    Ok(())
}
