//! [`MemoryEngine`]: the engine of the layer's own tests, and the smallest
//! example of an adapter (see `docs/adapter-guide.md`).

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;

use parking_lot::RwLock;

use crate::engine::{BatchOp, EngineResult, KvEngine, Space, Visitor, WriteBatch};

/// One ordered map per space.
type Maps = [BTreeMap<Vec<u8>, Vec<u8>>; Space::COUNT];

/// An in-memory engine: one `BTreeMap` per [`Space`] behind one lock.
///
/// A batch is applied under the write lock, so no read sees part of it; a
/// scan holds the read lock while it visits. Nothing survives the process:
/// "durable" writes are as durable as the memory (for tests, benchmarks and
/// throw-away data). Clones share nothing; share one engine as
/// `Arc<MemoryEngine>` (which is an engine too).
#[derive(Default)]
pub struct MemoryEngine {
    maps: RwLock<Maps>,
}

impl fmt::Debug for MemoryEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let maps = self.maps.read();
        let mut d = f.debug_struct("MemoryEngine");
        for space in Space::ALL {
            d.field(space.name(), &maps[space.index()].len());
        }
        d.finish()
    }
}

impl MemoryEngine {
    /// An empty engine.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many keys `space` holds.
    pub fn len(&self, space: Space) -> usize {
        self.maps.read()[space.index()].len()
    }

    /// Whether every space is empty.
    pub fn is_empty(&self) -> bool {
        self.maps.read().iter().all(BTreeMap::is_empty)
    }
}

impl KvEngine for MemoryEngine {
    fn get(&self, space: Space, key: &[u8]) -> EngineResult<Option<Vec<u8>>> {
        Ok(self.maps.read()[space.index()].get(key).cloned())
    }

    fn get_many(&self, space: Space, keys: &[&[u8]]) -> EngineResult<Vec<Option<Vec<u8>>>> {
        let maps = self.maps.read();
        let map = &maps[space.index()];
        Ok(keys.iter().map(|key| map.get(*key).cloned()).collect())
    }

    fn scan(
        &self,
        space: Space,
        start: &[u8],
        end: Option<&[u8]>,
        visit: &mut Visitor<'_>,
    ) -> EngineResult<()> {
        if end.is_some_and(|end| end <= start) {
            return Ok(());
        }
        let maps = self.maps.read();
        let upper = end.map_or(Bound::Unbounded, Bound::Excluded);
        let range = maps[space.index()].range::<[u8], _>((Bound::Included(start), upper));
        for (key, value) in range {
            if visit(key, value).is_break() {
                break;
            }
        }
        Ok(())
    }

    fn write(&self, batch: &WriteBatch, _durable: bool) -> EngineResult<()> {
        let mut maps = self.maps.write();
        for op in batch.ops() {
            match op {
                BatchOp::Put { space, key, value } => {
                    maps[space.index()].insert(key.clone(), value.clone());
                }
                BatchOp::Delete { space, key } => {
                    maps[space.index()].remove(key.as_slice());
                }
            }
        }
        Ok(())
    }
}
