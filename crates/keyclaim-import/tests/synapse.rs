//! Imports of databases written by a real Synapse (see
//! `scripts/synapse-fixture/`): claims through keyclaim then hand out the
//! keys Synapse would have handed out next, in the same order, on every
//! backend; fallback keys keep their used flag; an interrupted import
//! resumes to the same result; the source is not changed.
//!
//! The PostgreSQL cases need a server (`KEYCLAIM_TEST_POSTGRES_URL` or a
//! throwaway cluster); under `CI=true` they are required.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use keyclaim::transfer::{Checkpoint, DeviceSnapshot, diff_stores};
use keyclaim::{Algorithm, ClaimTarget, Device, KeyId, KeyStore};
use keyclaim_import::synapse::{import_postgres, import_sqlite};
use keyclaim_import::{ImportOptions, ImportReport};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A copy of the SQLite fixture in a fresh temp dir (the dir is returned
/// to keep it alive).
fn sqlite_copy() -> (tempfile::TempDir, PathBuf) {
    let dir = keyclaim_testing::temp_dir();
    let path = dir.path().join("homeserver.db");
    std::fs::copy(fixture("synapse.db"), &path).unwrap();
    (dir, path)
}

/// One key Synapse handed out: key ID, key JSON, whether it is the
/// fallback key, and (one-time keys) its upload time.
type Claim = (String, Value, bool, Option<i64>);

/// One device of the expected answers the fixture script recorded.
struct Expected {
    user_id: String,
    device_id: String,
    /// Synapse's `/sync` counts and unused fallback algorithms.
    counts: BTreeMap<String, u64>,
    unused: Vec<String>,
    /// Per algorithm, the keys Synapse handed out one claim at a time.
    claims: BTreeMap<String, Vec<Claim>>,
}

fn expected(name: &str) -> Vec<Expected> {
    let text = std::fs::read_to_string(fixture(name)).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| Expected {
            user_id: d["user_id"].as_str().unwrap().to_owned(),
            device_id: d["device_id"].as_str().unwrap().to_owned(),
            counts: d["sync"]["one_time_key_counts"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap()))
                .collect(),
            unused: d["sync"]["unused_fallback_key_types"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_owned())
                .collect(),
            claims: d["next_claims"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(alg, seq)| {
                    let seq = seq
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|c| {
                            (
                                c["key_id"].as_str().unwrap().to_owned(),
                                c["key"].clone(),
                                c["fallback"].as_bool().unwrap(),
                                c["ts_added_ms"].as_i64(),
                            )
                        })
                        .collect();
                    (alg.clone(), seq)
                })
                .collect(),
        })
        .collect()
}

/// Synapse orders one-time keys by upload time only; keys of one upload
/// come in an order the database picks. keyclaim breaks those ties by key
/// ID (R17.1, R3.5): Synapse's answers with ties put in key ID order, the
/// fallback key (last) left in place.
fn ties_by_key_id(seq: &[Claim]) -> Vec<Claim> {
    let mut out = seq.to_vec();
    out.sort_by(|a, b| match (a.2, b.2) {
        (false, false) => (a.3, &a.0).cmp(&(b.3, &b.0)),
        (x, y) => x.cmp(&y),
    });
    out
}

/// What the import must have left out, derived from the expected answers:
/// devices whose IDs do not validate, keys whose IDs do not.
#[derive(Debug, Default, PartialEq, Eq)]
struct Skipped {
    devices: u64,
    one_time_keys: u64,
    fallback_keys: u64,
}

fn skipped(exp: &[Expected]) -> Skipped {
    let mut s = Skipped::default();
    for d in exp {
        let valid_device = Device::parse(&d.user_id, &d.device_id).is_ok();
        if !valid_device {
            s.devices += 1;
        }
        for seq in d.claims.values() {
            for (id, _, fallback, _) in seq {
                if valid_device && KeyId::parse(id.as_str()).is_ok() {
                    continue;
                }
                if *fallback {
                    s.fallback_keys += 1;
                } else {
                    s.one_time_keys += 1;
                }
            }
        }
    }
    s
}

