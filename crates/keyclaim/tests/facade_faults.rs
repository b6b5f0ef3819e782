//! The facade over a store that fails: 500 `M_UNKNOWN`, retryability kept,
//! no internals in the message; and every public future is `Send`.

use std::sync::Arc;

use keyclaim::backend::{Backend, StoreCore, async_trait};
use keyclaim::transfer::DeviceSnapshot;
use std::collections::BTreeMap;

use keyclaim::{
    Algorithm, Changes, ClaimOptions, ClaimOutcome, ClaimTarget, Device, DeviceId, Error,
    FallbackTarget, KeyStore, KeysApi, Limits, ResetScope, Result, StoredFallback, SyncState,
    Upload, UploadOutcome, UserId,
};

#[derive(Debug)]
struct FailingStore {
    core: StoreCore,
}

impl Default for FailingStore {
    fn default() -> Self {
        Self {
            core: StoreCore::new(Limits::default()),
        }
    }
}

fn down(op: &'static str) -> Error {
    Error::storage(
        "failing",
        op,
        true,
        std::io::Error::other("disk on fire at /secret/path"),
    )
}

#[async_trait]
impl Backend for FailingStore {
    fn name(&self) -> &'static str {
        "failing"
    }
    fn core(&self) -> &StoreCore {
        &self.core
    }
    async fn upload(&self, _: &Upload) -> Result<UploadOutcome> {
        Err(down("upload"))
    }
    async fn claim(&self, _: &[ClaimTarget]) -> Result<ClaimOutcome> {
        Err(down("claim"))
    }
    async fn sync_state(&self, _: &Device) -> Result<SyncState> {
        Err(down("sync_state"))
    }
    async fn delete_device(&self, _: &Device) -> Result<Changes> {
        Err(down("delete_device"))
    }
    async fn delete_user(&self, _: &UserId) -> Result<Changes> {
        Err(down("delete_user"))
    }
    async fn export_devices(&self, _: Option<&Device>, _: usize) -> Result<Vec<DeviceSnapshot>> {
        Err(down("export"))
    }
    async fn import_device(&self, _: &DeviceSnapshot) -> Result<Changes> {
        Err(down("import"))
    }
    async fn claim_one_time_keys(&self, _: &[ClaimTarget]) -> Result<ClaimOutcome> {
        Err(down("claim_one_time_keys"))
    }
    async fn claim_fallback_keys(&self, _: &[FallbackTarget]) -> Result<ClaimOutcome> {
        Err(down("claim_fallback_keys"))
    }
    async fn reset_one_time_keys(&self, _: &Device, _: &ResetScope) -> Result<UploadOutcome> {
        Err(down("reset"))
    }
    async fn replace_device(&self, _: Option<&DeviceId>, _: &Upload) -> Result<UploadOutcome> {
        Err(down("replace_device"))
    }
    async fn fallback_keys(&self, _: &Device) -> Result<BTreeMap<Algorithm, StoredFallback>> {
        Err(down("fallback_keys"))
    }
    async fn counts_many(&self, _: &[Device]) -> Result<Vec<SyncState>> {
        Err(down("counts_many"))
    }
}

fn check(err: keyclaim::ApiError) {
    assert_eq!((err.status(), err.errcode()), (500, "M_UNKNOWN"), "{err}");
    assert!(err.is_retryable());
    assert!(!err.message().contains("secret"), "{}", err.message());
    assert!(
        std::error::Error::source(&err).is_some(),
        "the cause is kept"
    );
    assert_eq!(err.to_json()["errcode"], "M_UNKNOWN");
}

