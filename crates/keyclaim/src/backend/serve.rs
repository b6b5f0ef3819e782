//! The one [`KeyStore`] implementation: every [`Backend`] is served through
//! it, so that limits, clamping, spans and change reports are applied once.

use std::borrow::Cow;
use std::collections::BTreeMap;

use async_trait::async_trait;
use tokio::sync::broadcast;
use tracing::Instrument as _;

use super::Backend;
use crate::error::Result;
use crate::ids::{Algorithm, Device, DeviceId, UserId};
use crate::limits::Limits;
use crate::store::KeyStore;
use crate::types::{
    Changes, ClaimOutcome, ClaimTarget, DeviceSnapshot, FallbackTarget, OneTimeClaimOutcome,
    OtkCounts, ResetScope, StoredFallback, SyncState, Upload, UploadOutcome,
};

/// Reports the devices an operation may have changed if its future is
/// dropped before it answered: the backend may have committed it all the
/// same (a writer thread finishing the work), and a change must never go
/// unreported (R11.1). A spurious report only wakes a `/sync` that then
/// finds nothing new.
struct ReportIfDropped<'a, P: Fn() -> Changes> {
    core: &'a super::StoreCore,
    possible: Option<P>,
}

impl<P: Fn() -> Changes> Drop for ReportIfDropped<'_, P> {
    fn drop(&mut self) {
        if let Some(possible) = self.possible.take() {
            self.core.notifier().notify(&possible());
        }
    }
}

/// Runs a mutating operation in its span and reports its changes (R11.1):
/// those it answers, or, when the caller drops the future first, every
/// device it may have changed.
async fn mutate<B, T, F, P>(
    backend: &B,
    span: tracing::Span,
    op: F,
    changes: fn(&T) -> &Changes,
    possible: P,
) -> Result<T>
where
    B: Backend + ?Sized,
    F: std::future::Future<Output = Result<T>>,
    P: Fn() -> Changes,
{
    let mut guard = ReportIfDropped {
        core: backend.core(),
        possible: Some(possible),
    };
    let out = op.instrument(span).await;
    guard.possible = None;
    let out = out?;
    backend.core().notifier().notify(changes(&out));
    Ok(out)
}

/// The targets with their counts clamped (R8.3), those with a count of 0
/// left out; borrowed when nothing changes.
fn clamp<'a>(limits: &Limits, targets: &'a [ClaimTarget]) -> Cow<'a, [ClaimTarget]> {
    let fits = |t: &ClaimTarget| t.count > 0 && limits.clamp_count(t.count) == t.count;
    if targets.iter().all(fits) {
        return Cow::Borrowed(targets);
    }
    Cow::Owned(
        targets
            .iter()
            .filter(|t| limits.clamp_count(t.count) > 0)
            .map(|t| ClaimTarget {
                count: limits.clamp_count(t.count),
                ..t.clone()
            })
            .collect(),
    )
}

/// A claim of one-time keys as core serves it: the number of targets checked
/// (R8.2), counts clamped and zero counts left out (R8.3), then the backend's
/// one-step claim (`fall_back`, section 4) or its one-time step (R12.1), with
/// its changes reported (R11.1). Answers the targets as the backend saw them
/// with its outcome, or `None` when no target was left to claim for.
async fn serve_claim<'t, B: Backend + ?Sized>(
    backend: &B,
    span: tracing::Span,
    targets: &'t [ClaimTarget],
    fall_back: bool,
) -> Result<Option<(Cow<'t, [ClaimTarget]>, ClaimOutcome)>> {
    let limits = backend.core().limits();
    limits.check_claim(targets)?;
    let targets = clamp(limits, targets);
    if targets.is_empty() {
        return Ok(None);
    }
    let possible = || Changes::from_devices(targets.iter().map(|t| t.device.clone()));
    let op = if fall_back {
        Backend::claim(backend, &targets)
    } else {
        Backend::claim_one_time_keys(backend, &targets)
    };
    let outcome = mutate(backend, span, op, |o: &ClaimOutcome| &o.changes, possible).await?;
    Ok(Some((targets, outcome)))
}

