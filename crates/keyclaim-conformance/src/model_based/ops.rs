//! The generated operations of the model-based case and their small domains:
//! 2 users with 2 devices each (and a third user and device nobody uploads
//! to, for reads, resets and replacements of unknown devices), 2 algorithms
//! (and a third nobody uploads), 6 key names (and a seventh never uploaded),
//! 3 contents and 2 signatures, so that retries, conflicts, remembered issued
//! keys, fallback replacement, the per-device caps and every path of the
//! split claims happen within a few operations.

use std::collections::BTreeSet;

use keyclaim::{
    ClaimTarget, Device, DeviceId, FallbackTarget, KeyId, KeyJson, Limits, OtkCap, ResetScope,
    Upload, UserId,
};
use proptest::prelude::*;

use crate::fixtures::*;

const USERS: [&str; 3] = ["@a:x", "@b:x", "@nobody:x"];
const DEVICES: [&str; 3] = ["D1", "D2", "D9"];
const ALGS: [&str; 3] = ["signed_curve25519", "alg2", "alg9"];
const NAMES: [&str; 7] = ["A", "B", "C", "D", "E", "F", "Z"];

/// How many of the users, devices, algorithms and names uploads use; the
/// rest are never stored.
const KNOWN: usize = 2;
const KNOWN_NAMES: usize = 6;

/// A key in an upload: (algorithm, name, content, signature) indexes.
pub(super) type KeySpec = (usize, usize, u8, u8);

/// One generated operation. Indexes pick from the small domains above.
#[derive(Clone, Debug)]
pub(super) enum Op {
    /// Upload to (user, device): OTKs and fallback keys.
    Upload(usize, usize, Vec<KeySpec>, Vec<KeySpec>),
    /// One-step claim: (user, device, algorithm, count) targets.
    Claim(Vec<(usize, usize, usize, u32)>),
    /// The one-time step of a split claim (R12.1): targets as for `Claim`.
    ClaimOneTimeKeys(Vec<(usize, usize, usize, u32)>),
    /// The fallback step of a split claim (R12.2): (user, device,
    /// algorithm, mark_used) targets.
    ClaimFallbackKeys(Vec<(usize, usize, usize, bool)>),
    /// `KeysApi::claim_with` (R12.4): one algorithm per (user, device), with
    /// `always_include_fallback_keys` and an application-service provider
    /// switched on or off.
    ClaimWith {
        /// (user, device, algorithm) targets; a repeated device keeps the last.
        targets: Vec<(usize, usize, usize)>,
        /// `always_include_fallback_keys`.
        always_include: bool,
        /// Whether the test provider is asked.
        provider: bool,
    },
    /// Key reset of (user, device) (R13.1): all keys, or the listed
    /// (algorithm, name) key IDs, stored or not.
    Reset(usize, usize, Option<Vec<(usize, usize)>>),
    /// Dehydrated-device replacement (R14.1) for a user: the previous device
    /// (none, or an index, which may be the new device itself or one never
    /// used), the new device, and its upload.
    Replace {
        /// User index.
        user: usize,
        /// Previous device index, if any.
        previous: Option<usize>,
        /// New device index.
        device: usize,
        /// OTKs.
        otks: Vec<KeySpec>,
        /// Fallback keys.
        fallbacks: Vec<KeySpec>,
    },
    /// Read counts and unused fallback types of (user, device).
    Read(usize, usize),
    /// Read the fallback keys of (user, device) (R15.1).
    FallbackKeys(usize, usize),
    /// Sync state of many (user, device)s at once (R16.1), repeats and
    /// unknown devices included.
    CountsMany(Vec<(usize, usize)>),
    /// Delete (user, device).
    DeleteDevice(usize, usize),
    /// Delete a user.
    DeleteUser(usize),
    /// Close and reopen the store (persistent backends; nothing otherwise).
    Reopen,
    /// Compare the store's whole state with the model's now.
    CompareState,
}

fn key() -> impl Strategy<Value = KeySpec> {
    (0..KNOWN, 0..KNOWN_NAMES, 0..3u8, 0..2u8)
}

fn keys() -> impl Strategy<Value = (Vec<KeySpec>, Vec<KeySpec>)> {
    (
        prop::collection::vec(key(), 0..6),
        prop::collection::vec(key(), 0..3),
    )
}

fn claim_targets() -> impl Strategy<Value = Vec<(usize, usize, usize, u32)>> {
    // Up to 5 targets against a limit of 4 (R8.2), counts 0 to 6 against a
    // clamp of 5 (R8.3).
    prop::collection::vec((0..KNOWN, 0..KNOWN, 0..KNOWN, 0..7u32), 1..6)
}

