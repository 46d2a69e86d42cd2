//! One struct per read-model table; field names are the column names.
//!
//! Rows travel to and from SQL as JSON objects, so these derive serde and
//! nothing else needs to know the column list.

use serde::{Deserialize, Serialize};

/// A row of `sale_progress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaleRow {
    /// The product.
    pub product_id: String,
    /// Display name.
    pub name: String,
    /// Currency code.
    pub currency: String,
    /// Total amount for sale.
    pub quota: i64,
    /// Amount of confirmed orders.
    pub confirmed: i64,
    /// Amount held by pending reservations.
    pub reserved: i64,
    /// `quota - confirmed - reserved`.
    pub available: i64,
    /// Count of confirmed orders.
    pub orders: i64,
    /// Count of refused purchases.
    pub refused: i64,
    /// Count of released reservations.
    pub released: i64,
    /// `closed`, `open`, `fully_reserved` or `sold_out`.
    pub status: String,
    /// 1 while the sale is open.
    pub sale_open: i64,
    /// Smallest single purchase.
    pub min_purchase: i64,
    /// Largest single purchase.
    pub max_purchase: i64,
    /// Annual rate in basis points.
    pub annual_rate_bps: i64,
    /// Term in days.
    pub term_days: i64,
    /// Principal planned to be paid back to the holders (the confirmed
    /// amount, once its run is planned).
    pub principal_scheduled: i64,
    /// Days of the term whose interest is planned.
    pub interest_days: i64,
    /// When the product was listed.
    pub listed_at: String,
    /// When the sale was first opened.
    pub opened_at: Option<String>,
    /// When the last of the quota was confirmed.
    pub sold_out_at: Option<String>,
    /// When the row last changed.
    pub updated_at: String,
    /// The last event applied to the row.
    pub position: i64,
}

/// A row of `account_balances`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRow {
    /// The account.
    pub account_id: String,
    /// Currency code.
    pub currency: String,
    /// Spendable balance.
    pub available: i64,
    /// Part of `total_invested` paid for orders not yet confirmed.
    pub held: i64,
    /// Sum of deposits.
    pub total_deposited: i64,
    /// Sum of purchase debits less refunds.
    pub total_invested: i64,
    /// Sum of payouts credited.
    pub total_paid_out: i64,
    /// Sum of withdrawals.
    pub total_withdrawn: i64,
    /// The account stream's version.
    pub version: i64,
    /// When the account was opened.
    pub opened_at: String,
    /// When the row last changed.
    pub updated_at: String,
    /// The last event applied to the row.
    pub position: i64,
}

/// A row of `account_holds`: what an order's debit holds until it settles.
/// A hold both debited and settled is deleted; one settled before its debit
/// (both in one batch, confirmation first) waits for the debit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldRow {
    /// The order.
    pub order_id: String,
    /// The paying account.
    pub account_id: String,
    /// Amount debited for the order (0 until debited).
    pub debited: i64,
    /// 1 once the order is confirmed or refunded.
    pub settled: i64,
}

/// A row of `ledger_entries`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntryRow {
    /// The customer account.
    pub account_id: String,
    /// The event's position.
    pub position: i64,
    /// The posting's index among the event's postings to this account.
    pub seq: i64,
    /// The event.
    pub event_id: String,
    /// `deposit`, `purchase`, `refund`, `payout` or `withdrawal`.
    pub kind: String,
    /// Signed amount: credit positive.
    pub amount: i64,
    /// Available balance after the entry.
    pub balance_after: i64,
    /// The order, for purchases and refunds.
    pub order_id: Option<String>,
    /// The payout, for payouts.
    pub payout_id: Option<String>,
    /// The product, where there is one.
    pub product_id: Option<String>,
    /// The caller's reference, for deposits and withdrawals.
    pub reference: Option<String>,
    /// When the event was recorded.
    pub occurred_at: String,
}

/// A row of `orders`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRow {
    /// The order.
    pub order_id: String,
    /// The product.
    pub product_id: String,
    /// The buyer.
    pub account_id: String,
    /// Amount ordered.
    pub amount: i64,
    /// `reserved`, `confirmed`, `released`, `refunded` or `refused`.
    pub status: String,
    /// Why it was released or refused.
    pub reason: Option<String>,
    /// When a pending reservation lapses.
    pub expires_at: Option<String>,
    /// Amount debited from the buyer.
    pub paid: i64,
    /// Amount refunded to the buyer.
    pub refunded: i64,
    /// When the order was first recorded.
    pub created_at: String,
    /// When the row last changed.
    pub updated_at: String,
    /// The last event applied to the row.
    pub position: i64,
}

/// A row of `timeline_events`: the event itself is read from the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineRow {
    /// The order or payout the event belongs to.
    pub correlation_id: String,
    /// The event's position.
    pub position: i64,
}

/// A row of `payouts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayoutRow {
    /// The payout.
    pub payout_id: String,
    /// The product paying.
    pub product_id: String,
    /// The holder paid.
    pub account_id: String,
    /// The period label.
    pub period: String,
    /// `interest` or `principal`.
    pub kind: String,
    /// Amount to pay.
    pub amount: i64,
    /// `scheduled`, `in_flight`, `unknown`, `succeeded` or `failed`.
    pub status: String,
    /// Attempts made.
    pub attempts: i64,
    /// The provider's payment id once paid.
    pub provider_ref: Option<String>,
    /// The last failure or ambiguity reported.
    pub last_error: Option<String>,
    /// Until when the current attempt's claim holds.
    pub lease_until: Option<String>,
    /// When it was scheduled.
    pub created_at: String,
    /// When the row last changed.
    pub updated_at: String,
    /// The last event applied to the row.
    pub position: i64,
}
