//! The `keyclaim` command: the backend benchmark comparison (`bench`) and
//! operator tools (`stats`, `migrate`, `import`, `check`).

// A command-line tool: printing to stdout is its job.
#![allow(clippy::print_stdout)]

mod bench;
mod stores;
mod tools;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use stores::StoreUrl;

#[derive(Parser, Debug)]
#[command(
    name = "keyclaim",
    version,
    about = "Matrix one-time key and fallback key storage: benchmark and operator tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Compare the backends on a homeserver-shaped workload.
    Bench(bench::BenchArgs),
    /// Totals and a histogram of one-time keys per device for a store.
    Stats {
        /// sqlite:PATH, redb:PATH or postgres://...
        store: String,
    },
    /// Copy every device's keys from one store to another and verify the copy.
    Migrate {
        /// Source store URL.
        from: String,
        /// Target store URL.
        to: String,
        /// Devices per batch.
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// Checkpoint file: an interrupted migration resumes from it.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// No progress display.
        #[arg(long)]
        quiet: bool,
    },
    /// Import the keys of a homeserver's database into a store, then check
    /// the target and compare counts with the source (exit code 1 if that
    /// fails).
    ///
    /// Sources: Synapse's SQLite file or PostgreSQL database, and the
    /// RocksDB directory of the conduwuit family (conduit, conduwuit,
    /// continuwuity, tuwunel): one-time keys from tuwunel's MSC4225 column
    /// family `onetimekeyid4225_otk` in upload order, else from
    /// `onetimekeyid_onetimekeys` in key ID order; fallback keys with their
    /// used flag from `userdeviceidalgorithm_fallback` (tuwunel) or
    /// `fallbackkeyid_fallbackkey` (continuwuity). The source is only read;
    /// stop the homeserver first. Reading RocksDB needs the `conduwuit`
    /// feature.
    Import {
        /// The source: `synapse-sqlite PATH`, `synapse-postgres URL` or
        /// `conduwuit-rocksdb DIR`.
        #[arg(long, num_args = 2, value_names = ["KIND", "SOURCE"], required = true)]
        from: Vec<String>,
        /// Target store URL.
        #[arg(long)]
        to: String,
        /// Checkpoint file: an interrupted import resumes from it.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// No progress display.
        #[arg(long)]
        quiet: bool,
    },
    /// Verify a store's invariants and report problems (exit code 1 if any).
    Check {
        /// sqlite:PATH, redb:PATH or postgres://...
        store: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keyclaim: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Bench(args) => bench::run(args).await,
            Command::Stats { store } => {
                let text = tools::stats(&StoreUrl::parse(&store)?).await?;
                print!("{text}");
                Ok(true)
            }
            Command::Migrate {
                from,
                to,
                batch,
                checkpoint,
                quiet,
            } => {
                let (ok, text) = tools::migrate(
                    &StoreUrl::parse(&from)?,
                    &StoreUrl::parse(&to)?,
                    batch,
                    checkpoint.as_ref(),
                    quiet,
                )
                .await?;
                print!("{text}");
                Ok(ok)
            }
            Command::Import {
                from,
                to,
                checkpoint,
                quiet,
            } => {
                let [kind, source] = from.as_slice() else {
                    return Err("--from takes a kind and a source".into());
                };
                let (ok, text) = tools::import(
                    tools::ImportSource::parse(kind)?,
                    source,
                    &StoreUrl::parse(&to)?,
                    checkpoint.as_ref(),
                    quiet,
                )
                .await?;
                print!("{text}");
                Ok(ok)
            }
            Command::Check { store } => {
                let (ok, text) = tools::check(&StoreUrl::parse(&store)?).await?;
                print!("{text}");
                Ok(ok)
            }
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("keyclaim: {e}");
            ExitCode::from(2)
        }
    }
}
