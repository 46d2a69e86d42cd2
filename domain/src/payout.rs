//! One payout of interest or principal to one holder for one period.
//!
//! The provider may time out or answer ambiguously, so an attempt is recorded
//! (`payout_attempted`) before the provider is called, every attempt uses the
//! same idempotency key, and an unknown outcome must be reconciled by asking
//! the provider before any new attempt.

use crate::decider::{Decider, EventType};
use crate::ids::{AccountId, PayoutId, ProductId, validate_reference};
use crate::money::{Amount, Currency};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most attempts a payout may make before an operator must step in.
pub const PAYOUT_ATTEMPTS_MAX: u32 = 8;

/// Interest is computed in units of 1/`INTEREST_DENOMINATOR` of a minor
/// unit: principal × annual_rate_bps × days over 365 days × 10,000 bps.
pub const INTEREST_DENOMINATOR: u128 = 365 * 10_000;
/// Longest interest run accepted, in days: a run never passes the
/// product's own term, which is at most this.
pub const INTEREST_DAYS_MAX: u32 = crate::product::TERM_DAYS_MAX;

/// A holder's interest for a period, rounded down to a whole minor unit,
/// and the remainder left behind, in 1/`INTEREST_DENOMINATOR` of a minor
/// unit. The rule: each holder is paid the floor of their exact interest;
/// the remainders stay with the product's interest account (no posting moves
/// them) and a run records their sum, so paid + remainders / denominator is
/// exactly the interest owed.
pub fn interest_for(principal: Amount, annual_rate_bps: u32, days: u32) -> (Amount, u128) {
    let exact = u128::from(principal.minor().unsigned_abs())
        * u128::from(annual_rate_bps)
        * u128::from(days);
    let paid = exact / INTEREST_DENOMINATOR;
    let paid = i64::try_from(paid).expect("BUG: interest above i64 for a bounded principal");
    (
        Amount::new(paid).expect("BUG: floor of a non-negative value is non-negative"),
        exact % INTEREST_DENOMINATOR,
    )
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

/// Each holder's payout: interest for `days` rounded down (remainders kept),
/// or the principal.
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

/// The record of one scheduling run for a product, period and kind
/// (stream `payrun-{id}`), written by versions before payout runs were
/// planned in the product stream (`ProductEvent::PayoutRunPlanned`); kept
/// so old logs still decode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum PayoutRunEvent {
    /// The payouts of a period were scheduled.
    PayoutRunScheduled {
        /// The product paying.
        product_id: ProductId,
        /// The period label.
        period: String,
        /// Interest or principal.
        kind: PayoutKind,
        /// Days of interest (interest runs only).
        days: Option<u32>,
        /// Holders of confirmed orders.
        holders: u32,
        /// Payouts (holders whose amount rounds to zero get none).
        payouts: u32,
        /// Sum of the holders' principal.
        principal_total: Amount,
        /// Sum of the payouts' amounts.
        paid_total: Amount,
        /// Sum of the rounding remainders, in 1/`denominator` of a minor
        /// unit (interest runs; zero for principal).
        remainder_total: u64,
        /// `INTEREST_DENOMINATOR`.
        denominator: u64,
    },
}

impl EventType for PayoutRunEvent {
    fn event_type(&self) -> &'static str {
        match self {
            PayoutRunEvent::PayoutRunScheduled { .. } => "payout_run_scheduled",
        }
    }
}

/// What a payout pays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayoutKind {
    /// Interest for a period.
    Interest,
    /// The principal, at maturity.
    Principal,
}

/// Where a payout stands (the API's `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayoutStatus {
    /// Created; no attempt in progress.
    Scheduled,
    /// An attempt is claimed and the provider may be being called.
    InFlight,
    /// The provider's answer was ambiguous; must be reconciled.
    Unknown,
    /// Paid. Final.
    Succeeded,
    /// Definitively refused by the provider. Final.
    Failed,
    /// Spent its attempts, or stayed unknown too long: waits for an
    /// operator to retry or cancel it.
    Parked,
    /// Cancelled by an operator after the provider showed no payment for
    /// its key. Final; its entitlement stays used.
    Cancelled,
}

