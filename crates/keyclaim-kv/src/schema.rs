//! The key layout: what the layer stores in each [`Space`], how keys and
//! values are encoded, the format version, and opening (stamping a new
//! engine, refusing a newer or an unversioned one).
//!
//! # Keys
//!
//! Keys are tuples of strings and integers, encoded so that their unsigned
//! byte order is the tuple order: each string is its UTF-8 bytes followed by
//! a `0x00` byte (no identifier contains U+0000, R2.8, so the terminator
//! sorts before every byte of a longer string: `DEV` < `DEVA`), each integer
//! 8 bytes big-endian. Every key of a device starts with `user \0 device \0`,
//! so a device's or a user's rows are one prefix in each space (R7.1, R7.2).
//!
//! # Format version 1
//!
//! | space | key | value | what for |
//! | --- | --- | --- | --- |
//! | `meta` | `format_version` | u64 | this layout's version |
//! | `meta` | `next_seq` | u64 | the upload sequence counter (R3.5) |
//! | `devices` | user, device | device record | counts, fallback keys, queue heads |
//! | `keys` | user, device, algorithm, pos | seq, digest, key ID, canonical JSON | one-time keys in claim order |
//! | `ids` | user, device, key ID, pos | digest | re-upload checks (R3.2, R3.4) |
//!
//! A device record holds, per algorithm, the queue `(first, head, end)` of
//! its one-time keys, and per algorithm its fallback key (key ID, used flag,
//! digest, canonical JSON). A (device, algorithm) queue numbers its keys with
//! positions handed out in upload order (upload sequence, then key ID:
//! R3.5) without gaps: `head..end` are stored (claimable, counted: R6.1,
//! R8.1), `first..head` were issued and are the remembered issued keys
//! (R3.4). A claim reads the record and the keys at `head`, and writes the
//! record back: one point read and one put per device, however many keys
//! it takes. Counts and unused fallback types (R6.4, R16.1) are one point
//! read of the record, which one batch always writes whole, so every read of
//! one device is consistent without a snapshot. Exactly the newest
//! `remembered_issued_keys` issued keys are remembered (R3.4); rows of older
//! ones are deleted by the next upload to the queue once more than
//! [`PRUNE_CHUNK`] wait. A key reset (R13.1) moves the stored keys after the
//! first removed one down, keeping positions without gaps.
//!
//! Integers in values are big-endian; a string in a value is a u32
//! big-endian length and its bytes. A value with bytes left over, or too
//! few, is corrupt.
//!
//! # Versions
//!
//! Opening an engine without any key in `meta` stamps the current version
//! (and refuses if another space holds data: that is data without a
//! version, [`Error::Corrupt`]); a newer version is refused with
//! [`Error::UnsupportedVersion`]. Version 1 is the first: there is nothing
//! to migrate yet.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use keyclaim::{Error, Result};

use crate::BACKEND;
use crate::engine::{KvEngine, Space, WriteBatch};
use crate::error::engine_failed;

/// The newest layout format this build reads and writes.
pub const FORMAT_VERSION: u64 = 1;

/// `meta` key of the format version.
pub(crate) const META_VERSION: &[u8] = b"format_version";
/// `meta` key of the next upload sequence number (R3.5).
pub(crate) const META_NEXT_SEQ: &[u8] = b"next_seq";

/// How many rows of forgotten issued keys a queue may hold before an upload
/// removes them down to the remembered limit.
pub(crate) const PRUNE_CHUNK: u64 = 64;

/// A digest of key JSON without signatures, as stored.
pub(crate) type Digest = [u8; 32];

// ---- keys ----

/// Builds a key of NUL-terminated strings.
fn key_of(parts: &[&str], extra: usize) -> Vec<u8> {
    let len: usize = parts.iter().map(|p| p.len() + 1).sum();
    let mut out = Vec::with_capacity(len + extra);
    for part in parts {
        out.extend_from_slice(part.as_bytes());
        out.push(0);
    }
    out
}

/// `user \0`: the prefix of a user's rows in every space.
pub(crate) fn user_prefix(user: &str) -> Vec<u8> {
    key_of(&[user], 0)
}

/// `user \0 device \0`: a device's record key, and the prefix of its rows.
pub(crate) fn device_key(user: &str, device: &str) -> Vec<u8> {
    key_of(&[user, device], 0)
}

/// The `keys` row of a queue position.
pub(crate) fn key_row(user: &str, device: &str, alg: &str, pos: u64) -> Vec<u8> {
    let mut key = key_of(&[user, device, alg], 8);
    key.extend_from_slice(&pos.to_be_bytes());
    key
}

/// The `ids` row of a key ID at a queue position.
pub(crate) fn id_row(user: &str, device: &str, key_id: &str, pos: u64) -> Vec<u8> {
    let mut key = key_of(&[user, device, key_id], 8);
    key.extend_from_slice(&pos.to_be_bytes());
    key
}

