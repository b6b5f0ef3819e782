//! Data keyclaim did not write, put into its column families behind its
//! back through RocksDB's own API: the operation that meets it fails with
//! `Error::Corrupt` before anything is written, nothing panics, and `check`
//! reports it (R10.7).

use keyclaim::transfer::check_store;
use keyclaim::{ClaimTarget, Error, KeyStore};
use keyclaim_conformance::fixtures::{SC, alg, dev, numbered_otks, put};
use keyclaim_kv::Space;
use keyclaim_rocksdb::RocksStore;

use crate::rt;

/// Writes one row into keyclaim's column family of `space`, as a
/// misbehaving program sharing the database would.
fn tamper(store: &RocksStore, space: Space, key: &[u8], value: &[u8]) {
    let db = store.db();
    let cf = db
        .cf_handle(store.options().get_column_family(space))
        .unwrap();
    db.put_cf(&cf, key, value).unwrap();
}

fn untamper(store: &RocksStore, space: Space, key: &[u8]) {
    let db = store.db();
    let cf = db
        .cf_handle(store.options().get_column_family(space))
        .unwrap();
    db.delete_cf(&cf, key).unwrap();
}

fn assert_corrupt<T: std::fmt::Debug>(result: keyclaim::Result<T>, what: &str) {
    assert!(
        matches!(result, Err(Error::Corrupt { .. })),
        "{what}: expected Corrupt, got {result:?}"
    );
}

/// `user \0 device \0 algorithm \0 position`: a one-time key row's key.
fn key_row(user: &str, device: &str, alg: &str, pos: u64) -> Vec<u8> {
    let mut k = Vec::new();
    for s in [user, device, alg] {
        k.extend_from_slice(s.as_bytes());
        k.push(0);
    }
    k.extend_from_slice(&pos.to_be_bytes());
    k
}

#[test]
fn corrupt_values_fail_the_operation_before_commit_and_check_reports_them() {
    let dir = keyclaim_testing::temp_dir();
    rt().block_on(async {
        let store = RocksStore::open(dir.path()).await.unwrap();
        let (a, b) = (dev("@a:x", "A"), dev("@b:x", "B"));
        put(&store, &a, numbered_otks(SC, "k", 2), vec![]).await;
        put(&store, &b, numbered_otks(SC, "k", 2), vec![]).await;

        // A one-time key row that is not keyclaim's encoding.
        tamper(
            &store,
            Space::Keys,
            &key_row("@a:x", "A", SC, 0),
            b"\x00\x01",
        );
        let (ta, tb) = (
            [ClaimTarget::one(a.clone(), alg(SC))],
            [ClaimTarget::one(b.clone(), alg(SC))],
        );
        let (bad, good) = tokio::join!(store.claim(&ta), store.claim(&tb));
        assert_corrupt(bad, "claim of the damaged key");
        assert_eq!(good.unwrap().keys.len(), 1, "the batch-mate went on");
        assert_eq!(store.otk_counts(&a).await.unwrap().get_str(SC), 2);
        assert_corrupt(check_store(&store, 10).await, "check of a damaged key");

        // A device record that is not keyclaim's encoding.
        let record = store
            .db()
            .get_cf(
                &store.db().cf_handle("keyclaim_devices").unwrap(),
                b"@b:x\0B\0",
            )
            .unwrap()
            .unwrap();
        tamper(
            &store,
            Space::Devices,
            b"@b:x\0B\0",
            &record[..record.len() - 1],
        );
        assert_corrupt(store.claim(&tb).await, "claim on a damaged record");
        assert_corrupt(store.sync_state(&b).await, "sync_state");
        tamper(&store, Space::Devices, b"@b:x\0B\0", &record);
        assert_eq!(store.otk_counts(&b).await.unwrap().get_str(SC), 1);
        store.close().await.unwrap();
    });
}

#[test]
fn keys_of_the_wrong_shape_are_reported_by_check() {
    let dir = keyclaim_testing::temp_dir();
    rt().block_on(async {
        let store = RocksStore::open(dir.path()).await.unwrap();
        let a = dev("@a:x", "A");
        put(&store, &a, numbered_otks(SC, "k", 2), vec![]).await;
        assert!(check_store(&store, 10).await.unwrap().problems.is_empty());
        let cases: Vec<(Space, Vec<u8>, Vec<u8>)> = vec![
            // A record key without its terminator.
            (Space::Devices, b"@z:x\0Z".to_vec(), vec![0; 16]),
            // A key row of the device without a position.
            (
                Space::Keys,
                b"@a:x\0A\0signed_curve25519\0".to_vec(),
                vec![],
            ),
            // An index row with a short digest.
            (
                Space::Ids,
                key_row("@a:x", "A", "signed_curve25519:k000000", 0),
                vec![1],
            ),
        ];
        for (space, key, value) in cases {
            tamper(&store, space, &key, &value);
            assert_corrupt(check_store(&store, 10).await, &format!("{space} {key:?}"));
            untamper(&store, space, &key);
        }
        assert!(check_store(&store, 10).await.unwrap().problems.is_empty());
        assert_eq!(store.otk_counts(&a).await.unwrap().get_str(SC), 2);
        store.close().await.unwrap();
    });
}
