//! Claim races at steady state: claimers take single keys from their
//! devices for a fixed window after a warm-up, while each device's
//! uploader keeps it supplied the way a client does (it looks at the
//! device's count, as a client does after `/sync`, and uploads up to the
//! target when the count has fallen below the refill threshold).
//!
//! Every claim is logged (the key's upload sequence number, or the claim's
//! start and end when it got no one-time key) with every upload's sequence
//! range and end, so that afterwards each empty claim is classed: **short**
//! when a key that was certainly stored during the whole claim (uploaded
//! before it began, taken only by a claim that began after it ended) was
//! there to give (R4.3), else **dry** (the uploader had fallen behind).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use keyclaim::{Algorithm, Device, KeyId, KeyJson};
use tokio::sync::{Barrier, Notify};

use super::stats::Samples;
use super::workload::{Claimer, key_json};

/// How often an uploader looks at its device's count even when no claims
/// asked it to (a client's periodic `/sync`).
const SYNC_PERIOD: Duration = Duration::from_millis(50);

/// The shape of one race.
#[derive(Clone, Debug)]
pub(crate) struct RaceSpec {
    /// Concurrent claimers; claimer `c` claims from device `c % devices`
    /// (each device has an uploader of its own).
    pub(crate) clients: usize,
    /// One-time keys of each device at the start, and what its uploader
    /// fills it up to.
    pub(crate) target: usize,
    /// Unmeasured time before the window.
    pub(crate) warmup: Duration,
    /// The measured window.
    pub(crate) window: Duration,
}

impl RaceSpec {
    /// The uploader refills when the count is below this.
    pub(crate) fn threshold(&self) -> usize {
        self.target * 4 / 5
    }

    /// Claims on one device after which its uploader looks at the count.
    fn sync_every(&self) -> u64 {
        (self.target as u64 / 10).max(1)
    }
}

/// What one run of a race measured.
#[derive(Debug, Default, Clone)]
pub(crate) struct RunResult {
    /// Claims that got a one-time key and ended inside the window.
    pub(crate) window_claims: u64,
    /// Their latencies.
    pub(crate) samples: Samples,
    /// Claims that got no one-time key while one was there to give.
    pub(crate) short: u64,
    /// Claims that got no one-time key because the device had none.
    pub(crate) dry: u64,
    /// One-time keys handed out twice.
    pub(crate) duplicates: u64,
    /// Refill uploads.
    pub(crate) refills: u64,
    /// Failed claims, count reads and uploads.
    pub(crate) errors: u64,
}

/// One device's uploader and claimers talk through this.
struct DeviceState {
    /// Claims on the device so far, with or without a one-time key.
    claimed: AtomicU64,
    /// Wakes the uploader (a claim batch, or the end).
    wake: Notify,
}

/// A claimer's log.
#[derive(Default)]
struct ClaimLog {
    /// (key sequence number, claim start in µs) of every one-time key.
    got: Vec<(u32, u32)>,
    /// (start, end) in µs of every claim without a one-time key.
    empty: Vec<(u32, u32)>,
    samples: Samples,
    window_claims: u64,
    errors: u64,
}

/// What a race's task hands back.
enum Task {
    Claimer(ClaimLog),
    Uploader(UploadLog),
}

/// An uploader's log: (end of the sequence range uploaded, upload end in
/// µs), in upload order.
#[derive(Default)]
struct UploadLog {
    batches: Vec<(u32, u32)>,
    errors: u64,
}

/// The name of the one-time key with sequence number `seq`.
fn key_name(seq: u32) -> String {
    format!("K{seq:010}")
}

fn seq_of(key: &KeyId) -> Option<u32> {
    key.name().strip_prefix('K')?.parse().ok()
}

/// One-time keys `first..first + n`, all with the JSON of `template`: a
/// homeserver parses each upload's key JSON before the store sees it, so
/// the bench parses one key's JSON per device, once, instead of each key's
/// (which on this kind of machine cost more than the store's claim).
fn keys(template: &KeyJson, first: u32, n: u32) -> keyclaim::Result<Vec<(KeyId, KeyJson)>> {
    (first..first + n)
        .map(|seq| {
            Ok((
                KeyId::parse(format!("signed_curve25519:{}", key_name(seq)))?,
                template.clone(),
            ))
        })
        .collect()
}

/// The key JSON of `device`'s race keys.
fn template(device: &Device) -> keyclaim::Result<KeyJson> {
    Ok(key_json(device, &key_name(0), false)?.1)
}

