//! The homeserver-shaped workload: set-up uploads, and a mixed phase of
//! claims, bulk claims, refills, fallback rotations and count reads from
//! concurrent clients; and what claims in the claim races (a store or a
//! baseline: see `race`).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keyclaim::{
    Algorithm, ClaimTarget, ClaimedKey, Device, Error, KeyId, KeyJson, KeyStore, Upload,
};
use keyclaim_benches::baseline::Baseline;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::stats::Samples;

/// What claims one key at a time in a race: keyclaim's store, or a
/// baseline with the reference homeserver's claim pattern.
#[derive(Clone)]
pub(crate) enum Claimer {
    /// keyclaim's own claim.
    Store(Arc<dyn KeyStore>),
    /// A baseline's claim.
    Baseline(Arc<dyn Baseline>),
}

impl Claimer {
    /// Claims one key of `algorithm` from `device`.
    pub(crate) async fn claim_one(
        &self,
        device: &Device,
        algorithm: &Algorithm,
    ) -> keyclaim::Result<Option<ClaimedKey>> {
        match self {
            Self::Store(store) => {
                let out = store
                    .claim(&[ClaimTarget::one(device.clone(), algorithm.clone())])
                    .await?;
                Ok(out.keys.into_iter().next())
            }
            Self::Baseline(baseline) => baseline.claim_one(device, algorithm).await,
        }
    }

    /// How many one-time keys of `algorithm` `device` holds.
    pub(crate) async fn count(
        &self,
        device: &Device,
        algorithm: &Algorithm,
    ) -> keyclaim::Result<u64> {
        match self {
            Self::Store(store) => Ok(store.otk_counts(device).await?.get(algorithm)),
            Self::Baseline(baseline) => baseline.count(device, algorithm).await,
        }
    }

    /// Uploads one-time keys of `device` and, to a store, with `fallback`
    /// a fallback key (a baseline keeps none).
    pub(crate) async fn upload_keys(
        &self,
        device: &Device,
        keys: Vec<(KeyId, KeyJson)>,
        fallback: bool,
    ) -> keyclaim::Result<()> {
        match self {
            Self::Store(store) => {
                let fb = if fallback {
                    vec![key_json(device, "FB", true)?]
                } else {
                    vec![]
                };
                store
                    .upload(&Upload::from_keys(device.clone(), keys, fb)?)
                    .await?;
                Ok(())
            }
            Self::Baseline(baseline) => baseline.upload(device, &keys).await,
        }
    }
}

/// Workload parameters.
#[derive(Clone, Debug)]
pub(crate) struct Workload {
    pub(crate) devices: usize,
    pub(crate) keys_per_device: usize,
    pub(crate) clients: usize,
    pub(crate) hot_devices: usize,
    pub(crate) duration: Duration,
    pub(crate) max_ops: Option<u64>,
    pub(crate) bulk_size: usize,
}

pub(crate) fn device(prefix: &str, i: usize) -> keyclaim::Result<Device> {
    Device::parse(&format!("@{prefix}{i}:bench.example"), "DEVICE")
}

/// A key of `device` named `name`, shaped like a real client's signed
/// curve25519 key (about 200 bytes).
pub(crate) fn key_json(
    device: &Device,
    name: &str,
    fallback: bool,
) -> keyclaim::Result<(KeyId, KeyJson)> {
    let mut v = json!({
        "key": format!("{name:0>43}"),
        "signatures": {device.user_id.as_str(): {format!("ed25519:{}", device.device_id): "s".repeat(86)}},
    });
    if fallback {
        v["fallback"] = json!(true);
    }
    Ok((
        KeyId::parse(format!("signed_curve25519:{name}"))?,
        KeyJson::from_value(&v)?,
    ))
}

/// `n` fresh OTKs named `<tag><j>`.
fn otks_of(device: &Device, tag: &str, n: usize) -> keyclaim::Result<Vec<(KeyId, KeyJson)>> {
    (0..n)
        .map(|j| key_json(device, &format!("{tag}{j:06}"), false))
        .collect()
}

