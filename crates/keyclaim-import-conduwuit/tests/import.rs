//! Imports of RocksDB databases written with the conduwuit family's real
//! encodings (both one-time key layouts, both fallback key layouts) into
//! the memory and SQLite stores: claims hand out the keys in the source's
//! order (upload order, else key ID order), fallback keys keep their used
//! flag, counts match, an interrupted import resumes to the same state, the
//! source is not changed, and sources that are not of the family or are
//! corrupt give clear errors.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use keyclaim::transfer::{Checkpoint, diff_stores};
use keyclaim::{Algorithm, ClaimTarget, Device, Error, KeyStore};
use keyclaim_import::conduwuit::{FallbackLayout, OtkLayout, import_rocksdb, layout};
use keyclaim_import::{ImportOptions, ImportReport};
use keyclaim_import_conduwuit::{
    FallbackCf, OTK_KEY_ID, OTK_MSC4225, OtkCf, Sample, SourceDb, entries, key_json, write_sample,
};
use serde_json::Value;

fn rt() -> tokio::runtime::Runtime {
    keyclaim_testing::runtime(2)
}

/// A sample database in a fresh temp dir (kept alive by the returned dir).
fn sample(otk: OtkCf, fallback: FallbackCf) -> (tempfile::TempDir, PathBuf, Sample) {
    let dir = keyclaim_testing::temp_dir();
    let path = dir.path().join("db");
    let sample = write_sample(&path, otk, fallback).unwrap();
    (dir, path, sample)
}

fn assert_report(report: &ImportReport, sample: &Sample) {
    assert!(report.ok(), "{report}");
    let t = &report.tally;
    assert_eq!(
        (
            t.devices,
            t.one_time_keys,
            t.fallback_keys,
            t.used_fallback_keys,
            t.skipped_devices,
            t.skipped_one_time_keys,
            t.skipped_fallback_keys,
        ),
        (
            sample.devices.len() as u64,
            sample.one_time_keys,
            sample.fallback_keys,
            sample.used_fallback_keys,
            sample.skipped_devices,
            sample.skipped_one_time_keys,
            0,
        ),
        "{report}"
    );
    let counts = report.counts.as_ref().unwrap();
    assert_eq!(counts.devices, sample.devices.len() as u64, "{report}");
}

/// Counts, unused fallback algorithms and used flags as the sample says,
/// then every claim, one key at a time, in the sample's order (this
/// consumes the keys).
async fn assert_claims(store: &dyn KeyStore, sample: &Sample) {
    let mut compared = 0;
    for d in &sample.devices {
        let device = Device::parse(&d.user_id, &d.device_id).unwrap();
        let state = store.sync_state(&device).await.unwrap();
        for (alg, n) in &d.counts {
            assert_eq!(state.one_time_key_counts.get_str(alg), *n, "{device} {alg}");
        }
        let mut unused: Vec<String> = state
            .unused_fallback_key_types
            .iter()
            .map(|a| a.as_str().to_owned())
            .collect();
        unused.sort();
        assert_eq!(unused, d.unused_fallbacks, "{device}");
        let used: BTreeMap<String, bool> = store
            .fallback_keys(&device)
            .await
            .unwrap()
            .values()
            .map(|f| (f.key_id.as_str().to_owned(), f.used))
            .collect();
        assert_eq!(used, d.fallback_used, "{device}");
        for (alg, seq) in &d.claims {
            let algorithm = Algorithm::parse(alg.as_str()).unwrap();
            for (key_id, json, fallback) in seq {
                let out = store
                    .claim(&[ClaimTarget::one(device.clone(), algorithm.clone())])
                    .await
                    .unwrap();
                assert_eq!(out.keys.len(), 1, "{device} {alg}: expected {key_id}");
                let got = &out.keys[0];
                assert_eq!(
                    (got.key_id.as_str(), got.fallback),
                    (key_id.as_str(), *fallback),
                    "{device} {alg}"
                );
                let want: Value = serde_json::from_str(json).unwrap();
                assert_eq!(got.key_json.to_value(), want, "{device} {key_id}");
                compared += 1;
            }
            // Nothing else is left: no one-time key, and the fallback key
            // (if any) is handed out again, now used.
            let out = store
                .claim(&[ClaimTarget::one(device.clone(), algorithm.clone())])
                .await
                .unwrap();
            let again: Vec<(&str, bool)> = out
                .keys
                .iter()
                .map(|k| (k.key_id.as_str(), k.fallback))
                .collect();
            let fallback: Vec<(&str, bool)> = seq
                .iter()
                .filter(|c| c.2)
                .map(|c| (c.0.as_str(), true))
                .collect();
            assert_eq!(again, fallback, "{device} {alg}: after the last key");
        }
    }
    // 13 one-time keys and 4 fallback keys.
    assert!(compared >= 17, "only {compared} claims compared");
}

