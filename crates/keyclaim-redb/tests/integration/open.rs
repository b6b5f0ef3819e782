//! Opening rules: one user per file (in this process and across
//! processes), format version checks, files that are not redb files.

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;

use keyclaim::{Error, KeyStore};
use keyclaim_conformance::fixtures::{SC, alice, otks};
use keyclaim_redb::{AlreadyOpen, FORMAT_VERSION, RedbStore};

use crate::rt;

#[test]
fn second_open_in_this_process_fails_clearly() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.redb");
        let first = RedbStore::open(&path).await.unwrap();
        let err = RedbStore::open(&path).await.unwrap_err();
        assert!(AlreadyOpen::is(&err), "not AlreadyOpen: {err:?}");
        assert!(matches!(err, Error::Storage { .. }));
        let chain = format!("{:?}", anyhow_chain(&err));
        assert!(chain.contains("already open"), "{chain}");
        // Closing releases the lock.
        first.close().await.unwrap();
        let again = RedbStore::open(&path).await.unwrap();
        drop(again);
        // Plain drop releases it too.
        RedbStore::open(&path).await.unwrap();
    });
}

fn anyhow_chain(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut out = vec![e.to_string()];
    let mut s = e.source();
    while let Some(x) = s {
        out.push(x.to_string());
        s = x.source();
    }
    out
}

const HOLD_ENV: &str = "KEYCLAIM_REDB_HOLD_PATH";

/// The child role of `open_held_by_another_process_fails_clearly`: opens
/// the file, says so, and holds it until its stdin closes.
fn hold_child() {
    let path = std::env::var(HOLD_ENV).unwrap();
    rt().block_on(async {
        let store = RedbStore::open(&path).await.unwrap();
        println!("@@ held");
        std::io::stdout().flush().unwrap();
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        store.close().await.unwrap();
    });
}

/// Another process holds the file (a child role of
/// `keyclaim_testing::process`: this test, started with the role `hold`).
#[test]
fn open_held_by_another_process_fails_clearly() {
    if keyclaim_testing::process::is_child("hold") {
        return hold_child();
    }
    let dir = keyclaim_testing::temp_dir();
    let path = dir.path().join("k.redb");
    let mut child = keyclaim_testing::process::child_command(
        "open::open_held_by_another_process_fails_clearly",
        "hold",
    )
    .env(HOLD_ENV, &path)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "child ended early");
        // libtest may print "test open::open_held_... " before it.
        if line.contains("@@ held") {
            break;
        }
    }
    rt().block_on(async {
        let err = RedbStore::open(&path).await.unwrap_err();
        assert!(AlreadyOpen::is(&err), "not AlreadyOpen: {err:?}");
    });
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    rt().block_on(async {
        RedbStore::open(&path).await.unwrap();
    });
}

#[test]
fn unknown_format_version_is_refused() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.redb");
        RedbStore::open(&path).await.unwrap().close().await.unwrap();
        {
            let db = redb::Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let def: redb::TableDefinition<'_, &str, u64> = redb::TableDefinition::new("meta");
                let mut meta = txn.open_table(def).unwrap();
                meta.insert("format_version", FORMAT_VERSION + 1).unwrap();
            }
            txn.commit().unwrap();
        }
        let err = RedbStore::open(&path).await.unwrap_err();
        match err {
            Error::UnsupportedVersion {
                backend,
                found,
                supported,
            } => {
                assert_eq!(backend, "redb");
                assert_eq!(found, FORMAT_VERSION as i64 + 1);
                assert_eq!(supported, FORMAT_VERSION as i64);
            }
            other => panic!("expected UnsupportedVersion, got {other:?}"),
        }
    });
}

#[test]
fn not_a_redb_file_is_an_error_not_a_panic() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.redb");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let err = RedbStore::open(&path).await.unwrap_err();
        assert!(matches!(err, Error::Storage { .. }), "{err:?}");
    });
}

