//! Runs the storage fault scenario (`keyclaim_reliability::faults`) for a
//! file-based backend with `EIO` on write or on sync, injected by the shim
//! of `keyclaim_reliability::eio`. Started by `tests/storage_faults.rs` with
//! the shim preloaded; by hand:
//!
//! ```text
//! cc -shared -fPIC -pthread -o /tmp/libkeyclaim_eio.so crates/keyclaim-reliability/shim/eio.c -ldl
//! KEYCLAIM_EIO_CONTROL=/tmp/eio.control LD_PRELOAD=/tmp/libkeyclaim_eio.so \
//!     target/debug/eio <sqlite|redb> <write|sync> [seed]
//! ```
//!
//! Prints the scenario's report and exits 0, or prints the broken promise
//! and exits 1.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use keyclaim_reliability::backends::Backend;
use keyclaim_reliability::eio::{CONTROL_ENV, EioFault, EioMode};
use keyclaim_reliability::faults::run_scenario;

fn run() -> Result<String, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: eio <sqlite|redb> <write|sync> [seed]";
    let backend = args
        .first()
        .and_then(|b| Backend::parse(b))
        .filter(|b| Backend::ALL.contains(b))
        .ok_or(usage)?;
    let mode = args.get(1).and_then(|m| EioMode::parse(m)).ok_or(usage)?;
    let seed = match args.get(2) {
        Some(seed) => seed.parse().map_err(|_| usage)?,
        None => 1,
    };
    let control = std::env::var_os(CONTROL_ENV)
        .map(PathBuf::from)
        .ok_or(format!("{CONTROL_ENV} is not set"))?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut fault = EioFault::new(mode, control, dir.path()).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let report = runtime
        .block_on(run_scenario(backend, &mut fault, seed))
        .map_err(|v| format!("{backend} with EIO on {mode}: {v}"))?;
    Ok(format!("{report:?}"))
}

fn main() -> ExitCode {
    match run() {
        Ok(report) => {
            let _ = writeln!(std::io::stdout(), "{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "eio: {e}");
            ExitCode::FAILURE
        }
    }
}
