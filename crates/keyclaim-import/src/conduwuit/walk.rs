//! Devices in (user ID, device ID) byte order, from keys in RocksDB's
//! order, with seeks and without holding any list in memory.
//!
//! A key is `user 0xFF device 0xFF ...`. RocksDB orders keys by their
//! bytes, so where one ID is a proper prefix of another the longer one comes
//! first (`@a:hs.org 0xFF` before `@a:hs 0xFF`: `.` is below `0xFF`), while
//! the import reads devices in byte order of the IDs themselves (R2.7),
//! shorter first. Seen as a trie of IDs, RocksDB's order is a post-order
//! walk and the import's a pre-order walk; [`next_member`] finds each next
//! ID of the pre-order walk with a few seeks.

#![cfg_attr(not(feature = "conduwuit"), allow(dead_code))]

use keyclaim::Result;

use super::layout::{SEP, after_prefix, corrupt};

/// An ordered byte-keyed map's cursor: a RocksDB raw iterator, or a
/// `BTreeMap`'s in the tests.
pub(crate) trait Seek {
    /// Moves to the first key at or after `key`.
    ///
    /// # Errors
    /// The engine's.
    fn seek(&mut self, key: &[u8]) -> Result<()>;

    /// The key the cursor is at, `None` past the end.
    fn key(&self) -> Option<&[u8]>;
}

/// The ID of the key the cursor is at, if the key starts with `base`: the
/// bytes after `base` up to the next separator.
fn member_at(it: &impl Seek, base: &[u8], cf: &str) -> Result<Option<Vec<u8>>> {
    let Some(key) = it.key() else {
        return Ok(None);
    };
    let Some(rest) = key.strip_prefix(base) else {
        return Ok(None);
    };
    match rest.iter().position(|b| *b == SEP) {
        Some(n) => Ok(Some(rest[..n].to_vec())),
        None => Err(corrupt(cf, key, "key is not `user 0xFF device 0xFF ...`")),
    }
}

/// Whether some key starts with `base id 0xFF`.
fn is_member(it: &mut impl Seek, base: &[u8], id: &[u8]) -> Result<bool> {
    let probe = [base, id, &[SEP]].concat();
    it.seek(&probe)?;
    Ok(it.key().is_some_and(|k| k.starts_with(&probe)))
}

/// The shortest ID that is a prefix of `id` at least `shortest` bytes long
/// (`id` itself if no shorter one is an ID): the first ID of the pre-order
/// walk on the path to `id`.
fn shallowest(it: &mut impl Seek, base: &[u8], id: Vec<u8>, shortest: usize) -> Result<Vec<u8>> {
    for len in shortest..id.len() {
        if is_member(it, base, &id[..len])? {
            return Ok(id[..len].to_vec());
        }
    }
    Ok(id)
}

/// Among the IDs that follow `base` in some key (`base` empty for user IDs,
/// `user 0xFF` for a user's device IDs), the first one in byte order after
/// `after`, or the first one of all when `after` is `None`.
///
/// # Errors
/// The engine's, and [`keyclaim::Error::Corrupt`] for a key without the
/// separator after the ID.
pub(crate) fn next_member(
    it: &mut impl Seek,
    cf: &str,
    base: &[u8],
    after: Option<&[u8]>,
) -> Result<Option<Vec<u8>>> {
    let Some(x) = after else {
        it.seek(base)?;
        return match member_at(it, base, cf)? {
            Some(y) => Ok(Some(shallowest(it, base, y, 0)?)),
            None => Ok(None),
        };
    };
    // IDs that extend `x` come right after it in byte order; in RocksDB's
    // order they come before `x`'s own keys.
    let below = [base, x].concat();
    it.seek(&[&below[..], &[0]].concat())?;
    if it
        .key()
        .is_some_and(|k| k.starts_with(&below) && k.get(below.len()) != Some(&SEP))
        && let Some(y) = member_at(it, base, cf)?
    {
        return Ok(Some(shallowest(it, base, y, x.len() + 1)?));
    }
    // Then the IDs after `x` and everything that extends it, but not the
    // prefixes of `x`, which RocksDB puts after `x` and byte order before.
    let mut at = after_prefix(&below);
    while let Some(pos) = at {
        it.seek(&pos)?;
        let Some(y) = member_at(it, base, cf)? else {
            return Ok(None);
        };
        if x.starts_with(&y) {
            at = after_prefix(&[base, &y].concat());
            continue;
        }
        let common = x.iter().zip(&y).take_while(|(a, b)| a == b).count();
        return Ok(Some(shallowest(it, base, y, common + 1)?));
    }
    Ok(None)
}