#[test]
fn reopen_keeps_data_and_format() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.redb");
        let store = RedbStore::open(&path).await.unwrap();
        let upload = keyclaim::Upload::from_keys(alice(), otks(SC, &["A", "B"]), []).unwrap();
        store.upload(&upload).await.unwrap();
        store.close().await.unwrap();
        let store = RedbStore::open(&path).await.unwrap();
        assert_eq!(store.otk_counts(&alice()).await.unwrap().get_str(SC), 2);
    });
}

/// The tables of format version 1, as that format wrote them.
mod v1 {
    use redb::TableDefinition;

    type Fallback<'a> = (&'a str, &'a str, bool, [u8; 32]);
    type Issued<'a> = (&'a str, [u8; 32]);

    pub(super) const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
    pub(super) const OTKS: TableDefinition<'_, (&str, &str, &str, u64, &str), &str> =
        TableDefinition::new("otks");
    pub(super) const OTK_INDEX: TableDefinition<'_, (&str, &str, &str), (u64, [u8; 32])> =
        TableDefinition::new("otk_index");
    pub(super) const ALG_COUNTS: TableDefinition<'_, (&str, &str, &str), (u64, u64)> =
        TableDefinition::new("alg_counts");
    pub(super) const FALLBACKS: TableDefinition<'_, (&str, &str, &str), Fallback<'_>> =
        TableDefinition::new("fallbacks");
    pub(super) const ISSUED: TableDefinition<'_, (&str, &str, &str, u64), Issued<'_>> =
        TableDefinition::new("issued");
    pub(super) const ISSUED_INDEX: TableDefinition<'_, (&str, &str, &str, [u8; 32]), u64> =
        TableDefinition::new("issued_index");
}

/// Writes a format 1 file: alice has stored `signed_curve25519` keys B, A
/// (one upload, seq 1) and C (seq 2), an `alg2` key X (seq 3), two
/// remembered issued keys Z1 then Z2 (issue seqs 4 and 5) and an unused
/// fallback key; bob has only a used fallback key.
fn write_v1_file(path: &std::path::Path) {
    use keyclaim_conformance::fixtures::{signed, signed_fallback};
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let (u, d) = ("@alice:example.org", "ALICEDEV");
        let mut meta = txn.open_table(v1::META).unwrap();
        meta.insert("format_version", 1).unwrap();
        meta.insert("next_seq", 6).unwrap();
        let mut otks = txn.open_table(v1::OTKS).unwrap();
        let mut index = txn.open_table(v1::OTK_INDEX).unwrap();
        for (alg, seq, name) in [(SC, 1, "B"), (SC, 1, "A"), (SC, 2, "C"), ("alg2", 3, "X")] {
            let id = format!("{alg}:{name}");
            let json = signed(&format!("k-{name}"), "sig");
            otks.insert((u, d, alg, seq, id.as_str()), json.canonical())
                .unwrap();
            index
                .insert((u, d, id.as_str()), (seq, *json.digest().as_bytes()))
                .unwrap();
        }
        let mut counts = txn.open_table(v1::ALG_COUNTS).unwrap();
        counts.insert((u, d, SC), (3, 2)).unwrap();
        counts.insert((u, d, "alg2"), (1, 0)).unwrap();
        let mut issued = txn.open_table(v1::ISSUED).unwrap();
        let mut issued_index = txn.open_table(v1::ISSUED_INDEX).unwrap();
        for (seq, name) in [(4, "Z1"), (5, "Z2")] {
            let id = format!("{SC}:{name}");
            let digest = *signed(&format!("k-{name}"), "sig").digest().as_bytes();
            issued
                .insert((u, d, SC, seq), (id.as_str(), digest))
                .unwrap();
            issued_index
                .insert((u, d, id.as_str(), digest), seq)
                .unwrap();
        }
        let mut fallbacks = txn.open_table(v1::FALLBACKS).unwrap();
        let fb = signed_fallback("fb-alice", "sig");
        fallbacks
            .insert(
                (u, d, SC),
                (
                    "signed_curve25519:F",
                    fb.canonical(),
                    false,
                    *fb.digest().as_bytes(),
                ),
            )
            .unwrap();
        let fb = signed_fallback("fb-bob", "sig");
        fallbacks
            .insert(
                ("@bob:example.org", "BOBDEV", SC),
                (
                    "signed_curve25519:G",
                    fb.canonical(),
                    true,
                    *fb.digest().as_bytes(),
                ),
            )
            .unwrap();
    }
    txn.commit().unwrap();
}