/// The prefix of a key ID's `ids` rows.
pub(crate) fn id_prefix(user: &str, device: &str, key_id: &str) -> Vec<u8> {
    key_of(&[user, device, key_id], 0)
}

/// The exclusive end of the keys starting with `prefix` (which ends with
/// the `0x00` terminator): the same bytes with the last one raised to `0x01`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    if let Some(last) = end.last_mut() {
        *last = last.saturating_add(1);
    }
    end
}

/// A key split into its strings and its trailing integer, if it has one.
#[derive(Debug)]
pub(crate) struct KeyParts<'k> {
    pub(crate) strings: Vec<&'k str>,
    pub(crate) pos: Option<u64>,
}

/// Splits a key of `space` of `strings` NUL-terminated strings and, when
/// `with_pos`, a trailing 8-byte integer. A key of any other shape (a key
/// keyclaim did not write) is [`Error::Corrupt`].
pub(crate) fn parse_key(
    space: Space,
    key: &[u8],
    strings: usize,
    with_pos: bool,
) -> Result<KeyParts<'_>> {
    let bad = |why: &str| {
        Error::corrupt(format!(
            "key {} of the {space} space is not one keyclaim writes: {why}",
            printable(key)
        ))
    };
    let mut rest = key;
    let mut parts = Vec::with_capacity(strings);
    for _ in 0..strings {
        let end = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| bad("too few parts"))?;
        let part = std::str::from_utf8(&rest[..end]).map_err(|_| bad("not UTF-8"))?;
        parts.push(part);
        rest = &rest[end + 1..];
    }
    let pos = if with_pos {
        let bytes: [u8; 8] = rest.try_into().map_err(|_| bad("no 8-byte position"))?;
        Some(u64::from_be_bytes(bytes))
    } else if rest.is_empty() {
        None
    } else {
        return Err(bad("bytes after its last part"));
    };
    Ok(KeyParts {
        strings: parts,
        pos,
    })
}

/// A key for an error message: its text where printable, escaped bytes
/// elsewhere, at most 200 bytes.
fn printable(key: &[u8]) -> String {
    let shown = &key[..key.len().min(200)];
    shown.escape_ascii().to_string()
}

// ---- values ----

/// Encodes a value.
#[derive(Default)]
pub(crate) struct Encoder(Vec<u8>);

impl Encoder {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }
    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub(crate) fn digest(&mut self, d: &Digest) -> &mut Self {
        self.0.extend_from_slice(d);
        self
    }
    pub(crate) fn str(&mut self, s: &str) -> &mut Self {
        // Strings the layer stores are far below 4 GiB (R8.2).
        let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    pub(crate) fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

/// Decodes a value; every shortfall is [`Error::Corrupt`] naming `what`.
pub(crate) struct Decoder<'v> {
    rest: &'v [u8],
    what: &'v dyn Fn() -> String,
}

impl<'v> Decoder<'v> {
    pub(crate) fn new(value: &'v [u8], what: &'v dyn Fn() -> String) -> Self {
        Self { rest: value, what }
    }

    fn corrupt(&self, why: &str) -> Error {
        Error::corrupt(format!("{}: stored value {why}", (self.what)()))
    }

    fn take(&mut self, n: usize) -> Result<&'v [u8]> {
        if self.rest.len() < n {
            return Err(self.corrupt("is truncated"));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    pub(crate) fn u64(&mut self) -> Result<u64> {
        let bytes: [u8; 8] = self
            .take(8)?
            .try_into()
            .map_err(|_| self.corrupt("is truncated"))?;
        Ok(u64::from_be_bytes(bytes))
    }

    pub(crate) fn u32(&mut self) -> Result<u32> {
        let bytes: [u8; 4] = self
            .take(4)?
            .try_into()
            .map_err(|_| self.corrupt("is truncated"))?;
        Ok(u32::from_be_bytes(bytes))
    }

    pub(crate) fn bool(&mut self) -> Result<bool> {
        match self.take(1)? {
            [0] => Ok(false),
            [1] => Ok(true),
            _ => Err(self.corrupt("has a flag that is neither 0 nor 1")),
        }
    }

    pub(crate) fn digest(&mut self) -> Result<Digest> {
        self.take(32)?
            .try_into()
            .map_err(|_| self.corrupt("is truncated"))
    }

    pub(crate) fn str(&mut self) -> Result<&'v str> {
        let len = usize::try_from(self.u32()?).map_err(|_| self.corrupt("is too long"))?;
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).map_err(|_| self.corrupt("holds text that is not UTF-8"))
    }

    /// Checks that nothing is left.
    pub(crate) fn end(self) -> Result<()> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(self.corrupt("has bytes left over"))
        }
    }
}

