//! `ledger bench purchases`: one hot product, many concurrent buyers.
//!
//! `engine` mode runs the single-writer engine in-process; `naive` mode has
//! every buyer load the product stream and append with the expected version,
//! retrying on conflict, as common event-sourcing libraries do. Each mode
//! runs on its own fresh database. Afterwards the whole log is audited: sold
//! equals the sum of successful purchases, confirmed + pending + available =
//! quota, no negative balance, every confirmed order paid exactly once.
//!
//! With `--redis-url` the same run ends with the Redis seckill baseline
//! (`redis_seckill`) at the same concurrency, quota and amount, and prints
//! the engine's figure over Redis's beside its own.

use super::redis_seckill::{self, SeckillReport, SeckillSetup};
use super::{BenchBackend, BenchDatabase, Latency, histogram, progress, record};
use chrono::{Duration as Span, Utc};
use domain::account::{
    AccountCommand, AccountEvent, AccountRejection, AccountState, CustomerAccount,
};
use domain::product::{
    ProductCommand, ProductEvent, ProductSale, ProductState, ProductTerms, ReleaseReason,
};
use domain::{AccountId, Amount, Currency, Decider, ProductId};
use engine::aggregate::{Loaded, encode_all, expected_after};
use engine::{
    Engine, EngineSettings, PurchaseError, PurchaseRequest, RequestContext, SystemClock,
    order_id_for,
};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use store::{EventStore, Metadata, StoreError, StreamAppend, codec};
use tokio::sync::Barrier;
use uuid::Uuid;

/// Which purchase path to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The single-writer engine with group commit.
    Engine,
    /// Load, decide, append with expected version, retry on conflict.
    Naive,
    /// Both, one after the other, each on a fresh database.
    Both,
}

