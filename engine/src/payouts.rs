//! Payouts, exactly once against a provider that may lie.
//!
//! Scheduling derives each payout's id from (product, period, kind, holder)
//! and creates its stream expecting "no stream", so any number of concurrent
//! schedulers create it once. A worker claims an attempt by appending
//! `payout_attempted` with the expected version (only one worker can), calls
//! the provider with the payout's idempotency key (the same on every
//! attempt), and records the answer; an ambiguous answer is resolved by
//! asking the provider for that key before anything else, and a claim whose
//! worker died is expired after its lease and resolved the same way. A
//! succeeded payout credits the holder's account (idempotent on the payout
//! id).

use crate::aggregate::{Loaded, encode_all, expected_after};
use crate::clock::Clock;
use crate::context::RequestContext;
use crate::engine::Engine;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use domain::account::AccountCommand;
use domain::payout::{
    Payout, PayoutCommand, PayoutEvent, PayoutKind, PayoutState, PayoutStatus, PlannedPayout,
    ProviderFinding, ScheduledPayout, plan,
};
use domain::product::{PayoutRun, ProductCommand, ProductRejection, ProductSale, Sale};
use domain::{AccountId, Amount, Currency, Decider, PayoutId, ProductId};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use store::{EventStore, ExpectedVersion, StoreError, StreamAppend, StreamOutcome};
use uuid::Uuid;

/// Namespace of payout ids derived from (product, kind, first day, holder).
const PAYOUT_NAMESPACE: Uuid = Uuid::from_u128(0x6c65_6467_6572_2d70_6179_6f75_7473_2121);
/// Most payout streams created in one append.
pub const SCHEDULE_APPEND_MAX: usize = 500;
/// Most load-decide-append rounds of a scheduling call before it answers
/// `Contention` (another writer kept moving the product stream).
const SCHEDULE_ROUNDS_MAX: usize = 16;
/// Most decide-and-append steps a worker takes on one payout in one pass.
const PAYOUT_STEPS_MAX: usize = 8;

/// The payout of one holder for one run: the principal (once per product,
/// whatever the run's label), or the interest of the term's days from
/// `first_day` on. The label never enters the id, so two labels for the
/// same money name the same payout.
pub fn payout_id_for(
    product_id: &ProductId,
    kind: PayoutKind,
    first_day: u32,
    account_id: AccountId,
) -> PayoutId {
    let name = match kind {
        PayoutKind::Interest => format!("{product_id}/interest/day-{first_day}/{account_id}"),
        PayoutKind::Principal => format!("{product_id}/principal/{account_id}"),
    };
    PayoutId(Uuid::new_v5(&PAYOUT_NAMESPACE, name.as_bytes()))
}

/// What to schedule.
#[derive(Debug, Clone)]
pub struct ScheduleRequest {
    /// The product paying.
    pub product_id: ProductId,
    /// The period label (1 to 128 printable characters).
    pub period: String,
    /// Interest or principal.
    pub kind: PayoutKind,
    /// Days of interest (interest only; 1 to the product's term).
    pub days: Option<u32>,
    /// Who asked.
    pub context: RequestContext,
}

/// Why payouts could not be scheduled.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// The request is malformed (label, days).
    #[error("{0}")]
    Invalid(String),
    /// No such product.
    #[error("no such product")]
    UnknownProduct,
    /// The sale has not opened and closed, or a reservation is pending.
    #[error("{0}")]
    SaleNotClosed(String),
    /// More interest days asked for than the term has left.
    #[error("{message}")]
    EntitlementExceeded {
        /// Days of the term left.
        remaining: u32,
        /// What to tell the caller.
        message: String,
    },
    /// The period was scheduled before with other parameters.
    #[error("{0}")]
    Conflict(String),
    /// A total would pass the 10^15 limit.
    #[error("{0}")]
    LimitExceeded(String),
    /// Other writers kept moving the product stream; try again.
    #[error("the product stream kept changing; try again")]
    Contention,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ProductRejection> for ScheduleError {
    fn from(rejection: ProductRejection) -> ScheduleError {
        let message = rejection.to_string();
        match rejection {
            ProductRejection::NotListed => ScheduleError::UnknownProduct,
            ProductRejection::SaleNotClosed => ScheduleError::SaleNotClosed(message),
            ProductRejection::EntitlementExceeded { remaining, .. } => {
                ScheduleError::EntitlementExceeded { remaining, message }
            }
            ProductRejection::PayoutRunMismatch { .. } => ScheduleError::Conflict(message),
            ProductRejection::LimitExceeded(_) => ScheduleError::LimitExceeded(message),
            _ => ScheduleError::Invalid(message),
        }
    }
}

