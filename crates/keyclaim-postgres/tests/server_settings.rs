//! R10.5: the guarantees do not depend on how the server is tuned. Every
//! pooled connection runs with synchronous commit on and READ COMMITTED,
//! whatever the server, the database or the role says; a server running
//! with `fsync = off` is refused unless the relaxed option is set.

// Tests report failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use keyclaim::{ClaimTarget, Error, KeyStore, ResetScope};
use keyclaim_conformance::fixtures::{alg, dev, numbered_otks, otks, put, upload_of};
use keyclaim_postgres::{PostgresOptions, PostgresStore};
use keyclaim_testing::postgres::{Cluster, database_url, unique_schema, with_server};
use tokio_postgres::{Client, NoTls};

const SC: &str = "signed_curve25519";

async fn raw(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("raw connection");
    tokio::spawn(connection);
    client
}

/// A fresh database on the server of `url` whose sessions default to
/// `settings` (`ALTER DATABASE ... SET`, as an operator would tune it);
/// returns its connection string and its name.
async fn tuned_database(url: &str, settings: &[(&str, &str)]) -> (String, String) {
    let name = unique_schema("kc_db");
    let admin = raw(url).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    for (setting, value) in settings {
        admin
            .batch_execute(&format!("ALTER DATABASE {name} SET {setting} = '{value}'"))
            .await
            .expect("tune database");
    }
    (database_url(url, &name), name)
}

async fn drop_database(url: &str, name: &str) {
    raw(url)
        .await
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .expect("drop database");
}

/// Installs triggers on keyclaim's tables that record, for every statement
/// that writes them, the settings in force in the writing transaction:
/// what keyclaim's own connections run with, seen from inside.
async fn record_session_settings(client: &Client, schema: &str) {
    client
        .batch_execute(&format!(
            "SET search_path = {schema};
             CREATE TABLE seen (tbl text, sync_commit text, isolation text);
             CREATE FUNCTION record_settings() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO seen VALUES (TG_TABLE_NAME,
                     current_setting('synchronous_commit'),
                     current_setting('transaction_isolation'));
                 RETURN NULL;
             END $$;
             CREATE TRIGGER otk_seen AFTER INSERT OR UPDATE OR DELETE ON otk
                 FOR EACH STATEMENT EXECUTE FUNCTION record_settings();
             CREATE TRIGGER fallback_seen AFTER INSERT OR UPDATE OR DELETE ON fallback
                 FOR EACH STATEMENT EXECUTE FUNCTION record_settings();
             CREATE TRIGGER issued_seen AFTER INSERT OR UPDATE OR DELETE ON issued
                 FOR EACH STATEMENT EXECUTE FUNCTION record_settings();
             RESET search_path;"
        ))
        .await
        .expect("install the recording triggers");
}

/// Every write recorded by [`record_session_settings`] ran with synchronous
/// commit on and READ COMMITTED; returns how many were recorded.
async fn assert_sessions_were_safe(client: &Client, schema: &str) -> usize {
    let rows = client
        .query(
            &format!("SELECT tbl, sync_commit, isolation FROM {schema}.seen"),
            &[],
        )
        .await
        .expect("read the recorded settings");
    for row in &rows {
        let (table, sync, isolation): (String, String, String) =
            (row.get(0), row.get(1), row.get(2));
        assert_eq!(
            sync, "on",
            "a write of {table} ran with synchronous_commit = {sync}"
        );
        assert_eq!(
            isolation, "read committed",
            "a write of {table} ran under {isolation}"
        );
    }
    rows.len()
}

