//! The operations of contract sections 12 to 16 and R8.4 against the
//! reference implementation (`keyclaim-memory`): the same seeded random
//! sequence runs on both stores and every answer and, after every step, the
//! whole exported state must be equal.
//!
//! The sequence is made to reach what redb's queue layout (positions
//! `first..head..end` per device and algorithm) has to get right: key
//! resets that remove keys from the middle, the front and the end of a
//! queue and keys that were issued, re-uploads of reset, remembered and
//! forgotten keys, pruning of forgotten issued keys (a small remembered
//! limit), replacements of a device by itself and by another, and the
//! per-device cap (R8.4).

use keyclaim::transfer::DeviceSnapshot;
use keyclaim::{
    ClaimTarget, Device, FallbackTarget, KeyId, KeyJson, KeyStore, Limits, OtkCap, ResetScope,
    Upload,
};
use keyclaim_conformance::fixtures::{alg, dev, kid, signed, signed_fallback};
use keyclaim_memory::MemoryStore;
use keyclaim_redb::{RedbDurability, RedbOptions, RedbStore};

use crate::rt;

const ALGS: [&str; 2] = ["signed_curve25519", "other_alg"];
/// Key names per algorithm: few enough that names come back often.
const NAMES: u64 = 40;
const STEPS: usize = 2500;

/// splitmix64, seeded per run: the same sequence for both stores.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    fn algorithm(&mut self) -> &'static str {
        ALGS[self.below(ALGS.len() as u64) as usize]
    }
}

fn devices() -> Vec<Device> {
    vec![
        dev("@alice:example.org", "A1"),
        dev("@alice:example.org", "A2"),
        dev("@bob:example.org", "B1"),
    ]
}

/// A key ID of the pool.
fn key_id(rng: &mut Rng) -> KeyId {
    let a = rng.algorithm();
    kid(&format!("{a}:K{:03}", rng.below(NAMES)))
}

/// Key JSON; now and then a second content for the same key ID (R3.2
/// conflicts, R3.4 issued keys with new content).
fn key_json(id: &KeyId, rng: &mut Rng) -> KeyJson {
    let sig = if rng.below(8) == 0 { "other" } else { "sig" };
    signed(&format!("k-{id}"), sig)
}

fn random_upload(rng: &mut Rng, device: &Device) -> Upload {
    let mut upload = Upload::new(device.clone());
    for _ in 0..1 + rng.below(8) {
        let id = key_id(rng);
        let json = key_json(&id, rng);
        // A key ID twice in one upload is a request error; leave it out.
        let _ = upload.add_one_time_key(id, json);
    }
    if rng.below(4) == 0 {
        let a = rng.algorithm();
        let id = kid(&format!("{a}:F{}", rng.below(3)));
        let json = signed_fallback(&format!("f-{id}"), "sig");
        let _ = upload.add_fallback_key(id, json);
    }
    upload
}

/// Exported state, both stores alike.
async fn state<S: KeyStore>(store: &S) -> Vec<DeviceSnapshot> {
    store.export_devices(None, usize::MAX).await.unwrap()
}

/// Runs one step on a store; its answer as text (errors included, which
/// come from core's rules on both stores).
async fn step<S: KeyStore>(store: &S, op: &Step) -> String {
    match op {
        Step::Upload(upload) => format!("{:?}", store.upload(upload).await),
        Step::Claim(targets) => format!("{:?}", store.claim(targets).await),
        Step::ClaimOneTime(targets) => format!("{:?}", store.claim_one_time_keys(targets).await),
        Step::ClaimFallback(targets) => {
            format!("{:?}", store.claim_fallback_keys(targets).await)
        }
        Step::Reset(device, scope) => {
            format!("{:?}", store.reset_one_time_keys(device, scope).await)
        }
        Step::Replace(previous, upload) => {
            let previous = previous.as_ref().map(|d| &d.device_id);
            format!("{:?}", store.replace_device(previous, upload).await)
        }
        Step::Read(devices) => {
            let mut out = format!("{:?}", store.counts_many(devices).await);
            for device in devices {
                out += &format!("{:?}", store.fallback_keys(device).await);
            }
            out
        }
    }
}

