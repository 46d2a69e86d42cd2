//! The product sale: listing, opening and closing, and quota reservations
//! (pending, with an expiry) that end confirmed or released.
//!
//! Invariant: `confirmed + pending + available = quota` and
//! `confirmed + pending <= quota`, always.

use crate::decider::{Decider, EventType};
use crate::ids::{AccountId, OrderId, ProductId, validate_reference};
use crate::money::{Amount, Currency};
use crate::payout::{INTEREST_DENOMINATOR, PayoutKind, plan};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// Longest product name accepted, in characters.
pub const PRODUCT_NAME_LENGTH_MAX: usize = 200;
/// Highest annual rate accepted, in basis points (1,000%).
pub const ANNUAL_RATE_BPS_MAX: u32 = 100_000;
/// Longest term accepted, in days (100 years).
pub const TERM_DAYS_MAX: u32 = 36_500;

/// The fixed terms a product is listed with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductTerms {
    /// Display name.
    pub name: String,
    /// Currency of every amount below.
    pub currency: Currency,
    /// Total amount that can be sold.
    pub quota: Amount,
    /// Smallest single purchase.
    pub min_purchase: Amount,
    /// Largest single purchase.
    pub max_purchase: Amount,
    /// Annual interest rate in basis points.
    pub annual_rate_bps: u32,
    /// Term in days from the sale's close to maturity.
    pub term_days: u32,
}

impl ProductTerms {
    /// Checks the terms make sense; returns what is wrong otherwise.
    pub fn validate(&self) -> Result<(), ProductRejection> {
        let invalid = |why: &str| Err(ProductRejection::InvalidTerms(why.to_owned()));
        let name_length = self.name.chars().count();
        if self.name.trim().is_empty() || name_length > PRODUCT_NAME_LENGTH_MAX {
            return invalid("name must be 1 to 200 characters");
        }
        if self.name.chars().any(char::is_control) {
            return invalid("name must not contain control characters");
        }
        if self.quota.is_zero() || !self.quota.within_limit() {
            return invalid("quota must be 1 to 10^15 minor units");
        }
        if self.min_purchase.is_zero() || self.min_purchase > self.max_purchase {
            return invalid("min_purchase must be positive and at most max_purchase");
        }
        if self.max_purchase > self.quota {
            return invalid("max_purchase must be at most the quota");
        }
        if self.annual_rate_bps > ANNUAL_RATE_BPS_MAX {
            return invalid("annual_rate_bps must be at most 100000");
        }
        if self.term_days == 0 || self.term_days > TERM_DAYS_MAX {
            return invalid("term_days must be 1 to 36500");
        }
        Ok(())
    }
}

/// Why a reservation was released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseReason {
    /// The buyer's available balance was below the amount.
    InsufficientFunds,
    /// The external payment failed.
    PaymentFailed,
    /// Cancelled by the buyer or an operator before confirmation.
    Cancelled,
    /// Not confirmed before its expiry.
    Expired,
    /// The buyer's account holds another currency than the product.
    CurrencyMismatch,
}

/// Where a reservation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReservationState {
    /// Quota held, awaiting payment.
    Pending,
    /// Paid; counts as sold.
    Confirmed,
    /// Quota returned.
    Released,
}

/// One order's hold on quota.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The buyer.
    pub account_id: AccountId,
    /// Units of quota (minor units of money).
    pub amount: Amount,
    /// After this instant a pending reservation may be expired.
    pub expires_at: DateTime<Utc>,
    /// Pending, confirmed or released.
    pub state: ReservationState,
    /// Why it was released, once it was.
    pub released_because: Option<ReleaseReason>,
}

/// Why a purchase was refused before any quota was held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    /// The sale was not open.
    SaleNotOpen,
    /// Below the minimum or above the maximum purchase.
    AmountOutOfRange,
    /// Everything was confirmed.
    SoldOut,
    /// Less was available than asked for.
    InsufficientQuota,
}

/// A purchase refused before any quota was held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The buyer.
    pub account_id: AccountId,
    /// Units asked for.
    pub amount: Amount,
    /// Why.
    pub reason: RefusalReason,
}

