//! Keeps the read models up with the log: one task reads each batch of the
//! log once and applies it to every projection, each projection's rows and
//! checkpoint in the same transaction.
//!
//! A step reads the checkpoints, reads the events after the lowest, then in
//! one transaction re-reads (and on PostgreSQL locks) each checkpoint, applies
//! to each projection the events past its own checkpoint and moves it. A
//! projection whose checkpoint moved in between (another node's runner, or a
//! rebuild's swap) is skipped and read again next step, so nothing is applied
//! twice or skipped; several processes may run runners on one database.

use crate::apply::{PROJECTION_BATCH_MAX, apply_batch};
use crate::db::{Checkpoint, ReadDb};
use crate::envelope::decode_all;
use crate::error::ProjectionError;
use crate::projection::Projection;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use store::EventStore;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Events per live batch: small enough to hold the write lock briefly.
pub const RUNNER_BATCH_DEFAULT: usize = 1_000;
/// How often an idle runner looks at the log without being woken (another
/// process's appends on SQLite cannot wake it).
pub const RUNNER_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Shortest time between the starts of two steps that found the runner
/// caught up: appends arriving meanwhile are applied together. It bounds the
/// projections' lag behind a busy log at about this much.
pub const RUNNER_GATHER: Duration = Duration::from_millis(100);
/// Pause after a failed step, doubled up to `RUNNER_BACKOFF_MAX`.
pub const RUNNER_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest pause after failed steps.
pub const RUNNER_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often a busy runner logs its progress.
const RUNNER_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// The window over which the event rate is measured.
const RATE_WINDOW: Duration = Duration::from_secs(2);

/// What one step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Applied events: how many to each projection that moved.
    Applied(Vec<(Projection, usize)>),
    /// Nothing new in the log.
    Idle,
    /// A checkpoint moved under us; read again.
    Raced,
}

impl Step {
    /// Events applied, summed over projections.
    pub fn applied(&self) -> usize {
        match self {
            Step::Applied(counts) => counts.iter().map(|(_, count)| count).sum(),
            Step::Idle | Step::Raced => 0,
        }
    }
}

/// A fault to inject just before a step commits (tests of crash safety).
pub type BeforeCommit = Arc<dyn Fn(Projection, i64) -> Result<(), ProjectionError> + Send + Sync>;

/// Applies the next batch (at most `limit` events, none past `until`) to the
/// live tables of the given projections, reading and decoding the log once
/// for all of them and committing them together. A projection whose
/// checkpoint moved since it was read is left for the next step.
pub async fn step(
    store: &dyn EventStore,
    db: &ReadDb,
    projections: &[Projection],
    limit: usize,
    until: Option<i64>,
    before_commit: Option<&BeforeCommit>,
) -> Result<Step, ProjectionError> {
    let mut seen = Vec::with_capacity(projections.len());
    for projection in projections {
        let Some(checkpoint) = db.checkpoint(*projection).await? else {
            return Err(ProjectionError::inconsistent(
                0,
                format!("projection {projection} is not installed"),
            ));
        };
        // Tables of another shape are another build's to fold (a rolling
        // deploy, or a rebuild to the new shape still to come).
        if checkpoint.schema_version == projection.schema_version() {
            seen.push((*projection, checkpoint));
        }
    }
    let Some(after) = seen.iter().map(|(_, c)| c.position).min() else {
        return Ok(Step::Idle);
    };
    let mut events = store
        .read_all(after, limit.clamp(1, PROJECTION_BATCH_MAX))
        .await?;
    if let Some(until) = until {
        events.retain(|e| e.position <= until);
    }
    if events.is_empty() {
        return Ok(Step::Idle);
    }
    let envelopes = decode_all(events)?;
    let mut tx = db.begin().await?;
    let (mut applied, mut raced) = (Vec::new(), false);
    for (projection, checkpoint) in &seen {
        if tx.checkpoint(*projection).await? != Some(*checkpoint) {
            raced = true;
            continue;
        }
        let start = envelopes.partition_point(|e| e.position() <= checkpoint.position);
        let batch = &envelopes[start..];
        let Some(last) = batch.last().map(|e| e.position()) else {
            continue;
        };
        apply_batch(&mut tx, *projection, checkpoint.generation, batch).await?;
        let moved = Checkpoint {
            position: last,
            ..*checkpoint
        };
        tx.set_checkpoint(*projection, moved).await?;
        if let Some(fault) = before_commit {
            fault(*projection, last)?;
        }
        applied.push((*projection, batch.len()));
    }
    tx.commit().await?;
    Ok(if !applied.is_empty() {
        Step::Applied(applied)
    } else if raced {
        Step::Raced
    } else {
        Step::Idle
    })
}

