//! `ledger bench payouts`: payday at scale. Sets up N holders of one
//! product (written straight into the log with the deciders, as the engine
//! would have written them), closes the sale, schedules the term's interest
//! and pays every holder through `ledger fake-gateway` started in this
//! process on loopback, with its latency and, on demand, its lies. The
//! node is a whole `ledger serve` minus the HTTP listener: the engine, the
//! projections and the payout workers with their concurrency and rate.
//!
//! Afterwards the gateway's own record is checked against the log: exactly
//! one payment per payout, for the payout's amount and holder, every holder
//! paid and credited exactly once what its principal earns, nothing paid
//! that the ledger does not know; and the log's own invariants hold.

use super::{BenchBackend, BenchDatabase, Latency, histogram, progress, record};
use crate::gateway::HttpProvider;
use crate::gateway::fake::{FakeGatewayOptions, GatewayHandle, Payment};
use crate::server::{Limits, Server};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::account::{AccountCommand, AccountEvent, CustomerAccount};
use domain::payout::{Payout, PayoutEvent, PayoutKind, PayoutState, PayoutStatus, interest_for};
use domain::product::{ProductCommand, ProductSale, ProductTerms};
use domain::{AccountId, Amount, Currency, Decider, EventType, OrderId, PayoutId, ProductId};
use engine::aggregate::{encode_all, expected_after};
use engine::payouts::{
    LookupOutcome, Pacer, PaymentOutcome, PaymentProvider, PaymentRequest, ScheduleRequest,
    WorkerSettings,
};
use engine::{EngineSettings, RequestContext};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use store::{EventStore, ExpectedVersion, StreamAppend, codec};
use uuid::Uuid;

/// The product paying.
const PRODUCT: &str = "payday";
/// Its rate.
const RATE_BPS: u32 = 500;
/// Its term, all of it paid as interest in one run.
const TERM_DAYS: u32 = 90;
/// Holders written per setup append (five events each).
const SETUP_HOLDERS_PER_APPEND: usize = 2_000;
/// How often the benchmark looks whether every payout is done.
const POLL_PERIOD: Duration = Duration::from_millis(200);
/// The target: 100,000 holders in 5 minutes.
const TARGET_PAYOUTS_PER_SECOND: f64 = 100_000.0 / 300.0;
/// Longest wait for the read models to catch up with the setup.
const PROJECTION_WAIT_MAX: Duration = Duration::from_secs(600);

/// Options of `ledger bench payouts`.
#[derive(Debug, Clone, clap::Args)]
pub struct PayoutBenchOptions {
    /// Backend to measure; each run uses a fresh, empty database.
    #[arg(long, value_enum, default_value = "sqlite")]
    pub backend: BenchBackend,
    /// PostgreSQL server to create the scratch database on (`--backend postgres`).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Holders of the product, each paid its interest once.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub holders: u64,
    /// The gateway's delay before every answer, in milliseconds.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub gateway_latency_ms: u64,
    /// Provider calls in flight at once on the node (`--payout-concurrency`).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=engine::payouts::CONCURRENCY_MAX as i64))]
    pub concurrency: u32,
    /// Provider calls per second at most (`--payout-rate-limit`; 0: none).
    #[arg(long, default_value_t = 1_000)]
    pub rate_limit: u32,
    /// Nodes paying: engines on the one log, each with its own workers,
    /// concurrency and rate limit (the first also runs the projections).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub nodes: u32,
    /// Payout workers on each node (`--payout-workers`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub workers: u32,
    /// How long a provider call may take (`--gateway-timeout`), in ms.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub gateway_timeout_ms: u64,
    /// How long a claim holds (`--payout-lease`), in ms; above the timeout.
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(2..=3_600_000))]
    pub lease_ms: u64,
    /// The gateway's lie: share of calls that hang, then 504 without paying.
    #[arg(long, default_value_t = 0.0, value_parser = crate::gateway::fake::rate)]
    pub timeout_rate: f64,
    /// The gateway's lie: share of calls that hang, pay, then 504.
    #[arg(long, default_value_t = 0.0, value_parser = crate::gateway::fake::rate)]
    pub late_pay_rate: f64,
    /// The gateway's lie: share of calls that pay, then answer 500.
    #[arg(long, default_value_t = 0.0, value_parser = crate::gateway::fake::rate)]
    pub error_after_pay_rate: f64,
    /// Share of calls the gateway refuses definitively (422).
    #[arg(long, default_value_t = 0.0, value_parser = crate::gateway::fake::rate)]
    pub fail_rate: f64,
    /// How long the gateway's hanging calls hang, in ms.
    #[arg(long, default_value_t = 10_000)]
    pub hang_ms: u64,
    /// The gateway's own rate limit (429 beyond it; 0: none).
    #[arg(long, default_value_t = 0)]
    pub gateway_rate_limit: u32,
    /// Seed of the gateway's faults.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Most seconds to wait for every payout before giving up.
    #[arg(long, default_value_t = 1_800, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub seconds: u64,
    /// Print one JSON object with the figures and checks instead of text.
    #[arg(long)]
    pub json: bool,
}

