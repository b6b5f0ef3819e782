//! The soak: a long mixed workload against a persistent
//! backend, run by a child process that is killed with SIGKILL at random
//! moments and started again, with every invariant checked after each crash.
//!
//! # How it works
//!
//! The parent ([`run`]) starts a worker process (`soak worker ...`) on the
//! store. The worker draws operations from a [`Workload`] (seeded; one seed
//! and key-ID tag per worker generation) and, for each, appends `B <i>` to
//! a journal before the call and `A <i> <answer digest>` after it returns.
//! After a random 0.2 to 2 s (configurable) the parent kills the worker with
//! SIGKILL, then:
//!
//! 1. replays every acknowledged operation (`A`) of the journal, drawn again
//!    from the same seed, against a reference [`MemoryStore`] and compares
//!    the answer digests (a claim must hand out exactly the keys the
//!    reference does: no key twice, none skipped);
//! 2. keeps every OTK ever handed out in a set: one handed out twice is a
//!    violation;
//! 3. opens the store itself and resolves the operation that was in flight
//!    when the worker died: the store must hold the reference state without
//!    it or with all of it (never a part);
//! 4. verifies the whole state against the reference: every acknowledged
//!    upload present, every acknowledged claim's keys gone, counts exact,
//!    [`keyclaim::transfer::check_store`] clean.
//!
//! The store is created by the parent before the first worker starts, so
//! kills hit a store in use; a kill during creation is tested apart
//! (`tests/crash_on_create.rs`).
//!
//! # PostgreSQL and server restarts
//!
//! On PostgreSQL the store lives in a database (its URL is the store's
//! location) and killing the worker drops its connections mid-statement.
//! With a restart command, every few generations the parent also runs it
//! while the worker works (for instance `pg_ctl restart -m immediate`: the
//! server crashes, recovers from its WAL and starts again), then kills the
//! worker. An operation the crash fails must fail with a retryable error; it
//! is then resolved like one in flight at a kill (applied whole or not at
//! all, R10.5), and every operation acknowledged before the crash must be
//! in the store afterwards. A killed worker's server sessions can outlive
//! it (and commit its last statement after the kill), so before step 3 the
//! parent ends them and waits until they are gone
//! ([`end_worker_sessions`]).
//!
//! It prints a progress line per minute and a summary at the end:
//! operations acknowledged, crashes survived, violations (must be 0).

use std::collections::HashSet;
use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keyclaim::Limits;
use keyclaim_memory::MemoryStore;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::backends::Backend;
use crate::faults::{resolve, verify};
use crate::util::{Violation, chain};
use crate::workload::{Workload, apply};

/// Devices in the soak's workload.
const DEVICES: usize = 24;
/// Padding per key (bytes).
const PAD: usize = 64;

/// The soak's settings.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// The backend.
    pub backend: Backend,
    /// The directory for the store and journals.
    pub dir: PathBuf,
    /// How long to run.
    pub duration: Duration,
    /// The base seed.
    pub seed: u64,
    /// The shortest time a worker lives before it is killed.
    pub kill_min: Duration,
    /// The longest.
    pub kill_max: Duration,
    /// The worker executable (this binary) and the arguments before
    /// `worker` (empty for the `soak` binary).
    pub worker_exe: PathBuf,
    /// Where the store lives when not in `dir`: PostgreSQL's connection
    /// URL (a schema of its own, empty or absent at the start).
    pub location: Option<String>,
    /// A command that crashes and restarts the database server, run with
    /// `sh -c` while the worker works, and how often (see the module docs).
    pub restart: Option<Restart>,
}

/// The database server's restarts during a soak.
#[derive(Debug, Clone)]
pub struct Restart {
    /// A shell command that returns once the server accepts connections
    /// again.
    pub command: String,
    /// Every how many worker generations it runs (at least 1).
    pub every: u64,
}

/// The soak's figures.
#[derive(Debug, Clone, Default)]
pub struct SoakSummary {
    /// Operations acknowledged by workers (and verified by replay).
    pub ops: u64,
    /// Of those: claims.
    pub claims: u64,
    /// OTKs handed out in acknowledged claims.
    pub keys_issued: u64,
    /// Workers killed with SIGKILL and recovered from.
    pub crashes: u64,
    /// Operations in flight at a kill found applied whole.
    pub inflight_applied: u64,
    /// Operations in flight at a kill found not applied.
    pub inflight_not_applied: u64,
    /// Database server restarts survived.
    pub restarts: u64,
    /// Operations that a restart failed (with a retryable error), each
    /// resolved as in flight.
    pub failed_by_restart: u64,
    /// Broken promises (must be 0).
    pub violations: u64,
    /// The first few violations.
    pub violation_samples: Vec<String>,
    /// Time run.
    pub elapsed: Duration,
}

