//! The baselines claim correctly: oldest upload first (R4.2), no key twice
//! (R4.1), also under concurrent claimers, and a bulk claim takes the
//! oldest keys of every target. The same checks run on every baseline; the
//! PostgreSQL ones need a server (`KEYCLAIM_TEST_POSTGRES_URL`, or a
//! throwaway cluster from the installed binaries).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::Arc;

use keyclaim::{Algorithm, ClaimTarget, Device, KeyId, KeyJson};
use keyclaim_benches::baseline::Baseline;

const SC: &str = "signed_curve25519";

fn device(user: &str) -> Device {
    Device::parse(&format!("@{user}:example.org"), "DEV").unwrap()
}

fn sc() -> Algorithm {
    Algorithm::parse(SC).unwrap()
}

/// Keys `<alg>:<prefix><n>` for n in `range`, each JSON naming its key.
fn keys(alg: &str, prefix: &str, range: std::ops::Range<usize>) -> Vec<(KeyId, KeyJson)> {
    range
        .map(|n| {
            let name = format!("{prefix}{n:03}");
            (
                KeyId::parse(format!("{alg}:{name}")).unwrap(),
                KeyJson::from_value(&serde_json::json!({
                    "key": name,
                    "signatures": {"@owner:example.org": {"ed25519:DEV": "sig"}},
                }))
                .unwrap(),
            )
        })
        .collect()
}

/// Claims one key at a time until the device has none; their names.
async fn drain(baseline: &dyn Baseline, device: &Device, alg: &Algorithm) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(key) = baseline.claim_one(device, alg).await.unwrap() {
        assert!(out.len() < 1000, "more claims than the tests upload keys");
        assert_eq!(&key.device, device);
        assert_eq!(key.key_id.algorithm(), *alg);
        assert!(!key.fallback);
        // The JSON handed out is the one stored with that key ID.
        assert_eq!(key.key_json.to_value()["key"], key.key_id.name());
        out.push(key.key_id.name().to_owned());
    }
    out
}

/// Keys come out in upload order, not key ID order; a key ID the device
/// holds already is ignored on upload; other devices and algorithms are
/// untouched.
async fn oldest_first(baseline: &dyn Baseline) {
    let (alice, bob) = (device("alice"), device("bob"));
    baseline.upload(&alice, &keys(SC, "B", 0..3)).await.unwrap();
    let mut second = keys(SC, "A", 0..2);
    second.extend(keys(SC, "B", 1..2));
    baseline.upload(&alice, &second).await.unwrap();
    baseline
        .upload(&alice, &keys("alg2", "C", 0..1))
        .await
        .unwrap();
    baseline.upload(&bob, &keys(SC, "D", 0..1)).await.unwrap();

    let claimed = drain(baseline, &alice, &sc()).await;
    assert_eq!(claimed, ["B000", "B001", "B002", "A000", "A001"]);
    assert!(baseline.claim_one(&alice, &sc()).await.unwrap().is_none());
    let alg2 = Algorithm::parse("alg2").unwrap();
    assert_eq!(drain(baseline, &alice, &alg2).await, ["C000"]);
    assert_eq!(drain(baseline, &bob, &sc()).await, ["D000"]);
}

/// 8 claimers drain one device holding `n` keys at once; what they got
/// between them, and what a drain after them finds left.
async fn concurrent_drain(baseline: Arc<dyn Baseline>, n: usize) -> (Vec<String>, Vec<String>) {
    let hot = device("hot");
    baseline.upload(&hot, &keys(SC, "K", 0..n)).await.unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (baseline, hot, barrier) = (baseline.clone(), hot.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                drain(&*baseline, &hot, &sc()).await
            })
        })
        .collect();
    let mut claimed = Vec::new();
    for task in tasks {
        claimed.extend(task.await.unwrap());
    }
    let left = drain(&*baseline, &hot, &sc()).await;
    (claimed, left)
}

/// Concurrent claimers of one device never get the same key, and together
/// with a final drain they hand out every key exactly once. (The PostgreSQL
/// baseline may come away short under contention: the drain collects what
/// its claimers left.)
async fn once_under_concurrency(baseline: Arc<dyn Baseline>) {
    const KEYS: usize = 60;
    let (mut all, left) = concurrent_drain(baseline, KEYS).await;
    all.extend(left);
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(unique.len(), all.len(), "a key was handed out twice");
    assert_eq!(all.len(), KEYS, "every key is handed out once");
}

