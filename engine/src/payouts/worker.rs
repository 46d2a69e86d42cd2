//! The payout worker: many provider calls in flight, claims and outcomes
//! appended in batches, every guarantee of one payout at a time kept.
//!
//! A pass takes the worker's share of the engine's payout index (work
//! found, not searched) and moves each payout as far as it can go now:
//!
//! 1. credits succeeded payouts whose credit is missing (batched);
//! 2. parks payouts out of attempts or unknown for too long, and expires
//!    claims whose lease ran out (one batched append);
//! 3. asks the provider about unknown outcomes once the last claim's lease
//!    is over (bounded concurrency, paced), and records what it says;
//! 4. pays the rest through a pipeline: the pass claims attempts in
//!    batches (`payout_attempted`, each stream with its own expected
//!    version: one winner per payout), a dispatcher calls the provider for
//!    each durable claim with at most `concurrency` calls in flight, paced
//!    by the node's `Pacer`, a recorder appends the outcomes in batches
//!    (each naming its attempt, expected at the claim's version), and a
//!    creditor credits the holders of those that succeeded in batches.
//!
//! A claim is used for a call only while now + `call_timeout` is before
//! its lease end, checked right before the call (after the pacer's wait),
//! so two calls for one payout are never in flight at once. A 429 pauses
//! every call of the node and is retried with the same key within the same
//! claim; it is not an attempt's outcome. When the lease no longer covers a
//! retry, the attempt is recorded unknown and settled by a lookup.

use super::index::{IndexedPayout, Partition, PayoutIndex};
use super::{LookupOutcome, PaymentOutcome, PaymentProvider, PaymentRequest};
use crate::accounts::JobOutcome;
use crate::aggregate::encode_all;
use crate::clock::Clock;
use crate::context::RequestContext;
use crate::engine::Engine;
use chrono::{DateTime, Utc};
use domain::payout::{
    Payout, PayoutCommand, PayoutEvent, PayoutState, PayoutStatus, ScheduledPayout,
};
use domain::{Decider, PayoutId};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::{EventStore, ExpectedVersion, StoreError, StreamAppend, StreamOutcome};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use uuid::Uuid;

/// Most payout streams claimed in one append.
pub const CLAIM_BATCH_MAX: usize = 500;
/// Most outcomes (or other steps) recorded in one append.
pub const RECORD_BATCH_MAX: usize = 500;
/// Most credits decided and appended in one account batch.
const CREDIT_BATCH_MAX: usize = 500;
/// Most provider calls one worker may have in flight.
pub const CONCURRENCY_MAX: usize = 4_096;
/// Tries of one batched append that failed for an operating reason (the
/// same event ids each time, so a try that did commit answers its result).
const APPEND_TRIES_MAX: usize = 3;
/// Pause after a 429 that did not say how long to wait.
const THROTTLE_PAUSE_DEFAULT: Duration = Duration::from_secs(1);
/// Longest pause a 429's `Retry-After` may impose.
const THROTTLE_PAUSE_MAX: Duration = Duration::from_secs(60);
/// Pause between passes that made progress.
const PASS_PAUSE_BUSY: Duration = Duration::from_millis(20);

/// Paces a node's provider calls: a rate limit (the provider's own, or
/// below it) and a pause after the provider answers 429. Shared by every
/// worker of a node.
pub struct Pacer {
    limiter: Option<DefaultDirectRateLimiter>,
    rate_per_second: Option<NonZeroU32>,
    paused_until: Mutex<Option<tokio::time::Instant>>,
    throttled: AtomicUsize,
}

impl std::fmt::Debug for Pacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pacer")
            .field("rate_per_second", &self.rate_per_second)
            .field("throttled", &self.throttled.load(Ordering::Relaxed))
            .finish()
    }
}

impl Pacer {
    /// At most `rate_per_second` calls a second (none: no limit but the
    /// provider's 429s). Bursts stay within a tenth of a second's calls.
    pub fn new(rate_per_second: Option<NonZeroU32>) -> Pacer {
        let limiter = rate_per_second.map(|rate| {
            let burst = NonZeroU32::new((rate.get() / 10).max(1)).expect("BUG: max(1)");
            RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
        });
        Pacer {
            limiter,
            rate_per_second,
            paused_until: Mutex::new(None),
            throttled: AtomicUsize::new(0),
        }
    }

    /// The rate limit, if any.
    pub fn rate_per_second(&self) -> Option<NonZeroU32> {
        self.rate_per_second
    }

    /// 429s heard so far.
    pub fn throttled(&self) -> usize {
        self.throttled.load(Ordering::Relaxed)
    }