async fn import_sample_into(store_url: &str, otk: OtkCf, fallback: FallbackCf, page: usize) {
    let store: Arc<dyn KeyStore> = keyclaim_open::open(store_url).await.unwrap();
    let (_dir, path, sample) = sample(otk, fallback);
    let report = import_rocksdb(&path, &*store, &ImportOptions::new().page(page))
        .await
        .unwrap();
    assert_report(&report, &sample);
    assert_claims(&*store, &sample).await;
}

#[test]
fn tuwunel_upload_order_into_memory() {
    rt().block_on(import_sample_into(
        "memory:",
        OtkCf::Msc4225,
        FallbackCf::Tuwunel,
        1000,
    ));
}

#[test]
fn tuwunel_upload_order_into_memory_in_pages_of_two() {
    // Devices span pages; pages end inside a device's one-time keys and
    // between its column families.
    for page in [1, 2, 3] {
        rt().block_on(import_sample_into(
            "memory:",
            OtkCf::Msc4225,
            FallbackCf::Tuwunel,
            page,
        ));
    }
}

#[test]
fn tuwunel_upload_order_into_sqlite() {
    let dir = keyclaim_testing::temp_dir();
    let url = format!("sqlite:{}", dir.path().join("k.db").display());
    rt().block_on(import_sample_into(
        &url,
        OtkCf::Msc4225,
        FallbackCf::Tuwunel,
        5,
    ));
}

#[test]
fn key_id_order_with_continuwuity_fallbacks_into_memory() {
    rt().block_on(import_sample_into(
        "memory:",
        OtkCf::KeyId,
        FallbackCf::Continuwuity,
        1000,
    ));
}

#[test]
fn key_id_order_with_continuwuity_fallbacks_into_sqlite() {
    let dir = keyclaim_testing::temp_dir();
    let url = format!("sqlite:{}", dir.path().join("k.db").display());
    rt().block_on(import_sample_into(
        &url,
        OtkCf::KeyId,
        FallbackCf::Continuwuity,
        4,
    ));
}

#[test]
fn key_id_order_with_tuwunel_fallbacks() {
    // tuwunel between its fallback keys and MSC4225.
    rt().block_on(import_sample_into(
        "memory:",
        OtkCf::KeyId,
        FallbackCf::Tuwunel,
        7,
    ));
}

#[test]
fn the_two_orders_differ_on_the_sample() {
    let (_d1, _p1, upload) = sample(OtkCf::Msc4225, FallbackCf::Tuwunel);
    let (_d2, _p2, key_id) = sample(OtkCf::KeyId, FallbackCf::Tuwunel);
    let first = |s: &Sample| s.devices[2].claims["signed_curve25519"][0].0.clone();
    assert_eq!(upload.devices[2].device_id, "PHONE");
    assert_eq!(first(&upload), "signed_curve25519:ZZZ");
    assert_eq!(first(&key_id), "signed_curve25519:000");
}

#[test]
fn layouts_are_detected() {
    rt().block_on(async {
        for (otk, fallback, want_otk, want_fallback) in [
            (
                OtkCf::Msc4225,
                FallbackCf::Tuwunel,
                OtkLayout::UploadOrder,
                FallbackLayout::Tuwunel,
            ),
            (
                OtkCf::KeyId,
                FallbackCf::Continuwuity,
                OtkLayout::KeyIdOrder,
                FallbackLayout::Continuwuity,
            ),
        ] {
            let (_dir, path, _) = sample(otk, fallback);
            let l = layout(&path).await.unwrap();
            assert_eq!(l.one_time_keys, want_otk);
            assert_eq!(l.fallback_keys, vec![want_fallback]);
        }
    });
}

