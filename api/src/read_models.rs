//! `ledger rebuild`, `ledger projections status|run` and `ledger audit drift`:
//! operator commands on the read models.

use crate::bench::progress;
use crate::cli::StoreArgs;
use indicatif::ProgressBar;
use projections::drift::DriftReport;
use projections::rebuild::REBUILD_BATCH_DEFAULT;
use projections::runner::RUNNER_BATCH_DEFAULT;
use projections::{PROJECTION_BATCH_MAX, Projection, ReadDb, Runner, RunnerOptions};
use std::process::ExitCode;
use std::time::Duration;
use store::scratch::ScratchPostgres;
use store::{Backend, LogLocation};

/// Options of `ledger rebuild`.
#[derive(Debug, Clone, clap::Args)]
pub struct RebuildOptions {
    /// Where the log and read models live.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Rebuild only this projection (`sale_progress`, `accounts`, `orders`, `payouts`).
    #[arg(long)]
    pub projection: Option<String>,
    /// Events per transaction.
    #[arg(long, default_value_t = REBUILD_BATCH_DEFAULT as u64, value_parser = clap::value_parser!(u64).range(1..=PROJECTION_BATCH_MAX as u64))]
    pub batch: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Options of `ledger audit drift` and `ledger projections status`.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckOptions {
    /// Where the log and read models live.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Options of `ledger projections run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunOptions {
    /// Where the log and read models live.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Events per batch (each batch and its checkpoint commit together).
    #[arg(long, default_value_t = RUNNER_BATCH_DEFAULT as u64, value_parser = clap::value_parser!(u64).range(1..=PROJECTION_BATCH_MAX as u64))]
    pub batch: u64,
}

/// How often `ledger projections run` logs where each projection stands.
const STATUS_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Runs the projections until Ctrl-C (or SIGTERM).
pub async fn run(options: RunOptions) -> anyhow::Result<ExitCode> {
    let stop = shutdown_signal();
    let backend = options.store.backend();
    let store = options.store.open_log().await?;
    let db = ReadDb::open(&backend).await?;
    projections::prepare(store.clone(), &db).await?;
    let runner = Runner::start(
        store,
        db,
        RunnerOptions {
            batch: usize::try_from(options.batch)?,
            before_commit: None,
        },
    );
    let stores = options.store.describe()?;
    tracing::info!(%stores, "projections running; Ctrl-C stops them");
    let statuses = runner.statuses();
    let mut ticks = tokio::time::interval(STATUS_LOG_INTERVAL);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = ticks.tick() => {
                for report in statuses.report() {
                    tracing::info!(
                        projection = report.projection,
                        position = report.position,
                        lag = report.lag,
                        events_per_second = report.events_per_second,
                        last_error = report.last_error.as_deref().unwrap_or(""),
                        "projection status"
                    );
                }
            }
        }
    }
    runner.stop().await;
    tracing::info!("projections stopped");
    Ok(ExitCode::SUCCESS)
}

/// Resolves on Ctrl-C or SIGTERM. The handlers are installed when this is
/// called, not when the future is first polled, so a signal that arrives
/// right after start-up (once the address is printed) is not lost to the
/// default action.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt()).expect("BUG: SIGINT handler installs");
        let mut terminate = signal(SignalKind::terminate()).expect("BUG: SIGTERM handler installs");
        async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A bar for replaying the log up to `head`.
pub fn replay_bar(label: &str, hidden: bool) -> ProgressBar {
    let bar = progress(0, label.to_owned(), hidden);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>24} [{bar:30}] position {pos}/{len}, {per_sec}, {msg}, eta {eta}",
        )
        .expect("BUG: static progress template")
        .progress_chars("=> "),
    );
    bar
}

/// Moves a replay bar to `position` of `head`, with the events remaining.
pub fn advance(bar: &ProgressBar, position: i64, head: i64) {
    bar.set_length(u64::try_from(head).unwrap_or(0));
    bar.set_position(u64::try_from(position).unwrap_or(0));
    bar.set_message(format!("{} events remaining", (head - position).max(0)));
}