    /// Waits until a call may be made: past any pause a 429 imposed, then
    /// within the rate.
    pub async fn ready(&self) {
        loop {
            let until = *self.paused_until.lock().expect("BUG: pacer poisoned");
            match until {
                Some(until) if until > tokio::time::Instant::now() => {
                    tokio::time::sleep_until(until).await;
                }
                _ => break,
            }
        }
        if let Some(limiter) = &self.limiter {
            limiter.until_ready().await;
        }
    }

    /// The provider answered 429: every call of the node waits.
    pub fn throttle(&self, retry_after: Option<Duration>) {
        self.throttled.fetch_add(1, Ordering::Relaxed);
        let pause = retry_after
            .unwrap_or(THROTTLE_PAUSE_DEFAULT)
            .min(THROTTLE_PAUSE_MAX);
        let until = tokio::time::Instant::now() + pause;
        let mut paused = self.paused_until.lock().expect("BUG: pacer poisoned");
        if paused.is_none_or(|current| current < until) {
            *paused = Some(until);
        }
    }
}

/// How a worker paces itself.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// This worker's name (in the events' metadata).
    pub name: String,
    /// How long an attempt's claim holds before another worker may expire it.
    pub lease: chrono::Duration,
    /// Pause between passes when there is nothing to do.
    pub idle_pause: Duration,
    /// Wait before retrying a payout the provider could not settle,
    /// doubled per attempt made (at most 64×).
    pub retry_pause: chrono::Duration,
    /// The longest a provider call may take (the gateway's timeout): the
    /// provider is called only while the claim's lease still covers a whole
    /// call from now.
    pub call_timeout: chrono::Duration,
    /// How long after its last claim ended an outcome may stay unknown
    /// (the provider cannot say) before the payout is parked.
    pub park_unknown_after: chrono::Duration,
    /// Provider calls (payments and lookups) this worker may have in
    /// flight at once (1 to `CONCURRENCY_MAX`).
    pub concurrency: usize,
    /// Paces provider calls; one per node, shared by its workers.
    pub pacer: Arc<Pacer>,
    /// Which payouts this worker takes (a node's workers split them).
    pub partition: Partition,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            name: "payout-worker".into(),
            lease: chrono::Duration::seconds(30),
            idle_pause: Duration::from_millis(500),
            retry_pause: chrono::Duration::seconds(1),
            call_timeout: chrono::Duration::seconds(10),
            park_unknown_after: chrono::Duration::hours(1),
            concurrency: 16,
            pacer: Arc::new(Pacer::new(None)),
            partition: Partition::default(),
        }
    }
}

/// What a pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PassReport {
    /// Payouts looked at.
    pub examined: usize,
    /// Provider calls to pay (a 429 retried counts again).
    pub payments_asked: usize,
    /// Provider lookups.
    pub lookups: usize,
    /// Payouts recorded as succeeded.
    pub succeeded: usize,
    /// Payouts recorded final (succeeded or failed) in the pass.
    pub settled: usize,
    /// Payouts with work left that this pass could not finish (waiting on
    /// a lease, a pause, or another worker).
    pub open: usize,
    /// Lost races with another worker (skipped).
    pub conflicts: usize,
    /// Claims whose lease no longer covered a provider call when the call
    /// was due: the provider was not called (the claim expires and is
    /// reconciled).
    pub lease_too_short: usize,
    /// Payouts parked in this pass.
    pub parked: usize,
    /// 429 answers heard (each paused the node's calls).
    pub throttled: usize,
    /// Credits appended or confirmed.
    pub credited: usize,
    /// Appends made (claims, outcomes, steps; credits not counted).
    pub appends: usize,
}

/// Counters the pipeline's tasks share during a pass.
#[derive(Default)]
struct Counters {
    payments_asked: AtomicUsize,
    succeeded: AtomicUsize,
    settled: AtomicUsize,
    conflicts: AtomicUsize,
    lease_too_short: AtomicUsize,
    throttled: AtomicUsize,
    credited: AtomicUsize,
    appends: AtomicUsize,
}

fn bump(counter: &AtomicUsize, by: usize) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// What the pipeline's tasks need.
struct Shared {
    store: Arc<dyn EventStore>,
    engine: Engine,
    provider: Arc<dyn PaymentProvider>,
    clock: Arc<dyn Clock>,
    settings: WorkerSettings,
    counters: Counters,
}

/// A payout worker.
pub struct PayoutWorker {
    shared: Arc<Shared>,
    index: Arc<tokio::sync::Mutex<PayoutIndex>>,
    /// No new attempt or lookup before this (a pause after "no payment" or
    /// "cannot tell", doubling per attempt).
    not_before: HashMap<PayoutId, DateTime<Utc>>,
    /// Orders this worker's claims, so workers on other nodes walk the
    /// payouts in other orders and rarely race for one.
    order_key: u128,
    stop: Option<watch::Receiver<bool>>,
}

