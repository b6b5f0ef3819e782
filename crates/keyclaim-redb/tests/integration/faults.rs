//! Storage faults: after a full disk, the same store works again once
//! there is room (the writer reopens the redb file after an I/O error).
//!
//! Needs root and `mount -t tmpfs`; where that is unavailable the test
//! prints `SKIPPED` on stderr and passes.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use keyclaim::{Error, KeyStore, Upload};
use keyclaim_conformance::fixtures::{SC, dev, otks};
use keyclaim_redb::RedbStore;

/// A size-limited tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(at.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Fills the file system with one file until it is full.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    while f.write_all(&[0u8]).is_ok() {}
    let _ = f.sync_all();
}

fn upload_of(i: usize) -> Upload {
    let names: Vec<String> = (0..50).map(|n| format!("K{i}-{n}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    Upload::from_keys(
        dev("@full:example.org", &format!("D{i}")),
        otks(SC, &names),
        [],
    )
    .unwrap()
}

#[test]
fn same_store_recovers_after_disk_full() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(&dir.path().join("mnt"), "8M") else {
        keyclaim_conformance::report_skip(
            "faults::same_store_recovers_after_disk_full",
            "cannot mount a tmpfs (needs root)",
        );
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let path = fs.0.join("k.redb");
        let store = RedbStore::open(&path).await.unwrap();
        let mut acked = Vec::new();
        for i in 0..10 {
            store.upload(&upload_of(i)).await.unwrap();
            acked.push(i);
        }
        let filler = fs.0.join("filler");
        fill(&filler);
        let mut failed = Vec::new();
        for i in 10..200 {
            match store.upload(&upload_of(i)).await {
                Ok(_) => acked.push(i),
                Err(e @ Error::Storage { .. }) => {
                    assert!(
                        e.is_retryable(),
                        "an I/O failure should be retryable: {e:?}"
                    );
                    failed.push(i);
                }
                Err(other) => panic!("unexpected error on a full disk: {other:?}"),
            }
        }
        assert!(!failed.is_empty(), "the disk never filled up");
        std::fs::remove_file(&filler).unwrap();
        // The same handle: the writer reopens the file; an operation that
        // arrives while it does may still fail, retryably.
        let mut recovered = false;
        for attempt in 0..20 {
            match store.upload(&upload_of(1000 + attempt)).await {
                Ok(_) => {
                    acked.push(1000 + attempt);
                    recovered = true;
                    break;
                }
                Err(e) => assert!(e.is_retryable(), "{e:?}"),
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(
            recovered,
            "the store did not recover once the disk had room"
        );
        let check = |store: RedbStore, acked: Vec<usize>, failed: Vec<usize>| async move {
            for &i in &acked {
                let d = dev("@full:example.org", &format!("D{i}"));
                assert_eq!(store.otk_counts(&d).await.unwrap().get_str(SC), 50, "{d}");
            }
            for &i in &failed {
                let d = dev("@full:example.org", &format!("D{i}"));
                let n = store.otk_counts(&d).await.unwrap().get_str(SC);
                assert!(n == 0 || n == 50, "{d}: a failed upload left {n} keys");
            }
            store
        };
        let store = check(store, acked.clone(), failed.clone()).await;
        store.close().await.unwrap();
        let store = RedbStore::open(&path).await.unwrap();
        let store = check(store, acked, failed).await;
        store.close().await.unwrap();
    });
    drop(rt);
    drop(fs);
}