/// The first (user ID, device ID) in byte order after `after` (or the first
/// of all) among the keys the cursor walks.
///
/// # Errors
/// As [`next_member`].
pub(crate) fn next_device(
    it: &mut impl Seek,
    cf: &str,
    after: Option<(&[u8], &[u8])>,
) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut user = match after {
        None => None,
        Some((u, d)) => {
            let base = [u, &[SEP]].concat();
            if let Some(device) = next_member(it, cf, &base, Some(d))? {
                return Ok(Some((u.to_vec(), device)));
            }
            Some(u.to_vec())
        }
    };
    loop {
        let Some(u) = next_member(it, cf, b"", user.as_deref())? else {
            return Ok(None);
        };
        let base = [&u[..], &[SEP]].concat();
        if let Some(device) = next_member(it, cf, &base, None)? {
            return Ok(Some((u, device)));
        }
        // Unreachable for a key `u 0xFF`: `next_member` reports it as
        // corrupt. Kept as a loop so that nothing can spin or panic.
        user = Some(u);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::{BTreeMap, BTreeSet};
    use std::ops::Bound;

    use super::*;

    /// A `BTreeMap`'s keys as a cursor.
    struct MapCursor<'a> {
        map: &'a BTreeMap<Vec<u8>, ()>,
        at: Option<Vec<u8>>,
        seeks: usize,
    }

    impl Seek for MapCursor<'_> {
        fn seek(&mut self, key: &[u8]) -> Result<()> {
            self.seeks += 1;
            self.at = self
                .map
                .range::<[u8], _>((Bound::Included(key), Bound::Unbounded))
                .next()
                .map(|(k, ())| k.clone());
            Ok(())
        }

        fn key(&self) -> Option<&[u8]> {
            self.at.as_deref()
        }
    }

    /// A (user ID, device ID) as bytes.
    type Pair = (Vec<u8>, Vec<u8>);

    /// Every device of `keys`, walked with [`next_device`], and the seeks
    /// it took.
    fn walk(map: &BTreeMap<Vec<u8>, ()>) -> (Vec<Pair>, usize) {
        let mut it = MapCursor {
            map,
            at: None,
            seeks: 0,
        };
        let mut out: Vec<Pair> = Vec::new();
        loop {
            let after = out.last().map(|(u, d)| (u.as_slice(), d.as_slice()));
            match next_device(&mut it, "cf", after).unwrap() {
                Some(d) => out.push(d),
                None => return (out, it.seeks),
            }
        }
    }

    fn keys(devices: &[(&str, &str)]) -> BTreeMap<Vec<u8>, ()> {
        let mut map = BTreeMap::new();
        for (u, d) in devices {
            for suffix in [
                &b"\x00\x00\x00\x00\x00\x00\x00\x01\xffa:1"[..],
                b"\xff\xff\xff\xff\xff\xff\xff\xff\xffz:9",
            ] {
                let key = [u.as_bytes(), &[SEP], d.as_bytes(), &[SEP], suffix].concat();
                map.insert(key, ());
            }
        }
        map
    }

    fn sorted(devices: &[(&str, &str)]) -> Vec<Pair> {
        let set: BTreeSet<Pair> = devices
            .iter()
            .map(|(u, d)| (u.as_bytes().to_vec(), d.as_bytes().to_vec()))
            .collect();
        set.into_iter().collect()
    }

    #[test]
    fn prefixes_come_first_as_in_byte_order() {
        let devices = [
            ("@a:hs", "D"),
            ("@a:hs.org", "D"),
            ("@a:hs.org", "DX"),
            ("@a:hs.org", "DXY"),
            ("@a:hs.org", "DY"),
            ("@a:hs.org", ""),
            ("@a:h", "Q"),
            ("@b:hs", "D"),
            ("", "E"),
            ("@a:hs.org.uk", "D"),
            ("@a:hs.orgz", "D"),
        ];
        let map = keys(&devices);
        // RocksDB's own order of the users differs from byte order.
        let mut rocks_order: Vec<&[u8]> = Vec::new();
        for k in map.keys() {
            let user = k.split(|b| *b == SEP).next().unwrap();
            if rocks_order.last() != Some(&user) {
                rocks_order.push(user);
            }
        }
        let mut byte_order = rocks_order.clone();
        byte_order.sort();
        assert_ne!(rocks_order, byte_order);
        let (walked, _) = walk(&map);
        assert_eq!(walked, sorted(&devices));
    }

    #[test]
    fn every_small_set_of_ids_in_byte_order() {
        // All sets of up to 4 users from a small alphabet of IDs that are
        // prefixes of one another, each with devices that are too.
        let ids = ["", "a", "ab", "abc", "b", "ba", "a\u{7f}"];
        let devices = ["", "d", "de", "e"];
        let mut cases = 0;
        for mask in 1u32..(1 << ids.len()) {
            let users: Vec<&str> = (0..ids.len())
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| ids[i])
                .collect();
            if users.len() > 4 {
                continue;
            }
            let pairs: Vec<(&str, &str)> = users
                .iter()
                .enumerate()
                .flat_map(|(n, u)| {
                    devices
                        .iter()
                        .enumerate()
                        .filter(move |(m, _)| (n + m) % 3 != 1)
                        .map(move |(_, d)| (*u, *d))
                })
                .collect();
            let (walked, _) = walk(&keys(&pairs));
            assert_eq!(walked, sorted(&pairs), "{users:?}");
            cases += 1;
        }
        assert!(cases > 90, "{cases}");
    }

    #[test]
    fn seeks_stay_few_per_device() {
        let users: Vec<String> = (0..50)
            .map(|i| format!("@user{i:03}:example.org"))
            .collect();
        let pairs: Vec<(&str, &str)> = users
            .iter()
            .flat_map(|u| [(u.as_str(), "ABCDEFGHIJ"), (u.as_str(), "KLMNOPQRST")])
            .collect();
        let (walked, seeks) = walk(&keys(&pairs));
        assert_eq!(walked.len(), 100);
        // Two seeks per step and one per byte past the common prefix.
        assert!(seeks < 100 * 30, "{seeks} seeks for 100 devices");
    }

    #[test]
    fn a_key_without_its_separator_is_corrupt() {
        let mut map = keys(&[("@a:hs", "D")]);
        map.insert(b"@b:hs".to_vec(), ());
        let mut it = MapCursor {
            map: &map,
            at: None,
            seeks: 0,
        };
        let first = next_device(&mut it, "cf", None).unwrap().unwrap();
        assert_eq!(first, (b"@a:hs".to_vec(), b"D".to_vec()));
        let err = next_device(&mut it, "cf", Some((b"@a:hs", b"D"))).unwrap_err();
        assert!(err.to_string().contains("cf"), "{err}");
    }
}