/// A durable claim: the payout as it stands after its `payout_attempted`.
struct Claimed {
    payout: ScheduledPayout,
    version: i64,
}

/// What became of a claim's call.
enum Answer {
    /// The provider answered (never `Throttled`).
    Outcome(PaymentOutcome),
    /// The lease no longer covered a call: none was made.
    NotCalled,
    /// Only 429s were heard until the lease no longer covered a call.
    ThrottledOut,
}

struct Called {
    claimed: Claimed,
    answer: Answer,
}

impl PayoutWorker {
    /// A worker paying through `provider`, taking its share of the engine's
    /// payout index.
    pub fn new(
        store: Arc<dyn EventStore>,
        engine: Engine,
        provider: Arc<dyn PaymentProvider>,
        clock: Arc<dyn Clock>,
        mut settings: WorkerSettings,
    ) -> PayoutWorker {
        settings.concurrency = settings.concurrency.clamp(1, CONCURRENCY_MAX);
        let order_key = Uuid::new_v5(&Uuid::NAMESPACE_OID, settings.name.as_bytes()).as_u128();
        PayoutWorker {
            index: engine.payout_index(),
            shared: Arc::new(Shared {
                store,
                engine,
                provider,
                clock,
                settings,
                counters: Counters::default(),
            }),
            not_before: HashMap::new(),
            order_key,
            stop: None,
        }
    }

    /// Runs passes until `stop` turns true; a pass under way stops claiming
    /// at once and records the calls in flight before it ends.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        self.stop = Some(stop.clone());
        while !*stop.borrow() {
            let pause = match self.pass().await {
                Ok(report) if report.payments_asked + report.lookups + report.appends > 0 => {
                    PASS_PAUSE_BUSY
                }
                Ok(_) => self.shared.settings.idle_pause,
                Err(error) => {
                    tracing::warn!(%error, worker = %self.shared.settings.name, "payout pass failed");
                    self.shared.settings.idle_pause
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => {}
            }
        }
    }

    fn stopping(&self) -> bool {
        self.stop.as_ref().is_some_and(|stop| *stop.borrow())
    }

    /// One pass over this worker's share of the payouts with work left.
    pub async fn pass(&mut self) -> Result<PassReport, StoreError> {
        let entries = {
            let mut index = self.index.lock().await;
            index.catch_up(self.shared.store.as_ref()).await?;
            index.partition(self.shared.settings.partition)
        };
        let mut report = PassReport {
            examined: entries.len(),
            ..PassReport::default()
        };
        let plan = self.plan(entries, self.shared.clock.now());
        report.open = plan.waiting;
        let credits: Vec<ScheduledPayout> = plan.credits.into_iter().map(|e| e.payout).collect();
        for chunk in credits.chunks(CREDIT_BATCH_MAX) {
            credit(&self.shared, chunk).await;
        }
        self.take_steps(plan.steps, &mut report).await?;
        self.look_up(plan.lookups, &mut report).await?;
        let result = self.pay(plan.claims).await;
        let counters = &self.shared.counters;
        let take = |counter: &AtomicUsize| counter.swap(0, Ordering::Relaxed);
        report.payments_asked += take(&counters.payments_asked);
        report.succeeded += take(&counters.succeeded);
        report.settled += take(&counters.settled);
        report.conflicts += take(&counters.conflicts);
        report.lease_too_short += take(&counters.lease_too_short);
        report.throttled += take(&counters.throttled);
        report.credited += take(&counters.credited);
        report.appends += take(&counters.appends);
        result?;
        Ok(report)
    }

