//! Key JSON: what a client uploaded for one key (R2.4, R2.5), kept in canonical
//! form, with a digest that ignores `signatures` (R3.2, R3.4, R5.2).

use std::fmt;
use std::sync::Arc;

use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// How deeply key JSON may nest; deeper input is refused before any recursion
/// could exhaust the stack.
pub const MAX_KEY_JSON_DEPTH: usize = 32;

/// A SHA-256 digest of a key's canonical JSON without its `signatures` field.
///
/// Two uploads of "the same key" (R3.2, R5.2) have equal digests even if their
/// signatures or field order differ.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyDigest(pub(crate) [u8; 32]);

impl KeyDigest {
    /// A digest from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest's 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The digest as lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses a digest from 64 hex characters or 32 raw bytes.
    ///
    /// # Errors
    /// [`Error::Corrupt`] when the input has the wrong length or alphabet.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        let raw: Vec<u8> = if bytes.len() == 64 {
            hex::decode(bytes).map_err(|_| Error::corrupt("key digest is not hex"))?
        } else {
            bytes.to_vec()
        };
        let arr: [u8; 32] = raw
            .try_into()
            .map_err(|_| Error::corrupt("key digest is not 32 bytes"))?;
        Ok(Self(arr))
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A digest of public key material; short prefix is enough to tell apart.
        write!(f, "KeyDigest({}..)", &self.to_hex()[..12])
    }
}

/// The JSON uploaded for one key: a string (legacy unsigned keys) or an object
/// with a string `key`, an object `signatures`, an optional boolean `fallback`
/// and any other fields (R2.4).
///
/// It is kept as canonical JSON (object members sorted by byte order, no
/// insignificant whitespace) so that what a claim returns is the same JSON value
/// that was uploaded (R2.5). Cloning is cheap (shared).
///
/// `Debug` never shows the key material, only its length and digest.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyJson {
    canonical: Arc<str>,
    digest: KeyDigest,
}

impl KeyJson {
    /// Validates a JSON value as key JSON (R2.4).
    ///
    /// # Errors
    /// [`Error::InvalidKeyJson`] when the value is not a string or a conforming
    /// object, or nests deeper than [`MAX_KEY_JSON_DEPTH`].
    pub fn from_value(value: &Value) -> Result<Self> {
        validate_shape(value)?;
        if depth(value) > MAX_KEY_JSON_DEPTH {
            return Err(Error::InvalidKeyJson {
                key_id: None,
                reason: "nested too deeply",
            });
        }
        let canonical = canonical_json(value);
        let digest = digest_without_signatures(value);
        Ok(Self {
            canonical: canonical.into(),
            digest,
        })
    }

    /// Parses and validates key JSON from its serialized form, for instance as
    /// read back from storage.
    ///
    /// # Errors
    /// [`Error::InvalidKeyJson`] when the text is not JSON or not key JSON.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|_| Error::InvalidKeyJson {
            key_id: None,
            reason: "not JSON",
        })?;
        Self::from_value(&value)
    }

    /// Rebuilds key JSON that a store wrote itself, from the text of
    /// [`Self::canonical`] and the [`Self::digest`] it stored next to it,
    /// without parsing, validating or hashing again.
    ///
    /// This is for backends reading their own rows back on the hot path of a
    /// claim: the text was validated and canonicalized when it was uploaded.
    /// It is trusted, not checked: text that is not the canonical JSON of the
    /// digest's key gives a value whose digest comparisons (R3.2, R3.4, R5.2)
    /// are wrong for it. A backend that cannot vouch for its storage (an
    /// import from elsewhere, a manual edit) uses [`Self::from_json_str`].
    pub(crate) fn from_stored(canonical: impl Into<Arc<str>>, digest: KeyDigest) -> Self {
        Self {
            canonical: canonical.into(),
            digest,
        }
    }

    /// The canonical JSON text.
    pub fn canonical(&self) -> &str {
        &self.canonical
    }

    /// The length of the canonical JSON in bytes (the figure R8.2 limits).
    pub fn len(&self) -> usize {
        self.canonical.len()
    }

    /// Whether the canonical JSON is empty (never: the shortest is `""`).
    pub fn is_empty(&self) -> bool {
        self.canonical.is_empty()
    }

    /// The digest ignoring `signatures` (R3.2, R3.4, R5.2).
    pub fn digest(&self) -> KeyDigest {
        self.digest
    }

    /// The JSON value, parsed from the canonical text.
    pub fn to_value(&self) -> Value {
        // The canonical text was produced by `canonical_json` from a valid value,
        // so it always parses; `Null` is an unreachable fallback, not a panic.
        serde_json::from_str(&self.canonical).unwrap_or(Value::Null)
    }
}