fn assert_report(report: &ImportReport, exp: &[Expected]) {
    assert!(report.ok(), "{report}");
    let t = &report.tally;
    assert_eq!(
        Skipped {
            devices: t.skipped_devices,
            one_time_keys: t.skipped_one_time_keys,
            fallback_keys: t.skipped_fallback_keys,
        },
        skipped(exp),
        "{report}"
    );
    let valid = exp
        .iter()
        .filter(|d| Device::parse(&d.user_id, &d.device_id).is_ok())
        .count() as u64;
    assert_eq!(t.devices, valid, "{report}");
    assert!(
        t.skipped_one_time_keys > 0 && t.skipped_devices > 0,
        "the fixture has rows to skip"
    );
}

/// Checks a target against Synapse's recorded answers: sync state, then
/// every claim, one key at a time, in order (this consumes the keys).
async fn assert_claims_match(store: &dyn KeyStore, exp: &[Expected], exact_ties: bool) {
    let mut compared = 0;
    for d in exp {
        let Ok(device) = Device::parse(&d.user_id, &d.device_id) else {
            assert!(
                store
                    .export_devices(None, 1000)
                    .await
                    .unwrap()
                    .iter()
                    .all(|s| s.device.device_id.as_str() != d.device_id),
                "a device with an invalid ID was imported"
            );
            continue;
        };
        // Counts as Synapse's /sync gave them, less the keys keyclaim cannot hold.
        let state = store.sync_state(&device).await.unwrap();
        for (alg, n) in &d.counts {
            let invalid = d.claims.get(alg).map_or(0, |seq| {
                seq.iter()
                    .filter(|c| !c.2 && KeyId::parse(c.0.as_str()).is_err())
                    .count() as u64
            });
            if Algorithm::parse(alg.as_str()).is_ok() {
                assert_eq!(
                    state.one_time_key_counts.get_str(alg),
                    n - invalid,
                    "{device} {alg}"
                );
            }
        }
        let unused: Vec<&str> = state
            .unused_fallback_key_types
            .iter()
            .map(Algorithm::as_str)
            .collect();
        assert_eq!(unused, d.unused, "{device}");
        for (alg, seq) in &d.claims {
            let Ok(algorithm) = Algorithm::parse(alg.as_str()) else {
                continue;
            };
            let want: Vec<_> = ties_by_key_id(seq)
                .into_iter()
                .filter(|c| KeyId::parse(c.0.as_str()).is_ok())
                .collect();
            if exact_ties {
                assert_eq!(&ties_by_key_id(seq), seq, "{device} {alg}: SQLite ties");
            }
            for (key_id, json, fallback, _) in &want {
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
                assert_eq!(&got.key_json.to_value(), json, "{device} {key_id}");
                compared += 1;
            }
        }
    }
    assert!(compared > 50, "only {compared} claims compared");
}

/// Fallback keys' used flags in the target, per (device, key ID).
async fn used_flags(store: &dyn KeyStore) -> BTreeMap<(String, String, String), bool> {
    let mut out = BTreeMap::new();
    for s in all(store).await {
        for f in s.fallback_keys.values() {
            out.insert(
                (
                    s.device.user_id.to_string(),
                    s.device.device_id.to_string(),
                    f.key_id.to_string(),
                ),
                f.used,
            );
        }
    }
    out
}

async fn all(store: &dyn KeyStore) -> Vec<DeviceSnapshot> {
    store.export_devices(None, 100_000).await.unwrap()
}

/// The used flags of the SQLite fixture's fallback rows with valid IDs.
fn source_used_flags(path: &Path) -> BTreeMap<(String, String, String), bool> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut stmt = conn
        .prepare("SELECT user_id, device_id, algorithm, key_id, used FROM e2e_fallback_keys_json")
        .unwrap();
    stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            format!("{}:{}", r.get::<_, String>(2)?, r.get::<_, String>(3)?),
            r.get::<_, bool>(4)?,
        ))
    })
    .unwrap()
    .map(Result::unwrap)
    .filter(|(u, d, k, _)| Device::parse(u, d).is_ok() && KeyId::parse(k.as_str()).is_ok())
    .map(|(u, d, k, used)| ((u, d, k), used))
    .collect()
}