impl PayoutStatus {
    /// The status as the API and read models name it.
    pub fn name(self) -> &'static str {
        match self {
            PayoutStatus::Scheduled => "scheduled",
            PayoutStatus::InFlight => "in_flight",
            PayoutStatus::Unknown => "unknown",
            PayoutStatus::Succeeded => "succeeded",
            PayoutStatus::Failed => "failed",
            PayoutStatus::Parked => "parked",
            PayoutStatus::Cancelled => "cancelled",
        }
    }

    /// Every status, in the order a payout may pass through them.
    pub const ALL: [PayoutStatus; 7] = [
        PayoutStatus::Scheduled,
        PayoutStatus::InFlight,
        PayoutStatus::Unknown,
        PayoutStatus::Succeeded,
        PayoutStatus::Failed,
        PayoutStatus::Parked,
        PayoutStatus::Cancelled,
    ];
}

/// What asking the provider about a payout's key found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ProviderFinding {
    /// The provider paid it.
    Paid {
        /// The provider's payment id.
        provider_ref: String,
    },
    /// The provider refused it.
    Refused {
        /// The provider's reason.
        reason: String,
    },
    /// The provider has no payment under the key: it is safe to attempt again.
    NotFound,
}

/// A scheduled payout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledPayout {
    /// The payout.
    pub payout_id: PayoutId,
    /// The product paying.
    pub product_id: ProductId,
    /// The holder paid.
    pub account_id: AccountId,
    /// The period label, e.g. `2026-11`.
    pub period: String,
    /// Interest or principal.
    pub kind: PayoutKind,
    /// How much.
    pub amount: Amount,
    /// In what (the product's currency).
    pub currency: Currency,
    /// Where it stands.
    pub status: PayoutStatus,
    /// Attempts claimed so far.
    pub attempts: u32,
    /// Attempts allowed before it is parked (`PAYOUT_ATTEMPTS_MAX`, raised
    /// by as much on every operator retry).
    pub attempts_allowed: u32,
    /// Parked with the last attempt's outcome unknown: a retry resumes at
    /// the lookup, never at a new attempt.
    pub parked_unresolved: bool,
    /// Until when the current attempt's claim holds.
    pub lease_until: Option<DateTime<Utc>>,
    /// Until when the last attempt's claim held (kept after it ended): a
    /// lookup may call a payment missing only after it, so a payment the
    /// provider was still committing when the caller gave up is not taken
    /// for absent.
    pub last_lease_until: Option<DateTime<Utc>>,
    /// The provider's payment id, once paid.
    pub provider_ref: Option<String>,
}

impl ScheduledPayout {
    /// The idempotency key sent to the provider on every attempt.
    pub fn idempotency_key(&self) -> String {
        self.payout_id.to_string()
    }
}

/// A payout stream's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PayoutState {
    /// The payout, once scheduled.
    pub payout: Option<ScheduledPayout>,
}

/// What may be asked of a payout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayoutCommand {
    /// Create the payout.
    Schedule {
        /// The payout.
        payout_id: PayoutId,
        /// The product paying.
        product_id: ProductId,
        /// The holder paid.
        account_id: AccountId,
        /// Period label.
        period: String,
        /// Interest or principal.
        kind: PayoutKind,
        /// How much.
        amount: Amount,
        /// In what.
        currency: Currency,
    },
    /// Claim an attempt until `lease_until`, before calling the provider.
    Attempt {
        /// Until when the claim holds.
        lease_until: DateTime<Utc>,
    },
    /// The provider paid.
    RecordSucceeded {
        /// The attempt whose call this answers.
        attempt: u32,
        /// The provider's payment id.
        provider_ref: String,
    },
    /// The provider definitively refused.
    RecordFailed {
        /// The attempt whose call this answers.
        attempt: u32,
        /// The provider's reason.
        reason: String,
    },
    /// The provider's answer was ambiguous (timeout, 5xx, reset).
    RecordUnknown {
        /// The attempt whose call this answers.
        attempt: u32,
        /// What was seen.
        detail: String,
    },
    /// The claim's lease ran out without an outcome (the worker died).
    ExpireLease,
    /// The provider was asked about the key.
    Reconcile {
        /// What it said.
        finding: ProviderFinding,
    },
    /// Stop trying until an operator looks: the attempts are spent, or the
    /// outcome stayed unknown too long.
    Park {
        /// Why.
        reason: String,
    },
    /// An operator sends a parked payout back to work.
    Retry,
    /// An operator cancels a parked payout; `finding` is what the provider
    /// said of its key just now, which must be "no such payment".
    Cancel {
        /// What the provider said.
        finding: ProviderFinding,
    },
}

