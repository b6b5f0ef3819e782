//! The one [`KeyStore`] implementation: every [`Backend`] is served through
//! it, so that limits, clamping, spans and change reports are applied once.

use std::borrow::Cow;

use async_trait::async_trait;
use tokio::sync::broadcast;
use tracing::Instrument as _;

use super::Backend;
use crate::error::Result;
use crate::ids::{Algorithm, Device, UserId};
use crate::limits::Limits;
use crate::store::KeyStore;
use crate::types::{
    Changes, ClaimOutcome, ClaimTarget, DeviceSnapshot, OtkCounts, SyncState, Upload, UploadOutcome,
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
        let limits = self.core().limits();
        limits.check_claim(targets)?;
        let targets = clamp(limits, targets);
        if targets.is_empty() {
            return Ok(ClaimOutcome::default());
        }
        let possible = || Changes::from_devices(targets.iter().map(|t| t.device.clone()));
        mutate(
            self,
            span,
            Backend::claim(self, &targets),
            |o: &ClaimOutcome| &o.changes,
            possible,
        )
        .await
    }

    async fn otk_counts(&self, device: &Device) -> Result<OtkCounts> {
        let span = tracing::trace_span!("keyclaim.otk_counts", backend = self.name(), %device);
        Backend::otk_counts(self, device).instrument(span).await
    }

    async fn unused_fallback_types(&self, device: &Device) -> Result<Vec<Algorithm>> {
        let span =
            tracing::trace_span!("keyclaim.unused_fallback_types", backend = self.name(), %device);
        Backend::unused_fallback_types(self, device)
            .instrument(span)
            .await
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
}