/// A listed product's sale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sale {
    /// The product.
    pub product_id: ProductId,
    /// Its terms.
    pub terms: ProductTerms,
    /// Whether new reservations are taken.
    pub open: bool,
    /// Whether the sale was ever opened (payouts need a sale that opened
    /// and then closed).
    pub ever_opened: bool,
    /// The payout runs planned against this product's holders.
    pub payouts: PayoutPlan,
    /// Sum of confirmed reservations.
    pub confirmed: Amount,
    /// Sum of pending reservations.
    pub pending: Amount,
    /// Number of confirmed orders.
    pub confirmed_orders: u64,
    /// Every reservation ever made, by order id.
    pub reservations: HashMap<OrderId, Reservation>,
    /// Every refused purchase, by order id.
    pub refusals: HashMap<OrderId, Refusal>,
}

/// One planned payout run: a period's interest, or the principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayoutRun {
    /// The operator's label.
    pub period: String,
    /// Interest or principal.
    pub kind: PayoutKind,
    /// Days of interest (interest only).
    pub days: Option<u32>,
    /// The first day of the term this run pays (0-based; interest runs use
    /// the term's days in order, so runs never overlap).
    pub first_day: u32,
}

/// What has been planned to pay a product's holders: the entitlement used.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PayoutPlan {
    /// Runs by period label.
    pub runs: BTreeMap<String, PayoutRun>,
    /// Days of the term whose interest is planned.
    pub interest_days: u32,
    /// Interest planned so far, summed over holders (rounded down each).
    pub interest_total: Amount,
    /// The period label the principal was planned under, once it was.
    pub principal_period: Option<String>,
}

impl PayoutPlan {
    /// Whether any payout run was planned.
    pub fn any(&self) -> bool {
        !self.runs.is_empty()
    }
}

impl Sale {
    /// Each holder's confirmed principal: what the payouts are computed on.
    pub fn holdings(&self) -> BTreeMap<AccountId, Amount> {
        let mut holdings: BTreeMap<AccountId, Amount> = BTreeMap::new();
        for reservation in self.reservations.values() {
            if reservation.state == ReservationState::Confirmed {
                let held = holdings
                    .entry(reservation.account_id)
                    .or_insert(Amount::ZERO);
                *held = held
                    .checked_add(reservation.amount)
                    .expect("BUG: holdings above the quota");
            }
        }
        holdings
    }

    /// Whether payouts may be planned: the sale opened, then closed, and
    /// nothing is still pending (so the holdings are final).
    pub fn payouts_allowed(&self) -> bool {
        self.ever_opened && !self.open && self.pending.is_zero()
    }

    /// Days of the term whose interest is not planned yet.
    pub fn interest_days_remaining(&self) -> u32 {
        self.terms
            .term_days
            .saturating_sub(self.payouts.interest_days)
    }

    /// Quota neither pending nor confirmed.
    pub fn available(&self) -> Amount {
        self.terms
            .quota
            .checked_sub(self.pending)
            .and_then(|rest| rest.checked_sub(self.confirmed))
            .expect("BUG: pending + confirmed exceeds the quota")
    }

    /// The sale's display status.
    pub fn status(&self) -> SaleStatus {
        if self.confirmed == self.terms.quota {
            SaleStatus::SoldOut
        } else if self.available().is_zero() {
            SaleStatus::FullyReserved
        } else if self.open {
            SaleStatus::Open
        } else {
            SaleStatus::Closed
        }
    }
}

/// What the progress view shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SaleStatus {
    /// Not taking reservations.
    Closed,
    /// Taking reservations.
    Open,
    /// Nothing available, but some quota is pending and may come back.
    FullyReserved,
    /// All quota confirmed.
    SoldOut,
}

/// A product stream's state: nothing until listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProductState {
    /// The sale, once listed.
    pub sale: Option<Sale>,
}