/// Applies every event up to `until` (or the head) to the given projections,
/// one step at a time. Returns the events applied.
pub async fn catch_up(
    store: &dyn EventStore,
    db: &ReadDb,
    projections: &[Projection],
    until: Option<i64>,
) -> Result<usize, ProjectionError> {
    let mut applied = 0;
    loop {
        match step(store, db, projections, RUNNER_BATCH_DEFAULT, until, None).await? {
            Step::Idle => return Ok(applied),
            progress => applied += progress.applied(),
        }
    }
}

/// How far one projection is, for metrics and the dashboard.
#[derive(Debug, Default)]
pub struct ProjectionStatus {
    position: AtomicI64,
    head: AtomicI64,
    applied: AtomicU64,
    failures: AtomicU64,
    rate_milli: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// A point-in-time copy of a projection's status.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StatusReport {
    /// The projection.
    pub projection: &'static str,
    /// Its checkpoint.
    pub position: i64,
    /// The log's head when last looked at.
    pub head: i64,
    /// `head - position`.
    pub lag: i64,
    /// Events applied by this process.
    pub applied: u64,
    /// Failed steps in this process.
    pub failures: u64,
    /// Recent events applied per second.
    pub events_per_second: f64,
    /// The last failure, if the last step failed.
    pub last_error: Option<String>,
}

/// Status of every projection this process runs.
#[derive(Debug, Default)]
pub struct Statuses {
    by_projection: BTreeMap<Projection, ProjectionStatus>,
}

impl Statuses {
    fn new() -> Statuses {
        Statuses {
            by_projection: Projection::ALL
                .into_iter()
                .map(|p| (p, ProjectionStatus::default()))
                .collect(),
        }
    }

    fn of(&self, projection: Projection) -> &ProjectionStatus {
        &self.by_projection[&projection]
    }

    /// A copy of every projection's status.
    pub fn report(&self) -> Vec<StatusReport> {
        self.by_projection
            .iter()
            .map(|(projection, status)| {
                let position = status.position.load(Ordering::Relaxed);
                let head = status.head.load(Ordering::Relaxed).max(position);
                StatusReport {
                    projection: projection.name(),
                    position,
                    head,
                    lag: head - position,
                    applied: status.applied.load(Ordering::Relaxed),
                    failures: status.failures.load(Ordering::Relaxed),
                    events_per_second: status.rate_milli.load(Ordering::Relaxed) as f64 / 1000.0,
                    last_error: status.last_error.lock().expect("BUG: poisoned").clone(),
                }
            })
            .collect()
    }

    /// A projection's checkpoint as last observed (read from the database
    /// after each of its commits, so the read model holds at least this).
    pub fn position(&self, projection: Projection) -> i64 {
        self.of(projection).position.load(Ordering::Acquire)
    }

    /// The largest lag of any projection.
    pub fn lag_max(&self) -> i64 {
        self.report().iter().map(|r| r.lag).max().unwrap_or(0)
    }
}

/// The projection runners of one process.
pub struct Runner {
    statuses: Arc<Statuses>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

/// Settings of the runners.
#[derive(Clone)]
pub struct RunnerOptions {
    /// Events per batch.
    pub batch: usize,
    /// A fault to inject before commits (tests only).
    pub before_commit: Option<BeforeCommit>,
}

impl Default for RunnerOptions {
    fn default() -> Self {
        RunnerOptions {
            batch: RUNNER_BATCH_DEFAULT,
            before_commit: None,
        }
    }
}

impl Runner {
    /// Starts one task per projection.
    pub fn start(store: Arc<dyn EventStore>, db: ReadDb, options: RunnerOptions) -> Runner {
        let statuses = Arc::new(Statuses::new());
        let (stop, _) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let task = RunnerTask {
            store,
            db,
            options,
            statuses: statuses.clone(),
            stop: stop.subscribe(),
        };
        tasks.spawn(task.run());
        Runner {
            statuses,
            stop,
            tasks,
        }
    }

