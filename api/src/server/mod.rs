//! `ledger serve`: the HTTP API over the engine and the read models.
//!
//! Built so far: start-up on SQLite (default) or PostgreSQL with migrations
//! and the projection runner, the route table with its policies, health and
//! readiness, and the public sale-progress routes; graceful shutdown.

pub mod error;
pub mod handlers;
pub mod routes;

use crate::cli::StoreArgs;
use projections::{ReadDb, Runner, RunnerOptions, Statuses};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use store::EventStore;

/// Options of `ledger serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeOptions {
    /// Address to listen on (`host:port`; port 0 picks a free one).
    #[arg(long, env = "LEDGER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Where the log and read models live.
    #[command(flatten)]
    pub store: StoreArgs,
}

/// What every handler may use.
#[derive(Clone)]
pub struct AppState {
    /// The event log.
    pub store: Arc<dyn EventStore>,
    /// The read models.
    pub db: ReadDb,
    /// The projections' progress.
    pub statuses: Arc<Statuses>,
}

/// Runs the server until Ctrl-C or SIGTERM, then drains in-flight requests.
pub async fn serve(options: ServeOptions) -> anyhow::Result<ExitCode> {
    let backend = options.store.backend();
    let store = backend.open().await?;
    let db = ReadDb::open(&backend).await?;
    projections::prepare(store.clone(), &db).await?;
    let runner = Runner::start(store.clone(), db.clone(), RunnerOptions::default());
    let state = AppState {
        store,
        db: db.clone(),
        statuses: runner.statuses(),
    };
    let listener = tokio::net::TcpListener::bind(options.listen).await?;
    let address = listener.local_addr()?;
    tracing::info!(%address, %backend, "ledger serving");
    // One plain line on standard output, for people and for scripts.
    let stop = crate::read_models::shutdown_signal();
    println!(
        "ledger serving on http://{address} ({backend}); sale progress at http://{address}/v1/progress"
    );
    axum::serve(listener, routes::router(state))
        .with_graceful_shutdown(stop)
        .await?;
    tracing::info!("draining done; stopping projections");
    runner.stop().await;
    db.close().await;
    Ok(ExitCode::SUCCESS)
}
