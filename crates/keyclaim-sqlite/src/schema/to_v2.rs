//! Migration 2: version 1 kept the stored keys in `otk` (deleted on claim)
//! and the remembered issued keys in `issued_key`; version 2 keeps both in
//! `one_time_key`, each (device, algorithm)'s in claim order by `pos`, with
//! one `otk_queue` row per (device, algorithm) saying where its stored keys
//! begin.
//!
//! The keys are copied in one pass inside the migration's transaction: the
//! two old tables are read in the order of their primary key and index
//! (no sort), and merged queue by queue: first the queue's remembered keys in
//! issue order, then its stored keys in claim order (sequence, then key ID:
//! R3.5), each taking the next position. Only the current row of each table
//! is held in memory, so the memory needed does not grow with the store
//! (R10.9); the rows written go to SQLite's page cache, which spills to the
//! WAL when full.
//!
//! The statements are written out here rather than taken from `ops`: a
//! migration writes the layout of its version, whatever later versions do.

use keyclaim::Result;
use rusqlite::{Connection, Rows, params};

use crate::error::SqlContext as _;

const OP: &str = "migrate";

const CREATE: &str = "
    CREATE TABLE one_time_key (
        user_id   TEXT    NOT NULL COLLATE BINARY,
        device_id TEXT    NOT NULL COLLATE BINARY,
        algorithm TEXT    NOT NULL COLLATE BINARY,
        pos       INTEGER NOT NULL,
        seq       INTEGER NOT NULL,
        key_id    TEXT    NOT NULL COLLATE BINARY,
        digest    BLOB    NOT NULL,
        key_json  TEXT    NOT NULL,
        PRIMARY KEY (user_id, device_id, algorithm, pos)
    ) WITHOUT ROWID;
    CREATE INDEX one_time_key_id ON one_time_key (user_id, device_id, key_id, digest);

    CREATE TABLE otk_queue (
        user_id   TEXT    NOT NULL COLLATE BINARY,
        device_id TEXT    NOT NULL COLLATE BINARY,
        algorithm TEXT    NOT NULL COLLATE BINARY,
        head      INTEGER NOT NULL,
        stored    INTEGER NOT NULL,
        issued    INTEGER NOT NULL,
        PRIMARY KEY (user_id, device_id, algorithm)
    ) WITHOUT ROWID;

    ALTER TABLE store_meta ADD COLUMN next_pos INTEGER NOT NULL DEFAULT 1;
";

const DROP: &str = "DROP TABLE otk; DROP TABLE issued_key;";

/// The remembered issued keys in issue order: `issued_key`'s primary key.
/// They need their ID and digest only.
const SQL_ISSUED: &str = "SELECT user_id, device_id, algorithm, 0, key_id, digest, '' \
     FROM issued_key ORDER BY user_id, device_id, algorithm, n";
/// The stored keys in claim order: the `otk_claim_order` index.
const SQL_STORED: &str = "SELECT user_id, device_id, algorithm, seq, key_id, digest, key_json \
     FROM otk ORDER BY user_id, device_id, algorithm, seq, key_id";
const SQL_INSERT: &str = "INSERT INTO one_time_key \
     (user_id, device_id, algorithm, pos, seq, key_id, digest, key_json) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
const SQL_QUEUE: &str = "INSERT INTO otk_queue \
     (user_id, device_id, algorithm, head, stored, issued) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// Brings a version 1 file to version 2, inside the caller's transaction.
pub(super) fn migrate(conn: &Connection) -> Result<()> {
    conn.execute_batch(CREATE).ctx(OP)?;
    copy_keys(conn)?;
    conn.execute_batch(DROP).ctx(OP)
}

/// A version 1 key row: its (user, device, algorithm), sequence, key ID,
/// digest and key JSON.
struct V1Key {
    queue: [String; 3],
    seq: i64,
    key_id: String,
    digest: Vec<u8>,
    key_json: String,
}