/// Imports the SQLite fixture into `store_url` and checks it against
/// Synapse's answers.
async fn sqlite_fixture_into(store_url: &str, page: usize) {
    let store: Arc<dyn KeyStore> = keyclaim_open::open(store_url).await.unwrap();
    let (_dir, path) = sqlite_copy();
    let exp = expected("synapse.expected.json");
    let report = import_sqlite(&path, &*store, &ImportOptions::new().page(page))
        .await
        .unwrap();
    assert_report(&report, &exp);
    let flags = used_flags(&*store).await;
    assert_eq!(flags, source_used_flags(&path));
    assert!(flags.values().any(|u| *u) && flags.values().any(|u| !*u));
    assert_claims_match(&*store, &exp, true).await;
}

fn rt() -> tokio::runtime::Runtime {
    keyclaim_testing::runtime(2)
}

#[test]
fn sqlite_fixture_into_memory() {
    rt().block_on(sqlite_fixture_into("memory:", 1000));
}

#[test]
fn sqlite_fixture_into_memory_in_small_pages() {
    // Pages of 3 rows: devices span many pages, both tables' pages interleave.
    rt().block_on(sqlite_fixture_into("memory:", 3));
}

#[test]
fn sqlite_fixture_into_sqlite() {
    let dir = keyclaim_testing::temp_dir();
    let url = format!("sqlite:{}", dir.path().join("k.db").display());
    rt().block_on(sqlite_fixture_into(&url, 7));
}

#[test]
fn sqlite_fixture_into_redb() {
    let dir = keyclaim_testing::temp_dir();
    let url = format!("redb:{}", dir.path().join("k.redb").display());
    rt().block_on(sqlite_fixture_into(&url, 1000));
}

#[test]
fn sqlite_fixture_into_postgres() {
    keyclaim_testing::postgres::with_server("import into PostgreSQL", |server| async move {
        let schema = keyclaim_testing::postgres::unique_schema("import");
        sqlite_fixture_into(&keyclaim_testing::postgres::store_url(&server, &schema), 5).await;
    });
}

fn file_state(dir: &Path) -> Vec<(String, String)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let bytes = std::fs::read(e.path()).unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                hex::encode(Sha256::digest(&bytes)),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn the_source_file_is_not_changed() {
    let (dir, path) = sqlite_copy();
    let before = file_state(dir.path());
    assert_eq!(
        before[0].1,
        file_state(fixture("synapse.db").parent().unwrap())
            .iter()
            .find(|(n, _)| n == "synapse.db")
            .unwrap()
            .1
    );
    rt().block_on(async {
        let store = keyclaim_open::open("memory:").await.unwrap();
        let report = import_sqlite(&path, &*store, &ImportOptions::new())
            .await
            .unwrap();
        assert!(report.ok(), "{report}");
    });
    // Same bytes, and no journal or WAL file left beside it.
    assert_eq!(file_state(dir.path()), before);
}

#[test]
fn a_missing_file_or_another_database_is_an_error_and_creates_nothing() {
    let dir = keyclaim_testing::temp_dir();
    rt().block_on(async {
        let store = keyclaim_open::open("memory:").await.unwrap();
        let missing = dir.path().join("none.db");
        assert!(
            import_sqlite(&missing, &*store, &ImportOptions::new())
                .await
                .is_err()
        );
        assert!(!missing.exists());
        let other = dir.path().join("other.db");
        rusqlite::Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        let err = import_sqlite(&other, &*store, &ImportOptions::new())
            .await
            .unwrap_err();
        assert!(
            matches!(err, keyclaim::Error::InvalidConfig { .. }),
            "{err}"
        );
        assert!(all(&*store).await.is_empty());
    });
}

