//! A store on the homeserver's own pool ([`PostgresStore::with_pool`]):
//! the host's sessions keep their own settings around keyclaim's
//! operations, and the whole conformance suite holds on such a pool whose
//! sessions default to what keyclaim must not run with (repeatable read,
//! `synchronous_commit = off`, another `search_path` holding tables of the
//! same names).

// Tests report failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use keyclaim::{ClaimTarget, KeyStore, Limits, Result};
use keyclaim_conformance::fixtures::{alg, dev, numbered_otks, otks, put};
use keyclaim_conformance::{Capabilities, StoreFactory, keyclaim};
use keyclaim_postgres::{PostgresOptions, PostgresStore};
use keyclaim_testing::postgres::{require_server, unique_schema, with_server};

use common::options;

/// The host's session settings, set on each new connection of its pool.
const HOST_SETTINGS: [(&str, &str); 8] = [
    ("synchronous_commit", "off"),
    ("transaction_isolation", "repeatable read"),
    ("enable_seqscan", "on"),
    ("enable_sort", "on"),
    ("jit", "on"),
    ("statement_timeout", "12345ms"),
    ("plan_cache_mode", "force_custom_plan"),
    ("search_path", ""), // the host's schema, filled in
];

/// A host's pool on `url` whose connections run in `host_schema` with
/// [`HOST_SETTINGS`], where the host has a table `otk` of its own.
async fn host_pool(url: &str, host_schema: &str, size: usize) -> Pool {
    let config: tokio_postgres::Config = url.parse().unwrap();
    let manager = Manager::from_config(
        config,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let setup = format!(
        "SET synchronous_commit = off; SET default_transaction_isolation = 'repeatable read'; \
         SET enable_seqscan = on; SET enable_sort = on; SET jit = on; SET statement_timeout = '12345ms'; \
         SET plan_cache_mode = force_custom_plan; SET search_path = {host_schema}"
    );
    let pool = Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .post_create(Hook::async_fn(move |client, _| {
            let setup = setup.clone();
            Box::pin(async move {
                client
                    .batch_execute(&setup)
                    .await
                    .map_err(HookError::Backend)
            })
        }))
        .build()
        .unwrap();
    let client = pool.get().await.unwrap();
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {host_schema};
             CREATE TABLE IF NOT EXISTS {host_schema}.otk (host_row text);
             INSERT INTO {host_schema}.otk VALUES ('the host''s own');"
        ))
        .await
        .unwrap();
    pool
}

/// What the host's session says about its settings, outside a transaction
/// and inside one of its own, and its own `otk` table.
async fn host_view(pool: &Pool) -> (Vec<String>, Vec<String>, i64, i32) {
    const READ: &str = "SELECT current_setting('synchronous_commit'),
        current_setting('transaction_isolation'), current_setting('enable_seqscan'),
        current_setting('enable_sort'), current_setting('jit'),
        current_setting('statement_timeout'), current_setting('plan_cache_mode'),
        current_setting('search_path')";
    let mut client = pool.get().await.unwrap();
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let row = client.query_one(READ, &[]).await.unwrap();
    let outside = (0..8).map(|i| row.get::<_, String>(i)).collect();
    let tx = client.transaction().await.unwrap();
    let row = tx.query_one(READ, &[]).await.unwrap();
    let inside = (0..8).map(|i| row.get::<_, String>(i)).collect();
    // A statement the host prepared (and cached) names its own table.
    let stmt = tx.prepare_cached("SELECT count(*) FROM otk").await.unwrap();
    let own: i64 = tx.query_one(&stmt, &[]).await.unwrap().get(0);
    tx.commit().await.unwrap();
    (outside, inside, own, pid)
}

async fn otk_count(store: &PostgresStore, device: &keyclaim::Device) -> u64 {
    let state = store.sync_state(device).await.unwrap();
    state.one_time_key_counts.iter().map(|(_, n)| n).sum()
}

fn expected(host_schema: &str) -> Vec<String> {
    HOST_SETTINGS
        .iter()
        .map(|(name, value)| {
            if *name == "search_path" {
                host_schema.to_owned()
            } else {
                (*value).to_owned()
            }
        })
        .collect()
}

