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
//! id). Workers (`worker`) find their work in the engine's payout index
//! (`index`), followed from the log, and keep many calls in flight with
//! claims and outcomes appended in batches.

use crate::aggregate::{Loaded, encode_all, expected_after};
use crate::clock::Clock;
use crate::context::RequestContext;
use async_trait::async_trait;
use chrono::Utc;
use domain::payout::{
    Payout, PayoutCommand, PayoutEvent, PayoutKind, PayoutState, PayoutStatus, PlannedPayout,
    ProviderFinding, ScheduledPayout, plan,
};
use domain::product::{PayoutRun, ProductCommand, ProductRejection, ProductSale, Sale};
use domain::{AccountId, Amount, Currency, Decider, PayoutId, ProductId};
use std::time::Duration;
use store::{EventStore, ExpectedVersion, StoreError, StreamAppend, StreamOutcome};
use uuid::Uuid;

mod index;
mod worker;

pub use index::{IndexedPayout, Partition, PayoutIndex};
pub use worker::{
    CLAIM_BATCH_MAX, CONCURRENCY_MAX, Pacer, PassReport, PayoutWorker, RECORD_BATCH_MAX,
    WorkerSettings,
};

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

/// Creates whatever payouts of a run already planned in the product stream
/// do not exist yet: what a scheduler that stopped between the plan and its
/// payouts (a crash, a failed append) left undone. The recovery sweep calls
/// it for runs whose payouts it has not all seen; payout ids are fixed by
/// the run, so a payout created meanwhile is never created twice.
pub async fn complete_run(
    store: &dyn EventStore,
    product_id: &ProductId,
    period: &str,
) -> Result<ScheduleReport, ScheduleError> {
    let mut product = Loaded::default();
    product
        .catch_up::<ProductSale>(store, &product_id.stream())
        .await?;
    let sale = product
        .state
        .sale
        .as_ref()
        .ok_or(ScheduleError::UnknownProduct)?;
    let run =
        sale.payouts.runs.get(period).ok_or_else(|| {
            ScheduleError::Invalid(format!("no payout run {period:?} is planned"))
        })?;
    let request = ScheduleRequest {
        product_id: product_id.clone(),
        period: period.to_owned(),
        kind: run.kind,
        days: run.days,
        context: RequestContext::system(),
    };
    create_payouts(store, &request, sale, run).await
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
    /// The provider's rate limit (429): the payment was not taken. Not a
    /// refusal and not an attempt's outcome: the call is made again with
    /// the same key after the pause, while the claim still covers it.
    Throttled {
        /// How long the provider asked to wait (`Retry-After`), if it said.
        retry_after: Option<Duration>,
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
    /// The provider's rate limit (429): ask again after the pause.
    Throttled {
        /// How long the provider asked to wait (`Retry-After`), if it said.
        retry_after: Option<Duration>,
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
        LookupOutcome::Throttled { .. } => {
            return Err(PayoutActionError::ProviderUnavailable(
                "the provider's rate limit was reached (429)".into(),
            ));
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
