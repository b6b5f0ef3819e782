//! The homeserver's RocksDB, opened read-only; every read runs on the
//! blocking pool.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use keyclaim::transfer::{RowSource, SourceRow};
use keyclaim::{Error, Result};
use rocksdb::{BoundColumnFamily, DB, DBRawIteratorWithThreadMode, Options};

use super::layout::{FallbackLayout, Layout, device_prefix, fallback_row, otk_row};
use super::walk::{Seek, next_device};
use crate::blocking::blocking;
use crate::merge::Position;

const SOURCE: &str = "conduwuit-rocksdb";

/// A RocksDB error, with a hint when it is one this build cannot read past.
fn rocks(op: &'static str) -> impl Fn(rocksdb::Error) -> Error {
    move |e| {
        let text = e.to_string();
        if text.contains("ompression") {
            return Error::invalid_config(format!(
                "{text}: this build of RocksDB has no compression libraries (the workspace's \
                 `rocksdb` dependency is built without default features), and the database \
                 has files compressed by the homeserver (zstd or lz4)"
            ));
        }
        Error::storage(SOURCE, op, false, e)
    }
}

impl Seek for DBRawIteratorWithThreadMode<'_, DB> {
    fn seek(&mut self, key: &[u8]) -> Result<()> {
        DBRawIteratorWithThreadMode::seek(self, key);
        self.status().map_err(rocks("seek"))
    }

    fn key(&self) -> Option<&[u8]> {
        DBRawIteratorWithThreadMode::key(self)
    }
}

/// The layout of the database at `path`, from its column families' names
/// (nothing is opened).
pub(super) async fn layout(path: &Path) -> Result<Layout> {
    let path: PathBuf = path.to_owned();
    blocking(SOURCE, "open", move || find_layout(&path)).await
}

fn find_layout(path: &Path) -> Result<Layout> {
    if !path.is_dir() {
        return Err(Error::invalid_config(format!(
            "{}: not a directory (a RocksDB database is a directory)",
            path.display()
        )));
    }
    let names = DB::list_cf(&Options::default(), path).map_err(|e| {
        Error::invalid_config(format!("{}: not a RocksDB database: {e}", path.display()))
    })?;
    Layout::from_column_families(&names)
        .map_err(|e| Error::invalid_config(format!("{}: {e}", path.display())))
}

/// The database, opened read-only, and its layout.
#[derive(Clone)]
pub(super) struct RocksTables {
    db: Arc<DB>,
    layout: Arc<Layout>,
}

impl RocksTables {
    /// Opens `path` read-only (never creating, changing or locking it) and
    /// finds the layout.
    pub(super) async fn open(path: &Path) -> Result<Self> {
        let path: PathBuf = path.to_owned();
        blocking(SOURCE, "open", move || {
            let layout = find_layout(&path)?;
            // RocksDB writes an info log even when it opens a database
            // read-only; it goes to a directory of ours, removed at once
            // (the open file stays writable), not into the source.
            let log_dir = private_log_dir();
            let mut opts = Options::default();
            opts.set_db_log_dir(&log_dir);
            let opened = DB::open_cf_for_read_only(&opts, &path, layout.column_families(), false);
            // Best effort: where an open file's directory cannot be
            // removed, an empty directory in the temp dir is what remains.
            let _ = std::fs::remove_dir_all(&log_dir);
            let db = opened.map_err(|e| match rocks("open")(e) {
                Error::Storage { source, .. } => Error::invalid_config(format!(
                    "{}: cannot open it read-only: {source}",
                    path.display()
                )),
                other => other,
            })?;
            Ok(Self {
                db: Arc::new(db),
                layout: Arc::new(layout),
            })
        })
        .await
    }

    /// Every row of the devices after `at`, `page` rows at a time.
    pub(super) fn rows(&self, at: &Position, page: usize) -> Rows {
        let after = match at {
            Position::Start => None,
            Position::AfterDevice(u, d)
            | Position::AfterOtk(u, d, ..)
            | Position::AfterFallback(u, d, ..) => Some((u.clone(), d.clone())),
        };
        Rows {
            tables: self.clone(),
            cursor: Some(Cursor {
                after,
                current: None,
                cf: 0,
                last_key: None,
                done: false,
            }),
            page: page.max(1),
        }
    }
}

/// A fresh directory name in the system's temp dir for RocksDB's info log.
fn private_log_dir() -> PathBuf {
    static OPENED: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    std::env::temp_dir().join(format!(
        "keyclaim-import-rocksdb-log-{}-{nanos}-{}",
        std::process::id(),
        OPENED.fetch_add(1, Ordering::Relaxed)
    ))
}

