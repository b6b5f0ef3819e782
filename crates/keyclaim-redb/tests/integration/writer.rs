//! The writer thread under injected faults (`keyclaim_redb::faults`): a
//! panic fails its batch and the writer goes on.

use std::future::Future;
use std::time::Duration;

use keyclaim::{ClaimTarget, Error, KeyStore, Upload};
use keyclaim_conformance::fixtures::{SC, alg, dev, otks};
use keyclaim_redb::faults::Faults;
use keyclaim_redb::{RedbOptions, RedbStore};

/// Awaits `fut`, failing the test if it does not finish: a bound that only
/// keeps a store that hangs from hanging the test, never a timing assertion.
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: the store never answered"))
}

fn upload(user: &str, device: &str, names: &[&str]) -> Upload {
    Upload::from_keys(dev(user, device), otks(SC, names), []).unwrap()
}

async fn open(dir: &tempfile::TempDir, faults: &Faults) -> RedbStore {
    RedbStore::open_with(
        dir.path().join("k.redb"),
        RedbOptions::new().faults(faults.clone()),
    )
    .await
    .unwrap()
}

/// A panic inside the writer thread fails the operation it held with a
/// non-retryable `Error::Storage` (not a hang), applies nothing of it, and
/// the writer goes on: every later write is served, also after a second
/// panic, and the data is intact after reopening.
#[test]
fn writer_panic_fails_its_batch_and_the_writer_goes_on() {
    crate::rt().block_on(async {
        let dir = keyclaim_testing::temp_dir();
        let faults = Faults::new();
        let store = open(&dir, &faults).await;
        let user = "@panic:example.org";
        within(
            "upload",
            store.upload(&upload(user, "A", &["A1", "A2", "A3"])),
        )
        .await
        .unwrap();
        for round in 0..2 {
            faults.panic_writer();
            let device = format!("LOST{round}");
            let err = within(
                "the panicking upload",
                store.upload(&upload(user, &device, &["L"])),
            )
            .await
            .unwrap_err();
            assert!(
                matches!(err, Error::Storage { .. }) && !err.is_retryable(),
                "a writer panic should be a non-retryable storage error: {err:?}"
            );
            let counts = within("counts", store.otk_counts(&dev(user, &device))).await;
            assert_eq!(
                counts.unwrap().total(),
                0,
                "the panicked upload was applied"
            );
            // The writer goes on: uploads and claims, alone and together.
            let later: Vec<_> = (0..8)
                .map(|i| {
                    let store = &store;
                    async move {
                        let name = format!("B{round}-{i}");
                        let up = upload(user, &format!("B{round}-{i}"), &[name.as_str()]);
                        store.upload(&up).await
                    }
                })
                .collect();
            for result in within("writes after a panic", futures::future::join_all(later)).await {
                result.unwrap();
            }
            let claim = [ClaimTarget::one(dev(user, "A"), alg(SC))];
            let out = within("claim after a panic", store.claim(&claim))
                .await
                .unwrap();
            assert_eq!(out.keys.len(), 1);
        }
        assert_eq!(store.writer_stats().panics, 2);
        store.close().await.unwrap();
        let store = open(&dir, &faults).await;
        assert_eq!(
            store.otk_counts(&dev(user, "A")).await.unwrap().get_str(SC),
            1
        );
        for round in 0..2 {
            for i in 0..8 {
                let d = dev(user, &format!("B{round}-{i}"));
                assert_eq!(store.otk_counts(&d).await.unwrap().get_str(SC), 1, "{d}");
            }
        }
    });
}
