//! Writes the sample database in tuwunel's current layout (MSC4225 one-time
//! keys, tuwunel's fallback keys) to the directory given, for
//! `tests/fixtures/tuwunel/`:
//!
//! ```sh
//! cargo run -p keyclaim-import-conduwuit --example make_fixture -- DIR
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use keyclaim_import_conduwuit::{FallbackCf, OtkCf, write_sample};

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: make_fixture DIR");
        return ExitCode::from(2);
    };
    if dir.exists() {
        eprintln!("{}: already exists", dir.display());
        return ExitCode::from(2);
    }
    match write_sample(&dir, OtkCf::Msc4225, FallbackCf::Tuwunel) {
        Ok(sample) => {
            eprintln!(
                "{}: {} devices, {} one-time keys, {} fallback keys",
                dir.display(),
                sample.devices.len(),
                sample.one_time_keys,
                sample.fallback_keys
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}