/// Polls `query` (one row, one `int8` column) until it answers at least
/// `n`, for at most 30 s.
async fn wait_for_count(client: &Client, query: &str, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got: i64 = client.query_one(query, &[]).await.expect("poll").get(0);
        if got >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{query}: {got} < {n} after 30 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Connecting to the server at `url` is refused for its `setting` (R10.5)
/// with a non-retryable [`Error::InvalidConfig`] naming it and the relaxed
/// option, creating nothing; with the relaxed option the store connects and
/// works. Answers the schema it used.
async fn refused_unless_relaxed(url: &str, schema_prefix: &str, setting: &str) -> String {
    let schema = unique_schema(schema_prefix);
    let err = PostgresStore::connect_with(url, PostgresOptions::new().schema(&schema))
        .await
        .expect_err("an unsafe server must be refused");
    match &err {
        Error::InvalidConfig { reason } => {
            assert!(reason.contains(setting), "{reason}");
            assert!(reason.contains("allow_unsafe_server"), "{reason}");
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    assert!(!err.is_retryable());
    // Nothing was created on the refused server.
    let exists = raw(url)
        .await
        .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema])
        .await
        .expect("look for the schema");
    assert!(exists.is_none(), "the refused connect created its schema");

    let relaxed = PostgresOptions::new()
        .schema(&schema)
        .allow_unsafe_server(true);
    let store = PostgresStore::connect_with(url, relaxed)
        .await
        .expect("the relaxed option accepts it");
    put(&store, &dev("@a:x", "A"), otks(SC, &["K"]), vec![]).await;
    schema
}

#[test]
fn a_server_without_fsync_is_refused_unless_relaxed() {
    keyclaim_testing::runtime(2).block_on(async {
        // A private cluster, so that the server surely runs with fsync = off.
        let cluster = Cluster::start(false).expect("a throwaway cluster");
        let url = cluster.url();
        let schema = refused_unless_relaxed(&url, "kc_fsync", "fsync").await;
        // The same through a store URL.
        let (conninfo, options) = PostgresOptions::from_url(&format!(
            "postgresql://?host={}&port=5432&user=postgres&dbname=postgres\
             &keyclaim_schema={schema}&keyclaim_allow_unsafe_server=on",
            url.split_whitespace()
                .find_map(|kv| kv.strip_prefix("host="))
                .expect("the cluster's socket dir")
        ))
        .expect("store URL");
        PostgresStore::connect_with(&conninfo, options)
            .await
            .expect("the relaxed option from a URL");
    });
}

/// R10.5: a server that syncs its WAL but runs without full-page writes
/// (a torn page cannot be repaired after a crash of its machine) is
/// refused like one without fsync, unless relaxed.
#[test]
fn a_server_without_full_page_writes_is_refused_unless_relaxed() {
    keyclaim_testing::runtime(2).block_on(async {
        let config = keyclaim_testing::postgres::ClusterConfig {
            conf: vec!["full_page_writes = off".to_owned()],
            ..Default::default()
        };
        let cluster = Cluster::start_configured(true, &config).expect("a throwaway cluster");
        refused_unless_relaxed(&cluster.url(), "kc_fpw", "full_page_writes = off").await;
    });
}

/// A database tuned to `repeatable read` and asynchronous commit: every
/// write keyclaim makes still runs with synchronous commit and READ
/// COMMITTED, and two uploads of one device that wait on each other plan
/// against what the first one stored (R3.2 retries succeed; the per-device
/// limit, R8.1, holds).
#[test]
fn a_server_tuned_to_repeatable_read_and_async_commit_changes_nothing() {
    with_server("server_settings::repeatable_read", |url| async move {
        let (db_url, db) = tuned_database(
            &url,
            &[
                ("default_transaction_isolation", "repeatable read"),
                ("synchronous_commit", "off"),
            ],
        )
        .await;
        let schema = unique_schema("kc_rr");
        let options = PostgresOptions::new()
            .schema(&schema)
            .pool_size(4)
            .allow_unsafe_server(true);
        let store = std::sync::Arc::new(
            PostgresStore::connect_with(&db_url, options)
                .await
                .expect("connect"),
        );
        let admin = raw(&db_url).await;
        record_session_settings(&admin, &schema).await;
        let a = dev("@a:x", "A");

        // Two identical uploads (a client's retry) racing: both succeed.
        let keys = numbered_otks(SC, "K", 100);
        let both = racing_uploads(&store, &admin, &schema, &a, [keys.clone(), keys]).await;
        for outcome in &both {
            let counts = outcome.as_ref().expect("both uploads succeed (R3.2)");
            assert_eq!(counts.counts.get_str(SC), 100);
        }

        // Two different uploads of 300 keys racing: the limit of 500 holds.
        store
            .reset_one_time_keys(&a, &ResetScope::All)
            .await
            .expect("empty the device");
        let one = numbered_otks(SC, "L", 300);
        let two = numbered_otks(SC, "M", 300);
        let outcomes = racing_uploads(&store, &admin, &schema, &a, [one, two]).await;
        let stored = outcomes.iter().filter(|o| o.is_ok()).count();
        assert_eq!(stored, 1, "exactly one of them fits: {outcomes:?}");
        assert!(
            outcomes
                .iter()
                .any(|o| matches!(o, Err(Error::TooLarge { .. }))),
            "{outcomes:?}"
        );
        assert_eq!(store.otk_counts(&a).await.expect("counts").get_str(SC), 300);

        // Claims, fallback marks and deletions ran safely too.
        put(&store, &a, vec![], otks(SC, &["F"])).await;
        store
            .claim(&[ClaimTarget::one(a.clone(), alg(SC))])
            .await
            .expect("claim");
        store
            .reset_one_time_keys(&a, &ResetScope::All)
            .await
            .expect("reset");
        let fallback = store
            .claim(&[ClaimTarget::one(a.clone(), alg(SC))])
            .await
            .expect("fallback claim");
        assert!(fallback.keys[0].fallback);
        store.delete_device(&a).await.expect("delete");
        let recorded = assert_sessions_were_safe(&admin, &schema).await;
        assert!(recorded >= 6, "only {recorded} writes recorded");
        drop(store);
        drop(admin);
        drop_database(&url, &db).await;
    });
}

/// Runs two uploads of `device` that both wait on the user's advisory lock
/// (held by `admin` until both wait), so that the second one's transaction
/// starts before the first one commits.
async fn racing_uploads(
    store: &std::sync::Arc<PostgresStore>,
    admin: &Client,
    schema: &str,
    device: &keyclaim::Device,
    uploads: [Vec<(keyclaim::KeyId, keyclaim::KeyJson)>; 2],
) -> Vec<keyclaim::Result<keyclaim::UploadOutcome>> {
    admin.batch_execute("BEGIN").await.expect("begin");
    admin
        .execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('keyclaim/' || $1::text || '/' || $2::text, 0))",
            &[&schema, &device.user_id.as_str()],
        )
        .await
        .expect("hold the user's lock");
    let tasks: Vec<_> = uploads
        .into_iter()
        .map(|keys| {
            let store = store.clone();
            let upload = upload_of(device, keys, vec![]);
            tokio::spawn(async move { store.upload(&upload).await })
        })
        .collect();
    // Both wait on the lock: their transactions have started.
    let waiting = "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
         WHERE l.locktype = 'advisory' AND NOT l.granted AND d.datname = current_database()";
    wait_for_count(admin, waiting, 2).await;
    admin.batch_execute("COMMIT").await.expect("release");
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.expect("upload task"));
    }
    out
}

