//! How far the read models trail the log during a purchase storm, sampled
//! every 100 ms by `ledger bench http` (issue 18: "live progress stays
//! live").
//!
//! Each sample asks the server for the product's public progress (`GET
//! /v1/products/{id}/progress`, what the dashboard shows) and compares it
//! with the log: the progress answer names the position of the last product
//! event it reflects; the next event of the product's stream, if the log
//! holds one, is the oldest committed event the public progress does not
//! show, and its age (now less its recording time) is the progress lag. A
//! progress that reflects every product event has lag zero. For the other
//! read models the sample reads each projection's checkpoint (the figures
//! `/readyz` and `/metrics` report) and the age of the first event past it.
//! Ages are upper bounds by the append's commit time: an event's recording
//! time is taken inside its write transaction, before the commit.
//!
//! After the storm the sampler keeps going until every read model has
//! reached the log's head as it stood when the storm ended, and reports
//! how long that took.

use projections::Statuses;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use store::EventStore;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How often the lag is sampled.
pub const SAMPLE_PERIOD: Duration = Duration::from_millis(100);

/// The freshness the issue asks of the public progress: every event
/// committed at least this long ago is reflected.
pub const LIVE_BOUND: Duration = Duration::from_secs(1);

/// The longest the sampler waits for the read models to catch up after the
/// storm before it gives up and reports that they did not.
pub const CATCH_UP_MAX: Duration = Duration::from_secs(300);

/// What the sampler measured (`--json` prints it under `lag`).
#[derive(Debug, Clone, Serialize)]
pub struct LagReport {
    /// Sampling period asked for, in milliseconds.
    pub period_ms: u64,
    /// Samples taken during the storm.
    pub samples_during_storm: u64,
    /// Samples that could not be taken (a read timed out under the load);
    /// they count in no maximum.
    pub samples_failed: u64,
    /// Why the last failed sample failed.
    pub last_sample_error: Option<String>,
    /// Longest gap between two samples' starts, in milliseconds (over the
    /// period when the sampler itself was starved of CPU).
    pub sample_gap_ms_max: f64,
    /// Largest age of a committed product event missing from the public
    /// progress, during the storm, in seconds.
    pub progress_lag_seconds_max: f64,
    /// Samples during the storm in which an event committed at least 1 s
    /// earlier was missing from the public progress.
    pub progress_samples_over_bound: u64,
    /// Largest age of an event past any read model's checkpoint, during
    /// the storm, in seconds, by projection.
    pub read_model_lag_seconds_max: BTreeMap<String, f64>,
    /// Largest number of events a read model trailed the head by, during
    /// the storm.
    pub read_model_lag_events_max: i64,
    /// The log's head when the storm ended.
    pub head_at_storm_end: i64,
    /// Events the slowest read model trailed by when the storm ended.
    pub lag_events_at_storm_end: i64,
    /// Seconds from the storm's end until every read model reached
    /// `head_at_storm_end`; `None` if they did not within `CATCH_UP_MAX`.
    pub catch_up_seconds: Option<f64>,
    /// Seconds from the storm's start until the public progress first
    /// showed less than one purchase available, if it did.
    pub sold_out_seen_after_seconds: Option<f64>,
}

/// What the sampler needs to look at.
#[derive(Clone)]
pub struct LagTarget {
    /// The log, opened apart from the server's (its own connections), so
    /// that sampling neither waits for nor takes the server's.
    pub store: Arc<dyn EventStore>,
    /// The projections' checkpoints (what `/readyz` reports).
    pub statuses: Arc<Statuses>,
    /// `http://host:port/v1/products/{id}/progress`.
    pub progress_url: String,
    /// The product's stream.
    pub product_stream: String,
    /// One purchase's amount: less than this available is sold out.
    pub amount: i64,
}

/// A running sampler; `finish` ends the storm and waits for the catch-up.
pub struct LagSampler {
    storm_over: watch::Sender<Option<Instant>>,
    task: JoinHandle<anyhow::Result<LagReport>>,
}

impl LagSampler {
    /// Starts sampling now (the storm's start).
    pub fn start(target: LagTarget) -> LagSampler {
        let (storm_over, receiver) = watch::channel(None);
        let task = tokio::spawn(sample(target, receiver));
        LagSampler { storm_over, task }
    }

    /// Marks the storm's end now and waits until the read models caught up
    /// (or `CATCH_UP_MAX` passed).
    pub async fn finish(self) -> anyhow::Result<LagReport> {
        self.storm_over.send_replace(Some(Instant::now()));
        self.task.await?
    }
}