#[derive(Debug)]
enum Step {
    Upload(Upload),
    Claim(Vec<ClaimTarget>),
    ClaimOneTime(Vec<ClaimTarget>),
    ClaimFallback(Vec<FallbackTarget>),
    Reset(Device, ResetScope),
    Replace(Option<Device>, Upload),
    Read(Vec<Device>),
}

fn random_step(rng: &mut Rng) -> Step {
    let devices = devices();
    let device = rng.pick(&devices).clone();
    let claim_targets = |rng: &mut Rng| -> Vec<ClaimTarget> {
        (0..1 + rng.below(3))
            .map(|_| ClaimTarget {
                device: rng.pick(&devices).clone(),
                algorithm: alg(rng.algorithm()),
                count: 1 + rng.below(6) as u32,
            })
            .collect()
    };
    // Replacements are rare: a queue must live long enough for its
    // forgotten issued keys to be pruned (more than 64 of them).
    match rng.below(100) {
        0..=39 => Step::Upload(random_upload(rng, &device)),
        40..=59 => Step::Claim(claim_targets(rng)),
        60..=69 => Step::ClaimOneTime(claim_targets(rng)),
        70..=74 => Step::ClaimFallback(
            (0..1 + rng.below(3))
                .map(|_| FallbackTarget {
                    device: rng.pick(&devices).clone(),
                    algorithm: alg(rng.algorithm()),
                    mark_used: rng.below(2) == 0,
                })
                .collect(),
        ),
        75..=92 => {
            let scope = if rng.below(5) == 0 {
                ResetScope::All
            } else {
                ResetScope::KeyIds((0..1 + rng.below(6)).map(|_| key_id(rng)).collect())
            };
            Step::Reset(device, scope)
        }
        93 => {
            // A previous device of the same user (or none, or itself).
            let same_user: Vec<Device> = devices
                .iter()
                .filter(|d| d.user_id == device.user_id)
                .cloned()
                .collect();
            let previous = match rng.below(3) {
                0 => None,
                _ => Some(rng.pick(&same_user).clone()),
            };
            Step::Replace(previous, random_upload(rng, &device))
        }
        _ => Step::Read(devices.clone()),
    }
}

fn run(limits: Limits, seed: u64) {
    rt().block_on(async {
        let dir = keyclaim_testing::temp_dir();
        let redb = RedbStore::open_with(
            dir.path().join("ref.redb"),
            RedbOptions::new()
                .limits(limits.clone())
                .durability(RedbDurability::relaxed()),
        )
        .await
        .unwrap();
        let memory = MemoryStore::with_limits(limits);
        let mut rng = Rng(seed);
        let mut resets_that_removed = 0;
        let mut before = Vec::new();
        for i in 0..STEPS {
            let op = random_step(&mut rng);
            let want = step(&memory, &op).await;
            let got = step(&redb, &op).await;
            assert_eq!(got, want, "seed {seed}, step {i}: {op:?}");
            let after = state(&memory).await;
            assert_eq!(
                state(&redb).await,
                after,
                "seed {seed}, step {i}: state after {op:?}"
            );
            if matches!(op, Step::Reset(..)) && after != before {
                resets_that_removed += 1;
            }
            before = after;
        }
        // The sequence did what it is for.
        assert!(
            resets_that_removed > 50,
            "only {resets_that_removed} resets removed keys"
        );
        redb.close().await.unwrap();
    });
}

/// R8.1 per (device, algorithm), with pruning of forgotten issued keys.
#[test]
fn new_operations_match_the_reference_store() {
    let mut limits = Limits::default();
    limits.max_otks_per_device_algorithm = 24;
    limits.remembered_issued_keys = 3;
    run(limits, 0x5EED_0001);
}

/// R8.4: the cap counts every algorithm of the device.
#[test]
fn new_operations_match_the_reference_store_with_a_per_device_cap() {
    let mut limits = Limits::default();
    limits.max_otks_per_device_algorithm = 12;
    limits.otk_cap = OtkCap::PerDevice;
    limits.remembered_issued_keys = 3;
    run(limits, 0x5EED_0002);
}
