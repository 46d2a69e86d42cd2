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
use domain::ids::validate_reference;
use domain::payout::{
    INTEREST_DAYS_MAX, INTEREST_DENOMINATOR, PAYOUT_ATTEMPTS_MAX, Payout, PayoutCommand,
    PayoutEvent, PayoutKind, PayoutRunEvent, PayoutState, PayoutStatus, ProviderFinding,
    ScheduledPayout, interest_for,
};
use domain::product::{ProductSale, ReservationState};
use domain::{AccountId, Amount, Currency, Decider, PayoutId, ProductId};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use store::{EventStore, ExpectedVersion, StoreError, StreamAppend, StreamOutcome};
use uuid::Uuid;

/// Namespace of payout ids derived from (product, period, kind, holder).
const PAYOUT_NAMESPACE: Uuid = Uuid::from_u128(0x6c65_6467_6572_2d70_6179_6f75_7473_2121);
/// Most payout streams created in one append.
pub const SCHEDULE_APPEND_MAX: usize = 500;
/// Most decide-and-append steps a worker takes on one payout in one pass.
const PAYOUT_STEPS_MAX: usize = 8;

/// The payout of one holder for one product, period and kind.
pub fn payout_id_for(
    product_id: &ProductId,
    period: &str,
    kind: PayoutKind,
    account_id: AccountId,
) -> PayoutId {
    let kind = match kind {
        PayoutKind::Interest => "interest",
        PayoutKind::Principal => "principal",
    };
    let name = format!("{product_id}/{period}/{kind}/{account_id}");
    PayoutId(Uuid::new_v5(&PAYOUT_NAMESPACE, name.as_bytes()))
}

/// The stream recording one scheduling run.
pub fn run_stream(product_id: &ProductId, period: &str, kind: PayoutKind) -> String {
    let id = payout_id_for(product_id, period, kind, AccountId(Uuid::nil()));
    format!("payrun-{id}")
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
    /// Days of interest (interest only; 1 to 3,660).
    pub days: Option<u32>,
    /// Who asked.
    pub context: RequestContext,
}

/// Why payouts could not be scheduled.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// No such product.
    #[error("no such product")]
    UnknownProduct,
    /// Principal is paid only once the sale is closed.
    #[error("the sale is still open; principal is paid after it closes")]
    SaleOpen,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
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
}

/// One holder's payout in a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedPayout {
    /// The holder.
    pub account_id: AccountId,
    /// Their confirmed principal.
    pub principal: Amount,
    /// What they are paid.
    pub amount: Amount,
    /// The rounding remainder, in 1/`INTEREST_DENOMINATOR` of a minor unit.
    pub remainder: u128,
}

/// Each holder's payout: interest rounded down (remainders kept and
/// summed), or the principal.
pub fn plan(
    holdings: &BTreeMap<AccountId, Amount>,
    annual_rate_bps: u32,
    kind: PayoutKind,
    days: u32,
) -> Vec<PlannedPayout> {
    holdings
        .iter()
        .map(|(&account_id, &principal)| {
            let (amount, remainder) = match kind {
                PayoutKind::Interest => interest_for(principal, annual_rate_bps, days),
                PayoutKind::Principal => (principal, 0),
            };
            PlannedPayout {
                account_id,
                principal,
                amount,
                remainder,
            }
        })
        .collect()
}