#[test]
fn msc4225_wins_over_a_leftover_older_column_family() {
    // tuwunel reads only the MSC4225 column family (and drops the older
    // one when it opens the database): keys left in the older one are not
    // the homeserver's keys any more.
    rt().block_on(async {
        let dir = keyclaim_testing::temp_dir();
        let path = dir.path().join("db");
        let db = SourceDb::create(&path, &[OTK_MSC4225, OTK_KEY_ID]).unwrap();
        let json = key_json("N", false);
        db.msc4225_otk("@u:hs", "D", 2, "signed_curve25519:NEW", &json)
            .unwrap();
        db.key_id_otk("@u:hs", "D", "signed_curve25519:OLD", &json)
            .unwrap();
        db.key_id_otk("@v:hs", "D", "signed_curve25519:OLD", &json)
            .unwrap();
        db.finish().unwrap();
        let store: Arc<dyn KeyStore> = keyclaim_open::open("memory:").await.unwrap();
        let report = import_rocksdb(&path, &*store, &ImportOptions::new())
            .await
            .unwrap();
        assert!(report.ok(), "{report}");
        assert_eq!((report.tally.devices, report.tally.one_time_keys), (1, 1));
        let all = store.export_devices(None, 10).await.unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(
            all[0].one_time_keys[0].key_id.as_str(),
            "signed_curve25519:NEW"
        );
    });
}

#[test]
fn an_interrupted_import_resumes_to_the_one_shot_result() {
    rt().block_on(async {
        let (dir, path, sample) = sample(OtkCf::Msc4225, FallbackCf::Tuwunel);
        let cp = dir.path().join("import.checkpoint");
        let resumed: Arc<dyn KeyStore> = keyclaim_open::open("memory:").await.unwrap();
        let first = import_rocksdb(
            &path,
            &*resumed,
            &ImportOptions::new()
                .page(2)
                .checkpoint(&cp)
                .stop_after_devices(2),
        )
        .await
        .unwrap();
        assert!(!first.complete && !first.ok(), "{first}");
        assert_eq!(first.tally.devices, 2);
        let saved = Checkpoint::new(&cp).load().unwrap().unwrap();
        // The first two devices in byte order: `@a:hs` before `@a:hs.org`.
        assert_eq!(
            (saved.user_id.as_str(), saved.device_id.as_str()),
            ("@a:hs.org", "D")
        );
        let second = import_rocksdb(
            &path,
            &*resumed,
            &ImportOptions::new().page(3).checkpoint(&cp),
        )
        .await
        .unwrap();
        assert!(second.ok(), "{second}");
        assert_eq!(second.resumed_after, Some(saved));
        assert_eq!(
            first.tally.devices + second.tally.devices,
            sample.devices.len() as u64
        );
        assert!(!cp.exists(), "a finished import removes its checkpoint");

        let one_shot: Arc<dyn KeyStore> = keyclaim_open::open("memory:").await.unwrap();
        let report = import_rocksdb(&path, &*one_shot, &ImportOptions::new())
            .await
            .unwrap();
        assert!(report.ok(), "{report}");
        assert_eq!(
            diff_stores(&*resumed, &*one_shot, 100, 10).await.unwrap(),
            Vec::<Device>::new()
        );
        assert_claims(&*resumed, &sample).await;
    });
}

#[test]
fn the_source_is_not_changed() {
    rt().block_on(async {
        let (_dir, path, _) = sample(OtkCf::Msc4225, FallbackCf::Tuwunel);
        let before = entries(&path).unwrap();
        let files_before = files(&path);
        let store: Arc<dyn KeyStore> = keyclaim_open::open("memory:").await.unwrap();
        let report = import_rocksdb(&path, &*store, &ImportOptions::new())
            .await
            .unwrap();
        assert!(report.ok(), "{report}");
        // Claims go to the target only.
        let device = Device::parse("@alice:example.org", "PHONE").unwrap();
        let out = store
            .claim(&[ClaimTarget::one(device, Algorithm::signed_curve25519())])
            .await
            .unwrap();
        assert_eq!(out.keys.len(), 1);
        assert_eq!(files(&path), files_before, "no file of the source changed");
        assert_eq!(entries(&path).unwrap(), before);
        assert!(before.len() > 20, "{} entries", before.len());
    });
}

/// Every file of a directory with its contents.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn import_error(path: &Path) -> Error {
    rt().block_on(async {
        let store: Arc<dyn KeyStore> = keyclaim_open::open("memory:").await.unwrap();
        import_rocksdb(path, &*store, &ImportOptions::new())
            .await
            .expect_err("the import must fail")
    })
}