impl SoakSummary {
    fn violation(&mut self, what: String) {
        self.violations += 1;
        if self.violation_samples.len() < 10 {
            self.violation_samples.push(what);
        }
    }

    /// One line of figures.
    pub fn line(&self, backend: Backend) -> String {
        let restarts = if self.restarts > 0 {
            format!(
                ", {} server restarts survived ({} operations failed by them)",
                self.restarts, self.failed_by_restart
            )
        } else {
            String::new()
        };
        format!(
            "soak {backend}: {:.1} min, {} ops acknowledged ({} claims, {} keys issued), {} crashes survived (in flight: {} applied, {} not){restarts}, violations: {}",
            self.elapsed.as_secs_f64() / 60.0,
            self.ops,
            self.claims,
            self.keys_issued,
            self.crashes,
            self.inflight_applied,
            self.inflight_not_applied,
            self.violations
        )
    }
}

fn limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_otks_per_device_algorithm = 100;
    limits
}

fn generation_seed(seed: u64, generation: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ generation
}

fn workload(seed: u64, generation: u64) -> Result<Workload, Violation> {
    Ok(
        Workload::new(generation_seed(seed, generation), DEVICES, PAD)?
            .tagged(&format!("G{generation}")),
    )
}

/// The worker: runs the workload on the store until killed, journaling
/// each operation before (`B i`) and after (`A i digest`) it, or its
/// failure (`E i retryable message`).
///
/// # Errors
/// When the store or journal cannot be opened; a storage error during the
/// workload is journaled (`E i message`) and returned.
pub async fn worker(
    backend: Backend,
    store_path: &Path,
    journal: &Path,
    seed: u64,
    generation: u64,
) -> Result<(), Violation> {
    let store = backend.open(store_path, limits()).await?;
    let mut journal = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(journal)
        .map_err(|e| Violation(format!("cannot open the journal: {e}")))?;
    let mut work = workload(seed, generation)?;
    let mut line = |text: String| {
        // One write per line; the parent ignores a torn last line.
        journal
            .write_all(text.as_bytes())
            .map_err(|e| Violation(format!("cannot write the journal: {e}")))
    };
    loop {
        let i = work.drawn();
        let op = work.next_op()?;
        line(format!("B {i}\n"))?;
        match apply(store.store(), &op).await {
            Ok(answer) => line(format!("A {i} {:016x}\n", answer.digest()))?,
            Err(e) => {
                let msg = chain(&e).replace('\n', " ");
                line(format!("E {i} {} {msg}\n", e.is_retryable()))?;
                return Err(Violation(format!("op {i}: {msg}")));
            }
        }
    }
}

enum Entry {
    Begin(u64),
    Ack(u64, u64),
    /// Its index, whether the error was retryable, the message.
    Failed(u64, bool, String),
}

