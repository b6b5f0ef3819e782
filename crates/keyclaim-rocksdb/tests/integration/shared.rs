//! A database the homeserver opened, shared through `RocksStore::with_db`:
//! keyclaim's column families are created beside the homeserver's, whose
//! data stays untouched; the store is usable through `KeysApi`; the data
//! survives closing the store and reopening the database.

use std::sync::Arc;

use keyclaim::{KeyStore, KeysApi};
use keyclaim_conformance::fixtures::{SC, claim_one, count, dev, numbered_otks, put};
use keyclaim_kv::Space;
use keyclaim_rocksdb::rocksdb::{self, DB};
use keyclaim_rocksdb::{RocksOptions, RocksStore};

use crate::rt;

const HOST_CF: &str = "host_events";

/// Opens the homeserver's database in `dir` with its own column family
/// (and whatever else the directory already holds).
fn host_db(dir: &std::path::Path) -> Arc<DB> {
    let mut options = rocksdb::Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    let mut cfs = DB::list_cf(&options, dir).unwrap_or_default();
    if !cfs.iter().any(|c| c == HOST_CF) {
        cfs.push(HOST_CF.to_owned());
    }
    Arc::new(DB::open_cf(&options, dir, cfs).unwrap())
}

/// Every key and value of the host's column family.
fn host_rows(db: &DB) -> Vec<(Vec<u8>, Vec<u8>)> {
    let cf = db.cf_handle(HOST_CF).unwrap();
    db.iterator_cf(&cf, rocksdb::IteratorMode::Start)
        .map(|item| {
            let (k, v) = item.unwrap();
            (k.to_vec(), v.to_vec())
        })
        .collect()
}

#[test]
fn with_db_shares_the_homeservers_database_and_leaves_its_data_alone() {
    let dir = keyclaim_testing::temp_dir();
    rt().block_on(async {
        let db = host_db(dir.path());
        {
            let cf = db.cf_handle(HOST_CF).unwrap();
            // Keys that sort around keyclaim's own: the host's column family
            // is its own map, whatever its keys.
            for key in [&b"@a:x\0A\0"[..], b"keyclaim_meta", b"\x00", b"\xff\xff"] {
                db.put_cf(&cf, key, b"host value").unwrap();
            }
        }
        let before = host_rows(&db);

        let store = RocksStore::with_db(Arc::clone(&db), RocksOptions::new())
            .await
            .unwrap();
        for space in Space::ALL {
            let name = store.options().get_column_family(space);
            assert!(db.cf_handle(name).is_some(), "{name} created");
        }
        let api = KeysApi::new(Arc::new(store) as Arc<dyn KeyStore>);
        let a = dev("@a:x", "A");
        put(api.store(), &a, numbered_otks(SC, "k", 5), vec![]).await;
        let claimed = claim_one(api.store(), &a, SC).await.unwrap();
        assert_eq!(count(api.store(), &a, SC).await, 4);
        assert_eq!(host_rows(&db), before, "the host's data is untouched");

        // The homeserver goes on writing its own column family meanwhile.
        {
            let cf = db.cf_handle(HOST_CF).unwrap();
            db.put_cf(&cf, b"later", b"v").unwrap();
        }
        drop(api);
        assert_eq!(host_rows(&db).len(), before.len() + 1);

        // A second store on the same database and column families (after the
        // first closed) sees the state, and the claimed key is gone.
        let store = RocksStore::with_db(Arc::clone(&db), RocksOptions::new())
            .await
            .unwrap();
        assert_eq!(count(&store, &a, SC).await, 4);
        let next = claim_one(&store, &a, SC).await.unwrap();
        assert_ne!(next.key_id, claimed.key_id);
        store.close().await.unwrap();
    });
    // The whole database closed and opened again: both sides persisted.
    rt().block_on(async {
        let db = host_db(dir.path());
        assert_eq!(host_rows(&db).len(), 5);
        let store = RocksStore::with_db(Arc::clone(&db), RocksOptions::new())
            .await
            .unwrap();
        assert_eq!(count(&store, &dev("@a:x", "A"), SC).await, 3);
        store.close().await.unwrap();
    });
}

#[test]
fn column_family_names_come_from_the_options_and_stores_stay_apart() {
    let dir = keyclaim_testing::temp_dir();
    rt().block_on(async {
        let db = host_db(dir.path());
        let one = RocksStore::with_db(
            Arc::clone(&db),
            RocksOptions::new().column_family_prefix("one_"),
        )
        .await
        .unwrap();
        let two = RocksStore::with_db(
            Arc::clone(&db),
            RocksOptions::new()
                .column_family_prefix("two_")
                .column_family(Space::Keys, "two_otks"),
        )
        .await
        .unwrap();
        assert!(db.cf_handle("one_keys").is_some());
        assert!(db.cf_handle("two_otks").is_some());
        assert!(db.cf_handle("two_keys").is_none());
        assert!(db.cf_handle("keyclaim_keys").is_none());
        let a = dev("@a:x", "A");
        put(&one, &a, numbered_otks(SC, "k", 3), vec![]).await;
        assert_eq!(count(&one, &a, SC).await, 3);
        assert_eq!(count(&two, &a, SC).await, 0, "separate column families");
        one.close().await.unwrap();
        two.close().await.unwrap();

        let clash = RocksOptions::new().column_family(Space::Meta, "keyclaim_keys");
        assert!(matches!(
            RocksStore::with_db(Arc::clone(&db), clash).await,
            Err(keyclaim::Error::InvalidConfig { .. })
        ));
    });
}

#[test]
fn open_keeps_column_families_it_finds_and_refuses_a_locked_database() {
    let dir = keyclaim_testing::temp_dir();
    let path = dir.path().join("db");
    rt().block_on(async {
        // A database with a column family of someone else's.
        drop(host_db(&path));
        let store = RocksStore::open(&path).await.unwrap();
        let a = dev("@a:x", "A");
        put(&store, &a, numbered_otks(SC, "k", 2), vec![]).await;
        assert!(store.db().cf_handle(HOST_CF).is_some());
        // RocksDB's lock: a second open of the same directory fails, and
        // retryably (the first store may be closing).
        let second = RocksStore::open(&path).await;
        match second {
            Err(e @ keyclaim::Error::Storage { .. }) => assert!(e.is_retryable(), "{e}"),
            other => panic!("a locked database opened: {other:?}"),
        }
        store.close().await.unwrap();
        let store = RocksStore::open(&path).await.unwrap();
        assert_eq!(count(&store, &a, SC).await, 2);
        store.close().await.unwrap();
    });
}
