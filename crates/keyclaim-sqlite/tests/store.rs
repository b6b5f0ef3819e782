//! Backend-specific checks beyond the conformance suite: migrations and
//! foreign files, busy files, cheap reads (R6.4), closing releases the file.

// A test: a failed expectation is how it reports.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{device, key};
use keyclaim::{ClaimTarget, Error, KeyStore, Upload};
use keyclaim_sqlite::{SCHEMA_VERSION, SqliteOptions, SqliteStore, Synchronous};

fn assert_send_sync<T: Send + Sync>(_: &T) {}
fn assert_send<T: Send>(_: &T) {}

#[tokio::test]
async fn store_and_futures_are_send_and_sync() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("s.sqlite"))
        .await
        .unwrap();
    assert_send_sync(&store);
    let d = device(0);
    assert_send(&store.otk_counts(&d));
    assert_send(&store.claim(&[]));
    assert_eq!(store.backend_name(), "sqlite");
    let debug = format!("{store:?}");
    assert!(debug.contains("SqliteStore"));
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.sqlite");
    drop(SqliteStore::open(&path).await.unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(conn);
    match SqliteStore::open(&path).await {
        Err(Error::UnsupportedVersion {
            found, supported, ..
        }) => {
            assert_eq!((found, supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
        }
        other => panic!("expected UnsupportedVersion, got {other:?}"),
    }
}

#[tokio::test]
async fn a_file_of_another_application_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.sqlite");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("CREATE TABLE users (id INTEGER PRIMARY KEY)")
        .unwrap();
    drop(conn);
    assert!(matches!(
        SqliteStore::open(&path).await,
        Err(Error::Corrupt { .. })
    ));
}

#[tokio::test]
async fn reopening_keeps_the_schema_and_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sqlite");
    let d = device(0);
    {
        let store = SqliteStore::open(&path).await.unwrap();
        let upload = Upload::from_keys(d.clone(), [key("a"), key("b")], []).unwrap();
        store.upload(&upload).await.unwrap();
    }
    let store = SqliteStore::open(&path).await.unwrap();
    assert_eq!(store.otk_counts(&d).await.unwrap().total(), 2);
}

#[tokio::test]
async fn a_busy_file_is_a_retryable_error_never_no_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busy.sqlite");
    let options = SqliteOptions::new().busy_timeout(Duration::from_millis(100));
    let store = SqliteStore::open_with(&path, options).await.unwrap();
    let d = device(0);
    let upload = Upload::from_keys(d.clone(), [key("a")], []).unwrap();
    store.upload(&upload).await.unwrap();

    // Another process holds the write lock for longer than the busy timeout.
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let target = ClaimTarget::one(d.clone(), "signed_curve25519".parse().unwrap());
    let err = store
        .claim(std::slice::from_ref(&target))
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(matches!(err, Error::Storage { .. }));
    let upload2 = Upload::from_keys(d.clone(), [key("b")], []).unwrap();
    assert!(store.upload(&upload2).await.unwrap_err().is_retryable());
    // Reads are not blocked by a writer (WAL).
    assert_eq!(store.otk_counts(&d).await.unwrap().total(), 1);
    other.execute_batch("ROLLBACK").unwrap();

    // Nothing was consumed; the retry succeeds.
    let out = store.claim(&[target]).await.unwrap();
    assert_eq!(out.keys.len(), 1);
}

