//! A deterministic mixed workload for the fault tests and the soak: the
//! operations depend only on the seed and how many were drawn, never on the
//! answers, so that another process can draw the same sequence again and
//! replay it against a reference store.

use std::collections::VecDeque;
use std::hash::{DefaultHasher, Hash, Hasher};

use keyclaim::{Algorithm, ClaimTarget, Device, KeyId, KeyJson, KeyStore, Upload};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::util::Violation;

/// The algorithms the workload uses.
const ALGS: [&str; 2] = ["signed_curve25519", "alg2"];

/// One operation of the workload.
#[derive(Clone, Debug)]
pub enum WorkOp {
    /// An upload (new keys, a retry of an earlier upload, or fallback keys).
    Upload(Upload),
    /// A claim over several targets.
    Claim(Vec<ClaimTarget>),
    /// A device deletion.
    DeleteDevice(Device),
}

impl WorkOp {
    /// A short label for reports.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Upload(_) => "upload",
            Self::Claim(_) => "claim",
            Self::DeleteDevice(_) => "delete_device",
        }
    }
}

/// Draws [`WorkOp`]s.
#[derive(Debug)]
pub struct Workload {
    rng: StdRng,
    devices: Vec<Device>,
    next_key: u64,
    pad: String,
    recent: VecDeque<Upload>,
    drawn: u64,
    tag: String,
}

impl Workload {
    /// A workload over `devices` devices whose keys carry `pad_bytes` of
    /// padding (to make them take space), from `seed`.
    ///
    /// # Errors
    /// Never in practice (the fixed device IDs are valid).
    pub fn new(seed: u64, devices: usize, pad_bytes: usize) -> Result<Self, Violation> {
        let devices = (0..devices.max(1))
            .map(|i| Device::parse(&format!("@user{}:soak.example", i % 7), &format!("DEV{i}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            rng: StdRng::seed_from_u64(seed),
            devices,
            next_key: 0,
            pad: "p".repeat(pad_bytes),
            recent: VecDeque::new(),
            drawn: 0,
            tag: String::new(),
        })
    }

    /// Puts `tag` into every key ID this workload makes, so that workloads
    /// with different tags never share a key ID (the soak uses one tag per
    /// worker generation).
    #[must_use]
    pub fn tagged(mut self, tag: &str) -> Self {
        self.tag = tag.to_owned();
        self
    }

    /// How many operations were drawn so far.
    pub fn drawn(&self) -> u64 {
        self.drawn
    }

    /// The devices the workload uses.
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    fn device(&mut self) -> Device {
        let i = self.rng.random_range(0..self.devices.len());
        self.devices[i].clone()
    }

    fn alg(&mut self) -> Algorithm {
        let name = ALGS[self.rng.random_range(0..ALGS.len())];
        Algorithm::parse(name).unwrap_or_else(|_| Algorithm::signed_curve25519())
    }

    fn key(&mut self, alg: &Algorithm, fallback: bool) -> Result<(KeyId, KeyJson), Violation> {
        self.next_key += 1;
        let n = self.next_key;
        let id = KeyId::parse(format!("{alg}:{}K{n:08}", self.tag))?;
        let mut value = json!({
            "key": format!("material-{n}"),
            "signatures": {"@user:soak.example": {"ed25519:DEV": format!("sig-{}", self.rng.random::<u16>())}},
            "pad": self.pad,
        });
        if fallback {
            value["fallback"] = json!(true);
        }
        Ok((id, KeyJson::from_value(&value)?))
    }

    /// Draws the next operation.
    ///
    /// # Errors
    /// Never in practice (generated IDs and JSON are valid).
    pub fn next_op(&mut self) -> Result<WorkOp, Violation> {
        self.drawn += 1;
        let roll = self.rng.random_range(0..100u32);
        let op = match roll {
            // New OTKs, 1 to 20, of one algorithm.
            0..45 => {
                let device = self.device();
                let alg = self.alg();
                let n = self.rng.random_range(1..=20);
                let keys = (0..n)
                    .map(|_| self.key(&alg, false))
                    .collect::<Result<Vec<_>, _>>()?;
                let upload = Upload::from_keys(device, keys, Vec::new())?;
                self.recent.push_back(upload.clone());
                if self.recent.len() > 32 {
                    self.recent.pop_front();
                }
                WorkOp::Upload(upload)
            }
            // A retry of a recent upload (as a client that lost the answer):
            // its keys may be stored (accepted unchanged) or issued since
            // (remembered, not stored again: R3.4).
            45..55 if !self.recent.is_empty() => {
                let i = self.rng.random_range(0..self.recent.len());
                WorkOp::Upload(self.recent[i].clone())
            }
            // A fallback key: new, or the same again.
            45..60 => {
                let device = self.device();
                let alg = self.alg();
                let fb = self.key(&alg, true)?;
                WorkOp::Upload(Upload::from_keys(device, Vec::new(), vec![fb])?)
            }
            // A claim over 1 to 12 targets with counts 1 to 5.
            60..99 => {
                let n = self.rng.random_range(1..=12);
                let targets = (0..n)
                    .map(|_| ClaimTarget {
                        device: self.device(),
                        algorithm: self.alg(),
                        count: self.rng.random_range(1..=5),
                    })
                    .collect();
                WorkOp::Claim(targets)
            }
            _ => {
                let device = self.device();
                // A deleted device forgets its issued keys (R7.1), so a retry
                // of an upload from before the deletion would store them as
                // new keys: legitimate, but it would blur the "never issued
                // twice" check. Retries never cross a deletion.
                self.recent.retain(|u| *u.device() != device);
                WorkOp::DeleteDevice(device)
            }
        };
        Ok(op)
    }
}

/// A comparable summary of an answer: counts, keys handed out (device, key
/// ID, digest, fallback flag) or the client error's variant.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum WorkAnswer {
    /// An upload's counts.
    Counts(Vec<(String, u64)>),
    /// A claim's keys.
    Keys(Vec<(String, String, String, bool)>),
    /// A deletion.
    Deleted,
    /// A client error (a limit, a conflict), by variant.
    Refused(String),
}

