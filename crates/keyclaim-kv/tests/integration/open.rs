//! Opening: the format version stamped into an empty engine, a newer one
//! refused, data without a version refused as corrupt; and the documented
//! key layout, pinned.

use std::sync::Arc;

use keyclaim::{Error, KeyStore};
use keyclaim_conformance::fixtures::{SC, alice, claim_one, kid, put, signed, signed_fallback};
use keyclaim_kv::{FORMAT_VERSION, KvEngine, KvStore, MemoryEngine, Space, WriteBatch};

use crate::rt;

fn meta_version(engine: &MemoryEngine) -> Option<Vec<u8>> {
    engine.get(Space::Meta, b"format_version").unwrap()
}

fn engine_with(space: Space, key: &[u8], value: &[u8]) -> Arc<MemoryEngine> {
    let engine = Arc::new(MemoryEngine::new());
    let mut batch = WriteBatch::new();
    batch.put(space, key.to_vec(), value.to_vec());
    engine.write(&batch, true).unwrap();
    engine
}

#[test]
fn an_empty_engine_gets_the_current_version_and_keeps_it() {
    rt().block_on(async {
        let engine = Arc::new(MemoryEngine::new());
        let store = KvStore::open(Arc::clone(&engine)).await.unwrap();
        assert_eq!(
            meta_version(&engine),
            Some(FORMAT_VERSION.to_be_bytes().to_vec())
        );
        put(
            &store,
            &alice(),
            vec![(kid("signed_curve25519:a"), signed("k", "s"))],
            vec![],
        )
        .await;
        store.close().await.unwrap();
        let store = KvStore::open(Arc::clone(&engine)).await.unwrap();
        assert_eq!(store.otk_counts(&alice()).await.unwrap().get_str(SC), 1);
        assert_eq!(
            meta_version(&engine),
            Some(FORMAT_VERSION.to_be_bytes().to_vec())
        );
    });
}

#[test]
fn a_newer_version_is_refused_and_left_alone() {
    rt().block_on(async {
        let newer = (FORMAT_VERSION + 1).to_be_bytes();
        let engine = engine_with(Space::Meta, b"format_version", &newer);
        match KvStore::open(Arc::clone(&engine)).await {
            Err(Error::UnsupportedVersion {
                backend,
                found,
                supported,
            }) => {
                assert_eq!(backend, "kv");
                assert_eq!(found, FORMAT_VERSION as i64 + 1);
                assert_eq!(supported, FORMAT_VERSION as i64);
            }
            other => panic!("expected UnsupportedVersion, got {other:?}"),
        }
        assert_eq!(meta_version(&engine), Some(newer.to_vec()));
        assert_eq!(engine.len(Space::Meta), 1, "nothing was written");
    });
}

#[test]
fn data_without_a_version_is_refused_as_corrupt() {
    rt().block_on(async {
        for space in [Space::Devices, Space::Keys, Space::Ids, Space::Meta] {
            let engine = engine_with(space, b"someone else's", b"data");
            match KvStore::open(Arc::clone(&engine)).await {
                Err(Error::Corrupt { what, .. }) => {
                    assert!(what.contains("no keyclaim format version"), "{what}")
                }
                other => panic!("{space}: expected Corrupt, got {other:?}"),
            }
            assert_eq!(meta_version(&engine), None, "{space}: nothing stamped");
        }
        // A version that does not decode.
        let engine = engine_with(Space::Meta, b"format_version", b"\x01\x02");
        assert!(matches!(
            KvStore::open(engine).await,
            Err(Error::Corrupt { .. })
        ));
    });
}

/// The layout of the crate docs, byte for byte: a change to it needs a new
/// format version and a migration.
#[test]
fn the_key_layout_is_as_documented() {
    rt().block_on(async {
        let engine = Arc::new(MemoryEngine::new());
        let store = KvStore::open(Arc::clone(&engine)).await.unwrap();
        put(
            &store,
            &alice(),
            vec![
                (kid("signed_curve25519:a"), signed("ka", "s")),
                (kid("signed_curve25519:b"), signed("kb", "s")),
            ],
            vec![(kid("signed_curve25519:f"), signed_fallback("kf", "s"))],
        )
        .await;
        let claimed = claim_one(&store, &alice(), SC).await.unwrap();
        assert_eq!(claimed.key_id.as_str(), "signed_curve25519:a");
        let device = b"@alice:example.org\0ALICEDEV\0".to_vec();
        let row = |key_id_or_alg: &str, pos: u64| {
            let mut k = device.clone();
            k.extend_from_slice(key_id_or_alg.as_bytes());
            k.push(0);
            k.extend_from_slice(&pos.to_be_bytes());
            k
        };
        let keys = |space| {
            let mut out = Vec::new();
            engine
                .scan(space, b"", None, &mut |k, _| {
                    out.push(k.to_vec());
                    std::ops::ControlFlow::Continue(())
                })
                .unwrap();
            out
        };
        assert_eq!(
            keys(Space::Meta),
            vec![b"format_version".to_vec(), b"next_seq".to_vec()]
        );
        assert_eq!(
            engine.get(Space::Meta, b"next_seq").unwrap(),
            Some(2u64.to_be_bytes().to_vec()),
            "one upload took sequence number 1"
        );
        assert_eq!(keys(Space::Devices), vec![device.clone()]);
        assert_eq!(
            keys(Space::Keys),
            vec![row("signed_curve25519", 0), row("signed_curve25519", 1)],
            "the claimed key stays as a remembered issued key"
        );
        assert_eq!(
            keys(Space::Ids),
            vec![row("signed_curve25519:a", 0), row("signed_curve25519:b", 1)]
        );
        // The device record: one queue (first 0, head 1, end 2), one unused
        // fallback key.
        let record = engine.get(Space::Devices, &device).unwrap().unwrap();
        let mut want = Vec::new();
        want.extend_from_slice(&1u64.to_be_bytes());
        want.extend_from_slice(&17u32.to_be_bytes());
        want.extend_from_slice(b"signed_curve25519");
        for n in [0u64, 1, 2] {
            want.extend_from_slice(&n.to_be_bytes());
        }
        want.extend_from_slice(&1u64.to_be_bytes());
        want.extend_from_slice(&17u32.to_be_bytes());
        want.extend_from_slice(b"signed_curve25519");
        want.extend_from_slice(&19u32.to_be_bytes());
        want.extend_from_slice(b"signed_curve25519:f");
        want.push(0);
        assert_eq!(&record[..want.len()], want.as_slice());
    });
}