/// What a scheduling call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct ScheduleReport {
    /// Payouts this call created.
    pub scheduled: usize,
    /// Payouts that existed already (an earlier or concurrent call).
    pub existing: usize,
    /// Holders whose amount rounds to zero (no payout).
    pub zero: usize,
    /// The position the product stream's run record is at, or the last
    /// payout created (for reading one's own writes).
    pub position: i64,
}

/// Schedules a product's payouts for a period; safe to call any number of
/// times, concurrently, from any node, under any labels: the run is first
/// planned in the product stream (`PayoutRunPlanned`, fenced by the
/// stream's version), which bounds it by what the holders are owed, and its
/// payouts are then created with ids that do not depend on the label
/// ("no stream" expected, so each exists once).
pub async fn schedule(
    store: &dyn EventStore,
    request: &ScheduleRequest,
) -> Result<ScheduleReport, ScheduleError> {
    let stream = request.product_id.stream();
    let command = ProductCommand::PlanPayoutRun {
        period: request.period.clone(),
        kind: request.kind,
        days: request.days,
    };
    for _round in 0..SCHEDULE_ROUNDS_MAX {
        let mut product = Loaded::default();
        product.catch_up::<ProductSale>(store, &stream).await?;
        if product.state.sale.is_none() {
            return Err(ScheduleError::UnknownProduct);
        }
        let events = ProductSale::decide(&product.state, &command, Utc::now())?;
        let mut position = 0;
        if !events.is_empty() {
            let metadata = request.context.metadata(None, None);
            match store
                .append(
                    &stream,
                    expected_after(product.version),
                    encode_all(&events, &metadata),
                )
                .await
            {
                Ok(appended) => position = appended.last_position,
                Err(StoreError::Conflict(_)) => continue,
                Err(error) => return Err(error.into()),
            }
            for event in &events {
                product.state = ProductSale::evolve(std::mem::take(&mut product.state), event);
            }
        }
        let sale = product.state.sale.as_ref().expect("BUG: checked above");
        let run_period = match request.kind {
            PayoutKind::Principal => sale.payouts.principal_period.as_deref(),
            PayoutKind::Interest => Some(request.period.as_str()),
        };
        let run = run_period
            .and_then(|period| sale.payouts.runs.get(period))
            .expect("BUG: a planned run is in the state");
        let mut report = create_payouts(store, request, sale, run).await?;
        report.position = report.position.max(position);
        return Ok(report);
    }
    Err(ScheduleError::Contention)
}

/// Creates the payouts of a planned run that do not exist yet.
async fn create_payouts(
    store: &dyn EventStore,
    request: &ScheduleRequest,
    sale: &Sale,
    run: &PayoutRun,
) -> Result<ScheduleReport, ScheduleError> {
    let planned = plan(
        &sale.holdings(),
        sale.terms.annual_rate_bps,
        run.kind,
        run.days.unwrap_or(0),
    );
    let mut report = ScheduleReport::default();
    let payouts: Vec<&PlannedPayout> = planned.iter().filter(|p| !p.amount.is_zero()).collect();
    report.zero = planned.len() - payouts.len();
    for chunk in payouts.chunks(SCHEDULE_APPEND_MAX) {
        let appends = chunk
            .iter()
            .map(|p| schedule_append(request, sale, run, p))
            .collect::<Vec<_>>();
        for outcome in store.append_batch(appends).await? {
            match outcome {
                StreamOutcome::Appended(appended) if !appended.duplicate => {
                    report.scheduled += 1;
                    report.position = report.position.max(appended.last_position);
                }
                StreamOutcome::Appended(_) | StreamOutcome::Conflict(_) => report.existing += 1,
            }
        }
    }
    Ok(report)
}

