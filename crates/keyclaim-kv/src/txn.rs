//! What the operations read from and write to.
//!
//! [`Source`] is a view of the data: [`Direct`] reads the engine as it is
//! (the readers), [`Txn`] reads the engine through the writes of the batch
//! being built (the writer). A [`Txn`] keeps two overlays of pending writes:
//! the batch's, from the operations that succeeded so far, and the current
//! operation's. An operation that fails drops its own overlay and leaves the
//! batch's as it was, so that it fails alone; at the end the batch's overlay
//! becomes one [`WriteBatch`]. Nothing is written to the engine before that:
//! every check and every decode happens before the write (R10.7).

use std::collections::BTreeMap;
use std::ops::{Bound, ControlFlow};

use keyclaim::Result;

use crate::engine::{KvEngine, Space, WriteBatch};
use crate::error::engine_failed;

/// Rows of a scan: (key, value) in key order.
pub(crate) type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// A view of the data the operations read.
pub(crate) trait Source {
    /// The value of `key` in `space`.
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// The rows of `space` from `start` up to `end` (exclusive).
    fn scan(&self, space: Space, start: &[u8], end: &[u8]) -> Result<Rows>;
}

/// The engine as it is, for reads outside the writer; `op` names the
/// operation in errors.
pub(crate) struct Direct<'e> {
    pub(crate) engine: &'e dyn KvEngine,
    pub(crate) op: &'static str,
}

fn engine_scan(
    engine: &dyn KvEngine,
    op: &'static str,
    space: Space,
    start: &[u8],
    end: &[u8],
) -> Result<Rows> {
    let mut rows = Vec::new();
    engine
        .scan(space, start, Some(end), &mut |k, v| {
            rows.push((k.to_vec(), v.to_vec()));
            ControlFlow::Continue(())
        })
        .map_err(engine_failed(op))?;
    Ok(rows)
}

impl Source for Direct<'_> {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.engine.get(space, key).map_err(engine_failed(self.op))
    }

    fn scan(&self, space: Space, start: &[u8], end: &[u8]) -> Result<Rows> {
        engine_scan(self.engine, self.op, space, start, end)
    }
}

/// Pending writes per space: `None` is a delete.
type Overlay = [BTreeMap<Vec<u8>, Option<Vec<u8>>>; Space::COUNT];

/// The writer's view: the engine through the pending writes (see the module
/// docs).
pub(crate) struct Txn<'e> {
    engine: &'e dyn KvEngine,
    op: &'static str,
    batch: Overlay,
    current: Overlay,
}

impl<'e> Txn<'e> {
    /// A transaction with nothing pending.
    pub(crate) fn new(engine: &'e dyn KvEngine) -> Self {
        Self {
            engine,
            op: "write",
            batch: Default::default(),
            current: Default::default(),
        }
    }

    /// Starts an operation named `op` (for errors).
    pub(crate) fn begin(&mut self, op: &'static str) {
        self.op = op;
        debug_assert!(self.current.iter().all(BTreeMap::is_empty));
    }

    /// Keeps the current operation's writes in the batch.
    pub(crate) fn keep(&mut self) {
        for (batch, current) in self.batch.iter_mut().zip(self.current.iter_mut()) {
            batch.append(current);
        }
    }

    /// Drops the current operation's writes.
    pub(crate) fn drop_current(&mut self) {
        for current in &mut self.current {
            current.clear();
        }
    }

    /// Sets `key` of `space`.
    pub(crate) fn put(&mut self, space: Space, key: Vec<u8>, value: Vec<u8>) {
        self.current[space.index()].insert(key, Some(value));
    }

    /// Removes `key` of `space`.
    pub(crate) fn delete(&mut self, space: Space, key: Vec<u8>) {
        self.current[space.index()].insert(key, None);
    }

    /// The batch's writes as one engine batch, sorted by space and key.
    pub(crate) fn into_batch(self) -> WriteBatch {
        let mut batch = WriteBatch::new();
        for (space, overlay) in Space::ALL.into_iter().zip(self.batch) {
            for (key, value) in overlay {
                match value {
                    Some(value) => batch.put(space, key, value),
                    None => batch.delete(space, key),
                }
            }
        }
        batch
    }

    /// The pending write of `key`, if any: the current operation's, else
    /// the batch's.
    fn pending(&self, space: Space, key: &[u8]) -> Option<&Option<Vec<u8>>> {
        let i = space.index();
        self.current[i].get(key).or_else(|| self.batch[i].get(key))
    }
}

impl Source for Txn<'_> {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.pending(space, key) {
            Some(value) => Ok(value.clone()),
            None => self.engine.get(space, key).map_err(engine_failed(self.op)),
        }
    }

    fn scan(&self, space: Space, start: &[u8], end: &[u8]) -> Result<Rows> {
        let i = space.index();
        let range = (Bound::Included(start), Bound::Excluded(end));
        let batch = self.batch[i].range::<[u8], _>(range);
        let current = self.current[i].range::<[u8], _>(range);
        let mut pending = batch.chain(current).peekable();
        let rows = engine_scan(self.engine, self.op, space, start, end)?;
        if pending.peek().is_none() {
            return Ok(rows);
        }
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = rows.into_iter().collect();
        // The current operation's writes come last and win.
        for (key, value) in pending {
            match value {
                Some(value) => merged.insert(key.clone(), value.clone()),
                None => merged.remove(key),
            };
        }
        Ok(merged.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryEngine;

    fn engine_with(rows: &[(&[u8], &[u8])]) -> MemoryEngine {
        let engine = MemoryEngine::new();
        let mut batch = WriteBatch::new();
        for (k, v) in rows {
            batch.put(Space::Keys, k.to_vec(), v.to_vec());
        }
        assert!(engine.write(&batch, true).is_ok());
        engine
    }

    #[test]
    fn reads_see_the_batch_then_the_current_operation() {
        let engine = engine_with(&[(b"a", b"1"), (b"b", b"1"), (b"c", b"1")]);
        let mut txn = Txn::new(&engine);
        txn.begin("t");
        txn.delete(Space::Keys, b"a".to_vec());
        txn.put(Space::Keys, b"d".to_vec(), b"2".to_vec());
        txn.keep();
        txn.begin("t");
        txn.put(Space::Keys, b"a".to_vec(), b"3".to_vec());
        txn.delete(Space::Keys, b"b".to_vec());
        let rows = txn.scan(Space::Keys, b"", b"\xff").unwrap_or_default();
        let want: Rows = vec![
            (b"a".to_vec(), b"3".to_vec()),
            (b"c".to_vec(), b"1".to_vec()),
            (b"d".to_vec(), b"2".to_vec()),
        ];
        assert_eq!(rows, want);
        // A failed operation leaves the batch as it was.
        txn.drop_current();
        assert_eq!(txn.get(Space::Keys, b"a").ok(), Some(None));
        assert_eq!(txn.get(Space::Keys, b"b").ok(), Some(Some(b"1".to_vec())));
        let batch = txn.into_batch();
        assert_eq!(batch.len(), 2);
        assert!(engine.write(&batch, true).is_ok());
        assert_eq!(engine.get(Space::Keys, b"a").ok(), Some(None));
        assert_eq!(
            engine.get(Space::Keys, b"d").ok(),
            Some(Some(b"2".to_vec()))
        );
    }
}