/// An upload of `n` fresh OTKs named `<tag><j>` and optionally a fallback key.
pub(crate) fn upload_of(
    device: &Device,
    tag: &str,
    n: usize,
    fallback: bool,
) -> keyclaim::Result<Upload> {
    let otks = otks_of(device, tag, n)?;
    let fb = if fallback {
        vec![key_json(device, &format!("{tag}FB"), true)?]
    } else {
        vec![]
    };
    Upload::from_keys(device.clone(), otks, fb)
}

/// Runs `f(i)` for i in 0..n on `clients` concurrent tasks.
pub(crate) async fn parallel<F, Fut>(n: usize, clients: usize, f: F) -> keyclaim::Result<()>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = keyclaim::Result<()>> + Send,
{
    let f = Arc::new(f);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients.max(1) {
        let (f, next) = (f.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n {
                    return Ok(());
                }
                f(i).await?;
            }
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| Error::storage("bench", "join", false, e))??;
    }
    Ok(())
}

/// Fills `devices` devices with `keys` OTKs and a fallback key each.
pub(crate) async fn fill(
    store: &Arc<dyn KeyStore>,
    prefix: &str,
    devices: usize,
    keys: usize,
    clients: usize,
    progress: impl Fn() + Send + Sync + 'static,
) -> keyclaim::Result<()> {
    let store = store.clone();
    let prefix = prefix.to_owned();
    parallel(devices, clients, move |i| {
        let store = store.clone();
        let upload = device(&prefix, i).and_then(|d| upload_of(&d, "S", keys, true));
        progress();
        async move {
            store.upload(&upload?).await?;
            Ok(())
        }
    })
    .await
}

/// Operation kinds of the mixed phase.
pub(crate) const KINDS: [&str; 5] = [
    "claim",
    "bulk_claim",
    "refill",
    "fallback_rotation",
    "count_read",
];

/// What the mixed phase measured and checked.
#[derive(Debug, Default)]
pub(crate) struct MixedResult {
    pub(crate) samples: [Samples; 5],
    pub(crate) elapsed: Duration,
    pub(crate) otks_issued: u64,
    pub(crate) fallbacks_issued: u64,
    pub(crate) duplicates: u64,
    pub(crate) count_mismatches: u64,
    pub(crate) rejected_by_limit: u64,
    pub(crate) errors: u64,
}

struct Shared {
    store: Arc<dyn KeyStore>,
    expected: Vec<AtomicI64>,
    w: Workload,
    start: Instant,
    ops: AtomicU64,
    prefix: String,
}

#[derive(Default)]
struct ClientOut {
    samples: [Samples; 5],
    issued: Vec<(usize, KeyId)>,
    fallbacks: u64,
    rejected: u64,
    errors: u64,
}

/// The mixed phase over the devices `fill` created.
pub(crate) async fn mixed(
    store: Arc<dyn KeyStore>,
    prefix: &str,
    w: &Workload,
) -> keyclaim::Result<MixedResult> {
    let shared = Arc::new(Shared {
        store,
        expected: (0..w.devices)
            .map(|_| AtomicI64::new(w.keys_per_device as i64))
            .collect(),
        w: w.clone(),
        start: Instant::now(),
        ops: AtomicU64::new(0),
        prefix: prefix.to_owned(),
    });
    let tasks: Vec<_> = (0..w.clients)
        .map(|c| {
            let shared = shared.clone();
            tokio::spawn(async move { client(shared, c).await })
        })
        .collect();
    let mut result = MixedResult::default();
    let mut seen = HashSet::new();
    for t in tasks {
        let out = t
            .await
            .map_err(|e| Error::storage("bench", "join", false, e))?;
        for (s, o) in result.samples.iter_mut().zip(out.samples) {
            s.merge(o);
        }
        for k in out.issued {
            result.otks_issued += 1;
            if !seen.insert(k) {
                result.duplicates += 1;
            }
        }
        result.fallbacks_issued += out.fallbacks;
        result.rejected_by_limit += out.rejected;
        result.errors += out.errors;
    }
    result.elapsed = shared.start.elapsed();
    // Every device's count must be what its uploads minus its claims left.
    let store = shared.store.clone();
    for (i, want) in shared.expected.iter().enumerate() {
        let got = store
            .otk_counts(&device(prefix, i)?)
            .await?
            .get(&Algorithm::signed_curve25519());
        if i64::try_from(got).ok() != Some(want.load(Ordering::Relaxed)) {
            result.count_mismatches += 1;
        }
    }
    Ok(result)
}

