//! The conduwuit family's key and value encodings, as bytes: what the
//! RocksDB reader parses, kept apart from RocksDB so that the encodings are
//! tested without it.
//!
//! The family's database layer (tuwunel `src/database/ser.rs`, continuwuity
//! `src/database/ser.rs`) writes a tuple key as its elements separated by
//! one `0xFF` byte (a byte that never occurs in UTF-8), strings as their
//! bytes, integers as big-endian bytes, and `Json(..)` as `serde_json`
//! text.

// Without RocksDB only the layout detection and the tests use the parsers.
#![cfg_attr(not(feature = "conduwuit"), allow(dead_code))]

use std::fmt;

use keyclaim::transfer::{SourceFallback, SourceOtk, SourceRow};
use keyclaim::{Error, Result};
use serde::Deserialize;
use serde_json::Value;

/// The separator between the elements of a key or value tuple.
pub(crate) const SEP: u8 = 0xFF;

/// tuwunel's one-time keys in upload order (MSC4225):
/// `user 0xFF device 0xFF count(u64, big-endian) 0xFF algorithm:name` ->
/// key JSON.
pub(crate) const OTK_MSC4225_CF: &str = "onetimekeyid4225_otk";
/// The older one-time keys in key ID order (conduit, conduwuit,
/// continuwuity, tuwunel before MSC4225):
/// `user 0xFF device 0xFF "algorithm:name"` (the key ID as a JSON string,
/// quotes included) -> key JSON.
pub(crate) const OTK_KEY_ID_CF: &str = "onetimekeyid_onetimekeys";
/// tuwunel's fallback keys: `user 0xFF device 0xFF algorithm` ->
/// `{"key_id": .., "key": .., "used": ..}`.
pub(crate) const FALLBACK_TUWUNEL_CF: &str = "userdeviceidalgorithm_fallback";
/// continuwuity's fallback keys: `user 0xFF device 0xFF algorithm` ->
/// `used(1 byte) 0xFF key_id 0xFF key JSON`.
pub(crate) const FALLBACK_CONTINUWUITY_CF: &str = "fallbackkeyid_fallbackkey";

/// How a database stores one-time keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OtkLayout {
    /// tuwunel's MSC4225 column family `onetimekeyid4225_otk`: each key
    /// carries its upload count, so keys are imported in upload order.
    UploadOrder,
    /// The older column family `onetimekeyid_onetimekeys`: no upload order
    /// is stored, so keys are imported in key ID order, the order the
    /// homeserver handed them out.
    KeyIdOrder,
}

/// How a database stores fallback keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FallbackLayout {
    /// tuwunel's `userdeviceidalgorithm_fallback` (JSON entries).
    Tuwunel,
    /// continuwuity's `fallbackkeyid_fallbackkey` (tuple entries).
    Continuwuity,
}

impl OtkLayout {
    /// The column family's name.
    pub fn column_family(self) -> &'static str {
        match self {
            Self::UploadOrder => OTK_MSC4225_CF,
            Self::KeyIdOrder => OTK_KEY_ID_CF,
        }
    }
}

impl FallbackLayout {
    /// The column family's name.
    pub fn column_family(self) -> &'static str {
        match self {
            Self::Tuwunel => FALLBACK_TUWUNEL_CF,
            Self::Continuwuity => FALLBACK_CONTINUWUITY_CF,
        }
    }
}

/// The key column families a database holds, as
/// [`Layout::from_column_families`] found them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Where its one-time keys are.
    pub one_time_keys: OtkLayout,
    /// Where its fallback keys are (none for servers without fallback key
    /// support, both if both column families exist).
    pub fallback_keys: Vec<FallbackLayout>,
}

impl Layout {
    /// The layout of a database with these column families: the MSC4225
    /// one-time key column family if present (tuwunel reads only that one
    /// and drops the older one), else the older one.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when neither one-time key column family is
    /// there: not a database of the conduwuit family.
    pub fn from_column_families<S: AsRef<str>>(names: &[S]) -> Result<Self> {
        let has = |cf: &str| names.iter().any(|n| n.as_ref() == cf);
        let one_time_keys = if has(OTK_MSC4225_CF) {
            OtkLayout::UploadOrder
        } else if has(OTK_KEY_ID_CF) {
            OtkLayout::KeyIdOrder
        } else {
            return Err(Error::invalid_config(format!(
                "no column family {OTK_MSC4225_CF} or {OTK_KEY_ID_CF}: not a database of \
                 the conduwuit family (conduit, conduwuit, continuwuity, tuwunel)"
            )));
        };
        let fallback_keys = [FallbackLayout::Tuwunel, FallbackLayout::Continuwuity]
            .into_iter()
            .filter(|f| has(f.column_family()))
            .collect();
        Ok(Self {
            one_time_keys,
            fallback_keys,
        })
    }