fn handle<'a>(db: &'a DB, name: &str) -> Result<Arc<BoundColumnFamily<'a>>> {
    db.cf_handle(name)
        .ok_or_else(|| Error::corrupt(format!("column family {name} went missing")))
}

/// Where the reading is: the device read last, the one being read, which
/// of the layout's column families (one-time keys first) and the last key
/// read there.
#[derive(Clone, Debug)]
struct Cursor {
    after: Option<(String, String)>,
    current: Option<(String, String)>,
    cf: usize,
    last_key: Option<Vec<u8>>,
    done: bool,
}

/// The rows of every device from a position on, a page at a time.
pub(super) struct Rows {
    tables: RocksTables,
    /// `None` while a page is being read (or after a read failed).
    cursor: Option<Cursor>,
    page: usize,
}

#[async_trait]
impl RowSource for Rows {
    async fn next_rows(&mut self) -> Result<Vec<SourceRow>> {
        let Some(mut cursor) = self.cursor.take() else {
            return Err(Error::invalid_config(
                "the conduwuit-rocksdb source failed before; open it again",
            ));
        };
        let tables = self.tables.clone();
        let page = self.page;
        let (rows, cursor) = blocking(SOURCE, "read", move || {
            let rows = read_page(&tables, &mut cursor, page)?;
            Ok((rows, cursor))
        })
        .await?;
        self.cursor = Some(cursor);
        Ok(rows)
    }
}

/// The first device after `after` in (user ID, device ID) byte order with
/// keys in any of the layout's column families.
fn next_device_any(
    db: &DB,
    layout: &Layout,
    after: Option<&(String, String)>,
) -> Result<Option<(String, String)>> {
    let after = after.map(|(u, d)| (u.as_bytes(), d.as_bytes()));
    let mut first: Option<(Vec<u8>, Vec<u8>)> = None;
    for name in layout.column_families() {
        let cf = handle(db, name)?;
        let mut it = db.raw_iterator_cf(&cf);
        if let Some(found) = next_device(&mut it, name, after)?
            && first.as_ref().is_none_or(|f| found < *f)
        {
            first = Some(found);
        }
    }
    let Some((user, device)) = first else {
        return Ok(None);
    };
    match (String::from_utf8(user), String::from_utf8(device)) {
        (Ok(u), Ok(d)) => Ok(Some((u, d))),
        (u, d) => Err(Error::corrupt(format!(
            "RocksDB source, column family {}: user ID {:?} or device ID {:?} is not UTF-8",
            layout.one_time_keys.column_family(),
            u.unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
            d.unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
        ))),
    }
}

/// Up to `page` rows from `cursor` on, moving it past them.
fn read_page(tables: &RocksTables, cursor: &mut Cursor, page: usize) -> Result<Vec<SourceRow>> {
    let db = &*tables.db;
    let layout = &*tables.layout;
    let names = layout.column_families();
    let mut out = Vec::new();
    while out.len() < page && !cursor.done {
        let Some((user, device)) = cursor.current.clone() else {
            match next_device_any(db, layout, cursor.after.as_ref())? {
                Some(next) => {
                    cursor.current = Some(next);
                    cursor.cf = 0;
                    cursor.last_key = None;
                }
                None => cursor.done = true,
            }
            continue;
        };
        let Some(name) = names.get(cursor.cf).copied() else {
            cursor.after = cursor.current.take();
            continue;
        };
        let fallback: Option<FallbackLayout> = cursor
            .cf
            .checked_sub(1)
            .and_then(|i| layout.fallback_keys.get(i).copied());
        let prefix = device_prefix(&user, &device);
        let cf = handle(db, name)?;
        let mut it = db.raw_iterator_cf(&cf);
        match &cursor.last_key {
            Some(last) => {
                it.seek(last);
                if it.key() == Some(last.as_slice()) {
                    it.next();
                }
            }
            None => it.seek(&prefix),
        }
        let mut full = false;
        while let (Some(key), Some(value)) = (it.key(), it.value()) {
            if !key.starts_with(&prefix) {
                break;
            }
            let ids = (user.as_str(), device.as_str());
            out.push(match fallback {
                None => otk_row(layout.one_time_keys, ids, prefix.len(), key, value)?,
                Some(f) => fallback_row(f, ids, key, value)?,
            });
            if out.len() >= page {
                cursor.last_key = Some(key.to_vec());
                full = true;
                break;
            }
            it.next();
        }
        it.status().map_err(rocks("read"))?;
        if !full {
            cursor.cf += 1;
            cursor.last_key = None;
        }
    }
    Ok(out)
}