/// Why a payout command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayoutRejection {
    /// Not scheduled yet.
    #[error("payout is not scheduled")]
    NotScheduled,
    /// Already scheduled.
    #[error("payout is already scheduled")]
    AlreadyScheduled,
    /// Amount zero.
    #[error("payout amount must be positive")]
    NonPositiveAmount,
    /// Bad period label.
    #[error("invalid period label")]
    InvalidPeriod,
    /// The command does not fit the current status.
    #[error("payout is {0:?}")]
    WrongStatus(PayoutStatus),
    /// The attempt budget is spent.
    #[error("payout made {PAYOUT_ATTEMPTS_MAX} attempts already")]
    TooManyAttempts,
    /// The lease has not run out.
    #[error("attempt is leased until {0}")]
    LeaseHeld(DateTime<Utc>),
    /// The provider shows a payment (or a refusal) for the key: a cancel
    /// would hide it.
    #[error("the provider has a record for this payout's key: {0:?}")]
    ProviderHasRecord(ProviderFinding),
    /// An outcome for another attempt than the one in flight (a stale
    /// worker's).
    #[error("outcome of attempt {got}, but attempt {current} is the latest")]
    StaleAttempt {
        /// The attempt the outcome names.
        got: u32,
        /// The latest attempt.
        current: u32,
    },
}

/// What happened to a payout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum PayoutEvent {
    /// The payout exists.
    PayoutScheduled {
        /// The payout.
        payout_id: PayoutId,
        /// The product paying.
        product_id: ProductId,
        /// The holder paid.
        account_id: AccountId,
        /// Period label.
        period: String,
        /// Interest or principal.
        kind: PayoutKind,
        /// How much.
        amount: Amount,
        /// In what (absent in events from before products had a currency
        /// on payouts: CNY).
        #[serde(default)]
        currency: Currency,
    },
    /// An attempt was claimed; the provider is about to be called.
    PayoutAttempted {
        /// 1-based attempt number.
        attempt: u32,
        /// The key sent to the provider (the same on every attempt).
        idempotency_key: String,
        /// Until when the claim holds.
        lease_until: DateTime<Utc>,
    },
    /// Paid.
    PayoutSucceeded {
        /// The provider's payment id.
        provider_ref: String,
    },
    /// Definitively refused.
    PayoutFailed {
        /// The provider's reason.
        reason: String,
    },
    /// Ambiguous outcome.
    PayoutOutcomeUnknown {
        /// What was seen.
        detail: String,
    },
    /// An unknown outcome was resolved by asking the provider.
    PayoutReconciled {
        /// What the provider said.
        finding: ProviderFinding,
    },
    /// Parked until an operator retries or cancels it.
    PayoutParked {
        /// Why.
        reason: String,
        /// Whether the last attempt's outcome is still unknown.
        unresolved: bool,
    },
    /// An operator sent it back to work, with `PAYOUT_ATTEMPTS_MAX` more
    /// attempts; the provider is asked about the key before any of them.
    PayoutRetried {},
    /// An operator cancelled it after the provider showed no payment.
    PayoutCancelled {
        /// What the provider said of the key when it was cancelled.
        finding: ProviderFinding,
    },
}

impl EventType for PayoutEvent {
    fn event_type(&self) -> &'static str {
        match self {
            PayoutEvent::PayoutScheduled { .. } => "payout_scheduled",
            PayoutEvent::PayoutAttempted { .. } => "payout_attempted",
            PayoutEvent::PayoutSucceeded { .. } => "payout_succeeded",
            PayoutEvent::PayoutFailed { .. } => "payout_failed",
            PayoutEvent::PayoutOutcomeUnknown { .. } => "payout_outcome_unknown",
            PayoutEvent::PayoutReconciled { .. } => "payout_reconciled",
            PayoutEvent::PayoutParked { .. } => "payout_parked",
            PayoutEvent::PayoutRetried {} => "payout_retried",
            PayoutEvent::PayoutCancelled { .. } => "payout_cancelled",
        }
    }
}

/// The payout decider.
pub struct Payout;

impl Decider for Payout {
    type State = PayoutState;
    type Command = PayoutCommand;
    type Event = PayoutEvent;
    type Rejection = PayoutRejection;