impl fmt::Debug for KeyJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyJson")
            .field("len", &self.canonical.len())
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

impl serde::Serialize for KeyJson {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        self.to_value().serialize(serializer)
    }
}

fn validate_shape(value: &Value) -> Result<()> {
    let bad = |reason| {
        Err(Error::InvalidKeyJson {
            key_id: None,
            reason,
        })
    };
    match value {
        Value::String(_) => Ok(()),
        Value::Object(map) => {
            if !matches!(map.get("key"), Some(Value::String(_))) {
                return bad("`key` must be a string");
            }
            if !matches!(map.get("signatures"), Some(Value::Object(_))) {
                return bad("`signatures` must be an object");
            }
            if map.get("fallback").is_some_and(|f| !f.is_boolean()) {
                return bad("`fallback` must be a boolean");
            }
            Ok(())
        }
        _ => bad("key JSON must be a string or an object"),
    }
}

fn depth(value: &Value) -> usize {
    // Iterative, so that hostile nesting cannot overflow the stack here.
    let mut max = 0;
    let mut stack = vec![(value, 1usize)];
    while let Some((v, d)) = stack.pop() {
        max = max.max(d);
        if d > MAX_KEY_JSON_DEPTH {
            return d;
        }
        match v {
            Value::Array(items) => stack.extend(items.iter().map(|i| (i, d + 1))),
            Value::Object(map) => stack.extend(map.values().map(|i| (i, d + 1))),
            _ => {}
        }
    }
    max
}

/// Serializes a JSON value canonically: object members sorted by the bytes of
/// their names, no insignificant whitespace, strings and numbers as
/// `serde_json` writes them. Independent of serde_json's `preserve_order`.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

fn digest_without_signatures(value: &Value) -> KeyDigest {
    let text = match value {
        Value::Object(map) if map.contains_key("signatures") => {
            let mut stripped = map.clone();
            stripped.remove("signatures");
            canonical_json(&Value::Object(stripped))
        }
        other => canonical_json(other),
    };
    KeyDigest(Sha256::digest(text.as_bytes()).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn accepts_strings_and_signed_objects() {
        assert!(KeyJson::from_value(&json!("abc")).is_ok());
        let k =
            KeyJson::from_value(&json!({"key": "k", "signatures": {}, "fallback": true, "x": [1]}))
                .unwrap();
        assert_eq!(
            k.canonical(),
            r#"{"fallback":true,"key":"k","signatures":{},"x":[1]}"#
        );
    }

    #[test]
    fn from_stored_round_trips_what_a_store_wrote() {
        let k = KeyJson::from_json_str(r#"{"signatures":{"@a:b":{"ed25519:D":"s"}},"key":"k"}"#)
            .unwrap();
        let back = KeyJson::from_stored(k.canonical(), k.digest());
        assert_eq!(back, k);
        assert_eq!(back.to_value(), k.to_value());
    }

    #[test]
    fn rejects_bad_shapes() {
        for bad in [
            json!(1),
            json!(null),
            json!([]),
            json!({"signatures": {}}),
            json!({"key": 1, "signatures": {}}),
            json!({"key": "k"}),
            json!({"key": "k", "signatures": []}),
            json!({"key": "k", "signatures": {}, "fallback": "yes"}),
        ] {
            assert!(KeyJson::from_value(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn digest_ignores_signatures_and_order() {
        let a = KeyJson::from_json_str(r#"{"key":"k","signatures":{"@a:b":{"ed25519:D":"s1"}}}"#)
            .unwrap();
        let b = KeyJson::from_json_str(r#"{"signatures":{"@a:b":{"ed25519:D":"s2"}},"key":"k"}"#)
            .unwrap();
        let c = KeyJson::from_json_str(r#"{"key":"k2","signatures":{}}"#).unwrap();
        assert_eq!(a.digest(), b.digest());
        assert_ne!(a.canonical(), b.canonical());
        assert_ne!(a.digest(), c.digest());
    }

    #[test]
    fn round_trips_value() {
        let v = json!({"key": "k\u{1F600}\"", "signatures": {"u": {"a": "b"}}, "n": 1.5, "big": 12345678901234567u64});
        let k = KeyJson::from_value(&v).unwrap();
        assert_eq!(k.to_value(), v);
        assert_eq!(KeyJson::from_json_str(k.canonical()).unwrap(), k);
    }

    #[test]
    fn debug_hides_material() {
        let k = KeyJson::from_value(&json!({"key": "SECRETISH", "signatures": {}})).unwrap();
        assert!(!format!("{k:?}").contains("SECRETISH"));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut v = json!(1);
        for _ in 0..100 {
            v = json!([v]);
        }
        let obj = json!({"key": "k", "signatures": {}, "deep": v});
        assert!(KeyJson::from_value(&obj).is_err());
    }
}