/// A queue's positions: `first..head` remembered issued keys, `head..end`
/// stored keys.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Queue {
    pub(crate) first: u64,
    pub(crate) head: u64,
    pub(crate) end: u64,
}

impl Queue {
    /// How many keys are stored.
    pub(crate) fn stored(&self) -> u64 {
        self.end - self.head
    }
}

/// A device's fallback key of one algorithm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Fallback {
    pub(crate) key_id: String,
    pub(crate) used: bool,
    pub(crate) digest: Digest,
    pub(crate) json: String,
}

/// The record of one device in `devices`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct DeviceRecord {
    /// Per algorithm; a queue without keys is left out.
    pub(crate) queues: BTreeMap<String, Queue>,
    /// Per algorithm.
    pub(crate) fallbacks: BTreeMap<String, Fallback>,
}

impl DeviceRecord {
    /// Whether the device has no state (then it has no record).
    pub(crate) fn is_empty(&self) -> bool {
        self.queues.is_empty() && self.fallbacks.is_empty()
    }

    /// The queue of an algorithm, empty when it has none.
    pub(crate) fn queue(&self, alg: &str) -> Queue {
        self.queues.get(alg).copied().unwrap_or_default()
    }

    /// Sets the queue of an algorithm, leaving out an empty one.
    pub(crate) fn set_queue(&mut self, alg: &str, q: Queue) {
        if q.first == q.end {
            self.queues.remove(alg);
        } else if let Some(slot) = self.queues.get_mut(alg) {
            *slot = q;
        } else {
            self.queues.insert(alg.to_owned(), q);
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::with_capacity(
            8 + self.queues.len() * 40
                + self
                    .fallbacks
                    .values()
                    .map(|f| f.json.len() + 64)
                    .sum::<usize>(),
        );
        e.u64(self.queues.len() as u64);
        for (alg, q) in &self.queues {
            e.str(alg).u64(q.first).u64(q.head).u64(q.end);
        }
        e.u64(self.fallbacks.len() as u64);
        for (alg, f) in &self.fallbacks {
            e.str(alg)
                .str(&f.key_id)
                .u8(u8::from(f.used))
                .digest(&f.digest)
                .str(&f.json);
        }
        e.finish()
    }

    /// Decodes the record of `user`'s `device`; checks that every queue's
    /// positions are in order.
    pub(crate) fn decode(user: &str, device: &str, value: &[u8]) -> Result<Self> {
        let what = || format!("device record of {user} {device}");
        let mut d = Decoder::new(value, &what);
        let mut record = Self::default();
        for _ in 0..d.u64()? {
            let alg = d.str()?.to_owned();
            let q = Queue {
                first: d.u64()?,
                head: d.u64()?,
                end: d.u64()?,
            };
            if !(q.first <= q.head && q.head <= q.end) || q.first == q.end {
                return Err(Error::corrupt(format!(
                    "{}: queue of {alg} with positions {}, {}, {} out of order",
                    what(),
                    q.first,
                    q.head,
                    q.end
                )));
            }
            record.queues.insert(alg, q);
        }
        for _ in 0..d.u64()? {
            let alg = d.str()?.to_owned();
            let f = Fallback {
                key_id: d.str()?.to_owned(),
                used: d.bool()?,
                digest: d.digest()?,
                json: d.str()?.to_owned(),
            };
            record.fallbacks.insert(alg, f);
        }
        d.end()?;
        Ok(record)
    }
}

/// A row of `keys`: one one-time key at a queue position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KeyRow {
    /// The upload sequence number (R3.5).
    pub(crate) seq: u64,
    pub(crate) digest: Digest,
    pub(crate) key_id: String,
    /// The canonical JSON; empty for a remembered issued key imported
    /// without it.
    pub(crate) json: String,
}

impl KeyRow {
    pub(crate) fn encode(seq: u64, digest: &Digest, key_id: &str, json: &str) -> Vec<u8> {
        Encoder::with_capacity(48 + key_id.len() + json.len())
            .u64(seq)
            .digest(digest)
            .str(key_id)
            .str(json)
            .finish()
    }

    pub(crate) fn decode(user: &str, device: &str, pos: u64, value: &[u8]) -> Result<Self> {
        let what = || format!("one-time key at position {pos} of {user} {device}");
        let mut d = Decoder::new(value, &what);
        let row = Self {
            seq: d.u64()?,
            digest: d.digest()?,
            key_id: d.str()?.to_owned(),
            json: d.str()?.to_owned(),
        };
        d.end()?;
        Ok(row)
    }
}

/// Decodes a `meta` integer.
pub(crate) fn decode_u64(name: &str, value: &[u8]) -> Result<u64> {
    let what = || format!("meta {name}");
    let mut d = Decoder::new(value, &what);
    let v = d.u64()?;
    d.end()?;
    Ok(v)
}

