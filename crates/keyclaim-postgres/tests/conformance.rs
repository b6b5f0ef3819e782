//! The whole conformance suite against [`PostgresStore`], each case in its
//! own schema of the shared test server (see `keyclaim_testing::postgres`).

// Tests report failures by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use keyclaim::{Limits, Result};
use keyclaim_conformance::{Capabilities, StoreFactory, keyclaim};
use keyclaim_postgres::{PostgresOptions, PostgresStore};
use keyclaim_testing::postgres::{require_server, unique_schema};

/// Makes stores in fresh schemas of the shared test server.
struct PgFactory {
    url: String,
}

impl PgFactory {
    /// The factory, or `None` (after a loud skip message; a failure under
    /// `CI=true`) when there is no server.
    fn new(case: &str) -> Option<Self> {
        require_server(case).map(|url| Self { url })
    }

    fn options(schema: &str, limits: Limits) -> PostgresOptions {
        // The test servers run with fsync = off, for speed.
        PostgresOptions::new()
            .schema(schema)
            .pool_size(8)
            .allow_unsafe_server(true)
            .limits(limits)
    }
}

#[keyclaim::async_trait]
impl StoreFactory for PgFactory {
    type Store = PostgresStore;

    fn capabilities(&self) -> Capabilities {
        Capabilities::persistent_shared()
    }

    async fn create(&self, limits: Limits) -> Result<PostgresStore> {
        let schema = unique_schema("kc_conf");
        PostgresStore::connect_with(&self.url, Self::options(&schema, limits)).await
    }

    async fn reopen(&self, store: PostgresStore) -> Result<PostgresStore> {
        let schema = store.schema().to_owned();
        let limits = keyclaim::KeyStore::limits(&store).clone();
        drop(store);
        PostgresStore::connect_with(&self.url, Self::options(&schema, limits)).await
    }

    async fn open_shared(&self, store: &PostgresStore) -> Result<PostgresStore> {
        let limits = keyclaim::KeyStore::limits(store).clone();
        PostgresStore::connect_with(&self.url, Self::options(store.schema(), limits)).await
    }
}

// `return` skips the case (loudly) when there is no server.
keyclaim_conformance::conformance_tests!({
    match PgFactory::new("conformance") {
        Some(factory) => factory,
        None => return,
    }
});
