//! Storage faults: a persistent store is run over storage that fails, and
//! must fail cleanly (R10.4: an error, never a panic or a wrong answer), and
//! never acknowledge or serve what it could not write or sync (R10.8).
//!
//! # Mechanisms
//!
//! - A full disk: `tests/storage_faults.rs` runs the scenario with
//!   `keyclaim_testing::DiskFull` as the [`Fault`]: a small `tmpfs` (8 MiB)
//!   mounted on a temp dir holds the store. Injecting the fault fills the
//!   file system with a filler file until `write` fails with `ENOSPC`;
//!   clearing it deletes the filler and remounts the file system eight times
//!   larger (an operator adding space). This needs root (or
//!   `CAP_SYS_ADMIN`) and `mount`; CI runs as root.
//! - `EIO` on write or on sync, for the file-based backends (SQLite, redb):
//!   an `LD_PRELOAD` shim ([`crate::eio`]) fails `write`/`pwrite` or
//!   `fsync`/`fdatasync` on the files under the store's directory while the
//!   fault is on. No root, no kernel module; the scenario runs in a child
//!   process (the `eio` binary) started with the shim preloaded.
//! - A failing batch write of the key-value layer's engine
//!   ([`crate::kv_fault`]): a wrapper over `MemoryEngine` whose
//!   `write` fails, as an engine's does on `EIO`; the store is reopened on
//!   the same engine.
//!
//! # The scenario ([`run_scenario`])
//!
//! 1. Healthy phase: a deterministic [`Workload`] runs against the store and
//!    a reference [`MemoryStore`] mirror; answers must agree.
//! 2. Faulty phase: the fault is injected and the workload goes on. An
//!    operation that returns `Ok` is acknowledged and applied to the mirror
//!    (its answer must agree). An operation that fails must fail with a
//!    storage error (500 `M_UNKNOWN` at the facade), never a panic, a client
//!    error or a wrong answer; the store's state is then read back and must
//!    be exactly the mirror's (nothing applied) or the mirror's with the
//!    whole operation applied (nothing partial). A read that fails is noted
//!    and the state is resolved after the fault clears.
//! 3. Recovery: the fault is cleared; the same handle must work again (if it
//!    does not, the store is reopened and that is reported). The state must
//!    equal the mirror (every acknowledged write present), counts must be
//!    exact, [`check_store`] clean, and new writes must succeed.
//! 4. Reopen: the store is closed and opened again; the state is unchanged.

use std::path::{Path, PathBuf};
use std::process::Command;

use keyclaim::transfer::check_store;
use keyclaim::{KeyStore, Limits};
use keyclaim_memory::MemoryStore;

use crate::backends::{Backend, Persistent};
use crate::differential::BoxFuture;
use crate::util::{Violation, chain, ensure, snapshot_all};
use crate::workload::{WorkOp, Workload, apply, clone_memory};

/// A fault that can be switched on and off under a directory.
pub trait Fault {
    /// A name for reports.
    fn name(&self) -> &str;
    /// The directory whose storage the fault affects.
    fn dir(&self) -> &Path;
    /// Switches the fault on.
    ///
    /// # Errors
    /// When the fault cannot be injected.
    fn inject(&mut self) -> std::io::Result<()>;
    /// Switches the fault off.
    ///
    /// # Errors
    /// When the fault cannot be cleared.
    fn clear(&mut self) -> std::io::Result<()>;
    /// Whether an operation that fails under this fault must fail with a
    /// retryable error (nothing of it applied, the same call may succeed
    /// later). Default `false`: any storage error will do.
    fn retryable(&self) -> bool {
        false
    }
}

/// How the scenario opens its store, first and again after the fault.
pub trait Opener: Send + Sync {
    /// The backend's name, for reports.
    fn name(&self) -> &'static str;
    /// Opens the store (again), with `limits`.
    fn open(&self, limits: Limits) -> BoxFuture<'_, keyclaim::Result<Persistent>>;
}

/// A file-based backend's store at a path.
#[derive(Debug, Clone)]
pub struct AtPath {
    /// The backend.
    pub backend: Backend,
    /// The store's file.
    pub path: PathBuf,
}

impl Opener for AtPath {
    fn name(&self) -> &'static str {
        self.backend.name()
    }

    fn open(&self, limits: Limits) -> BoxFuture<'_, keyclaim::Result<Persistent>> {
        Box::pin(self.backend.open(&self.path, limits))
    }
}

/// What [`run_scenario`] saw.
#[derive(Debug, Clone, Default)]
pub struct ScenarioReport {
    /// The backend.
    pub backend: String,
    /// The fault.
    pub fault: String,
    /// Operations acknowledged before the fault.
    pub healthy_ops: u64,
    /// Operations tried while the fault was on.
    pub faulty_ops: u64,
    /// Of those, how many succeeded anyway (acknowledged, then verified).
    pub faulty_ok: u64,
    /// Of those, how many failed with a storage error.
    pub faulty_failed: u64,
    /// Failed operations found applied whole afterwards (allowed: an error
    /// after commit), as opposed to not applied at all.
    pub failed_but_applied: u64,
    /// Reads of the state that failed during the fault.
    pub failed_reads: u64,
    /// Whether the same handle failed after the fault cleared and the store
    /// had to be reopened.
    pub needed_reopen: bool,
    /// The error of the first operation on the old handle after the fault
    /// cleared, when it failed.
    pub same_handle_error: Option<String>,
    /// Operations acknowledged after recovery.
    pub recovered_ops: u64,
    /// The first error message seen during the fault (for the README).
    pub sample_error: Option<String>,
}

