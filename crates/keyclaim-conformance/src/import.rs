//! Import from the reference homeserver's key tables (R17.1): rows shaped
//! like Synapse's `e2e_one_time_keys_json` and `e2e_fallback_keys_json`,
//! fed through `keyclaim::transfer::import_devices` into the store under
//! test.

use keyclaim::transfer::{
    RowsInMemory, SourceFallback, SourceOtk, SourceRow, compare_counts, import_devices,
};
use keyclaim::{Device, KeyStore};

use crate::StoreFactory;
use crate::fixtures::*;

/// A one-time key row: `id` is `<algorithm>:<name>`, uploaded at `ts`.
fn otk_row(user: &str, device: &str, id: &str, ts: i64) -> SourceRow {
    let (algorithm, name) = id.split_once(':').expect("a fixture key ID");
    SourceRow::OneTimeKey(SourceOtk {
        user_id: user.into(),
        device_id: device.into(),
        algorithm: algorithm.into(),
        key_id: name.into(),
        ts_added_ms: ts,
        key_json: signed(&format!("k-{name}"), "sig").canonical().to_owned(),
    })
}

/// A fallback key row.
fn fallback_row(user: &str, device: &str, id: &str, used: bool) -> SourceRow {
    let (algorithm, name) = id.split_once(':').expect("a fixture key ID");
    SourceRow::Fallback(SourceFallback {
        user_id: user.into(),
        device_id: device.into(),
        algorithm: algorithm.into(),
        key_id: name.into(),
        key_json: signed_fallback(&format!("f-{name}"), "sig")
            .canonical()
            .to_owned(),
        used,
    })
}

const A: &str = "@a:example.org";
const B: &str = "@b:example.org";

/// Three devices in (user, device) order, rows of one device in no
/// particular order, as a database could return them; plus rows keyclaim
/// cannot hold.
fn source() -> Vec<SourceRow> {
    vec![
        otk_row(A, "D1", &format!("{SC}:K0"), 300),
        fallback_row(A, "D1", &format!("{SC}:FB"), true),
        otk_row(A, "D1", &format!("{SC}:Z9"), 100),
        otk_row(A, "D1", "alg2:P1", 100),
        otk_row(A, "D1", &format!("{SC}:M5"), 200),
        otk_row(A, "D1", &format!("{SC}:Z1"), 100),
        otk_row(A, "D1", &format!("{SC}:K1"), 300),
        // Not valid key IDs (R2.3): left out, the device still imported.
        otk_row(A, "D1", ":NOALG", 50),
        otk_row(A, "D1", &format!("{SC}:"), 50),
        fallback_row(A, "D2", &format!("{SC}:ONLY"), false),
        otk_row(B, "D3", "alg2:Q0", 10),
        fallback_row(B, "D3", "alg2:QFB", true),
        fallback_row(B, "D3", &format!("{SC}:SFB"), false),
        // A device ID over 255 bytes (R2.2): the whole device left out.
        otk_row(B, &"L".repeat(300), &format!("{SC}:X"), 1),
    ]
}

/// Imports `rows` into `store`, `page` rows at a time; the devices written.
async fn import<S: KeyStore + ?Sized>(store: &S, rows: Vec<SourceRow>, page: usize) -> u64 {
    let mut src = RowsInMemory::new(rows, page);
    let outcome = import_devices(&mut src, store, None, |_, _| Ok(()))
        .await
        .expect("import");
    assert!(outcome.complete);
    outcome.tally.devices
}

cases! { $ import;
    /// R17.1: imported one-time keys are handed out in the reference
    /// homeserver's issue order (upload time, then key ID), fallback keys
    /// keep their used flag, and counts match; later uploads come after
    /// every imported key.
    pub async fn r17_1_import_keeps_issue_order_and_fallback_flags<F: StoreFactory>(f: &F) {
        let store = fresh(f).await;
        assert_eq!(import(&store, source(), 2).await, 3);
        let (d1, d2, d3) = (dev(A, "D1"), dev(A, "D2"), dev(B, "D3"));
        assert_eq!(count(&store, &d1, SC).await, 5);
        assert_eq!(count(&store, &d1, "alg2").await, 1);
        assert_eq!(count(&store, &d3, "alg2").await, 1);
        assert!(
            unused(&store, &d1).await.is_empty(),
            "D1's fallback key is used"
        );
        assert_eq!(unused(&store, &d2).await, [SC]);
        assert_eq!(unused(&store, &d3).await, [SC], "QFB is used, SFB is not");
        let mut src = RowsInMemory::new(source(), 3);
        let counts = compare_counts(&mut src, &store, 10).await.expect("compare");
        assert_eq!((counts.devices, counts.mismatched), (3, 0), "{counts:?}");

        put(&store, &d1, otks(SC, &["A0"]), vec![]).await;
        let mut order = Vec::new();
        for _ in 0..7 {
            let key = claim_one(&store, &d1, SC).await.expect("a key");
            order.push((key.key_id.to_string(), key.fallback));
        }
        let sc = |n: &str| (format!("{SC}:{n}"), false);
        assert_eq!(
            order,
            [
                sc("Z1"),
                sc("Z9"),
                sc("M5"),
                sc("K0"),
                sc("K1"),
                sc("A0"),
                (format!("{SC}:FB"), true)
            ]
        );
        let key = claim_one(&store, &d3, "alg2").await.expect("a key");
        assert_eq!((key.key_id.as_str(), key.fallback), ("alg2:Q0", false));
        let key = claim_one(&store, &d3, "alg2").await.expect("a key");
        assert_eq!((key.key_id.as_str(), key.fallback), ("alg2:QFB", true));
    }

    /// R17.1: an import stopped part-way and resumed after its last device
    /// (a device imported twice does no harm) ends with the same state as
    /// one uninterrupted import; what does not validate is counted.
    pub async fn r17_1_import_resumes_to_the_same_state<F: StoreFactory>(f: &F) {
        let once = fresh(f).await;
        import(&once, source(), 100).await;

        let store = fresh(f).await;
        let mut src = RowsInMemory::new(source(), 1);
        let mut saved: Option<Device> = None;
        let first = import_devices(&mut src, &store, Some(1), |_, d| {
            saved = Some(d.clone());
            Ok(())
        })
        .await
        .expect("first slice");
        assert!(!first.complete);
        assert_eq!(first.tally.devices, 1);
        let at = saved.expect("a position was reported");
        assert_eq!(first.last.as_ref(), Some(&at));
        assert_eq!(at, dev(A, "D1"));
        // Resume at the saved device itself, as after a crash between an
        // import and the save of its position: D1 is imported again.
        let rest: Vec<SourceRow> = source()
            .into_iter()
            .filter(|r| (r.user_id(), r.device_id()) >= (A, "D1"))
            .collect();
        let mut src = RowsInMemory::new(rest, 4);
        let second = import_devices(&mut src, &store, None, |_, _| Ok(()))
            .await
            .expect("the rest");
        assert!(second.complete);
        assert_eq!(second.tally.devices, 3);
        assert_eq!(second.tally.skipped_devices, 1);
        assert_eq!(second.tally.skipped_one_time_keys, 3);
        assert_eq!(full_state(&store).await, full_state(&once).await);
    }
}