/// A format 1 file is migrated on open: same counts, same claim order, the
/// remembered issued keys still refuse to be stored again (R3.4), fallback
/// state kept, the sequence counter continues, and the old tables are gone.
#[test]
fn format_1_file_is_migrated_on_open() {
    use keyclaim::{Algorithm, ClaimTarget, Upload};
    use keyclaim_conformance::fixtures::{alg, bob, signed};
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.redb");
        write_v1_file(&path);
        let store = RedbStore::open(&path).await.unwrap();
        let a = alice();
        let counts = store.otk_counts(&a).await.unwrap();
        assert_eq!((counts.get_str(SC), counts.get_str("alg2")), (3, 1));
        assert_eq!(
            store.unused_fallback_types(&a).await.unwrap(),
            vec![Algorithm::parse(SC).unwrap()]
        );
        assert!(
            store
                .unused_fallback_types(&bob())
                .await
                .unwrap()
                .is_empty()
        );
        // Z1 was issued: re-uploading it stores nothing; a new key is stored
        // after the migrated ones.
        let up = Upload::from_keys(
            a.clone(),
            vec![
                (
                    keyclaim_conformance::fixtures::kid("signed_curve25519:Z1"),
                    signed("k-Z1", "other-sig"),
                ),
                (
                    keyclaim_conformance::fixtures::kid("signed_curve25519:0NEW"),
                    signed("k-0NEW", "sig"),
                ),
            ],
            [],
        )
        .unwrap();
        assert_eq!(store.upload(&up).await.unwrap().counts.get_str(SC), 4);
        let target = ClaimTarget {
            count: 5,
            ..ClaimTarget::one(a.clone(), alg(SC))
        };
        let out = store.claim(std::slice::from_ref(&target)).await.unwrap();
        let names: Vec<&str> = out.keys.iter().map(|k| k.key_id.name()).collect();
        assert_eq!(names, ["A", "B", "C", "0NEW"]);
        assert_eq!(out.keys[0].key_json, signed("k-A", "sig"));
        assert!(out.keys.iter().all(|k| !k.fallback));
        let out = store.claim(std::slice::from_ref(&target)).await.unwrap();
        assert_eq!(out.keys.len(), 1);
        assert!(out.keys[0].fallback);
        let x = store
            .claim(&[ClaimTarget::one(a.clone(), alg("alg2"))])
            .await
            .unwrap();
        assert_eq!(x.keys[0].key_id.name(), "X");
        let snap = store.export_devices(None, 10).await.unwrap();
        let issued: Vec<&str> = snap[0].issued[&alg(SC)]
            .iter()
            .map(|k| k.key_id.name())
            .collect();
        assert_eq!(issued, ["Z1", "Z2", "A", "B", "C", "0NEW"]);
        store.close().await.unwrap();
        // The version is stamped and the format 1 tables are gone.
        let db = redb::Database::create(&path).unwrap();
        let read = redb::ReadableDatabase::begin_read(&db).unwrap();
        let version = read
            .open_table(v1::META)
            .unwrap()
            .get("format_version")
            .unwrap()
            .unwrap()
            .value();
        assert_eq!(version, FORMAT_VERSION);
        let names: Vec<String> = read
            .list_tables()
            .unwrap()
            .map(|t| redb::TableHandle::name(&t).to_owned())
            .collect();
        for old in ["otks", "otk_index", "alg_counts", "issued", "issued_index"] {
            assert!(!names.iter().any(|n| n == old), "{old} left: {names:?}");
        }
        drop(read);
        drop(db);
        // Opening again finds version 2 and changes nothing.
        let store = RedbStore::open(&path).await.unwrap();
        assert_eq!(store.otk_counts(&a).await.unwrap().get_str(SC), 0);
    });
}