#[test]
fn sources_that_are_not_of_the_family_are_refused() {
    let dir = keyclaim_testing::temp_dir();
    // Missing, a file, an empty directory: not RocksDB.
    let missing = dir.path().join("missing");
    let file = dir.path().join("file");
    std::fs::write(&file, b"not a database").unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    for path in [&missing, &file, &empty] {
        let err = import_error(path);
        assert!(
            matches!(err, Error::InvalidConfig { .. }),
            "{}: {err}",
            path.display()
        );
    }
    assert!(!missing.exists(), "nothing is created");
    assert_eq!(
        std::fs::read_dir(&empty).unwrap().count(),
        0,
        "nothing is created"
    );
    // RocksDB, but another application's (no key column family).
    let other = dir.path().join("other");
    SourceDb::create(&other, &["userid_password"])
        .unwrap()
        .finish()
        .unwrap();
    let err = import_error(&other);
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(OTK_MSC4225) && text.contains(OTK_KEY_ID),
        "{text}"
    );
}

/// A sample database with one more entry, written raw.
fn corrupted(cf: &str, key: &[u8], value: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = keyclaim_testing::temp_dir();
    let path = dir.path().join("db");
    let db = SourceDb::create(
        &path,
        &[OTK_MSC4225, keyclaim_import_conduwuit::FALLBACK_TUWUNEL],
    )
    .unwrap();
    let json = key_json("A", false);
    db.msc4225_otk("@u:hs", "D", 1, "signed_curve25519:A", &json)
        .unwrap();
    db.put(cf, key, value).unwrap();
    db.finish().unwrap();
    (dir, path)
}

#[test]
fn corrupt_entries_are_clear_errors() {
    let fb = keyclaim_import_conduwuit::FALLBACK_TUWUNEL;
    let cases: [(&str, &[u8], &[u8], &str); 5] = [
        // A one-time key whose key has no count.
        (
            OTK_MSC4225,
            b"@v:hs\xffD\xffsigned_curve25519:B",
            b"{}",
            "count",
        ),
        // A key without the separator after the device.
        (OTK_MSC4225, b"@v:hs\xffD", b"{}", "0xFF device 0xFF"),
        // A key ID that is not UTF-8.
        (
            OTK_MSC4225,
            b"@v:hs\xffD\xff\0\0\0\0\0\0\0\x02\xff\xc3",
            b"{}",
            "not UTF-8",
        ),
        // A fallback entry that is not tuwunel's JSON.
        (
            fb,
            b"@v:hs\xffD\xffsigned_curve25519",
            b"\x00\xffsigned_curve25519:F\xff{}",
            "key_id",
        ),
        // A user ID that is not UTF-8.
        (
            OTK_MSC4225,
            b"@v:\xc3\xffD\xff\0\0\0\0\0\0\0\x02\xffa:b",
            b"{}",
            "not UTF-8",
        ),
    ];
    for (cf, key, value, hint) in cases {
        let (_dir, path) = corrupted(cf, key, value);
        let err = import_error(&path);
        assert!(matches!(err, Error::Corrupt { .. }), "{key:?}: {err}");
        let text = err.to_string();
        assert!(text.contains(cf) || text.contains(OTK_MSC4225), "{text}");
        assert!(text.contains(hint), "{key:?}: {text}");
    }
}

#[test]
fn invalid_rows_are_left_out_and_listed() {
    rt().block_on(async {
        let (_dir, path, _) = sample(OtkCf::Msc4225, FallbackCf::Tuwunel);
        let store: Arc<dyn KeyStore> = keyclaim_open::open("memory:").await.unwrap();
        let report = import_rocksdb(&path, &*store, &ImportOptions::new())
            .await
            .unwrap();
        let skips: Vec<String> = report.tally.skips.iter().map(ToString::to_string).collect();
        let text = skips.join("\n");
        for want in [
            "\"not-a-user\" \"X\" (whole device): invalid user ID",
            "one-time key \"signed_curve25519:\": invalid key ID",
            "one-time key \"signed_curve25519:NOTJSON\": invalid key JSON",
            "one-time key \"signed_curve25519:DUP\": duplicate",
        ] {
            assert!(text.contains(want), "{want} not in\n{text}");
        }
        // The report names IDs, never key material.
        assert!(!report.to_string().contains("key-"), "{report}");
    });
}
