//! Reading request bodies without a JSON tree (R8.2): a body is checked to be
//! JSON in one pass that keeps nothing, then its members are visited where
//! they lie in the body ([`RawValue`]s borrowed from it), so that what a
//! request costs in memory is what the facade keeps of it, within the limits
//! of contract section 8, not a tree of the whole body.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::ApiError;

/// The answer to a body that is not JSON (section 9's table).
pub(super) fn not_json() -> ApiError {
    ApiError::new(400, "M_NOT_JSON", "request body is not valid JSON")
}

/// Checks that `body` is one JSON value, as `serde_json` parses it into a
/// tree (syntax, UTF-8, escapes, numbers in range, nesting at most 128
/// deep), while keeping nothing of it.
pub(super) fn check_json(body: &[u8]) -> Result<(), ApiError> {
    serde_json::from_slice::<Skip>(body)
        .map(|_| ())
        .map_err(|_| not_json())
}

/// A JSON value visited in full and dropped.
struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Skip)
    }
}

impl<'de> Visitor<'de> for Skip {
    type Value = Skip;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_str<E>(self, _: &str) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_unit<E>(self) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Skip, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Skip)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
        while map.next_key::<Skip>()?.is_some() {
            map.next_value::<Skip>()?;
        }
        Ok(Skip)
    }
}

/// A JSON string, borrowed from the body unless it has escapes.
pub(crate) struct Text<'a>(pub(crate) Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(text)))
            }

            fn visit_str<E>(self, text: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(text.to_owned())))
            }

            fn visit_string<E>(self, text: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(text)))
            }
        }
        deserializer.deserialize_str(TextVisitor)
    }
}

/// The JSON type of a value, read from its first byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool,
    /// A number.
    Number,
    /// A string.
    String,
    /// An array.
    Array,
    /// An object.
    Object,
}

/// The JSON type of a value that is known to be JSON.
pub(super) fn kind(raw: &RawValue) -> Kind {
    match raw.get().trim_start().as_bytes().first() {
        Some(b'{') => Kind::Object,
        Some(b'[') => Kind::Array,
        Some(b'"') => Kind::String,
        Some(b'n') => Kind::Null,
        Some(b't' | b'f') => Kind::Bool,
        _ => Kind::Number,
    }
}

/// The kind of a member that may be absent: `None` when absent.
pub(super) fn kind_of(raw: Option<&RawValue>) -> Option<Kind> {
    raw.map(kind)
}

/// The members named `names` of a body that [`check_json`] accepted, each
/// the last occurrence of its name, borrowed from the body; other members
/// are skipped without being kept.
///
/// # Errors
/// 400 `M_BAD_JSON` when the body is not a JSON object.
pub(super) fn fields<'a, const N: usize>(
    body: &'a [u8],
    names: [&str; N],
) -> Result<[Option<&'a RawValue>; N], ApiError> {
    struct Fields<'n, const N: usize> {
        names: [&'n str; N],
    }
    impl<'de, const N: usize> Visitor<'de> for Fields<'_, N> {
        type Value = [Option<&'de RawValue>; N];

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut found = [None; N];
            while let Some(Text(name)) = map.next_key::<Text<'de>>()? {
                match self.names.iter().position(|n| *n == name) {
                    Some(i) => found[i] = Some(map.next_value::<&'de RawValue>()?),
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(found)
        }
    }
    let text = std::str::from_utf8(body).map_err(|_| not_json())?;
    if !text.trim_start().starts_with('{') {
        return Err(ApiError::bad_json("request body must be a JSON object"));
    }
    let mut de = serde_json::Deserializer::from_str(text);
    de.deserialize_map(Fields { names }).map_err(|_| not_json())
}

/// Calls `each` with every member of a JSON object (`raw` must be one) in
/// the order of the body, the member's name and value borrowed from it; stops
/// at the first error `each` returns.
///
/// # Errors
/// The first error of `each`.
pub(super) fn for_each_member<'a>(
    raw: &'a RawValue,
    mut each: impl FnMut(Cow<'a, str>, &'a RawValue) -> Result<(), ApiError>,
) -> Result<(), ApiError> {
    struct Members<'s, F> {
        each: &'s mut F,
        failed: &'s mut Option<ApiError>,
    }
    impl<'de, F> Visitor<'de> for Members<'_, F>
    where
        F: FnMut(Cow<'de, str>, &'de RawValue) -> Result<(), ApiError>,
    {
        type Value = ();

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(Text(name)) = map.next_key::<Text<'de>>()? {
                let value = map.next_value::<&'de RawValue>()?;
                if let Err(err) = (self.each)(name, value) {
                    *self.failed = Some(err);
                    return Err(de::Error::custom("stopped"));
                }
            }
            Ok(())
        }
    }
    let mut failed = None;
    let mut de = serde_json::Deserializer::from_str(raw.get());
    let visited = de.deserialize_map(Members {
        each: &mut each,
        failed: &mut failed,
    });
    stopped_or(failed, visited)
}

/// Calls `each` with every element of a JSON array (`raw` must be one), in
/// order, borrowed from the body; stops at the first error `each` returns.
///
/// # Errors
/// The first error of `each`.
pub(super) fn for_each_element<'a>(
    raw: &'a RawValue,
    mut each: impl FnMut(&'a RawValue) -> Result<(), ApiError>,
) -> Result<(), ApiError> {
    struct Elements<'s, F> {
        each: &'s mut F,
        failed: &'s mut Option<ApiError>,
    }
    impl<'de, F> Visitor<'de> for Elements<'_, F>
    where
        F: FnMut(&'de RawValue) -> Result<(), ApiError>,
    {
        type Value = ();

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON array")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while let Some(value) = seq.next_element::<&'de RawValue>()? {
                if let Err(err) = (self.each)(value) {
                    *self.failed = Some(err);
                    return Err(de::Error::custom("stopped"));
                }
            }
            Ok(())
        }
    }
    let mut failed = None;
    let mut de = serde_json::Deserializer::from_str(raw.get());
    let visited = de.deserialize_seq(Elements {
        each: &mut each,
        failed: &mut failed,
    });
    stopped_or(failed, visited)
}

/// The error a visit's callback stopped it with, else the visit's outcome
/// (a JSON error there cannot happen on a body [`check_json`] accepted).
fn stopped_or(
    failed: Option<ApiError>,
    visited: Result<(), serde_json::Error>,
) -> Result<(), ApiError> {
    match (failed, visited) {
        (Some(err), _) => Err(err),
        (None, Ok(())) => Ok(()),
        (None, Err(_)) => Err(not_json()),
    }
}

/// The number of elements of a JSON array (`raw` must be one), counted
/// without keeping any.
pub(super) fn count_elements(raw: &RawValue) -> Result<usize, ApiError> {
    struct Count;
    impl<'de> Visitor<'de> for Count {
        type Value = usize;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON array")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
            let mut n = 0usize;
            while seq.next_element::<IgnoredAny>()?.is_some() {
                n += 1;
            }
            Ok(n)
        }
    }
    let mut de = serde_json::Deserializer::from_str(raw.get());
    de.deserialize_seq(Count).map_err(|_| not_json())
}

/// A JSON string's text (`raw` must be a string).
pub(super) fn text(raw: &RawValue) -> Result<Cow<'_, str>, ApiError> {
    serde_json::from_str::<Text<'_>>(raw.get())
        .map(|t| t.0)
        .map_err(|_| not_json())
}

/// A JSON boolean's value (`raw` must be one).
pub(super) fn boolean(raw: &RawValue) -> bool {
    raw.get().trim_start().starts_with('t')
}