async fn client(shared: Arc<Shared>, c: usize) -> ClientOut {
    let w = &shared.w;
    let mut rng = StdRng::seed_from_u64(0x6b65_7963 ^ c as u64);
    let mut out = ClientOut::default();
    let alg = Algorithm::signed_curve25519();
    let mut refills = 0u64;
    loop {
        let done = shared.ops.fetch_add(1, Ordering::Relaxed);
        if w.max_ops.is_some_and(|m| done >= m)
            || (w.max_ops.is_none() && shared.start.elapsed() >= w.duration)
        {
            return out;
        }
        let pick_device = |rng: &mut StdRng| -> usize {
            if w.hot_devices > 0 && rng.random_bool(0.2) {
                rng.random_range(0..w.hot_devices.min(w.devices))
            } else {
                rng.random_range(0..w.devices)
            }
        };
        let roll: u32 = rng.random_range(0..1000);
        let t0 = Instant::now();
        let (kind, result) = if roll < 550 {
            let i = pick_device(&mut rng);
            (0, claim(&shared, &mut out, &[i], &alg).await)
        } else if roll < 560 {
            let n = w.bulk_size.min(w.devices);
            let idx: Vec<usize> = rand::seq::index::sample(&mut rng, w.devices, n).into_vec();
            (1, claim(&shared, &mut out, &idx, &alg).await)
        } else if roll < 760 {
            let i = pick_device(&mut rng);
            refills += 1;
            (2, refill(&shared, i, &format!("c{c}r{refills}-")).await)
        } else if roll < 800 {
            let i = rng.random_range(0..w.devices);
            refills += 1;
            (3, rotate(&shared, i, &format!("c{c}f{refills}-")).await)
        } else {
            let i = rng.random_range(0..w.devices);
            (4, read(&shared, i).await)
        };
        match result {
            Ok(()) => out.samples[kind].record(t0.elapsed()),
            Err(Error::TooLarge { .. }) => out.rejected += 1,
            Err(_) => out.errors += 1,
        }
    }
}

async fn claim(
    shared: &Shared,
    out: &mut ClientOut,
    idx: &[usize],
    alg: &Algorithm,
) -> keyclaim::Result<()> {
    let targets = idx
        .iter()
        .map(|&i| Ok(ClaimTarget::one(device(&shared.prefix, i)?, alg.clone())))
        .collect::<keyclaim::Result<Vec<_>>>()?;
    let res = shared.store.claim(&targets).await?;
    for k in res.keys {
        if k.fallback {
            out.fallbacks += 1;
            continue;
        }
        let i = device_index(&shared.prefix, &k.device).unwrap_or(usize::MAX);
        if let Some(e) = shared.expected.get(i) {
            e.fetch_sub(1, Ordering::Relaxed);
        }
        out.issued.push((i, k.key_id));
    }
    Ok(())
}

fn device_index(prefix: &str, d: &Device) -> Option<usize> {
    d.user_id
        .as_str()
        .strip_prefix('@')?
        .strip_prefix(prefix)?
        .split(':')
        .next()?
        .parse()
        .ok()
}

async fn refill(shared: &Shared, i: usize, tag: &str) -> keyclaim::Result<()> {
    let d = device(&shared.prefix, i)?;
    let have = shared
        .store
        .otk_counts(&d)
        .await?
        .get(&Algorithm::signed_curve25519());
    let want = shared.w.keys_per_device as u64;
    if have < want {
        let n = usize::try_from(want - have).unwrap_or(0);
        shared.store.upload(&upload_of(&d, tag, n, false)?).await?;
        shared.expected[i].fetch_add(n as i64, Ordering::Relaxed);
    }
    Ok(())
}

async fn rotate(shared: &Shared, i: usize, tag: &str) -> keyclaim::Result<()> {
    let d = device(&shared.prefix, i)?;
    shared.store.upload(&upload_of(&d, tag, 0, true)?).await?;
    Ok(())
}

async fn read(shared: &Shared, i: usize) -> keyclaim::Result<()> {
    shared.store.sync_state(&device(&shared.prefix, i)?).await?;
    Ok(())
}