/// Fills `devices` with `spec.target` keys each (and, in a store, a
/// fallback key), then races; the devices must be fresh.
pub(crate) async fn run(
    claimer: &Claimer,
    devices: Vec<Device>,
    spec: &RaceSpec,
) -> keyclaim::Result<RunResult> {
    let target = u32::try_from(spec.target).unwrap_or(u32::MAX);
    for d in &devices {
        upload_range(claimer, d, &template(d)?, 0..target, true, |_| {}).await?;
    }
    let states: Arc<Vec<DeviceState>> = Arc::new(
        devices
            .iter()
            .map(|_| DeviceState {
                claimed: AtomicU64::new(0),
                wake: Notify::new(),
            })
            .collect(),
    );
    let devices = Arc::new(devices);
    let stop = Arc::new(AtomicBool::new(false));
    // Claimers, uploaders and the clock start together.
    let barrier = Arc::new(Barrier::new(spec.clients + devices.len() + 1));
    let start = Arc::new(OnceLock::<Instant>::new());
    let spawn = |i: usize, claims: bool| {
        let (claimer, devices, states, stop, barrier, start) = (
            claimer.clone(),
            devices.clone(),
            states.clone(),
            stop.clone(),
            barrier.clone(),
            start.clone(),
        );
        let spec = spec.clone();
        tokio::spawn(async move {
            barrier.wait().await;
            let start = *start.get_or_init(Instant::now);
            let d = i % devices.len();
            if claims {
                Task::Claimer(claim_loop(&claimer, &devices[d], &states[d], &spec, start).await)
            } else {
                Task::Uploader(
                    uploader(&claimer, &devices[d], &states[d], &stop, &spec, start).await,
                )
            }
        })
    };
    let uploaders: Vec<_> = (0..devices.len()).map(|i| spawn(i, false)).collect();
    let claimers: Vec<_> = (0..spec.clients).map(|c| spawn(c, true)).collect();
    barrier.wait().await;
    let mut logs = Vec::with_capacity(claimers.len());
    let mut result = RunResult::default();
    for t in claimers {
        match t.await {
            Ok(Task::Claimer(log)) => logs.push(log),
            _ => result.errors += 1,
        }
    }
    stop.store(true, Ordering::Release);
    for s in states.iter() {
        s.wake.notify_one();
    }
    let mut uploads = Vec::with_capacity(uploaders.len());
    for t in uploaders {
        match t.await {
            Ok(Task::Uploader(log)) => uploads.push(log),
            _ => {
                result.errors += 1;
                uploads.push(UploadLog::default());
            }
        }
    }
    // Each device: its uploads (the initial fill is sequence 0..target at
    // time 0) and its claimers' logs.
    for (i, up) in uploads.iter_mut().enumerate() {
        result.refills += up.batches.len() as u64;
        result.errors += up.errors;
        up.batches.insert(0, (target, 0));
        let mine: Vec<&ClaimLog> = logs
            .iter()
            .enumerate()
            .filter(|(c, _)| c % devices.len() == i)
            .map(|(_, l)| l)
            .collect();
        let got: Vec<(u32, u32)> = mine.iter().flat_map(|l| l.got.iter().copied()).collect();
        let empty: Vec<(u32, u32)> = mine.iter().flat_map(|l| l.empty.iter().copied()).collect();
        let classed = classify(&up.batches, &got, &empty);
        result.short += classed.short;
        result.dry += classed.dry;
        result.duplicates += classed.duplicates;
        result.errors += classed.unknown_keys;
    }
    for log in logs {
        result.samples.merge(log.samples);
        result.window_claims += log.window_claims;
        result.errors += log.errors;
    }
    Ok(result)
}

/// Microseconds since `start`.
fn micros(start: Instant, at: Instant) -> u32 {
    u32::try_from(at.saturating_duration_since(start).as_micros()).unwrap_or(u32::MAX)
}

async fn claim_loop(
    claimer: &Claimer,
    device: &Device,
    state: &DeviceState,
    spec: &RaceSpec,
    start: Instant,
) -> ClaimLog {
    let alg = Algorithm::signed_curve25519();
    let window_start = start + spec.warmup;
    let end = window_start + spec.window;
    let mut log = ClaimLog::default();
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            return log;
        }
        let claimed = claimer.claim_one(device, &alg).await;
        let t1 = Instant::now();
        let in_window = t1 >= window_start && t1 < end;
        match claimed {
            Ok(Some(key)) if !key.fallback => {
                let Some(seq) = seq_of(&key.key_id) else {
                    log.errors += 1;
                    continue;
                };
                log.got.push((seq, micros(start, t0)));
                if in_window {
                    log.samples.record(t1 - t0);
                    log.window_claims += 1;
                }
            }
            Ok(_) => log.empty.push((micros(start, t0), micros(start, t1))),
            Err(_) => log.errors += 1,
        }
        // The device's client learns of claims (a used fallback key too)
        // from its /sync.
        let n = state.claimed.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(spec.sync_every()) {
            state.wake.notify_one();
        }
        // One request ends here: let the other tasks (the uploader too)
        // run, as a server's request tasks do between requests.
        tokio::task::yield_now().await;
    }
}