impl PayoutBenchOptions {
    fn gateway(&self, listen: std::net::SocketAddr) -> FakeGatewayOptions {
        FakeGatewayOptions {
            listen,
            latency_ms: self.gateway_latency_ms,
            timeout_rate: self.timeout_rate,
            late_pay_rate: self.late_pay_rate,
            error_after_pay_rate: self.error_after_pay_rate,
            fail_rate: self.fail_rate,
            hang_ms: self.hang_ms,
            seed: self.seed,
            rate_limit: self.gateway_rate_limit,
        }
    }
}

/// What was checked against the gateway's record and the log.
#[derive(Debug, Default, Serialize)]
pub struct PayoutChecks {
    /// Payouts in the log (one per holder).
    pub payouts_scheduled: u64,
    /// Of them succeeded.
    pub payouts_succeeded: u64,
    /// Of them refused definitively (the gateway's `--fail-rate`).
    pub payouts_failed: u64,
    /// Every payout is final (succeeded or failed): nothing left open.
    pub every_payout_final: bool,
    /// Each payout's amount is what its holder's principal earns.
    pub amounts_owed: bool,
    /// The gateway paid each succeeded payout exactly once and no failed
    /// one, and nothing under a key the ledger does not know.
    pub one_payment_per_payout: bool,
    /// The gateway paid each payout's amount to its holder.
    pub payments_match_payouts: bool,
    /// Each paid holder credited exactly once, with the payout's amount.
    pub every_holder_credited_once: bool,
    /// Successful payments in the gateway's record.
    pub gateway_payments: u64,
    /// Broken ledger invariants (postings, balances, quota).
    pub ledger_violations: Vec<String>,
    /// All of the above.
    pub ok: bool,
}

