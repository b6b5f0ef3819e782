//! The engine contract of `keyclaim_kv::KvEngine`, checked on
//! [`RocksEngine`] alone, without the layer.

use std::sync::Arc;

use keyclaim_kv::{EngineResult, KvEngine, Space, Visitor, WriteBatch};
use keyclaim_rocksdb::{RocksEngine, RocksOptions, rocksdb};

/// A [`RocksEngine`] over a fresh database in a temp dir that goes with it.
pub(crate) struct TempEngine {
    // Declared first: the database closes before its directory goes.
    engine: RocksEngine,
    _dir: tempfile::TempDir,
}

impl TempEngine {
    pub(crate) fn new() -> Self {
        let dir = keyclaim_testing::temp_dir();
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        let db = Arc::new(rocksdb::DB::open(&options, dir.path()).unwrap());
        let names = RocksOptions::new().get_column_families().clone();
        Self {
            engine: RocksEngine::new(db, names).unwrap(),
            _dir: dir,
        }
    }
}

impl KvEngine for TempEngine {
    fn get(&self, space: Space, key: &[u8]) -> EngineResult<Option<Vec<u8>>> {
        self.engine.get(space, key)
    }

    fn get_many(&self, space: Space, keys: &[&[u8]]) -> EngineResult<Vec<Option<Vec<u8>>>> {
        self.engine.get_many(space, keys)
    }

    fn scan(
        &self,
        space: Space,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut Visitor<'_>,
    ) -> EngineResult<()> {
        self.engine.scan(space, start, end, visit)
    }

    fn write(&self, batch: &WriteBatch, durable: bool) -> EngineResult<()> {
        self.engine.write(batch, durable)
    }
}

mod contract {
    keyclaim_kv::engine_tests!(super::TempEngine::new());
}

/// A dropped column family is an engine error, not a panic.
#[test]
fn a_dropped_column_family_is_an_engine_error() {
    let engine = TempEngine::new();
    let name = engine.engine.column_family_name(Space::Keys).to_owned();
    engine.engine.db().drop_cf(&name).unwrap();
    assert!(engine.get(Space::Keys, b"k").is_err());
    let mut batch = WriteBatch::new();
    batch.put(Space::Meta, b"m".to_vec(), b"v".to_vec());
    batch.put(Space::Keys, b"k".to_vec(), b"v".to_vec());
    assert!(engine.write(&batch, true).is_err());
    assert_eq!(
        engine.get(Space::Meta, b"m").unwrap(),
        None,
        "nothing applied"
    );
}
