//! Key JSON: what a client uploaded for one key (R2.4, R2.5), kept in canonical
//! form, with a digest that ignores `signatures` (R3.2, R3.4, R5.2).

use std::fmt;
use std::sync::Arc;

use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::api::body::{Kind, Text};
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

    /// A stand-in for key JSON that was refused as too large while it was
    /// read, so that the rest of a request is checked in the usual order
    /// before the refusal is answered; never stored.
    pub(crate) fn placeholder() -> Self {
        Self {
            canonical: Arc::from("\"\""),
            digest: KeyDigest([0; 32]),
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

/// How much of [`Limits::max_key_json_bytes`](crate::Limits) one key's text
/// may take while [`KeyJson::from_body_text`] canonicalizes it: canonical
/// text and bookkeeping of members together. Canonical text within the limit
/// never reaches it; the margin covers members that a later member of the
/// same name replaces.
const WORK_BUDGET_FACTOR: usize = 16;

/// What [`KeyJson::from_body_text`] charges for one object member beside its
/// text (its place in the list that is sorted).
const MEMBER_COST: usize = 48;

impl KeyJson {
    /// Validates and canonicalizes key JSON from its text in a request body
    /// (R2.4), as [`Self::from_value`] does but without a JSON tree: the
    /// canonical text is written while the text is read. `max_bytes` is the
    /// limit on canonical key JSON (R8.2): work past 16 times it stops, and
    /// the key is then answered as too large (`Ok(None)`), so that the memory
    /// one key takes is bounded by the limit, not by the body.
    ///
    /// # Errors
    /// [`Error::InvalidKeyJson`] as [`Self::from_value`]: a shape error
    /// first, then nesting deeper than [`MAX_KEY_JSON_DEPTH`].
    pub(crate) fn from_body_text(text: &str, max_bytes: usize) -> Result<Option<Self>> {
        let invalid = |reason| Error::InvalidKeyJson {
            key_id: None,
            reason,
        };
        let bad = |reason| Err(invalid(reason));
        if !matches!(text.trim_start().as_bytes().first(), Some(b'"' | b'{')) {
            return bad("key JSON must be a string or an object");
        }
        let mut canon = Canon {
            out: Vec::new(),
            charged: 0,
            budget: max_bytes.saturating_mul(WORK_BUDGET_FACTOR),
            writing: true,
            over: false,
            too_deep: false,
            shape: Shape::default(),
            stripped: None,
        };
        let mut de = serde_json::Deserializer::from_str(text);
        let kind = serde::de::DeserializeSeed::deserialize(
            Node {
                canon: &mut canon,
                depth: 1,
            },
            &mut de,
        )
        .map_err(|_| invalid("not JSON"))?;
        if kind == Kind::Object {
            if canon.shape.key != Some(Kind::String) {
                return bad("`key` must be a string");
            }
            if canon.shape.signatures != Some(Kind::Object) {
                return bad("`signatures` must be an object");
            }
            if canon.shape.fallback.is_some_and(|k| k != Kind::Bool) {
                return bad("`fallback` must be a boolean");
            }
        }
        if canon.too_deep {
            return bad("nested too deeply");
        }
        if canon.over {
            return Ok(None);
        }
        let digest = match &canon.stripped {
            Some(text) => Sha256::digest(text),
            None => Sha256::digest(&canon.out),
        };
        let canonical = String::from_utf8(canon.out).map_err(|_| invalid("not JSON"))?;
        Ok(Some(Self {
            canonical: canonical.into(),
            digest: KeyDigest(digest.into()),
        }))
    }
}

/// The kinds of the members of a key JSON object that R2.4 constrains, each
/// of its last occurrence.
#[derive(Default)]
struct Shape {
    key: Option<Kind>,
    signatures: Option<Kind>,
    fallback: Option<Kind>,
}

/// The state of [`KeyJson::from_body_text`]: the canonical text written so
/// far and what the work has cost.
struct Canon {
    out: Vec<u8>,
    /// Bytes of bookkeeping charged to the budget beside `out`.
    charged: usize,
    budget: usize,
    /// Whether text is still written (not once over budget or too deep).
    writing: bool,
    over: bool,
    too_deep: bool,
    shape: Shape,
    /// The canonical text of the top-level object without `signatures`,
    /// when it has one (the digest's input).
    stripped: Option<Vec<u8>>,
}

impl Canon {
    /// Stops writing: the key is refused either way.
    fn stop(&mut self) {
        self.writing = false;
        self.out = Vec::new();
        self.stripped = None;
    }

    /// Charges bookkeeping and checks the budget.
    fn charge(&mut self, bytes: usize) {
        self.charged = self.charged.saturating_add(bytes);
        self.check_budget();
    }

    fn check_budget(&mut self) {
        if self.writing && self.out.len().saturating_add(self.charged) > self.budget {
            self.over = true;
            self.stop();
        }
    }

    /// Writes a scalar as `serde_json` writes it in a tree.
    fn scalar<E: serde::de::Error>(&mut self, value: &Value) -> std::result::Result<(), E> {
        if self.writing {
            serde_json::to_writer(&mut self.out, value).map_err(E::custom)?;
            self.check_budget();
        }
        Ok(())
    }
}

/// One value of key JSON at a nesting depth (1 at the top), written
/// canonically to the [`Canon`]; its [`Kind`] is the result.
struct Node<'c> {
    canon: &'c mut Canon,
    depth: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for Node<'_> {
    type Value = Kind;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> std::result::Result<Kind, D::Error> {
        if self.depth > MAX_KEY_JSON_DEPTH {
            self.canon.too_deep = true;
            self.canon.stop();
            deserializer.deserialize_ignored_any(serde::de::IgnoredAny)?;
            return Ok(Kind::Null);
        }
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Node<'_> {
    type Value = Kind;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("key JSON")
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> std::result::Result<Kind, E> {
        self.canon.scalar(&Value::Bool(v))?;
        Ok(Kind::Bool)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Kind, E> {
        self.canon.scalar(&Value::from(v))?;
        Ok(Kind::Number)
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Kind, E> {
        self.canon.scalar(&Value::from(v))?;
        Ok(Kind::Number)
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Kind, E> {
        self.canon.scalar(&Value::from(v))?;
        Ok(Kind::Number)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Kind, E> {
        if self.canon.writing {
            serde_json::to_writer(&mut self.canon.out, v).map_err(E::custom)?;
            self.canon.check_budget();
        }
        Ok(Kind::String)
    }

    fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<Kind, E> {
        self.canon.scalar(&Value::Null)?;
        Ok(Kind::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Kind, A::Error> {
        let canon = self.canon;
        if canon.writing {
            canon.out.push(b'[');
        }
        let mut first = true;
        loop {
            let mark = canon.out.len();
            if canon.writing && !first {
                canon.out.push(b',');
            }
            let node = Node {
                canon: &mut *canon,
                depth: self.depth + 1,
            };
            if seq.next_element_seed(node)?.is_none() {
                if canon.writing {
                    canon.out.truncate(mark);
                }
                break;
            }
            first = false;
        }
        if canon.writing {
            canon.out.push(b']');
            canon.check_budget();
        }
        Ok(Kind::Array)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Kind, A::Error> {
        let canon = self.canon;
        let start = canon.out.len();
        // Each member: its name and where its canonical value lies in `out`.
        let mut members: Vec<(std::borrow::Cow<'de, str>, usize, usize)> = Vec::new();
        while let Some(Text(name)) = map.next_key::<Text<'de>>()? {
            let from = canon.out.len();
            let node = Node {
                canon: &mut *canon,
                depth: self.depth + 1,
            };
            let kind = map.next_value_seed(node)?;
            if self.depth == 1 {
                match &*name {
                    "key" => canon.shape.key = Some(kind),
                    "signatures" => canon.shape.signatures = Some(kind),
                    "fallback" => canon.shape.fallback = Some(kind),
                    _ => {}
                }
            }
            if canon.writing {
                canon.charge(MEMBER_COST.saturating_add(name.len()));
            }
            if canon.writing {
                members.push((name, from, canon.out.len()));
            } else {
                members = Vec::new();
            }
        }
        if !canon.writing {
            return Ok(Kind::Object);
        }
        // The last occurrence of a name counts; names in byte order.
        let mut order: Vec<usize> = (0..members.len()).collect();
        order.sort_by(|&a, &b| {
            members[a]
                .0
                .as_bytes()
                .cmp(members[b].0.as_bytes())
                .then(b.cmp(&a))
        });
        order.dedup_by(|a, b| members[*a].0 == members[*b].0);
        let write = |skip_signatures: bool| -> std::result::Result<Vec<u8>, A::Error> {
            let mut text = Vec::with_capacity(canon.out.len() - start + 2);
            text.push(b'{');
            let mut first = true;
            for &i in &order {
                let (name, from, to) = &members[i];
                if skip_signatures && name == "signatures" {
                    continue;
                }
                if !first {
                    text.push(b',');
                }
                first = false;
                serde_json::to_writer(&mut text, &**name).map_err(serde::de::Error::custom)?;
                text.push(b':');
                text.extend_from_slice(&canon.out[*from..*to]);
            }
            text.push(b'}');
            Ok(text)
        };
        let text = write(false)?;
        if self.depth == 1 && members.iter().any(|m| m.0 == "signatures") {
            canon.stripped = Some(write(true)?);
        }
        canon.out.truncate(start);
        canon.out.extend_from_slice(&text);
        canon.check_budget();
        Ok(Kind::Object)
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

    /// Key JSON read from its text ([`KeyJson::from_body_text`]) is exactly
    /// what the tree gives: the same canonical text and digest, the same
    /// error, for every shape (duplicate members, escapes, numbers,
    /// whitespace, nesting).
    #[test]
    fn body_text_gives_what_the_tree_gives() {
        let mut deep = String::from(r#"{"key":"k","signatures":{},"d":"#);
        deep.push_str(&"[".repeat(40));
        deep.push_str(&"]".repeat(40));
        deep.push('}');
        let mut edge = String::from(r#"{"key":"k","signatures":{},"d":"#);
        edge.push_str(&"[".repeat(31));
        edge.push('1');
        edge.push_str(&"]".repeat(31));
        edge.push('}');
        let texts = [
            r#""abc""#,
            r#""a\u00e9\n\"\/""#,
            r#"{"key":"k","signatures":{}}"#,
            r#"{"key":"k","signatures":{},"x":[9e15,1e-7,123456789012345678901234567890,-1.0e+2]}"#,
            r#" { "signatures" : { "@a:b" : { "ed25519:D" : "s" } } , "key" : "k\u00e9\"" } "#,
            r#"{"key":"k","signatures":{},"x":[1,2.5,-0,1e3,1E400,18446744073709551615,-9223372036854775808,{"b":null,"a":true}],"fallback":true}"#,
            r#"{"key":"x","key":"k","signatures":[],"signatures":{"u":{}}}"#,
            r#"{"key":"k","signatures":{},"z":{"b":1,"a":2,"b":3,"\u0000":[],"":{}}}"#,
            r#"{"k\u0065y":"k","signatures":{},"signatures":{"x":{"y":"z"}}}"#,
            r#"{"key":"k","signatures":{},"fallback":false,"fallback":true}"#,
            r#"{"key":"k","signatures":{},"fallback":1}"#,
            r#"{"key":"k","signatures":{},"fallback":true,"fallback":"yes"}"#,
            r#"{"key":1,"signatures":{}}"#,
            r#"{"key":"k"}"#,
            r#"{"key":"k","signatures":{},"key":null}"#,
            r#"{}"#,
            "[]",
            "1",
            "null",
            "true",
            &deep,
            &edge,
        ];
        for text in texts {
            let tree = serde_json::from_str::<Value>(text)
                .map_err(|e| e.to_string())
                .and_then(|v| KeyJson::from_value(&v).map_err(|e| e.to_string()));
            let streamed = KeyJson::from_body_text(text, 4096).map_err(|e| e.to_string());
            match (tree, streamed) {
                (Ok(tree), Ok(Some(streamed))) => {
                    assert_eq!(tree.canonical(), streamed.canonical(), "{text}");
                    assert_eq!(tree.digest(), streamed.digest(), "{text}");
                }
                // A number out of range: not JSON to either (the facade
                // refuses such a body before reading any key).
                (Err(tree), Err(_)) if tree.contains("out of range") => {}
                (Err(tree), Err(streamed)) => assert_eq!(tree, streamed, "{text}"),
                (tree, streamed) => panic!("{text}: tree {tree:?}, streamed {streamed:?}"),
            }
        }
    }

    /// Key JSON whose canonical text is far past the limit stops being
    /// written (`None`: too large), but is still checked for its shape.
    #[test]
    fn body_text_past_the_limit_is_too_large_but_still_checked() {
        let big = format!(r#"{{"key":"{}","signatures":{{}}}}"#, "k".repeat(100_000));
        assert!(matches!(KeyJson::from_body_text(&big, 4096), Ok(None)));
        let members: String = (0..10_000).map(|i| format!(",\"m{i}\":0")).collect();
        let many = format!(r#"{{"key":"k","signatures":{{}}{members}}}"#);
        assert!(matches!(KeyJson::from_body_text(&many, 4096), Ok(None)));
        let bad = format!(r#"{{"key":"{}","signatures":[]}}"#, "k".repeat(100_000));
        assert!(KeyJson::from_body_text(&bad, 4096).is_err());
        // Within the limit, a key is kept whole.
        let fits = format!(r#"{{"key":"{}","signatures":{{}}}}"#, "k".repeat(4000));
        let kept = KeyJson::from_body_text(&fits, 4096).unwrap().unwrap();
        assert_eq!(kept, KeyJson::from_json_str(&fits).unwrap());
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
