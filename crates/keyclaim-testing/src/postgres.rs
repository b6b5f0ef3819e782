//! A PostgreSQL server for tests and benchmarks.
//!
//! [`server_url`] gives the URL of `KEYCLAIM_TEST_POSTGRES_URL` when it is
//! set, else of a throwaway cluster that this process starts once from the
//! installed PostgreSQL binaries ([`Cluster`]): in a temp dir, listening
//! only on a unix socket inside it (no TCP port, so nothing collides), run
//! as user `postgres` through `runuser` when the process is root. A
//! watchdog process stops the cluster and removes its directory when the
//! test process exits, however it exits, so no postmaster outlives the run.
//!
//! [`require_server`] turns "no server" into a loud skip, or into a
//! failure when `CI=true`; [`with_server`] runs a test with it. [`unique_schema`] gives each test case its own
//! schema.

use std::future::Future;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The environment variable naming an existing server for the tests.
pub const URL_ENV: &str = "KEYCLAIM_TEST_POSTGRES_URL";

/// The environment variable naming the directory of the PostgreSQL binaries
/// (`initdb`, `pg_ctl`); by default the newest `/usr/lib/postgresql/*/bin`.
pub const BIN_ENV: &str = "KEYCLAIM_POSTGRES_BIN";

/// The unix-socket "port" of throwaway clusters (it only names the socket
/// file inside the cluster's private directory).
const SOCKET_PORT: u16 = 5432;

/// A throwaway PostgreSQL cluster in a temp dir, reachable only through a
/// unix socket in that dir. Stopped and removed on drop, and by a watchdog
/// process if this process dies first.
#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: Option<(u32, u32)>,
    port: u16,
}

impl Cluster {
    /// Creates (`initdb`) and starts a cluster. With `durable` false, the
    /// server runs with `fsync=off` (faster; a crash of the machine could
    /// lose data, a crash or stop of the server cannot).
    ///
    /// # Errors
    /// When the binaries are missing or a step fails (the message says which).
    pub fn start(durable: bool) -> io::Result<Cluster> {
        Self::start_configured(durable, &ClusterConfig::default())
    }