/// R6.4: counts and unused fallback types (also `counts_many`'s per-device
/// reads, R16.1) are answered from a primary key or an index alone, limited
/// to the one device; a claim's read, an upload's key ID check and a fallback
/// read (R15.1) are single seeks; a key reset (R13.1) deletes a range of
/// the primary key from the queue's head.
#[test]
fn per_device_reads_use_covering_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plan.sqlite");
    let rt = keyclaim_testing::runtime(2);
    drop(rt.block_on(SqliteStore::open(&path)).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    let plan = |sql: &str| -> String {
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let n = stmt.parameter_count();
        let params: Vec<&str> = ["@u:x", "D", "alg", "1", "1"][..n].to_vec();
        let rows = stmt
            .query_map(rusqlite::params_from_iter(params), |r| {
                r.get::<_, String>(3)
            })
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        rows.join("; ")
    };
    let counts = plan(
        "SELECT algorithm, stored FROM otk_queue WHERE user_id = ?1 AND device_id = ?2 AND stored > 0",
    );
    assert!(
        counts.contains("SEARCH otk_queue USING PRIMARY KEY (user_id=? AND device_id=?)"),
        "{counts}"
    );
    let head = plan(
        "SELECT q.stored, q.issued, k.pos, k.key_id, k.key_json, k.digest \
         FROM otk_queue AS q JOIN one_time_key AS k \
         ON k.user_id = q.user_id AND k.device_id = q.device_id AND k.algorithm = q.algorithm \
         AND k.pos >= q.head \
         WHERE q.user_id = ?1 AND q.device_id = ?2 AND q.algorithm = ?3 AND q.stored > 0 \
         ORDER BY k.pos LIMIT ?4",
    );
    assert!(
        head.contains("SEARCH q USING PRIMARY KEY (user_id=? AND device_id=? AND algorithm=?)"),
        "{head}"
    );
    assert!(
        head.contains(
            "SEARCH k USING PRIMARY KEY (user_id=? AND device_id=? AND algorithm=? AND pos>?)"
        ),
        "{head}"
    );
    assert!(!head.contains("TEMP B-TREE"), "{head}");
    let by_id = plan(
        "SELECT pos, digest FROM one_time_key WHERE user_id = ?1 AND device_id = ?2 AND key_id = ?3",
    );
    assert!(
        by_id.contains(
            "USING COVERING INDEX one_time_key_id (user_id=? AND device_id=? AND key_id=?)"
        ),
        "{by_id}"
    );
    let unused = plan(
        "SELECT algorithm FROM fallback_key WHERE user_id = ?1 AND device_id = ?2 AND used = 0 ORDER BY algorithm",
    );
    assert!(
        unused.contains(
            "USING COVERING INDEX fallback_unused (user_id=? AND device_id=? AND used=?)"
        ),
        "{unused}"
    );
    assert!(!unused.contains("TEMP B-TREE"), "{unused}");
    let fallbacks = plan(
        "SELECT algorithm, key_id, key_json, used FROM fallback_key \
         WHERE user_id = ?1 AND device_id = ?2 ORDER BY algorithm",
    );
    assert!(
        fallbacks.contains("SEARCH fallback_key USING INDEX sqlite_autoindex_fallback_key_1 (user_id=? AND device_id=?)"),
        "{fallbacks}"
    );
    assert!(!fallbacks.contains("TEMP B-TREE"), "{fallbacks}");
    let unstore = plan(
        "UPDATE otk_queue SET stored = 0 \
         WHERE user_id = ?1 AND device_id = ?2 AND stored > 0 RETURNING algorithm, head",
    );
    assert!(
        unstore.contains("SEARCH otk_queue USING PRIMARY KEY (user_id=? AND device_id=?)"),
        "{unstore}"
    );
    let reset = plan(
        "DELETE FROM one_time_key \
         WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3 AND pos >= ?4",
    );
    assert!(
        reset.contains(
            "SEARCH one_time_key USING PRIMARY KEY (user_id=? AND device_id=? AND algorithm=? AND pos>?)"
        ),
        "{reset}"
    );
}

#[tokio::test]
async fn dropping_the_store_releases_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("close.sqlite");
    let store =
        SqliteStore::open_with(&path, SqliteOptions::new().synchronous(Synchronous::Normal))
            .await
            .unwrap();
    store
        .upload(&Upload::from_keys(device(0), [key("a")], []).unwrap())
        .await
        .unwrap();
    drop(store);
    // The last connection to close checkpoints and removes the WAL.
    let wal = dir.path().join("close.sqlite-wal");
    assert!(!wal.exists(), "WAL left behind: connections still open");
}

#[tokio::test]
async fn concurrent_operations_share_transactions() {
    // Many concurrent claims and uploads from one handle: all answered,
    // nothing issued twice (group commit batches them).
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(
        SqliteStore::open(dir.path().join("g.sqlite"))
            .await
            .unwrap(),
    );
    let d = device(0);
    let keys: Vec<_> = (0..200).map(|i| key(&format!("k{i}"))).collect();
    store
        .upload(&Upload::from_keys(d.clone(), keys, []).unwrap())
        .await
        .unwrap();
    // A key no claim takes, for the conflicting re-uploads.
    let other_alg = keyclaim::KeyId::parse("other:x").unwrap();
    let json = |v: &str| keyclaim::KeyJson::from_value(&serde_json::json!(v)).unwrap();
    store
        .upload(&Upload::from_keys(d.clone(), [(other_alg.clone(), json("one"))], []).unwrap())
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let (store, d, other_alg) = (store.clone(), d.clone(), other_alg.clone());
        tasks.push(tokio::spawn(async move {
            if i % 8 == 0 {
                // A conflicting re-upload fails on its own.
                let json = keyclaim::KeyJson::from_value(&serde_json::json!("two")).unwrap();
                let bad =
                    Upload::from_keys(d.clone(), [(other_alg, json), key("new")], []).unwrap();
                assert!(matches!(
                    store.upload(&bad).await,
                    Err(Error::Conflict { .. })
                ));
                Vec::new()
            } else {
                let t = ClaimTarget {
                    device: d,
                    algorithm: "signed_curve25519".parse().unwrap(),
                    count: 3,
                };
                store.claim(&[t]).await.unwrap().keys
            }
        }));
    }
    let mut seen = std::collections::BTreeSet::new();
    for t in tasks {
        for k in t.await.unwrap() {
            assert!(seen.insert(k.key_id.to_string()), "issued twice");
        }
    }
    assert_eq!(seen.len(), 56 * 3);
    let counts = store.otk_counts(&d).await.unwrap();
    assert_eq!(counts.get_str("signed_curve25519"), 200 - 56 * 3);
    assert_eq!(counts.get_str("other"), 1);
}