/// One sample: the public progress's lag and each read model's.
struct Sample {
    progress_lag: Duration,
    sold_out: bool,
    head: i64,
    read_models: Vec<(&'static str, i64, Duration)>,
}

async fn sample(
    target: LagTarget,
    storm_over: watch::Receiver<Option<Instant>>,
) -> anyhow::Result<LagReport> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let started = Instant::now();
    let mut report = LagReport {
        period_ms: u64::try_from(SAMPLE_PERIOD.as_millis())?,
        samples_during_storm: 0,
        samples_failed: 0,
        last_sample_error: None,
        sample_gap_ms_max: 0.0,
        progress_lag_seconds_max: 0.0,
        progress_samples_over_bound: 0,
        read_model_lag_seconds_max: BTreeMap::new(),
        read_model_lag_events_max: 0,
        head_at_storm_end: 0,
        lag_events_at_storm_end: 0,
        catch_up_seconds: None,
        sold_out_seen_after_seconds: None,
    };
    let mut ticks = tokio::time::interval(SAMPLE_PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut previous: Option<Instant> = None;
    loop {
        ticks.tick().await;
        let now = Instant::now();
        if let Some(previous) = previous {
            let gap = now.duration_since(previous).as_secs_f64() * 1e3;
            report.sample_gap_ms_max = report.sample_gap_ms_max.max(gap);
        }
        previous = Some(now);
        let ended = *storm_over.borrow();
        if let Some(ended) = ended {
            return catch_up(&target, ended, report).await;
        }
        let sample = match sample_once(&client, &target).await {
            Ok(sample) => sample,
            Err(error) => {
                report.samples_failed += 1;
                report.last_sample_error = Some(format!("{error:#}"));
                continue;
            }
        };
        report.samples_during_storm += 1;
        let lag = sample.progress_lag.as_secs_f64();
        report.progress_lag_seconds_max = report.progress_lag_seconds_max.max(lag);
        if sample.progress_lag >= LIVE_BOUND {
            report.progress_samples_over_bound += 1;
        }
        if sample.sold_out && report.sold_out_seen_after_seconds.is_none() {
            report.sold_out_seen_after_seconds = Some(started.elapsed().as_secs_f64());
        }
        for (projection, position, age) in sample.read_models {
            let seconds = report
                .read_model_lag_seconds_max
                .entry(projection.to_owned())
                .or_default();
            *seconds = seconds.max(age.as_secs_f64());
            report.read_model_lag_events_max =
                report.read_model_lag_events_max.max(sample.head - position);
        }
    }
}

/// After the storm: polls every 10 ms until every read model reached the
/// head as it stood at the storm's end.
async fn catch_up(
    target: &LagTarget,
    ended: Instant,
    mut report: LagReport,
) -> anyhow::Result<LagReport> {
    let head = target.store.head().await?;
    report.head_at_storm_end = head;
    report.lag_events_at_storm_end = target
        .statuses
        .report()
        .iter()
        .map(|status| head - status.position)
        .max()
        .unwrap_or(0)
        .max(0);
    while ended.elapsed() < CATCH_UP_MAX {
        if target
            .statuses
            .report()
            .iter()
            .all(|status| status.position >= head)
        {
            report.catch_up_seconds = Some(ended.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(report)
}

async fn sample_once(client: &reqwest::Client, target: &LagTarget) -> anyhow::Result<Sample> {
    let progress: serde_json::Value = client
        .get(&target.progress_url)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let position = progress["position"]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("a progress answer without a position: {progress}"))?;
    let available = progress["available"]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("a progress answer without available: {progress}"))?;
    let store = target.store.as_ref();
    // The version of the last product event the progress reflects, then the
    // product's next event, if any: the oldest one it does not show.
    let version = match store.read_at(position).await? {
        Some(event) if event.stream_id == target.product_stream => event.version,
        Some(event) => anyhow::bail!(
            "the progress names position {position}, an event of {}",
            event.stream_id
        ),
        None => 0,
    };
    let next = store
        .read_stream(&target.product_stream, version, 1)
        .await?;
    let progress_lag = next.first().map_or(Duration::ZERO, age);
    let head = store.head().await?;
    let mut read_models = Vec::new();
    for status in target.statuses.report() {
        let lag = if status.position >= head {
            Duration::ZERO
        } else {
            store
                .read_all(status.position, 1)
                .await?
                .first()
                .map_or(Duration::ZERO, age)
        };
        read_models.push((status.projection, status.position, lag));
    }
    Ok(Sample {
        progress_lag,
        sold_out: available < target.amount,
        head,
        read_models,
    })
}

/// How long ago the store recorded an event (zero if its clock is ahead).
fn age(event: &store::RecordedEvent) -> Duration {
    (chrono::Utc::now() - event.recorded_at)
        .to_std()
        .unwrap_or(Duration::ZERO)
}
