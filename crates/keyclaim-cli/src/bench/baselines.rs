//! The reference homeserver's claim patterns, from each backend crate's
//! `baseline` module, wrapped for the claim races.

use std::sync::Arc;

use async_trait::async_trait;
use keyclaim::{Algorithm, ClaimedKey, Device, KeyStore};

use super::Baseline;
use super::workload::{Claimer, StoreClaimer};

/// SQLite: one `BEGIN IMMEDIATE` transaction per claim (select the oldest
/// key, delete it, commit) on the same file, through one connection, as the
/// reference homeserver uses SQLite. (One connection per client is slower:
/// the clients then sleep in SQLite's busy handler, which would flatter
/// keyclaim's ratio.)
#[cfg(feature = "sqlite")]
pub(crate) fn sqlite(store: &Arc<dyn KeyStore>, path: &std::path::Path) -> Baseline {
    struct Sqlite(keyclaim_sqlite::baseline::BaselineClaimer);

    #[async_trait]
    impl Claimer for Sqlite {
        async fn claim_one(
            &self,
            device: &Device,
            algorithm: &Algorithm,
        ) -> keyclaim::Result<Option<ClaimedKey>> {
            self.0.claim_one(device, algorithm).await
        }
    }

    let claimer = keyclaim_sqlite::baseline::BaselineClaimer::open(
        path,
        keyclaim_sqlite::SqliteOptions::new(),
    );
    Baseline {
        name: "sqlite-baseline".into(),
        claimer: Arc::new(Sqlite(claimer)),
        store: store.clone(),
    }
}

/// redb: one write transaction (and fsync) per claim target. redb allows one
/// handle per file, so the baseline has a file of its own.
#[cfg(feature = "redb")]
pub(crate) async fn redb(path: &std::path::Path) -> keyclaim::Result<Baseline> {
    let store: Arc<dyn KeyStore> =
        Arc::new(keyclaim_redb::baseline::BaselineStore::open(path).await?);
    Ok(Baseline {
        name: "redb-baseline".into(),
        claimer: Arc::new(StoreClaimer(store.clone())),
        store,
    })
}

/// PostgreSQL: the reference homeserver's bulk-claim statement (a
/// `ROW_NUMBER() OVER (PARTITION BY ...)` delete, no `SKIP LOCKED`) on the
/// same tables.
#[cfg(feature = "postgres")]
pub(crate) fn postgres(store: Arc<keyclaim_postgres::PostgresStore>) -> Baseline {
    struct Postgres(Arc<keyclaim_postgres::PostgresStore>);

    #[async_trait]
    impl Claimer for Postgres {
        async fn claim_one(
            &self,
            device: &Device,
            algorithm: &Algorithm,
        ) -> keyclaim::Result<Option<ClaimedKey>> {
            let target = [keyclaim::ClaimTarget::one(
                device.clone(),
                algorithm.clone(),
            )];
            Ok(keyclaim_postgres::baseline::claim(&self.0, &target)
                .await?
                .into_iter()
                .next())
        }
    }

    let fill: Arc<dyn KeyStore> = store.clone();
    Baseline {
        name: "postgres-baseline".into(),
        claimer: Arc::new(Postgres(store)),
        store: fill,
    }
}
