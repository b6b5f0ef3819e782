//! The operations, on open tables of one transaction, one file per kind:
//! [`mod@upload`] (uploads and device replacement), [`mod@claim`] (claims and
//! the two steps of a split claim), [`read`] (counts, sync state, fallback
//! keys), [`delete`] (devices, users, key reset) and [`transfer`] (export and
//! import). This file holds what they share: the
//! tables of a write transaction, queue checks, range removal, parsing of
//! stored values, and running a read transaction.
//!
//! Write operations take a [`WriteTables`] (every table of one write
//! transaction, opened once per batch) and return `Result<_, Fatal>`: a
//! [`Fatal`] error means the transaction may hold a partial write and must be
//! aborted. A request the rules reject (a conflicting re-upload, a limit) is
//! decided before anything is written and comes back as the inner `Err` of
//! `Ok(Err(_))`, so that the transaction, and the batch-mates in it, go on.
//!
//! Read operations are generic over [`ReadableTable`], so that the same code
//! serves read transactions and the write transaction (an upload answers
//! the counts after itself, R3.8).

mod claim;
mod delete;
mod read;
mod transfer;
mod upload;

use std::sync::Arc;

use keyclaim::backend::decode;
use keyclaim::transfer::KeyDigest;
use keyclaim::{Algorithm, Error, KeyId, KeyJson, Limits, Result};
use redb::{ReadTransaction, ReadableDatabase, ReadableTable, Table, WriteTransaction};

pub(crate) use claim::{claim, claim_fallbacks};
pub(crate) use delete::{delete_device, delete_user, reset_one_time_keys};
pub(crate) use read::{counts, counts_many, read_fallback_keys, sync_state};
pub(crate) use transfer::{export_devices, import_device};
pub(crate) use upload::upload;

use crate::error::{self, Fatal};
use crate::schema::{
    DeviceAlgKey, Digest, FALLBACKS, FallbackValue, META, META_NEXT_SEQ, OTK_IDS, OTK_KEYS,
    OTK_QUEUE, OtkIdKey, OtkKey, OtkValue, Queue,
};
use crate::slot::DbSlot;

/// Runs `f` in a read transaction on the blocking pool, in the caller's
/// span.
pub(crate) async fn read_txn<T, F>(slot: &Arc<DbSlot>, op: &'static str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&ReadTransaction) -> std::result::Result<T, Fatal> + Send + 'static,
{
    let slot = Arc::clone(slot);
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        let _enter = span.enter();
        // After a failed reopen the first reader (or writer) to come
        // along opens the file.
        let db = slot.get_or_reopen(op)?;
        let txn = db.begin_read().map_err(|e| Fatal::from(e).into_error(op))?;
        f(&txn).map_err(|f| f.into_error(op))
    })
    .await
    .map_err(|e| error::task_failed(op, e))?
}

/// An algorithm the store wrote itself.
pub(super) fn parse_alg(s: &str) -> Result<Algorithm, Fatal> {
    decode::algorithm(s).map_err(Fatal::Other)
}

/// A key ID the store wrote itself.
pub(super) fn parse_key_id(s: &str) -> Result<KeyId, Fatal> {
    decode::key_id(s).map_err(Fatal::Other)
}

/// A stored key: its key ID, and its JSON checked with the digest stored
/// next to it ([`decode::key_json_with_digest`]). A value that does not
/// decode is [`Error::Corrupt`] naming the key (`what`, e.g. "one-time
/// key"), its device and user: the claim that meets it fails before its
/// commit, the export (and so `check`) reports it (R10.7).
pub(super) fn stored_key(
    (user, device): (&str, &str),
    what: &str,
    key_id: &str,
    json: &str,
    digest: Digest,
) -> Result<(KeyId, KeyJson), Fatal> {
    let decoded = decode::key_id(key_id).and_then(|id| {
        let json = decode::key_json_with_digest(json, KeyDigest::from_bytes(digest))?;
        Ok((id, json))
    });
    decoded.map_err(|e| {
        Fatal::Other(Error::corrupt_because(
            format!("{what} {key_id} of {user} {device}"),
            e,
        ))
    })
}

/// `limits.remembered_issued_keys` as a queue distance: a key issued at
/// position `pos` of a queue whose head is `head` is remembered while
/// `head - pos <= keep` (R3.4), exactly the newest `keep`, as the reference
/// model does. Older rows wait to be pruned by an upload and count as
/// forgotten.
pub(super) fn remembered_limit(limits: &Limits) -> u64 {
    u64::try_from(limits.remembered_issued_keys).unwrap_or(u64::MAX)
}

