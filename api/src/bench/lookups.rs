//! `ledger bench lookups`: what support does while a log grows large.
//! Generates a history (the rebuild benchmark's generator) into a fresh
//! database, builds the read models, then times, for accounts and orders
//! picked at random, the lookups behind the console: a customer search by
//! account id, by order id and by deposit reference, an account's ledger
//! page, an order's timeline and a balance as of a position. Each lookup is
//! the code the HTTP handler runs (without the HTTP layer); each answer is
//! checked (the search finds the account it was given, the timeline is not
//! empty, the as-of balance folds).

use super::rebuild::RebuildBenchOptions;
use super::{BenchBackend, BenchDatabase, Latency, histogram, record};
use crate::audit::AsOf;
use crate::read_models;
use crate::server::support::{MatchedBy, read_model_matches};
use projections::rebuild::REBUILD_BATCH_DEFAULT;
use projections::{Projection, ReadDb, query};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::process::ExitCode;
use std::time::Instant;

/// Options of `ledger bench lookups`.
#[derive(Debug, Clone, clap::Args)]
pub struct LookupBenchOptions {
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
    /// Products in the history.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1_000))]
    pub products: u64,
    /// Lookups of each kind timed.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(10..=1_000_000))]
    pub samples: u64,
    /// Seed of the history and of the picks.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object with the figures and checks instead of text.
    #[arg(long)]
    pub json: bool,
}

/// One kind of lookup's latency.
#[derive(Debug, Serialize)]
pub struct LookupFigures {
    /// What was looked up.
    pub lookup: &'static str,
    /// Latency of one lookup.
    pub latency: Latency,
}

/// The report (`--json` prints exactly this).
#[derive(Debug, Serialize)]
pub struct LookupBenchReport {
    /// Always `lookups`.
    pub benchmark: &'static str,
    /// Backend measured.
    pub backend: BenchBackend,
    /// Backend configuration.
    pub setup: &'static str,
    /// Events in the log.
    pub events: i64,
    /// Accounts in the history.
    pub accounts: u64,
    /// Products in the history.
    pub products: u64,
    /// Lookups of each kind.
    pub samples: u64,
    /// Seconds generating the history and building the read models.
    pub prepare_seconds: f64,
    /// Per kind of lookup.
    pub lookups: Vec<LookupFigures>,
    /// The target p99, in ms.
    pub target_p99_ms: f64,
    /// Lookups whose answer was wrong (the search missed the account, an
    /// empty timeline, an as-of balance that did not fold).
    pub wrong_answers: u64,
}

/// The target for every lookup.
const TARGET_P99_MS: f64 = 50.0;
/// Entries of a ledger page, the API's default.
const LEDGER_PAGE: u32 = 100;

