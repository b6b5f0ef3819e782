//! `keyclaim migrate` round trip sqlite -> redb -> postgres -> sqlite, then
//! `check` and `stats`; the copy answers every claim, count and fallback
//! query exactly as the source. The PostgreSQL leg needs a server
//! (`KEYCLAIM_TEST_POSTGRES_URL` or a throwaway cluster); under `CI=true` it
//! is required.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::process::Output;

use common::keyclaim;

use keyclaim::{Algorithm, ClaimTarget, Device, KeyId, KeyJson, KeyStore, Upload};
use serde_json::json;

fn ok(o: &Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "exit {:?}\n{out}\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn device(i: usize) -> Device {
    Device::parse(
        &format!("@user{:02}:example.org", i % 9),
        &format!("DEV{i}"),
    )
    .unwrap()
}

fn key(name: &str, fallback: bool) -> (KeyId, KeyJson) {
    let mut v = json!({"key": format!("k-{name}"), "signatures": {"@u:x": {"ed25519:D": "s"}}});
    if fallback {
        v["fallback"] = json!(true);
    }
    (
        KeyId::parse(format!("signed_curve25519:{name}")).unwrap(),
        KeyJson::from_value(&v).unwrap(),
    )
}

async fn populate(store: &dyn KeyStore) {
    for i in 0..40 {
        let d = device(i);
        let otks = (0..6)
            .map(|j| key(&format!("A{j}"), false))
            .collect::<Vec<_>>();
        store
            .upload(&Upload::from_keys(d.clone(), otks, vec![key("F", true)]).unwrap())
            .await
            .unwrap();
        let more = (0..3)
            .map(|j| key(&format!("B{j}"), false))
            .collect::<Vec<_>>();
        store
            .upload(&Upload::from_keys(d.clone(), more, vec![]).unwrap())
            .await
            .unwrap();
        let claims = i % 4 * 3; // 0, 3, 6 or 9 keys: some devices reach their fallback
        for _ in 0..claims {
            store
                .claim(&[ClaimTarget::one(d.clone(), Algorithm::signed_curve25519())])
                .await
                .unwrap();
        }
    }
}

/// Everything a client could observe of a device, consuming its keys.
async fn observe(store: &dyn KeyStore, d: &Device) -> Vec<String> {
    let mut seen = vec![format!("{:?}", store.otk_counts(d).await.unwrap())];
    seen.push(format!(
        "{:?}",
        store.unused_fallback_types(d).await.unwrap()
    ));
    // Re-uploading A0 (issued on some devices) must behave the same.
    let up = store
        .upload(&Upload::from_keys(d.clone(), vec![key("A0", false)], vec![]).unwrap())
        .await
        .unwrap();
    seen.push(format!("{:?}", up.counts));
    for _ in 0..12 {
        let out = store
            .claim(&[ClaimTarget::one(d.clone(), Algorithm::signed_curve25519())])
            .await
            .unwrap();
        seen.push(format!(
            "{:?}",
            out.keys
                .iter()
                .map(|k| (
                    k.key_id.to_string(),
                    k.key_json.canonical().to_owned(),
                    k.fallback
                ))
                .collect::<Vec<_>>()
        ));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_round_trip_sqlite_redb_postgres_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.sqlite");
    let b = dir.path().join("b.redb");
    let c = dir.path().join("c.sqlite");
    {
        let src = keyclaim_sqlite::SqliteStore::open(&a).await.unwrap();
        populate(&src).await;
    }
    let url_a = format!("sqlite:{}", a.display());
    let url_b = format!("redb:{}", b.display());
    let url_c = format!("sqlite:{}", c.display());
    let out = ok(&keyclaim(&[
        "migrate", &url_a, &url_b, "--batch", "7", "--quiet",
    ]));
    assert!(
        out.contains("40 devices") && out.contains("verified"),
        "{out}"
    );
    let pg = keyclaim_testing::postgres::require_server("cli migrate through postgres");
    let last_source = match pg {
        Some(url) => {
            let schema = keyclaim_testing::postgres::unique_schema("cli_migrate");
            let url_p = keyclaim_testing::postgres::store_url(&url, &schema);
            let out = ok(&keyclaim(&[
                "migrate", &url_b, &url_p, "--batch", "11", "--quiet",
            ]));
            assert!(out.contains("verified"), "{out}");
            url_p
        }
        None => url_b.clone(),
    };
    let out = ok(&keyclaim(&["migrate", &last_source, &url_c, "--quiet"]));
    assert!(out.contains("verified"), "{out}");
    let out = ok(&keyclaim(&["check", &url_c]));
    assert!(
        out.contains("40 devices") && out.contains("0 problems"),
        "{out}"
    );
    let out = ok(&keyclaim(&["stats", &url_c]));
    assert!(out.contains("devices with keys     40"), "{out}");
    // The copy behaves exactly as the source.
    let src = keyclaim_sqlite::SqliteStore::open(&a).await.unwrap();
    let dst = keyclaim_sqlite::SqliteStore::open(&c).await.unwrap();
    for i in 0..40 {
        let d = device(i);
        assert_eq!(observe(&src, &d).await, observe(&dst, &d).await, "{d}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_resumes_from_its_checkpoint_and_check_finds_nothing_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.sqlite");
    let b = dir.path().join("b.sqlite");
    {
        let src = keyclaim_sqlite::SqliteStore::open(&a).await.unwrap();
        populate(&src).await;
    }
    let ckpt = dir.path().join("ckpt");
    // A checkpoint as an interrupted run leaves it: resume after device 20
    // of the export order (the earlier ones are copied by a first partial run).
    let mut devices: Vec<Device> = (0..40).map(device).collect();
    devices.sort();
    {
        let src = keyclaim_sqlite::SqliteStore::open(&a).await.unwrap();
        let dst = keyclaim_sqlite::SqliteStore::open(&b).await.unwrap();
        let mut copied = 0;
        let mut exporter = keyclaim::transfer::Exporter::new(20);
        let batch = exporter.next_batch(&src).await.unwrap().unwrap();
        for s in &batch {
            dst.import_device(s).await.unwrap();
            copied += 1;
        }
        assert_eq!(copied, 20);
        let last = &batch[19].device;
        std::fs::write(&ckpt, format!("{}\n{}\n", last.user_id, last.device_id)).unwrap();
    }
    let out = ok(&keyclaim(&[
        "migrate",
        &format!("sqlite:{}", a.display()),
        &format!("sqlite:{}", b.display()),
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--quiet",
    ]));
    assert!(
        out.contains("(resumed): 20 devices") && out.contains("verified"),
        "{out}"
    );
    assert!(
        !ckpt.exists(),
        "a verified migration removes its checkpoint"
    );
    let out = ok(&keyclaim(&["check", &format!("sqlite:{}", b.display())]));
    assert!(out.contains("0 problems"), "{out}");
    // Migrating a store onto itself is refused.
    let o = keyclaim(&[
        "migrate",
        &format!("sqlite:{}", a.display()),
        &format!("sqlite:{}", a.display()),
    ]);
    assert_eq!(o.status.code(), Some(2));
}