fn schedule_append(
    request: &ScheduleRequest,
    sale: &Sale,
    run: &PayoutRun,
    planned: &PlannedPayout,
) -> StreamAppend {
    let payout_id = payout_id_for(
        &sale.product_id,
        run.kind,
        run.first_day,
        planned.account_id,
    );
    let event = PayoutEvent::PayoutScheduled {
        payout_id,
        product_id: sale.product_id.clone(),
        account_id: planned.account_id,
        period: run.period.clone(),
        kind: run.kind,
        amount: planned.amount,
        currency: sale.terms.currency,
    };
    let metadata = request.context.metadata(Some(payout_id.0), None);
    StreamAppend {
        stream_id: payout_id.stream(),
        expected: ExpectedVersion::NoStream,
        events: encode_all(&[event], &metadata),
    }
}

/// A payment as the provider is asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentRequest {
    /// The same on every attempt of one payout.
    pub idempotency_key: String,
    /// The holder.
    pub account_id: AccountId,
    /// How much.
    pub amount: Amount,
    /// In what.
    pub currency: Currency,
}

/// What a payment call answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentOutcome {
    /// Paid (200).
    Paid {
        /// The provider's payment id.
        payment_id: String,
    },
    /// Definitively refused (4xx).
    Refused {
        /// Why.
        reason: String,
    },
    /// Timeout, 5xx, connection reset: it may or may not have paid.
    Unknown {
        /// What was seen.
        detail: String,
    },
}

/// What asking the provider about a key answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupOutcome {
    /// A definite answer (paid, refused, or no such payment).
    Found(ProviderFinding),
    /// The provider could not say (unreachable, 5xx).
    Unknown {
        /// What was seen.
        detail: String,
    },
}

/// The payment provider port.
#[async_trait]
pub trait PaymentProvider: Send + Sync + 'static {
    /// Asks for a payment.
    async fn pay(&self, request: &PaymentRequest) -> PaymentOutcome;
    /// Asks what became of the payment with this key.
    async fn lookup(&self, idempotency_key: &str) -> LookupOutcome;
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
        }
    }
}

/// What a pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PassReport {
    /// Payouts looked at.
    pub examined: usize,
    /// Provider calls to pay.
    pub payments_asked: usize,
    /// Provider lookups.
    pub lookups: usize,
    /// Payouts recorded as succeeded.
    pub succeeded: usize,
    /// Payouts that are final (succeeded or failed) after the pass.
    pub settled: usize,
    /// Payouts still open after the pass.
    pub open: usize,
    /// Lost races with another worker (skipped).
    pub conflicts: usize,
    /// Claims whose lease no longer covered a provider call when they were
    /// recorded: the provider was not called (the claim expires and is
    /// reconciled).
    pub lease_too_short: usize,
    /// Payouts parked in this pass.
    pub parked: usize,
}

/// A payout worker.
pub struct PayoutWorker {
    store: Arc<dyn EventStore>,
    engine: Engine,
    provider: Arc<dyn PaymentProvider>,
    clock: Arc<dyn Clock>,
    settings: WorkerSettings,
    index: PayoutIndex,
    not_before: HashMap<PayoutId, DateTime<Utc>>,
}

/// Every payout's id and whether it is final, kept up with the log.
#[derive(Default)]
struct PayoutIndex {
    position: i64,
    open: BTreeMap<PayoutId, ()>,
    uncredited: BTreeMap<PayoutId, ()>,
}

