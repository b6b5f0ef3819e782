//! Claims/s of the key-value layer over `MemoryEngine` against the memory
//! backend, 64 claimers on distinct devices, with the writer's batch sizes.
//! A measurement, not a test: `cargo run --release -p keyclaim-kv --example claim_race`.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::sync::Arc;
use std::time::Instant;

use keyclaim::{Algorithm, ClaimTarget, Device, KeyId, KeyJson, KeyStore, Upload};

const CLAIMERS: usize = 64;
const KEYS: usize = 400;

async fn race(store: Arc<dyn KeyStore>) -> f64 {
    let alg = Algorithm::parse("signed_curve25519").unwrap();
    let devices: Vec<Device> = (0..CLAIMERS)
        .map(|i| Device::parse("@u:x", &format!("D{i}")).unwrap())
        .collect();
    for d in &devices {
        let keys = (0..KEYS).map(|k| {
            let json = KeyJson::from_value(&serde_json::json!({
                "key": format!("material-{k}"),
                "signatures": {"@u:x": {"ed25519:D": "sig"}}
            }))
            .unwrap();
            (
                KeyId::parse(format!("signed_curve25519:k{k}")).unwrap(),
                json,
            )
        });
        let upload = Upload::from_keys(d.clone(), keys.collect::<Vec<_>>(), vec![]).unwrap();
        store.upload(&upload).await.unwrap();
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for d in devices {
        let store = Arc::clone(&store);
        let target = [ClaimTarget::one(d, alg.clone())];
        tasks.push(tokio::spawn(async move {
            for _ in 0..KEYS {
                assert_eq!(store.claim(&target).await.unwrap().keys.len(), 1);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (CLAIMERS * KEYS) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let memory = race(Arc::new(keyclaim_memory::MemoryStore::new())).await;
        let kv = Arc::new(
            keyclaim_kv::KvStore::open(keyclaim_kv::MemoryEngine::new())
                .await
                .unwrap(),
        );
        let kv_rate = race(Arc::clone(&kv) as Arc<dyn KeyStore>).await;
        let stats = kv.writer_stats();
        println!("memory    {memory:>10.0} claims/s");
        println!(
            "kv-memory {kv_rate:>10.0} claims/s ({:.1}x slower)",
            memory / kv_rate
        );
        println!(
            "kv writer: {} batches, {} operations, {:.1} per batch, largest {}",
            stats.batches,
            stats.operations,
            stats.operations as f64 / stats.batches.max(1) as f64,
            stats.largest_batch
        );
    });
}
