//! Store URLs: `memory:`, `sqlite:PATH`, `redb:PATH`, `postgres://...`.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use keyclaim::KeyStore;

/// A parsed store URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StoreUrl {
    /// A new in-memory store (only useful inside one command).
    Memory,
    /// An SQLite file.
    Sqlite(PathBuf),
    /// A redb file.
    Redb(PathBuf),
    /// A PostgreSQL connection string, and the schema from a `#schema=NAME`
    /// fragment (default: the backend's `keyclaim`).
    Postgres(String, Option<String>),
}

impl StoreUrl {
    pub(crate) fn parse(url: &str) -> Result<Self, String> {
        if url == "memory:" || url == "memory" {
            Ok(Self::Memory)
        } else if let Some(p) = url.strip_prefix("sqlite:") {
            Ok(Self::Sqlite(PathBuf::from(p.trim_start_matches("//"))))
        } else if let Some(p) = url.strip_prefix("redb:") {
            Ok(Self::Redb(PathBuf::from(p.trim_start_matches("//"))))
        } else if url.starts_with("postgres://")
            || url.starts_with("postgresql://")
            || url.starts_with("postgres:")
        {
            // postgres://... is a URL; postgres:key=value ... a libpq
            // connection string (as for a Unix socket directory).
            let url = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
                url
            } else {
                url.trim_start_matches("postgres:")
            };
            match url.split_once('#') {
                None => Ok(Self::Postgres(url.to_owned(), None)),
                Some((base, frag)) => match frag.strip_prefix("schema=") {
                    Some(schema) if !schema.is_empty() => {
                        Ok(Self::Postgres(base.to_owned(), Some(schema.to_owned())))
                    }
                    _ => Err(format!(
                        "unknown URL fragment #{frag}: the only one is #schema=NAME"
                    )),
                },
            }
        } else {
            Err(format!(
                "unknown store URL {url:?}: use memory:, sqlite:PATH, redb:PATH, postgres://... or postgres:KEY=VALUE ..."
            ))
        }
    }

    /// Opens the store (creating it when it does not exist).
    pub(crate) async fn open(&self) -> keyclaim::Result<Arc<dyn KeyStore>> {
        Ok(match self {
            Self::Memory => Arc::new(keyclaim_memory::MemoryStore::new()),
            #[cfg(feature = "sqlite")]
            Self::Sqlite(path) => Arc::new(keyclaim_sqlite::SqliteStore::open(path).await?),
            #[cfg(feature = "redb")]
            Self::Redb(path) => Arc::new(keyclaim_redb::RedbStore::open(path).await?),
            #[cfg(feature = "postgres")]
            Self::Postgres(url, None) => {
                Arc::new(keyclaim_postgres::PostgresStore::connect(url).await?)
            }
            #[cfg(feature = "postgres")]
            Self::Postgres(url, Some(schema)) => Arc::new(
                keyclaim_postgres::PostgresStore::connect_with(
                    url,
                    keyclaim_postgres::PostgresOptions::new().schema(schema.clone()),
                )
                .await?,
            ),
            #[allow(unreachable_patterns)]
            other => return Err(not_built(other)),
        })
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Memory => f.write_str("memory:"),
            Self::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            Self::Redb(p) => write!(f, "redb:{}", p.display()),
            // Never print a password.
            Self::Postgres(url, schema) => {
                match url.split_once('@') {
                    Some((_, host)) => write!(f, "postgres://…@{host}")?,
                    None => f.write_str(url)?,
                }
                match schema {
                    Some(s) => write!(f, "#schema={s}"),
                    None => Ok(()),
                }
            }
        }
    }
}

#[allow(dead_code)]
fn not_built(url: &StoreUrl) -> keyclaim::Error {
    keyclaim::Error::storage(
        "cli",
        "open",
        false,
        format!("this build of keyclaim has no backend for {url} (enable its cargo feature)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(StoreUrl::parse("memory:"), Ok(StoreUrl::Memory));
        assert_eq!(
            StoreUrl::parse("sqlite:/tmp/x.db"),
            Ok(StoreUrl::Sqlite("/tmp/x.db".into()))
        );
        assert_eq!(
            StoreUrl::parse("redb:rel.redb"),
            Ok(StoreUrl::Redb("rel.redb".into()))
        );
        assert!(matches!(
            StoreUrl::parse("postgres://u:pw@h/db"),
            Ok(StoreUrl::Postgres(_, None))
        ));
        assert_eq!(
            StoreUrl::parse("postgres://h/db#schema=s1"),
            Ok(StoreUrl::Postgres(
                "postgres://h/db".into(),
                Some("s1".into())
            ))
        );
        assert!(StoreUrl::parse("postgres://h/db#x=1").is_err());
        assert_eq!(
            StoreUrl::parse("postgres:host=/tmp port=5 user=p#schema=s"),
            Ok(StoreUrl::Postgres(
                "host=/tmp port=5 user=p".into(),
                Some("s".into())
            ))
        );
        assert!(StoreUrl::parse("mysql://x").is_err());
        let shown = StoreUrl::parse("postgres://u:secret@h/db")
            .unwrap()
            .to_string();
        assert!(!shown.contains("secret"), "{shown}");
    }
}
