//! `ledger bench rebuild`: generates a realistic history (many accounts, a few
//! hot products, deposits, purchases, releases with refunds, withdrawals,
//! payouts) into a fresh database, then measures a full rebuild of every read
//! model and its peak memory. Afterwards: every checkpoint is at the head, the
//! quota adds up, no balance is negative, the trial balance holds and a drift
//! check against a second, scratch rebuild finds nothing (it replays the log
//! a second time, outside the measured time).

use super::{BenchBackend, BenchDatabase, progress};
use crate::read_models;
use projections::history::{History, Shape};
use projections::rebuild::REBUILD_BATCH_DEFAULT;
use projections::{PROJECTION_BATCH_MAX, Projection, ReadDb};
use serde::Serialize;
use std::process::ExitCode;
use std::time::Instant;

/// Options of `ledger bench rebuild`.
#[derive(Debug, Clone, clap::Args)]
pub struct RebuildBenchOptions {
    /// Backend to measure; each run uses a fresh, empty database.
    #[arg(long, value_enum, default_value = "sqlite")]
    pub backend: BenchBackend,
    /// PostgreSQL server to create the scratch database on (`--backend postgres`).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Events in the generated history.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..=20_000_000))]
    pub events: u64,
    /// Customer accounts in the history.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(2..=10_000_000))]
    pub accounts: u64,
    /// Products in the history (the first is the hottest).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1_000))]
    pub products: u64,
    /// Events per rebuild transaction.
    #[arg(long, default_value_t = REBUILD_BATCH_DEFAULT as u64, value_parser = clap::value_parser!(u64).range(1..=PROJECTION_BATCH_MAX as u64))]
    pub batch: u64,
    /// Seed of the generated history.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object with the figures and checks instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Invariants verified after the rebuild.
#[derive(Debug, Serialize)]
pub struct Checks {
    /// Every projection's checkpoint equals the log's head.
    pub checkpoints_at_head: bool,
    /// `confirmed + reserved + available = quota` for every product.
    pub quota_adds_up: bool,
    /// No account's available or held balance is negative.
    pub no_negative_balance: bool,
    /// Postings balance and every account equals the sum of its postings.
    pub trial_balance_holds: bool,
    /// Rows differing from a second, scratch rebuild.
    pub drift_differences: u64,
    /// All of the above.
    pub ok: bool,
}

/// The report (`--json` prints exactly this).
#[derive(Debug, Serialize)]
pub struct RebuildBenchReport {
    /// Always `rebuild`.
    pub benchmark: &'static str,
    /// Backend measured.
    pub backend: BenchBackend,
    /// Backend configuration.
    pub setup: &'static str,
    /// Events in the log.
    pub events: i64,
    /// Accounts and products in the history.
    pub accounts: u64,
    /// Products in the history.
    pub products: u64,
    /// Events per rebuild transaction.
    pub batch: u64,
    /// Seconds spent generating the history (not measured further).
    pub generate_seconds: f64,
    /// Seconds of the rebuild, swap included.
    pub rebuild_seconds: f64,
    /// Rebuild throughput.
    pub events_per_second: f64,
    /// The target for this backend.
    pub target_events_per_second: f64,
    /// Peak resident memory of the process during the rebuild, MiB.
    pub peak_rss_mib: Option<f64>,
    /// Resident memory before the rebuild started, MiB.
    pub rss_before_mib: Option<f64>,
    /// Row counts after the rebuild.
    pub rows: serde_json::Value,
    /// Invariant checks.
    pub checks: Checks,
}

/// Runs the benchmark and prints its report; fails if a check fails.
pub async fn run(options: RebuildBenchOptions) -> anyhow::Result<ExitCode> {
    let database = BenchDatabase::create(options.backend, options.database_url.as_deref()).await?;
    let backend = database.backend();
    let store = backend.open().await?;
    let generate_seconds = generate(&store, &options).await?;
    let db = ReadDb::open(&backend).await?;
    projections::install(&db).await?;
    let rss_before_mib = memory("VmRSS");
    // Forget the generator's peak so the figure below is the rebuild's.
    let peak_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let bar = read_models::replay_bar("rebuilding", options.json);
    let report = projections::rebuild(
        store.clone(),
        &db,
        &Projection::ALL,
        usize::try_from(options.batch)?,
        &mut |position, head| read_models::advance(&bar, position, head),
    )
    .await?;
    bar.finish_and_clear();
    let peak_rss_mib = if peak_reset { memory("VmHWM") } else { None };
    let head = store.head().await?;
    let checks = verify(&backend, &db, head, options.json).await?;
    let report = RebuildBenchReport {
        benchmark: "rebuild",
        backend: options.backend,
        setup: database.describe(),
        events: head,
        accounts: options.accounts,
        products: options.products,
        batch: options.batch,
        generate_seconds,
        rebuild_seconds: report.seconds,
        events_per_second: report.events_per_second(),
        target_events_per_second: match options.backend {
            BenchBackend::Sqlite => 100_000.0,
            BenchBackend::Postgres => 80_000.0,
        },
        peak_rss_mib,
        rss_before_mib,
        rows: row_counts(&db).await?,
        checks,
    };
    db.close().await;
    if options.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(if report.checks.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Events per generated append.
const GENERATE_BATCH: usize = 5_000;

/// Appends the generated history the options describe; seconds taken.
pub(crate) async fn generate(
    store: &std::sync::Arc<dyn store::EventStore>,
    options: &RebuildBenchOptions,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut history = History::new(Shape {
        accounts: usize::try_from(options.accounts)?,
        products: usize::try_from(options.products)?,
        seed: options.seed,
    });
    let bar = progress(
        options.events,
        "generating history".to_owned(),
        options.json,
    );
    let mut written = 0u64;
    while written < options.events {
        let want = usize::try_from(options.events - written)?.min(GENERATE_BATCH);
        let appends = history.next_batch(want);
        written += appends.iter().map(|a| a.events.len() as u64).sum::<u64>();
        store.append_batch(appends).await?;
        bar.set_position(written);
    }
    bar.finish_and_clear();
    Ok(started.elapsed().as_secs_f64())
}

/// A line of `/proc/self/status` in MiB (Linux only).
fn memory(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

async fn scalar(db: &ReadDb, sql: &'static str) -> anyhow::Result<i64> {
    Ok(match db {
        ReadDb::Sqlite { read, .. } => sqlx::query_scalar(sql).fetch_one(read).await?,
        ReadDb::Postgres { read, .. } => sqlx::query_scalar(sql).fetch_one(read).await?,
    })
}

async fn row_counts(db: &ReadDb) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::json!({
        "sale_progress": scalar(db, "SELECT COUNT(*) FROM sale_progress").await?,
        "account_balances": scalar(db, "SELECT COUNT(*) FROM account_balances").await?,
        "ledger_entries": scalar(db, "SELECT COUNT(*) FROM ledger_entries").await?,
        "orders": scalar(db, "SELECT COUNT(*) FROM orders").await?,
        "timeline_events": scalar(db, "SELECT COUNT(*) FROM timeline_events").await?,
        "payouts": scalar(db, "SELECT COUNT(*) FROM payouts").await?,
    }))
}

async fn verify(
    backend: &store::Backend,
    db: &ReadDb,
    head: i64,
    quiet: bool,
) -> anyhow::Result<Checks> {
    let mut checkpoints_at_head = true;
    for projection in Projection::ALL {
        let checkpoint = db.checkpoint(projection).await?;
        checkpoints_at_head &= checkpoint.map(|c| c.position) == Some(head);
    }
    let over_or_under = scalar(
        db,
        "SELECT COUNT(*) FROM sale_progress WHERE confirmed + reserved + available <> quota \
         OR available < 0 OR reserved < 0",
    )
    .await?;
    let negative = scalar(
        db,
        "SELECT COUNT(*) FROM account_balances WHERE available < 0 OR held < 0",
    )
    .await?;
    let drift = read_models::check(backend, &store::LogLocation::Database, quiet).await?;
    let mut checks = Checks {
        checkpoints_at_head,
        quota_adds_up: over_or_under == 0,
        no_negative_balance: negative == 0,
        trial_balance_holds: drift.trial_balance.holds(),
        drift_differences: drift.differences(),
        ok: false,
    };
    checks.ok = checks.checkpoints_at_head
        && checks.quota_adds_up
        && checks.no_negative_balance
        && checks.trial_balance_holds
        && checks.drift_differences == 0;
    Ok(checks)
}

fn print_report(report: &RebuildBenchReport) {
    let mib = |value: Option<f64>| value.map_or("n/a".to_owned(), |v| format!("{v:.0} MiB"));
    println!("rebuild benchmark on {}", report.setup);
    println!(
        "history: {} events, {} accounts, {} products (generated in {:.1} s)",
        report.events, report.accounts, report.products, report.generate_seconds
    );
    println!("rows: {}", report.rows);
    println!(
        "rebuild of every read model, batch {}: {:.1} s, {:.0} events/s (target {:.0}: {})",
        report.batch,
        report.rebuild_seconds,
        report.events_per_second,
        report.target_events_per_second,
        if report.events_per_second >= report.target_events_per_second {
            "met"
        } else {
            "NOT met"
        }
    );
    println!(
        "memory: {} resident before, {} peak during the rebuild",
        mib(report.rss_before_mib),
        mib(report.peak_rss_mib)
    );
    println!(
        "checks: {}",
        serde_json::to_string(&report.checks).unwrap_or_default()
    );
}