fn next(rows: &mut Rows<'_>) -> Result<Option<V1Key>> {
    let Some(r) = rows.next().ctx(OP)? else {
        return Ok(None);
    };
    let read = || -> rusqlite::Result<V1Key> {
        Ok(V1Key {
            queue: [r.get(0)?, r.get(1)?, r.get(2)?],
            seq: r.get(3)?,
            key_id: r.get(4)?,
            digest: r.get(5)?,
            key_json: r.get(6)?,
        })
    };
    read().map(Some).ctx(OP)
}

fn copy_keys(conn: &Connection) -> Result<()> {
    let mut issued_stmt = conn.prepare(SQL_ISSUED).ctx(OP)?;
    let mut stored_stmt = conn.prepare(SQL_STORED).ctx(OP)?;
    let mut insert = conn.prepare(SQL_INSERT).ctx(OP)?;
    let mut add_queue = conn.prepare(SQL_QUEUE).ctx(OP)?;
    let mut issued = issued_stmt.query([]).ctx(OP)?;
    let mut stored = stored_stmt.query([]).ctx(OP)?;
    let mut next_issued = next(&mut issued)?;
    let mut next_stored = next(&mut stored)?;
    // Positions count from 1, store-wide.
    let mut pos: i64 = 1;
    loop {
        // The next queue in byte order (`String` compares bytes, as the
        // `BINARY` collation of both tables' orders does).
        let queue = match (&next_issued, &next_stored) {
            (None, None) => break,
            (Some(k), None) | (None, Some(k)) => k.queue.clone(),
            (Some(a), Some(b)) => a.queue.clone().min(b.queue.clone()),
        };
        let mut head = pos;
        // [issued, stored]
        let mut counts = [0i64; 2];
        let sources = [
            (&mut next_issued, &mut issued),
            (&mut next_stored, &mut stored),
        ];
        for (kind, (current, rows)) in sources.into_iter().enumerate() {
            if kind == 1 {
                // The queue's stored keys begin after its remembered ones.
                head = pos;
            }
            while let Some(key) = current.take_if(|k| k.queue == queue) {
                let [user, dev, alg] = &key.queue;
                insert
                    .execute(params![
                        user,
                        dev,
                        alg,
                        pos,
                        key.seq,
                        key.key_id,
                        key.digest,
                        key.key_json
                    ])
                    .ctx(OP)?;
                pos += 1;
                counts[kind] += 1;
                *current = next(rows)?;
            }
        }
        let [user, dev, alg] = &queue;
        add_queue
            .execute(params![user, dev, alg, head, counts[1], counts[0]])
            .ctx(OP)?;
    }
    conn.execute("UPDATE store_meta SET next_pos = ?1", [pos])
        .ctx(OP)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use keyclaim::KeyJson;
    use rusqlite::params;

    use super::*;
    use crate::SqliteOptions;
    use crate::schema::{Role, SCHEMA_VERSION, file_at, migrate, open_connection, user_version};

    /// Both old tables are read in their stored order: no sort, which would
    /// hold the whole table (R10.9).
    #[test]
    fn the_copy_reads_without_sorting() {
        let dir = tempfile::tempdir().unwrap();
        let conn = file_at(&dir.path().join("v1.sqlite"), 1);
        for sql in [SQL_ISSUED, SQL_STORED] {
            let plan: Vec<String> = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap()
                .query_map([], |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            assert!(
                plan.iter().all(|step| !step.contains("TEMP B-TREE")),
                "{sql}: {plan:?}"
            );
        }
    }

    /// A field of `/proc/self/status`, in KiB.
    fn proc_status_kib(field: &str) -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// A version 1 file with `keys` one-time keys (a fifth of them
    /// remembered issued keys) of 1,000 keys per device, each with a key
    /// JSON of about 250 bytes. Answers the (stored, issued) counts.
    fn big_version_1_file(path: &Path, keys: usize) -> (i64, i64) {
        let conn = file_at(path, 1);
        let j = KeyJson::from_value(&serde_json::json!({
            "key": "x".repeat(43),
            "signatures": {"@user:example.org": {"ed25519:DEVICEID": "s".repeat(86)}},
        }))
        .unwrap();
        let alg = "signed_curve25519";
        conn.execute_batch("BEGIN").unwrap();
        let mut otk = conn
            .prepare(
                "INSERT INTO otk (user_id, device_id, algorithm, key_id, seq, digest, key_json) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .unwrap();
        let mut issued = conn
            .prepare(
                "INSERT INTO issued_key (user_id, device_id, algorithm, n, key_id, digest) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .unwrap();
        let (mut stored_n, mut issued_n) = (0, 0);
        for k in 0..keys {
            let (user, dev) = (
                format!("@u{}:example.org", k / 2000),
                format!("D{}", k / 1000),
            );
            let id = format!("{alg}:{k:08}");
            let n = i64::try_from(k).unwrap();
            if k % 5 == 0 {
                issued
                    .execute(params![user, dev, alg, n, id, &j.digest().as_bytes()[..]])
                    .unwrap();
                issued_n += 1;
            } else {
                otk.execute(params![
                    user,
                    dev,
                    alg,
                    id,
                    n / 7,
                    &j.digest().as_bytes()[..],
                    j.canonical()
                ])
                .unwrap();
                stored_n += 1;
            }
        }
        drop((otk, issued));
        conn.execute_batch("COMMIT").unwrap();
        (stored_n, issued_n)
    }

    /// R10.9: migration 2 is one transaction whose memory does not grow
    /// with the store. A child process migrates a version 1 file of
    /// `KEYCLAIM_MIGRATE_KEYS` keys (100,000 unless set) and reports how far
    /// its peak memory rose above what it used before, and how long it held
    /// the write lock (printed, not asserted); the parent checks the result.
    #[test]
    fn migration_2_needs_memory_bounded_independently_of_the_store_size() {
        const ROLE: &str = "migrate";
        const PATH_VAR: &str = "KEYCLAIM_MIGRATE_PATH";
        const NAME: &str = "schema::to_v2::tests::migration_2_needs_memory_bounded_independently_of_the_store_size";
        if keyclaim_testing::process::is_child(ROLE) {
            let path = std::path::PathBuf::from(std::env::var(PATH_VAR).unwrap());
            let conn = open_connection(&path, &SqliteOptions::default(), Role::Writer).unwrap();
            let before = proc_status_kib("VmRSS");
            let start = std::time::Instant::now();
            migrate(&conn, Duration::from_secs(10)).unwrap();
            let took = start.elapsed().as_millis();
            let growth = proc_status_kib("VmHWM").saturating_sub(before);
            println!("\n@@kc {growth} {took}");
            return;
        }
        let keys: usize = std::env::var("KEYCLAIM_MIGRATE_KEYS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big-v1.sqlite");
        let (stored, issued) = big_version_1_file(&path, keys);
        let out = keyclaim_testing::process::child_command(NAME, ROLE)
            .env(PATH_VAR, &path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: Vec<u64> = stdout
            .lines()
            .find_map(|l| l.strip_prefix("@@kc "))
            .unwrap()
            .split(' ')
            .map(|w| w.parse().unwrap())
            .collect();
        let (growth_kib, lock_ms) = (report[0], report[1]);
        let bytes = std::fs::metadata(&path).unwrap().len();
        eprintln!(
            "migration 2 of {keys} keys ({} MiB file): peak memory +{} MiB, \
             write lock held {lock_ms} ms",
            bytes >> 20,
            growth_kib >> 10
        );
        assert!(
            growth_kib < 16 << 10,
            "migrating {keys} keys raised peak memory by {growth_kib} KiB"
        );

        let conn = open_connection(&path, &SqliteOptions::default(), Role::Writer).unwrap();
        assert_eq!(user_version(&conn), SCHEMA_VERSION);
        let (s, i, bad): (i64, i64, i64) = conn
            .query_row(
                "SELECT sum(stored), sum(issued), sum(stored != (SELECT count(*) \
                 FROM one_time_key AS k WHERE k.user_id = q.user_id \
                 AND k.device_id = q.device_id AND k.algorithm = q.algorithm \
                 AND k.pos >= q.head)) FROM otk_queue AS q",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!((s, i, bad), (stored, issued, 0));
    }
}