/// What may be asked of a product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProductCommand {
    /// List a new product; it starts closed.
    List {
        /// Id of the new product.
        product_id: ProductId,
        /// Its terms.
        terms: ProductTerms,
    },
    /// Start taking reservations.
    Open,
    /// Stop taking reservations.
    Close,
    /// Hold quota for an order until `expires_at`.
    Reserve {
        /// The order, also the reservation's id.
        order_id: OrderId,
        /// The buyer.
        account_id: AccountId,
        /// Units wanted.
        amount: Amount,
        /// When the hold lapses if not confirmed.
        expires_at: DateTime<Utc>,
    },
    /// A buyer's purchase: reserve quota, or record why not. Unlike
    /// `Reserve`, a business refusal is an event (`purchase_refused`), so a
    /// retried order gets the same answer later.
    Purchase {
        /// The order, also the reservation's id.
        order_id: OrderId,
        /// The buyer.
        account_id: AccountId,
        /// Units wanted.
        amount: Amount,
        /// When the hold lapses if not confirmed.
        expires_at: DateTime<Utc>,
    },
    /// The buyer paid: the reservation counts as sold.
    Confirm {
        /// The order.
        order_id: OrderId,
    },
    /// Return the quota.
    Release {
        /// The order.
        order_id: OrderId,
        /// Why.
        reason: ReleaseReason,
    },
    /// Return the quota of a reservation past its expiry.
    Expire {
        /// The order.
        order_id: OrderId,
    },
    /// Plan a payout run for the holders: the principal (once per product,
    /// whatever the label), or the next `days` of the term's interest.
    PlanPayoutRun {
        /// The operator's label (1 to 128 printable characters).
        period: String,
        /// Interest or principal.
        kind: PayoutKind,
        /// Days of interest (interest only).
        days: Option<u32>,
    },
}

/// Why a product command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProductRejection {
    /// The product does not exist yet.
    #[error("product is not listed")]
    NotListed,
    /// List was asked twice.
    #[error("product is already listed")]
    AlreadyListed,
    /// The terms are inconsistent.
    #[error("invalid product terms: {0}")]
    InvalidTerms(String),
    /// Reservations are not being taken.
    #[error("the sale is not open")]
    SaleNotOpen,
    /// Below the minimum or above the maximum purchase.
    #[error("amount must be between {min} and {max}")]
    AmountOutOfRange {
        /// Smallest accepted.
        min: Amount,
        /// Largest accepted.
        max: Amount,
    },
    /// Nothing is available and nothing is pending: the sale is over.
    #[error("sold out")]
    SoldOut,
    /// Less is available than asked for.
    #[error("only {available} available")]
    InsufficientQuota {
        /// What is left.
        available: Amount,
    },
    /// The order id already has a reservation.
    #[error("order already has a reservation")]
    DuplicateOrder,
    /// No reservation for this order.
    #[error("no reservation for this order")]
    UnknownOrder,
    /// The reservation is already confirmed or released.
    #[error("reservation is already {0:?}")]
    NotPending(ReservationState),
    /// Expire was asked before the expiry time.
    #[error("reservation does not expire before {0}")]
    NotYetExpired(DateTime<Utc>),
    /// A payout run's parameters are malformed.
    #[error("{0}")]
    InvalidPayoutRun(String),
    /// Payouts need a sale that opened and closed with nothing pending.
    #[error(
        "payouts are planned only once the sale has opened and closed with no reservation pending"
    )]
    SaleNotClosed,
    /// The sale cannot reopen: its holders' payouts are planned.
    #[error("payouts of this product are scheduled; the sale cannot reopen")]
    PayoutsScheduled,
    /// The period was planned before with other parameters.
    #[error("period {period:?} was scheduled before as {kind:?} with days {days:?}")]
    PayoutRunMismatch {
        /// The label.
        period: String,
        /// Its kind then.
        kind: PayoutKind,
        /// Its days then.
        days: Option<u32>,
    },
    /// More interest days asked for than the term has left.
    #[error(
        "{requested} days of interest asked, but only {remaining} of the {term_days}-day term remain"
    )]
    EntitlementExceeded {
        /// Days asked.
        requested: u32,
        /// Days left.
        remaining: u32,
        /// The term.
        term_days: u32,
    },
    /// A total would pass `Amount::LIMIT`.
    #[error("{0} would exceed the limit of 10^15 minor units")]
    LimitExceeded(&'static str),
}

