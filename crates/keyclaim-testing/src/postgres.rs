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
/// [`MAX_SCHEMA_LEN`] bytes: `prefix`, this process's run ID and a counter.
///
/// On a server named by [`URL_ENV`] (one that outlives the tests), the run
/// ID is held as a lease for as long as the process lives (an advisory lock
/// on a connection of its own, see [`sweep_dead_schemas`]), and the schemas
/// of runs whose process has ended are dropped in the background when the
/// lease is first taken: test cases do not drop their schemas (a failed
/// one's is worth reading), so without this every run would leave hundreds
/// behind. When no lease can be had, the names are of a form the sweep
/// never touches.
pub fn unique_schema(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let run = run();
    let tail = if run.leased {
        format!("_{:08x}_{n}", run.id)
    } else {
        format!("_{:08x}x{n}", run.id)
    };
    let mut name = prefix.to_owned();
    name.truncate(MAX_SCHEMA_LEN.saturating_sub(tail.len()));
    name + &tail
}

/// The advisory lock class (the first key of the two-key form) under
/// which a test process holds its run ID on the shared server.
pub const LEASE_CLASS: i32 = 0x6b63_7473;

/// This process's run ID, and whether it is held as a lease.
struct Run {
    id: u32,
    leased: bool,
}

fn run() -> &'static Run {
    static RUN: OnceLock<Run> = OnceLock::new();
    RUN.get_or_init(|| {
        let leased = std::env::var(URL_ENV)
            .ok()
            .and_then(|url| take_lease(url).map(|id| Run { id, leased: true }));
        leased.unwrap_or_else(|| Run {
            id: rand::random(),
            leased: false,
        })
    })
}

/// Starts the thread that holds this process's lease on `url`, and answers
/// its run ID once it is held (`None` when it cannot be had within a few
/// seconds: no connection without TLS, say).
fn take_lease(url: String) -> Option<u32> {
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("keyclaim-test-lease".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(hold_lease(&url, tx));
        });
    spawned.ok()?;
    rx.recv_timeout(std::time::Duration::from_secs(10)).ok()
}

/// Takes a run ID no live process holds and no leftover schema carries,
/// sends it, sweeps the schemas of ended runs, then holds the lease for as
/// long as the process lives (taking it again after a lost connection).
async fn hold_lease(url: &str, tx: std::sync::mpsc::Sender<u32>) {
    let mut id: Option<u32> = None;
    loop {
        if let Ok((client, connection)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await
        {
            let connection = tokio::spawn(connection);
            let held = match id {
                Some(id) => client
                    .execute(
                        "SELECT pg_advisory_lock($1, $2)",
                        &[&LEASE_CLASS, &(id as i32)],
                    )
                    .await
                    .is_ok(),
                None => match lease_fresh_id(&client).await {
                    Some(fresh) => {
                        id = Some(fresh);
                        let _ = tx.send(fresh);
                        let _ = sweep_dead_schemas(&client, fresh).await;
                        true
                    }
                    None => false,
                },
            };
            if held {
                let _ = connection.await;
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

async fn lease_fresh_id(client: &tokio_postgres::Client) -> Option<u32> {
    for _ in 0..16 {
        let id: u32 = rand::random();
        let row = client
            .query_one(
                "SELECT pg_try_advisory_lock($1, $2) AND NOT EXISTS (
                     SELECT 1 FROM pg_namespace WHERE nspname LIKE '%\\_' || $3 || '\\_%')",
                &[&LEASE_CLASS, &(id as i32), &format!("{id:08x}")],
            )
            .await
            .ok()?;
        if row.get::<_, bool>(0) {
            return Some(id);
        }
        let _ = client
            .execute(
                "SELECT pg_advisory_unlock($1, $2)",
                &[&LEASE_CLASS, &(id as i32)],
            )
            .await;
    }
    None
}

/// Drops the schemas that test processes left on the server of `client`:
/// those named by [`unique_schema`] under a lease (`<prefix>_<run
/// ID>_<counter>`) whose run's lease nobody holds (its process has ended),
/// except run `own`'s. Each dead run's lease is held while its schemas are
/// dropped, so that two sweeps do not drop the same ones. Answers how many
/// were dropped.
///
/// # Errors
/// A statement that failed.
pub async fn sweep_dead_schemas(
    client: &tokio_postgres::Client,
    own: u32,
) -> Result<usize, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT nspname::text FROM pg_namespace
              WHERE nspname ~ '^[a-z0-9_]*_[0-9a-f]{8}_[0-9]+$' ORDER BY nspname",
            &[],
        )
        .await?;
    let mut by_run: std::collections::BTreeMap<u32, Vec<String>> = Default::default();
    for row in rows {
        let name: String = row.get(0);
        let run = name
            .rsplit('_')
            .nth(1)
            .and_then(|hex| u32::from_str_radix(hex, 16).ok());
        if let Some(run) = run.filter(|run| *run != own) {
            by_run.entry(run).or_default().push(name);
        }
    }
    let mut dropped = 0;
    for (run, names) in by_run {
        let free: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock($1, $2)",
                &[&LEASE_CLASS, &(run as i32)],
            )
            .await?
            .get(0);
        if !free {
            continue;
        }
        for name in names {
            client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
                .await?;
            dropped += 1;
        }
        client
            .execute(
                "SELECT pg_advisory_unlock($1, $2)",
                &[&LEASE_CLASS, &(run as i32)],
            )
            .await?;
    }
    Ok(dropped)
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

    /// The sweep drops the schemas of a run whose lease nobody holds, and
    /// keeps those of a run whose lease is held, of its own run, and the
    /// names made without a lease.
    #[test]
    fn the_sweep_drops_the_schemas_of_ended_runs_only() {
        with_server("testing::sweep", |url| async move {
            let connect = || async {
                let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .expect("connect");
                tokio::spawn(connection);
                client
            };
            let (sweeper, holder) = (connect().await, connect().await);
            let base: u32 = rand::random::<u32>() & 0xffff_0000;
            let (dead, live, own) = (base | 1, base | 2, base | 3);
            holder
                .execute(
                    "SELECT pg_advisory_lock($1, $2)",
                    &[&LEASE_CLASS, &(live as i32)],
                )
                .await
                .expect("hold the live run's lease");
            let names = [
                format!("kc_sweeptest_{dead:08x}_0"),
                format!("kc_sweeptest_{dead:08x}_1"),
                format!("kc_sweeptest_{live:08x}_0"),
                format!("kc_sweeptest_{own:08x}_0"),
                format!("kc_sweeptest_{dead:08x}x2"),
            ];
            for name in &names {
                sweeper
                    .batch_execute(&format!(
                        "CREATE SCHEMA \"{name}\"; CREATE TABLE \"{name}\".t (x int)"
                    ))
                    .await
                    .expect("create a schema");
            }
            let dropped = sweep_dead_schemas(&sweeper, own).await.expect("sweep");
            assert!(dropped >= 2, "dropped {dropped}");
            let mut left = Vec::new();
            for name in &names {
                let exists: bool = sweeper
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
                        &[name],
                    )
                    .await
                    .expect("look")
                    .get(0);
                if exists {
                    left.push(name.clone());
                    sweeper
                        .batch_execute(&format!("DROP SCHEMA \"{name}\" CASCADE"))
                        .await
                        .expect("drop");
                }
            }
            assert_eq!(left, names[2..]);
        });
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
