//! Store URL options, parsed alike by every backend's options type.
//!
//! A store URL names a backend by its scheme and carries the backend's
//! options in its query string: `sqlite:keys.db?synchronous=normal`,
//! `redb:keys.redb?max_batch=256`. Each option is `name=value`, given at
//! most once; a backend turns the values into its options with [`UrlOptions::number`],
//! [`UrlOptions::positive`] and [`UrlOptions::on_off`], and reports the rest with [`UrlOptions::bad_value`] and
//! [`UrlOptions::unknown`]. Every error is [`Error::InvalidConfig`], naming the backend
//! and the option, never a panic.

use std::str::FromStr;

use crate::error::{Error, Result};

/// The `name=value` options of a URL's query string, each at most once, in
/// the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlOptions<'a> {
    backend: &'static str,
    pairs: Vec<(&'a str, &'a str)>,
}

impl<'a> UrlOptions<'a> {
    /// Splits a query string (without its `?`; empty for none) into options.
    /// `keep` selects the pairs that are options; the others are left out
    /// of the options and returned apart, unparsed (a PostgreSQL URL keeps
    /// libpq's own parameters that way).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an option without `=VALUE` or one given
    /// twice.
    pub fn parse_filtered(
        backend: &'static str,
        query: &'a str,
        keep: impl Fn(&str) -> bool,
    ) -> Result<(Self, Vec<&'a str>)> {
        let mut pairs: Vec<(&'a str, &'a str)> = Vec::new();
        let mut others = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            if !keep(pair) {
                others.push(pair);
                continue;
            }
            let (name, value) = pair.split_once('=').ok_or_else(|| {
                Error::invalid_config(format!("{backend} URL option {pair:?} has no `=VALUE`"))
            })?;
            if pairs.iter().any(|(seen, _)| *seen == name) {
                return Err(Error::invalid_config(format!(
                    "{backend} URL option `{name}` is given twice"
                )));
            }
            pairs.push((name, value));
        }
        Ok((Self { backend, pairs }, others))
    }

    /// Splits a query string (without its `?`; empty for none) into options.
    ///
    /// # Errors
    /// As [`UrlOptions::parse_filtered`].
    pub fn parse(backend: &'static str, query: &'a str) -> Result<Self> {
        Ok(Self::parse_filtered(backend, query, |_| true)?.0)
    }

    /// The options, `(name, value)`, in the order given.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, &'a str)> + '_ {
        self.pairs.iter().copied()
    }

    /// The error for an option the backend does not know, listing those it
    /// knows.
    pub fn unknown(&self, name: &str, known: &[&str]) -> Error {
        Error::invalid_config(format!(
            "unknown {} URL option `{name}` (known: {})",
            self.backend,
            known.join(", ")
        ))
    }

    /// The error for a value an option does not take; `want` says what it
    /// takes.
    pub fn bad_value(&self, name: &str, value: &str, want: &str) -> Error {
        Error::invalid_config(format!(
            "{} URL option `{name}` has the value {value:?}; it takes {want}",
            self.backend
        ))
    }

    /// An unsigned integer value: digits only (no sign, no spaces).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`].
    pub fn number<T: FromStr>(&self, name: &str, value: &str) -> Result<T> {
        let digits = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
        match value.parse() {
            Ok(n) if digits => Ok(n),
            _ => Err(self.bad_value(name, value, "an unsigned integer")),
        }
    }

    /// An unsigned integer value of at least 1.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`].
    pub fn positive<T: FromStr + Default + PartialEq>(&self, name: &str, value: &str) -> Result<T> {
        let n: T = self.number(name, value)?;
        if n == T::default() {
            return Err(self.bad_value(name, value, "at least 1"));
        }
        Ok(n)
    }

    /// A switch: `on` or `off`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`].
    pub fn on_off(&self, name: &str, value: &str) -> Result<bool> {
        match value {
            "on" => Ok(true),
            "off" => Ok(false),
            _ => Err(self.bad_value(name, value, "`on` or `off`")),
        }
    }
}

/// The path and the query string (empty when there is none) of a URL of a
/// file-based backend: `SCHEME:PATH`, `SCHEME:PATH?QUERY` or
/// `SCHEME:///ABSOLUTE/PATH`. `scheme` is given without its colon.
///
/// # Errors
/// [`Error::InvalidConfig`] for another scheme, a host (`SCHEME://host/...`)
/// or an empty path.
pub fn file_url<'a>(scheme: &str, url: &'a str) -> Result<(&'a str, &'a str)> {
    let rest = url
        .strip_prefix(scheme)
        .and_then(|r| r.strip_prefix(':'))
        .ok_or_else(|| Error::invalid_config(format!("{url:?} is not a {scheme}: URL")))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let path = match path.strip_prefix("//") {
        // An empty authority: `SCHEME:///abs/path`.
        Some(abs) if abs.starts_with('/') => abs,
        Some(_) => {
            return Err(Error::invalid_config(format!(
                "{url:?}: a {scheme} URL has no host; write {scheme}:PATH or \
                 {scheme}:///ABSOLUTE/PATH"
            )));
        }
        None => path,
    };
    if path.is_empty() {
        return Err(Error::invalid_config(format!("{url:?} names no file")));
    }
    Ok((path, query))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn invalid<T: std::fmt::Debug>(r: Result<T>) -> String {
        match r {
            Err(Error::InvalidConfig { reason }) => reason,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn options_are_pairs_given_once() {
        let o = UrlOptions::parse("x", "a=1&b=on&&c=").unwrap();
        assert_eq!(
            o.iter().collect::<Vec<_>>(),
            [("a", "1"), ("b", "on"), ("c", "")]
        );
        assert!(invalid(UrlOptions::parse("x", "a=1&a=2")).contains("twice"));
        assert!(invalid(UrlOptions::parse("x", "a")).contains("=VALUE"));
        let (o, rest) =
            UrlOptions::parse_filtered("x", "k_a=1&sslmode=require", |p| p.starts_with("k_"))
                .unwrap();
        assert_eq!(o.iter().collect::<Vec<_>>(), [("k_a", "1")]);
        assert_eq!(rest, ["sslmode=require"]);
    }

    #[test]
    fn values_are_checked() {
        let o = UrlOptions::parse("x", "").unwrap();
        assert_eq!(o.number::<u64>("n", "42").unwrap(), 42);
        for bad in ["", "+3", "-1", " 1", "1.5", "x"] {
            assert!(
                invalid(o.number::<u64>("n", bad)).contains("unsigned"),
                "{bad}"
            );
        }
        assert!(invalid(o.positive::<u64>("n", "0")).contains("at least 1"));
        assert!(o.on_off("s", "on").unwrap());
        assert!(!o.on_off("s", "off").unwrap());
        assert!(invalid(o.on_off("s", "yes")).contains("`on` or `off`"));
        assert!(
            o.unknown("zz", &["a", "b"])
                .to_string()
                .contains("known: a, b")
        );
    }

    #[test]
    fn file_urls() {
        assert_eq!(file_url("sqlite", "sqlite:k.db").unwrap(), ("k.db", ""));
        assert_eq!(
            file_url("sqlite", "sqlite:/a/k.db?x=1").unwrap(),
            ("/a/k.db", "x=1")
        );
        assert_eq!(
            file_url("redb", "redb:///a/k.redb").unwrap(),
            ("/a/k.redb", "")
        );
        for bad in [
            "redb:k",
            "sqlite:",
            "sqlite://host/k.db",
            "sqlite:?x=1",
            "k.db",
        ] {
            invalid(file_url("sqlite", bad));
        }
    }
}