#[async_trait]
impl<B: Backend> KeyStore for B {
    fn backend_name(&self) -> &'static str {
        self.name()
    }

    fn limits(&self) -> &Limits {
        self.core().limits()
    }

    fn subscribe(&self) -> broadcast::Receiver<Changes> {
        self.core().notifier().subscribe()
    }

    async fn upload(&self, upload: &Upload) -> Result<UploadOutcome> {
        let span = tracing::debug_span!(
            "keyclaim.upload",
            backend = self.name(),
            device = %upload.device(),
            otks = upload.one_time_keys().len(),
            fallbacks = upload.fallback_keys().len(),
        );
        self.core().limits().check_upload(upload)?;
        let possible = || Changes::from_devices([upload.device().clone()]);
        mutate(
            self,
            span,
            Backend::upload(self, upload),
            |o: &UploadOutcome| &o.changes,
            possible,
        )
        .await
    }

    async fn claim(&self, targets: &[ClaimTarget]) -> Result<ClaimOutcome> {
        let span = tracing::debug_span!(
            "keyclaim.claim",
            backend = self.name(),
            targets = targets.len()
        );
        Ok(serve_claim(self, span, targets, true)
            .await?
            .map(|(_, outcome)| outcome)
            .unwrap_or_default())
    }

    async fn otk_counts(&self, device: &Device) -> Result<OtkCounts> {
        let span = tracing::trace_span!("keyclaim.otk_counts", backend = self.name(), %device);
        Ok(Backend::sync_state(self, device)
            .instrument(span)
            .await?
            .one_time_key_counts)
    }

    async fn unused_fallback_types(&self, device: &Device) -> Result<Vec<Algorithm>> {
        let span =
            tracing::trace_span!("keyclaim.unused_fallback_types", backend = self.name(), %device);
        Ok(Backend::sync_state(self, device)
            .instrument(span)
            .await?
            .unused_fallback_key_types)
    }

    async fn sync_state(&self, device: &Device) -> Result<SyncState> {
        let span = tracing::trace_span!("keyclaim.sync_state", backend = self.name(), %device);
        Backend::sync_state(self, device).instrument(span).await
    }

    async fn delete_device(&self, device: &Device) -> Result<Changes> {
        let span = tracing::debug_span!("keyclaim.delete_device", backend = self.name(), %device);
        let possible = || Changes::from_devices([device.clone()]);
        mutate(
            self,
            span,
            Backend::delete_device(self, device),
            |c: &Changes| c,
            possible,
        )
        .await
    }

    async fn delete_user(&self, user: &UserId) -> Result<Changes> {
        let span = tracing::debug_span!("keyclaim.delete_user", backend = self.name(), %user);
        // Which devices a user had is known only to the storage: a deletion
        // abandoned by its caller is not reported.
        mutate(
            self,
            span,
            Backend::delete_user(self, user),
            |c: &Changes| c,
            Changes::none,
        )
        .await
    }

    async fn export_devices(
        &self,
        after: Option<&Device>,
        limit: usize,
    ) -> Result<Vec<DeviceSnapshot>> {
        let span = tracing::debug_span!("keyclaim.export_devices", backend = self.name(), limit);
        Backend::export_devices(self, after, limit)
            .instrument(span)
            .await
    }

    async fn import_device(&self, snapshot: &DeviceSnapshot) -> Result<Changes> {
        let span = tracing::debug_span!(
            "keyclaim.import_device",
            backend = self.name(),
            device = %snapshot.device,
            otks = snapshot.one_time_keys.len(),
        );
        let possible = || Changes::from_devices([snapshot.device.clone()]);
        mutate(
            self,
            span,
            Backend::import_device(self, snapshot),
            |c: &Changes| c,
            possible,
        )
        .await
    }

    async fn claim_one_time_keys(&self, targets: &[ClaimTarget]) -> Result<OneTimeClaimOutcome> {
        let span = tracing::debug_span!(
            "keyclaim.claim_one_time_keys",
            backend = self.name(),
            targets = targets.len()
        );
        Ok(serve_claim(self, span, targets, false)
            .await?
            .map(|(targets, outcome)| OneTimeClaimOutcome::from_claim(&targets, outcome))
            .unwrap_or_default())
    }

    async fn claim_fallback_keys(&self, targets: &[FallbackTarget]) -> Result<ClaimOutcome> {
        let span = tracing::debug_span!(
            "keyclaim.claim_fallback_keys",
            backend = self.name(),
            targets = targets.len()
        );
        self.core().limits().check_claim_targets(targets.len())?;
        if targets.is_empty() {
            return Ok(ClaimOutcome::default());
        }
        let possible = || {
            Changes::from_devices(
                targets
                    .iter()
                    .filter(|t| t.mark_used)
                    .map(|t| t.device.clone()),
            )
        };
        mutate(
            self,
            span,
            Backend::claim_fallback_keys(self, targets),
            |o: &ClaimOutcome| &o.changes,
            possible,
        )
        .await
    }

    async fn reset_one_time_keys(
        &self,
        device: &Device,
        scope: &ResetScope,
    ) -> Result<UploadOutcome> {
        let span = tracing::debug_span!(
            "keyclaim.reset_one_time_keys",
            backend = self.name(),
            %device,
            all = matches!(scope, ResetScope::All),
        );
        if scope.is_empty() {
            let state = Backend::sync_state(self, device).instrument(span).await?;
            return Ok(UploadOutcome {
                counts: state.one_time_key_counts,
                changes: Changes::none(),
            });
        }
        let possible = || Changes::from_devices([device.clone()]);
        mutate(
            self,
            span,
            Backend::reset_one_time_keys(self, device, scope),
            |o: &UploadOutcome| &o.changes,
            possible,
        )
        .await
    }

    async fn replace_device(
        &self,
        previous: Option<&DeviceId>,
        upload: &Upload,
    ) -> Result<UploadOutcome> {
        let span = tracing::debug_span!(
            "keyclaim.replace_device",
            backend = self.name(),
            device = %upload.device(),
            previous = previous.map(DeviceId::as_str),
            otks = upload.one_time_keys().len(),
            fallbacks = upload.fallback_keys().len(),
        );
        self.core().limits().check_upload(upload)?;
        let possible = || {
            let user = &upload.device().user_id;
            Changes::from_devices(
                previous
                    .map(|p| Device::new(user.clone(), p.clone()))
                    .into_iter()
                    .chain([upload.device().clone()]),
            )
        };
        mutate(
            self,
            span,
            Backend::replace_device(self, previous, upload),
            |o: &UploadOutcome| &o.changes,
            possible,
        )
        .await
    }

    async fn fallback_keys(&self, device: &Device) -> Result<BTreeMap<Algorithm, StoredFallback>> {
        let span = tracing::trace_span!("keyclaim.fallback_keys", backend = self.name(), %device);
        Backend::fallback_keys(self, device).instrument(span).await
    }

    async fn counts_many(&self, devices: &[Device]) -> Result<Vec<SyncState>> {
        let span = tracing::debug_span!(
            "keyclaim.counts_many",
            backend = self.name(),
            devices = devices.len()
        );
        self.core().limits().check_counts_many(devices.len())?;
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let states = Backend::counts_many(self, devices).instrument(span).await?;
        if states.len() != devices.len() {
            return Err(crate::Error::corrupt(
                "counts_many answered another number of devices",
            ));
        }
        Ok(states)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::backend::StoreCore;
    use crate::ids::KeyId;
    use crate::key_json::KeyJson;
    use crate::transfer::DeviceSnapshot;

    /// A backend that records what core hands it and answers with every
    /// target's device as changed; `pending` makes its claims never finish.
    #[derive(Debug)]
    struct Recorder {
        core: StoreCore,
        claims: Mutex<Vec<Vec<ClaimTarget>>>,
        uploads: AtomicUsize,
        pending: bool,
    }

    impl Recorder {
        fn new(limits: Limits, pending: bool) -> Self {
            Self {
                core: StoreCore::new(limits),
                claims: Mutex::new(Vec::new()),
                uploads: AtomicUsize::new(0),
                pending,
            }
        }
    }

    #[async_trait]
    impl Backend for Recorder {
        fn name(&self) -> &'static str {
            "recorder"
        }
        fn core(&self) -> &StoreCore {
            &self.core
        }
        async fn upload(&self, upload: &Upload) -> Result<UploadOutcome> {
            self.uploads.fetch_add(1, Ordering::SeqCst);
            Ok(UploadOutcome {
                counts: OtkCounts::default(),
                changes: Changes::from_devices([upload.device().clone()]),
            })
        }
        async fn claim(&self, targets: &[ClaimTarget]) -> Result<ClaimOutcome> {
            self.claims.lock().unwrap().push(targets.to_vec());
            if self.pending {
                std::future::pending::<()>().await;
            }
            Ok(ClaimOutcome {
                keys: Vec::new(),
                changes: Changes::from_devices(targets.iter().map(|t| t.device.clone())),
            })
        }
        async fn sync_state(&self, _: &Device) -> Result<SyncState> {
            Ok(SyncState::default())
        }
        async fn delete_device(&self, _: &Device) -> Result<Changes> {
            Ok(Changes::none())
        }
        async fn delete_user(&self, _: &UserId) -> Result<Changes> {
            Ok(Changes::none())
        }
        async fn export_devices(
            &self,
            _: Option<&Device>,
            _: usize,
        ) -> Result<Vec<DeviceSnapshot>> {
            Ok(Vec::new())
        }
        async fn import_device(&self, _: &DeviceSnapshot) -> Result<Changes> {
            Ok(Changes::none())
        }
        async fn claim_one_time_keys(&self, targets: &[ClaimTarget]) -> Result<ClaimOutcome> {
            Backend::claim(self, targets).await
        }
        async fn claim_fallback_keys(&self, _: &[FallbackTarget]) -> Result<ClaimOutcome> {
            Ok(ClaimOutcome::default())
        }
        async fn reset_one_time_keys(&self, _: &Device, _: &ResetScope) -> Result<UploadOutcome> {
            Ok(UploadOutcome::default())
        }
        async fn replace_device(
            &self,
            _: Option<&DeviceId>,
            upload: &Upload,
        ) -> Result<UploadOutcome> {
            Backend::upload(self, upload).await
        }
        async fn fallback_keys(&self, _: &Device) -> Result<BTreeMap<Algorithm, StoredFallback>> {
            Ok(BTreeMap::new())
        }
        async fn counts_many(&self, devices: &[Device]) -> Result<Vec<SyncState>> {
            Ok(vec![SyncState::default(); devices.len()])
        }
    }

    fn device(d: &str) -> Device {
        Device::parse("@u:x", d).unwrap()
    }

    fn target(d: &str, count: u32) -> ClaimTarget {
        ClaimTarget {
            count,
            ..ClaimTarget::one(device(d), Algorithm::signed_curve25519())
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// R8.3 and R8.2 are applied by core, once, before the backend sees a
    /// claim: counts clamped, zero counts dropped, too many targets refused.
    #[test]
    fn r8_3_core_clamps_and_drops_zero_counts_before_the_backend() {
        let limits = Limits {
            max_claim_targets: 3,
            ..Limits::default()
        };
        let store = Recorder::new(limits, false);
        runtime().block_on(async {
            KeyStore::claim(&store, &[target("A", 9), target("B", 0), target("C", 2)])
                .await
                .unwrap();
            let err = KeyStore::claim(&store, &vec![target("A", 1); 4])
                .await
                .unwrap_err();
            assert!(matches!(err, crate::Error::TooLarge { .. }), "{err:?}");
            // Nothing to claim: the backend is not called at all.
            KeyStore::claim(&store, &[target("B", 0)]).await.unwrap();
        });
        let seen = store.claims.lock().unwrap().clone();
        assert_eq!(seen, vec![vec![target("A", 5), target("C", 2)]]);
    }

    /// R8.2: core refuses an oversized upload before the backend sees it.
    #[test]
    fn r8_2_core_checks_uploads_before_the_backend() {
        let limits = Limits {
            max_keys_per_upload: 1,
            ..Limits::default()
        };
        let store = Recorder::new(limits, false);
        let json = KeyJson::from_json_str("\"k\"").unwrap();
        let keys = ["a:1", "a:2"].map(|id| (KeyId::parse(id).unwrap(), json.clone()));
        let upload = Upload::from_keys(device("A"), keys, []).unwrap();
        let err = runtime()
            .block_on(KeyStore::upload(&store, &upload))
            .unwrap_err();
        assert!(matches!(err, crate::Error::TooLarge { .. }), "{err:?}");
        assert_eq!(store.uploads.load(Ordering::SeqCst), 0);
    }

    /// R11.1: core reports what a mutation answers as changed, after it
    /// returned.
    #[test]
    fn r11_1_core_reports_answered_changes() {
        let store = Recorder::new(Limits::default(), false);
        let mut rx = KeyStore::subscribe(&store);
        runtime().block_on(async {
            KeyStore::claim(&store, &[target("A", 1)]).await.unwrap();
        });
        assert_eq!(rx.try_recv().unwrap().devices(), [device("A")]);
        assert!(rx.try_recv().is_err(), "one report per mutation");
    }

    /// R11.1: a mutation whose caller dropped its future may still commit in
    /// the backend; core then reports every device it may have changed.
    #[test]
    fn r11_1_a_dropped_mutation_reports_its_possible_changes() {
        let store = Recorder::new(Limits::default(), true);
        let mut rx = KeyStore::subscribe(&store);
        runtime().block_on(async {
            let targets = [target("A", 1), target("B", 1)];
            let claim = KeyStore::claim(&store, &targets);
            let timed_out = tokio::time::timeout(std::time::Duration::from_millis(10), claim).await;
            assert!(timed_out.is_err(), "the backend's claim never finishes");
        });
        assert_eq!(
            store.claims.lock().unwrap().len(),
            1,
            "the backend was called"
        );
        assert_eq!(rx.try_recv().unwrap().devices(), [device("A"), device("B")]);
    }

    /// The `Arc` forwarding reaches the backend through `dyn KeyStore`.
    #[test]
    fn arc_dyn_key_store_forwards_to_the_backend() {
        let store: std::sync::Arc<dyn KeyStore> =
            std::sync::Arc::new(Recorder::new(Limits::default(), false));
        assert_eq!(store.backend_name(), "recorder");
        runtime().block_on(async {
            store.claim(&[target("A", 1)]).await.unwrap();
        });
    }
}