    fn decide(
        state: &PayoutState,
        command: &PayoutCommand,
        now: DateTime<Utc>,
    ) -> Result<Vec<PayoutEvent>, PayoutRejection> {
        let payout = match (&state.payout, command) {
            (None, PayoutCommand::Schedule { .. }) => return decide_schedule(command),
            (None, _) => return Err(PayoutRejection::NotScheduled),
            (Some(_), PayoutCommand::Schedule { .. }) => {
                return Err(PayoutRejection::AlreadyScheduled);
            }
            (Some(payout), _) => payout,
        };
        use PayoutStatus::{InFlight, Parked, Scheduled, Unknown};
        let event = match (payout.status, command) {
            (Scheduled, PayoutCommand::Attempt { lease_until }) => {
                if payout.attempts >= payout.attempts_allowed {
                    return Err(PayoutRejection::TooManyAttempts);
                }
                PayoutEvent::PayoutAttempted {
                    attempt: payout.attempts + 1,
                    idempotency_key: payout.idempotency_key(),
                    lease_until: *lease_until,
                }
            }
            (
                InFlight,
                PayoutCommand::RecordSucceeded { attempt, .. }
                | PayoutCommand::RecordFailed { attempt, .. }
                | PayoutCommand::RecordUnknown { attempt, .. },
            ) if *attempt != payout.attempts => {
                return Err(PayoutRejection::StaleAttempt {
                    got: *attempt,
                    current: payout.attempts,
                });
            }
            (InFlight, PayoutCommand::RecordSucceeded { provider_ref, .. }) => {
                PayoutEvent::PayoutSucceeded {
                    provider_ref: provider_ref.clone(),
                }
            }
            (InFlight, PayoutCommand::RecordFailed { reason, .. }) => PayoutEvent::PayoutFailed {
                reason: reason.clone(),
            },
            (InFlight, PayoutCommand::RecordUnknown { detail, .. }) => {
                PayoutEvent::PayoutOutcomeUnknown {
                    detail: detail.clone(),
                }
            }
            (InFlight, PayoutCommand::ExpireLease) => {
                let lease_until = payout.lease_until.expect("BUG: in flight without a lease");
                if now < lease_until {
                    return Err(PayoutRejection::LeaseHeld(lease_until));
                }
                PayoutEvent::PayoutOutcomeUnknown {
                    detail: "lease expired without an outcome".to_owned(),
                }
            }
            (Unknown, PayoutCommand::Reconcile { finding }) => {
                // "No such payment" counts only once the last claim's lease
                // is over: until then the call may still be landing.
                if let (ProviderFinding::NotFound, Some(until)) = (finding, payout.last_lease_until)
                    && now < until
                {
                    return Err(PayoutRejection::LeaseHeld(until));
                }
                PayoutEvent::PayoutReconciled {
                    finding: finding.clone(),
                }
            }
            // Parked only when no new attempt may be made, or when the
            // outcome stayed unknown (the caller bounds how long).
            (Scheduled, PayoutCommand::Park { reason })
                if payout.attempts >= payout.attempts_allowed =>
            {
                PayoutEvent::PayoutParked {
                    reason: reason.clone(),
                    unresolved: false,
                }
            }
            (Unknown, PayoutCommand::Park { reason }) => PayoutEvent::PayoutParked {
                reason: reason.clone(),
                unresolved: true,
            },
            (Scheduled, PayoutCommand::Park { .. }) => {
                return Err(PayoutRejection::WrongStatus(Scheduled));
            }
            (Parked, PayoutCommand::Retry) => PayoutEvent::PayoutRetried {},
            (Parked, PayoutCommand::Cancel { finding }) => {
                if *finding != ProviderFinding::NotFound {
                    return Err(PayoutRejection::ProviderHasRecord(finding.clone()));
                }
                // A call may still be landing until the last claim ends.
                if let Some(until) = payout.last_lease_until
                    && now < until
                {
                    return Err(PayoutRejection::LeaseHeld(until));
                }
                PayoutEvent::PayoutCancelled {
                    finding: finding.clone(),
                }
            }
            (status, _) => return Err(PayoutRejection::WrongStatus(status)),
        };
        Ok(vec![event])
    }

    fn evolve(mut state: PayoutState, event: &PayoutEvent) -> PayoutState {
        if let PayoutEvent::PayoutScheduled {
            payout_id,
            product_id,
            account_id,
            period,
            kind,
            amount,
            currency,
        } = event
        {
            assert!(state.payout.is_none(), "BUG: payout scheduled twice");
            state.payout = Some(ScheduledPayout {
                payout_id: *payout_id,
                product_id: product_id.clone(),
                account_id: *account_id,
                period: period.clone(),
                kind: *kind,
                amount: *amount,
                currency: *currency,
                status: PayoutStatus::Scheduled,
                attempts: 0,
                attempts_allowed: PAYOUT_ATTEMPTS_MAX,
                parked_unresolved: false,
                lease_until: None,
                last_lease_until: None,
                provider_ref: None,
            });
            return state;
        }
        let payout = state
            .payout
            .as_mut()
            .expect("BUG: payout event before scheduling");
        evolve_scheduled(payout, event);
        state
    }
}

