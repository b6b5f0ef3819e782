//! Where the store calls the test-only fault injection of
//! [`crate::faults`] (feature `fault-injection`). Without the feature these
//! calls do nothing and compile away.

use std::path::Path;

use redb::{Builder, Database, DatabaseError};

#[cfg(feature = "fault-injection")]
use crate::faults::Faults;

/// The faults configured for one store, if any.
#[derive(Clone, Debug, Default)]
pub(crate) struct Hooks {
    #[cfg(feature = "fault-injection")]
    faults: Option<Faults>,
}

impl Hooks {
    /// The hooks of a store opened with `options`.
    pub(crate) fn new(options: &crate::RedbOptions) -> Self {
        #[cfg(not(feature = "fault-injection"))]
        let _ = options;
        Self {
            #[cfg(feature = "fault-injection")]
            faults: options.get_faults().cloned(),
        }
    }

    /// The writer took a batch and is about to run it.
    pub(crate) fn batch_taken(&self) {
        #[cfg(feature = "fault-injection")]
        if let Some(faults) = &self.faults {
            faults.batch_taken();
        }
    }

    /// Opens (or creates) the store's file with `builder`: through the
    /// fault-injecting storage backend when faults are configured.
    pub(crate) fn create(&self, builder: &Builder, path: &Path) -> Result<Database, DatabaseError> {
        #[cfg(feature = "fault-injection")]
        if let Some(faults) = &self.faults {
            return faults.open_file(builder, path);
        }
        builder.create(path)
    }
}
