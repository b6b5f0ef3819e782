//! Export and import of whole device states (for migrations).

use keyclaim::KeyStore;

use crate::StoreFactory;
use crate::fixtures::*;

async fn populate<S: KeyStore>(store: &S) {
    for i in 0..30 {
        let d = dev(&format!("@u{:02}:example.org", i % 7), &format!("D{i}"));
        put(store, &d, numbered_otks(SC, "A", 4), otks(SC, &["F"])).await;
        put(store, &d, numbered_otks("alg2", "B", 2), vec![]).await;
        if i % 3 == 0 {
            claim_n(store, &d, SC, 2).await;
            claim_n(store, &d, "alg2", 3).await;
        }
    }
}

cases! { $ export;
    /// Exporting a store and importing it into a fresh one gives the same state,
    /// and the copy answers claims exactly like the original.
    pub async fn export_import_round_trip<F: StoreFactory>(f: &F) {
        let src = fresh(f).await;
        populate(&src).await;
        let state = full_state(&src).await;
        assert_eq!(state.len(), 30);
        let dst = fresh(f).await;
        // Something the import must replace.
        put(&dst, &state[0].device, otks(SC, &["STALE"]), vec![]).await;
        let mut after = None;
        loop {
            let page = src.export_devices(after.as_ref(), 7).await.expect("export");
            let Some(last) = page.last() else { break };
            after = Some(last.device.clone());
            for snap in &page {
                dst.import_device(snap).await.expect("import");
            }
        }
        assert_eq!(full_state(&dst).await, state);
        for snap in &state {
            let d = &snap.device;
            // Re-uploading an issued key stores nothing on both.
            for (alg, issued) in &snap.issued {
                let k = &issued[0];
                let json = signed(&format!("k-{}", k.key_id.name()), "sig");
                let a = put(&src, d, vec![(k.key_id.clone(), json.clone())], vec![]).await;
                let b = put(&dst, d, vec![(k.key_id.clone(), json)], vec![]).await;
                assert_eq!(a.counts, b.counts, "{alg}");
            }
            // New uploads sort after imported keys, on both.
            put(&src, d, otks(SC, &["0NEW"]), vec![]).await;
            put(&dst, d, otks(SC, &["0NEW"]), vec![]).await;
            for alg in [SC, "alg2"] {
                let a = claim_n(&src, d, alg, 5).await;
                let b = claim_n(&dst, d, alg, 5).await;
                assert_eq!(a.keys, b.keys);
            }
        }
    }

    /// Export pages through devices in (user, device) byte order, each once.
    pub async fn export_pages_in_device_order<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        populate(&store).await;
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = store
                .export_devices(after.as_ref(), 4)
                .await
                .expect("export");
            assert!(page.len() <= 4);
            let Some(last) = page.last() else { break };
            after = Some(last.device.clone());
            seen.extend(page.into_iter().map(|s| s.device));
        }
        let mut sorted = seen.clone();
        sorted.sort_by(|a, b| {
            (
                a.user_id.as_str().as_bytes(),
                a.device_id.as_str().as_bytes(),
            )
                .cmp(&(
                    b.user_id.as_str().as_bytes(),
                    b.device_id.as_str().as_bytes(),
                ))
        });
        sorted.dedup();
        assert_eq!(seen, sorted, "pages in order, no repeats");
        assert_eq!(seen.len(), 30);
    }

    /// The library's copy, diff and check (what `keyclaim migrate` and
    /// `keyclaim check` run): a copy has no differences and no problems; a
    /// change on one side shows up in the diff.
    pub async fn copy_diff_and_check<F: StoreFactory>(f: &F) {
        let src = fresh(f).await;
        populate(&src).await;
        let dst = fresh(f).await;
        let mut batches = 0;
        let report = keyclaim::transfer::copy_store(&src, &dst, 8, None, |_, _| batches += 1)
            .await
            .expect("copy");
        assert_eq!(report.devices, 30);
        assert_eq!(batches, 4);
        assert!(
            keyclaim::transfer::diff_stores(&src, &dst, 7, 100)
                .await
                .expect("diff")
                .is_empty()
        );
        let check = keyclaim::transfer::check_store(&dst, 9)
            .await
            .expect("check");
        assert_eq!(
            (check.devices, check.problems.len()),
            (30, 0),
            "{:?}",
            check.problems
        );
        let d = full_state(&src).await[3].device.clone();
        claim_one(&src, &d, SC).await;
        assert_eq!(
            keyclaim::transfer::diff_stores(&src, &dst, 7, 100)
                .await
                .expect("diff"),
            [d]
        );
        // Resuming after the last device copies nothing more.
        let last = full_state(&src).await.last().map(|s| s.device.clone());
        let again = keyclaim::transfer::copy_store(&src, &dst, 8, last, |_, _| {})
            .await
            .expect("copy");
        assert_eq!(again.devices, 0);
    }
}