    /// [`Cluster::start`] with `extra`'s additions: a TCP port on
    /// 127.0.0.1, more `postgresql.conf` lines, and files written into the
    /// data directory before the server starts (owned by the server's user,
    /// mode 0600: a TLS key, a `pg_hba.conf` to replace the default).
    ///
    /// # Errors
    /// As [`Cluster::start`]; also when no free port is found.
    pub fn start_configured(durable: bool, extra: &ClusterConfig) -> io::Result<Cluster> {
        let bin = find_bin_dir()?;
        let as_postgres = if is_root() {
            Some(postgres_ids()?)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("keyclaim-pg-")
            .tempdir()?
            .keep();
        if let Some((uid, gid)) = as_postgres {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        }
        let cluster = Cluster {
            dir,
            bin,
            as_postgres,
            port: extra.tcp_port.unwrap_or(SOCKET_PORT),
        };
        cluster.spawn_watchdog()?;
        cluster.run(
            "initdb",
            &[
                "-D",
                &cluster.data_dir(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
        )?;
        let conf = format!(
            "listen_addresses = ''\nunix_socket_directories = '{}'\nport = {}\n\
             max_connections = 300\nshared_buffers = 128MB\nfsync = {}\n\
             full_page_writes = {}\nlog_min_messages = warning\n",
            cluster.dir.display(),
            cluster.port,
            if durable { "on" } else { "off" },
            if durable { "on" } else { "off" },
        );
        let conf_path = Path::new(&cluster.data_dir()).join("postgresql.conf");
        let mut file = std::fs::OpenOptions::new().append(true).open(conf_path)?;
        file.write_all(conf.as_bytes())?;
        cluster.configure(&mut file, extra)?;
        cluster.start_server()?;
        Ok(cluster)
    }

    /// Applies a [`ClusterConfig`] to the cluster's data directory, whose
    /// `postgresql.conf` is open for appending as `conf`.
    fn configure(&self, conf: &mut std::fs::File, extra: &ClusterConfig) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        if let Some(port) = extra.tcp_port {
            writeln!(conf, "listen_addresses = '127.0.0.1'\nport = {port}")?;
        }
        for line in &extra.conf {
            writeln!(conf, "{line}")?;
        }
        for (name, contents) in &extra.files {
            let path = Path::new(&self.data_dir()).join(name);
            std::fs::write(&path, contents)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            if let Some((uid, gid)) = self.as_postgres {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
            }
        }
        Ok(())
    }

    /// The connection string of the cluster's `postgres` database.
    pub fn url(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.dir.display(),
            self.port
        )
    }

    /// The URL of the cluster's `postgres` database over TCP, for a
    /// cluster started with [`ClusterConfig::tcp_port`] (`host` as given:
    /// `127.0.0.1` or `localhost`).
    pub fn tcp_url(&self, host: &str) -> String {
        format!("postgresql://postgres@{host}:{}/postgres", self.port)
    }

    /// Starts the server again after [`Cluster::stop`].
    ///
    /// # Errors
    /// When `pg_ctl start` fails.
    pub fn start_server(&self) -> io::Result<()> {
        let log = format!("{}/server.log", self.dir.display());
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir(),
                "-l",
                &log,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
    }

    /// Stops the server: `fast` ends sessions cleanly (as an administrator's
    /// restart does); otherwise `immediate`, which is a crash as far as the
    /// server's clients and its recovery are concerned.
    ///
    /// # Errors
    /// When `pg_ctl stop` fails.
    pub fn stop(&self, fast: bool) -> io::Result<()> {
        let mode = if fast { "fast" } else { "immediate" };
        self.run(
            "pg_ctl",
            &["-D", &self.data_dir(), "-m", mode, "-w", "-t", "60", "stop"],
        )
    }

    fn data_dir(&self) -> String {
        format!("{}/data", self.dir.display())
    }

    /// Runs a PostgreSQL binary, as user `postgres` when we are root.
    fn run(&self, tool: &str, args: &[&str]) -> io::Result<()> {
        let program = self.bin.join(tool);
        let mut cmd = if self.as_postgres.is_some() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let output = cmd
            .args(args)
            .current_dir(&self.dir)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()?;
        if output.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "{} {} failed ({}): {}{}",
                program.display(),
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )))
        }
    }

    /// A detached process that waits for this process to end, then stops
    /// the server and removes the directory.
    fn spawn_watchdog(&self) -> io::Result<()> {
        let pg_ctl = self.bin.join("pg_ctl");
        let stop = format!(
            "{} '{}' -D '{}/data' -m immediate -w stop",
            if self.as_postgres.is_some() {
                "runuser -u postgres --"
            } else {
                ""
            },
            pg_ctl.display(),
            self.dir.display()
        );
        let script = format!(
            "while [ -d /proc/{pid} ]; do sleep 1; done; \
             if [ -f '{dir}/data/postmaster.pid' ]; then {stop} >/dev/null 2>&1; fi; \
             rm -rf '{dir}'",
            pid = std::process::id(),
            dir = self.dir.display(),
        );
        Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(())
    }
}

/// What [`Cluster::start_configured`] adds to a throwaway cluster.
#[derive(Clone, Debug, Default)]
pub struct ClusterConfig {
    /// Listen on `127.0.0.1` at this port too (the unix socket stays; its
    /// "port" number follows this one). [`free_port`] finds one.
    pub tcp_port: Option<u16>,
    /// Lines appended to `postgresql.conf` (after the defaults: they win).
    pub conf: Vec<String>,
    /// Files written into the data directory: (name, contents).
    pub files: Vec<(String, Vec<u8>)>,
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// # Errors
/// When no port can be bound.
pub fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if Path::new(&self.data_dir()).join("postmaster.pid").exists() {
            let _ = self.stop(false);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn postgres_ids() -> io::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .find_map(|line| {
            let mut f = line.split(':');
            (f.next() == Some("postgres")).then_some(())?;
            let uid = f.nth(1)?.parse().ok()?;
            let gid = f.next()?.parse().ok()?;
            Some((uid, gid))
        })
        .ok_or_else(|| io::Error::other("no user `postgres` to run the server as"))
}

fn find_bin_dir() -> io::Result<PathBuf> {
    if let Some(dir) = std::env::var_os(BIN_ENV) {
        return Ok(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| {
            io::Error::other(format!(
                "no PostgreSQL binaries under /usr/lib/postgresql: {e}"
            ))
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| io::Error::other("no PostgreSQL binaries under /usr/lib/postgresql/*/bin"))
}

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
