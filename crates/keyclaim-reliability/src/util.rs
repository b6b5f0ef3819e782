//! Small shared helpers: the violation type, a shared runtime, full-state
//! snapshots.

use std::fmt;
use std::future::Future;
use std::sync::OnceLock;

use keyclaim::transfer::DeviceSnapshot;
use keyclaim::{Device, KeyStore};

/// A broken promise found by a check: what was expected and what happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation(pub String);

impl Violation {
    /// A violation with a message.
    pub fn new(what: impl Into<String>) -> Self {
        Self(what.into())
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Violation {}

impl From<keyclaim::Error> for Violation {
    fn from(e: keyclaim::Error) -> Self {
        Self(format!("unexpected store error: {}", chain(&e)))
    }
}

/// An error with its whole source chain, `: `-separated.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        out.push_str(": ");
        out.push_str(&inner.to_string());
        src = inner.source();
    }
    out
}

/// Fails with a formatted [`Violation`] unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::Violation(format!($($fmt)+)));
        }
    };
}
pub(crate) use ensure;

/// Runs a future to completion on a shared current-thread runtime (one per
/// thread, built once: fuzz targets call this for every input).
///
/// # Errors
/// A [`Violation`] when no runtime can be built.
pub fn block_on<F: Future>(future: F) -> Result<F::Output, Violation> {
    thread_local! {
        static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = const { OnceLock::new() };
    }
    RUNTIME.with(|cell| {
        let rt = cell.get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        });
        match rt {
            Ok(rt) => Ok(rt.block_on(future)),
            Err(e) => Err(Violation(format!("cannot build a tokio runtime: {e}"))),
        }
    })
}

/// The whole state of a store, every device, sequence numbers normalized (so
/// that stores with the same state compare equal whatever their counters).
///
/// # Errors
/// The store's errors.
pub async fn snapshot_all<S: KeyStore + ?Sized>(
    store: &S,
) -> keyclaim::Result<Vec<DeviceSnapshot>> {
    let mut out = Vec::new();
    let mut after: Option<Device> = None;
    loop {
        let page = store.export_devices(after.as_ref(), 256).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.device.clone());
        out.extend(page.iter().map(DeviceSnapshot::normalized));
    }
    Ok(out)
}