    /// Sorts the share into what to do now; pure but for the pauses kept.
    fn plan(&mut self, entries: Vec<IndexedPayout>, now: DateTime<Utc>) -> Plan {
        let settings = &self.shared.settings;
        let mut plan = Plan::default();
        for entry in entries {
            let payout = &entry.payout;
            let paused = self
                .not_before
                .get(&payout.payout_id)
                .is_some_and(|t| now < *t);
            match payout.status {
                PayoutStatus::Succeeded => plan.credits.push(entry),
                PayoutStatus::Failed | PayoutStatus::Cancelled | PayoutStatus::Parked => {}
                PayoutStatus::InFlight => {
                    let lease_until = payout.lease_until.expect("BUG: in flight without a lease");
                    if now < lease_until {
                        plan.waiting += 1; // A live claim, ours or another's.
                    } else {
                        plan.steps.push((entry, PayoutCommand::ExpireLease));
                    }
                }
                PayoutStatus::Unknown => {
                    // Until the last claim's lease ends, a payment may still
                    // be landing: a lookup then could not say "no payment".
                    let last_lease = payout.last_lease_until;
                    if paused || last_lease.is_some_and(|until| now < until) {
                        plan.waiting += 1;
                        continue;
                    }
                    let unknown_since = last_lease.unwrap_or(now);
                    if now >= unknown_since + settings.park_unknown_after {
                        let reason = format!(
                            "outcome unknown for more than {} s after the last claim",
                            settings.park_unknown_after.num_seconds()
                        );
                        plan.steps.push((entry, PayoutCommand::Park { reason }));
                    } else {
                        plan.lookups.push(entry);
                    }
                }
                PayoutStatus::Scheduled => {
                    if payout.attempts >= payout.attempts_allowed {
                        let reason = format!("spent {} attempts", payout.attempts);
                        plan.steps.push((entry, PayoutCommand::Park { reason }));
                    } else if paused {
                        plan.waiting += 1;
                    } else {
                        plan.claims.push(entry);
                    }
                }
            }
        }
        self.not_before.retain(|_, until| now < *until);
        let key = self.order_key;
        plan.claims
            .sort_by_key(|entry| entry.payout.payout_id.0.as_u128() ^ key);
        plan
    }

    /// Parks and expires, in batched appends.
    async fn take_steps(
        &mut self,
        steps: Vec<(IndexedPayout, PayoutCommand)>,
        report: &mut PassReport,
    ) -> Result<(), StoreError> {
        for chunk in steps.chunks(RECORD_BATCH_MAX) {
            let now = self.shared.clock.now();
            let decided: Vec<(&IndexedPayout, &PayoutCommand, Vec<PayoutEvent>)> = chunk
                .iter()
                .filter_map(|(entry, command)| {
                    let state = state_of(entry);
                    let events = Payout::decide(&state, command, now).ok()?;
                    Some((entry, command, events))
                })
                .collect();
            let appends = decided
                .iter()
                .map(|(entry, _, events)| self.append_of(entry, events))
                .collect();
            let outcomes = append(&self.shared, appends).await?;
            for ((entry, command, _), outcome) in decided.iter().zip(outcomes) {
                let payout_id = entry.payout.payout_id;
                match (outcome, command) {
                    (StreamOutcome::Conflict(_), _) => report.conflicts += 1,
                    (StreamOutcome::Appended(_), PayoutCommand::Park { reason }) => {
                        report.parked += 1;
                        self.shared.engine.note_payout_parked();
                        tracing::error!(%payout_id, %reason, "payout parked; an operator must retry or cancel it");
                    }
                    (StreamOutcome::Appended(_), _) => {}
                }
            }
        }
        Ok(())
    }

    /// Asks the provider about unknown outcomes (bounded, paced) and
    /// records what it says in batched appends.
    async fn look_up(
        &mut self,
        lookups: Vec<IndexedPayout>,
        report: &mut PassReport,
    ) -> Result<(), StoreError> {
        if lookups.is_empty() {
            return Ok(());
        }
        let semaphore = Arc::new(Semaphore::new(self.shared.settings.concurrency));
        let mut asks = JoinSet::new();
        for entry in lookups {
            let permit = semaphore
                .clone()
                .acquire_owned()
                .await
                .expect("BUG: semaphore closed");
            let shared = self.shared.clone();
            asks.spawn(async move {
                shared.settings.pacer.ready().await;
                let key = entry.payout.idempotency_key();
                let outcome = shared.provider.lookup(&key).await;
                drop(permit);
                (entry, outcome)
            });
        }
        let mut found = Vec::new();
        while let Some(joined) = asks.join_next().await {
            let (entry, outcome) = joined.expect("BUG: a lookup task panicked");
            report.lookups += 1;
            let now = self.shared.clock.now();
            let payout_id = entry.payout.payout_id;
            let pause = now + self.backoff(entry.payout.attempts);
            match outcome {
                LookupOutcome::Found(finding) => found.push((entry, finding)),
                LookupOutcome::Unknown { detail } => {
                    tracing::info!(%payout_id, %detail, "provider cannot tell yet");
                    self.not_before.insert(payout_id, pause);
                }
                LookupOutcome::Throttled { retry_after } => {
                    report.throttled += 1;
                    self.shared.settings.pacer.throttle(retry_after);
                    self.not_before.insert(payout_id, pause);
                }
            }
        }
        for chunk in found.chunks(RECORD_BATCH_MAX) {
            self.reconcile(chunk, report).await?;
        }
        Ok(())
    }