/// Options of `ledger bench purchases`.
#[derive(Debug, Clone, clap::Args)]
pub struct PurchaseOptions {
    /// Backend to measure; each mode uses a fresh, empty database.
    #[arg(long, value_enum, default_value = "sqlite")]
    pub backend: BenchBackend,
    /// PostgreSQL server to create scratch databases on (`--backend postgres`).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Concurrent buyers.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub buyers: u64,
    /// The product's quota, in minor units.
    #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(i64).range(1..=1_000_000_000_000))]
    pub quota: i64,
    /// Every purchase's amount, in minor units.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=1_000_000_000))]
    pub amount: i64,
    /// Engine, naive, or both.
    #[arg(long, value_enum, default_value = "both")]
    pub mode: Mode,
    /// Most seconds a mode may sell for before it is stopped.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub seconds: u64,
    /// Purchases each buyer attempts after the sell-out (refused from memory).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub rejections_per_buyer: u64,
    /// Most purchases the engine's writer takes into one batch.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub batch_max: u64,
    /// Redis to run the seckill baseline on (a Lua check-and-decrement
    /// script called with EVALSHA over one multiplexed connection), in the
    /// same run at the same concurrency; without it the baseline is skipped.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Print one JSON object with the figures and checks instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One mode's figures and checks.
#[derive(Debug, Serialize)]
pub struct ModeReport {
    /// Which mode.
    pub mode: Mode,
    /// Purchases confirmed.
    pub confirmed_purchases: u64,
    /// Units confirmed.
    pub confirmed_amount: i64,
    /// Seconds from the first purchase to the sell-out (or the time limit).
    pub sale_seconds: f64,
    /// Whether the quota sold out within the time limit.
    pub sold_out: bool,
    /// Confirmed purchases per second during the sale.
    pub confirmed_per_second: f64,
    /// Latency of a purchase that was confirmed.
    pub purchase_latency: Latency,
    /// Refused purchases after the sell-out.
    pub rejections_after_sell_out: u64,
    /// Those per second.
    pub rejections_per_second: f64,
    /// Latency of such a refusal.
    pub rejection_latency: Latency,
    /// Purchases shed with `overloaded` (retried).
    pub overloaded: u64,
    /// Purchases refused for other reasons during the sale.
    pub other_refusals: u64,
    /// Appends refused for a stale expected version.
    pub conflicts: u64,
    /// What the audit of the log found.
    pub checks: Checks,
}

/// What the audit verified.
#[derive(Debug, Serialize)]
pub struct Checks {
    /// Events audited.
    pub events_audited: u64,
    /// Confirmed units in the log.
    pub confirmed_in_log: i64,
    /// Pending units in the log.
    pub pending_in_log: i64,
    /// Available units in the log (quota less reserved and not released).
    pub available_in_log: i64,
    /// The most units ever reserved and not released at once, summed by the
    /// oracle from the raw events.
    pub held_peak_in_log: i64,
    /// Never more reserved and not released than the quota, at any position
    /// (the independent oracle, `engine::oracle`).
    pub never_oversold: bool,
    /// The log's confirmed units equal the sum of successful purchases.
    pub confirmed_matches_successes: bool,
    /// Violations of the ledger's invariants (empty when all hold).
    pub violations: Vec<String>,
    /// All of the above.
    pub ok: bool,
}

/// The whole report (`--json` prints exactly this).
#[derive(Debug, Serialize)]
pub struct PurchaseReport {
    /// Always `purchases`.
    pub benchmark: &'static str,
    /// Backend measured.
    pub backend: BenchBackend,
    /// Backend configuration.
    pub setup: &'static str,
    /// Concurrent buyers.
    pub buyers: u64,
    /// Quota.
    pub quota: i64,
    /// Amount per purchase.
    pub amount: i64,
    /// Time limit per mode.
    pub seconds_limit: u64,
    /// Per-mode figures.
    pub modes: Vec<ModeReport>,
    /// Engine confirmed/s divided by naive confirmed/s, when both ran.
    pub engine_over_naive: Option<f64>,
    /// The Redis seckill baseline, when `--redis-url` was given.
    pub redis_baseline: Option<SeckillReport>,
    /// Why the baseline did not run, when it did not.
    pub redis_skipped: Option<&'static str>,
    /// Engine confirmed/s divided by the Redis baseline's, when both ran.
    pub engine_over_redis: Option<f64>,
}

/// Runs the benchmark and prints its report; fails if a check fails.
pub async fn run(options: PurchaseOptions) -> anyhow::Result<ExitCode> {
    if options.amount > options.quota {
        anyhow::bail!("--amount must be at most --quota");
    }
    let modes = match options.mode {
        Mode::Both => vec![Mode::Engine, Mode::Naive],
        one => vec![one],
    };
    let mut reports = Vec::new();
    let mut setup = "";
    for mode in modes {
        let database =
            BenchDatabase::create(options.backend, options.database_url.as_deref()).await?;
        setup = database.describe();
        let store = database.backend().open().await?;
        reports.push(run_mode(mode, store, &options).await?);
    }
    let rate = |mode| {
        reports
            .iter()
            .find(|r| r.mode == mode)
            .map(|r| r.confirmed_per_second)
    };
    let engine_over_naive = rate(Mode::Engine)
        .zip(rate(Mode::Naive))
        .map(|(e, n)| e / n.max(f64::MIN_POSITIVE));
    let (redis_baseline, redis_skipped) = match &options.redis_url {
        Some(url) => {
            let setup = SeckillSetup {
                clients: options.buyers,
                quota: options.quota,
                amount: options.amount,
                seconds_limit: options.seconds,
                rejections_per_client: options.rejections_per_buyer,
            };
            (Some(redis_seckill::run(url, &setup).await?), None)
        }
        None => (None, Some("no --redis-url given")),
    };
    let engine_over_redis = rate(Mode::Engine)
        .zip(redis_baseline.as_ref().map(|r| r.confirmed_per_second))
        .map(|(e, r)| e / r.max(f64::MIN_POSITIVE));
    let report = PurchaseReport {
        benchmark: "purchases",
        backend: options.backend,
        setup,
        buyers: options.buyers,
        quota: options.quota,
        amount: options.amount,
        seconds_limit: options.seconds,
        modes: reports,
        engine_over_naive,
        redis_baseline,
        redis_skipped,
        engine_over_redis,
    };
    if options.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    let ok = report.modes.iter().all(|m| m.checks.ok)
        && report.redis_baseline.as_ref().is_none_or(|r| r.checks.ok);
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn product_id() -> ProductId {
    ProductId::parse("bench-hot").expect("BUG: static id")
}

fn buyer(index: u64) -> AccountId {
    AccountId(Uuid::from_u128(u128::from(index) + 1))
}

/// Lists and opens the product, then opens and funds every buyer in batched appends.
async fn set_up(store: &Arc<dyn EventStore>, options: &PurchaseOptions) -> anyhow::Result<()> {
    let amount = Amount::new(options.amount)?;
    let terms = ProductTerms {
        name: "Bench hot product".into(),
        currency: Currency::CNY,
        quota: Amount::new(options.quota)?,
        min_purchase: Amount::new(1)?,
        max_purchase: amount,
        annual_rate_bps: 450,
        term_days: 90,
    };
    let product = [
        ProductEvent::ProductListed {
            product_id: product_id(),
            terms,
        },
        ProductEvent::SaleOpened {},
    ];
    let metadata = RequestContext::user("bench", "operator", None).metadata(None, None);
    store
        .append(
            &product_id().stream(),
            store::ExpectedVersion::NoStream,
            encode_all(&product, &metadata),
        )
        .await?;
    let funds = Amount::new(options.quota)?;
    let buyers: Vec<u64> = (0..options.buyers).collect();
    for chunk in buyers.chunks(1_000) {
        let appends = chunk
            .iter()
            .map(|&index| {
                let account_id = buyer(index);
                let events = [
                    AccountEvent::AccountOpened {
                        account_id,
                        currency: Currency::CNY,
                    },
                    AccountEvent::FundsDeposited {
                        account_id,
                        amount: funds,
                        reference: "bench-funding".into(),
                    },
                ];
                StreamAppend {
                    stream_id: account_id.stream(),
                    expected: store::ExpectedVersion::NoStream,
                    events: encode_all(&events, &metadata),
                }
            })
            .collect();
        store.append_batch(appends).await?;
    }
    Ok(())
}

/// What one buyer saw.
struct BuyerResult {
    confirmed: u64,
    overloaded: u64,
    other_refusals: u64,
    rejections: u64,
    purchase_latency: Histogram<u64>,
    rejection_latency: Histogram<u64>,
    conflicts: u64,
}

impl BuyerResult {
    fn new() -> BuyerResult {
        BuyerResult {
            confirmed: 0,
            overloaded: 0,
            other_refusals: 0,
            rejections: 0,
            purchase_latency: histogram(),
            rejection_latency: histogram(),
            conflicts: 0,
        }
    }
}

/// How one attempt ended, for either mode.
enum Attempt {
    Confirmed,
    SoldOut,
    Retry,
    Refused,
}

async fn run_mode(
    mode: Mode,
    store: Arc<dyn EventStore>,
    options: &PurchaseOptions,
) -> anyhow::Result<ModeReport> {
    set_up(&store, options).await?;
    let engine = Engine::new(
        store.clone(),
        Arc::new(SystemClock),
        EngineSettings::default(),
    );
    let expected_sales = u64::try_from(options.quota / options.amount)?;
    let bar = progress(
        expected_sales,
        format!("{mode:?} purchases").to_lowercase(),
        options.json,
    );
    let deadline = Instant::now() + Duration::from_secs(options.seconds);
    let sold_out = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicBool::new(false));
    let sale_ended_at = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(usize::try_from(options.buyers)?));
    let started = Instant::now();
    let tasks: Vec<_> = (0..options.buyers)
        .map(|index| {
            let (engine, store, bar, sold_out, ended, barrier) = (
                engine.clone(),
                store.clone(),
                bar.clone(),
                sold_out.clone(),
                sale_ended_at.clone(),
                barrier.clone(),
            );
            let (amount, rejections) = (Amount::new(options.amount), options.rejections_per_buyer);
            let failed = failed.clone();
            tokio::spawn(async move {
                let amount = amount?;
                let mut buyer_run = BuyerRun::new(mode, engine, store, buyer(index), amount);
                let mut result = BuyerResult::new();
                // Every buyer reaches the barrier, even after an error, so
                // one failure cannot leave the others waiting forever.
                let sale = sell(
                    &mut buyer_run,
                    &mut result,
                    deadline,
                    &sold_out,
                    &failed,
                    &bar,
                )
                .await;
                if sale.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                ended.fetch_max(
                    u64::try_from(started.elapsed().as_micros())?,
                    Ordering::Relaxed,
                );
                barrier.wait().await;
                sale?;
                for extra in 0..rejections {
                    if !sold_out.load(Ordering::Relaxed) {
                        break;
                    }
                    let call = Instant::now();
                    let far = call + Duration::from_secs(3600);
                    if let Attempt::SoldOut = buyer_run
                        .purchase(&format!("after-{extra}"), far, &mut result)
                        .await?
                    {
                        record(&mut result.rejection_latency, call.elapsed());
                        result.rejections += 1;
                    }
                }
                anyhow::Ok(result)
            })
        })
        .collect();
    let mut total = BuyerResult::new();
    let rejection_phase = Instant::now();
    for task in tasks {
        let result = task.await??;
        total.confirmed += result.confirmed;
        total.overloaded += result.overloaded;
        total.other_refusals += result.other_refusals;
        total.rejections += result.rejections;
        total.conflicts += result.conflicts;
        total.purchase_latency.add(&result.purchase_latency)?;
        total.rejection_latency.add(&result.rejection_latency)?;
    }
    bar.finish_and_clear();
    let sale_seconds = sale_ended_at.load(Ordering::Relaxed) as f64 / 1e6;
    let rejection_seconds = (rejection_phase.elapsed().as_secs_f64() - sale_seconds).max(1e-9);
    let stats = engine.stats();
    engine.halt();
    let checks = check(
        store.as_ref(),
        options.amount * i64::try_from(total.confirmed)?,
    )
    .await?;
    Ok(ModeReport {
        mode,
        confirmed_purchases: total.confirmed,
        confirmed_amount: options.amount * i64::try_from(total.confirmed)?,
        sale_seconds,
        sold_out: sold_out.load(Ordering::Relaxed),
        confirmed_per_second: total.confirmed as f64 / sale_seconds.max(1e-9),
        purchase_latency: Latency::of(&total.purchase_latency),
        rejections_after_sell_out: total.rejections,
        rejections_per_second: total.rejections as f64 / rejection_seconds,
        rejection_latency: Latency::of(&total.rejection_latency),
        overloaded: total.overloaded,
        other_refusals: total.other_refusals,
        conflicts: total.conflicts + stats.product_conflicts + stats.account_conflicts,
        checks,
    })
}

