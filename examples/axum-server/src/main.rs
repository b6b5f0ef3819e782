//! `keyclaim-axum-example`: serves `/keys/upload`, `/keys/claim` and the E2EE
//! part of `/sync` from keyclaim. With a **stand-in authentication header,
//! not real authentication**: see the library docs.

use std::net::SocketAddr;

use clap::Parser;
use keyclaim::KeysApi;
use keyclaim_axum_example::{open_store, router};

/// Serves the Matrix key endpoints from keyclaim (an example: the
/// authentication is a stand-in, not real).
#[derive(Debug, Parser)]
struct Args {
    /// The address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8008")]
    listen: SocketAddr,
    /// The store's URL: `memory:` (keys are gone when the server stops),
    /// `sqlite:PATH`, `redb:PATH` or `postgres://...`.
    #[arg(long, default_value = "memory:")]
    store: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let store = open_store(&args.store).await?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    // The first line tells scripts and tests where to connect.
    #[allow(clippy::print_stdout)]
    {
        println!("listening on http://{}", listener.local_addr()?);
    }
    axum::serve(listener, router(KeysApi::new(store)))
        .with_graceful_shutdown(async {
            // Without a signal handler, run until killed.
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        })
        .await?;
    Ok(())
}