    /// Records lookups' findings; credits what turned out paid.
    async fn reconcile(
        &mut self,
        found: &[(IndexedPayout, domain::payout::ProviderFinding)],
        report: &mut PassReport,
    ) -> Result<(), StoreError> {
        let now = self.shared.clock.now();
        let mut decided = Vec::new();
        for (entry, finding) in found {
            let command = PayoutCommand::Reconcile {
                finding: finding.clone(),
            };
            if let Ok(events) = Payout::decide(&state_of(entry), &command, now) {
                decided.push((entry, events));
            }
        }
        let appends = decided
            .iter()
            .map(|(entry, events)| self.append_of(entry, events))
            .collect();
        let outcomes = append(&self.shared, appends).await?;
        let mut paid = Vec::new();
        for ((entry, events), outcome) in decided.into_iter().zip(outcomes) {
            if let StreamOutcome::Conflict(_) = outcome {
                report.conflicts += 1;
                continue;
            }
            let after = events.iter().fold(state_of(entry), Payout::evolve);
            let payout = after
                .payout
                .expect("BUG: a scheduled payout stays scheduled");
            match payout.status {
                PayoutStatus::Succeeded => {
                    report.succeeded += 1;
                    report.settled += 1;
                    paid.push(payout);
                }
                PayoutStatus::Failed => report.settled += 1,
                // No payment under the key: a new attempt, with the same
                // key, after a pause.
                _ => {
                    let pause = now + self.backoff(payout.attempts);
                    self.not_before.insert(payout.payout_id, pause);
                }
            }
        }
        credit(&self.shared, &paid).await;
        Ok(())
    }

    /// The pause before retrying a payout after `attempts` attempts:
    /// `retry_pause` doubled per attempt, at most 64 times as long.
    fn backoff(&self, attempts: u32) -> chrono::Duration {
        self.shared.settings.retry_pause * (1i32 << attempts.min(6))
    }

    fn append_of(&self, entry: &IndexedPayout, events: &[PayoutEvent]) -> StreamAppend {
        let payout_id = entry.payout.payout_id;
        let metadata = context(&self.shared.settings).metadata(Some(payout_id.0), None);
        StreamAppend {
            stream_id: payout_id.stream(),
            expected: ExpectedVersion::Exact(entry.version),
            events: encode_all(events, &metadata),
        }
    }

    /// How many claims to make ahead of the calls: enough to keep every
    /// call slot busy, few enough that a claim waits far less than its
    /// lease for its call at the paced rate.
    fn claim_batch(&self) -> usize {
        let settings = &self.shared.settings;
        let mut batch = settings.concurrency.clamp(1, CLAIM_BATCH_MAX);
        if let Some(rate) = settings.pacer.rate_per_second() {
            let spare = (settings.lease - settings.call_timeout)
                .num_milliseconds()
                .max(0) as u64;
            // Two batches queued must be called within a quarter of the
            // lease's spare time at the paced rate.
            let within = u64::from(rate.get()) * spare / 1000 / 8;
            batch = batch.min(usize::try_from(within).unwrap_or(usize::MAX).max(1));
        }
        batch
    }

    /// Claims, calls, records and credits `claims` through the pipeline.
    async fn pay(&mut self, claims: Vec<IndexedPayout>) -> Result<(), StoreError> {
        if claims.is_empty() {
            return Ok(());
        }
        let batch = self.claim_batch();
        let (claimed_sender, claimed) = mpsc::channel::<Claimed>(2 * batch);
        let (called_sender, called) = mpsc::channel::<Called>(RECORD_BATCH_MAX);
        let (credit_sender, credits) = mpsc::channel::<ScheduledPayout>(CREDIT_BATCH_MAX);
        // Dropping the pass (a killed worker) aborts every stage with it.
        let mut stages = JoinSet::new();
        stages.spawn(dispatch(self.shared.clone(), claimed, called_sender));
        stages.spawn(record(self.shared.clone(), called, credit_sender));
        stages.spawn(credit_all(self.shared.clone(), credits));
        let mut result = Ok(());
        let mut queue = claims.into_iter().peekable();
        while queue.peek().is_some() && !self.stopping() {
            let chunk: Vec<IndexedPayout> = queue.by_ref().take(batch).collect();
            let Ok(permits) = claimed_sender.reserve_many(chunk.len()).await else {
                break;
            };
            match self.claim(&chunk).await {
                Ok(won) => {
                    for (permit, claimed) in permits.zip(won) {
                        permit.send(claimed);
                    }
                }
                Err(error) => {
                    result = Err(error);
                    break;
                }
            }
        }
        drop(claimed_sender);
        while let Some(joined) = stages.join_next().await {
            joined.expect("BUG: a payout pipeline stage panicked");
        }
        result
    }

