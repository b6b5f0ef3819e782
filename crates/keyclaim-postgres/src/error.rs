//! Every mapping of a tokio-postgres or deadpool failure to
//! [`keyclaim::Error`], with the retryable ones told apart (R10.4, the
//! core's `Error::is_retryable`), and of a connection string or pool
//! configuration that is refused to [`Error::InvalidConfig`]. Nothing else
//! in the crate builds an [`Error::Storage`].
//!
//! A TLS handshake that fails (the server's certificate refused under
//! `verify-ca` or `verify-full`, or a server without TLS under `require`
//! or stronger) is [`Error::InvalidConfig`] naming the cause, wherever a
//! connection is opened (at connect, in the pool later, in the listener):
//! it is a mismatch between the server and the configuration, which
//! trying again does not mend.

use deadpool_postgres::{BuildError, PoolError};
use keyclaim::Error;
use tokio_postgres::error::SqlState;

use crate::BACKEND;

/// Whether a failed statement may succeed when tried again: serialization
/// failures, deadlocks, lock and statement timeouts, a server that is
/// shutting down or starting, too many connections, and any lost or
/// refused connection. Nothing of the failed operation was applied (its
/// transaction rolled back), except that a connection lost during `COMMIT`
/// leaves the outcome unknown; retrying is still safe for uploads and
/// deletions (idempotent) and for claims (a claim that did commit only
/// consumed keys nobody received).
pub(crate) fn is_retryable(error: &tokio_postgres::Error) -> bool {
    if let Some(db) = error.as_db_error() {
        let code = db.code();
        return [
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::LOCK_NOT_AVAILABLE,
            SqlState::QUERY_CANCELED,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::IDLE_SESSION_TIMEOUT,
            SqlState::READ_ONLY_SQL_TRANSACTION,
        ]
        .contains(code)
            || code.code().starts_with("08")
            || code.code().starts_with("53");
    }
    if error.is_closed() {
        return true;
    }
    // Anything else without a server error is the connection failing (I/O,
    // a timeout, an unexpected message), except encoding a parameter or
    // decoding a column ("error serializing parameter", "error
    // deserializing column"), which is a bug or corrupt data.
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        if inner.is::<std::io::Error>() {
            return true;
        }
        source = inner.source();
    }
    !error.to_string().contains("serializing")
}

/// The cause of a failed TLS handshake, or `None` when `error` is not one.
/// (tokio-postgres does not expose the kind of its errors: rustls's error
/// is found in the source chain, inside the `io::Error` tokio-rustls wraps
/// it in; a server that answers "no TLS" by the cause's message. A
/// connection lost during the handshake stays a retryable I/O failure.)
fn tls_failure(error: &tokio_postgres::Error) -> Option<String> {
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        let tls = inner.downcast_ref::<rustls::Error>().or_else(|| {
            inner
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .and_then(|e| e.downcast_ref::<rustls::Error>())
        });
        if let Some(tls) = tls {
            return Some(format!(
                "the TLS handshake with the PostgreSQL server failed: {tls}"
            ));
        }
        if inner.to_string() == "server does not support TLS" {
            return Some(
                "the PostgreSQL server does not offer TLS, which the sslmode asks for \
                 (require, verify-ca or verify-full)"
                    .to_owned(),
            );
        }
        source = inner.source();
    }
    None
}

/// Maps a statement's failure during `op`.
pub(crate) fn pg(op: &'static str) -> impl Fn(tokio_postgres::Error) -> Error {
    move |error| {
        if let Some(reason) = tls_failure(&error) {
            return Error::invalid_config(reason);
        }
        let retryable = is_retryable(&error);
        tracing::debug!(op, retryable, %error, "postgres statement failed");
        Error::storage(BACKEND, op, retryable, error)
    }
}

/// Maps a failure to get a pooled connection during `op`: timeouts and
/// connection failures are retryable, a closed pool is [`Error::Closed`].
pub(crate) fn pool(op: &'static str, error: PoolError) -> Error {
    if let PoolError::Backend(e) = &error
        && let Some(reason) = tls_failure(e)
    {
        return Error::invalid_config(reason);
    }
    let retryable = match &error {
        PoolError::Timeout(_) => true,
        PoolError::Backend(e) => is_retryable(e),
        PoolError::Closed => return Error::Closed,
        PoolError::PostCreateHook(_) => true,
        PoolError::NoRuntimeSpecified => false,
    };
    tracing::debug!(op, retryable, %error, "postgres pool failed");
    Error::storage(BACKEND, op, retryable, error)
}

/// A connection string tokio-postgres does not accept: a configuration
/// error. Its parse errors name the option and the offending character,
/// never the value of a password.
pub(crate) fn bad_url(error: tokio_postgres::Error) -> Error {
    Error::invalid_config(format!("invalid PostgreSQL connection string: {error}"))
}

/// A pool that cannot be built from the options: a configuration error.
pub(crate) fn pool_build(error: BuildError) -> Error {
    Error::invalid_config(format!(
        "cannot build the PostgreSQL connection pool: {error}"
    ))
}

/// The notification listener did not start: its task ended or it timed
/// out (retryable, like a connection that cannot be made).
pub(crate) fn listener(reason: &'static str) -> Error {
    Error::storage(BACKEND, "listen", true, reason)
}

/// The change announcements waiting to be sent are at their bound (R10.6):
/// the mutation `op` is refused before it starts (retryable).
pub(crate) fn backlog(op: &'static str) -> Error {
    Error::storage(
        BACKEND,
        op,
        true,
        "too many change announcements waiting to be sent to the other workers",
    )
}

/// The claims waiting for a batch are at their bound (R10.6): the claim
/// `op` is refused before it is queued (retryable).
pub(crate) fn claims_queued(op: &'static str) -> Error {
    Error::storage(BACKEND, op, true, "too many claims waiting for a batch")
}

/// The task running a claim's batch ended before answering (a panic or
/// the runtime shutting down): whether the claim was applied is unknown.
pub(crate) fn batch_lost(op: &'static str) -> Error {
    Error::storage(
        BACKEND,
        op,
        false,
        "the claim's batch ended without an answer",
    )
}

/// The same failure, for another claim of the failed batch: the same kind
/// and retryable flag, the same message.
pub(crate) fn copy_of(op: &'static str, error: &Error) -> Error {
    match error {
        Error::Closed => Error::Closed,
        Error::Corrupt { .. } => Error::corrupt(error.to_string()),
        other => Error::storage(BACKEND, op, other.is_retryable(), other.to_string()),
    }
}

/// The migration's swap did not get its short lock in any attempt: the
/// table stayed busy (retryable: connecting again goes on from the built
/// index).
pub(crate) fn migration_busy() -> Error {
    Error::storage(
        BACKEND,
        "migrate",
        true,
        "the tables stayed busy: a migration step could not take its lock",
    )
}

/// A stored value that does not decode (a bug or outside tampering).
pub(crate) fn corrupt(what: &str, error: impl std::fmt::Display) -> Error {
    Error::corrupt(format!("{BACKEND}: {what}: {error}"))
}