/// The report (`--json` prints exactly this).
#[derive(Debug, Serialize)]
pub struct PayoutBenchReport {
    /// Always `payouts`.
    pub benchmark: &'static str,
    /// Backend measured.
    pub backend: BenchBackend,
    /// Backend configuration.
    pub setup: &'static str,
    /// Holders paid.
    pub holders: u64,
    /// The gateway's latency.
    pub gateway_latency_ms: u64,
    /// Calls in flight allowed on the node.
    pub concurrency: u32,
    /// Calls per second allowed (0: none).
    pub rate_limit: u32,
    /// Nodes paying.
    pub nodes: u32,
    /// Payout workers per node.
    pub workers: u32,
    /// Attempts claimed by each node's workers (the work spread).
    pub attempts_by_node: std::collections::BTreeMap<String, u64>,
    /// The gateway's lies and limit.
    pub gateway: serde_json::Value,
    /// Seconds writing the holders into the log.
    pub setup_seconds: f64,
    /// Seconds for the read models to catch up with the setup.
    pub projection_catch_up_seconds: f64,
    /// Seconds of the scheduling call.
    pub schedule_seconds: f64,
    /// Seconds from the end of scheduling to the last payout recorded
    /// succeeded (the workers start at the end of scheduling).
    pub time_to_last_payout_seconds: f64,
    /// Seconds from the end of scheduling to the last credit.
    pub time_to_last_credit_seconds: f64,
    /// Payouts succeeded per second over that time.
    pub payouts_per_second: f64,
    /// The target (100,000 in 5 minutes).
    pub target_payouts_per_second: f64,
    /// Whether the target was met.
    pub target_met: bool,
    /// Most calls in progress at once at the gateway.
    pub peak_concurrent_calls: u64,
    /// Calls the gateway received (payments and lookups).
    pub gateway_calls: u64,
    /// Calls it answered 429.
    pub gateway_throttled: u64,
    /// Latency of payment calls as the workers saw them.
    pub payment_call_latency: Latency,
    /// `payout_attempted` events.
    pub attempts: u64,
    /// `payout_outcome_unknown` events.
    pub unknown_outcomes: u64,
    /// `payout_reconciled` events (lookups recorded).
    pub reconciliations: u64,
    /// Every payout finished within `--seconds`.
    pub completed: bool,
    /// The checks.
    pub checks: PayoutChecks,
}