#[test]
fn an_interrupted_import_resumes_to_the_same_result() {
    let (dir, path) = sqlite_copy();
    rt().block_on(async {
        let once = keyclaim_open::open("memory:").await.unwrap();
        let one_shot = import_sqlite(&path, &*once, &ImportOptions::new())
            .await
            .unwrap();
        assert!(one_shot.ok(), "{one_shot}");

        let resumed = keyclaim_open::open("memory:").await.unwrap();
        let cp = dir.path().join("checkpoint");
        let seen = Arc::new(std::sync::Mutex::new(0u64));
        let seen2 = Arc::clone(&seen);
        let options = ImportOptions::new()
            .page(4)
            .checkpoint(&cp)
            .progress(move |t| *seen2.lock().unwrap() = t.devices);
        let first = import_sqlite(&path, &*resumed, &options.clone().stop_after_devices(3))
            .await
            .unwrap();
        assert!(!first.complete && !first.ok() && first.check.is_none());
        assert_eq!(first.tally.devices, 3);
        assert_eq!(*seen.lock().unwrap(), 3);
        let at = Checkpoint::new(&cp).load().unwrap().expect("a checkpoint");
        assert_eq!(Some(&at), all(&*resumed).await.last().map(|s| &s.device));

        // A second slice, then the rest.
        let second = import_sqlite(&path, &*resumed, &options.clone().stop_after_devices(2))
            .await
            .unwrap();
        assert_eq!(second.resumed_after.as_ref(), Some(&at));
        assert_eq!(second.tally.devices, 2);
        // A checkpoint older than the target's state (a crash between an
        // import and the checkpoint's save) re-imports a device: harmless.
        Checkpoint::new(&cp).save(&at).unwrap();
        let rest = import_sqlite(&path, &*resumed, &options).await.unwrap();
        assert!(rest.ok(), "{rest}");
        assert_eq!(rest.resumed_after.as_ref(), Some(&at));
        assert_eq!(
            first.tally.devices + rest.tally.devices,
            one_shot.tally.devices,
            "the rest is everything after the first slice"
        );
        assert!(!cp.exists(), "a finished import removes its checkpoint");
        assert!(
            diff_stores(&*once, &*resumed, 3, 10)
                .await
                .unwrap()
                .is_empty()
        );
    });
}

#[test]
fn counts_that_differ_fail_the_final_check() {
    let (_dir, path) = sqlite_copy();
    rt().block_on(async {
        let store = keyclaim_open::open("memory:").await.unwrap();
        let first = import_sqlite(&path, &*store, &ImportOptions::new())
            .await
            .unwrap();
        assert!(first.ok(), "{first}");
        // A key claimed in the target after the import: importing again
        // puts the device back as the source has it (whole-device replace)
        // and the counts match again.
        let d = Device::parse("@carol:fixture.test", "CAROL1").unwrap();
        store
            .claim(&[ClaimTarget::one(d.clone(), Algorithm::signed_curve25519())])
            .await
            .unwrap();
        let again = import_sqlite(&path, &*store, &ImportOptions::new())
            .await
            .unwrap();
        assert!(again.ok(), "{again}");
        // Devices the import did not write fail the comparison: import two,
        // then run on from a checkpoint past the last device.
        let fresh = keyclaim_open::open("memory:").await.unwrap();
        let partial = import_sqlite(&path, &*fresh, &ImportOptions::new().stop_after_devices(2))
            .await
            .unwrap();
        assert!(partial.counts.is_none());
        let dir = keyclaim_testing::temp_dir();
        let cp = dir.path().join("cp");
        // Skip past every device with a checkpoint at the last one: nothing
        // is imported, and the comparison (over the whole source) fails.
        let last = all(&*store).await.last().unwrap().device.clone();
        Checkpoint::new(&cp).save(&last).unwrap();
        let report = import_sqlite(&path, &*fresh, &ImportOptions::new().checkpoint(&cp))
            .await
            .unwrap();
        let counts = report.counts.as_ref().unwrap();
        assert!(!report.ok() && !counts.matched(), "{report}");
        // Every device past the first two that a client could tell from an
        // empty one: one-time keys or an unused fallback key. (A device
        // holding only used fallback keys has the counts of an empty one.)
        let visible = all(&*store)
            .await
            .iter()
            .skip(2)
            .filter(|s| !s.one_time_keys.is_empty() || !s.unused_fallback_types().is_empty())
            .count() as u64;
        assert!(visible >= 4);
        assert_eq!(counts.mismatched, visible, "{report}");
        assert!(report.to_string().contains("COUNTS DIFFER"), "{report}");
        assert!(cp.exists(), "a failed check keeps the checkpoint");
    });
}

