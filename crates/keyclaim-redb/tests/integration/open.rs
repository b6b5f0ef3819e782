//! Opening rules: one user per file (in this process and across
//! processes), format version checks, files that are not redb files.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use keyclaim::{Error, KeyStore};
use keyclaim_conformance::fixtures::{SC, alice, otks};
use keyclaim_redb::{AlreadyOpen, FORMAT_VERSION, RedbStore};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

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
#[test]
fn hold_child() {
    let Ok(path) = std::env::var(HOLD_ENV) else {
        return;
    };
    rt().block_on(async {
        let store = RedbStore::open(&path).await.unwrap();
        println!("@@ held");
        std::io::stdout().flush().unwrap();
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        store.close().await.unwrap();
    });
}

#[test]
fn open_held_by_another_process_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.redb");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "open::hold_child",
            "--nocapture",
            "--test-threads=1",
        ])
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
        // libtest may print "test open::hold_child ... " before it.
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