fn read_journal(path: &Path) -> Result<Vec<Entry>, Violation> {
    let file = std::fs::File::open(path).map_err(|e| Violation(format!("journal: {e}")))?;
    let mut out = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line.map_err(|e| Violation(format!("journal: {e}")))?;
        let mut parts = line.splitn(3, ' ');
        let (kind, i, rest) = (parts.next(), parts.next(), parts.next());
        let Some(i) = i.and_then(|i| i.parse::<u64>().ok()) else {
            continue; // a torn last line
        };
        match (kind, rest) {
            (Some("B"), None) => out.push(Entry::Begin(i)),
            (Some("A"), Some(d)) if d.len() == 16 => {
                if let Ok(d) = u64::from_str_radix(d, 16) {
                    out.push(Entry::Ack(i, d));
                }
            }
            (Some("E"), Some(rest)) => {
                let (retryable, msg) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push(Entry::Failed(i, retryable == "true", msg.to_owned()));
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The `application_name` of a PostgreSQL worker's connections, by which the
/// parent finds the server sessions of a worker it killed.
pub const WORKER_APPLICATION: &str = "keyclaim-soak-worker";

/// The store URL a PostgreSQL worker opens: the soak's, with
/// [`WORKER_APPLICATION`] as its `application_name`.
fn worker_url(url: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}application_name={WORKER_APPLICATION}")
}

/// Ends the server sessions a killed PostgreSQL worker left behind, and
/// returns once none is left. A session whose client was killed runs on
/// until the server notices the closed socket, and a statement in it can
/// still commit: the operation in flight can be applied after the kill.
/// Resolving it before that (step 3) would judge it by a state that is not
/// final yet, and count the keys of an upload that commits afterwards as
/// keys nobody uploaded.
///
/// # Errors
/// When the server cannot be reached, or sessions are still there after
/// 60 s.
pub async fn end_worker_sessions(url: &str) -> Result<(), Violation> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        Violation(format!("ending the killed worker's sessions: {what}: {e}"))
    };
    let (connection_string, _) =
        keyclaim_postgres::PostgresOptions::from_url(url).map_err(|e| fail("URL", &e))?;
    let (client, connection) = tokio_postgres::connect(&connection_string, tokio_postgres::NoTls)
        .await
        .map_err(|e| fail("connect", &e))?;
    let connection = tokio::spawn(connection);
    let deadline = Instant::now() + Duration::from_secs(60);
    let result = loop {
        // Terminating a session rolls back what it has not committed yet;
        // the session is gone from `pg_stat_activity` once it has ended.
        let left = client
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = $1 AND pid <> pg_backend_pid()",
                &[&WORKER_APPLICATION],
            )
            .await
            .map_err(|e| fail("query", &e))
            .map(|row| row.get::<_, i64>(0));
        match left {
            Ok(0) => break Ok(()),
            Ok(n) if Instant::now() >= deadline => {
                break Err(fail("still there after 60 s", &format!("{n} sessions")));
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(e) => break Err(e),
        }
    };
    drop(client);
    let _ = connection.await;
    result
}

/// An issued OTK's identity in 16 bytes: two independent 64-bit hashes of
/// its (user, device, key ID). The strings themselves cost about 150 bytes
/// per key, and an hour of soak issues tens of millions of keys. Two keys
/// that hash alike would be reported as one key handed out twice (a false
/// alarm, at odds of about n² / 2¹²⁹ for n keys), never the reverse.
fn key_identity(key: &(String, String, String)) -> u128 {
    use std::hash::{DefaultHasher, Hash as _, Hasher as _};
    let half = |salt: u8| {
        let mut hasher = DefaultHasher::new();
        salt.hash(&mut hasher);
        key.hash(&mut hasher);
        hasher.finish()
    };
    (u128::from(half(1)) << 64) | u128::from(half(2))
}