impl WorkAnswer {
    /// A stable 64-bit digest of the answer (same binary, same value).
    pub fn digest(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }

    /// The OTKs a claim answer handed out: (device, key ID, digest).
    pub fn issued_otks(&self) -> Vec<(String, String, String)> {
        match self {
            Self::Keys(keys) => keys
                .iter()
                .filter(|k| !k.3)
                .map(|k| (k.0.clone(), k.1.clone(), k.2.clone()))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Applies an operation. Client errors (limits, conflicts) are answers;
/// storage errors are errors.
///
/// # Errors
/// The store's non-client errors.
pub async fn apply<S: KeyStore + ?Sized>(store: &S, op: &WorkOp) -> keyclaim::Result<WorkAnswer> {
    let result = match op {
        WorkOp::Upload(u) => store.upload(u).await.map(|o| {
            WorkAnswer::Counts(o.counts.iter().map(|(a, n)| (a.to_string(), n)).collect())
        }),
        WorkOp::Claim(t) => store.claim(t).await.map(|o| {
            WorkAnswer::Keys(
                o.keys
                    .iter()
                    .map(|k| {
                        (
                            k.device.to_string(),
                            k.key_id.to_string(),
                            k.key_json.digest().to_hex(),
                            k.fallback,
                        )
                    })
                    .collect(),
            )
        }),
        WorkOp::DeleteDevice(d) => store.delete_device(d).await.map(|_| WorkAnswer::Deleted),
    };
    match result {
        Err(e) if e.is_client_error() => {
            let name = format!("{e:?}");
            Ok(WorkAnswer::Refused(
                name.split([' ', '{', '('])
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            ))
        }
        other => other,
    }
}

/// A copy of a memory store (for "what if this operation was applied").
///
/// # Errors
/// Never for memory stores.
pub async fn clone_memory(
    from: &keyclaim_memory::MemoryStore,
) -> keyclaim::Result<keyclaim_memory::MemoryStore> {
    let to = keyclaim_memory::MemoryStore::with_limits(from.limits().clone());
    keyclaim::transfer::copy_store(from, &to, 256, None, |_, _| {}).await?;
    Ok(to)
}