    /// The column families read, one-time keys first.
    pub fn column_families(&self) -> Vec<&'static str> {
        let mut out = vec![self.one_time_keys.column_family()];
        out.extend(self.fallback_keys.iter().map(|f| f.column_family()));
        out
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let order = match self.one_time_keys {
            OtkLayout::UploadOrder => "upload order",
            OtkLayout::KeyIdOrder => "key ID order",
        };
        write!(
            f,
            "one-time keys from {} ({order}), fallback keys from ",
            self.one_time_keys.column_family()
        )?;
        if self.fallback_keys.is_empty() {
            return f.write_str("nowhere (no fallback key column family)");
        }
        let names: Vec<&str> = self
            .fallback_keys
            .iter()
            .map(|l| l.column_family())
            .collect();
        f.write_str(&names.join(" and "))
    }
}

/// A corrupt entry: the column family, the device, and what is wrong
/// (never key material).
pub(crate) fn corrupt(cf: &str, key: &[u8], what: &str) -> Error {
    Error::corrupt(format!(
        "RocksDB source, column family {cf}: entry of {}: {what}",
        shown(key)
    ))
}

/// A key's leading (user, device) part, shown escaped (IDs, not key
/// material).
fn shown(key: &[u8]) -> String {
    let mut parts = key.splitn(3, |b| *b == SEP);
    let user = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let device = String::from_utf8_lossy(parts.next().unwrap_or_default());
    format!("{user:?} {device:?}")
}

/// Every key of one device starts with this: `user 0xFF device 0xFF`.
pub(crate) fn device_prefix(user_id: &str, device_id: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(user_id.len() + device_id.len() + 2);
    p.extend_from_slice(user_id.as_bytes());
    p.push(SEP);
    p.extend_from_slice(device_id.as_bytes());
    p.push(SEP);
    p
}

/// The smallest byte string after every string that starts with `prefix`
/// (where a scan skips to after a device), or `None` when nothing sorts
/// after them.
pub(crate) fn after_prefix(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut next = prefix.to_vec();
    while let Some(last) = next.pop() {
        if last < u8::MAX {
            next.push(last + 1);
            return Some(next);
        }
    }
    None
}

/// An upload count as the `ts_added_ms` that orders a device's keys:
/// order-preserving from `u64` to `i64`, so that every key gets its own
/// place in the claim order, the upload order (R17.1).
fn order_of(count: u64) -> i64 {
    i64::from_be_bytes((count ^ (1 << 63)).to_be_bytes())
}

fn utf8(cf: &str, key: &[u8], bytes: &[u8], what: &str) -> Result<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| corrupt(cf, key, &format!("{what} is not UTF-8")))
}

/// `algorithm:name` as the algorithm and the name; a key ID without `:`
/// is all algorithm, which the import then leaves out as an invalid key ID.
fn split_key_id(key_id: &str) -> (String, String) {
    match key_id.split_once(':') {
        Some((a, n)) => (a.to_owned(), n.to_owned()),
        None => (key_id.to_owned(), String::new()),
    }
}

/// One entry of a one-time key column family as a row: the key after the
/// device's `prefix`, and the value (key JSON).
///
/// # Errors
/// [`Error::Corrupt`] when the entry does not have the layout's shape.
pub(crate) fn otk_row(
    layout: OtkLayout,
    (user_id, device_id): (&str, &str),
    prefix_len: usize,
    key: &[u8],
    value: &[u8],
) -> Result<SourceRow> {
    let cf = layout.column_family();
    let rest = key.get(prefix_len..).unwrap_or_default();
    let (ts_added_ms, key_id) = match layout {
        OtkLayout::UploadOrder => {
            // count(8 bytes) 0xFF algorithm:name
            let (Some(count), Some(&SEP), Some(id)) = (rest.get(..8), rest.get(8), rest.get(9..))
            else {
                return Err(corrupt(
                    cf,
                    key,
                    "key is not `user 0xFF device 0xFF count 0xFF key_id`",
                ));
            };
            let mut be = [0u8; 8];
            be.copy_from_slice(count);
            (
                order_of(u64::from_be_bytes(be)),
                utf8(cf, key, id, "key ID")?,
            )
        }
        OtkLayout::KeyIdOrder => {
            // The key ID as a JSON string, quotes included; no upload order.
            let id: String = serde_json::from_slice(rest)
                .map_err(|_| corrupt(cf, key, "key ID is not a JSON string"))?;
            (0, id)
        }
    };
    let (algorithm, key_id) = split_key_id(&key_id);
    Ok(SourceRow::OneTimeKey(SourceOtk {
        user_id: user_id.to_owned(),
        device_id: device_id.to_owned(),
        algorithm,
        key_id,
        ts_added_ms,
        key_json: utf8(cf, key, value, "key JSON")?,
    }))
}

