//! `keyclaim import --from synapse-sqlite PATH --to URL`: the fixture that
//! a real Synapse wrote (keyclaim-import's `tests/fixtures/synapse.db`)
//! into an SQLite store, resumable through `--checkpoint`; exit code 1 when
//! the final comparison fails, 2 on errors. `--from conduwuit-rocksdb DIR`:
//! keyclaim-import-conduwuit's tuwunel fixture, in upload order.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::keyclaim;
use keyclaim::Device;
use keyclaim::transfer::Checkpoint;

fn fixture_copy(dir: &Path) -> PathBuf {
    let src =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../keyclaim-import/tests/fixtures/synapse.db");
    let path = dir.join("homeserver.db");
    std::fs::copy(src, &path).unwrap();
    path
}

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let o = keyclaim(args);
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `keyclaim import --from synapse-sqlite SOURCE --to TARGET --checkpoint CP --quiet`.
fn import_with_checkpoint(source: &Path, target: &str, cp: &Path) -> (Option<i32>, String, String) {
    run(&[
        "import",
        "--from",
        "synapse-sqlite",
        source.to_str().unwrap(),
        "--to",
        target,
        "--checkpoint",
        cp.to_str().unwrap(),
        "--quiet",
    ])
}

#[test]
fn imports_a_synapse_sqlite_database_and_verifies_it() {
    let dir = keyclaim_testing::temp_dir();
    let source = fixture_copy(dir.path());
    let target = format!("sqlite:{}", dir.path().join("k.db").display());
    let cp = dir.path().join("cp");
    let (code, out, err) = import_with_checkpoint(&source, &target, &cp);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("imported 8 devices"), "{out}");
    assert!(out.contains("skipped 1 devices"), "{out}");
    assert!(out.contains("verified"), "{out}");
    assert!(!cp.exists(), "a verified import removes its checkpoint");
    let (code, out, _) = run(&["check", &target]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("8 devices") && out.contains("0 problems"),
        "{out}"
    );
}

#[test]
fn exit_code_1_when_counts_differ_and_2_on_errors() {
    let dir = keyclaim_testing::temp_dir();
    let source = fixture_copy(dir.path());
    let target = format!("sqlite:{}", dir.path().join("k.db").display());
    // A checkpoint past the source's last device: nothing is imported, the
    // comparison over the whole source fails, the checkpoint stays.
    let cp = dir.path().join("cp");
    let last = Device::parse("@mallory:fixture.test", "MALLORY1").unwrap();
    Checkpoint::new(&cp).save(&last).unwrap();
    let (code, out, err) = import_with_checkpoint(&source, &target, &cp);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        out.contains("COUNTS DIFFER") && out.contains("VERIFY FAILED"),
        "{out}"
    );
    assert!(cp.exists());
    let devices = keyclaim_testing::current_thread_runtime().block_on(devices(&target));
    assert!(devices.is_empty(), "nothing past the checkpoint to import");

    let missing = dir.path().join("none.db");
    let (code, _, err) = run(&[
        "import",
        "--from",
        "synapse-sqlite",
        missing.to_str().unwrap(),
        "--to",
        "memory:",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(!missing.exists());
    let (code, _, err) = run(&["import", "--from", "dendrite", "x", "--to", "memory:"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("synapse-sqlite"), "{err}");
}

/// The devices a store holds.
async fn devices(url: &str) -> Vec<Device> {
    let store = keyclaim_open::open(url).await.unwrap();
    store
        .export_devices(None, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.device)
        .collect()
}

/// A copy of keyclaim-import-conduwuit's RocksDB fixture (tuwunel's layout)
/// in `dir` (a read-only open may still write RocksDB's info log).
fn rocksdb_fixture_copy(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../keyclaim-import-conduwuit/tests/fixtures/tuwunel");
    let dst = dir.join("tuwunel-db");
    std::fs::create_dir(&dst).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
    dst
}

#[test]
fn imports_a_tuwunel_rocksdb_or_names_the_missing_feature() {
    let dir = keyclaim_testing::temp_dir();
    let target = format!("sqlite:{}", dir.path().join("k.db").display());
    let import = |source: &Path| {
        run(&[
            "import",
            "--from",
            "conduwuit-rocksdb",
            source.to_str().unwrap(),
            "--to",
            &target,
            "--quiet",
        ])
    };
    if !keyclaim_import::conduwuit::SUPPORTED {
        // A build without the `conduwuit` feature (plain `cargo test`; the
        // workspace build turns it on) refuses the source and says why.
        let (code, out, err) = import(dir.path());
        assert_eq!(code, Some(2), "{out}\n{err}");
        assert!(err.contains("`conduwuit` feature"), "{err}");
        return;
    }
    let (code, out, err) = import(&rocksdb_fixture_copy(dir.path()));
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("onetimekeyid4225_otk (upload order)"), "{out}");
    assert!(out.contains("imported 6 devices"), "{out}");
    assert!(out.contains("skipped 1 devices"), "{out}");
    assert!(out.contains("verified"), "{out}");
    // Upload order: the first key alice's phone uploaded, not the lowest ID.
    let first = keyclaim_testing::current_thread_runtime().block_on(async {
        let store = keyclaim_open::open(&target).await.unwrap();
        let device = Device::parse("@alice:example.org", "PHONE").unwrap();
        let out = store
            .claim(&[keyclaim::ClaimTarget::one(
                device,
                keyclaim::Algorithm::signed_curve25519(),
            )])
            .await
            .unwrap();
        out.keys[0].key_id.as_str().to_owned()
    });
    assert_eq!(first, "signed_curve25519:ZZZ");
    let (code, out, _) = run(&["check", &target]);
    assert_eq!(code, Some(0), "{out}");
}
