//! The command line: one binary, `ledger`, with subcommands.

use crate::bench;
use crate::read_models;
use crate::telemetry::LogFormat;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use store::{Backend, EventStore, LogLocation};

/// An event-sourced ledger for fixed-quota financial products.
#[derive(Debug, Parser)]
#[command(
    name = "ledger",
    version,
    about = "An event-sourced ledger for fixed-quota financial products: serve the API, keep and check the read models, benchmark."
)]
pub struct Cli {
    /// How log lines are written (to standard error).
    #[arg(
        long,
        value_enum,
        default_value = "text",
        env = "LEDGER_LOG_FORMAT",
        global = true
    )]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (on the embedded SQLite file unless a PostgreSQL URL
    /// is given), with the read-model projections running.
    Serve(Box<crate::server::ServeOptions>),
    /// Create or upgrade the database schema, then list the applied migrations.
    Migrate(StoreArgs),
    /// Rebuild read models from position zero and swap them in while readers keep reading.
    Rebuild(read_models::RebuildOptions),
    /// Run the read-model projections, or show where they stand.
    #[command(subcommand)]
    Projections(ProjectionsCommand),
    /// Checks for auditors and operators.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Measure throughput and latency; every benchmark verifies its invariants.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// A payment provider for development and tests: speaks the provider
    /// contract, does not de-duplicate, lists every payment it made, and
    /// injects faults (timeouts, 5xx after paying, refusals).
    FakeGateway(crate::gateway::fake::FakeGatewayOptions),
}

/// The projection commands.
#[derive(Debug, Subcommand)]
pub enum ProjectionsCommand {
    /// Show each read model's checkpoint, generation and lag behind the log.
    Status(read_models::CheckOptions),
    /// Keep every read model up with the log until interrupted (rebuilding
    /// first any whose table shape changed); several may run at once.
    Run(read_models::RunOptions),
}

/// The audit checks.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Rebuild every read model into a scratch database, compare it row by row
    /// with the live one and run the trial balance; exits 1 on any difference.
    Drift(read_models::CheckOptions),
    /// Walk the hash chain over every event (in the database, or offline in
    /// an export with `--file`); report the first bad position, exit 1 if any.
    Verify(crate::audit::VerifyOptions),
    /// Write the log as JSON Lines (format in the README), with each
    /// event's hash and the hash before it.
    Export(crate::audit::ExportOptions),
    /// Rebuild the read models as of a position or time into a separate
    /// SQLite file and print product progress and account balances then.
    Replay(crate::audit::ReplayOptions),
}

/// Where the event log lives.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Folder of the embedded SQLite file (used when no PostgreSQL URL is given).
    #[arg(long, env = "LEDGER_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// `postgres://...` to use PostgreSQL instead of the embedded SQLite file.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// `esdb://...` or `kurrentdb://...`: keep the log in EventStoreDB
    /// (KurrentDB); the read models and API tables stay in the SQL database
    /// above. Needs a binary built with the `eventstoredb` feature.
    #[arg(long, env = "LEDGER_EVENT_STORE", hide_env_values = true)]
    pub event_store: Option<String>,
}

impl StoreArgs {
    /// The SQL database: the read models and API tables, and the log unless
    /// `--event-store` puts it elsewhere.
    pub fn backend(&self) -> Backend {
        Backend::choose(self.database_url.as_deref(), &self.data_dir)
    }

    /// Where the log lives; an error for an `--event-store` this binary
    /// cannot use.
    pub fn log(&self) -> anyhow::Result<LogLocation> {
        Ok(LogLocation::choose(self.event_store.as_deref())?)
    }

    /// Opens the log (and migrates the SQL database either way).
    pub async fn open_log(&self) -> anyhow::Result<Arc<dyn EventStore>> {
        Ok(self.log()?.open(&self.backend()).await?)
    }

    /// What to call the stores in messages (never with credentials).
    pub fn describe(&self) -> anyhow::Result<String> {
        Ok(match self.log()? {
            LogLocation::Database => self.backend().to_string(),
            log => format!("{}, log in {log}", self.backend()),
        })
    }
}

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Raw append throughput: one stream in batches, and many writers on distinct streams.
    Append(bench::append::AppendOptions),
    /// One hot product, many concurrent buyers: the engine against naive optimistic retries.
    Purchases(bench::purchases::PurchaseOptions),
    /// Generate a realistic history, then rebuild every read model from it.
    Rebuild(bench::rebuild::RebuildBenchOptions),
    /// Generate a history, then time the support console's lookups in it
    /// (search, ledger page, order timeline, balance as of a position).
    Lookups(bench::lookups::LookupBenchOptions),
    /// Many concurrent clients buying one hot product over HTTP, through
    /// the whole API; checks the log and read models afterwards.
    Http(bench::http::HttpBenchOptions),
    /// Honest buyers over HTTP with and without slowloris, login, random-token
    /// and made-up-product floods from other loopback addresses.
    Attack(bench::attack::AttackOptions),
    /// Payday: N holders paid their interest through the fake gateway with
    /// its latency (and lies); payouts/s, peak calls in flight, and the
    /// gateway's record checked against the ledger.
    Payouts(bench::payouts::PayoutBenchOptions),
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(options) => crate::server::serve(*options).await,
        Command::Migrate(args) => migrate(&args).await,
        Command::FakeGateway(options) => crate::gateway::fake::run(options).await,
        Command::Bench(BenchCommand::Append(options)) => bench::append::run(options).await,
        Command::Bench(BenchCommand::Purchases(options)) => bench::purchases::run(options).await,
        Command::Bench(BenchCommand::Rebuild(options)) => bench::rebuild::run(options).await,
        Command::Bench(BenchCommand::Lookups(options)) => bench::lookups::run(options).await,
        Command::Bench(BenchCommand::Http(options)) => bench::http::run(options).await,
        Command::Bench(BenchCommand::Attack(options)) => bench::attack::run(options).await,
        Command::Bench(BenchCommand::Payouts(options)) => bench::payouts::run(options).await,
        Command::Rebuild(options) => read_models::rebuild(options).await,
        Command::Projections(ProjectionsCommand::Status(options)) => {
            read_models::status(options).await
        }
        Command::Projections(ProjectionsCommand::Run(options)) => read_models::run(options).await,
        Command::Audit(AuditCommand::Drift(options)) => read_models::drift(options).await,
        Command::Audit(AuditCommand::Verify(options)) => crate::audit::verify(options).await,
        Command::Audit(AuditCommand::Export(options)) => crate::audit::export(options).await,
        Command::Audit(AuditCommand::Replay(options)) => crate::audit::replay(options).await,
    }
}

async fn migrate(args: &StoreArgs) -> anyhow::Result<ExitCode> {
    let backend = args.backend();
    let log = args.log()?;
    let applied = store::migrate(&backend).await?;
    println!("schema of {backend} is up to date; applied migrations:");
    for (version, description) in applied {
        println!("  {version:04} {description}");
    }
    // The API's tables (users, sessions, idempotency keys): on SQLite in
    // their own file beside the log's.
    crate::server::access::AccessDb::open(&backend)
        .await?
        .close()
        .await;
    if let Backend::Sqlite(path) = &backend {
        println!(
            "API tables are up to date in {}",
            crate::server::access::sqlite_path(path).display()
        );
    }
    if log != LogLocation::Database {
        // Opening it checks the connection; EventStoreDB needs no schema.
        log.open(&backend).await?;
        println!("the log is in {log}, which needs no schema");
    }
    Ok(ExitCode::SUCCESS)
}