fn decide_schedule(command: &PayoutCommand) -> Result<Vec<PayoutEvent>, PayoutRejection> {
    let PayoutCommand::Schedule {
        payout_id,
        product_id,
        account_id,
        period,
        kind,
        amount,
        currency,
    } = command
    else {
        unreachable!("BUG: decide_schedule called with another command")
    };
    if amount.is_zero() || !amount.within_limit() {
        return Err(PayoutRejection::NonPositiveAmount);
    }
    validate_reference(period).map_err(|_| PayoutRejection::InvalidPeriod)?;
    Ok(vec![PayoutEvent::PayoutScheduled {
        payout_id: *payout_id,
        product_id: product_id.clone(),
        account_id: *account_id,
        period: period.clone(),
        kind: *kind,
        amount: *amount,
        currency: *currency,
    }])
}

fn evolve_scheduled(payout: &mut ScheduledPayout, event: &PayoutEvent) {
    let expect_status = |payout: &ScheduledPayout, expected: PayoutStatus| {
        assert_eq!(payout.status, expected, "BUG: payout event out of order");
    };
    match event {
        PayoutEvent::PayoutScheduled { .. } => unreachable!("BUG: handled by evolve"),
        PayoutEvent::PayoutAttempted {
            attempt,
            lease_until,
            ..
        } => {
            expect_status(payout, PayoutStatus::Scheduled);
            assert_eq!(
                *attempt,
                payout.attempts + 1,
                "BUG: attempts not contiguous"
            );
            payout.attempts = *attempt;
            payout.lease_until = Some(*lease_until);
            payout.last_lease_until = Some(*lease_until);
            payout.status = PayoutStatus::InFlight;
        }
        PayoutEvent::PayoutSucceeded { provider_ref } => {
            expect_status(payout, PayoutStatus::InFlight);
            payout.provider_ref = Some(provider_ref.clone());
            payout.status = PayoutStatus::Succeeded;
        }
        PayoutEvent::PayoutFailed { .. } => {
            expect_status(payout, PayoutStatus::InFlight);
            payout.status = PayoutStatus::Failed;
        }
        PayoutEvent::PayoutOutcomeUnknown { .. } => {
            expect_status(payout, PayoutStatus::InFlight);
            payout.status = PayoutStatus::Unknown;
        }
        PayoutEvent::PayoutReconciled { finding } => {
            expect_status(payout, PayoutStatus::Unknown);
            payout.status = match finding {
                ProviderFinding::Paid { provider_ref } => {
                    payout.provider_ref = Some(provider_ref.clone());
                    PayoutStatus::Succeeded
                }
                ProviderFinding::Refused { .. } => PayoutStatus::Failed,
                ProviderFinding::NotFound => PayoutStatus::Scheduled,
            };
        }
        PayoutEvent::PayoutParked { unresolved, .. } => {
            let from = if *unresolved {
                PayoutStatus::Unknown
            } else {
                PayoutStatus::Scheduled
            };
            expect_status(payout, from);
            payout.parked_unresolved = *unresolved;
            payout.status = PayoutStatus::Parked;
        }
        PayoutEvent::PayoutRetried {} => {
            expect_status(payout, PayoutStatus::Parked);
            payout.attempts_allowed = payout.attempts + PAYOUT_ATTEMPTS_MAX;
            // Back to work by way of a lookup: the provider is asked about
            // the key before any new attempt, even if the last lookup said
            // "no such payment" (a late payment may have landed since). A
            // parked payout has always made an attempt: it is parked with
            // its attempts spent, or with an attempt's outcome unknown.
            payout.status = PayoutStatus::Unknown;
            payout.parked_unresolved = false;
        }
        PayoutEvent::PayoutCancelled { .. } => {
            expect_status(payout, PayoutStatus::Parked);
            payout.status = PayoutStatus::Cancelled;
        }
    }
    if payout.status != PayoutStatus::InFlight {
        payout.lease_until = None;
    }
}
