// Over 500 lines: the operation encoding, its decoding from fuzz bytes and the
// runner belong together (one fuzz target); split them when a second target
// needs the encoding.
//! The logic of the `differential` fuzz target: one [`arbitrary`] sequence of
//! operations applied at once to every backend ([`Subject`]) and to the
//! conformance suite's reference [`Model`]; every answer and the final states
//! must be identical.
//!
//! The operations use small domains (2 users, 2 devices each, 3 algorithms,
//! 6 key names, 3 contents, 2 signatures, several key JSON shapes) and small
//! limits, so that colliding IDs and contents, retries, conflicts, remembered
//! issued keys, fallback replacement, per-device limits and claims with
//! counts and many targets all happen within a few operations. Persistent
//! subjects are also closed and reopened at [`Op::Reopen`] steps.
//!
//! Compared at every step: upload answers (counts, or the error variant),
//! claim answers (the keys, in order, with their JSON and fallback flag) and
//! their change sets, reads, deletions' change sets, the model's included.
//! At checkpoints and at the end: every subject's and the model's whole
//! normalized state (OTKs in claim order, fallback keys with
//! used flags, remembered issued keys) is the same, [`keyclaim::transfer::check_store`]
//! is clean for each, and draining every (device, algorithm) with claims
//! gives the same keys from every subject and from the model.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use arbitrary::{Arbitrary, Unstructured};
use keyclaim::transfer::check_store;
use keyclaim::{
    Algorithm, ClaimTarget, ClaimedKey, Device, Error, KeyId, KeyJson, KeyStore, Limits, Upload,
    UserId,
};
use keyclaim_conformance::model::Model;
use keyclaim_memory::MemoryStore;
use serde_json::{Value, json};

use crate::util::{Violation, block_on, ensure, snapshot_all};

const USERS: [&str; 2] = ["@a:x", "@b:x"];
const DEVICES: [&str; 2] = ["D1", "D2"];
const ALGS: [&str; 3] = ["signed_curve25519", "alg2", "alg3"];
const NAMES: [&str; 6] = ["A", "B", "C", "D", "E", "F"];
/// At most this many operations are taken from one input.
pub const MAX_OPS: usize = 48;

/// The limits every subject and the model use: small, so they are reached.
pub fn limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_otks_per_device_algorithm = 5;
    limits.max_keys_per_upload = 8;
    limits.max_claim_targets = 6;
    limits.max_claim_count = 3;
    limits
}

/// One key in an upload: indexes into the small domains.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct KeySpec {
    alg: u8,
    name: u8,
    content: u8,
    sig: u8,
    shape: u8,
}

/// One claim target: indexes into the small domains and a count.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct TargetSpec {
    user: u8,
    device: u8,
    alg: u8,
    count: u8,
}

/// One operation.
#[derive(Arbitrary, Clone, Debug)]
pub enum Op {
    /// An upload of OTKs and fallback keys for (user, device).
    Upload {
        /// User index.
        user: u8,
        /// Device index.
        device: u8,
        /// OTKs.
        otks: Vec<KeySpec>,
        /// Fallback keys.
        fallbacks: Vec<KeySpec>,
    },
    /// A claim with several targets.
    Claim(Vec<TargetSpec>),
    /// Read counts and unused fallback types of (user, device).
    Read {
        /// User index.
        user: u8,
        /// Device index.
        device: u8,
    },
    /// Delete (user, device).
    DeleteDevice {
        /// User index.
        user: u8,
        /// Device index.
        device: u8,
    },
    /// Delete a user.
    DeleteUser(u8),
    /// Close and reopen the persistent subjects (a no-op for memory).
    Reopen,
    /// Compare every subject's whole state now.
    CompareStates,
}

/// A whole fuzz input: the operations, at most [`MAX_OPS`].
#[derive(Debug, Clone)]
pub struct Ops(pub Vec<Op>);

impl<'a> Arbitrary<'a> for Ops {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let mut ops = Vec::new();
        while ops.len() < MAX_OPS && !u.is_empty() {
            ops.push(Op::arbitrary(u)?);
        }
        Ok(Self(ops))
    }
}

fn pick<'a>(list: &[&'a str], i: u8) -> &'a str {
    list[usize::from(i) % list.len()]
}

