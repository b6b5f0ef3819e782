//! Model-based checking: random operation sequences run against the store
//! and the reference [`Model`], every answer and change report compared, and
//! the whole state compared at checkpoints and at the end.

mod claim_with;
mod ops;

use std::fmt::{Debug, Display};
use std::sync::Arc;

use keyclaim::transfer::DeviceSnapshot;
use keyclaim::{ApiError, ClaimOptions, Device, Error, KeyStore, KeysApi, Limits};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::StoreFactory;
use crate::model::Model;
use ops::Op;

fn fail(e: impl Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

/// Whether two errors are the same answer: the same variant and, for a
/// limit, the same limit.
fn same_error(a: &Error, b: &Error) -> bool {
    match (a, b) {
        (Error::TooLarge { kind: x, .. }, Error::TooLarge { kind: y, .. }) => x == y,
        _ => std::mem::discriminant(a) == std::mem::discriminant(b),
    }
}

/// Compares the model's answer with the store's: equal values, or errors
/// of the same kind. A store error the model does not expect (a storage
/// failure included) fails the run.
fn same<T: PartialEq + Debug>(
    step: usize,
    op: &Op,
    want: &Result<T, Error>,
    got: &Result<T, Error>,
) -> Result<(), TestCaseError> {
    match (want, got) {
        (Ok(w), Ok(g)) => prop_assert_eq!(w, g, "step {}: {:?}", step, op),
        (Err(w), Err(g)) => prop_assert!(same_error(w, g), "step {step}: {op:?}: {w} vs {g}"),
        _ => prop_assert!(false, "step {step}: {op:?}: model {want:?}, store {got:?}"),
    }
    Ok(())
}

/// The store's whole state, normalized (see [`DeviceSnapshot::normalized`]).
async fn state_of<S: KeyStore + ?Sized>(store: &S) -> Result<Vec<DeviceSnapshot>, Error> {
    let mut out = Vec::new();
    let mut after: Option<Device> = None;
    loop {
        let page = store.export_devices(after.as_ref(), 64).await?;
        let Some(last) = page.last() else {
            return Ok(out);
        };
        after = Some(last.device.clone());
        out.extend(page.iter().map(DeviceSnapshot::normalized));
    }
}

async fn compare_state<S: KeyStore + ?Sized>(
    store: &S,
    model: &Model,
    when: &str,
) -> Result<(), TestCaseError> {
    let state = state_of(store).await.map_err(fail)?;
    prop_assert_eq!(model.snapshot(), state, "whole state {}", when);
    Ok(())
}

/// Runs one operation against the store and the model and compares.
async fn step<S: KeyStore>(
    store: &Arc<S>,
    model: &mut Model,
    step: usize,
    op: &Op,
) -> Result<(), TestCaseError> {
    let s = store.as_ref();
    match op {
        Op::Upload(u, d, otks, fallbacks) => {
            // Refused before any store sees it: nothing to compare.
            let Some(upload) = ops::upload(ops::device(*u, *d), otks, fallbacks) else {
                return Ok(());
            };
            same(step, op, &model.upload(&upload), &s.upload(&upload).await)
        }
        Op::Claim(targets) => {
            let targets = ops::claim_targets_of(targets);
            same(step, op, &model.claim(&targets), &s.claim(&targets).await)
        }
        Op::ClaimOneTimeKeys(targets) => {
            let targets = ops::claim_targets_of(targets);
            let want = model.claim_one_time_keys(&targets);
            same(step, op, &want, &s.claim_one_time_keys(&targets).await)
        }
        Op::ClaimFallbackKeys(targets) => {
            let targets = ops::fallback_targets_of(targets);
            let want = model.claim_fallback_keys(&targets);
            same(step, op, &want, &s.claim_fallback_keys(&targets).await)
        }
        Op::ClaimWith {
            targets,
            always_include,
            provider,
        } => {
            let targets = claim_with::targets(targets);
            let mut options = ClaimOptions::default().always_include_fallback_keys(*always_include);
            if *provider {
                options = options.provider(Arc::new(claim_with::Provider));
            }
            let api = KeysApi::new(Arc::clone(store));
            let got = api
                .claim_with(&claim_with::body(&targets), &options)
                .await
                .map_err(|e| (e.status(), e.errcode().to_owned()));
            let want =
                claim_with::apply(model, &targets, *always_include, *provider).map_err(|e| {
                    let e = ApiError::from(e);
                    (e.status(), e.errcode().to_owned())
                });
            prop_assert_eq!(want, got, "step {}: {:?}", step, op);
            Ok(())
        }
        Op::Reset(u, d, ids) => {
            let device = ops::device(*u, *d);
            let scope = ops::reset_scope(ids.as_deref());
            let want = Ok(model.reset_one_time_keys(&device, &scope));
            same(
                step,
                op,
                &want,
                &s.reset_one_time_keys(&device, &scope).await,
            )
        }
        Op::Replace {
            user,
            previous,
            device,
            otks,
            fallbacks,
        } => {
            let Some(upload) = ops::upload(ops::device(*user, *device), otks, fallbacks) else {
                return Ok(());
            };
            let previous = previous.map(ops::device_id);
            let want = model.replace_device(previous.as_ref(), &upload);
            let got = s.replace_device(previous.as_ref(), &upload).await;
            same(step, op, &want, &got)
        }
        Op::Read(u, d) => {
            let device = ops::device(*u, *d);
            let want = model.sync_state(&device);
            let counts = s.otk_counts(&device).await.map_err(fail)?;
            prop_assert_eq!(&want.one_time_key_counts, &counts, "step {}", step);
            let types = s.unused_fallback_types(&device).await.map_err(fail)?;
            prop_assert_eq!(&want.unused_fallback_key_types, &types, "step {}", step);
            let state = s.sync_state(&device).await.map_err(fail)?;
            prop_assert_eq!(want, state, "step {}", step);
            Ok(())
        }
        Op::FallbackKeys(u, d) => {
            let device = ops::device(*u, *d);
            let want = Ok(model.fallback_keys(&device));
            same(step, op, &want, &s.fallback_keys(&device).await)
        }
        Op::CountsMany(devices) => {
            let devices: Vec<Device> = devices.iter().map(|&(u, d)| ops::device(u, d)).collect();
            let want = model.counts_many(&devices);
            same(step, op, &want, &s.counts_many(&devices).await)
        }
        Op::DeleteDevice(u, d) => {
            let device = ops::device(*u, *d);
            let want = Ok(model.delete_device(&device));
            same(step, op, &want, &s.delete_device(&device).await)
        }
        Op::DeleteUser(u) => {
            let user = ops::user(*u);
            let want = Ok(model.delete_user(&user));
            same(step, op, &want, &s.delete_user(&user).await)
        }
        Op::CompareState => compare_state(s, model, &format!("at step {step}")).await,
        // Handled by the caller, which owns the store.
        Op::Reopen => Ok(()),
    }
}

async fn run_sequence<F: StoreFactory>(
    f: &F,
    limits: Limits,
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let mut model = Model::new(limits.clone());
    let mut store = Arc::new(f.create(limits).await.map_err(fail)?);
    for (i, op) in ops.iter().enumerate() {
        if matches!(op, Op::Reopen) && f.capabilities().persistent {
            let Ok(old) = Arc::try_unwrap(store) else {
                return Err(fail("the store is still shared at a reopen"));
            };
            store = Arc::new(f.reopen(old).await.map_err(fail)?);
        }
        step(&store, &mut model, i, op).await?;
    }
    compare_state(store.as_ref(), &model, "at the end").await
}

cases! { $ model_based;
    /// Random sequences of uploads (colliding IDs and contents), claims with
    /// counts and several targets, split claims (R12.1, R12.2) with random
    /// `mark_used` flags, claims with options through the facade (R12.4),
    /// key resets (R13.1), device replacements (R14.1), fallback key reads
    /// (R15.1), bulk counts (R16.1), reads, deletions and reopens, with the
    /// stored-key cap per (device, algorithm) or per device (R8.4): the
    /// store answers exactly as the model at every step, reports the same
    /// changed devices (R11.1), and holds the same whole state at
    /// checkpoints and at the end. 48 sequences per run by default; set
    /// `KEYCLAIM_MODEL_CASES` for more.
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
            runner.run(&ops::run(), |(limits, ops)| {
                handle.block_on(run_sequence(f, limits, ops))
            })
        });
        if let Err(e) = result {
            panic!("model-based check failed: {e}");
        }
    }
}