/// One claim of several targets takes each target's oldest keys, up to its
/// count.
async fn bulk_takes_the_oldest(baseline: &dyn Baseline) {
    let (carol, dave) = (device("carol"), device("dave"));
    baseline.upload(&carol, &keys(SC, "Z", 0..2)).await.unwrap();
    baseline.upload(&carol, &keys(SC, "A", 0..2)).await.unwrap();
    baseline.upload(&dave, &keys(SC, "Y", 0..3)).await.unwrap();
    let mut two = ClaimTarget::one(carol.clone(), sc());
    two.count = 3;
    let targets = [two, ClaimTarget::one(dave.clone(), sc())];
    let mut got: Vec<String> = baseline
        .claim(&targets)
        .await
        .unwrap()
        .into_iter()
        .map(|k| format!("{}/{}", k.device.user_id, k.key_id.name()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            "@carol:example.org/A000",
            "@carol:example.org/Z000",
            "@carol:example.org/Z001",
            "@dave:example.org/Y000",
        ]
    );
    assert_eq!(drain(baseline, &carol, &sc()).await, ["A001"]);
    assert_eq!(drain(baseline, &dave, &sc()).await, ["Y001", "Y002"]);
}

/// A device's count follows its uploads and claims, per algorithm.
async fn counts_follow_uploads_and_claims(baseline: &dyn Baseline) {
    let erin = device("erin");
    assert_eq!(baseline.count(&erin, &sc()).await.unwrap(), 0);
    baseline.upload(&erin, &keys(SC, "E", 0..3)).await.unwrap();
    baseline
        .upload(&erin, &keys("alg2", "F", 0..2))
        .await
        .unwrap();
    assert_eq!(baseline.count(&erin, &sc()).await.unwrap(), 3);
    baseline.claim_one(&erin, &sc()).await.unwrap().unwrap();
    assert_eq!(baseline.count(&erin, &sc()).await.unwrap(), 2);
    let alg2 = Algorithm::parse("alg2").unwrap();
    assert_eq!(baseline.count(&erin, &alg2).await.unwrap(), 2);
}