fn op() -> impl Strategy<Value = Op> {
    let user = 0..USERS.len();
    let dev = 0..DEVICES.len();
    prop_oneof![
        4 => ((0..KNOWN), (0..KNOWN), keys()).prop_map(|(u, d, (o, f))| Op::Upload(u, d, o, f)),
        3 => claim_targets().prop_map(Op::Claim),
        2 => claim_targets().prop_map(Op::ClaimOneTimeKeys),
        2 => prop::collection::vec((0..KNOWN, 0..KNOWN, 0..KNOWN, any::<bool>()), 1..5)
            .prop_map(Op::ClaimFallbackKeys),
        2 => (
            prop::collection::vec((user.clone(), dev.clone(), 0..ALGS.len()), 1..5),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(targets, always_include, provider)| Op::ClaimWith {
                targets,
                always_include,
                provider,
            }),
        2 => (
            user.clone(),
            dev.clone(),
            prop::option::weighted(
                0.7,
                prop::collection::vec((0..ALGS.len(), 0..NAMES.len()), 0..5),
            ),
        )
            .prop_map(|(u, d, ids)| Op::Reset(u, d, ids)),
        2 => (0..KNOWN, 0..4u8, 0..KNOWN, keys()).prop_map(
            |(user, pick, device, (otks, fallbacks))| Op::Replace {
                user,
                // None, the new device itself, the user's other device, or
                // one never used, alike often.
                previous: match pick {
                    0 => None,
                    1 => Some(device),
                    2 => Some(KNOWN - 1 - device),
                    _ => Some(DEVICES.len() - 1),
                },
                device,
                otks,
                fallbacks,
            }
        ),
        1 => (user.clone(), dev.clone()).prop_map(|(u, d)| Op::Read(u, d)),
        1 => (user.clone(), dev.clone()).prop_map(|(u, d)| Op::FallbackKeys(u, d)),
        1 => prop::collection::vec((user, dev), 0..9).prop_map(Op::CountsMany),
        1 => (0..KNOWN, 0..KNOWN).prop_map(|(u, d)| Op::DeleteDevice(u, d)),
        1 => (0..KNOWN).prop_map(Op::DeleteUser),
        1 => Just(Op::Reopen),
        1 => Just(Op::CompareState),
    ]
}

/// The limits of one run: small, so that they are reached. The stored-key
/// cap counts per (device, algorithm) in two runs of three and per device
/// (R8.4) in the third.
fn limits() -> impl Strategy<Value = Limits> {
    (0..3u8).prop_map(|pick| {
        let mut limits = Limits::default();
        if pick == 2 {
            limits.otk_cap = OtkCap::PerDevice;
            limits.max_otks_per_device_algorithm = 5;
        } else {
            limits.max_otks_per_device_algorithm = 4;
        }
        limits.max_claim_targets = 4;
        limits.max_counts_devices = 6;
        limits
    })
}

/// One run: its limits and up to 39 operations.
pub(super) fn run() -> impl Strategy<Value = (Limits, Vec<Op>)> {
    (limits(), prop::collection::vec(op(), 1..40))
}

/// The device of (user, device) indexes.
pub(super) fn device(u: usize, d: usize) -> Device {
    dev(USERS[u], DEVICES[d])
}

/// The user of an index.
pub(super) fn user(u: usize) -> UserId {
    UserId::parse(USERS[u]).expect("valid fixture user")
}

/// The device ID of an index.
pub(super) fn device_id(d: usize) -> DeviceId {
    DeviceId::parse(DEVICES[d]).expect("valid fixture device ID")
}

/// The algorithm of an index.
pub(super) fn algorithm(a: usize) -> keyclaim::Algorithm {
    alg(ALGS[a])
}

/// The key ID of (algorithm, name) indexes.
pub(super) fn key_id(a: usize, n: usize) -> KeyId {
    kid(&format!("{}:{}", ALGS[a], NAMES[n]))
}

fn key_of(&(a, n, content, sig): &KeySpec) -> (KeyId, KeyJson) {
    (
        key_id(a, n),
        signed(&format!("content-{content}"), &format!("sig-{sig}")),
    )
}

/// The upload of key specs for a device; `None` when it is refused before
/// any store sees it (R3.6, one key ID twice with different contents).
pub(super) fn upload(device: Device, otks: &[KeySpec], fallbacks: &[KeySpec]) -> Option<Upload> {
    Upload::from_keys(
        device,
        otks.iter().map(key_of),
        fallbacks.iter().map(key_of),
    )
    .ok()
}

/// Claim targets from indexes.
pub(super) fn claim_targets_of(targets: &[(usize, usize, usize, u32)]) -> Vec<ClaimTarget> {
    targets
        .iter()
        .map(|&(u, d, a, count)| ClaimTarget {
            device: device(u, d),
            algorithm: algorithm(a),
            count,
        })
        .collect()
}

/// Fallback targets from indexes.
pub(super) fn fallback_targets_of(targets: &[(usize, usize, usize, bool)]) -> Vec<FallbackTarget> {
    targets
        .iter()
        .map(|&(u, d, a, mark_used)| FallbackTarget {
            device: device(u, d),
            algorithm: algorithm(a),
            mark_used,
        })
        .collect()
}

/// The reset scope of an operation: all, or the listed key IDs.
pub(super) fn reset_scope(ids: Option<&[(usize, usize)]>) -> ResetScope {
    match ids {
        None => ResetScope::All,
        Some(ids) => ResetScope::KeyIds(
            ids.iter()
                .map(|&(a, n)| key_id(a, n))
                .collect::<BTreeSet<_>>(),
        ),
    }
}