/// Runs the benchmark and prints its report; fails on a wrong answer.
pub async fn run(options: LookupBenchOptions) -> anyhow::Result<ExitCode> {
    let database = BenchDatabase::create(options.backend, options.database_url.as_deref()).await?;
    let backend = database.backend();
    let store = backend.open().await?;
    let started = Instant::now();
    let generate = RebuildBenchOptions {
        backend: options.backend,
        database_url: options.database_url.clone(),
        events: options.events,
        accounts: options.accounts,
        products: options.products,
        batch: REBUILD_BATCH_DEFAULT as u64,
        seed: options.seed,
        json: options.json,
    };
    super::rebuild::generate(&store, &generate).await?;
    let db = ReadDb::open(&backend).await?;
    projections::install(&db).await?;
    let bar = read_models::replay_bar("building read models", options.json);
    projections::rebuild(
        store.clone(),
        &db,
        &Projection::ALL,
        REBUILD_BATCH_DEFAULT,
        &mut |position, head| read_models::advance(&bar, position, head),
    )
    .await?;
    bar.finish_and_clear();
    let prepare_seconds = started.elapsed().as_secs_f64();
    let head = store.head().await?;
    let (lookups, wrong_answers) = measure(store.as_ref(), &db, head, &options).await?;
    let report = LookupBenchReport {
        benchmark: "lookups",
        backend: options.backend,
        setup: database.describe(),
        events: head,
        accounts: options.accounts,
        products: options.products,
        samples: options.samples,
        prepare_seconds,
        lookups,
        target_p99_ms: TARGET_P99_MS,
        wrong_answers,
    };
    db.close().await;
    if options.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(if report.wrong_answers == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// An account and one of its orders and deposit references, picked at
/// random (the first at or after a random id).
struct Pick {
    account_id: String,
    order_id: Option<String>,
    reference: Option<String>,
}

async fn pick(db: &ReadDb, rng: &mut rand::rngs::StdRng) -> anyhow::Result<Option<Pick>> {
    const ORDER_AFTER: &str =
        "SELECT order_id, account_id FROM orders WHERE order_id >= $1 ORDER BY order_id LIMIT 1";
    const REFERENCE_OF: &str = "SELECT reference FROM ledger_entries \
         WHERE account_id = $1 AND kind = 'deposit' ORDER BY position LIMIT 1";
    // Past the last order id, wrap around to the first.
    let random = uuid::Uuid::from_u128(rng.random::<u128>()).to_string();
    let mut row: Option<(String, String)> = None;
    for from in [random.as_str(), ""] {
        row = match db {
            ReadDb::Sqlite { read, .. } => {
                sqlx::query_as(ORDER_AFTER)
                    .bind(from)
                    .fetch_optional(read)
                    .await?
            }
            ReadDb::Postgres { read, .. } => {
                sqlx::query_as(ORDER_AFTER)
                    .bind(from)
                    .fetch_optional(read)
                    .await?
            }
        };
        if row.is_some() {
            break;
        }
    }
    let Some((order_id, account_id)) = row else {
        return Ok(None);
    };
    let reference: Option<String> = match db {
        ReadDb::Sqlite { read, .. } => {
            sqlx::query_scalar(REFERENCE_OF)
                .bind(&account_id)
                .fetch_optional(read)
                .await?
        }
        ReadDb::Postgres { read, .. } => {
            sqlx::query_scalar(REFERENCE_OF)
                .bind(&account_id)
                .fetch_optional(read)
                .await?
        }
    };
    Ok(Some(Pick {
        account_id,
        order_id: Some(order_id),
        reference,
    }))
}

const KINDS: [&str; 6] = [
    "search by account id",
    "search by order id",
    "search by deposit reference",
    "ledger page (100 entries)",
    "order timeline",
    "balance as of a position",
];

async fn measure(
    store: &dyn store::EventStore,
    db: &ReadDb,
    head: i64,
    options: &LookupBenchOptions,
) -> anyhow::Result<(Vec<LookupFigures>, u64)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(options.seed);
    let mut histograms: Vec<_> = KINDS.iter().map(|_| histogram()).collect();
    let mut wrong = 0u64;
    let mut done = 0u64;
    while done < options.samples {
        let Some(pick) = pick(db, &mut rng).await? else {
            anyhow::bail!("the generated history holds no order to look up (give it more events)");
        };
        done += 1;
        let found = |matches: &[crate::server::support::Found], how: MatchedBy| {
            matches
                .iter()
                .any(|(account, by, _)| *account == pick.account_id && *by == how)
        };
        let at = Instant::now();
        let matches = read_model_matches(db, &pick.account_id).await?;
        record(&mut histograms[0], at.elapsed());
        wrong += u64::from(!found(&matches, MatchedBy::AccountId));
        if let Some(order_id) = &pick.order_id {
            let at = Instant::now();
            let matches = read_model_matches(db, order_id).await?;
            record(&mut histograms[1], at.elapsed());
            wrong += u64::from(!found(&matches, MatchedBy::OrderId));
            let at = Instant::now();
            let timeline = query::timeline(db, store, order_id).await?;
            record(&mut histograms[4], at.elapsed());
            wrong += u64::from(timeline.is_empty());
        }
        if let Some(reference) = &pick.reference {
            let at = Instant::now();
            let matches = read_model_matches(db, reference).await?;
            record(&mut histograms[2], at.elapsed());
            wrong += u64::from(!found(&matches, MatchedBy::DepositReference));
        }
        let at = Instant::now();
        let page = query::ledger(db, &pick.account_id, 0, LEDGER_PAGE).await?;
        record(&mut histograms[3], at.elapsed());
        wrong += u64::from(page.entries.is_empty());
        let account_id = domain::AccountId(uuid::Uuid::parse_str(&pick.account_id)?);
        let point = AsOf::Position(rng.random_range(1..=head.max(1)));
        let at = Instant::now();
        let then = crate::server::users::balance_as_of(store, db, account_id, point).await;
        record(&mut histograms[5], at.elapsed());
        // Not yet opened then is a fair answer (404); anything else is wrong.
        wrong += u64::from(matches!(
            then,
            Err(ref error) if !matches!(error, crate::server::error::ApiError::NotFound)
        ));
    }
    let figures = KINDS
        .iter()
        .zip(&histograms)
        .map(|(lookup, histogram)| LookupFigures {
            lookup,
            latency: Latency::of(histogram),
        })
        .collect();
    Ok((figures, wrong))
}

fn print_report(report: &LookupBenchReport) {
    println!(
        "lookups on {}: {} events, {} accounts, {} products; prepared in {:.0} s",
        report.setup, report.events, report.accounts, report.products, report.prepare_seconds
    );
    println!(
        "{} random accounts and orders, each lookup once per pick (target p99 < {} ms):",
        report.samples, report.target_p99_ms
    );
    println!(
        "{:<30} {:>9} {:>9} {:>9}",
        "lookup", "p50 ms", "p99 ms", "max ms"
    );
    for figures in &report.lookups {
        println!(
            "{:<30} {:>9.2} {:>9.2} {:>9.2}",
            figures.lookup, figures.latency.p50_ms, figures.latency.p99_ms, figures.latency.max_ms
        );
    }
    println!("wrong answers: {}", report.wrong_answers);
}