/// Decodes an `ids` value.
pub(crate) fn decode_digest(key_id: &str, value: &[u8]) -> Result<Digest> {
    let what = || format!("digest of one-time key {key_id}");
    let mut d = Decoder::new(value, &what);
    let v = d.digest()?;
    d.end()?;
    Ok(v)
}

// ---- opening ----

/// Checks the format version of the engine's data, stamping a new engine;
/// blocking.
///
/// # Errors
/// [`Error::UnsupportedVersion`] for a newer version, [`Error::Corrupt`]
/// for data without a version (or a version that does not decode), a
/// retryable [`Error::Storage`] when the engine fails.
pub(crate) fn init_or_check(engine: &dyn KvEngine) -> Result<()> {
    let found = engine
        .get(Space::Meta, META_VERSION)
        .map_err(engine_failed("open"))?;
    match found {
        Some(v) => match decode_u64("format_version", &v)? {
            FORMAT_VERSION => Ok(()),
            other => Err(Error::UnsupportedVersion {
                backend: BACKEND,
                found: i64::try_from(other).unwrap_or(i64::MAX),
                supported: FORMAT_VERSION as i64,
            }),
        },
        None => {
            for space in Space::ALL {
                let mut any = false;
                engine
                    .scan(space, b"", None, &mut |_, _| {
                        any = true;
                        ControlFlow::Break(())
                    })
                    .map_err(engine_failed("open"))?;
                if any {
                    return Err(Error::corrupt(format!(
                        "the {space} key space holds data but the engine has no keyclaim \
                         format version: not written by keyclaim, or the version was lost"
                    )));
                }
            }
            let mut batch = WriteBatch::new();
            batch.put(
                Space::Meta,
                META_NEXT_SEQ.to_vec(),
                1u64.to_be_bytes().to_vec(),
            );
            batch.put(
                Space::Meta,
                META_VERSION.to_vec(),
                FORMAT_VERSION.to_be_bytes().to_vec(),
            );
            engine.write(&batch, true).map_err(engine_failed("open"))?;
            tracing::debug!(version = FORMAT_VERSION, "stamped a new keyclaim key space");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuple_order_is_byte_order() {
        assert!(device_key("@a:x", "DEV") < device_key("@a:x", "DEVA"));
        assert!(device_key("@a:x", "DEVA") < device_key("@a:xa", ""));
        assert!(key_row("u", "d", "alg", 1) < key_row("u", "d", "alg", 256));
        assert!(key_row("u", "d", "alg", u64::MAX) < key_row("u", "d", "alg2", 0));
        let prefix = device_key("u", "d");
        let end = prefix_end(&prefix);
        assert!(key_row("u", "d", "\u{10FFFF}", u64::MAX) < end);
        assert!(device_key("u", "d\u{1}") >= end);
    }

    #[test]
    fn keys_parse_back_and_wrong_shapes_are_corrupt() {
        let k = key_row("@u:x", "D", "alg", 7);
        let parts = parse_key(Space::Keys, &k, 3, true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parts.strings, ["@u:x", "D", "alg"]);
        assert_eq!(parts.pos, Some(7));
        for bad in [
            &b"no-terminator"[..],
            b"u\0d\0alg\0short",
            b"u\0d\0",
            b"\xff\0d\0",
        ] {
            assert!(matches!(
                parse_key(Space::Keys, bad, 3, true),
                Err(Error::Corrupt { .. })
            ));
        }
        assert!(parse_key(Space::Devices, b"u\0d\0extra", 2, false).is_err());
    }

    #[test]
    fn records_round_trip_and_damage_is_corrupt() {
        let mut record = DeviceRecord::default();
        record.set_queue(
            "alg",
            Queue {
                first: 1,
                head: 2,
                end: 5,
            },
        );
        record.fallbacks.insert(
            "alg".into(),
            Fallback {
                key_id: "alg:f".into(),
                used: true,
                digest: [7; 32],
                json: "\"k\"".into(),
            },
        );
        let bytes = record.encode();
        assert_eq!(DeviceRecord::decode("u", "d", &bytes).ok(), Some(record));
        for cut in 0..bytes.len() {
            assert!(
                DeviceRecord::decode("u", "d", &bytes[..cut]).is_err(),
                "{cut}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(DeviceRecord::decode("u", "d", &longer).is_err());
        let row = KeyRow::encode(3, &[1; 32], "alg:k", "{}");
        let decoded = KeyRow::decode("u", "d", 0, &row).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((decoded.seq, decoded.key_id.as_str()), (3, "alg:k"));
        assert!(KeyRow::decode("u", "d", 0, &row[..row.len() - 1]).is_err());
    }
}
