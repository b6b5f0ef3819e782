//! Model-based checking: random operation sequences run against the store
//! and the reference [`Model`], every answer compared.

use keyclaim::{ClaimTarget, Device, Error, KeyId, KeyJson, KeyStore, Limits, Upload, UserId};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::StoreFactory;
use crate::fixtures::*;
use crate::model::Model;

const USERS: [&str; 2] = ["@a:x", "@b:x"];
const DEVICES: [&str; 2] = ["D1", "D2"];
const ALGS: [&str; 2] = ["signed_curve25519", "alg2"];
const NAMES: [&str; 6] = ["A", "B", "C", "D", "E", "F"];

/// One generated operation.
#[derive(Clone, Debug)]
pub enum Op {
    /// Upload to (user, device): OTKs and fallback keys as
    /// (algorithm, name, content, signature) indexes.
    Upload(
        usize,
        usize,
        Vec<(usize, usize, u8, u8)>,
        Vec<(usize, usize, u8, u8)>,
    ),
    /// Claim: (user, device, algorithm, count) targets.
    Claim(Vec<(usize, usize, usize, u32)>),
    /// Read counts and unused fallback types of (user, device).
    Read(usize, usize),
    /// Delete (user, device).
    DeleteDevice(usize, usize),
    /// Delete a user.
    DeleteUser(usize),
    /// Close and reopen the store (persistent backends; a read otherwise).
    Reopen,
}

fn key() -> impl Strategy<Value = (usize, usize, u8, u8)> {
    (0..ALGS.len(), 0..NAMES.len(), 0..3u8, 0..2u8)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2usize, 0..2usize, prop::collection::vec(key(), 0..6), prop::collection::vec(key(), 0..3))
            .prop_map(|(u, d, o, f)| Op::Upload(u, d, o, f)),
        4 => prop::collection::vec((0..2usize, 0..2usize, 0..2usize, 0..7u32), 1..5).prop_map(Op::Claim),
        2 => (0..2usize, 0..2usize).prop_map(|(u, d)| Op::Read(u, d)),
        1 => (0..2usize, 0..2usize).prop_map(|(u, d)| Op::DeleteDevice(u, d)),
        1 => (0..2usize).prop_map(Op::DeleteUser),
        1 => Just(Op::Reopen),
    ]
}

fn device(u: usize, d: usize) -> Device {
    dev(USERS[u], DEVICES[d])
}

fn key_of(&(a, n, content, sig): &(usize, usize, u8, u8)) -> (KeyId, KeyJson) {
    let id = kid(&format!("{}:{}", ALGS[a], NAMES[n]));
    (
        id,
        signed(&format!("content-{content}"), &format!("sig-{sig}")),
    )
}

fn same_error_kind(a: &Error, b: &Error) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

async fn run_sequence<F: StoreFactory>(f: &F, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut limits = Limits::default();
    limits.max_otks_per_device_algorithm = 4;
    let mut model = Model::new(limits.clone());
    let mut store = Some(
        f.create(limits)
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?,
    );
    for (step, op) in ops.into_iter().enumerate() {
        let s = store
            .as_ref()
            .ok_or_else(|| TestCaseError::fail("no store"))?;
        match &op {
            Op::Upload(u, d, o, fb) => {
                let built =
                    Upload::from_keys(device(*u, *d), o.iter().map(key_of), fb.iter().map(key_of));
                let upload = match built {
                    Ok(up) => up,
                    Err(_) => continue, // R3.6 / in-request conflicts: rejected before any store
                };
                let want = model.upload(&upload);
                let got = s.upload(&upload).await;
                match (&want, &got) {
                    (Ok(w), Ok(g)) => prop_assert_eq!(w, &g.counts, "step {}: {:?}", step, op),
                    (Err(w), Err(g)) => {
                        prop_assert!(same_error_kind(w, g), "step {step}: {w} vs {g}")
                    }
                    _ => prop_assert!(false, "step {}: model {:?} store {:?}", step, want, got),
                }
            }
            Op::Claim(targets) => {
                let targets: Vec<_> = targets
                    .iter()
                    .map(|&(u, d, a, count)| ClaimTarget {
                        device: device(u, d),
                        algorithm: alg(ALGS[a]),
                        count,
                    })
                    .collect();
                let want = model
                    .claim(&targets)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let got = s
                    .claim(&targets)
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(&want, &got.keys, "step {}: {:?}", step, op);
            }
            Op::Read(u, d) => {
                let dv = device(*u, *d);
                let counts = s
                    .otk_counts(&dv)
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(model.counts(&dv), counts, "step {}", step);
                let types = s
                    .unused_fallback_types(&dv)
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(model.unused_fallback_types(&dv), types, "step {}", step);
            }
            Op::DeleteDevice(u, d) => {
                model.delete_device(&device(*u, *d));
                s.delete_device(&device(*u, *d))
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
            Op::DeleteUser(u) => {
                let user =
                    UserId::parse(USERS[*u]).map_err(|e| TestCaseError::fail(e.to_string()))?;
                model.delete_user(&user);
                s.delete_user(&user)
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
            Op::Reopen => {
                if f.capabilities().persistent {
                    let old = store
                        .take()
                        .ok_or_else(|| TestCaseError::fail("no store"))?;
                    store = Some(
                        f.reopen(old)
                            .await
                            .map_err(|e| TestCaseError::fail(e.to_string()))?,
                    );
                }
            }
        }
    }
    // Final state: every device agrees.
    let s = store
        .as_ref()
        .ok_or_else(|| TestCaseError::fail("no store"))?;
    for u in 0..USERS.len() {
        for d in 0..DEVICES.len() {
            let dv = device(u, d);
            let counts = s
                .otk_counts(&dv)
                .await
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(model.counts(&dv), counts);
        }
    }
    Ok(())
}

cases! { $ model_based;
    /// Random sequences of uploads (colliding IDs and contents), claims with
    /// counts and several targets, reads, deletions and reopens: the store
    /// answers exactly as the model at every step. 48 sequences per run by
    /// default; set `KEYCLAIM_MODEL_CASES` for more.
    pub async fn model_random_operation_sequences<F: StoreFactory>(f: &F) {
        let cases = std::env::var("KEYCLAIM_MODEL_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(48);
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        });
        let handle = tokio::runtime::Handle::current();
        let result = tokio::task::block_in_place(|| {
            runner.run(&prop::collection::vec(op(), 1..40), |ops| {
                handle.block_on(run_sequence(f, ops))
            })
        });
        if let Err(e) = result {
            panic!("model-based check failed: {e}");
        }
    }
}