/// What happened to a product.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum ProductEvent {
    /// The product was listed (closed).
    ProductListed {
        /// The product.
        product_id: ProductId,
        /// Its terms.
        terms: ProductTerms,
    },
    /// The sale opened.
    SaleOpened {},
    /// The sale closed.
    SaleClosed {},
    /// Quota is held for an order until `expires_at`.
    QuotaReserved {
        /// The order.
        order_id: OrderId,
        /// The buyer.
        account_id: AccountId,
        /// Units held.
        amount: Amount,
        /// When the hold lapses.
        expires_at: DateTime<Utc>,
    },
    /// A reservation counts as sold.
    ReservationConfirmed {
        /// The order.
        order_id: OrderId,
        /// The buyer.
        account_id: AccountId,
        /// Units sold.
        amount: Amount,
    },
    /// A reservation's quota came back.
    ReservationReleased {
        /// The order.
        order_id: OrderId,
        /// The buyer.
        account_id: AccountId,
        /// Units returned.
        amount: Amount,
        /// Why.
        reason: ReleaseReason,
    },
    /// A purchase was refused; no quota was held.
    PurchaseRefused {
        /// The order.
        order_id: OrderId,
        /// The buyer.
        account_id: AccountId,
        /// Units asked for.
        amount: Amount,
        /// Why.
        reason: RefusalReason,
    },
    /// A payout run was planned: the holders' entitlement it uses. Its
    /// payouts are created from the holdings (fixed once planned: the sale
    /// cannot reopen) with ids derived from the product, the kind, the
    /// first day and the holder, never from the label.
    PayoutRunPlanned {
        /// The operator's label.
        period: String,
        /// Interest or principal.
        kind: PayoutKind,
        /// Days of interest (interest only).
        days: Option<u32>,
        /// First day of the term paid (interest; 0 for principal).
        first_day: u32,
        /// Holders of confirmed orders.
        holders: u32,
        /// Payouts (holders whose amount rounds to zero get none).
        payouts: u32,
        /// Sum of the holders' principal.
        principal_total: Amount,
        /// Sum of the payouts' amounts.
        paid_total: Amount,
        /// Sum of the rounding remainders, in 1/`denominator` of a minor
        /// unit (interest; zero for principal).
        remainder_total: u64,
        /// `INTEREST_DENOMINATOR`.
        denominator: u64,
    },
}

impl EventType for ProductEvent {
    fn event_type(&self) -> &'static str {
        match self {
            ProductEvent::ProductListed { .. } => "product_listed",
            ProductEvent::SaleOpened {} => "sale_opened",
            ProductEvent::SaleClosed {} => "sale_closed",
            ProductEvent::QuotaReserved { .. } => "quota_reserved",
            ProductEvent::ReservationConfirmed { .. } => "reservation_confirmed",
            ProductEvent::ReservationReleased { .. } => "reservation_released",
            ProductEvent::PurchaseRefused { .. } => "purchase_refused",
            ProductEvent::PayoutRunPlanned { .. } => "payout_run_planned",
        }
    }
}

impl ProductEvent {
    /// The order this event belongs to, if any (its correlation).
    pub fn order_id(&self) -> Option<OrderId> {
        match self {
            ProductEvent::QuotaReserved { order_id, .. }
            | ProductEvent::ReservationConfirmed { order_id, .. }
            | ProductEvent::ReservationReleased { order_id, .. }
            | ProductEvent::PurchaseRefused { order_id, .. } => Some(*order_id),
            _ => None,
        }
    }
}

/// The product sale decider.
pub struct ProductSale;

impl Decider for ProductSale {
    type State = ProductState;
    type Command = ProductCommand;
    type Event = ProductEvent;
    type Rejection = ProductRejection;