/// A server with asynchronous commit loses commits that were not flushed
/// when it crashes; a claim that returned must not be among them (R4.2,
/// R10.1). The WAL writer is slowed down so that an asynchronous commit
/// stays unflushed; a control transaction committed asynchronously after
/// the claim shows that the crash did lose what was not flushed.
#[test]
fn a_claim_survives_a_crash_of_a_server_with_async_commit() {
    keyclaim_testing::runtime(2).block_on(async {
        let cluster = Cluster::start(true).expect("a durable throwaway cluster");
        let url = cluster.url();
        {
            let admin = raw(&url).await;
            for sql in [
                "ALTER SYSTEM SET synchronous_commit = off",
                "ALTER SYSTEM SET wal_writer_delay = '10s'",
                "SELECT pg_reload_conf()",
            ] {
                admin.batch_execute(sql).await.expect("tune the server");
            }
        }
        let schema = unique_schema("kc_async");
        // No announcer transactions after the claim: they would flush the WAL.
        let options = PostgresOptions::new()
            .schema(&schema)
            .pool_size(2)
            .notifications(false)
            .transactional_notify(true);
        let a = dev("@a:x", "A");
        let keys = numbered_otks(SC, "K", 40);
        let mut next = 0;
        let mut provoked = 0;
        for attempt in 0..5 {
            let store = PostgresStore::connect_with(&url, options.clone())
                .await
                .expect("connect");
            let admin = raw(&url).await;
            if attempt == 0 {
                put(&store, &a, keys.clone(), vec![]).await;
                record_session_settings(&admin, &schema).await;
                admin
                    .batch_execute("CREATE TABLE control (id int); INSERT INTO control VALUES (1)")
                    .await
                    .expect("control table");
            }
            // The upload and the control row are on disk.
            admin.batch_execute("CHECKPOINT").await.expect("checkpoint");
            let claimed = store
                .claim(&[ClaimTarget::one(a.clone(), alg(SC))])
                .await
                .expect("claim");
            assert_eq!(claimed.keys.len(), 1);
            assert_eq!(claimed.keys[0].key_id, keys[next].0, "claim order");
            admin
                .batch_execute("SET synchronous_commit = off; DELETE FROM control")
                .await
                .expect("control commit");
            drop(store);
            drop(admin);
            cluster.stop(false).expect("immediate stop");
            cluster.start_server().expect("restart");

            let admin = raw(&url).await;
            let control_lost = admin
                .query_opt("SELECT 1 FROM control", &[])
                .await
                .expect("read the control row")
                .is_some();
            let store = PostgresStore::connect_with(&url, options.clone())
                .await
                .expect("reconnect");
            let after = store
                .claim(&[ClaimTarget::one(a.clone(), alg(SC))])
                .await
                .expect("claim after the crash");
            assert_eq!(after.keys.len(), 1);
            assert_ne!(
                after.keys[0].key_id, keys[next].0,
                "a claimed key came back after the crash"
            );
            assert_eq!(after.keys[0].key_id, keys[next + 1].0);
            next += 2;
            if control_lost {
                provoked += 1;
                assert!(assert_sessions_were_safe(&admin, &schema).await >= 1);
                break;
            }
            // The server flushed the control commit anyway: put the row
            // back and crash again.
            admin
                .batch_execute("INSERT INTO control VALUES (1)")
                .await
                .expect("control row");
        }
        assert!(
            provoked > 0,
            "no crash lost the asynchronous control commit: the scenario was not provoked"
        );
    });
}