fn device(user: u8, dev: u8) -> Result<Device, Violation> {
    Ok(Device::parse(pick(&USERS, user), pick(&DEVICES, dev))?)
}

fn key_of(spec: KeySpec) -> Result<(KeyId, KeyJson), Violation> {
    let alg = pick(&ALGS, spec.alg);
    let id = KeyId::parse(format!("{alg}:{}", pick(&NAMES, spec.name)))?;
    let material = format!("content-{}", spec.content % 3);
    let sig = format!("sig-{}", spec.sig % 2);
    let value = match spec.shape % 4 {
        // A legacy string key: no signatures to ignore.
        0 => Value::String(material),
        1 => json!({"key": material, "signatures": {"@a:x": {"ed25519:D1": sig}}}),
        2 => {
            json!({"key": material, "fallback": true, "signatures": {"@a:x": {"ed25519:D1": sig}}})
        }
        // Unknown fields are kept and part of the content.
        _ => {
            json!({"signatures": {"@a:x": {"ed25519:D1": sig}}, "key": material, "x": [1, {"y": null}]})
        }
    };
    Ok((id, KeyJson::from_value(&value)?))
}

/// A boxed future, for the object-safe [`Subject`] trait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One backend under test.
pub trait Subject: Send {
    /// A short name for messages.
    fn name(&self) -> &str;
    /// The store.
    fn store(&self) -> &dyn KeyStore;
    /// Closes and reopens the store on the same data (persistent backends);
    /// a no-op otherwise.
    fn reopen(&mut self) -> BoxFuture<'_, keyclaim::Result<()>>;
}

/// The key-value layer (`keyclaim-kv`) over an in-memory engine as a
/// [`Subject`]: reopen closes the store and opens a new one over the same
/// engine, which keeps the data.
pub struct KvSubject {
    engine: std::sync::Arc<keyclaim_kv::MemoryEngine>,
    limits: Limits,
    store: Option<keyclaim_kv::KvStore<std::sync::Arc<keyclaim_kv::MemoryEngine>>>,
    /// Answers in place of the store after a failed reopen (the run has
    /// failed by then; this only keeps `store()` total).
    placeholder: MemoryStore,
}

impl KvSubject {
    /// A store over a fresh engine with the given limits.
    ///
    /// # Errors
    /// The layer's open errors.
    pub async fn open(limits: Limits) -> keyclaim::Result<Self> {
        let engine = std::sync::Arc::new(keyclaim_kv::MemoryEngine::new());
        let store = Self::open_on(&engine, &limits).await?;
        Ok(Self {
            engine,
            limits,
            store: Some(store),
            placeholder: MemoryStore::new(),
        })
    }

    async fn open_on(
        engine: &std::sync::Arc<keyclaim_kv::MemoryEngine>,
        limits: &Limits,
    ) -> keyclaim::Result<keyclaim_kv::KvStore<std::sync::Arc<keyclaim_kv::MemoryEngine>>> {
        let options = keyclaim_kv::KvOptions::new().limits(limits.clone());
        keyclaim_kv::KvStore::open_with(std::sync::Arc::clone(engine), options).await
    }
}

impl Subject for KvSubject {
    fn name(&self) -> &str {
        "kv-memory"
    }
    fn store(&self) -> &dyn KeyStore {
        match &self.store {
            Some(s) => s,
            None => &self.placeholder,
        }
    }
    fn reopen(&mut self) -> BoxFuture<'_, keyclaim::Result<()>> {
        Box::pin(async move {
            if let Some(s) = self.store.take() {
                s.close().await?;
            }
            self.store = Some(Self::open_on(&self.engine, &self.limits).await?);
            Ok(())
        })
    }
}

/// The memory backend as a [`Subject`] (reopen is a no-op).
#[derive(Debug)]
pub struct MemorySubject(MemoryStore);

impl MemorySubject {
    /// A fresh memory store with the given limits.
    pub fn new(limits: Limits) -> Self {
        Self(MemoryStore::with_limits(limits))
    }
}