impl PayoutIndex {
    async fn catch_up(&mut self, store: &dyn EventStore) -> Result<(), StoreError> {
        loop {
            let page = store
                .read_all(self.position, store::port::READ_LIMIT_MAX)
                .await?;
            let Some(last) = page.last() else {
                return Ok(());
            };
            self.position = last.position;
            for recorded in &page {
                if let Some(id) = recorded.stream_id.strip_prefix("payout-")
                    && let Ok(uuid) = Uuid::parse_str(id)
                {
                    let payout_id = PayoutId(uuid);
                    match recorded.event_type.as_str() {
                        "payout_succeeded" => {
                            self.open.remove(&payout_id);
                            self.uncredited.insert(payout_id, ());
                        }
                        "payout_failed" | "payout_parked" | "payout_cancelled" => {
                            self.open.remove(&payout_id);
                        }
                        "payout_reconciled" => {
                            // Settled or not, the stream says; look again,
                            // and credit it if it turned out paid.
                            self.open.insert(payout_id, ());
                            self.uncredited.insert(payout_id, ());
                        }
                        _ => {
                            self.open.insert(payout_id, ());
                        }
                    }
                } else if recorded.event_type == "payout_credited"
                    && let Some(payout_id) = recorded
                        .data
                        .get("payout_id")
                        .and_then(|v| v.as_str())
                        .and_then(|v| Uuid::parse_str(v).ok())
                {
                    self.uncredited.remove(&PayoutId(payout_id));
                }
            }
        }
    }
}

impl PayoutWorker {
    /// A worker paying through `provider`.
    pub fn new(
        store: Arc<dyn EventStore>,
        engine: Engine,
        provider: Arc<dyn PaymentProvider>,
        clock: Arc<dyn Clock>,
        settings: WorkerSettings,
    ) -> PayoutWorker {
        PayoutWorker {
            store,
            engine,
            provider,
            clock,
            settings,
            index: PayoutIndex::default(),
            not_before: HashMap::new(),
        }
    }

    fn context(&self) -> RequestContext {
        RequestContext {
            actor_id: Some(self.settings.name.clone()),
            actor_role: "system".into(),
            request_id: None,
            command_id: Uuid::now_v7(),
        }
    }

