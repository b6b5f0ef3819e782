//! The PostgreSQL server of `keyclaim bench`: the one `--postgres URL` (or
//! `KEYCLAIM_POSTGRES_URL`) names, else a throwaway durable server started
//! from the installed binaries (`keyclaim-pgserver`), stopped and removed
//! at the end, also after an error or an interrupt (and by the cluster's
//! watchdog if the process is killed).

use std::path::PathBuf;

use keyclaim_pgserver::Cluster;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// What the bench does about PostgreSQL.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Use this server.
    Url(String),
    /// Start a throwaway server from the binaries in this directory.
    Start(PathBuf),
    /// Leave PostgreSQL out, for this reason.
    Skip(String),
}

/// Decides what to do about PostgreSQL: `requested` when `--backend` names
/// it explicitly, `binaries` the PostgreSQL server binaries found.
///
/// # Errors
/// When PostgreSQL was asked for by name and there is neither a URL nor
/// binaries to start a server from.
pub(crate) fn plan(
    requested: bool,
    no_postgres: bool,
    url: Option<&str>,
    binaries: Result<PathBuf, String>,
) -> Result<Plan, String> {
    if no_postgres {
        return Ok(Plan::Skip("--no-postgres".into()));
    }
    if let Some(url) = url {
        return Ok(Plan::Url(url.to_owned()));
    }
    match binaries {
        Ok(bin) => Ok(Plan::Start(bin)),
        Err(why) if requested => Err(format!(
            "postgres: give --postgres URL or KEYCLAIM_POSTGRES_URL, or install the \
             PostgreSQL server binaries so that the bench can start a server ({why})"
        )),
        Err(why) => Ok(Plan::Skip(format!("no --postgres URL, and {why}"))),
    }
}

/// The server the PostgreSQL backend runs on.
pub(crate) enum Server {
    /// A server someone else runs.
    Given(String),
    /// A throwaway server of the bench's own.
    Throwaway(Cluster),
}

impl Server {
    /// Carries out `plan`: for [`Plan::Start`], starts a durable throwaway
    /// server (`fsync`, `full_page_writes` and `synchronous_commit` on) and
    /// says so. `None` for [`Plan::Skip`], after saying why.
    ///
    /// # Errors
    /// When the server does not start.
    pub(crate) async fn from_plan(plan: Plan) -> Result<Option<Server>, String> {
        match plan {
            Plan::Url(url) => Ok(Some(Server::Given(url))),
            Plan::Skip(why) => {
                println!("PostgreSQL: left out ({why})");
                Ok(None)
            }
            Plan::Start(bin) => {
                println!(
                    "PostgreSQL: starting a throwaway durable server from {} \
                     (fsync = on, synchronous_commit = on) ...",
                    bin.display()
                );
                let cluster = tokio::task::spawn_blocking(|| Cluster::start(true))
                    .await
                    .map_err(|e| format!("postgres: starting a server: {e}"))?
                    .map_err(|e| format!("postgres: starting a server: {e}"))?;
                println!(
                    "PostgreSQL: throwaway server running in {}; stopped and removed at the end",
                    cluster.dir().display()
                );
                Ok(Some(Server::Throwaway(cluster)))
            }
        }
    }

    /// The connection string of the server.
    pub(crate) fn url(&self) -> String {
        match self {
            Server::Given(url) => url.clone(),
            Server::Throwaway(cluster) => cluster.url(),
        }
    }

    /// How the report names the server.
    pub(crate) fn describe(&self) -> String {
        match self {
            Server::Given(url) => keyclaim_open::redacted(url),
            Server::Throwaway(_) => "throwaway durable server started by the bench (fsync = on, \
                                     synchronous_commit = on, same machine)"
                .into(),
        }
    }

    /// Stops and removes a throwaway server, and says so.
    pub(crate) async fn close(self) {
        if let Server::Throwaway(cluster) = self {
            let dir = cluster.dir().to_owned();
            // Dropping stops the server and removes its directory.
            let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
            println!(
                "PostgreSQL: throwaway server stopped, {} removed",
                dir.display()
            );
        }
    }
}

/// Ctrl-C and SIGTERM, watched from the moment this is made (before a
/// server is started, so that an early interrupt still stops it).
pub(crate) struct Interrupts {
    int: Option<Signal>,
    term: Option<Signal>,
}

impl Interrupts {
    /// Starts watching; a signal that cannot be watched is never reported.
    pub(crate) fn watch() -> Self {
        Self {
            int: signal(SignalKind::interrupt()).ok(),
            term: signal(SignalKind::terminate()).ok(),
        }
    }

    /// Resolves with the signal's name when the process is asked to stop.
    pub(crate) async fn next(&mut self) -> &'static str {
        async fn recv(s: &mut Option<Signal>) {
            if let Some(s) = s
                && s.recv().await.is_some()
            {
                return;
            }
            std::future::pending().await
        }
        tokio::select! {
            () = recv(&mut self.int) => "Ctrl-C",
            () = recv(&mut self.term) => "SIGTERM",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bin() -> Result<PathBuf, String> {
        Ok(PathBuf::from("/usr/lib/postgresql/15/bin"))
    }

    fn none() -> Result<PathBuf, String> {
        Err("no binaries".into())
    }

    #[test]
    fn a_url_wins_then_binaries_then_a_skip() {
        assert_eq!(
            plan(false, false, Some("postgres://h/db"), bin()),
            Ok(Plan::Url("postgres://h/db".into()))
        );
        assert_eq!(
            plan(false, false, None, bin()),
            Ok(Plan::Start(bin().unwrap()))
        );
        assert!(matches!(
            plan(false, false, None, none()),
            Ok(Plan::Skip(_))
        ));
    }

    #[test]
    fn no_postgres_skips_even_with_a_url() {
        for url in [None, Some("postgres://h/db")] {
            assert_eq!(
                plan(true, true, url, bin()),
                Ok(Plan::Skip("--no-postgres".into()))
            );
        }
    }

    #[test]
    fn asking_for_postgres_without_a_server_fails() {
        let err = plan(true, false, None, none()).unwrap_err();
        assert!(err.contains("--postgres URL"), "{err}");
    }
}