async fn same_state(
    a: &dyn KeyStore,
    b: &MemoryStore,
) -> Result<Result<bool, keyclaim::Error>, Violation> {
    let want = snapshot_all(b).await?;
    Ok(snapshot_all(a).await.map(|got| got == want))
}

/// Resolves a failed operation: the store must hold the mirror's state, or
/// the mirror's state with the whole operation applied. Returns whether it
/// was applied (and then applies it to the mirror).
pub(crate) async fn resolve(
    store: &dyn KeyStore,
    mirror: &mut MemoryStore,
    op: &WorkOp,
    when: &str,
) -> Result<Result<bool, keyclaim::Error>, Violation> {
    match same_state(store, mirror).await? {
        Err(e) => return Ok(Err(e)),
        Ok(true) => return Ok(Ok(false)),
        Ok(false) => {}
    }
    let after = clone_memory(mirror).await?;
    apply(&after, op).await?;
    match same_state(store, &after).await? {
        Err(e) => Ok(Err(e)),
        Ok(true) => {
            *mirror = after;
            Ok(Ok(true))
        }
        Ok(false) => Err(Violation(format!(
            "{when}: after a failed {} the store holds neither the state before it nor the state with all of it applied (a partial write)",
            op.label()
        ))),
    }
}

/// Runs the scenario of this module's docs for one backend over one fault,
/// the store's file in the fault's directory.
///
/// # Errors
/// The first broken promise.
pub async fn run_scenario(
    backend: Backend,
    fault: &mut dyn Fault,
    seed: u64,
) -> Result<ScenarioReport, Violation> {
    let opener = AtPath {
        backend,
        path: fault.dir().join(backend.file_name()),
    };
    run_scenario_with(&opener, fault, seed).await
}

/// Runs the scenario of this module's docs for the store `opener` opens,
/// over one fault.
///
/// # Errors
/// The first broken promise.
pub async fn run_scenario_with(
    opener: &dyn Opener,
    fault: &mut dyn Fault,
    seed: u64,
) -> Result<ScenarioReport, Violation> {
    let mut report = ScenarioReport {
        backend: opener.name().to_owned(),
        fault: fault.name().to_owned(),
        ..ScenarioReport::default()
    };
    let mut limits = Limits::default();
    limits.max_otks_per_device_algorithm = 200;
    let dir = fault.dir().to_owned();
    let mut store = opener.open(limits.clone()).await?;
    let mut mirror = MemoryStore::with_limits(limits.clone());
    // Keys of ~600 bytes, so that the faulty phase needs new pages soon.
    let mut work = Workload::new(seed, 12, 512)?;

    // 1. Healthy.
    for _ in 0..150 {
        let op = work.next_op()?;
        let got = apply(store.store(), &op).await?;
        let want = apply(&mirror, &op).await?;
        ensure!(
            got == want,
            "healthy {}: store {got:?}, mirror {want:?}",
            op.label()
        );
        report.healthy_ops += 1;
    }
    ensure!(
        same_state(store.store(), &mirror).await??,
        "healthy phase: the store's state differs from the mirror"
    );

    // 2. Faulty.
    fault
        .inject()
        .map_err(|e| Violation(format!("cannot inject {}: {e}", fault.name())))?;
    let mut unresolved: Option<WorkOp> = None;
    for _ in 0..200 {
        let op = work.next_op()?;
        report.faulty_ops += 1;
        match apply(store.store(), &op).await {
            Ok(got) => {
                let want = apply(&mirror, &op).await?;
                ensure!(
                    got == want,
                    "faulty {}: acknowledged with {got:?}, mirror says {want:?}",
                    op.label()
                );
                report.faulty_ok += 1;
            }
            Err(e) => {
                ensure!(
                    matches!(e, keyclaim::Error::Storage { .. }),
                    "faulty {}: failed with a non-storage error: {e}",
                    op.label()
                );
                ensure!(
                    !fault.retryable() || e.is_retryable(),
                    "faulty {}: failed with a storage error that is not retryable: {}",
                    op.label(),
                    chain(&e)
                );
                let api = keyclaim::ApiError::from(e);
                ensure!(
                    (api.status(), api.errcode()) == (500, "M_UNKNOWN"),
                    "a storage failure maps to {} {}",
                    api.status(),
                    api.errcode()
                );
                if report.sample_error.is_none() {
                    report.sample_error = api.store_error().map(|s| chain(s));
                }
                report.faulty_failed += 1;
                match resolve(store.store(), &mut mirror, &op, "during the fault").await? {
                    Ok(applied) => report.failed_but_applied += u64::from(applied),
                    Err(_) => {
                        report.failed_reads += 1;
                        unresolved = Some(op);
                        break;
                    }
                }
            }
        }
    }
    ensure!(
        report.faulty_failed > 0,
        "{} never made an operation fail in {} operations",
        fault.name(),
        report.faulty_ops
    );

    // 3. Recovery.
    fault
        .clear()
        .map_err(|e| Violation(format!("cannot clear {}: {e}", fault.name())))?;
    // The same handle first, then (if it fails) a reopened store: the probe,
    // then the outcome of the operation whose read failed during the fault.
    let probe = probe_upload()?;
    apply(&mirror, &probe).await?;
    if let Err(e) = recover(store.store(), &mut mirror, &probe, unresolved.as_ref()).await? {
        report.same_handle_error = Some(chain(&e));
        report.needed_reopen = true;
        let _ = store.close().await;
        store = opener.open(limits.clone()).await.map_err(|e| {
            Violation(format!(
                "after the fault cleared, the store does not open: {e}"
            ))
        })?;
        recover(store.store(), &mut mirror, &probe, unresolved.as_ref())
            .await?
            .map_err(|e| {
                Violation(format!(
                    "after the fault cleared and a reopen, the store fails: {}",
                    chain(&e)
                ))
            })?;
    }
    report.recovered_ops += 1;
    for _ in 0..100 {
        let op = work.next_op()?;
        let got = apply(store.store(), &op).await.map_err(|e| {
            Violation(format!(
                "after recovery, {} fails: {}; storage: {}",
                op.label(),
                chain(&e),
                describe_dir(&dir)
            ))
        })?;
        let want = apply(&mirror, &op).await?;
        ensure!(
            got == want,
            "after recovery {}: store {got:?}, mirror {want:?}",
            op.label()
        );
        report.recovered_ops += 1;
    }
    verify(store.store(), &mirror, "after recovery").await?;

    // 4. Reopen.
    store.close().await?;
    let store = opener.open(limits).await?;
    verify(store.store(), &mirror, "after reopen").await?;
    store.close().await?;
    Ok(report)
}