impl Subject for MemorySubject {
    fn name(&self) -> &str {
        "memory"
    }
    fn store(&self) -> &dyn KeyStore {
        &self.0
    }
    fn reopen(&mut self) -> BoxFuture<'_, keyclaim::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// A short, comparable form of an answer.
#[derive(PartialEq, Eq)]
enum Answer {
    Counts(Vec<(String, u64)>),
    Keys(Vec<(String, String, String, bool)>),
    Error(String),
    Changes(Vec<String>),
    Types(Vec<String>),
}

impl fmt::Debug for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Counts(c) => write!(f, "counts {c:?}"),
            Self::Keys(k) => write!(f, "keys {k:?}"),
            Self::Error(e) => write!(f, "error {e}"),
            Self::Changes(c) => write!(f, "changed {c:?}"),
            Self::Types(t) => write!(f, "unused fallback types {t:?}"),
        }
    }
}

fn error_kind(e: &Error) -> Answer {
    // The variant is compared, not the message (it may name another key ID
    // when several conflict).
    let name = format!("{e:?}");
    let variant = name.split([' ', '{', '(']).next().unwrap_or_default();
    Answer::Error(variant.to_owned())
}

fn counts_answer(c: &keyclaim::OtkCounts) -> Answer {
    Answer::Counts(c.iter().map(|(a, n)| (a.to_string(), n)).collect())
}

fn keys_answer(keys: &[ClaimedKey]) -> Answer {
    Answer::Keys(
        keys.iter()
            .map(|k| {
                (
                    k.device.to_string(),
                    k.key_id.to_string(),
                    k.key_json.canonical().to_owned(),
                    k.fallback,
                )
            })
            .collect(),
    )
}

fn changes_answer(c: &keyclaim::Changes) -> Answer {
    Answer::Changes(c.devices().iter().map(ToString::to_string).collect())
}

fn all_same(
    step: usize,
    op: &Op,
    what: &str,
    answers: &[(String, Answer)],
) -> Result<(), Violation> {
    if let Some((first_name, first)) = answers.first() {
        for (name, answer) in &answers[1..] {
            ensure!(
                answer == first,
                "step {step} ({op:?}): {what}: {first_name} answered {first:?} but {name} answered {answer:?}"
            );
        }
    }
    Ok(())
}

/// Runs one input against memory only (what needs no other backend).
///
/// # Errors
/// The first disagreement.
pub fn check_memory_only(data: &[u8]) -> Result<(), Violation> {
    let ops = decode(data);
    block_on(async {
        let mut subjects: Vec<Box<dyn Subject>> = vec![Box::new(MemorySubject::new(limits()))];
        run(&ops, &mut subjects).await
    })?
}

/// Decodes an input into operations (never fails: short input, fewer ops).
pub fn decode(data: &[u8]) -> Ops {
    Ops::arbitrary_take_rest(Unstructured::new(data)).unwrap_or(Ops(Vec::new()))
}