#[tokio::test]
async fn works_without_the_background_checkpointer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("auto.sqlite");
    let options = SqliteOptions::new().checkpoint_interval(None);
    let d = device(0);
    {
        let store = SqliteStore::open_with(&path, options.clone())
            .await
            .unwrap();
        let keys: Vec<_> = (0..300).map(|i| key(&format!("k{i}"))).collect();
        store
            .upload(&Upload::from_keys(d.clone(), keys, []).unwrap())
            .await
            .unwrap();
        let t = ClaimTarget {
            device: d.clone(),
            algorithm: "signed_curve25519".parse().unwrap(),
            count: 5,
        };
        for _ in 0..20 {
            assert_eq!(
                store
                    .claim(std::slice::from_ref(&t))
                    .await
                    .unwrap()
                    .keys
                    .len(),
                5
            );
        }
    }
    let store = SqliteStore::open_with(&path, options).await.unwrap();
    assert_eq!(store.otk_counts(&d).await.unwrap().total(), 200);
}

/// The WAL file is cut back to `wal_size_limit` when SQLite starts it over
/// after a complete checkpoint; without a limit it keeps its largest size.
#[tokio::test]
async fn the_wal_file_shrinks_to_its_limit_after_a_checkpoint() {
    async fn wal_after_burst(limit: u64) -> u64 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.sqlite");
        let options = SqliteOptions::new()
            .checkpoint_interval(None)
            .wal_size_limit(limit);
        let store = SqliteStore::open_with(&path, options).await.unwrap();
        // About 8 MiB of writes: the automatic checkpoint (1000 pages) runs
        // several times, and the WAL reaches about 4 MiB in between.
        for i in 0..40 {
            let keys: Vec<_> = (0..100).map(|k| key(&format!("k{i}x{k}"))).collect();
            store
                .upload(&Upload::from_keys(device(i), keys, []).unwrap())
                .await
                .unwrap();
        }
        // A complete checkpoint, then one more write: SQLite starts the WAL
        // over and, with a limit, truncates it.
        let other = rusqlite::Connection::open(&path).unwrap();
        other
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            .unwrap();
        drop(other);
        store
            .upload(&Upload::from_keys(device(99), [key("last")], []).unwrap())
            .await
            .unwrap();
        let wal = std::fs::metadata(dir.path().join("wal.sqlite-wal"))
            .unwrap()
            .len();
        drop(store);
        wal
    }
    let limit = 256 << 10;
    let limited = wal_after_burst(limit).await;
    let unlimited = wal_after_burst(u64::MAX >> 1).await;
    assert!(limited <= limit, "WAL {limited} bytes, limit {limit}");
    assert!(
        unlimited > 1 << 20,
        "without a limit the WAL keeps its size: {unlimited}"
    );
}

/// R11.3: a handle whose watcher reads the change log only after a row of
/// another handle was pruned sees the gap in the ids and tells its
/// subscribers, with one unknown event, that it missed changes; the rows
/// after the gap are reported as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_report_pruned_before_it_was_read_is_announced_as_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gap.sqlite");
    let writer = SqliteStore::open(&path).await.unwrap();
    // The watcher's first read comes 2 s after it opened: long after the
    // three uploads and the deletion below.
    let watcher = SqliteStore::open_with(
        &path,
        SqliteOptions::new().change_poll_interval(Some(Duration::from_secs(2))),
    )
    .await
    .unwrap();
    let mut events = watcher.subscribe();
    for i in 0..3 {
        writer
            .upload(&Upload::from_keys(device(i), [key("k")], []).unwrap())
            .await
            .unwrap();
    }
    // The middle row goes, as the writers' pruning removes old rows.
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.busy_timeout(Duration::from_secs(10)).unwrap();
    let deleted = raw
        .execute(
            "DELETE FROM change_log WHERE id = (SELECT max(id) - 1 FROM change_log)",
            [],
        )
        .unwrap();
    assert_eq!(deleted, 1);

    let mut unknown = false;
    let heard = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let event = events.recv().await.expect("subscription open");
            if event.is_unknown() {
                unknown = true;
            } else if event.devices() == [device(2)] {
                return;
            }
        }
    })
    .await;
    assert!(heard.is_ok(), "the row after the gap was not reported");
    assert!(unknown, "the missed report was not announced");
}