/// tuwunel's fallback entry (`FallbackEntry` in
/// `src/service/users/keys.rs`).
#[derive(Deserialize)]
struct TuwunelFallback {
    key_id: String,
    key: Value,
    used: bool,
}

/// One entry of a fallback key column family as a row.
///
/// # Errors
/// [`Error::Corrupt`] when the value does not have the layout's shape.
pub(crate) fn fallback_row(
    layout: FallbackLayout,
    (user_id, device_id): (&str, &str),
    key: &[u8],
    value: &[u8],
) -> Result<SourceRow> {
    let cf = layout.column_family();
    let (key_id, key_json, used) = match layout {
        FallbackLayout::Tuwunel => {
            let entry: TuwunelFallback = serde_json::from_slice(value).map_err(|_| {
                corrupt(
                    cf,
                    key,
                    "value is not {\"key_id\": .., \"key\": .., \"used\": ..}",
                )
            })?;
            // keyclaim keeps key JSON in canonical form, so the value's
            // own spelling need not be kept.
            (entry.key_id, entry.key.to_string(), entry.used)
        }
        FallbackLayout::Continuwuity => {
            // used(1 byte: 0 or not) 0xFF key_id 0xFF key JSON
            let mut parts = value.splitn(3, |b| *b == SEP);
            let (Some(&[used]), Some(id), Some(json)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(corrupt(
                    cf,
                    key,
                    "value is not `used 0xFF key_id 0xFF key JSON`",
                ));
            };
            (
                utf8(cf, key, id, "key ID")?,
                utf8(cf, key, json, "key JSON")?,
                used != 0,
            )
        }
    };
    let (algorithm, key_id) = split_key_id(&key_id);
    Ok(SourceRow::Fallback(SourceFallback {
        user_id: user_id.to_owned(),
        device_id: device_id.to_owned(),
        algorithm,
        key_id,
        key_json,
        used,
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const USER: &str = "@alice:example.org";
    const DEVICE: &str = "DEV";

    fn otk_key(count: u64, id: &str) -> Vec<u8> {
        let mut k = device_prefix(USER, DEVICE);
        k.extend_from_slice(&count.to_be_bytes());
        k.push(SEP);
        k.extend_from_slice(id.as_bytes());
        k
    }

    fn ids(row: &SourceRow) -> (String, i64) {
        match row {
            SourceRow::OneTimeKey(k) => (row.full_key_id(), k.ts_added_ms),
            SourceRow::Fallback(_) => panic!("not a one-time key"),
        }
    }

    #[test]
    fn upload_counts_keep_their_order_across_the_sign_bit() {
        let counts = [
            0,
            1,
            255,
            256,
            u64::from(u32::MAX),
            1 << 63,
            u64::MAX - 1,
            u64::MAX,
        ];
        let orders: Vec<i64> = counts.iter().map(|c| order_of(*c)).collect();
        assert!(orders.windows(2).all(|w| w[0] < w[1]), "{orders:?}");
    }

    #[test]
    fn msc4225_key_with_separator_bytes_in_its_count() {
        // A count whose bytes include 0xFF: parsed by position, not by
        // splitting at separators.
        let count = 0x00FF_FF00_0000_FFFF;
        let key = otk_key(count, "signed_curve25519:AAAA");
        let prefix = device_prefix(USER, DEVICE).len();
        let row = otk_row(
            OtkLayout::UploadOrder,
            (USER, DEVICE),
            prefix,
            &key,
            br#"{"key":"k"}"#,
        )
        .unwrap();
        assert_eq!(
            ids(&row),
            ("signed_curve25519:AAAA".into(), order_of(count))
        );
    }

    #[test]
    fn key_id_layout_reads_the_quoted_key_id() {
        let mut key = device_prefix(USER, DEVICE);
        key.extend_from_slice(br#""curve25519:B""#);
        let prefix = device_prefix(USER, DEVICE).len();
        let row = otk_row(OtkLayout::KeyIdOrder, (USER, DEVICE), prefix, &key, b"{}").unwrap();
        assert_eq!(ids(&row), ("curve25519:B".into(), 0));
        // Unquoted: not this layout.
        let mut bad = device_prefix(USER, DEVICE);
        bad.extend_from_slice(b"curve25519:B");
        let err = otk_row(OtkLayout::KeyIdOrder, (USER, DEVICE), prefix, &bad, b"{}").unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(OTK_KEY_ID_CF), "{err}");
    }

    #[test]
    fn short_or_malformed_keys_are_corrupt_not_panics() {
        let prefix = device_prefix(USER, DEVICE).len();
        for key in [
            b"no separator at all".to_vec(),
            device_prefix(USER, DEVICE),
            [device_prefix(USER, DEVICE), vec![0, 0, 0]].concat(),
            [device_prefix(USER, DEVICE), vec![0; 8], b"x:y".to_vec()].concat(),
            [device_prefix(USER, DEVICE), vec![0; 8], vec![SEP, 0xC3]].concat(),
        ] {
            let r = otk_row(OtkLayout::UploadOrder, (USER, DEVICE), prefix, &key, b"{}");
            assert!(matches!(r, Err(Error::Corrupt { .. })), "{key:?}: {r:?}");
        }
    }

    #[test]
    fn fallback_entries_of_both_servers() {
        let key = [device_prefix(USER, DEVICE), b"signed_curve25519".to_vec()].concat();
        let tuwunel =
            br#"{"key_id":"signed_curve25519:F","key":{"key":"x","fallback":true},"used":true}"#;
        let row = fallback_row(FallbackLayout::Tuwunel, (USER, DEVICE), &key, tuwunel).unwrap();
        let SourceRow::Fallback(f) = row else {
            panic!("not a fallback key")
        };
        assert_eq!(
            (f.algorithm.as_str(), f.key_id.as_str(), f.used),
            ("signed_curve25519", "F", true)
        );
        assert_eq!(
            serde_json::from_str::<Value>(&f.key_json).unwrap(),
            serde_json::json!({"key": "x", "fallback": true})
        );

        let cont = [
            b"\x00\xffsigned_curve25519:G\xff".to_vec(),
            br#"{"key":"y"}"#.to_vec(),
        ]
        .concat();
        let row = fallback_row(FallbackLayout::Continuwuity, (USER, DEVICE), &key, &cont).unwrap();
        let SourceRow::Fallback(f) = row else {
            panic!("not a fallback key")
        };
        assert_eq!((f.key_id.as_str(), f.used), ("G", false));
        assert_eq!(f.key_json, r#"{"key":"y"}"#);

        for (layout, bad) in [
            (FallbackLayout::Tuwunel, b"{\"key_id\":1}".to_vec()),
            (FallbackLayout::Tuwunel, b"\x00\xffa:b\xff{}".to_vec()),
            (
                FallbackLayout::Continuwuity,
                b"{\"key_id\":\"a:b\",\"key\":{},\"used\":false}".to_vec(),
            ),
            (
                FallbackLayout::Continuwuity,
                b"\x00\x00\xffa:b\xff{}".to_vec(),
            ),
        ] {
            let r = fallback_row(layout, (USER, DEVICE), &key, &bad);
            assert!(matches!(r, Err(Error::Corrupt { .. })), "{layout:?}: {r:?}");
        }
    }

    #[test]
    fn after_prefix_skips_exactly_one_device() {
        let p = device_prefix(USER, DEVICE);
        let next = after_prefix(&p).unwrap();
        assert!(otk_key(u64::MAX, "\u{10FFFF}") < next);
        assert!(device_prefix(USER, "DEW") >= next);
        // An empty device ID: the prefix ends in two separators.
        let empty = device_prefix(USER, "");
        let next = after_prefix(&empty).unwrap();
        assert!([empty.clone(), vec![SEP; 4]].concat() < next);
        assert!(device_prefix("@alice:example.orh", "") >= next);
        assert_eq!(after_prefix(&[SEP, SEP]), None);
    }

    #[test]
    fn layout_prefers_msc4225_and_refuses_other_databases() {
        let l = Layout::from_column_families(&[
            "default",
            OTK_KEY_ID_CF,
            OTK_MSC4225_CF,
            FALLBACK_TUWUNEL_CF,
        ])
        .unwrap();
        assert_eq!(l.one_time_keys, OtkLayout::UploadOrder);
        assert_eq!(l.fallback_keys, vec![FallbackLayout::Tuwunel]);
        let l = Layout::from_column_families(&[OTK_KEY_ID_CF, FALLBACK_CONTINUWUITY_CF]).unwrap();
        assert_eq!(l.one_time_keys, OtkLayout::KeyIdOrder);
        assert_eq!(
            l.column_families(),
            vec![OTK_KEY_ID_CF, FALLBACK_CONTINUWUITY_CF]
        );
        let err = Layout::from_column_families(&["default", "pduid_pdu"]).unwrap_err();
        assert!(matches!(err, Error::InvalidConfig { .. }), "{err}");
    }
}