/// Rebuilds read models from position zero and swaps them in.
pub async fn rebuild(options: RebuildOptions) -> anyhow::Result<ExitCode> {
    let projections = Projection::select(options.projection.as_deref())?;
    let backend = options.store.backend();
    let store = options.store.open_log().await?;
    let db = ReadDb::open(&backend).await?;
    let bar = replay_bar("replaying the log", options.json);
    let batch = usize::try_from(options.batch)?;
    let report = projections::rebuild(store, &db, &projections, batch, &mut |position, head| {
        advance(&bar, position, head)
    })
    .await?;
    bar.finish_and_clear();
    if options.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "rebuilt {} on {backend}: {} events in {:.1} s ({:.0} events/s), {} more applied in the swap; now at position {}",
            report.projections.join(", "),
            report.events,
            report.seconds,
            report.events_per_second(),
            report.caught_up,
            report.position,
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints each projection's checkpoint, generation and lag.
pub async fn status(options: CheckOptions) -> anyhow::Result<ExitCode> {
    let backend = options.store.backend();
    let store = options.store.open_log().await?;
    let db = ReadDb::open(&backend).await?;
    projections::install(&db).await?;
    let head = store.head().await?;
    let mut rows = Vec::new();
    for projection in Projection::ALL {
        let checkpoint = db
            .checkpoint(projection)
            .await?
            .expect("BUG: installed above");
        rows.push(serde_json::json!({
            "projection": projection.name(),
            "generation": checkpoint.generation,
            "position": checkpoint.position,
            "head": head,
            "lag": head - checkpoint.position,
        }));
    }
    if options.json {
        println!("{}", serde_json::json!({ "projections": rows }));
    } else {
        println!(
            "{:<16} {:>10} {:>12} {:>12} {:>10}",
            "projection", "generation", "position", "head", "lag"
        );
        for row in &rows {
            println!(
                "{:<16} {:>10} {:>12} {:>12} {:>10}",
                row["projection"].as_str().unwrap_or_default(),
                row["generation"],
                row["position"],
                row["head"],
                row["lag"]
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A scratch database of the same kind as `backend`, removed on drop.
pub enum ScratchDb {
    /// An SQLite file in a temporary folder.
    Sqlite(tempfile::TempDir),
    /// A scratch PostgreSQL database.
    Postgres(ScratchPostgres),
}

impl ScratchDb {
    /// Creates it.
    pub async fn create(backend: &Backend) -> anyhow::Result<ScratchDb> {
        Ok(match backend {
            Backend::Sqlite(_) => ScratchDb::Sqlite(tempfile::tempdir()?),
            Backend::Postgres(url) => {
                ScratchDb::Postgres(ScratchPostgres::create(url, "ledger_drift").await?)
            }
        })
    }

    /// Opens the read models on it.
    pub async fn open(&self) -> anyhow::Result<ReadDb> {
        Ok(match self {
            ScratchDb::Sqlite(folder) => {
                ReadDb::open_sqlite(&folder.path().join("drift.db")).await?
            }
            ScratchDb::Postgres(scratch) => ReadDb::open_postgres(&scratch.url).await?,
        })
    }
}

/// Runs the drift check and the trial balance against the read models in
/// `backend`, rebuilt from the log where `log` says.
pub async fn check(
    backend: &Backend,
    log: &LogLocation,
    hidden: bool,
) -> anyhow::Result<DriftReport> {
    let store = log.open(backend).await?;
    let live = ReadDb::open(backend).await?;
    let scratch = ScratchDb::create(backend).await?;
    let scratch_db = scratch.open().await?;
    let bar = replay_bar("rebuilding into scratch", hidden);
    let report = projections::check_drift(store, &live, &scratch_db, &mut |position, head| {
        advance(&bar, position, head)
    })
    .await?;
    bar.finish_and_clear();
    scratch_db.close().await;
    Ok(report)
}

/// `ledger audit drift`: exits non-zero when anything differs.
pub async fn drift(options: CheckOptions) -> anyhow::Result<ExitCode> {
    let backend = options.store.backend();
    let report = check(&backend, &options.store.log()?, options.json).await?;
    if options.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_drift(&report);
    }
    Ok(if report.clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_drift(report: &DriftReport) {
    println!("log head: {}", report.head);
    for (projection, position) in &report.checkpoints {
        println!(
            "  {projection:<14} compared at position {position} (lag {})",
            report.head - position
        );
    }
    println!();
    println!(
        "{:<18} {:>12} {:>12} {:>12}",
        "table", "live rows", "rebuilt", "differences"
    );
    for table in &report.tables {
        println!(
            "{:<18} {:>12} {:>12} {:>12}",
            table.table, table.rows_live, table.rows_rebuilt, table.differences
        );
    }
    for table in report.tables.iter().filter(|t| t.differences > 0) {
        println!("\n{}: first differences", table.table);
        for difference in &table.examples {
            println!("  key {}", serde_json::Value::from(difference.key.clone()));
            println!(
                "    live:    {}",
                difference.live.clone().unwrap_or_default()
            );
            println!(
                "    rebuilt: {}",
                difference.rebuilt.clone().unwrap_or_default()
            );
        }
    }
    let trial = &report.trial_balance;
    println!("\ntrial balance at position {}:", trial.position);
    println!("  account events checked: {}", trial.events_checked);
    for (class, total) in &trial.totals {
        println!("  {class:<20} {total:>20}");
    }
    println!("  {:<20} {:>20}", "net (must be 0)", trial.net);
    println!("  customer accounts compared: {}", trial.accounts_checked);
    if !trial.unbalanced_events.is_empty() {
        println!(
            "  UNBALANCED events at positions {:?}",
            trial.unbalanced_events
        );
    }
    for mismatch in &trial.mismatches {
        println!(
            "  MISMATCH account {}: postings {} available {:?} entries {:?} last balance_after {:?}",
            mismatch.account_id,
            mismatch.postings,
            mismatch.available,
            mismatch.entries,
            mismatch.last_balance_after
        );
    }
    let entitlements = &trial.entitlements;
    println!(
        "  payouts checked against entitlements: {} ({} succeeded and awaiting their credit)",
        entitlements.payouts_checked, entitlements.awaiting_credit
    );
    for violation in &entitlements.violations {
        println!(
            "  ENTITLEMENT {} at position {}: product {} holder {} payout {}: {}",
            violation.rule,
            violation.position,
            violation.product_id,
            violation.account_id,
            violation.payout_id,
            violation.detail
        );
    }
    if entitlements.violation_count > entitlements.violations.len() as u64 {
        println!(
            "  ... {} entitlement violations in all",
            entitlements.violation_count
        );
    }
    println!();
    if report.clean() {
        println!("no drift: every read model equals a fresh rebuild, and the trial balance holds");
    } else {
        println!(
            "DRIFT: {} differing rows; trial balance {}",
            report.differences(),
            if trial.holds() { "holds" } else { "FAILS" }
        );
    }
}