    /// Appends one `payout_attempted` per payout, each at its version; the
    /// claims won, in order.
    async fn claim(&mut self, chunk: &[IndexedPayout]) -> Result<Vec<Claimed>, StoreError> {
        let now = self.shared.clock.now();
        let lease_until = now + self.shared.settings.lease;
        let command = PayoutCommand::Attempt { lease_until };
        let mut decided = Vec::with_capacity(chunk.len());
        for entry in chunk {
            if let Ok(events) = Payout::decide(&state_of(entry), &command, now) {
                decided.push((entry, events));
            }
        }
        let appends = decided
            .iter()
            .map(|(entry, events)| self.append_of(entry, events))
            .collect();
        let outcomes = append(&self.shared, appends).await?;
        let mut won = Vec::with_capacity(decided.len());
        for ((entry, events), outcome) in decided.into_iter().zip(outcomes) {
            match outcome {
                StreamOutcome::Appended(appended) => {
                    let after = events.iter().fold(state_of(entry), Payout::evolve);
                    let payout = after
                        .payout
                        .expect("BUG: a scheduled payout stays scheduled");
                    // A durable claim is one attempt more, leased to this
                    // worker, at a version past the one it was decided on:
                    // only then may the provider be called.
                    assert!(
                        payout.attempts == entry.payout.attempts + 1
                            && payout.lease_until == Some(lease_until)
                            && appended.last_version > entry.version,
                        "BUG: payout {} claimed as attempt {} (was {}), lease {:?}, version {} \
                         after {}",
                        payout.payout_id,
                        payout.attempts,
                        entry.payout.attempts,
                        payout.lease_until,
                        appended.last_version,
                        entry.version
                    );
                    won.push(Claimed {
                        payout,
                        version: appended.last_version,
                    });
                }
                StreamOutcome::Conflict(_) => {
                    bump(&self.shared.counters.conflicts, 1);
                }
            }
        }
        Ok(won)
    }
}

/// What a pass will do.
#[derive(Default)]
struct Plan {
    credits: Vec<IndexedPayout>,
    steps: Vec<(IndexedPayout, PayoutCommand)>,
    lookups: Vec<IndexedPayout>,
    claims: Vec<IndexedPayout>,
    waiting: usize,
}

fn state_of(entry: &IndexedPayout) -> PayoutState {
    PayoutState {
        payout: Some(entry.payout.clone()),
    }
}

fn context(settings: &WorkerSettings) -> RequestContext {
    RequestContext {
        actor_id: Some(settings.name.clone()),
        actor_role: "system".into(),
        request_id: None,
        command_id: Uuid::now_v7(),
    }
}

fn payment(payout: &ScheduledPayout) -> PaymentRequest {
    PaymentRequest {
        idempotency_key: payout.idempotency_key(),
        account_id: payout.account_id,
        amount: payout.amount,
        currency: payout.currency,
    }
}