/// `server` with another database name.
fn with_dbname(server: &str, db: &str) -> String {
    if server.starts_with("postgres") {
        let (base, query) = server.split_once('?').unwrap_or((server, ""));
        let slash = base.rfind('/').unwrap();
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        format!("{}/{db}{query}", &base[..slash])
    } else {
        format!("{server} dbname={db}")
    }
}

/// `url` with a search path (the schema the fixture was loaded into).
fn with_search_path(url: &str, schema: &str) -> String {
    if url.starts_with("postgres") {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}options=-c%20search_path%3D{schema}")
    } else {
        format!("{url} options='-c search_path={schema}'")
    }
}

async fn execute(url: &str, sql: &str) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    client.batch_execute(sql).await.unwrap();
    drop(client);
    let _ = task.await;
}

/// Loads the PostgreSQL fixture (a pg_dump of Synapse's key tables) twice:
/// into a fresh schema of the server's database (whatever its collation),
/// and into a fresh database with C collation, as Synapse requires its
/// databases to be. The source URLs of both.
async fn load_postgres_fixture(server: &str) -> [String; 2] {
    let sql = std::fs::read_to_string(fixture("synapse-postgres.sql")).unwrap();
    let schema = keyclaim_testing::postgres::unique_schema("synapse");
    execute(
        server,
        &format!("CREATE SCHEMA \"{schema}\"; SET search_path TO \"{schema}\";\n{sql}"),
    )
    .await;
    let db = keyclaim_testing::postgres::unique_schema("synapse_c");
    execute(
        server,
        &format!("CREATE DATABASE \"{db}\" ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"),
    )
    .await;
    let c_db = with_dbname(server, &db);
    execute(&c_db, &sql).await;
    [with_search_path(server, &schema), c_db]
}

/// A digest of every row of both tables, to show the import changed none.
async fn pg_tables_digest(url: &str) -> String {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT (SELECT md5(string_agg(t::text, '|' ORDER BY t::text)) FROM e2e_one_time_keys_json t), \
                    (SELECT md5(string_agg(t::text, '|' ORDER BY t::text)) FROM e2e_fallback_keys_json t)",
            &[],
        )
        .await
        .unwrap();
    drop(client);
    let _ = task.await;
    format!("{}/{}", row.get::<_, String>(0), row.get::<_, String>(1))
}

#[test]
fn postgres_fixture_into_memory_and_redb() {
    keyclaim_testing::postgres::with_server(
        "import from Synapse's PostgreSQL",
        |server| async move {
            let exp = expected("synapse-postgres.expected.json");
            let dir = keyclaim_testing::temp_dir();
            for (i, source) in load_postgres_fixture(&server).await.iter().enumerate() {
                let before = pg_tables_digest(source).await;
                let redb = format!("redb:{}", dir.path().join(format!("k{i}.redb")).display());
                for (target, page) in [("memory:", 1000), (redb.as_str(), 3)] {
                    let store = keyclaim_open::open(target).await.unwrap();
                    let report = import_postgres(source, &*store, &ImportOptions::new().page(page))
                        .await
                        .unwrap();
                    assert_report(&report, &exp);
                    // Synapse on PostgreSQL answers keys of one upload in no set order.
                    assert_claims_match(&*store, &exp, false).await;
                }
                assert_eq!(pg_tables_digest(source).await, before);
            }
        },
    );
}

#[test]
fn the_two_fixtures_hold_the_same_devices() {
    // Both runs of the script drive Synapse through the same requests.
    let a: BTreeSet<_> = expected("synapse.expected.json")
        .into_iter()
        .map(|d| (d.user_id, d.device_id, d.counts, d.unused))
        .collect();
    let b: BTreeSet<_> = expected("synapse-postgres.expected.json")
        .into_iter()
        .map(|d| (d.user_id, d.device_id, d.counts, d.unused))
        .collect();
    assert_eq!(a, b);
}
