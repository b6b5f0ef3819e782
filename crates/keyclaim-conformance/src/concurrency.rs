//! Concurrency: many tasks (and handles) at once on one store (R4.2, R4.3,
//! R10.3).

use std::collections::BTreeSet;
use std::sync::Arc;

use keyclaim::{ClaimTarget, KeyStore};

use crate::StoreFactory;
use crate::fixtures::*;

cases! { $ concurrency;
    /// R4.2: tasks claiming one device in a loop never get one key twice, and
    /// together get every key.
    pub async fn r4_2_concurrent_claims_never_double_issue<F: StoreFactory>(f: &F) {
        let store = Arc::new(fresh(f).await);
        let a = alice();
        let n = 200;
        for chunk in numbered_otks(SC, "K", n).chunks(100) {
            put(&*store, &a, chunk.to_vec(), vec![]).await;
        }
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let (store, a) = (store.clone(), a.clone());
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    loop {
                        let out = claim_n(&*store, &a, SC, 1 + i % 3).await;
                        if out.keys.is_empty() {
                            return got;
                        }
                        got.extend(out.keys);
                    }
                })
            })
            .collect();
        let mut all = BTreeSet::new();
        for t in tasks {
            for k in t.await.expect("task") {
                assert!(
                    all.insert(k.key_id.to_string()),
                    "{} issued twice",
                    k.key_id
                );
            }
        }
        assert_eq!(all.len(), n);
    }

    /// R4.2 with uploads: uploads and claims on one device at once; every
    /// uploaded key is issued exactly once or still stored at the end.
    pub async fn r4_2_concurrent_uploads_and_claims_on_one_device<F: StoreFactory>(f: &F) {
        let store = Arc::new(fresh(f).await);
        let a = alice();
        let uploader = {
            let (store, a) = (store.clone(), a.clone());
            tokio::spawn(async move {
                for batch in 0..20 {
                    put(
                        &*store,
                        &a,
                        numbered_otks(SC, &format!("B{batch:02}-"), 10),
                        vec![],
                    )
                    .await;
                    tokio::task::yield_now().await;
                }
            })
        };
        let claimers: Vec<_> = (0..6)
            .map(|_| {
                let (store, a) = (store.clone(), a.clone());
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    for _ in 0..30 {
                        got.extend(claim_one(&*store, &a, SC).await);
                        tokio::task::yield_now().await;
                    }
                    got
                })
            })
            .collect();
        uploader.await.expect("uploader");
        let mut issued = BTreeSet::new();
        for c in claimers {
            for k in c.await.expect("claimer") {
                assert!(
                    issued.insert(k.key_id.to_string()),
                    "{} issued twice",
                    k.key_id
                );
            }
        }
        let left = count(&*store, &a, SC).await;
        assert_eq!(issued.len() as u64 + left, 200, "keys lost or invented");
        let rest = claim_n(&*store, &a, SC, 5).await;
        for k in rest.keys {
            assert!(
                issued.insert(k.key_id.to_string()),
                "{} issued twice",
                k.key_id
            );
        }
    }

    /// R4.3 in bulk: more concurrent claims than keys, each naming every one of
    /// many devices; every key of every device is issued, and none twice.
    pub async fn r4_3_concurrent_bulk_claims_across_many_devices<F: StoreFactory>(f: &F) {
        let store = Arc::new(fresh(f).await);
        let devices: Vec<_> = (0..40)
            .map(|i| dev(&format!("@u{i}:example.org"), "D"))
            .collect();
        for d in &devices {
            put(&*store, d, numbered_otks(SC, "K", 10), vec![]).await;
        }
        let targets: Arc<Vec<ClaimTarget>> = Arc::new(
            devices
                .iter()
                .map(|d| ClaimTarget::one(d.clone(), alg(SC)))
                .collect(),
        );
        let tasks: Vec<_> = (0..12)
            .map(|_| {
                let (store, targets) = (store.clone(), targets.clone());
                tokio::spawn(async move { store.claim(&targets).await.expect("claim").keys })
            })
            .collect();
        let mut all = BTreeSet::new();
        for t in tasks {
            for k in t.await.expect("task") {
                assert!(
                    all.insert((k.device.clone(), k.key_id.to_string())),
                    "issued twice"
                );
            }
        }
        assert_eq!(all.len(), 400, "10 keys x 40 devices, each once");
        for d in &devices {
            assert_eq!(count(&*store, d, SC).await, 0);
        }
    }

    /// R10.3: claims through several handles (processes) at once never issue
    /// one key twice, and together issue every key.
    #[needs(Shared)]
    pub async fn r10_3_concurrent_claims_across_handles<F: StoreFactory>(f: &F) {
        let one = Arc::new(fresh(f).await);
        let two = Arc::new(f.open_shared(&one).await.expect("second handle"));
        let devices: Vec<_> = (0..4)
            .map(|i| dev(&format!("@u{i}:example.org"), "D"))
            .collect();
        for d in &devices {
            put(&*one, d, numbered_otks(SC, "K", 25), vec![]).await;
        }
        let mut tasks = Vec::new();
        for i in 0..8 {
            let store: Arc<dyn KeyStore> = if i % 2 == 0 { one.clone() } else { two.clone() };
            let targets: Vec<_> = devices
                .iter()
                .map(|d| ClaimTarget::one(d.clone(), alg(SC)))
                .collect();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..20 {
                    got.extend(store.claim(&targets).await.expect("claim").keys);
                }
                got
            }));
        }
        let mut all = BTreeSet::new();
        for t in tasks {
            for k in t.await.expect("task") {
                assert!(
                    all.insert((k.device.clone(), k.key_id.to_string())),
                    "issued twice"
                );
            }
        }
        assert_eq!(all.len(), 100);
    }
}