/// One batched append, tried again with the same events after an
/// operating failure (idempotent on event ids: a try that committed
/// answers its first result).
async fn append(
    shared: &Shared,
    appends: Vec<StreamAppend>,
) -> Result<Vec<StreamOutcome>, StoreError> {
    if appends.is_empty() {
        return Ok(Vec::new());
    }
    let mut tries = 0;
    loop {
        tries += 1;
        match shared.store.append_batch(appends.clone()).await {
            Ok(outcomes) => {
                bump(&shared.counters.appends, 1);
                check_outcomes(&appends, &outcomes);
                return Ok(outcomes);
            }
            Err(error) if error.is_transient() && tries < APPEND_TRIES_MAX => {
                tracing::warn!(%error, tries, "payout append failed; trying the same events again");
                tokio::time::sleep(Duration::from_millis(100 * tries as u64)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// The store's answer to a batch of payout appends, checked: one outcome
/// per stream, in order; every payout append is fenced by an exact
/// version, so what was appended is the dense run of versions right after
/// it (also when answered as a duplicate of an earlier try), and positions
/// grow with versions. A claim or an outcome recorded at any other version
/// would let two workers pay one payout.
fn check_outcomes(appends: &[StreamAppend], outcomes: &[StreamOutcome]) {
    assert_eq!(
        appends.len(),
        outcomes.len(),
        "BUG: {} payout appends answered with {} outcomes",
        appends.len(),
        outcomes.len()
    );
    for (append, outcome) in appends.iter().zip(outcomes) {
        let StreamOutcome::Appended(appended) = outcome else {
            continue;
        };
        let ExpectedVersion::Exact(expected) = append.expected else {
            panic!(
                "BUG: payout stream {} appended without an exact version",
                append.stream_id
            );
        };
        let count = i64::try_from(append.events.len()).expect("BUG: a batch's size fits i64");
        assert!(
            appended.stream_id == append.stream_id
                && count > 0
                && appended.first_version == expected + 1
                && appended.last_version == expected + count
                && appended.last_position >= appended.first_position + (count - 1),
            "BUG: payout stream {} appended {count} events at version {expected} and the store \
             answered {appended:?}",
            append.stream_id
        );
    }
}

/// Starts a call for each durable claim, at most `concurrency` at once.
async fn dispatch(
    shared: Arc<Shared>,
    mut claimed: mpsc::Receiver<Claimed>,
    called: mpsc::Sender<Called>,
) {
    let semaphore = Arc::new(Semaphore::new(shared.settings.concurrency));
    let mut calls = JoinSet::new();
    while let Some(claim) = claimed.recv().await {
        let permit = semaphore
            .clone()
            .acquire_owned()
            .await
            .expect("BUG: semaphore closed");
        let (shared, called) = (shared.clone(), called.clone());
        calls.spawn(async move {
            let answer = call(&shared, &claim.payout).await;
            drop(permit);
            let _ = called
                .send(Called {
                    claimed: claim,
                    answer,
                })
                .await;
        });
        while let Some(joined) = calls.try_join_next() {
            joined.expect("BUG: a provider call task panicked");
        }
    }
    while let Some(joined) = calls.join_next().await {
        joined.expect("BUG: a provider call task panicked");
    }
}

/// Calls the provider for a claimed payout while its lease covers a call;
/// a 429 pauses the node and is asked again with the same key.
async fn call(shared: &Shared, payout: &ScheduledPayout) -> Answer {
    let request = payment(payout);
    let lease_until = payout.lease_until.expect("BUG: claimed without a lease");
    let mut throttled = false;
    loop {
        shared.settings.pacer.ready().await;
        let now = shared.clock.now();
        if now + shared.settings.call_timeout >= lease_until {
            let payout_id = payout.payout_id;
            tracing::warn!(%payout_id, %lease_until, %now,
                "claim's lease no longer covers a provider call; not calling");
            return if throttled {
                Answer::ThrottledOut
            } else {
                Answer::NotCalled
            };
        }
        bump(&shared.counters.payments_asked, 1);
        match shared.provider.pay(&request).await {
            PaymentOutcome::Throttled { retry_after } => {
                bump(&shared.counters.throttled, 1);
                shared.settings.pacer.throttle(retry_after);
                throttled = true;
            }
            outcome => return Answer::Outcome(outcome),
        }
    }
}

/// Appends the calls' outcomes in batches (each at its claim's version,
/// naming its attempt) and hands the successes to the creditor.
async fn record(
    shared: Arc<Shared>,
    mut called: mpsc::Receiver<Called>,
    credits: mpsc::Sender<ScheduledPayout>,
) {
    let mut buffer = Vec::with_capacity(RECORD_BATCH_MAX);
    while called.recv_many(&mut buffer, RECORD_BATCH_MAX).await > 0 {
        let now = shared.clock.now();
        let mut decided = Vec::with_capacity(buffer.len());
        for Called { claimed, answer } in buffer.drain(..) {
            let Some(command) = outcome_command(&claimed.payout, answer) else {
                bump(&shared.counters.lease_too_short, 1);
                continue;
            };
            let state = PayoutState {
                payout: Some(claimed.payout.clone()),
            };
            let events = Payout::decide(&state, &command, now)
                .expect("BUG: the outcome of our own durable claim was refused");
            decided.push((claimed, events));
        }
        let appends = decided
            .iter()
            .map(|(claimed, events)| {
                let payout_id = claimed.payout.payout_id;
                let metadata = context(&shared.settings).metadata(Some(payout_id.0), None);
                StreamAppend {
                    stream_id: payout_id.stream(),
                    expected: ExpectedVersion::Exact(claimed.version),
                    events: encode_all(events, &metadata),
                }
            })
            .collect();
        let outcomes = match append(&shared, appends).await {
            Ok(outcomes) => outcomes,
            Err(error) => {
                // Unrecorded: the claims expire after their lease and a
                // lookup settles each, as if this worker had died.
                tracing::warn!(%error, payouts = decided.len(),
                    "payout outcomes could not be recorded; their claims will expire and be reconciled");
                continue;
            }
        };
        for ((claimed, events), outcome) in decided.into_iter().zip(outcomes) {
            let payout_id = claimed.payout.payout_id;
            if let StreamOutcome::Conflict(_) = outcome {
                // Our lease ran out and another worker expired the claim:
                // what we heard is for a lookup to confirm.
                tracing::warn!(%payout_id, attempt = claimed.payout.attempts,
                    "outcome arrived after the claim was expired");
                bump(&shared.counters.conflicts, 1);
                continue;
            }
            match events.first() {
                Some(PayoutEvent::PayoutSucceeded { .. }) => {
                    bump(&shared.counters.succeeded, 1);
                    bump(&shared.counters.settled, 1);
                    let _ = credits.send(claimed.payout).await;
                }
                Some(PayoutEvent::PayoutFailed { .. }) => bump(&shared.counters.settled, 1),
                _ => {}
            }
        }
    }
}

/// The command recording a call's answer; `None` when no call was made.
fn outcome_command(payout: &ScheduledPayout, answer: Answer) -> Option<PayoutCommand> {
    let attempt = payout.attempts;
    Some(match answer {
        Answer::NotCalled => return None,
        Answer::ThrottledOut => PayoutCommand::RecordUnknown {
            attempt,
            detail: "the provider answered 429 until the claim no longer covered a call".into(),
        },
        Answer::Outcome(PaymentOutcome::Paid { payment_id }) => PayoutCommand::RecordSucceeded {
            attempt,
            provider_ref: payment_id,
        },
        Answer::Outcome(PaymentOutcome::Refused { reason }) => {
            PayoutCommand::RecordFailed { attempt, reason }
        }
        Answer::Outcome(PaymentOutcome::Unknown { detail }) => {
            PayoutCommand::RecordUnknown { attempt, detail }
        }
        Answer::Outcome(PaymentOutcome::Throttled { .. }) => {
            unreachable!("BUG: a 429 is retried by the call, never recorded")
        }
    })
}

/// Credits the holders of succeeded payouts in batches.
async fn credit_all(shared: Arc<Shared>, mut credits: mpsc::Receiver<ScheduledPayout>) {
    let mut buffer = Vec::with_capacity(CREDIT_BATCH_MAX);
    while credits.recv_many(&mut buffer, CREDIT_BATCH_MAX).await > 0 {
        credit(&shared, &buffer).await;
        buffer.clear();
    }
}

/// Credits succeeded payouts (idempotent on the payout id); what fails is
/// credited on a later pass, since the index keeps it until its credit is
/// in the log.
async fn credit(shared: &Shared, payouts: &[ScheduledPayout]) {
    if payouts.is_empty() {
        return;
    }
    let outcomes = shared
        .engine
        .credit_payouts(payouts, &context(&shared.settings))
        .await;
    for (payout, outcome) in payouts.iter().zip(outcomes) {
        let payout_id = payout.payout_id;
        match outcome {
            JobOutcome::Done => bump(&shared.counters.credited, 1),
            JobOutcome::Rejected(rejection) => {
                tracing::error!(%payout_id, %rejection, "payout credit refused by the account");
            }
            JobOutcome::Unavailable(error) => {
                tracing::warn!(%payout_id, %error, "payout credit failed; retried next pass");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use store::{Appended, Metadata, NewEvent};

    fn payout_append(expected: i64, events: u128) -> StreamAppend {
        StreamAppend {
            stream_id: "payout-1".into(),
            expected: ExpectedVersion::Exact(expected),
            events: (0..events)
                .map(|n| NewEvent {
                    event_id: Uuid::from_u128(n + 1),
                    event_type: "payout_attempted".into(),
                    schema_version: 1,
                    data: serde_json::json!({}),
                    metadata: Metadata::default(),
                })
                .collect(),
        }
    }

    fn appended(first_version: i64, last_version: i64, positions: (i64, i64)) -> StreamOutcome {
        StreamOutcome::Appended(Appended {
            stream_id: "payout-1".into(),
            first_version,
            last_version,
            first_position: positions.0,
            last_position: positions.1,
            duplicate: false,
        })
    }

    #[test]
    fn outcomes_at_the_versions_after_the_expected_one_pass() {
        let appends = [payout_append(3, 2)];
        check_outcomes(&appends, &[appended(4, 5, (10, 12))]);
        // A conflict wrote nothing: nothing to check.
        let conflict = StreamOutcome::Conflict(store::VersionConflict {
            stream_id: "payout-1".into(),
            expected: ExpectedVersion::Exact(3),
            actual: 4,
        });
        check_outcomes(&appends, &[conflict]);
    }

    #[test]
    #[should_panic(expected = "BUG: payout stream payout-1 appended 2 events at version 3")]
    fn an_outcome_at_another_version_is_a_bug() {
        check_outcomes(&[payout_append(3, 2)], &[appended(3, 4, (10, 11))]);
    }

    #[test]
    #[should_panic(expected = "BUG: payout stream payout-1 appended 2 events at version 3")]
    fn positions_that_do_not_grow_with_versions_are_a_bug() {
        check_outcomes(&[payout_append(3, 2)], &[appended(4, 5, (12, 10))]);
    }

    #[test]
    #[should_panic(expected = "BUG: 1 payout appends answered with 0 outcomes")]
    fn a_missing_outcome_is_a_bug() {
        check_outcomes(&[payout_append(3, 1)], &[]);
    }
}