/// Schedules a product's payouts for a period; safe to call any number of
/// times, concurrently, from any node.
pub async fn schedule(
    store: &dyn EventStore,
    request: &ScheduleRequest,
) -> Result<ScheduleReport, ScheduleError> {
    validate_reference(&request.period).map_err(|_| {
        ScheduleError::Invalid("period must be 1 to 128 printable characters".into())
    })?;
    let days = match (request.kind, request.days) {
        (PayoutKind::Interest, Some(days)) if (1..=INTEREST_DAYS_MAX).contains(&days) => days,
        (PayoutKind::Interest, _) => {
            return Err(ScheduleError::Invalid(
                "interest needs days, 1 to 3660".into(),
            ));
        }
        (PayoutKind::Principal, None) => 0,
        (PayoutKind::Principal, Some(_)) => {
            return Err(ScheduleError::Invalid("principal takes no days".into()));
        }
    };
    let mut product = Loaded::default();
    product
        .catch_up::<ProductSale>(store, &request.product_id.stream())
        .await?;
    let Some(sale) = product.state.sale.as_ref() else {
        return Err(ScheduleError::UnknownProduct);
    };
    if request.kind == PayoutKind::Principal && sale.open {
        return Err(ScheduleError::SaleOpen);
    }
    let mut holdings: BTreeMap<AccountId, Amount> = BTreeMap::new();
    for reservation in sale.reservations.values() {
        if reservation.state == ReservationState::Confirmed {
            let held = holdings
                .entry(reservation.account_id)
                .or_insert(Amount::ZERO);
            *held = held
                .checked_add(reservation.amount)
                .expect("BUG: holdings above the quota");
        }
    }
    let planned = plan(&holdings, sale.terms.annual_rate_bps, request.kind, days);
    let mut report = ScheduleReport::default();
    let payouts: Vec<&PlannedPayout> = planned.iter().filter(|p| !p.amount.is_zero()).collect();
    report.zero = planned.len() - payouts.len();
    for chunk in payouts.chunks(SCHEDULE_APPEND_MAX) {
        let appends = chunk
            .iter()
            .map(|p| schedule_append(request, p))
            .collect::<Vec<_>>();
        for outcome in store.append_batch(appends).await? {
            match outcome {
                StreamOutcome::Appended(appended) if !appended.duplicate => report.scheduled += 1,
                StreamOutcome::Appended(_) | StreamOutcome::Conflict(_) => report.existing += 1,
            }
        }
    }
    record_run(store, request, days, &planned, payouts.len()).await?;
    Ok(report)
}

fn schedule_append(request: &ScheduleRequest, planned: &PlannedPayout) -> StreamAppend {
    let payout_id = payout_id_for(
        &request.product_id,
        &request.period,
        request.kind,
        planned.account_id,
    );
    let event = PayoutEvent::PayoutScheduled {
        payout_id,
        product_id: request.product_id.clone(),
        account_id: planned.account_id,
        period: request.period.clone(),
        kind: request.kind,
        amount: planned.amount,
    };
    let metadata = request.context.metadata(Some(payout_id.0), None);
    StreamAppend {
        stream_id: payout_id.stream(),
        expected: ExpectedVersion::NoStream,
        events: encode_all(&[event], &metadata),
    }
}

/// Records the run's totals once (the first caller's record stands).
async fn record_run(
    store: &dyn EventStore,
    request: &ScheduleRequest,
    days: u32,
    planned: &[PlannedPayout],
    payouts: usize,
) -> Result<(), StoreError> {
    let sum = |f: fn(&PlannedPayout) -> Amount| {
        planned
            .iter()
            .try_fold(Amount::ZERO, |total, p| total.checked_add(f(p)))
    };
    let remainder_total: u128 = planned.iter().map(|p| p.remainder).sum();
    let event = PayoutRunEvent::PayoutRunScheduled {
        product_id: request.product_id.clone(),
        period: request.period.clone(),
        kind: request.kind,
        days: (request.kind == PayoutKind::Interest).then_some(days),
        holders: u32::try_from(planned.len()).unwrap_or(u32::MAX),
        payouts: u32::try_from(payouts).unwrap_or(u32::MAX),
        principal_total: sum(|p| p.principal).expect("BUG: principal above i64"),
        paid_total: sum(|p| p.amount).expect("BUG: payouts above i64"),
        remainder_total: u64::try_from(remainder_total).unwrap_or(u64::MAX),
        denominator: u64::try_from(INTEREST_DENOMINATOR).expect("BUG: small constant"),
    };
    let metadata = request.context.metadata(None, None);
    let stream = run_stream(&request.product_id, &request.period, request.kind);
    match store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            encode_all(&[event], &metadata),
        )
        .await
    {
        Ok(_) | Err(StoreError::Conflict(_)) => Ok(()),
        Err(error) => Err(error),
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
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            name: "payout-worker".into(),
            lease: chrono::Duration::seconds(30),
            idle_pause: Duration::from_millis(500),
            retry_pause: chrono::Duration::seconds(1),
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
                        "payout_failed" => {
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
                Some(PayoutStatus::Succeeded | PayoutStatus::Failed) => {
                    self.index.open.remove(&payout_id);
                    report.settled += 1;
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
                PayoutStatus::Failed => return Ok(Some(PayoutStatus::Failed)),
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
                    if payout.attempts >= PAYOUT_ATTEMPTS_MAX {
                        tracing::error!(%payout_id, "payout spent its attempts; an operator must look");
                        return Ok(Some(PayoutStatus::Scheduled));
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
        currency: Currency::CNY,
    }
}