async fn uploader(
    claimer: &Claimer,
    device: &Device,
    state: &DeviceState,
    stop: &AtomicBool,
    spec: &RaceSpec,
    start: Instant,
) -> UploadLog {
    let alg = Algorithm::signed_curve25519();
    let mut next = u32::try_from(spec.target).unwrap_or(u32::MAX);
    let target = spec.target as u64;
    let threshold = spec.threshold() as u64;
    let mut log = UploadLog::default();
    let template = match template(device) {
        Ok(t) => t,
        Err(_) => {
            log.errors += 1;
            return log;
        }
    };
    loop {
        // A client's /sync: after a batch of claims, or now and then.
        let _ = tokio::time::timeout(SYNC_PERIOD, state.wake.notified()).await;
        if stop.load(Ordering::Acquire) {
            return log;
        }
        let count = match claimer.count(device, &alg).await {
            Ok(n) => n,
            Err(_) => {
                log.errors += 1;
                continue;
            }
        };
        if count >= threshold {
            continue;
        }
        // Each upload is logged as it ends: its keys are there from then on.
        let missing = u32::try_from(target - count).unwrap_or(0);
        let batches = &mut log.batches;
        let uploaded = upload_range(
            claimer,
            device,
            &template,
            next..next + missing,
            false,
            |end| {
                batches.push((end, micros(start, Instant::now())));
            },
        )
        .await;
        next = log.batches.last().map_or(next, |b| b.0);
        if uploaded.is_err() {
            log.errors += 1;
        }
    }
}

/// Uploads the keys of sequence numbers `range` to `device`, in as many
/// uploads as the per-upload limit (R8.2) asks for, with `fallback` the
/// fallback key in the first (where it counts against that limit too);
/// `uploaded` is told the end of each upload's range as it succeeds. Stops
/// at the first failure.
async fn upload_range(
    claimer: &Claimer,
    device: &Device,
    template: &KeyJson,
    range: std::ops::Range<u32>,
    fallback: bool,
    mut uploaded: impl FnMut(u32),
) -> keyclaim::Result<()> {
    let limit = u32::try_from(keyclaim::Limits::default().max_keys_per_upload).unwrap_or(u32::MAX);
    let mut first = range.start;
    while first < range.end {
        let with_fallback = fallback && first == range.start;
        let n = (range.end - first).min(limit - u32::from(with_fallback));
        claimer
            .upload_keys(device, keys(template, first, n)?, with_fallback)
            .await?;
        first += n;
        uploaded(first);
    }
    Ok(())
}

/// How the claims of one device came out.
#[derive(Debug, Default, PartialEq, Eq)]
struct Classified {
    short: u64,
    dry: u64,
    duplicates: u64,
    unknown_keys: u64,
}