    /// Runs passes until `stop` turns true.
    pub async fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) {
        while !*stop.borrow() {
            let pause = match self.pass().await {
                // Progress was made: look again soon. Otherwise (waiting on
                // leases, pauses or another worker) idle.
                Ok(report) if report.open > 0 && report.payments_asked + report.lookups > 0 => {
                    Duration::from_millis(50)
                }
                Ok(_) => self.settings.idle_pause,
                Err(error) => {
                    tracing::warn!(%error, worker = %self.settings.name, "payout pass failed");
                    self.settings.idle_pause
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// One pass over every open payout, and every succeeded one whose
    /// credit is missing.
    pub async fn pass(&mut self) -> Result<PassReport, StoreError> {
        self.index.catch_up(self.store.as_ref()).await?;
        let mut report = PassReport::default();
        let uncredited: Vec<PayoutId> = self.index.uncredited.keys().copied().collect();
        for payout_id in uncredited {
            let (state, _) = self.load(payout_id).await?;
            match state.payout.filter(|p| p.status == PayoutStatus::Succeeded) {
                Some(payout) => {
                    if self.credit(&payout).await {
                        self.index.uncredited.remove(&payout_id);
                    }
                }
                // Not paid (yet): a later success puts it back.
                None => {
                    self.index.uncredited.remove(&payout_id);
                }
            }
        }
        let open: Vec<PayoutId> = self.index.open.keys().copied().collect();
        for payout_id in open {
            report.examined += 1;
            let final_status = self.work_on(payout_id, &mut report).await?;
            match final_status {
                Some(PayoutStatus::Succeeded | PayoutStatus::Failed | PayoutStatus::Cancelled) => {
                    self.index.open.remove(&payout_id);
                    report.settled += 1;
                }
                // Waits for an operator; a retry puts it back in the index.
                Some(PayoutStatus::Parked) => {
                    self.index.open.remove(&payout_id);
                }
                _ => report.open += 1,
            }
        }
        Ok(report)
    }

    async fn load(&self, payout_id: PayoutId) -> Result<(PayoutState, i64), StoreError> {
        let mut loaded: Loaded<PayoutState> = Loaded::default();
        loaded
            .catch_up::<Payout>(self.store.as_ref(), &payout_id.stream())
            .await?;
        Ok((loaded.state, loaded.version))
    }

    /// Decides and appends one command; `None` when another worker moved the
    /// payout first (or the command does not fit any more).
    async fn step(
        &self,
        payout_id: PayoutId,
        state: &PayoutState,
        version: i64,
        command: PayoutCommand,
    ) -> Result<Option<()>, StoreError> {
        let now = self.clock.now();
        let Ok(events) = Payout::decide(state, &command, now) else {
            return Ok(None);
        };
        let metadata = self.context().metadata(Some(payout_id.0), None);
        match self
            .store
            .append(
                &payout_id.stream(),
                expected_after(version),
                encode_all(&events, &metadata),
            )
            .await
        {
            Ok(_) => Ok(Some(())),
            Err(StoreError::Conflict(_)) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Moves one payout as far as it can go now; returns its status after.
    async fn work_on(
        &mut self,
        payout_id: PayoutId,
        report: &mut PassReport,
    ) -> Result<Option<PayoutStatus>, StoreError> {
        for _ in 0..PAYOUT_STEPS_MAX {
            let (state, version) = self.load(payout_id).await?;
            let Some(payout) = state.payout.clone() else {
                return Ok(None);
            };
            let now = self.clock.now();
            let command = match payout.status {
                PayoutStatus::Succeeded => {
                    if self.credit(&payout).await {
                        self.index.uncredited.remove(&payout_id);
                    }
                    return Ok(Some(PayoutStatus::Succeeded));
                }
                PayoutStatus::Failed | PayoutStatus::Parked | PayoutStatus::Cancelled => {
                    return Ok(Some(payout.status));
                }
                PayoutStatus::InFlight => {
                    let lease_until = payout.lease_until.expect("BUG: in flight without a lease");
                    if now < lease_until {
                        return Ok(Some(PayoutStatus::InFlight)); // Another worker's.
                    }
                    PayoutCommand::ExpireLease
                }
                PayoutStatus::Unknown => {
                    if self.not_before.get(&payout_id).is_some_and(|t| now < *t) {
                        return Ok(Some(PayoutStatus::Unknown));
                    }
                    // Until the last claim's lease ends, a payment may still
                    // be landing: a lookup then could not say "no payment".
                    if let Some(until) = payout.last_lease_until
                        && now < until
                    {
                        self.not_before.insert(payout_id, until);
                        return Ok(Some(PayoutStatus::Unknown));
                    }
                    let unknown_since = payout.last_lease_until.unwrap_or(now);
                    if now >= unknown_since + self.settings.park_unknown_after {
                        let reason = format!(
                            "outcome unknown for more than {} s after the last claim",
                            self.settings.park_unknown_after.num_seconds()
                        );
                        self.park(payout_id, &state, version, reason, report)
                            .await?;
                        continue;
                    }
                    report.lookups += 1;
                    match self.provider.lookup(&payout.idempotency_key()).await {
                        LookupOutcome::Found(finding) => PayoutCommand::Reconcile { finding },
                        LookupOutcome::Unknown { detail } => {
                            tracing::info!(%payout_id, %detail, "provider cannot tell yet");
                            self.not_before
                                .insert(payout_id, now + self.backoff(payout.attempts));
                            return Ok(Some(PayoutStatus::Unknown));
                        }
                    }
                }
                PayoutStatus::Scheduled => {
                    if payout.attempts >= payout.attempts_allowed {
                        let reason = format!("spent {} attempts", payout.attempts);
                        self.park(payout_id, &state, version, reason, report)
                            .await?;
                        continue;
                    }
                    if self.not_before.get(&payout_id).is_some_and(|t| now < *t) {
                        return Ok(Some(PayoutStatus::Scheduled));
                    }
                    let lease_until = now + self.settings.lease;
                    if self
                        .step(
                            payout_id,
                            &state,
                            version,
                            PayoutCommand::Attempt { lease_until },
                        )
                        .await?
                        .is_none()
                    {
                        report.conflicts += 1;
                        return Ok(Some(PayoutStatus::InFlight));
                    }
                    // The claim is durable now; call only if its lease still
                    // covers a whole call from here (a slow append, a paused
                    // process). Otherwise leave the attempt to expire: a
                    // lookup after its lease settles it, so no two calls for
                    // one payout are ever in flight at once.
                    let claimed_at = self.clock.now();
                    if claimed_at + self.settings.call_timeout >= lease_until {
                        tracing::warn!(%payout_id, %lease_until, %claimed_at,
                            "claim recorded too late to cover a provider call; leaving it to expire");
                        report.lease_too_short += 1;
                        return Ok(Some(PayoutStatus::InFlight));
                    }
                    report.payments_asked += 1;
                    let attempt = payout.attempts + 1;
                    let outcome = self.provider.pay(&payment(&payout)).await;
                    let command = match outcome {
                        PaymentOutcome::Paid { payment_id } => PayoutCommand::RecordSucceeded {
                            attempt,
                            provider_ref: payment_id,
                        },
                        PaymentOutcome::Refused { reason } => {
                            PayoutCommand::RecordFailed { attempt, reason }
                        }
                        PaymentOutcome::Unknown { detail } => {
                            PayoutCommand::RecordUnknown { attempt, detail }
                        }
                    };
                    let (state, version) = self.load(payout_id).await?;
                    if self
                        .step(payout_id, &state, version, command)
                        .await?
                        .is_none()
                    {
                        // Our lease ran out and another worker expired the
                        // claim: what we heard is for a lookup to confirm.
                        // Never go round again here after calling the
                        // provider.
                        tracing::warn!(%payout_id, attempt, "outcome arrived after the claim was expired");
                        report.conflicts += 1;
                        return Ok(state.payout.map(|p| p.status));
                    }
                    if let Some(PayoutStatus::Succeeded) =
                        self.load(payout_id).await?.0.payout.map(|p| p.status)
                    {
                        report.succeeded += 1;
                    }
                    continue;
                }
            };
            let (state, version) = self.load(payout_id).await?;
            if self
                .step(payout_id, &state, version, command)
                .await?
                .is_none()
            {
                report.conflicts += 1;
                continue;
            }
            match self.load(payout_id).await?.0.payout.map(|p| p.status) {
                Some(PayoutStatus::Succeeded) => report.succeeded += 1,
                Some(PayoutStatus::Scheduled) => {
                    // The provider had no payment under the key: try again
                    // after a pause, with the same key.
                    self.not_before
                        .insert(payout_id, now + self.backoff(payout.attempts));
                }
                _ => {}
            }
        }
        Ok(self.load(payout_id).await?.0.payout.map(|p| p.status))
    }

    /// Parks a payout (it waits for an operator); logged once, by the
    /// worker whose append parks it.
    async fn park(
        &self,
        payout_id: PayoutId,
        state: &PayoutState,
        version: i64,
        reason: String,
        report: &mut PassReport,
    ) -> Result<(), StoreError> {
        let command = PayoutCommand::Park {
            reason: reason.clone(),
        };
        if self
            .step(payout_id, state, version, command)
            .await?
            .is_some()
        {
            report.parked += 1;
            self.engine.note_payout_parked();
            tracing::error!(%payout_id, %reason, "payout parked; an operator must retry or cancel it");
        } else {
            report.conflicts += 1;
        }
        Ok(())
    }

    /// The pause before retrying a payout after `attempts` attempts:
    /// `retry_pause` doubled per attempt, at most 64 times as long.
    fn backoff(&self, attempts: u32) -> chrono::Duration {
        self.settings.retry_pause * (1i32 << attempts.min(6))
    }

    /// Credits a succeeded payout to its holder (idempotent); false if the
    /// credit could not be made now.
    async fn credit(&self, payout: &ScheduledPayout) -> bool {
        let command = AccountCommand::CreditPayout {
            payout_id: payout.payout_id,
            product_id: payout.product_id.clone(),
            kind: payout.kind,
            amount: payout.amount,
        };
        match self
            .engine
            .account_command(payout.account_id, command, self.context())
            .await
        {
            Ok(_) => true,
            Err(error) => {
                tracing::warn!(payout_id = %payout.payout_id, %error, "payout credit failed; retried next pass");
                false
            }
        }
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

/// Why an operator's action on a payout was refused.
#[derive(Debug, thiserror::Error)]
pub enum PayoutActionError {
    /// No such payout.
    #[error("no such payout")]
    NotFound,
    /// The payout is not in a state the action applies to.
    #[error("{0}")]
    Conflict(String),
    /// The provider could not be asked (or none is configured).
    #[error("the payment provider cannot tell now: {0}")]
    ProviderUnavailable(String),
    /// Another worker or operator kept moving the payout; try again.
    #[error("the payout kept changing; try again")]
    Contention,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What an operator's action appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayoutActionReport {
    /// The payout's status after it.
    pub status: PayoutStatus,
    /// The position the action's event reached.
    pub position: i64,
}

/// An operator sends a parked payout back to work (`PayoutRetried`): the
/// provider is asked about its key before any new attempt.
pub async fn retry_parked(
    store: &dyn EventStore,
    clock: &dyn Clock,
    payout_id: PayoutId,
    context: &RequestContext,
) -> Result<PayoutActionReport, PayoutActionError> {
    act_on_parked(store, clock, payout_id, context, PayoutCommand::Retry).await
}

/// An operator cancels a parked payout, once the provider's own record
/// shows no payment for its key (asked here, after the last claim's lease).
/// The payout stays in the log as `cancelled`: its entitlement stays used
/// and it is never created again.
pub async fn cancel_parked(
    store: &dyn EventStore,
    provider: Option<&dyn PaymentProvider>,
    clock: &dyn Clock,
    payout_id: PayoutId,
    context: &RequestContext,
) -> Result<PayoutActionReport, PayoutActionError> {
    let payout = load_payout(store, payout_id).await?.0;
    if payout.status != PayoutStatus::Parked {
        return Err(not_parked(&payout));
    }
    // Without a provider nobody can confirm that no payment was made.
    let Some(provider) = provider else {
        return Err(PayoutActionError::Conflict(
            "no payment provider is configured on this node: nothing can confirm the payout was not paid".into(),
        ));
    };
    let finding = match provider.lookup(&payout.idempotency_key()).await {
        LookupOutcome::Found(finding) => finding,
        LookupOutcome::Unknown { detail } => {
            return Err(PayoutActionError::ProviderUnavailable(detail));
        }
    };
    act_on_parked(
        store,
        clock,
        payout_id,
        context,
        PayoutCommand::Cancel { finding },
    )
    .await
}

fn not_parked(payout: &ScheduledPayout) -> PayoutActionError {
    PayoutActionError::Conflict(format!(
        "the payout is {}, not parked",
        payout.status.name()
    ))
}

async fn load_payout(
    store: &dyn EventStore,
    payout_id: PayoutId,
) -> Result<(ScheduledPayout, i64), PayoutActionError> {
    let mut loaded: Loaded<PayoutState> = Loaded::default();
    loaded
        .catch_up::<Payout>(store, &payout_id.stream())
        .await?;
    let payout = loaded.state.payout.ok_or(PayoutActionError::NotFound)?;
    Ok((payout, loaded.version))
}

async fn act_on_parked(
    store: &dyn EventStore,
    clock: &dyn Clock,
    payout_id: PayoutId,
    context: &RequestContext,
    command: PayoutCommand,
) -> Result<PayoutActionReport, PayoutActionError> {
    for _round in 0..PAYOUT_STEPS_MAX {
        let (payout, version) = load_payout(store, payout_id).await?;
        if payout.status != PayoutStatus::Parked {
            return Err(not_parked(&payout));
        }
        let state = PayoutState {
            payout: Some(payout),
        };
        let events = Payout::decide(&state, &command, clock.now())
            .map_err(|rejection| PayoutActionError::Conflict(rejection.to_string()))?;
        let metadata = context.metadata(Some(payout_id.0), None);
        match store
            .append(
                &payout_id.stream(),
                expected_after(version),
                encode_all(&events, &metadata),
            )
            .await
        {
            Ok(appended) => {
                let status = events
                    .iter()
                    .fold(state, Payout::evolve)
                    .payout
                    .map(|p| p.status)
                    .expect("BUG: a scheduled payout stays scheduled");
                return Ok(PayoutActionReport {
                    status,
                    position: appended.last_position,
                });
            }
            Err(StoreError::Conflict(_)) => continue,
            Err(error) => return Err(error.into()),
        }
    }
    Err(PayoutActionError::Contention)
}