/// Applies the operations to every subject and the model.
///
/// # Errors
/// The first disagreement, or a store error (none is expected).
pub async fn run(ops: &Ops, subjects: &mut [Box<dyn Subject>]) -> Result<(), Violation> {
    let mut model = Model::new(limits());
    for (step, op) in ops.0.iter().enumerate() {
        match op {
            Op::Upload {
                user,
                device: d,
                otks,
                fallbacks,
            } => {
                let otks = otks
                    .iter()
                    .map(|k| key_of(*k))
                    .collect::<Result<Vec<_>, _>>()?;
                let fbs = fallbacks
                    .iter()
                    .map(|k| key_of(*k))
                    .collect::<Result<Vec<_>, _>>()?;
                // Conflicts inside one request (R3.6, one ID twice) are
                // refused before any store sees the upload.
                let Ok(upload) = Upload::from_keys(device(*user, *d)?, otks, fbs) else {
                    continue;
                };
                let mut changes = Vec::new();
                let want = match model.upload(&upload) {
                    Ok(out) => {
                        changes.push(("model".to_owned(), changes_answer(&out.changes)));
                        counts_answer(&out.counts)
                    }
                    Err(e) => error_kind(&e),
                };
                let mut answers = vec![("model".to_owned(), want)];
                for s in subjects.iter() {
                    match s.store().upload(&upload).await {
                        Ok(out) => {
                            answers.push((s.name().to_owned(), counts_answer(&out.counts)));
                            changes.push((s.name().to_owned(), changes_answer(&out.changes)));
                        }
                        Err(e) if e.is_client_error() => {
                            answers.push((s.name().to_owned(), error_kind(&e)));
                        }
                        Err(e) => {
                            return Err(Violation(format!("{}: upload failed: {e}", s.name())));
                        }
                    }
                }
                all_same(step, op, "upload", &answers)?;
                all_same(step, op, "upload changes", &changes)?;
            }
            Op::Claim(targets) => {
                let targets = targets
                    .iter()
                    .map(|t| {
                        Ok(ClaimTarget {
                            device: device(t.user, t.device)?,
                            algorithm: Algorithm::parse(pick(&ALGS, t.alg))?,
                            count: u32::from(t.count % 5),
                        })
                    })
                    .collect::<Result<Vec<_>, Violation>>()?;
                let mut changes = Vec::new();
                let want = match model.claim(&targets) {
                    Ok(out) => {
                        changes.push(("model".to_owned(), changes_answer(&out.changes)));
                        keys_answer(&out.keys)
                    }
                    Err(e) => error_kind(&e),
                };
                let mut answers = vec![("model".to_owned(), want)];
                for s in subjects.iter() {
                    match s.store().claim(&targets).await {
                        Ok(out) => {
                            answers.push((s.name().to_owned(), keys_answer(&out.keys)));
                            changes.push((s.name().to_owned(), changes_answer(&out.changes)));
                        }
                        Err(e) if e.is_client_error() => {
                            answers.push((s.name().to_owned(), error_kind(&e)));
                        }
                        Err(e) => {
                            return Err(Violation(format!("{}: claim failed: {e}", s.name())));
                        }
                    }
                }
                all_same(step, op, "claim", &answers)?;
                all_same(step, op, "claim changes", &changes)?;
            }
            Op::Read { user, device: d } => {
                let dev = device(*user, *d)?;
                let mut counts = vec![("model".to_owned(), counts_answer(&model.counts(&dev)))];
                let mut types = vec![(
                    "model".to_owned(),
                    Answer::Types(
                        model
                            .unused_fallback_types(&dev)
                            .iter()
                            .map(ToString::to_string)
                            .collect(),
                    ),
                )];
                for s in subjects.iter() {
                    let st = s.store().sync_state(&dev).await?;
                    counts.push((s.name().to_owned(), counts_answer(&st.one_time_key_counts)));
                    types.push((
                        s.name().to_owned(),
                        Answer::Types(
                            st.unused_fallback_key_types
                                .iter()
                                .map(ToString::to_string)
                                .collect(),
                        ),
                    ));
                }
                all_same(step, op, "counts", &counts)?;
                all_same(step, op, "unused fallback types", &types)?;
            }
            Op::DeleteDevice { user, device: d } => {
                let dev = device(*user, *d)?;
                let mut changes = vec![(
                    "model".to_owned(),
                    changes_answer(&model.delete_device(&dev)),
                )];
                for s in subjects.iter() {
                    let c = s.store().delete_device(&dev).await?;
                    changes.push((s.name().to_owned(), changes_answer(&c)));
                }
                all_same(step, op, "delete_device changes", &changes)?;
            }
            Op::DeleteUser(user) => {
                let user = UserId::parse(pick(&USERS, *user))?;
                let mut changes = vec![(
                    "model".to_owned(),
                    changes_answer(&model.delete_user(&user)),
                )];
                for s in subjects.iter() {
                    let c = s.store().delete_user(&user).await?;
                    changes.push((s.name().to_owned(), changes_answer(&c)));
                }
                all_same(step, op, "delete_user changes", &changes)?;
            }
            Op::Reopen => {
                for s in subjects.iter_mut() {
                    s.reopen()
                        .await
                        .map_err(|e| Violation(format!("{}: reopen failed: {e}", s.name())))?;
                }
            }
            Op::CompareStates => compare_states(step, &model, subjects).await?,
        }
    }
    compare_states(ops.0.len(), &model, subjects).await?;
    for s in subjects.iter() {
        let report = check_store(s.store(), 16).await?;
        ensure!(
            report.problems.is_empty(),
            "{}: check_store found {:?}",
            s.name(),
            report.problems
        );
    }
    drain(&mut model, subjects).await
}

