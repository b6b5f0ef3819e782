//! Corrupt stored values (R10.7): a claim that meets a stored key that does
//! not read back fails before anything is committed, so no key is used up
//! undelivered, and `check` names the damaged row.

// A test: a failed expectation is how it reports.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use common::{device, key};
use keyclaim::{Algorithm, ClaimTarget, Error, FallbackTarget, KeyStore, Upload};
use keyclaim_sqlite::SqliteStore;

fn alg() -> Algorithm {
    Algorithm::signed_curve25519()
}

fn target(i: usize) -> ClaimTarget {
    ClaimTarget::one(device(i), alg())
}

async fn count(store: &SqliteStore, i: usize) -> u64 {
    store.otk_counts(&device(i)).await.unwrap().total()
}

fn is_corrupt<T: std::fmt::Debug>(out: keyclaim::Result<T>) -> bool {
    matches!(out, Err(Error::Corrupt { .. }))
}

/// Each device's oldest key is damaged in another way (its JSON, its key
/// ID, its digest): its claim fails with `Error::Corrupt` and its count
/// stays; a claim naming a sound device too fails whole, taking nothing.
#[tokio::test]
async fn r10_7_a_corrupt_key_fails_its_claim_before_commit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corrupt.sqlite");
    let store = SqliteStore::open(&path).await.unwrap();
    for i in 0..4 {
        let keys = (0..3).map(|j| key(&format!("k{j}")));
        let fallback = [key("fb")];
        let upload = Upload::from_keys(device(i), keys, fallback).unwrap();
        store.upload(&upload).await.unwrap();
    }
    let other = rusqlite::Connection::open(&path).unwrap();
    let damage = |i: usize, set: &str| {
        let sql = format!(
            "UPDATE one_time_key SET {set} WHERE device_id = ?1 AND key_id = 'signed_curve25519:k0'"
        );
        let changed = other.execute(&sql, [device(i).device_id.as_str()]).unwrap();
        assert_eq!(changed, 1);
    };
    damage(0, "key_json = '{\"key\": '");
    damage(1, "key_id = 'no colon'");
    damage(2, "digest = x'00'");

    for i in 0..3 {
        assert!(is_corrupt(store.claim(&[target(i)]).await), "device {i}");
        assert!(is_corrupt(store.claim_one_time_keys(&[target(i)]).await));
        assert_eq!(count(&store, i).await, 3, "device {i}: no key used up");
    }
    // One claim of a sound device and a damaged one: one atomic step, so
    // neither is applied.
    assert!(is_corrupt(store.claim(&[target(3), target(0)]).await));
    assert_eq!(count(&store, 3).await, 3);
    // The sound device's claim alone goes through.
    assert_eq!(store.claim(&[target(3)]).await.unwrap().keys.len(), 1);
    assert_eq!(count(&store, 3).await, 2);

    // A damaged fallback key is not marked used by the claim that fails.
    other
        .execute(
            "UPDATE fallback_key SET key_json = 'nonsense' WHERE device_id = ?1",
            [device(3).device_id.as_str()],
        )
        .unwrap();
    let fallback = FallbackTarget {
        device: device(3),
        algorithm: alg(),
        mark_used: true,
    };
    assert!(is_corrupt(store.claim_fallback_keys(&[fallback]).await));
    assert_eq!(
        store.unused_fallback_types(&device(3)).await.unwrap(),
        vec![alg()],
        "the fallback key is still unused"
    );

    // `check` names the first damaged row.
    let err = keyclaim::transfer::check_store(&store, 100)
        .await
        .unwrap_err();
    let text = format!("{err}");
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    assert!(text.contains(&device(0).to_string()), "{text}");
    assert!(text.contains("signed_curve25519:k0"), "{text}");
}
