//! `ledger bench append`: raw append throughput and latency of the event store.
//!
//! Scenarios: one stream appended in batches of 1, 10, 100 and 1000 events by
//! one writer; then many writers, each on its own stream, one event per
//! append. Each scenario stops at `--events` events or `--seconds`, whichever
//! comes first. Afterwards the log is read back and checked: every appended
//! event is there exactly once and every stream's versions are contiguous.

use super::{BenchBackend, BenchDatabase, Latency, histogram, progress, record};
use chrono::Utc;
use domain::product::ProductEvent;
use domain::{AccountId, Amount, OrderId};
use serde::Serialize;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use store::{EventStore, ExpectedVersion, Metadata, NewEvent, Subscription};
use uuid::Uuid;

/// Options of `ledger bench append`.
#[derive(Debug, Clone, clap::Args)]
pub struct AppendOptions {
    /// Backend to measure; each run uses a fresh, empty database.
    #[arg(long, value_enum, default_value = "sqlite")]
    pub backend: BenchBackend,
    /// PostgreSQL server to create the scratch database on (`--backend postgres`).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Most events per scenario.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub events: u64,
    /// Most seconds per scenario.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub seconds: u64,
    /// Batch sizes of the one-stream scenarios.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,1000")]
    pub batch_sizes: Vec<usize>,
    /// Concurrent writers, each on its own stream.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub writers: u64,
    /// Print one JSON object with the figures and checks instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One scenario's figures.
#[derive(Debug, Serialize)]
pub struct ScenarioReport {
    /// What was measured.
    pub scenario: String,
    /// Events per append.
    pub batch_size: usize,
    /// Concurrent writers.
    pub writers: u64,
    /// Events appended.
    pub events: u64,
    /// Appends made.
    pub appends: u64,
    /// Wall time.
    pub seconds: f64,
    /// Throughput.
    pub events_per_second: f64,
    /// Latency of one append call.
    pub append_latency: Latency,
}

/// What was verified after the run.
#[derive(Debug, Serialize)]
pub struct Checks {
    /// Events the scenarios appended.
    pub events_appended: u64,
    /// Events read back from the log.
    pub events_in_log: u64,
    /// Positions strictly increasing in the log read.
    pub positions_increasing: bool,
    /// Every stream's versions run 1..=n with no gap or repeat.
    pub versions_contiguous: bool,
    /// All of the above.
    pub ok: bool,
}

/// The whole report (`--json` prints exactly this).
#[derive(Debug, Serialize)]
pub struct AppendReport {
    /// Always `append`.
    pub benchmark: &'static str,
    /// Backend measured.
    pub backend: BenchBackend,
    /// Backend configuration.
    pub setup: &'static str,
    /// Most events per scenario.
    pub events_limit: u64,
    /// Most seconds per scenario.
    pub seconds_limit: u64,
    /// Per-scenario figures.
    pub scenarios: Vec<ScenarioReport>,
    /// Invariant checks.
    pub checks: Checks,
}

/// Runs the benchmark and prints its report; fails if a check fails.
pub async fn run(options: AppendOptions) -> anyhow::Result<ExitCode> {
    if options
        .batch_sizes
        .iter()
        .any(|&size| size == 0 || size > store::plan::APPEND_EVENTS_MAX)
    {
        anyhow::bail!(
            "batch sizes must be 1 to {}",
            store::plan::APPEND_EVENTS_MAX
        );
    }
    let database = BenchDatabase::create(options.backend, options.database_url.as_deref()).await?;
    let store = database.backend().open().await?;
    let limit = Duration::from_secs(options.seconds);
    let mut scenarios = Vec::new();
    for (index, &batch_size) in options.batch_sizes.iter().enumerate() {
        let stream = format!("bench-one-stream-{index}");
        scenarios.push(
            one_stream(
                &store,
                &stream,
                batch_size,
                options.events,
                limit,
                options.json,
            )
            .await?,
        );
    }
    scenarios
        .push(many_writers(&store, options.writers, options.events, limit, options.json).await?);
    let checks = verify(&store, scenarios.iter().map(|s| s.events).sum()).await?;
    let report = AppendReport {
        benchmark: "append",
        backend: options.backend,
        setup: database.describe(),
        events_limit: options.events,
        seconds_limit: options.seconds,
        scenarios,
        checks,
    };
    if options.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(if report.checks.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A realistic event: a quota reservation with full metadata (~500 bytes stored).
fn sample_event() -> NewEvent {
    let order_id = Uuid::now_v7();
    let event = ProductEvent::QuotaReserved {
        order_id: OrderId(order_id),
        account_id: AccountId(Uuid::now_v7()),
        amount: Amount::new(100).expect("BUG: positive"),
        expires_at: Utc::now(),
    };
    let metadata = Metadata {
        correlation_id: Some(order_id),
        causation_id: Some(Uuid::now_v7()),
        actor_id: Some("bench".into()),
        actor_role: Some("customer".into()),
        request_id: Some(Uuid::now_v7().to_string()),
    };
    store::codec::encode(&event, Uuid::now_v7(), metadata)
}

async fn one_stream(
    store: &Arc<dyn EventStore>,
    stream: &str,
    batch_size: usize,
    events_limit: u64,
    limit: Duration,
    quiet: bool,
) -> anyhow::Result<ScenarioReport> {
    let bar = progress(
        events_limit,
        format!("one stream, batch {batch_size}"),
        quiet,
    );
    let mut latencies = histogram();
    let (mut version, mut events, mut appends) = (0i64, 0u64, 0u64);
    let started = Instant::now();
    while events < events_limit && started.elapsed() < limit {
        let size = batch_size.min(usize::try_from(events_limit - events).unwrap_or(usize::MAX));
        let batch: Vec<NewEvent> = (0..size).map(|_| sample_event()).collect();
        let expected = if version == 0 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(version)
        };
        let call = Instant::now();
        let appended = store.append(stream, expected, batch).await?;
        record(&mut latencies, call.elapsed());
        version = appended.last_version;
        events += size as u64;
        appends += 1;
        bar.inc(size as u64);
    }
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    Ok(ScenarioReport {
        scenario: format!("one stream, batch {batch_size}"),
        batch_size,
        writers: 1,
        events,
        appends,
        seconds,
        events_per_second: events as f64 / seconds,
        append_latency: Latency::of(&latencies),
    })
}

async fn many_writers(
    store: &Arc<dyn EventStore>,
    writers: u64,
    events_limit: u64,
    limit: Duration,
    quiet: bool,
) -> anyhow::Result<ScenarioReport> {
    let bar = progress(events_limit, format!("{writers} writers, batch 1"), quiet);
    let claimed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|writer| {
            let (store, claimed, bar) = (store.clone(), claimed.clone(), bar.clone());
            tokio::spawn(async move {
                let stream = format!("bench-writer-{writer}");
                let mut latencies = histogram();
                let mut version = 0i64;
                while started.elapsed() < limit
                    && claimed.fetch_add(1, Ordering::Relaxed) < events_limit
                {
                    let expected = if version == 0 {
                        ExpectedVersion::NoStream
                    } else {
                        ExpectedVersion::Exact(version)
                    };
                    let call = Instant::now();
                    version = store
                        .append(&stream, expected, vec![sample_event()])
                        .await?
                        .last_version;
                    record(&mut latencies, call.elapsed());
                    bar.inc(1);
                }
                anyhow::Ok((version as u64, latencies))
            })
        })
        .collect();
    let mut latencies = histogram();
    let mut events = 0;
    for task in tasks {
        let (written, histogram) = task.await??;
        events += written;
        latencies
            .add(&histogram)
            .expect("BUG: histograms share bounds");
    }
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    Ok(ScenarioReport {
        scenario: format!("{writers} writers, distinct streams, batch 1"),
        batch_size: 1,
        writers,
        events,
        appends: events,
        seconds,
        events_per_second: events as f64 / seconds,
        append_latency: Latency::of(&latencies),
    })
}

/// Reads the whole log back through a subscription and checks it.
async fn verify(store: &Arc<dyn EventStore>, events_appended: u64) -> anyhow::Result<Checks> {
    let mut subscription = Subscription::new(store.clone(), 0);
    let head = store.head().await?;
    let mut last_versions = std::collections::HashMap::<String, i64>::new();
    let (mut events_in_log, mut positions_increasing, mut versions_contiguous) = (0u64, true, true);
    let mut previous = 0;
    while subscription.position() < head {
        for event in subscription.next_batch(store::port::READ_LIMIT_MAX).await? {
            positions_increasing &= event.position > previous;
            previous = event.position;
            let last = last_versions.entry(event.stream_id).or_insert(0);
            versions_contiguous &= event.version == *last + 1;
            *last = event.version;
            events_in_log += 1;
        }
    }
    Ok(Checks {
        events_appended,
        events_in_log,
        positions_increasing,
        versions_contiguous,
        ok: events_in_log == events_appended && positions_increasing && versions_contiguous,
    })
}

fn print_table(report: &AppendReport) {
    println!("ledger bench append: backend {}", report.setup);
    println!(
        "each scenario stops at {} events or {} s; {} cores",
        report.events_limit,
        report.seconds_limit,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<42} {:>9} {:>8} {:>12} {:>9} {:>9} {:>9}",
        "scenario", "events", "appends", "events/s", "p50 ms", "p99 ms", "max ms"
    );
    for s in &report.scenarios {
        println!(
            "{:<42} {:>9} {:>8} {:>12.0} {:>9.2} {:>9.2} {:>9.2}",
            s.scenario,
            s.events,
            s.appends,
            s.events_per_second,
            s.append_latency.p50_ms,
            s.append_latency.p99_ms,
            s.append_latency.max_ms
        );
    }
    let c = &report.checks;
    println!(
        "checks: {} appended, {} in the log, positions increasing: {}, versions contiguous: {} => {}",
        c.events_appended,
        c.events_in_log,
        c.positions_increasing,
        c.versions_contiguous,
        if c.ok { "ok" } else { "FAILED" }
    );
}