async fn check(store: &dyn EventStore, sold: i64) -> anyhow::Result<Checks> {
    let audit = engine::audit::audit(store).await?;
    let product_id = product_id();
    let oracle = &audit.oracle;
    let quota = oracle.quota(&product_id);
    anyhow::ensure!(quota > 0, "the product vanished");
    let confirmed = oracle.confirmed(&product_id);
    let held = oracle.held(&product_id);
    let held_peak = oracle.held_peak(&product_id);
    let never_oversold = held_peak <= quota;
    let violations = audit.settled_violations();
    let confirmed_matches_successes = confirmed == sold;
    Ok(Checks {
        events_audited: audit.events,
        confirmed_in_log: confirmed,
        pending_in_log: held - confirmed,
        available_in_log: quota - held,
        held_peak_in_log: held_peak,
        never_oversold,
        confirmed_matches_successes,
        ok: never_oversold && confirmed_matches_successes && violations.is_empty(),
        violations: violations
            .iter()
            .take(20)
            .map(ToString::to_string)
            .collect(),
    })
}

/// A buyer's sale phase: purchases until sold out, the deadline, or another
/// buyer's failure.
async fn sell(
    buyer_run: &mut BuyerRun,
    result: &mut BuyerResult,
    deadline: Instant,
    sold_out: &AtomicBool,
    failed: &AtomicBool,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<()> {
    let mut attempt = 0u64;
    while Instant::now() < deadline
        && !sold_out.load(Ordering::Relaxed)
        && !failed.load(Ordering::Relaxed)
    {
        let call = Instant::now();
        match buyer_run
            .purchase(&format!("sale-{attempt}"), deadline, result)
            .await?
        {
            Attempt::Confirmed => {
                record(&mut result.purchase_latency, call.elapsed());
                result.confirmed += 1;
                bar.inc(1);
            }
            Attempt::SoldOut => sold_out.store(true, Ordering::Relaxed),
            Attempt::Retry => {
                result.overloaded += 1;
                tokio::task::yield_now().await;
                continue;
            }
            Attempt::Refused => result.other_refusals += 1,
        }
        attempt += 1;
    }
    Ok(())
}

/// One buyer's way of purchasing in either mode.
struct BuyerRun {
    mode: Mode,
    engine: Engine,
    store: Arc<dyn EventStore>,
    account_id: AccountId,
    amount: Amount,
    product: Loaded<ProductState>,
    account: Loaded<AccountState>,
}

/// How many times a naive buyer retries one step before giving up on it.
const NAIVE_RETRIES_MAX: usize = 1_000_000;

impl BuyerRun {
    fn new(
        mode: Mode,
        engine: Engine,
        store: Arc<dyn EventStore>,
        account_id: AccountId,
        amount: Amount,
    ) -> BuyerRun {
        BuyerRun {
            mode,
            engine,
            store,
            account_id,
            amount,
            product: Loaded::default(),
            account: Loaded::default(),
        }
    }

    async fn purchase(
        &mut self,
        key: &str,
        deadline: Instant,
        result: &mut BuyerResult,
    ) -> anyhow::Result<Attempt> {
        match self.mode {
            Mode::Naive => self.naive_purchase(key, deadline, result).await,
            _ => Ok(self.engine_purchase(key).await),
        }
    }

    async fn engine_purchase(&self, key: &str) -> Attempt {
        let request = PurchaseRequest {
            product_id: product_id(),
            account_id: self.account_id,
            amount: self.amount,
            idempotency_key: key.to_owned(),
            context: RequestContext::user(self.account_id.to_string(), "customer", None),
        };
        match self.engine.purchase(request).await {
            Ok(_) => Attempt::Confirmed,
            Err(PurchaseError::SoldOut) => Attempt::SoldOut,
            Err(PurchaseError::Overloaded) => Attempt::Retry,
            Err(_) => Attempt::Refused,
        }
    }

    /// Reserve, debit, confirm, each by loading the stream (caught up from
    /// the last version seen) and appending with the expected version.
    async fn naive_purchase(
        &mut self,
        key: &str,
        deadline: Instant,
        result: &mut BuyerResult,
    ) -> anyhow::Result<Attempt> {
        let order_id = order_id_for(&product_id(), self.account_id, key);
        let now = Utc::now();
        let reserve = ProductCommand::Purchase {
            order_id,
            account_id: self.account_id,
            amount: self.amount,
            expires_at: now + Span::seconds(30),
        };
        let Some(events) = self.naive_product_step(&reserve, deadline, result).await? else {
            return Ok(Attempt::Refused);
        };
        match events.first() {
            Some(ProductEvent::QuotaReserved { .. }) => {}
            Some(ProductEvent::PurchaseRefused {
                reason: domain::product::RefusalReason::SoldOut,
                ..
            }) => return Ok(Attempt::SoldOut),
            _ => return Ok(Attempt::Refused),
        }
        let stream = self.account_id.stream();
        self.account
            .catch_up::<CustomerAccount>(self.store.as_ref(), &stream)
            .await?;
        let debit = AccountCommand::DebitForPurchase {
            order_id,
            product_id: product_id(),
            amount: self.amount,
            reservation_expires_at: now + Span::seconds(30),
            currency: domain::Currency::CNY,
        };
        let debited = match CustomerAccount::decide(&self.account.state, &debit, Utc::now()) {
            Ok(events) => events,
            Err(refusal) => {
                // Too slow to pay (the reservation expired while retrying):
                // give the quota back, as a careful client would.
                let reason = match refusal {
                    AccountRejection::ReservationExpired(_) => ReleaseReason::Expired,
                    AccountRejection::InsufficientFunds { .. } => ReleaseReason::InsufficientFunds,
                    _ => ReleaseReason::PaymentFailed,
                };
                let far = Instant::now() + Duration::from_secs(3600);
                let release = ProductCommand::Release { order_id, reason };
                self.naive_product_step(&release, far, result).await?;
                return Ok(Attempt::Refused);
            }
        };
        let metadata = Metadata {
            correlation_id: Some(order_id.0),
            ..Metadata::default()
        };
        let encoded = encode_all(&debited, &metadata);
        for _ in 0..NAIVE_RETRIES_MAX {
            let expected = expected_after(self.account.version);
            match self.store.append(&stream, expected, encoded.clone()).await {
                Ok(_) => break,
                Err(error) if error.is_transient() => tokio::task::yield_now().await,
                Err(error) => return Err(error.into()),
            }
        }
        let far = Instant::now() + Duration::from_secs(3600);
        self.naive_product_step(&ProductCommand::Confirm { order_id }, far, result)
            .await?
            .ok_or_else(|| anyhow::anyhow!("a naive confirmation did not finish"))?;
        Ok(Attempt::Confirmed)
    }

    /// `None` when the deadline passed first.
    async fn naive_product_step(
        &mut self,
        command: &ProductCommand,
        deadline: Instant,
        result: &mut BuyerResult,
    ) -> anyhow::Result<Option<Vec<ProductEvent>>> {
        let stream = product_id().stream();
        for _ in 0..NAIVE_RETRIES_MAX {
            if Instant::now() >= deadline {
                return Ok(None);
            }
            self.product
                .catch_up::<ProductSale>(self.store.as_ref(), &stream)
                .await?;
            let events = ProductSale::decide(&self.product.state, command, Utc::now())?;
            let encoded = events
                .iter()
                .map(|e| codec::encode(e, Uuid::now_v7(), Metadata::default()))
                .collect();
            match self
                .store
                .append(&stream, expected_after(self.product.version), encoded)
                .await
            {
                Ok(_) => return Ok(Some(events)),
                Err(StoreError::Conflict(_)) => {
                    result.conflicts += 1;
                    tokio::task::yield_now().await;
                }
                // A busy pool or database: retry, as a client library would.
                Err(error) if error.is_transient() => tokio::task::yield_now().await,
                Err(error) => return Err(error.into()),
            }
        }
        anyhow::bail!("a naive buyer conflicted {NAIVE_RETRIES_MAX} times in a row")
    }
}

fn print_table(report: &PurchaseReport) {
    println!("ledger bench purchases: backend {}", report.setup);
    println!(
        "one hot product, quota {}, {} per purchase, {} concurrent buyers in-process, at most {} s per mode; {} cores",
        report.quota,
        report.amount,
        report.buyers,
        report.seconds_limit,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<7} {:>10} {:>8} {:>9} {:>12} {:>8} {:>8} {:>12} {:>8} {:>10} {:>10}",
        "mode",
        "confirmed",
        "sold out",
        "seconds",
        "confirmed/s",
        "p50 ms",
        "p99 ms",
        "rejected/s",
        "p99 ms",
        "conflicts",
        "overloaded"
    );
    for m in &report.modes {
        println!(
            "{:<7} {:>10} {:>8} {:>9.2} {:>12.0} {:>8.2} {:>8.2} {:>12.0} {:>8.3} {:>10} {:>10}",
            format!("{:?}", m.mode).to_lowercase(),
            m.confirmed_purchases,
            m.sold_out,
            m.sale_seconds,
            m.confirmed_per_second,
            m.purchase_latency.p50_ms,
            m.purchase_latency.p99_ms,
            m.rejections_per_second,
            m.rejection_latency.p99_ms,
            m.conflicts,
            m.overloaded
        );
    }
    if let Some(redis) = &report.redis_baseline {
        println!(
            "{:<7} {:>10} {:>8} {:>9.2} {:>12.0} {:>8.2} {:>8.2} {:>12.0} {:>8} {:>10} {:>10}",
            "redis",
            redis.confirmed_purchases,
            redis.sold_out,
            redis.sale_seconds,
            redis.confirmed_per_second,
            redis.purchase_latency.p50_ms,
            redis.purchase_latency.p99_ms,
            redis.rejections_per_second,
            "-",
            "-",
            "-"
        );
    }
    if let Some(ratio) = report.engine_over_naive {
        println!("engine / naive confirmed purchases per second: {ratio:.1}x");
    }
    match (&report.redis_baseline, report.engine_over_redis) {
        (Some(redis), ratio) => {
            println!(
                "redis baseline: Lua check-and-decrement with per-buyer dedupe (sha1 {}), {}, {} concurrent callers, a new buyer per purchase; not durable unless the server is",
                redis.script_sha1, redis.client, redis.clients
            );
            if let Some(ratio) = ratio {
                println!("engine / redis confirmed purchases per second: {ratio:.2}x");
            }
        }
        (None, _) => println!(
            "redis baseline: skipped ({})",
            report.redis_skipped.unwrap_or("not run")
        ),
    }
    for m in &report.modes {
        let c = &m.checks;
        println!(
            "checks ({:?}): {} events audited; confirmed {}, pending {}, available {}; peak reserved {}, never oversold: {}; confirmed = successes: {}; violations: {} => {}",
            m.mode,
            c.events_audited,
            c.confirmed_in_log,
            c.pending_in_log,
            c.available_in_log,
            c.held_peak_in_log,
            c.never_oversold,
            c.confirmed_matches_successes,
            c.violations.len(),
            if c.ok { "ok" } else { "FAILED" }
        );
        for violation in &c.violations {
            println!("  violation: {violation}");
        }
    }
    if let Some(redis) = &report.redis_baseline {
        let c = &redis.checks;
        println!(
            "checks (Redis): stock left {}, units sold {}, buyers in the set {} (sold answers {}); stock never negative: {}; exactly the quota sold: {}; sold = buyers: {}; no buyer twice ({} of {} repeats refused): {} => {}",
            c.stock_left,
            c.sold_units,
            c.buyers_in_set,
            redis.confirmed_purchases,
            c.stock_not_negative,
            c.exactly_quota_sold,
            c.sold_matches_buyers,
            redis.duplicates_refused,
            redis.duplicates_sent,
            c.no_buyer_twice,
            if c.ok { "ok" } else { "FAILED" }
        );
    }
}