/// Brings `store` up to date after the fault cleared: the probe (an upload
/// of new keys on a device of its own: idempotent, so it can be tried on the
/// old handle and again after a reopen; `mirror` already holds it), then the
/// outcome of `unresolved`, the operation whose state a failed read left
/// unknown. `Ok(Err(_))` when the store fails: the handle is unusable.
async fn recover(
    store: &dyn KeyStore,
    mirror: &mut MemoryStore,
    probe: &WorkOp,
    unresolved: Option<&WorkOp>,
) -> Result<Result<(), keyclaim::Error>, Violation> {
    if let Err(e) = apply(store, probe).await {
        return Ok(Err(e));
    }
    match unresolved {
        Some(op) => Ok(resolve(store, mirror, op, "after the fault cleared")
            .await?
            .map(drop)),
        None => Ok(Ok(())),
    }
}

/// `df` and `ls` of the store's directory, for messages.
fn describe_dir(dir: &Path) -> String {
    let run = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .arg(dir)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    format!("{}{}", run("df", "-k"), run("ls", "-la"))
}

fn probe_upload() -> Result<WorkOp, Violation> {
    let device = keyclaim::Device::parse("@probe:soak.example", "PROBE")?;
    let key =
        keyclaim::KeyJson::from_value(&serde_json::json!({"key": "probe", "signatures": {}}))?;
    Ok(WorkOp::Upload(keyclaim::Upload::from_keys(
        device,
        vec![(keyclaim::KeyId::parse("signed_curve25519:PROBE")?, key)],
        Vec::new(),
    )?))
}

/// The state equals the mirror's, counts are exact, `check_store` is clean.
///
/// # Errors
/// The first difference.
pub async fn verify(
    store: &dyn KeyStore,
    mirror: &MemoryStore,
    when: &str,
) -> Result<(), Violation> {
    let got = snapshot_all(store).await?;
    let want = snapshot_all(mirror).await?;
    if got != want {
        let first = got
            .iter()
            .zip(want.iter())
            .find(|(a, b)| a != b)
            .map(|(a, b)| {
                format!(
                    "{}: store {} OTKs vs mirror {}",
                    a.device,
                    a.one_time_keys.len(),
                    b.one_time_keys.len()
                )
            });
        return Err(Violation(format!(
            "{when}: the store's state ({} devices) differs from the acknowledged writes ({} devices); first difference: {first:?}",
            got.len(),
            want.len()
        )));
    }
    for snap in &want {
        let counts = store.otk_counts(&snap.device).await?;
        ensure!(
            counts == snap.counts(),
            "{when}: counts of {} are {:?}, stored keys say {:?}",
            snap.device,
            counts,
            snap.counts()
        );
    }
    let report = check_store(store, 64).await?;
    ensure!(
        report.problems.is_empty(),
        "{when}: check_store found {:?}",
        report.problems
    );
    Ok(())
}