async fn compare_states(
    step: usize,
    model: &Model,
    subjects: &[Box<dyn Subject>],
) -> Result<(), Violation> {
    let mut states = vec![("model".to_owned(), model.snapshot())];
    for s in subjects {
        states.push((s.name().to_owned(), snapshot_all(s.store()).await?));
    }
    if let Some((first_name, first)) = states.first() {
        for (name, state) in &states[1..] {
            if state != first {
                let diff: Vec<String> = first
                    .iter()
                    .zip(state.iter())
                    .filter(|(a, b)| a != b)
                    .map(|(a, b)| format!("{a:?}\n  vs\n{b:?}"))
                    .take(1)
                    .collect();
                return Err(Violation(format!(
                    "after step {step}: the states of {first_name} ({} devices) and {name} ({} devices) differ: {}",
                    first.len(),
                    state.len(),
                    diff.join("")
                )));
            }
        }
    }
    Ok(())
}

/// Claims everything from every (device, algorithm) until nothing is left
/// but used fallbacks, comparing every answer with the model's.
async fn drain(model: &mut Model, subjects: &[Box<dyn Subject>]) -> Result<(), Violation> {
    let mut targets = Vec::new();
    for user in USERS {
        for dev in DEVICES {
            for a in ALGS {
                targets.push(ClaimTarget {
                    device: Device::parse(user, dev)?,
                    algorithm: Algorithm::parse(a)?,
                    count: 3,
                });
            }
        }
    }
    // Drain target by target (the claim limit is small), until the model
    // hands out only fallbacks: at most 5 OTKs per (device, algorithm).
    for target in &targets {
        for round in 0..3 {
            let one = std::slice::from_ref(target);
            let want = keys_answer(&model.claim(one)?.keys);
            let mut answers = vec![("model".to_owned(), want)];
            for s in subjects {
                answers.push((
                    s.name().to_owned(),
                    keys_answer(&s.store().claim(one).await?.keys),
                ));
            }
            let op = Op::CompareStates;
            all_same(
                round,
                &op,
                &format!("drain {} {}", target.device, target.algorithm),
                &answers,
            )?;
        }
    }
    Ok(())
}

/// A temp dir for throwaway stores: on `/dev/shm` when it exists (fsync is
/// free there, so a fuzz input costs no disk flushes), else the default.
///
/// # Errors
/// When no temp dir can be made.
pub fn scratch_dir() -> std::io::Result<tempfile::TempDir> {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = tempfile::Builder::new()
            .prefix("keyclaim-fuzz-")
            .tempdir_in(shm)
    {
        return Ok(dir);
    }
    tempfile::Builder::new().prefix("keyclaim-fuzz-").tempdir()
}

/// Runs one input against memory, SQLite, redb, RocksDB (when built: see
/// [`crate::backends::Backend::built`]) and the key-value layer on its
/// in-memory engine (fresh stores, in a scratch dir) and the model.
///
/// # Errors
/// The first disagreement, or a store error.
pub fn check(data: &[u8]) -> Result<(), Violation> {
    check_ops(&decode(data))
}

/// Runs decoded operations against memory, SQLite, redb, RocksDB (when
/// built) and the key-value layer on its in-memory engine (fresh stores, in
/// a scratch dir) and the model (what the typed fuzz target calls).
///
/// # Errors
/// The first disagreement, or a store error.
pub fn check_ops(ops: &Ops) -> Result<(), Violation> {
    let dir = scratch_dir().map_err(|e| Violation(format!("no scratch dir: {e}")))?;
    block_on(async {
        let l = limits();
        let mut subjects: Vec<Box<dyn Subject>> = vec![Box::new(MemorySubject::new(l.clone()))];
        for backend in crate::backends::Backend::built() {
            let sub = crate::backends::PersistentSubject::open(backend, dir.path(), l.clone())
                .await
                .map_err(|e| Violation(format!("{backend}: open failed: {e}")))?;
            subjects.push(Box::new(sub));
        }
        let kv = KvSubject::open(l.clone())
            .await
            .map_err(|e| Violation(format!("kv-memory: open failed: {e}")))?;
        subjects.push(Box::new(kv));
        run(ops, &mut subjects).await
    })?
}