#[tokio::test]
async fn storage_failures_are_500_m_unknown() {
    let store: Arc<dyn KeyStore> = Arc::new(FailingStore::default());
    let api = KeysApi::new(store);
    let upload = br#"{"one_time_keys": {"signed_curve25519:A": "k"}}"#;
    check(api.upload("@a:b", "D", upload).await.unwrap_err());
    let claim = br#"{"one_time_keys": {"@a:b": {"D": "signed_curve25519"}}}"#;
    check(api.claim(claim).await.unwrap_err());
    check(api.sync("@a:b", "D").await.unwrap_err());
    check(api.delete_device("@a:b", "D").await.unwrap_err());
    check(api.delete_user("@a:b").await.unwrap_err());
    let with_fallbacks = ClaimOptions::default().always_include_fallback_keys(true);
    check(api.claim_with(claim, &with_fallbacks).await.unwrap_err());
    check(
        api.reset("@a:b", "D", br#"{"all": true}"#)
            .await
            .unwrap_err(),
    );
    check(
        api.replace_dehydrated_device("@a:b", Some("OLD"), "D", upload)
            .await
            .unwrap_err(),
    );
    check(api.fallback_keys("@a:b", "D").await.unwrap_err());
    check(
        api.counts_many(br#"{"devices": {"@a:b": ["D"]}}"#)
            .await
            .unwrap_err(),
    );
    // A claim with no targets never reaches the store.
    assert!(api.claim(b"{}").await.is_ok());
}

fn assert_send<T: Send>(_: &T) {}
fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn public_futures_are_send() {
    assert_send_sync::<KeysApi<Arc<dyn KeyStore>>>();
    assert_send_sync::<Arc<dyn KeyStore>>();
    let api = KeysApi::new(Arc::new(FailingStore::default()) as Arc<dyn KeyStore>);
    assert_send(&api.upload("@a:b", "D", b"{}"));
    assert_send(&api.claim(b"{}"));
    assert_send(&api.sync("@a:b", "D"));
    assert_send(&api.delete_device("@a:b", "D"));
    assert_send(&api.delete_user("@a:b"));
    let options = ClaimOptions::default();
    assert_send(&api.claim_with(b"{}", &options));
    assert_send(&api.reset("@a:b", "D", b"{}"));
    assert_send(&api.replace_dehydrated_device("@a:b", None, "D", b"{}"));
    assert_send(&api.fallback_keys("@a:b", "D"));
    assert_send(&api.counts_many(b"{}"));
    let store = FailingStore::default();
    let device = Device::parse("@a:b", "D").unwrap();
    assert_send(&KeyStore::claim(&store, &[]));
    assert_send(&KeyStore::sync_state(&store, &device));
}

#[test]
fn error_kinds_map_to_the_spec_table() {
    let device = Device::parse("@a:b", "D").unwrap();
    let key_id = keyclaim::KeyId::parse("a:b").unwrap();
    let rows: Vec<(Error, u16, &str)> = vec![
        (UserId::parse("x").unwrap_err(), 400, "M_INVALID_PARAM"),
        (
            keyclaim::DeviceId::parse("").unwrap_err(),
            400,
            "M_INVALID_PARAM",
        ),
        (keyclaim::KeyId::parse("x").unwrap_err(), 400, "M_BAD_JSON"),
        (
            keyclaim::KeyJson::from_value(&serde_json::json!(1)).unwrap_err(),
            400,
            "M_BAD_JSON",
        ),
        (Error::Conflict { device, key_id }, 400, "M_INVALID_PARAM"),
        (
            Error::DuplicateFallback {
                algorithm: Algorithm::signed_curve25519(),
            },
            400,
            "M_INVALID_PARAM",
        ),
        (
            Error::TooLarge {
                kind: keyclaim::LimitKind::ClaimTargets,
                limit: 1,
            },
            400,
            "M_TOO_LARGE",
        ),
        (Error::Closed, 500, "M_UNKNOWN"),
        (Error::corrupt("x"), 500, "M_UNKNOWN"),
    ];
    for (err, status, code) in rows {
        let api: keyclaim::ApiError = err.into();
        assert_eq!((api.status(), api.errcode()), (status, code), "{api}");
    }
}