/// Classes one device's empty claims as short or dry (see the module docs)
/// and counts keys handed out twice. `batches`: (end of sequence range,
/// upload end) in upload order, the first being the initial fill; `got`:
/// (key sequence, claim start); `empty`: (claim start, claim end); times
/// in µs.
fn classify(batches: &[(u32, u32)], got: &[(u32, u32)], empty: &[(u32, u32)]) -> Classified {
    let mut out = Classified::default();
    let total = batches.last().map_or(0, |b| b.0) as usize;
    // When each key was taken (by the start of its claim); never: u32::MAX.
    let mut taken = vec![u32::MAX; total];
    let mut seen = vec![false; total];
    for &(seq, at) in got {
        let Some(slot) = taken.get_mut(seq as usize) else {
            out.unknown_keys += 1;
            continue;
        };
        if seen[seq as usize] {
            out.duplicates += 1;
        }
        seen[seq as usize] = true;
        *slot = (*slot).min(at);
    }
    // latest[i]: the latest take among keys 0..i.
    let mut latest = Vec::with_capacity(total + 1);
    latest.push(0u32);
    for &t in &taken {
        let last = latest.last().copied().unwrap_or(0);
        latest.push(last.max(t));
    }
    for &(t0, t1) in empty {
        // Keys uploaded (upload ended) before the claim began.
        // Upload ends only grow (a device has one uploader), so these
        // batches are a prefix.
        let before = batches.partition_point(|b| b.1 < t0 || b.1 == 0);
        let uploaded = before
            .checked_sub(1)
            .and_then(|i| batches.get(i))
            .map_or(0, |b| b.0 as usize);
        if latest[uploaded.min(total)] > t1 {
            out.short += 1;
        } else {
            out.dry += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_claims_are_short_only_when_a_stored_key_was_left() {
        // 3 keys at the start, 2 more uploaded by t=100.
        let batches = [(3, 0), (5, 100)];
        // Keys 0..3 taken by claims starting at 10, 20, 30; key 3 at 150;
        // key 4 never.
        let got = [(0, 10), (1, 20), (2, 30), (3, 150)];
        let empty = [
            // After the first three, before the upload: dry.
            (40, 50),
            // Began before the upload ended: dry (it may not have seen it).
            (90, 95),
            // After the upload, with keys 3 and 4 still there: short.
            (110, 120),
            // Key 3 taken at 150 but key 4 never: short.
            (160, 170),
        ];
        let c = classify(&batches, &got, &empty);
        assert_eq!(
            c,
            Classified {
                short: 2,
                dry: 2,
                duplicates: 0,
                unknown_keys: 0
            }
        );
    }

    #[test]
    fn a_key_given_twice_and_an_unknown_key_are_counted() {
        let c = classify(&[(2, 0)], &[(0, 1), (0, 2), (1, 3), (7, 4)], &[(5, 6)]);
        assert_eq!(c.duplicates, 1);
        assert_eq!(c.unknown_keys, 1);
        assert_eq!((c.short, c.dry), (0, 1));
    }

    #[test]
    fn a_key_taken_by_a_concurrent_claim_does_not_make_a_claim_short() {
        // One key; the claim that took it began at 10, the empty claim ran
        // from 5 to 15: the key may have been taken before it looked.
        let c = classify(&[(1, 0)], &[(0, 10)], &[(5, 15)]);
        assert_eq!((c.short, c.dry), (0, 1));
    }

    #[test]
    fn key_names_carry_their_sequence() {
        let id = KeyId::parse(format!("signed_curve25519:{}", key_name(42))).unwrap();
        assert_eq!(seq_of(&id), Some(42));
    }

    /// A race of 8 claimers on one fresh device of `store` that starts with
    /// and is topped up to `target` keys, for a window of `window_ms`.
    async fn race_one_device(
        store: &Arc<dyn keyclaim::KeyStore>,
        prefix: &str,
        target: usize,
        window_ms: u64,
    ) -> (Device, RunResult) {
        let spec = RaceSpec {
            clients: 8,
            target,
            warmup: Duration::from_millis(20),
            window: Duration::from_millis(window_ms),
        };
        let d = super::super::device(prefix, 0).unwrap();
        let r = run(&Claimer::Store(store.clone()), vec![d.clone()], &spec)
            .await
            .unwrap();
        (d, r)
    }

    /// A memory store's hot device, drained by 8 claimers much faster than
    /// its 20 keys last: its uploader keeps it supplied, so claims go on
    /// getting one-time keys long after the first 20, and none is short.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_uploader_keeps_a_drained_device_supplied() {
        let store: Arc<dyn keyclaim::KeyStore> = Arc::new(keyclaim_memory::MemoryStore::new());
        let (d, r) = race_one_device(&store, "refill-", 20, 200).await;
        assert!(r.refills > 0, "{r:?}");
        assert!(r.window_claims > 20, "{r:?}");
        assert_eq!((r.short, r.duplicates, r.errors), (0, 0, 0), "{r:?}");
        // Every key that was not handed out is still stored.
        let count = store.otk_counts(&d).await.unwrap();
        assert!(count.get(&Algorithm::signed_curve25519()) > 0);
    }

    /// A device holding more keys than one upload may carry (R8.2) is
    /// filled and topped up in several uploads, each within the limit: a
    /// store refuses a larger one whole, which would fail the race.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_device_larger_than_one_upload_is_supplied_in_several() {
        let mut limits = keyclaim::Limits::default();
        limits.max_otks_per_device_algorithm = 2500;
        let store: Arc<dyn keyclaim::KeyStore> =
            Arc::new(keyclaim_memory::MemoryStore::with_limits(limits));
        let (d, r) = race_one_device(&store, "big-", 2500, 300).await;
        assert_eq!((r.short, r.duplicates, r.errors), (0, 0, 0), "{r:?}");
        // Claimed past the first 2,500, so topped up meanwhile.
        assert!(r.window_claims > 2500, "{r:?}");
        assert!(r.refills > 0, "{r:?}");
        let count = store.otk_counts(&d).await.unwrap();
        assert!(count.get(&Algorithm::signed_curve25519()) <= 2500);
    }
}