/// Runs `command` with `sh -c` (see [`Restart`]).
async fn restart_server(command: &str) -> Result<(), Violation> {
    let command = command.to_owned();
    let status = tokio::task::spawn_blocking(move || {
        Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
    })
    .await
    .map_err(|e| Violation(format!("the restart command's task failed: {e}")))?
    .map_err(|e| Violation(format!("cannot run the restart command: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(Violation(format!("the restart command failed: {status}")))
    }
}

/// Runs the soak until the configured duration is over.
///
/// # Errors
/// Only when the soak cannot go on (the worker cannot be started, the store
/// cannot be opened); broken promises are counted in the summary.
pub async fn run(
    config: &SoakConfig,
    mut progress: impl FnMut(&SoakSummary),
) -> Result<SoakSummary, Violation> {
    std::fs::create_dir_all(&config.dir).map_err(|e| Violation(format!("soak dir: {e}")))?;
    let store_path = match &config.location {
        Some(url) => PathBuf::from(url),
        None => config.dir.join(config.backend.file_name()),
    };
    let mut summary = SoakSummary::default();
    let mut mirror = MemoryStore::with_limits(limits());
    let mut issued: HashSet<u128> = HashSet::new();
    let mut rng = StdRng::seed_from_u64(config.seed ^ 0x5eed);
    // Create the store before the first worker, so that kills hit a store
    // in use, not its creation (a crash during creation is
    // `tests/crash_on_create.rs`'s subject).
    config
        .backend
        .open(&store_path, limits())
        .await?
        .close()
        .await?;
    let start = Instant::now();
    let mut last_progress = Instant::now();
    let mut generation = 0u64;
    while start.elapsed() < config.duration {
        generation += 1;
        let journal = config.dir.join(format!("journal-{generation}.log"));
        let mut child = Command::new(&config.worker_exe)
            .arg("worker")
            .arg(config.backend.name())
            .arg(match &config.location {
                Some(url) => PathBuf::from(worker_url(url)),
                None => store_path.clone(),
            })
            .arg(&journal)
            .arg(config.seed.to_string())
            .arg(generation.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Violation(format!("cannot start a worker: {e}")))?;
        let min = config.kill_min.as_millis() as u64;
        let max = config.kill_max.as_millis().max(u128::from(min) + 1) as u64;
        let life = Duration::from_millis(rng.random_range(min..max));
        tokio::time::sleep(life).await;
        let exited_early = matches!(child.try_wait(), Ok(Some(_)));
        let restarted = match &config.restart {
            Some(restart) if !exited_early && generation.is_multiple_of(restart.every.max(1)) => {
                restart_server(&restart.command).await?;
                summary.restarts += 1;
                true
            }
            _ => false,
        };
        let _ = child.kill(); // SIGKILL
        let status = child.wait().map_err(|e| Violation(format!("wait: {e}")))?;
        if let Some(url) = &config.location {
            end_worker_sessions(url).await?;
        }
        if exited_early {
            let mut err = String::new();
            if let Some(mut s) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut s, &mut err);
            }
            summary.violation(format!(
                "generation {generation}: the worker exited by itself ({status}): {}",
                err.trim()
            ));
        }
        let entries = if journal.exists() {
            read_journal(&journal)?
        } else {
            Vec::new()
        };
        let _ = std::fs::remove_file(&journal);

        // 1-2. Replay the acknowledged operations.
        let mut work = workload(config.seed, generation)?;
        let mut inflight = None;
        for entry in entries {
            match entry {
                Entry::Begin(i) => inflight = Some(i),
                Entry::Ack(i, digest) => {
                    if i != work.drawn() {
                        summary.violation(format!(
                            "generation {generation}: journal out of order at {i}"
                        ));
                        break;
                    }
                    let op = work.next_op()?;
                    let want = apply(&mirror, &op).await?;
                    if want.digest() != digest {
                        summary.violation(format!(
                            "generation {generation} op {i} ({}): the store's answer differs from the reference's {want:?}",
                            op.label()
                        ));
                    }
                    summary.ops += 1;
                    if op.label() == "claim" {
                        summary.claims += 1;
                    }
                    for key in want.issued_otks() {
                        summary.keys_issued += 1;
                        if !issued.insert(key_identity(&key)) {
                            summary.violation(format!("OTK {key:?} handed out twice"));
                        }
                    }
                    inflight = None;
                }
                Entry::Failed(i, retryable, msg) => {
                    if restarted && retryable {
                        summary.failed_by_restart += 1;
                    } else {
                        summary.violation(format!(
                            "generation {generation} op {i}: storage error: {msg}"
                        ));
                    }
                    inflight = Some(i);
                }
            }
        }

        // 3-4. Open the store, resolve the operation in flight, verify.
        let store = match config.backend.open(&store_path, limits()).await {
            Ok(s) => s,
            Err(e) => {
                summary.violation(format!(
                    "after crash {generation}: the store does not open: {}",
                    chain(&e)
                ));
                return Ok(summary);
            }
        };
        if let Some(i) = inflight
            && i == work.drawn()
        {
            let op = work.next_op()?;
            match resolve(store.store(), &mut mirror, &op, "after a crash").await {
                // A claim applied this way handed its keys to nobody;
                // they are gone from the reference too, so a later
                // answer handing one out would differ from it.
                Ok(Ok(true)) => summary.inflight_applied += 1,
                Ok(Ok(false)) => summary.inflight_not_applied += 1,
                Ok(Err(e)) => summary.violation(format!(
                    "after crash {generation}: reads fail: {}",
                    chain(&e)
                )),
                Err(v) => summary.violation(format!(
                    "generation {generation} op {i} ({}): {v}",
                    op.label()
                )),
            }
        }
        if let Err(v) = verify(store.store(), &mirror, &format!("after crash {generation}")).await {
            summary.violation(v.0);
            // Resynchronize the reference with the store so that one
            // violation is not counted again after every later crash.
            mirror = MemoryStore::with_limits(limits());
            keyclaim::transfer::copy_store(store.store(), &mirror, 256, None, |_, _| {}).await?;
        }
        store.close().await?;
        summary.crashes += 1;
        summary.elapsed = start.elapsed();
        if last_progress.elapsed() >= Duration::from_secs(60) {
            progress(&summary);
            last_progress = Instant::now();
        }
    }
    summary.elapsed = start.elapsed();
    Ok(summary)
}