/// The host's statements on the very connection keyclaim uses (a pool of
/// one) see their own settings before and after each kind of keyclaim
/// operation, and after operations dropped half-way (R10.6): nothing of
/// keyclaim's outlives its transactions.
#[test]
fn the_hosts_sessions_keep_their_settings() {
    with_server("host_pool::settings", |url| async move {
        let host_schema = unique_schema("kc_host");
        let pool = host_pool(&url, &host_schema, 1).await;
        let want = expected(&host_schema);
        let check = |(outside, inside, own, _pid): (Vec<String>, Vec<String>, i64, i32),
                     when: &str| {
            assert_eq!(outside, want, "{when}: host session settings");
            assert_eq!(inside, want, "{when}: host transaction settings");
            assert_eq!(own, 1, "{when}: the host's own otk table");
        };
        let (_, _, _, pid) = host_view(&pool).await;
        check(host_view(&pool).await, "before");

        let schema = unique_schema("kc_hostks");
        let store = PostgresStore::with_pool(pool.clone(), options(&schema))
            .await
            .unwrap();
        check(host_view(&pool).await, "after connecting");
        // The migration's connection was taken out for good; the host's
        // pool opened a new one, with the host's settings.
        let (_, _, _, new_pid) = host_view(&pool).await;
        assert_ne!(new_pid, pid, "the migration's connection went back");

        let a = dev("@a:x", "A");
        let b = dev("@b:x", "B");
        put(
            &store,
            &a,
            numbered_otks("signed_curve25519", "K", 5),
            otks("signed_curve25519", &["F"]),
        )
        .await;
        check(host_view(&pool).await, "after an upload");
        let claimed = store
            .claim(&[
                ClaimTarget::one(a.clone(), alg("signed_curve25519")),
                ClaimTarget::one(a.clone(), alg("signed_curve25519")),
            ])
            .await
            .unwrap();
        assert_eq!(claimed.keys.len(), 2);
        check(host_view(&pool).await, "after a claim of two rounds");
        store
            .claim(&[ClaimTarget::one(b.clone(), alg("signed_curve25519"))])
            .await
            .unwrap();
        assert_eq!(otk_count(&store, &a).await, 3);
        store.counts_many(&[a.clone(), b.clone()]).await.unwrap();
        store.fallback_keys(&a).await.unwrap();
        store.export_devices(None, 10).await.unwrap();
        store.compact_counts().await.unwrap();
        check(host_view(&pool).await, "after reads and a compaction");
        store.delete_device(&b).await.unwrap();
        check(host_view(&pool).await, "after a deletion");

        // Operations dropped at every point of their way: each rolls back
        // before the host uses the connection again.
        for polls in 0..40 {
            let targets = [ClaimTarget::one(a.clone(), alg("signed_curve25519"))];
            let mut claim = Box::pin(store.claim(&targets));
            for _ in 0..polls {
                if futures::poll!(claim.as_mut()).is_ready() {
                    break;
                }
                tokio::task::yield_now().await;
            }
            drop(claim);
            check(
                host_view(&pool).await,
                &format!("after a claim dropped after {polls} polls"),
            );
        }
        // And the store still works on the same connection.
        put(
            &store,
            &a,
            numbered_otks("signed_curve25519", "L", 1),
            vec![],
        )
        .await;
        assert!(otk_count(&store, &a).await >= 1);
        check(host_view(&pool).await, "at the end");
    });
}

/// Two stores in two schemas on one host connection (a pool of one): the
/// statements each prepared and cached on that connection, under the same
/// text, run against the schema of the store running them.
#[test]
fn two_schemas_share_one_connections_statements() {
    with_server("host_pool::two_schemas", |url| async move {
        let pool = host_pool(&url, &unique_schema("kc_host2"), 1).await;
        let one = PostgresStore::with_pool(pool.clone(), options(&unique_schema("kc_two_a")))
            .await
            .unwrap();
        let two = PostgresStore::with_pool(pool.clone(), options(&unique_schema("kc_two_b")))
            .await
            .unwrap();
        let a = dev("@a:x", "A");
        let sc = || alg("signed_curve25519");
        put(&one, &a, numbered_otks("signed_curve25519", "O", 3), vec![]).await;
        put(&two, &a, numbered_otks("signed_curve25519", "T", 1), vec![]).await;
        for (store, prefix, left) in [(&one, "O", 2), (&two, "T", 0), (&one, "O", 1)] {
            let claimed = store
                .claim(&[ClaimTarget::one(a.clone(), sc())])
                .await
                .unwrap();
            assert_eq!(claimed.keys.len(), 1);
            assert!(
                claimed.keys[0].key_id.as_str().contains(prefix),
                "{:?} from the store of {prefix}",
                claimed.keys[0].key_id
            );
            assert_eq!(otk_count(store, &a).await, left);
        }
        assert_eq!(otk_count(&two, &a).await, 0);
        assert!(
            two.claim(&[ClaimTarget::one(a.clone(), sc())])
                .await
                .unwrap()
                .keys
                .is_empty()
        );
    });
}

/// Makes stores on host pools (each its own, with the host's settings of
/// [`host_pool`]) in fresh schemas, listening through their own connection.
struct HostPoolFactory {
    url: String,
}

impl HostPoolFactory {
    fn options(schema: &str, limits: Limits) -> PostgresOptions {
        options(schema).limits(limits)
    }

    async fn open(&self, schema: &str, limits: Limits) -> Result<PostgresStore> {
        let pool = host_pool(&self.url, &unique_schema("kc_hostconf"), 8).await;
        PostgresStore::with_pool_listening(pool, &self.url, Self::options(schema, limits)).await
    }
}

#[keyclaim::async_trait]
impl StoreFactory for HostPoolFactory {
    type Store = PostgresStore;

    fn capabilities(&self) -> Capabilities {
        Capabilities::persistent_shared()
    }

    async fn create(&self, limits: Limits) -> Result<PostgresStore> {
        self.open(&unique_schema("kc_hconf"), limits).await
    }

    async fn reopen(&self, store: PostgresStore) -> Result<PostgresStore> {
        let schema = store.schema().to_owned();
        let limits = keyclaim::KeyStore::limits(&store).clone();
        drop(store);
        self.open(&schema, limits).await
    }

    async fn open_shared(&self, store: &PostgresStore) -> Result<PostgresStore> {
        let limits = keyclaim::KeyStore::limits(store).clone();
        self.open(store.schema(), limits).await
    }
}

// `return` skips the case (loudly) when there is no server.
keyclaim_conformance::conformance_tests!({
    match require_server("host pool conformance") {
        Some(url) => HostPoolFactory { url },
        None => return,
    }
});