    fn decide(
        state: &ProductState,
        command: &ProductCommand,
        now: DateTime<Utc>,
    ) -> Result<Vec<ProductEvent>, ProductRejection> {
        let sale = match (&state.sale, command) {
            (None, ProductCommand::List { product_id, terms }) => {
                terms.validate()?;
                return Ok(vec![ProductEvent::ProductListed {
                    product_id: product_id.clone(),
                    terms: terms.clone(),
                }]);
            }
            (None, _) => return Err(ProductRejection::NotListed),
            (Some(_), ProductCommand::List { .. }) => return Err(ProductRejection::AlreadyListed),
            (Some(sale), _) => sale,
        };
        match command {
            ProductCommand::List { .. } => unreachable!("BUG: handled above"),
            ProductCommand::Open if sale.open => Ok(vec![]),
            ProductCommand::Open if sale.payouts.any() => Err(ProductRejection::PayoutsScheduled),
            ProductCommand::Open => Ok(vec![ProductEvent::SaleOpened {}]),
            ProductCommand::Close if !sale.open => Ok(vec![]),
            ProductCommand::Close => Ok(vec![ProductEvent::SaleClosed {}]),
            ProductCommand::Reserve {
                order_id,
                account_id,
                amount,
                expires_at,
            } => decide_reserve(sale, *order_id, *account_id, *amount, *expires_at),
            ProductCommand::Purchase {
                order_id,
                account_id,
                amount,
                expires_at,
            } => decide_purchase(sale, *order_id, *account_id, *amount, *expires_at),
            ProductCommand::Confirm { order_id } => {
                let reservation = pending_reservation(sale, order_id)?;
                Ok(vec![ProductEvent::ReservationConfirmed {
                    order_id: *order_id,
                    account_id: reservation.account_id,
                    amount: reservation.amount,
                }])
            }
            ProductCommand::Release { order_id, reason } => {
                let reservation = pending_reservation(sale, order_id)?;
                Ok(vec![released(*order_id, reservation, *reason)])
            }
            ProductCommand::Expire { order_id } => {
                let reservation = pending_reservation(sale, order_id)?;
                if now < reservation.expires_at {
                    return Err(ProductRejection::NotYetExpired(reservation.expires_at));
                }
                Ok(vec![released(
                    *order_id,
                    reservation,
                    ReleaseReason::Expired,
                )])
            }
            ProductCommand::PlanPayoutRun { period, kind, days } => {
                decide_payout_run(sale, period, *kind, *days)
            }
        }
    }

    fn evolve(mut state: ProductState, event: &ProductEvent) -> ProductState {
        if let ProductEvent::ProductListed { product_id, terms } = event {
            assert!(state.sale.is_none(), "BUG: product listed twice");
            state.sale = Some(Sale {
                product_id: product_id.clone(),
                terms: terms.clone(),
                open: false,
                ever_opened: false,
                payouts: PayoutPlan::default(),
                confirmed: Amount::ZERO,
                pending: Amount::ZERO,
                confirmed_orders: 0,
                reservations: HashMap::new(),
                refusals: HashMap::new(),
            });
            return state;
        }
        let sale = state
            .sale
            .as_mut()
            .expect("BUG: product event before listing");
        evolve_sale(sale, event);
        state
    }
}

fn decide_reserve(
    sale: &Sale,
    order_id: OrderId,
    account_id: AccountId,
    amount: Amount,
    expires_at: DateTime<Utc>,
) -> Result<Vec<ProductEvent>, ProductRejection> {
    if sale.reservations.contains_key(&order_id) || sale.refusals.contains_key(&order_id) {
        return Err(ProductRejection::DuplicateOrder);
    }
    // Sold out comes first: it is final, so every later purchase gets the
    // same answer whatever else is wrong with it (and a writer can give that
    // answer from memory).
    if sale.status() == SaleStatus::SoldOut {
        return Err(ProductRejection::SoldOut);
    }
    if !sale.open {
        return Err(ProductRejection::SaleNotOpen);
    }
    let terms = &sale.terms;
    if amount < terms.min_purchase || amount > terms.max_purchase {
        return Err(ProductRejection::AmountOutOfRange {
            min: terms.min_purchase,
            max: terms.max_purchase,
        });
    }
    let available = sale.available();
    if amount > available {
        return Err(ProductRejection::InsufficientQuota { available });
    }
    Ok(vec![ProductEvent::QuotaReserved {
        order_id,
        account_id,
        amount,
        expires_at,
    }])
}

fn decide_purchase(
    sale: &Sale,
    order_id: OrderId,
    account_id: AccountId,
    amount: Amount,
    expires_at: DateTime<Utc>,
) -> Result<Vec<ProductEvent>, ProductRejection> {
    let reason = match decide_reserve(sale, order_id, account_id, amount, expires_at) {
        Ok(events) => return Ok(events),
        Err(ProductRejection::SaleNotOpen) => RefusalReason::SaleNotOpen,
        Err(ProductRejection::AmountOutOfRange { .. }) => RefusalReason::AmountOutOfRange,
        Err(ProductRejection::SoldOut) => RefusalReason::SoldOut,
        Err(ProductRejection::InsufficientQuota { .. }) => RefusalReason::InsufficientQuota,
        Err(other) => return Err(other),
    };
    Ok(vec![ProductEvent::PurchaseRefused {
        order_id,
        account_id,
        amount,
        reason,
    }])
}