    /// Live status of every projection.
    pub fn statuses(&self) -> Arc<Statuses> {
        self.statuses.clone()
    }

    /// Asks the tasks to stop after their current step and waits for them.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

struct RunnerTask {
    store: Arc<dyn EventStore>,
    db: ReadDb,
    options: RunnerOptions,
    statuses: Arc<Statuses>,
    stop: watch::Receiver<bool>,
}

struct Rate {
    since: Instant,
    counts: BTreeMap<Projection, u64>,
}

impl RunnerTask {
    async fn run(mut self) {
        let mut commits = self.store.commits();
        let mut backoff = RUNNER_BACKOFF_MIN;
        let mut rate = Rate {
            since: Instant::now(),
            counts: BTreeMap::new(),
        };
        let mut logged = Instant::now();
        while !*self.stop.borrow() {
            let started = Instant::now();
            let result = step(
                self.store.as_ref(),
                &self.db,
                &Projection::ALL,
                self.options.batch,
                None,
                self.options.before_commit.as_ref(),
            )
            .await;
            match result {
                Ok(Step::Applied(counts)) => {
                    backoff = RUNNER_BACKOFF_MIN;
                    let caught_up = counts.iter().all(|(_, count)| *count < self.options.batch);
                    for (projection, count) in counts {
                        let status = self.statuses.of(projection);
                        status.applied.fetch_add(count as u64, Ordering::Relaxed);
                        *status.last_error.lock().expect("BUG: poisoned") = None;
                        *rate.counts.entry(projection).or_default() += count as u64;
                    }
                    self.observe(&mut rate).await;
                    if logged.elapsed() >= RUNNER_LOG_INTERVAL {
                        logged = Instant::now();
                        for report in self.statuses.report() {
                            tracing::info!(
                                projection = report.projection,
                                position = report.position,
                                lag = report.lag,
                                events_per_second = report.events_per_second,
                                "projection progress"
                            );
                        }
                    }
                    // Caught up under a steady stream of appends: let the
                    // next events gather for a moment, so the projections
                    // write them in one larger transaction instead of
                    // taking the database's write lock for every commit.
                    if caught_up {
                        let resume = started + RUNNER_GATHER;
                        tokio::select! {
                            _ = tokio::time::sleep_until(resume.into()) => {}
                            _ = self.stop.changed() => {}
                        }
                    }
                }
                Ok(Step::Raced) => {}
                Ok(Step::Idle) => {
                    self.observe(&mut rate).await;
                    tokio::select! {
                        _ = commits.changed() => {}
                        _ = tokio::time::sleep(RUNNER_POLL_INTERVAL) => {}
                        _ = self.stop.changed() => {}
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "projection step failed");
                    for projection in Projection::ALL {
                        let status = self.statuses.of(projection);
                        status.failures.fetch_add(1, Ordering::Relaxed);
                        *status.last_error.lock().expect("BUG: poisoned") = Some(error.to_string());
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.stop.changed() => {}
                    }
                    backoff = (backoff * 2).min(RUNNER_BACKOFF_MAX);
                }
            }
        }
    }

    /// Refreshes positions, head and rates.
    async fn observe(&self, rate: &mut Rate) {
        let head = self.store.head().await.ok();
        for projection in Projection::ALL {
            let status = self.statuses.of(projection);
            if let Ok(Some(checkpoint)) = self.db.checkpoint(projection).await {
                status
                    .position
                    .store(checkpoint.position, Ordering::Release);
            }
            if let Some(head) = head {
                status.head.store(head, Ordering::Relaxed);
            }
        }
        let elapsed = rate.since.elapsed();
        if elapsed >= RATE_WINDOW {
            for projection in Projection::ALL {
                let count = rate.counts.get(&projection).copied().unwrap_or(0);
                let per_second = count as f64 / elapsed.as_secs_f64();
                let status = self.statuses.of(projection);
                status
                    .rate_milli
                    .store((per_second * 1000.0) as u64, Ordering::Relaxed);
            }
            *rate = Rate {
                since: Instant::now(),
                counts: BTreeMap::new(),
            };
        }
    }
}
