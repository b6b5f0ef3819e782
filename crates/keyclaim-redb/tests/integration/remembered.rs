//! Remembered issued keys (R3.4) in format 2: claimed keys stay behind the
//! queue's head; exactly the newest `remembered_issued_keys` are remembered,
//! as the reference model does, and the rows of older ones are pruned in
//! chunks.

use keyclaim::{ClaimTarget, KeyStore, Limits, Upload};
use keyclaim_conformance::fixtures::{SC, alg, alice, kid, numbered_otks, signed};
use keyclaim_redb::{RedbOptions, RedbStore};

use crate::rt;

#[test]
fn exactly_the_newest_issued_keys_are_remembered() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mut limits = Limits::default();
        limits.remembered_issued_keys = 3;
        let store =
            RedbStore::open_with(dir.path().join("k.redb"), RedbOptions::new().limits(limits))
                .await
                .unwrap();
        let a = alice();
        let keys = numbered_otks(SC, "K", 300);
        store
            .upload(&Upload::from_keys(a.clone(), keys.clone(), []).unwrap())
            .await
            .unwrap();
        let target = ClaimTarget {
            count: 5,
            ..ClaimTarget::one(a.clone(), alg(SC))
        };
        let mut claimed = Vec::new();
        for _ in 0..50 {
            let out = store.claim(std::slice::from_ref(&target)).await.unwrap();
            claimed.extend(out.keys.into_iter().map(|k| k.key_id));
            let snap = store.export_devices(None, 1).await.unwrap();
            let issued = snap[0].issued.get(&alg(SC)).map_or(0, Vec::len);
            assert_eq!(
                issued,
                claimed.len().min(3),
                "remembered after {} claimed",
                claimed.len()
            );
            // The remembered ones are the most recently issued, in order.
            let tail: Vec<_> = snap[0].issued[&alg(SC)]
                .iter()
                .map(|k| k.key_id.clone())
                .collect();
            assert_eq!(tail[..], claimed[claimed.len() - tail.len()..]);
        }
        assert_eq!(claimed.len(), 250);
        assert_eq!(store.otk_counts(&a).await.unwrap().get_str(SC), 50);
        // The newest issued key is remembered: a re-upload stores nothing.
        let last = claimed[249].name().to_owned();
        let retry = vec![(
            kid(&format!("{SC}:{last}")),
            signed(&format!("k-{last}"), "x"),
        )];
        let out = store
            .upload(&Upload::from_keys(a.clone(), retry, []).unwrap())
            .await
            .unwrap();
        assert_eq!(out.counts.get_str(SC), 50);
        // The fourth newest is forgotten (its row may still wait to be
        // pruned): it is a new key again.
        let fourth = claimed[246].name().to_owned();
        let again = vec![(
            kid(&format!("{SC}:{fourth}")),
            signed(&format!("k-{fourth}"), "x"),
        )];
        let out = store
            .upload(&Upload::from_keys(a.clone(), again, []).unwrap())
            .await
            .unwrap();
        assert_eq!(out.counts.get_str(SC), 51);
        // The oldest was forgotten long ago: it is a new key again.
        let first = claimed[0].name().to_owned();
        let again = vec![(
            kid(&format!("{SC}:{first}")),
            signed(&format!("k-{first}"), "x"),
        )];
        let out = store
            .upload(&Upload::from_keys(a.clone(), again, []).unwrap())
            .await
            .unwrap();
        assert_eq!(out.counts.get_str(SC), 52);
        // Both are handed out after the older stored keys, in upload order.
        let mut rest = Vec::new();
        loop {
            let out = store.claim(std::slice::from_ref(&target)).await.unwrap();
            if out.keys.iter().all(|k| k.fallback) || out.keys.is_empty() {
                break;
            }
            rest.extend(out.keys.into_iter().map(|k| k.key_id));
        }
        assert_eq!(rest.len(), 52);
        assert_eq!(rest[50], claimed[246]);
        assert_eq!(rest[51], claimed[0]);
        assert_eq!(rest[0], keys[250].0);
    });
}
