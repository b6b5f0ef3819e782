//! A PostgreSQL server for tests and benchmarks.
//!
//! [`server_url`] gives the URL of `KEYCLAIM_TEST_POSTGRES_URL` when it is
//! set, else of a throwaway cluster that this process starts once from the
//! installed PostgreSQL binaries ([`Cluster`], from `keyclaim-pgserver`:
//! a temp dir, a unix socket, a watchdog that stops it when the test
//! process exits however it exits).
//!
//! [`require_server`] turns "no server" into a loud skip, or into a
//! failure when `CI=true`; [`with_server`] runs a test with it. [`unique_schema`] gives each test case its own
//! schema.

use std::future::Future;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The environment variable naming an existing server for the tests.
pub const URL_ENV: &str = "KEYCLAIM_TEST_POSTGRES_URL";

pub use keyclaim_pgserver::{BIN_ENV, Cluster, ClusterConfig, free_port};

/// The process-wide test server: an external URL or a throwaway cluster.
struct Shared {
    url: String,
    _cluster: Option<Cluster>,
}

static SHARED: OnceLock<Result<Shared, String>> = OnceLock::new();

/// The URL of the shared test server: `KEYCLAIM_TEST_POSTGRES_URL` if set,
/// else a throwaway cluster started on first use (once per process).
///
/// # Errors
/// Why no server could be had.
pub fn server_url() -> Result<String, String> {
    SHARED
        .get_or_init(|| {
            if let Ok(url) = std::env::var(URL_ENV) {
                return Ok(Shared {
                    url,
                    _cluster: None,
                });
            }
            let cluster = Cluster::start(false).map_err(|e| {
                format!("{URL_ENV} is not set and no throwaway cluster could be started: {e}")
            })?;
            Ok(Shared {
                url: cluster.url(),
                _cluster: Some(cluster),
            })
        })
        .as_ref()
        .map(|s| s.url.clone())
        .map_err(Clone::clone)
}

/// The shared server's URL, or `None` after a loud skip (see
/// [`crate::skip`]) when there is none.
///
/// # Panics
/// When there is no server and `CI=true`: under CI a skip is a failure.
pub fn require_server(what: &str) -> Option<String> {
    crate::require(
        what,
        server_url().map_err(|reason| {
            format!(
                "no PostgreSQL server: {reason}; set {URL_ENV} or install PostgreSQL \
                 (initdb, pg_ctl) to run it"
            )
        }),
    )
}

/// Runs the test `what` on a 4-worker runtime with the shared server's URL,
/// or skips it (see [`require_server`]).
///
/// # Panics
/// When there is no server and `CI=true`, and when the test panics.
pub fn with_server<F: Future<Output = ()>>(what: &str, test: impl FnOnce(String) -> F) {
    if let Some(url) = require_server(what) {
        crate::runtime(4).block_on(test(url));
    }
}

/// The longest schema name keyclaim-postgres accepts
/// (`keyclaim_postgres::PostgresOptions::MAX_SCHEMA_LEN`; its tests check that the two agree).
pub const MAX_SCHEMA_LEN: usize = 40;

/// A schema name no other test case in any process uses, at most
/// [`MAX_SCHEMA_LEN`] bytes.
pub fn unique_schema(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut name = format!("{prefix}_{}_{n}_{nanos:x}", std::process::id());
    name.truncate(MAX_SCHEMA_LEN);
    name
}

/// The store URL parameter that lets keyclaim-postgres use a server running
/// with `fsync = off` (R10.5): the throwaway test servers run so, for speed.
pub const ALLOW_UNSAFE_SERVER: &str = "keyclaim_allow_unsafe_server=on";

/// A store URL (as `keyclaim-open` reads them) for the test server `server`
/// (a URL, or the throwaway cluster's key=value connection string) and a
/// schema of keyclaim's, with [`ALLOW_UNSAFE_SERVER`]: keyclaim's options
/// ride in the URL's query. A key=value connection string is written as a
/// `postgresql://` URL whose query carries its keys.
pub fn store_url(server: &str, schema: &str) -> String {
    let server = as_url(server);
    let sep = if server.contains('?') { '&' } else { '?' };
    format!("{server}{sep}keyclaim_schema={schema}&{ALLOW_UNSAFE_SERVER}")
}

/// The connection string of database `dbname` on the test server `server`
/// (a URL or a key=value connection string), for tests that need a
/// database of their own (for instance with its own default settings).
pub fn database_url(server: &str, dbname: &str) -> String {
    if !is_url(server) {
        // A later key overrides an earlier one.
        return format!("{server} dbname={dbname}");
    }
    let (head, query) = match server.find('?') {
        Some(q) => server.split_at(q),
        None => (server, ""),
    };
    let scheme_end = head.find("://").map_or(0, |i| i + 3);
    let path_start = head[scheme_end..]
        .find('/')
        .map_or(head.len(), |i| scheme_end + i);
    format!("{}/{dbname}{query}", &head[..path_start])
}

fn is_url(server: &str) -> bool {
    server.starts_with("postgres://") || server.starts_with("postgresql://")
}

/// `server` as a `postgresql://` URL: a key=value connection string (values
/// without spaces or quotes, as [`Cluster::url`] writes them) becomes the
/// query of a URL without a host.
fn as_url(server: &str) -> String {
    if is_url(server) {
        return server.to_owned();
    }
    let pairs: Vec<&str> = server.split_whitespace().collect();
    format!("postgresql://?{}", pairs.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_carry_the_schema_and_the_relaxed_option() {
        assert_eq!(
            store_url("postgres://u@h:5/db", "kc"),
            "postgres://u@h:5/db?keyclaim_schema=kc&keyclaim_allow_unsafe_server=on"
        );
        assert_eq!(
            store_url("postgres://u@h/db?sslmode=disable", "kc"),
            "postgres://u@h/db?sslmode=disable&keyclaim_schema=kc&keyclaim_allow_unsafe_server=on"
        );
        assert_eq!(
            store_url("host=/tmp/x port=5432 user=postgres dbname=postgres", "kc"),
            "postgresql://?host=/tmp/x&port=5432&user=postgres&dbname=postgres\
             &keyclaim_schema=kc&keyclaim_allow_unsafe_server=on"
        );
    }

    #[test]
    fn database_urls_name_the_database() {
        assert_eq!(
            database_url("postgres://u@h:5/postgres", "other"),
            "postgres://u@h:5/other"
        );
        assert_eq!(
            database_url("postgresql://u@h/postgres?sslmode=disable", "other"),
            "postgresql://u@h/other?sslmode=disable"
        );
        assert_eq!(
            database_url("postgres://u@h", "other"),
            "postgres://u@h/other"
        );
        assert_eq!(
            database_url("host=/tmp/x dbname=postgres", "other"),
            "host=/tmp/x dbname=postgres dbname=other"
        );
    }
}