/// The checks as tests of one baseline; `$open` is an async block
/// giving `Option<(Arc<dyn Baseline>, guard)>` (`None`: no server, skip).
macro_rules! baseline_tests {
    ($open:expr) => {
        use super::*;

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn claims_oldest_first() {
            if let Some((baseline, _guard)) = $open.await {
                oldest_first(&*baseline).await;
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn hands_out_each_key_once_under_concurrency() {
            if let Some((baseline, _guard)) = $open.await {
                once_under_concurrency(baseline).await;
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn bulk_claim_takes_the_oldest() {
            if let Some((baseline, _guard)) = $open.await {
                bulk_takes_the_oldest(&*baseline).await;
            }
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn counts_follow_uploads_and_claims() {
            if let Some((baseline, _guard)) = $open.await {
                super::counts_follow_uploads_and_claims(&*baseline).await;
            }
        }
    };
}

mod sqlite {
    use keyclaim_benches::baseline::SqliteBaseline;

    async fn open() -> Option<(Arc<dyn Baseline>, tempfile::TempDir)> {
        let dir = tempfile::tempdir().unwrap();
        let baseline = SqliteBaseline::open(dir.path().join("baseline.sqlite"), true)
            .await
            .unwrap();
        Some((Arc::new(baseline), dir))
    }

    baseline_tests!(open());

    /// Several connections contend for the file's write lock instead of
    /// queueing for one: still every key once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn several_connections_hand_out_each_key_once() {
        let dir = tempfile::tempdir().unwrap();
        let baseline =
            SqliteBaseline::open_with_connections(dir.path().join("baseline.sqlite"), false, 4)
                .await
                .unwrap();
        once_under_concurrency(Arc::new(baseline)).await;
    }
}

mod redb {
    use keyclaim_benches::baseline::RedbBaseline;

    async fn open() -> Option<(Arc<dyn Baseline>, tempfile::TempDir)> {
        let dir = tempfile::tempdir().unwrap();
        let baseline = RedbBaseline::open(dir.path().join("baseline.redb"))
            .await
            .unwrap();
        Some((Arc::new(baseline), dir))
    }

    baseline_tests!(open());

    /// The keys outlive the handle: a reopened file hands out the rest, in
    /// order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn reopened_file_keeps_the_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("baseline.redb");
        let alice = device("alice");
        {
            let baseline = RedbBaseline::open(&path).await.unwrap();
            baseline.upload(&alice, &keys(SC, "B", 0..2)).await.unwrap();
            baseline.upload(&alice, &keys(SC, "A", 0..1)).await.unwrap();
            let first = baseline.claim_one(&alice, &sc()).await.unwrap().unwrap();
            assert_eq!(first.key_id.name(), "B000");
        }
        let baseline = RedbBaseline::open(&path).await.unwrap();
        baseline.upload(&alice, &keys(SC, "0", 0..1)).await.unwrap();
        assert_eq!(
            drain(&baseline, &alice, &sc()).await,
            ["B001", "A000", "0000"]
        );
    }
}

mod postgres {
    use keyclaim_benches::baseline::PostgresBaseline;
    use keyclaim_testing::postgres as testing;

    async fn open(test: &str) -> Option<(Arc<dyn Baseline>, ())> {
        let url =
            testing::require_server(&format!("keyclaim-benches::baseline::postgres::{test}"))?;
        let schema = testing::unique_schema("kc_baseline");
        let baseline = PostgresBaseline::connect(&url, &schema, 16, false)
            .await
            .unwrap();
        assert_eq!(baseline.schema(), schema);
        Some((Arc::new(baseline), ()))
    }

    baseline_tests!(open(std::thread::current().name().unwrap_or("test")));

    #[tokio::test]
    async fn an_invalid_schema_name_is_refused() {
        let Some(url) = testing::require_server("keyclaim-benches::baseline::postgres::schema")
        else {
            return;
        };
        for schema in ["", "1abc", "a-b", "A", "a;drop"] {
            let err = PostgresBaseline::connect(&url, schema, 1, false)
                .await
                .expect_err(schema);
            assert!(!err.is_retryable(), "{schema}: {err}");
        }
    }

    /// What a bench run leaves on a server it was given is dropped whole:
    /// the schemas named and their tables, and nothing else.
    #[tokio::test]
    async fn drop_schemas_removes_the_named_schemas_only() {
        let Some(url) = testing::require_server("keyclaim-benches::baseline::postgres::drop")
        else {
            return;
        };
        let [gone_a, gone_b, kept] =
            ["kc_drop_a", "kc_drop_b", "kc_drop_kept"].map(testing::unique_schema);
        for schema in [&gone_a, &gone_b, &kept] {
            PostgresBaseline::connect(&url, schema, 1, false)
                .await
                .unwrap();
        }
        keyclaim_benches::baseline::drop_schemas(&url, &[&gone_a, &gone_b])
            .await
            .unwrap();
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let left: Vec<String> = client
            .query(
                "SELECT nspname::text FROM pg_namespace WHERE nspname = ANY($1)",
                &[&vec![gone_a.as_str(), gone_b.as_str(), kept.as_str()]],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        assert_eq!(left, std::slice::from_ref(&kept));
        keyclaim_benches::baseline::drop_schemas(&url, &[&kept])
            .await
            .unwrap();
        let err = keyclaim_benches::baseline::drop_schemas(&url, &["a;drop"])
            .await
            .expect_err("an invalid name");
        assert!(!err.is_retryable(), "{err}");
    }
}

mod postgres_row_lock {
    use keyclaim_benches::baseline::PostgresBaseline;
    use keyclaim_testing::postgres as testing;

    async fn open(test: &str) -> Option<(Arc<dyn Baseline>, ())> {
        let url = testing::require_server(&format!(
            "keyclaim-benches::baseline::postgres_row_lock::{test}"
        ))?;
        let schema = testing::unique_schema("kc_rowlock");
        let baseline = PostgresBaseline::connect_row_lock(&url, &schema, 16)
            .await
            .unwrap();
        assert_eq!(baseline.name(), "postgres-row-lock");
        Some((Arc::new(baseline), ()))
    }

    baseline_tests!(open(std::thread::current().name().unwrap_or("test")));

    /// Concurrent claimers of one device between them take every key: a
    /// claimer that finds the rest locked by the others stops, and the
    /// others get those keys, so nothing is left for a final drain (the
    /// reference statement can leave keys behind).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_claimers_take_every_key() {
        let Some((baseline, ())) = open("concurrent_claimers_take_every_key").await else {
            return;
        };
        let (claimed, left) = concurrent_drain(baseline, 200).await;
        assert_eq!(claimed.len(), 200);
        assert!(left.is_empty(), "{left:?}");
    }
}
