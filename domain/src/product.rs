//! The product sale: listing, opening and closing, and quota reservations
//! (pending, with an expiry) that end confirmed or released.
//!
//! Invariant: `confirmed + pending + available = quota` and
//! `confirmed + pending <= quota`, always.

use crate::decider::{Decider, EventType};
use crate::ids::{AccountId, OrderId, ProductId};
use crate::money::{Amount, Currency};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Longest product name accepted, in characters.
pub const PRODUCT_NAME_LENGTH_MAX: usize = 200;
/// Highest annual rate accepted, in basis points (100%).
pub const ANNUAL_RATE_BPS_MAX: u32 = 10_000;
/// Longest term accepted, in days (30 years).
pub const TERM_DAYS_MAX: u32 = 10_950;

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
        if self.quota.is_zero() {
            return invalid("quota must be positive");
        }
        if self.min_purchase.is_zero() || self.min_purchase > self.max_purchase {
            return invalid("min_purchase must be positive and at most max_purchase");
        }
        if self.max_purchase > self.quota {
            return invalid("max_purchase must be at most the quota");
        }
        if self.annual_rate_bps > ANNUAL_RATE_BPS_MAX {
            return invalid("annual_rate_bps must be at most 10000");
        }
        if self.term_days == 0 || self.term_days > TERM_DAYS_MAX {
            return invalid("term_days must be 1 to 10950");
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

impl Sale {
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
        }
    }

    fn evolve(mut state: ProductState, event: &ProductEvent) -> ProductState {
        if let ProductEvent::ProductListed { product_id, terms } = event {
            assert!(state.sale.is_none(), "BUG: product listed twice");
            state.sale = Some(Sale {
                product_id: product_id.clone(),
                terms: terms.clone(),
                open: false,
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
        ProductEvent::SaleOpened {} => sale.open = true,
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
