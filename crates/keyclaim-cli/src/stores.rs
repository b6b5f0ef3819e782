//! Store URLs (`memory:`, `sqlite:PATH`, `redb:PATH`, `postgres://...`,
//! `kv-memory:`), as
//! `keyclaim-open` reads them.

use std::fmt;
use std::sync::Arc;

use keyclaim::KeyStore;

/// A store URL, checked to name a known backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StoreUrl(String);

impl StoreUrl {
    pub(crate) fn parse(url: &str) -> Result<Self, String> {
        keyclaim_open::Scheme::of(url).map_err(|e| e.to_string())?;
        Ok(Self(url.to_owned()))
    }

    /// Opens the store (creating it when it does not exist).
    pub(crate) async fn open(&self) -> keyclaim::Result<Arc<dyn KeyStore>> {
        keyclaim_open::open(&self.0).await
    }
}

impl fmt::Display for StoreUrl {
    /// The URL without its password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&keyclaim_open::redacted(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_and_hides_passwords() {
        for url in [
            "memory:",
            "sqlite:/tmp/x.db",
            "redb:rel.redb",
            "postgres://h/db",
            "kv-memory:",
        ] {
            assert!(StoreUrl::parse(url).is_ok(), "{url}");
        }
        assert!(StoreUrl::parse("mysql://x").is_err());
        let shown = StoreUrl::parse("postgres://u:secret@h/db")
            .unwrap()
            .to_string();
        assert!(!shown.contains("secret"), "{shown}");
    }
}