fn decide_payout_run(
    sale: &Sale,
    period: &str,
    kind: PayoutKind,
    days: Option<u32>,
) -> Result<Vec<ProductEvent>, ProductRejection> {
    let invalid = |why: String| Err(ProductRejection::InvalidPayoutRun(why));
    if validate_reference(period).is_err() {
        return invalid("period must be 1 to 128 printable characters".into());
    }
    let term_days = sale.terms.term_days;
    match (kind, days) {
        (PayoutKind::Interest, Some(days)) if (1..=term_days).contains(&days) => {}
        (PayoutKind::Interest, _) => {
            return invalid(format!(
                "interest needs days, 1 to the product's term of {term_days}"
            ));
        }
        (PayoutKind::Principal, None) => {}
        (PayoutKind::Principal, Some(_)) => return invalid("principal takes no days".into()),
    }
    if !sale.payouts_allowed() {
        return Err(ProductRejection::SaleNotClosed);
    }
    // The same label again: the same run (nothing new), or a mistake.
    if let Some(run) = sale.payouts.runs.get(period) {
        if (run.kind, run.days) == (kind, days) {
            return Ok(vec![]);
        }
        return Err(ProductRejection::PayoutRunMismatch {
            period: period.to_owned(),
            kind: run.kind,
            days: run.days,
        });
    }
    let holdings = sale.holdings();
    let (first_day, run_days) = match (kind, days) {
        // Principal is owed once per holder: under any other label it is
        // the run already planned.
        (PayoutKind::Principal, _) if sale.payouts.principal_period.is_some() => return Ok(vec![]),
        (PayoutKind::Principal, _) => (0, 0),
        (PayoutKind::Interest, Some(days)) => {
            let remaining = sale.interest_days_remaining();
            if days > remaining {
                return Err(ProductRejection::EntitlementExceeded {
                    requested: days,
                    remaining,
                    term_days,
                });
            }
            (sale.payouts.interest_days, days)
        }
        (PayoutKind::Interest, None) => unreachable!("BUG: checked above"),
    };
    let planned = plan(&holdings, sale.terms.annual_rate_bps, kind, run_days);
    let sum = |f: fn(&crate::payout::PlannedPayout) -> Amount| {
        planned
            .iter()
            .try_fold(Amount::ZERO, |total, p| total.add_within_limit(f(p)))
    };
    let principal_total =
        sum(|p| p.principal).ok_or(ProductRejection::LimitExceeded("the holders' principal"))?;
    let paid_total =
        sum(|p| p.amount).ok_or(ProductRejection::LimitExceeded("the interest owed"))?;
    if kind == PayoutKind::Interest
        && sale
            .payouts
            .interest_total
            .add_within_limit(paid_total)
            .is_none()
    {
        return Err(ProductRejection::LimitExceeded("the interest owed"));
    }
    let remainder_total: u128 = planned.iter().map(|p| p.remainder).sum();
    Ok(vec![ProductEvent::PayoutRunPlanned {
        period: period.to_owned(),
        kind,
        days,
        first_day,
        holders: u32::try_from(planned.len()).unwrap_or(u32::MAX),
        payouts: u32::try_from(planned.iter().filter(|p| !p.amount.is_zero()).count())
            .unwrap_or(u32::MAX),
        principal_total,
        paid_total,
        remainder_total: u64::try_from(remainder_total).unwrap_or(u64::MAX),
        denominator: u64::try_from(INTEREST_DENOMINATOR).expect("BUG: small constant"),
    }])
}

fn pending_reservation<'a>(
    sale: &'a Sale,
    order_id: &OrderId,
) -> Result<&'a Reservation, ProductRejection> {
    let reservation = sale
        .reservations
        .get(order_id)
        .ok_or(ProductRejection::UnknownOrder)?;
    match reservation.state {
        ReservationState::Pending => Ok(reservation),
        other => Err(ProductRejection::NotPending(other)),
    }
}