/// Every table of one write transaction, opened once, and the sequence
/// counter (R3.5) cached until [`WriteTables::finish`].
pub(crate) struct WriteTables<'txn> {
    meta: Table<'txn, &'static str, u64>,
    queue: Table<'txn, DeviceAlgKey<'static>, Queue>,
    keys: Table<'txn, OtkKey<'static>, OtkValue<'static>>,
    ids: Table<'txn, OtkIdKey<'static>, Digest>,
    fallbacks: Table<'txn, DeviceAlgKey<'static>, FallbackValue<'static>>,
    next_seq: u64,
    seq_dirty: bool,
}

impl<'txn> WriteTables<'txn> {
    /// Opens every table of `txn`.
    pub(crate) fn open(txn: &'txn WriteTransaction) -> Result<Self, Fatal> {
        let meta = txn.open_table(META)?;
        let next_seq = match meta.get(META_NEXT_SEQ)? {
            Some(v) => v.value(),
            None => {
                return Err(Fatal::Other(Error::corrupt(
                    "redb file has no sequence counter",
                )));
            }
        };
        Ok(Self {
            meta,
            queue: txn.open_table(OTK_QUEUE)?,
            keys: txn.open_table(OTK_KEYS)?,
            ids: txn.open_table(OTK_IDS)?,
            fallbacks: txn.open_table(FALLBACKS)?,
            next_seq,
            seq_dirty: false,
        })
    }

    /// Writes the sequence counter back; call before committing. Returns
    /// whether it moved (then something was written).
    pub(crate) fn finish(&mut self) -> Result<bool, Fatal> {
        if self.seq_dirty {
            self.meta.insert(META_NEXT_SEQ, self.next_seq)?;
            self.seq_dirty = false;
            return Ok(true);
        }
        Ok(false)
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.saturating_add(1);
        self.seq_dirty = true;
        seq
    }

    fn raise_seq_to(&mut self, at_least: u64) {
        if self.next_seq < at_least {
            self.next_seq = at_least;
            self.seq_dirty = true;
        }
    }

    /// The queue `(first, head, end)` of a (device, algorithm); all 0 when
    /// it has none.
    fn queue(&self, key: DeviceAlgKey<'_>) -> Result<Queue, Fatal> {
        let q = self.queue.get(key)?.map_or((0, 0, 0), |v| v.value());
        check_queue(q)?;
        Ok(q)
    }

    /// Writes the queue of a (device, algorithm); no row when it is empty.
    fn set_queue(&mut self, key: DeviceAlgKey<'_>, q: Queue) -> Result<(), Fatal> {
        if q.0 == q.2 {
            self.queue.remove(key)?;
        } else {
            self.queue.insert(key, q)?;
        }
        Ok(())
    }

    /// Appends one key at the end of a queue (the caller writes the queue
    /// back with [`WriteTables::set_queue`]).
    fn append(
        &mut self,
        (u, d, a): DeviceAlgKey<'_>,
        q: &mut Queue,
        seq: u64,
        key_id: &str,
        digest: Digest,
        json: &str,
    ) -> Result<(), Fatal> {
        let pos = q.2;
        q.2 = q.2.saturating_add(1);
        self.keys
            .insert((u, d, a, pos), (seq, key_id, digest, json))?;
        self.ids.insert((u, d, key_id, pos), digest)?;
        Ok(())
    }
}

/// A queue whose positions are out of order breaks an invariant.
pub(super) fn check_queue((first, head, end): Queue) -> Result<(), Fatal> {
    if first <= head && head <= end {
        Ok(())
    } else {
        Err(Fatal::Other(Error::corrupt(format!(
            "one-time key queue with positions {first}, {head}, {end} out of order"
        ))))
    }
}

/// Removes every row of `table` in `[lo, hi)`, calling `seen` with each
/// removed key and `seen_row` with each removed row; returns how many were
/// removed.
pub(super) fn remove_range<'a, K, V>(
    table: &mut Table<'_, K, V>,
    lo: K::SelfType<'a>,
    hi: K::SelfType<'a>,
    mut seen: impl FnMut(K::SelfType<'_>),
    mut seen_row: impl FnMut(K::SelfType<'_>, V::SelfType<'_>),
) -> Result<u64, Fatal>
where
    K: redb::Key + 'static,
    V: redb::Value + 'static,
{
    let mut removed = 0;
    let mut it = table.extract_from_if(lo..hi, |_, _| true)?;
    for row in &mut it {
        let (k, v) = row?;
        seen(k.value());
        seen_row(k.value(), v.value());
        removed += 1;
    }
    it.close()?;
    Ok(removed)
}