/// Runs the benchmark and prints its report; fails if a check fails.
pub async fn run(options: PayoutBenchOptions) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        options.lease_ms > options.gateway_timeout_ms,
        "--lease-ms must be longer than --gateway-timeout-ms"
    );
    let database = BenchDatabase::create(options.backend, options.database_url.as_deref()).await?;
    let backend = database.backend();
    let mut server = Server::start(&backend, Limits::default(), EngineSettings::default()).await?;
    let store = server.state.store.clone();
    if !options.json {
        print_setup(&options, database.describe());
    }
    let started = Instant::now();
    let holders = set_up(store.as_ref(), &options).await?;
    let setup_seconds = started.elapsed().as_secs_f64();
    let caught_up = Instant::now();
    wait_for_projections(&server, options.json).await?;
    let projection_catch_up_seconds = caught_up.elapsed().as_secs_f64();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (gateway_task, gateway) =
        crate::gateway::fake::spawn_observed(options.gateway(address), listener);
    let scheduling = Instant::now();
    let request = ScheduleRequest {
        product_id: ProductId::parse(PRODUCT).expect("BUG: static id"),
        period: "payday".into(),
        kind: PayoutKind::Interest,
        days: Some(TERM_DAYS),
        context: RequestContext::user("bench", "operator", None),
    };
    let scheduled = engine::payouts::schedule(store.as_ref(), &request).await?;
    let schedule_seconds = scheduling.elapsed().as_secs_f64();
    let scheduled_at = Utc::now();
    let timed = Arc::new(TimedProvider::new(HttpProvider::new(
        &format!("http://{address}"),
        Duration::from_millis(options.gateway_timeout_ms),
    )?));
    server.start_payout_workers(timed.clone(), options.workers, worker_settings(&options, 0));
    let (stop_nodes, stopping) = tokio::sync::watch::channel(false);
    let mut nodes = tokio::task::JoinSet::new();
    for node in 1..options.nodes {
        start_node(&mut nodes, &store, timed.clone(), &options, node, &stopping);
    }
    let completed =
        wait_until_paid(&server, &gateway, scheduled.scheduled as u64, &options).await?;
    server.kill_payout_workers();
    stop_nodes.send_replace(true);
    nodes.abort_all();
    let facts = LogFacts::read(store.as_ref()).await?;
    let checks = check(store.as_ref(), &facts, &gateway.payments(), &holders).await?;
    gateway_task.abort();
    server.stop().await;

    let seconds_after = |at: Option<DateTime<Utc>>| {
        at.map_or(0.0, |at| (at - scheduled_at).as_seconds_f64().max(0.0))
    };
    let time_to_last_payout_seconds = seconds_after(facts.last_success);
    let payouts_per_second =
        checks.payouts_succeeded as f64 / time_to_last_payout_seconds.max(1e-9);
    let report = PayoutBenchReport {
        benchmark: "payouts",
        backend: options.backend,
        setup: database.describe(),
        holders: options.holders,
        gateway_latency_ms: options.gateway_latency_ms,
        concurrency: options.concurrency,
        rate_limit: options.rate_limit,
        nodes: options.nodes,
        workers: options.workers,
        attempts_by_node: facts.attempts_by_node.clone(),
        gateway: serde_json::json!({
            "timeout_rate": options.timeout_rate,
            "late_pay_rate": options.late_pay_rate,
            "error_after_pay_rate": options.error_after_pay_rate,
            "fail_rate": options.fail_rate,
            "hang_ms": options.hang_ms,
            "rate_limit": options.gateway_rate_limit,
        }),
        setup_seconds,
        projection_catch_up_seconds,
        schedule_seconds,
        time_to_last_payout_seconds,
        time_to_last_credit_seconds: seconds_after(facts.last_credit),
        payouts_per_second,
        target_payouts_per_second: TARGET_PAYOUTS_PER_SECOND,
        target_met: completed && payouts_per_second >= TARGET_PAYOUTS_PER_SECOND,
        peak_concurrent_calls: gateway.calls.peak_in_flight(),
        gateway_calls: gateway.calls.calls(),
        gateway_throttled: gateway.calls.throttled(),
        payment_call_latency: Latency::of(&timed.latency.lock().expect("BUG: poisoned")),
        attempts: facts.attempts,
        unknown_outcomes: facts.unknown_outcomes,
        reconciliations: facts.reconciliations,
        completed,
        checks,
    };
    if options.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(if report.completed && report.checks.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Starts another node's payout workers: an engine of its own on the same
/// log, its own pacer and concurrency.
fn start_node(
    tasks: &mut tokio::task::JoinSet<()>,
    store: &Arc<dyn EventStore>,
    provider: Arc<TimedProvider>,
    options: &PayoutBenchOptions,
    node: u32,
    stop: &tokio::sync::watch::Receiver<bool>,
) {
    let engine = engine::Engine::new(
        store.clone(),
        Arc::new(engine::SystemClock),
        EngineSettings::default(),
    );
    let settings = worker_settings(options, node);
    let count = options.workers;
    let concurrency = settings.concurrency.div_ceil(count as usize).max(1);
    for index in 0..count {
        let worker = engine::payouts::PayoutWorker::new(
            store.clone(),
            engine.clone(),
            provider.clone(),
            Arc::new(engine::SystemClock),
            WorkerSettings {
                name: format!("{}-{index}", settings.name),
                concurrency,
                partition: engine::payouts::Partition { index, count },
                ..settings.clone()
            },
        );
        tasks.spawn(worker.run(stop.clone()));
    }
}

fn worker_settings(options: &PayoutBenchOptions, node: u32) -> WorkerSettings {
    let timeout = chrono::Duration::milliseconds(options.gateway_timeout_ms as i64);
    WorkerSettings {
        name: format!("bench-node{node}"),
        lease: chrono::Duration::milliseconds(options.lease_ms as i64),
        call_timeout: timeout,
        retry_pause: chrono::Duration::milliseconds(200),
        concurrency: options.concurrency as usize,
        pacer: Arc::new(Pacer::new(NonZeroU32::new(options.rate_limit))),
        ..WorkerSettings::default()
    }
}

/// Each holder's principal: 100.00 to 1,099.00, so interest amounts vary.
fn principal_of(index: u64) -> Amount {
    Amount::new(10_000 + (index % 1_000) as i64 * 1_000).expect("BUG: a positive amount")
}

/// Decides a command and folds its events into the state.
fn decide_into<D: Decider>(
    state: &mut D::State,
    command: &D::Command,
    now: DateTime<Utc>,
) -> anyhow::Result<Vec<D::Event>> {
    let events = D::decide(state, command, now).map_err(|r| anyhow::anyhow!("{r}"))?;
    for event in &events {
        *state = D::evolve(std::mem::take(state), event);
    }
    Ok(events)
}

/// Lists and opens the product, writes each holder's account (opened,
/// funded, debited) and confirmed order, then closes the sale: the events
/// the engine would write, decided by the same deciders, in batched appends.
async fn set_up(
    store: &dyn EventStore,
    options: &PayoutBenchOptions,
) -> anyhow::Result<Vec<(AccountId, Amount)>> {
    let product_id = ProductId::parse(PRODUCT).expect("BUG: static id");
    let context = RequestContext::user("bench", "operator", None);
    let now = Utc::now();
    let expires_at = now + chrono::Duration::hours(1);
    let quota: i64 = (0..options.holders).map(|i| principal_of(i).minor()).sum();
    let terms = ProductTerms {
        name: "Payday bench product".into(),
        currency: Currency::CNY,
        quota: Amount::new(quota)?,
        min_purchase: Amount::new(1)?,
        max_purchase: Amount::new(quota)?,
        annual_rate_bps: RATE_BPS,
        term_days: TERM_DAYS,
    };
    let mut product = Default::default();
    let mut product_version = 0;
    let mut opening = decide_into::<ProductSale>(
        &mut product,
        &ProductCommand::List {
            product_id: product_id.clone(),
            terms,
        },
        now,
    )?;
    opening.extend(decide_into::<ProductSale>(
        &mut product,
        &ProductCommand::Open,
        now,
    )?);
    let metadata = context.metadata(None, None);
    store
        .append(
            &product_id.stream(),
            ExpectedVersion::NoStream,
            encode_all(&opening, &metadata),
        )
        .await?;
    product_version += opening.len() as i64;
    let bar = progress(options.holders, "writing holders".into(), options.json);
    let indexes: Vec<u64> = (0..options.holders).collect();
    let mut holders = Vec::with_capacity(indexes.len());
    for chunk in indexes.chunks(SETUP_HOLDERS_PER_APPEND) {
        // As the engine writes a purchase: the reservation, then the
        // buyer's debit (one transaction), then the confirmation.
        let mut reserved = Vec::new();
        let mut confirmed = Vec::new();
        let mut appends = Vec::new();
        for &index in chunk {
            let account_id = AccountId(Uuid::now_v7());
            let order_id = OrderId(Uuid::now_v7());
            let amount = principal_of(index);
            let order = context.metadata(Some(order_id.0), None);
            let reserve = ProductCommand::Purchase {
                order_id,
                account_id,
                amount,
                expires_at,
            };
            let events = decide_into::<ProductSale>(&mut product, &reserve, now)?;
            reserved.extend(encode_all(&events, &order));
            let confirm = ProductCommand::Confirm { order_id };
            let events = decide_into::<ProductSale>(&mut product, &confirm, now)?;
            confirmed.extend(encode_all(&events, &order));
            appends.push(account_append(
                &context, index, account_id, order_id, amount,
            )?);
            holders.push((account_id, amount));
        }
        let written = reserved.len() as i64;
        appends.insert(
            0,
            StreamAppend {
                stream_id: product_id.stream(),
                expected: expected_after(product_version),
                events: reserved,
            },
        );
        store.append_batch(appends).await?;
        product_version += written;
        let written = confirmed.len() as i64;
        store
            .append(
                &product_id.stream(),
                expected_after(product_version),
                confirmed,
            )
            .await?;
        product_version += written;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let closing = decide_into::<ProductSale>(&mut product, &ProductCommand::Close, now)?;
    store
        .append(
            &product_id.stream(),
            expected_after(product_version),
            encode_all(&closing, &metadata),
        )
        .await?;
    Ok(holders)
}

/// A holder's account: opened, funded with its principal, debited for its
/// order.
fn account_append(
    context: &RequestContext,
    index: u64,
    account_id: AccountId,
    order_id: OrderId,
    amount: Amount,
) -> anyhow::Result<StreamAppend> {
    let now = Utc::now();
    let mut account = Default::default();
    let mut opened = Vec::new();
    for command in [
        AccountCommand::Open {
            account_id,
            currency: Currency::CNY,
        },
        AccountCommand::Deposit {
            amount,
            reference: format!("bench-{index}"),
        },
    ] {
        opened.extend(decide_into::<CustomerAccount>(&mut account, &command, now)?);
    }
    let debit = AccountCommand::DebitForPurchase {
        order_id,
        product_id: ProductId::parse(PRODUCT).expect("BUG: static id"),
        amount,
        reservation_expires_at: now + chrono::Duration::hours(1),
        currency: Currency::CNY,
    };
    let debited = decide_into::<CustomerAccount>(&mut account, &debit, now)?;
    let mut events = encode_all(&opened, &context.metadata(None, None));
    events.extend(encode_all(
        &debited,
        &context.metadata(Some(order_id.0), None),
    ));
    Ok(StreamAppend {
        stream_id: account_id.stream(),
        expected: ExpectedVersion::NoStream,
        events,
    })
}

/// Waits until every projection reached the log's head.
async fn wait_for_projections(server: &Server, quiet: bool) -> anyhow::Result<()> {
    let head = server.state.store.head().await?;
    let bar = progress(head as u64, "projecting setup".into(), quiet);
    let deadline = Instant::now() + PROJECTION_WAIT_MAX;
    loop {
        let reports = server.state.statuses.report();
        let position = reports.iter().map(|r| r.position).min().unwrap_or(0);
        bar.set_position(position.max(0) as u64);
        if position >= head {
            bar.finish_and_clear();
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the read models did not catch up with the setup"
        );
        tokio::time::sleep(POLL_PERIOD).await;
    }
}

/// Waits until the engine's payout index has nothing left (every payout
/// final and credited), or `--seconds` passed; true if it finished.
async fn wait_until_paid(
    server: &Server,
    gateway: &GatewayHandle,
    payouts: u64,
    options: &PayoutBenchOptions,
) -> anyhow::Result<bool> {
    let bar = progress(payouts, "paying holders".into(), options.json);
    let deadline = Instant::now() + Duration::from_secs(options.seconds);
    let index = server.state.engine.payout_index();
    loop {
        tokio::time::sleep(POLL_PERIOD).await;
        bar.set_position(gateway.calls.paid().min(payouts));
        let done = {
            let mut index = index.lock().await;
            index.catch_up(server.state.store.as_ref()).await?;
            index.is_empty()
        };
        if done {
            bar.finish_and_clear();
            return Ok(true);
        }
        if Instant::now() >= deadline {
            bar.abandon();
            return Ok(false);
        }
    }
}

/// What the log says about the payouts.
#[derive(Default)]
struct LogFacts {
    payouts: HashMap<PayoutId, PayoutState>,
    credits: HashMap<PayoutId, Vec<(AccountId, Amount)>>,
    last_success: Option<DateTime<Utc>>,
    last_credit: Option<DateTime<Utc>>,
    attempts: u64,
    attempts_by_node: std::collections::BTreeMap<String, u64>,
    unknown_outcomes: u64,
    reconciliations: u64,
}

impl LogFacts {
    async fn read(store: &dyn EventStore) -> anyhow::Result<LogFacts> {
        let mut facts = LogFacts::default();
        let mut after = 0;
        loop {
            let page = store.read_all(after, store::port::READ_LIMIT_MAX).await?;
            let Some(last) = page.last() else {
                return Ok(facts);
            };
            after = last.position;
            for recorded in &page {
                let at = Some(recorded.recorded_at);
                if let Some(id) = recorded.stream_id.strip_prefix("payout-") {
                    let payout_id = PayoutId(Uuid::parse_str(id)?);
                    let event: PayoutEvent = codec::decode(recorded)?;
                    match &event {
                        PayoutEvent::PayoutAttempted { .. } => {
                            facts.attempts += 1;
                            // Workers are named `bench-node{N}-{index}`.
                            let actor = recorded.metadata.actor_id.as_deref().unwrap_or("");
                            let node = actor.rsplit_once('-').map_or(actor, |(node, _)| node);
                            *facts.attempts_by_node.entry(node.to_owned()).or_default() += 1;
                        }
                        PayoutEvent::PayoutOutcomeUnknown { .. } => facts.unknown_outcomes += 1,
                        PayoutEvent::PayoutReconciled { .. } => facts.reconciliations += 1,
                        _ => {}
                    }
                    let state = facts.payouts.remove(&payout_id).unwrap_or_default();
                    let state = Payout::evolve(state, &event);
                    let succeeded = state
                        .payout
                        .as_ref()
                        .is_some_and(|p| p.status == PayoutStatus::Succeeded);
                    if succeeded && event.event_type() != "payout_scheduled" {
                        facts.last_success = facts.last_success.max(at);
                    }
                    facts.payouts.insert(payout_id, state);
                } else if recorded.event_type == "payout_credited" {
                    let event: AccountEvent = codec::decode(recorded)?;
                    if let AccountEvent::PayoutCredited {
                        account_id,
                        payout_id,
                        amount,
                        ..
                    } = event
                    {
                        facts
                            .credits
                            .entry(payout_id)
                            .or_default()
                            .push((account_id, amount));
                        facts.last_credit = facts.last_credit.max(at);
                    }
                }
            }
        }
    }
}

/// The gateway's record against the log, and the ledger's invariants.
async fn check(
    store: &dyn EventStore,
    facts: &LogFacts,
    payments: &[Payment],
    holders: &[(AccountId, Amount)],
) -> anyhow::Result<PayoutChecks> {
    let mut checks = PayoutChecks {
        payouts_scheduled: facts.payouts.len() as u64,
        every_payout_final: true,
        amounts_owed: facts.payouts.len() == holders.len(),
        one_payment_per_payout: true,
        payments_match_payouts: true,
        every_holder_credited_once: true,
        ..PayoutChecks::default()
    };
    let principal: HashMap<AccountId, Amount> = holders.iter().copied().collect();
    let mut paid: HashMap<&str, Vec<&Payment>> = HashMap::new();
    for payment in payments.iter().filter(|p| p.status == "succeeded") {
        checks.gateway_payments += 1;
        paid.entry(payment.idempotency_key.as_str())
            .or_default()
            .push(payment);
    }
    let mut keys_known = 0;
    let mut holders_paid: HashMap<AccountId, u32> = HashMap::new();
    for (payout_id, state) in &facts.payouts {
        let payout = state
            .payout
            .as_ref()
            .expect("BUG: folded from its scheduling");
        let owed = principal
            .get(&payout.account_id)
            .map(|p| interest_for(*p, RATE_BPS, TERM_DAYS).0);
        checks.amounts_owed &= owed == Some(payout.amount);
        let key = payout.idempotency_key();
        let payments = paid.get(key.as_str()).map_or(&[][..], |p| p.as_slice());
        keys_known += usize::from(!payments.is_empty());
        let credits = facts
            .credits
            .get(payout_id)
            .map_or(&[][..], |c| c.as_slice());
        match payout.status {
            PayoutStatus::Succeeded => {
                checks.payouts_succeeded += 1;
                checks.one_payment_per_payout &= payments.len() == 1;
                checks.payments_match_payouts &= payments.iter().all(|p| {
                    p.amount == payout.amount.minor()
                        && p.account_id == payout.account_id.to_string()
                });
                checks.every_holder_credited_once &=
                    credits == [(payout.account_id, payout.amount)];
                *holders_paid.entry(payout.account_id).or_default() += 1;
            }
            PayoutStatus::Failed => {
                checks.payouts_failed += 1;
                checks.one_payment_per_payout &= payments.is_empty();
                checks.every_holder_credited_once &= credits.is_empty();
            }
            _ => checks.every_payout_final = false,
        }
    }
    // Nothing paid under a key the ledger does not know.
    checks.one_payment_per_payout &= keys_known == paid.len();
    checks.every_holder_credited_once &= holders_paid.values().all(|n| *n == 1);
    let audit = engine::audit::audit(store).await?;
    checks.ledger_violations = audit
        .settled_violations()
        .iter()
        .take(20)
        .map(ToString::to_string)
        .collect();
    checks.ok = checks.every_payout_final
        && checks.amounts_owed
        && checks.one_payment_per_payout
        && checks.payments_match_payouts
        && checks.every_holder_credited_once
        && checks.ledger_violations.is_empty();
    Ok(checks)
}

/// The provider, timing each payment call for the report.
struct TimedProvider {
    inner: HttpProvider,
    latency: Mutex<Histogram<u64>>,
}

impl TimedProvider {
    fn new(inner: HttpProvider) -> TimedProvider {
        TimedProvider {
            inner,
            latency: Mutex::new(histogram()),
        }
    }
}

#[async_trait]
impl PaymentProvider for TimedProvider {
    async fn pay(&self, request: &PaymentRequest) -> PaymentOutcome {
        let started = Instant::now();
        let outcome = self.inner.pay(request).await;
        record(
            &mut self.latency.lock().expect("BUG: poisoned"),
            started.elapsed(),
        );
        outcome
    }

    async fn lookup(&self, idempotency_key: &str) -> LookupOutcome {
        self.inner.lookup(idempotency_key).await
    }
}

fn print_setup(options: &PayoutBenchOptions, database: &str) {
    println!("payouts benchmark on {database}");
    println!(
        "{} holders of one product, the term's interest in one run; fake gateway in-process on loopback, {} ms latency (timeouts {}, late payments {}, 5xx after paying {}, refusals {}, rate limit {}/s)",
        options.holders,
        options.gateway_latency_ms,
        options.timeout_rate,
        options.late_pay_rate,
        options.error_after_pay_rate,
        options.fail_rate,
        options.gateway_rate_limit,
    );
    println!(
        "{} node(s), each: {} payout worker(s), {} calls in flight at most, {} calls/s at most, gateway timeout {} ms, lease {} ms; projections running on the first",
        options.nodes,
        options.workers,
        options.concurrency,
        options.rate_limit,
        options.gateway_timeout_ms,
        options.lease_ms,
    );
}

fn print_report(report: &PayoutBenchReport) {
    println!(
        "setup: {:.1} s writing holders, {:.1} s projecting them; scheduling: {:.2} s",
        report.setup_seconds, report.projection_catch_up_seconds, report.schedule_seconds
    );
    println!(
        "paid {} payouts: last payout {:.1} s after scheduling, last credit {:.1} s; {:.0} payouts/s (target {:.0}: {})",
        report.checks.payouts_succeeded,
        report.time_to_last_payout_seconds,
        report.time_to_last_credit_seconds,
        report.payouts_per_second,
        report.target_payouts_per_second,
        if report.target_met { "met" } else { "NOT met" },
    );
    println!(
        "gateway: {} calls, peak {} at once, {} answered 429; payment calls p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        report.gateway_calls,
        report.peak_concurrent_calls,
        report.gateway_throttled,
        report.payment_call_latency.p50_ms,
        report.payment_call_latency.p99_ms,
        report.payment_call_latency.max_ms,
    );
    println!(
        "log: {} attempts ({:?}), {} unknown outcomes, {} reconciliations",
        report.attempts, report.attempts_by_node, report.unknown_outcomes, report.reconciliations
    );
    if !report.completed {
        println!("NOT every payout finished within the time limit");
    }
    println!(
        "checks: {}",
        serde_json::to_string(&report.checks).unwrap_or_default()
    );
}