fn released(order_id: OrderId, reservation: &Reservation, reason: ReleaseReason) -> ProductEvent {
    ProductEvent::ReservationReleased {
        order_id,
        account_id: reservation.account_id,
        amount: reservation.amount,
        reason,
    }
}

fn evolve_sale(sale: &mut Sale, event: &ProductEvent) {
    match event {
        ProductEvent::ProductListed { .. } => unreachable!("BUG: handled by evolve"),
        ProductEvent::SaleOpened {} => {
            sale.open = true;
            sale.ever_opened = true;
        }
        ProductEvent::SaleClosed {} => sale.open = false,
        ProductEvent::QuotaReserved {
            order_id,
            account_id,
            amount,
            expires_at,
        } => {
            let reservation = Reservation {
                account_id: *account_id,
                amount: *amount,
                expires_at: *expires_at,
                state: ReservationState::Pending,
                released_because: None,
            };
            let previous = sale.reservations.insert(*order_id, reservation);
            assert!(previous.is_none(), "BUG: order reserved twice");
            sale.pending = sale
                .pending
                .checked_add(*amount)
                .expect("BUG: pending overflow");
            assert!(sale.available() <= sale.terms.quota, "BUG: over-reserved");
        }
        ProductEvent::ReservationConfirmed { order_id, .. } => {
            let amount = settle(sale, order_id, ReservationState::Confirmed);
            sale.confirmed = sale
                .confirmed
                .checked_add(amount)
                .expect("BUG: confirmed overflow");
            sale.confirmed_orders += 1;
        }
        ProductEvent::ReservationReleased {
            order_id, reason, ..
        } => {
            settle(sale, order_id, ReservationState::Released);
            let reservation = sale
                .reservations
                .get_mut(order_id)
                .expect("BUG: settled above");
            reservation.released_because = Some(*reason);
        }
        ProductEvent::PurchaseRefused {
            order_id,
            account_id,
            amount,
            reason,
        } => {
            assert!(
                !sale.reservations.contains_key(order_id),
                "BUG: refusal of a reserved order"
            );
            let refusal = Refusal {
                account_id: *account_id,
                amount: *amount,
                reason: *reason,
            };
            let previous = sale.refusals.insert(*order_id, refusal);
            assert!(previous.is_none(), "BUG: order refused twice");
        }
        ProductEvent::PayoutRunPlanned {
            period,
            kind,
            days,
            first_day,
            paid_total,
            ..
        } => {
            let plan = &mut sale.payouts;
            let run = PayoutRun {
                period: period.clone(),
                kind: *kind,
                days: *days,
                first_day: *first_day,
            };
            match kind {
                PayoutKind::Principal => {
                    assert!(
                        plan.principal_period.is_none(),
                        "BUG: principal planned twice"
                    );
                    plan.principal_period = Some(period.clone());
                }
                PayoutKind::Interest => {
                    assert_eq!(
                        *first_day, plan.interest_days,
                        "BUG: interest runs out of order"
                    );
                    plan.interest_days += days.expect("BUG: interest run without days");
                    assert!(
                        plan.interest_days <= sale.terms.term_days,
                        "BUG: interest beyond the term"
                    );
                    plan.interest_total = plan
                        .interest_total
                        .checked_add(*paid_total)
                        .expect("BUG: interest total overflow");
                }
            }
            let previous = plan.runs.insert(period.clone(), run);
            assert!(previous.is_none(), "BUG: payout run planned twice");
        }
    }
}

/// Moves a pending reservation to its final state and takes it out of `pending`.
fn settle(sale: &mut Sale, order_id: &OrderId, state: ReservationState) -> Amount {
    let reservation = sale
        .reservations
        .get_mut(order_id)
        .expect("BUG: settling an unknown reservation");
    assert_eq!(
        reservation.state,
        ReservationState::Pending,
        "BUG: settling a reservation that is not pending"
    );
    reservation.state = state;
    let amount = reservation.amount;
    sale.pending = sale
        .pending
        .checked_sub(amount)
        .expect("BUG: pending below zero");
    amount
}
