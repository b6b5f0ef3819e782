//! A throwaway PostgreSQL server started from the installed binaries
//! ([`Cluster`]), for keyclaim's tests and benchmarks: in a temp dir,
//! listening only on a unix socket inside it (no TCP port, so nothing
//! collides), run as user `postgres` through `runuser` when the process is
//! root. A watchdog process stops the cluster and removes its directory when
//! the owning process exits, however it exits, so no postmaster outlives it.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
    /// Creates (`initdb`) and starts a cluster. With `durable`, the server
    /// runs with `fsync = on`, `full_page_writes = on` and
    /// `synchronous_commit = on`; without, with `fsync = off` (faster; a
    /// crash of the machine could lose data, a crash or stop of the server
    /// cannot).
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
             full_page_writes = {}\nlog_min_messages = warning\n{}",
            cluster.dir.display(),
            cluster.port,
            if durable { "on" } else { "off" },
            if durable { "on" } else { "off" },
            if durable {
                "synchronous_commit = on\n"
            } else {
                ""
            },
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

    /// The cluster's directory (its data directory, socket and log are
    /// inside; removed when the cluster is dropped).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory of the PostgreSQL binaries the cluster runs.
    pub fn bin_dir(&self) -> &Path {
        &self.bin
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

/// The directory of the PostgreSQL binaries a [`Cluster`] would run:
/// [`BIN_ENV`] when set, else the newest `/usr/lib/postgresql/*/bin` that
/// holds `pg_ctl`.
///
/// # Errors
/// When there is none (the message says where it looked).
pub fn find_bin_dir() -> io::Result<PathBuf> {
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
