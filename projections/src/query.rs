//! Reads of the read models for the API and support tools: every query is
//! static SQL over the readers' views with bound parameters, and every list
//! is bounded.

use crate::db::ReadDb;
use crate::error::ProjectionError;
use serde::Serialize;
use store::EventStore;

/// Most products `all_progress` returns.
pub const PROGRESS_LIST_MAX: i64 = 1_000;
/// Most ledger entries one page holds.
pub const LEDGER_PAGE_MAX: u32 = 1_000;
/// Most events one timeline returns.
pub const TIMELINE_EVENTS_MAX: i64 = 1_000;
/// Most payouts one list returns.
pub const PAYOUT_LIST_MAX: i64 = 10_000;

/// A product's sale progress (`confirmed + reserved + available = quota`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Progress {
    /// The product.
    pub product_id: String,
    /// Total for sale.
    pub quota: i64,
    /// Confirmed amount.
    pub confirmed: i64,
    /// Amount held by pending reservations.
    pub reserved: i64,
    /// What is left.
    pub available: i64,
    /// `closed`, `open`, `fully_reserved` or `sold_out`.
    pub status: String,
    /// Confirmed orders.
    pub orders: i64,
    /// The last event reflected.
    pub position: i64,
    /// Display name.
    pub name: String,
    /// When the sale first opened.
    pub opened_at: Option<String>,
    /// When the last of the quota was confirmed.
    pub sold_out_at: Option<String>,
}

/// One product's progress.
pub async fn progress(db: &ReadDb, product_id: &str) -> Result<Option<Progress>, ProjectionError> {
    const SQL: &str = "SELECT product_id, quota, confirmed, reserved, available, status, orders, \
                       position, name, opened_at, sold_out_at FROM sale_progress \
                       WHERE product_id = $1";
    Ok(store::on_backend!(db.reader(), |pool| sqlx::query_as(SQL)
        .bind(product_id)
        .fetch_optional(pool)
        .await?))
}

/// Every product's progress, by product id.
pub async fn all_progress(db: &ReadDb) -> Result<Vec<Progress>, ProjectionError> {
    const SQL: &str = "SELECT product_id, quota, confirmed, reserved, available, status, orders, \
                       position, name, opened_at, sold_out_at FROM sale_progress \
                       ORDER BY product_id LIMIT $1";
    Ok(store::on_backend!(db.reader(), |pool| sqlx::query_as(SQL)
        .bind(PROGRESS_LIST_MAX)
        .fetch_all(pool)
        .await?))
}

/// An account's balances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Balance {
    /// The account.
    pub account_id: String,
    /// Spendable.
    pub available: i64,
    /// Paid for orders not yet confirmed.
    pub held: i64,
    /// Sum of deposits.
    pub total_deposited: i64,
    /// Sum of purchase debits less refunds.
    pub total_invested: i64,
    /// Sum of payouts credited.
    pub total_paid_out: i64,
    /// The account stream's version.
    pub version: i64,
}

/// One account's balances.
pub async fn balance(db: &ReadDb, account_id: &str) -> Result<Option<Balance>, ProjectionError> {
    const SQL: &str = "SELECT account_id, available, held, total_deposited, total_invested, \
                       total_paid_out, version FROM account_balances WHERE account_id = $1";
    Ok(store::on_backend!(db.reader(), |pool| sqlx::query_as(SQL)
        .bind(account_id)
        .fetch_optional(pool)
        .await?))
}

/// Most balances one listing returns.
pub const BALANCE_LIST_MAX: i64 = 10_000;

/// Balances of accounts after `after_account_id` in id order, at most
/// `BALANCE_LIST_MAX`.
pub async fn balances(
    db: &ReadDb,
    after_account_id: &str,
) -> Result<Vec<Balance>, ProjectionError> {
    const SQL: &str = "SELECT account_id, available, held, total_deposited, total_invested, \
                       total_paid_out, version FROM account_balances WHERE account_id > $1 \
                       ORDER BY account_id LIMIT $2";
    Ok(store::on_backend!(db.reader(), |pool| sqlx::query_as(SQL)
        .bind(after_account_id)
        .bind(BALANCE_LIST_MAX)
        .fetch_all(pool)
        .await?))
}

/// One ledger entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Entry {
    /// The event's position (entries page by it).
    pub position: i64,
    /// The event.
    pub event_id: String,
    /// `deposit`, `purchase`, `refund`, `payout` or `withdrawal`.
    pub kind: String,
    /// Signed: credit positive.
    pub amount: i64,
    /// Available balance after the entry.
    pub balance_after: i64,
    /// The order, for purchases and refunds.
    pub order_id: Option<String>,
    /// The payout, for payouts.
    pub payout_id: Option<String>,
    /// When it happened.
    pub occurred_at: String,
}

/// A page of an account's ledger, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LedgerPage {
    /// The entries.
    pub entries: Vec<Entry>,
    /// The `after` of the next page; `None` when there are no more entries.
    pub next: Option<i64>,
}

/// Entries of an account after a position; `limit` must be 1 to
/// `LEDGER_PAGE_MAX` (callers validate it; out of range is a bug).
pub async fn ledger(
    db: &ReadDb,
    account_id: &str,
    after: i64,
    limit: u32,
) -> Result<LedgerPage, ProjectionError> {
    assert!(
        (1..=LEDGER_PAGE_MAX).contains(&limit),
        "BUG: ledger page limit must be validated by the caller"
    );
    // One more than asked tells whether another page exists. Pages break
    // between positions: an event posts at most once to an account (the
    // accounts fold asserts it).
    const SQL: &str = "SELECT position, event_id, kind, amount, balance_after, order_id, \
                       payout_id, occurred_at FROM ledger_entries \
                       WHERE account_id = $1 AND position > $2 ORDER BY position, seq LIMIT $3";
    let wanted = i64::from(limit) + 1;
    let mut entries: Vec<Entry> = store::on_backend!(db.reader(), |pool| sqlx::query_as(SQL)
        .bind(account_id)
        .bind(after)
        .bind(wanted)
        .fetch_all(pool)
        .await?);
    let more = entries.len() as i64 == wanted;
    if more {
        entries.truncate(limit as usize);
    }
    let next = more.then(|| entries.last().map(|e| e.position)).flatten();
    Ok(LedgerPage { entries, next })
}

/// An order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Order {
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
    /// When it was first recorded.
    pub created_at: String,
}

/// One order.
pub async fn order(db: &ReadDb, order_id: &str) -> Result<Option<Order>, ProjectionError> {
    const SQL: &str = "SELECT order_id, product_id, account_id, amount, status, reason, created_at \
                       FROM orders WHERE order_id = $1";
    Ok(store::on_backend!(db.reader(), |pool| sqlx::query_as(SQL)
        .bind(order_id)
        .fetch_optional(pool)
        .await?))
}

/// One event of a timeline, read back from the log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimelineEvent {
    /// Its position.
    pub position: i64,
    /// Its type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// When it was recorded.
    pub occurred_at: String,
    /// Its data.
    pub data: serde_json::Value,
    /// Who and why (actor, role, request, correlation, causation).
    pub metadata: store::Metadata,
}

/// Every event carrying `correlation_id` (an order's or a payout's), in order.
pub async fn timeline(
    db: &ReadDb,
    store: &dyn EventStore,
    correlation_id: &str,
) -> Result<Vec<TimelineEvent>, ProjectionError> {
    const SQL: &str = "SELECT position FROM timeline_events WHERE correlation_id = $1 \
                       ORDER BY position LIMIT $2";
    let positions: Vec<i64> = store::on_backend!(db.reader(), |pool| sqlx::query_scalar(SQL)
        .bind(correlation_id)
        .bind(TIMELINE_EVENTS_MAX)
        .fetch_all(pool)
        .await?);
    let mut events = Vec::with_capacity(positions.len());
    for position in positions {
        let Some(event) = store.read_at(position).await? else {
            return Err(ProjectionError::inconsistent(
                position,
                "a timeline names an event the log does not hold",
            ));
        };
        events.push(TimelineEvent {
            position,
            event_type: event.event_type,
            occurred_at: crate::envelope::time_text(event.recorded_at),
            data: event.data,
            metadata: event.metadata,
        });
    }
    Ok(events)
}

/// A payout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct PayoutView {
    /// The payout.
    pub payout_id: String,
    /// The product paying.
    pub product_id: String,
    /// The holder.
    pub account_id: String,
    /// Amount.
    pub amount: i64,
    /// Period label.
    pub period: String,
    /// `interest` or `principal`.
    pub kind: String,
    /// `scheduled`, `in_flight`, `unknown`, `succeeded` or `failed`.
    pub status: String,
    /// Attempts made.
    pub attempts: i64,
    /// The provider's payment id once paid.
    pub provider_ref: Option<String>,
}

/// Payouts, optionally of one product and in one status, oldest first.
pub async fn payouts(
    db: &ReadDb,
    product_id: Option<&str>,
    status: Option<&str>,
) -> Result<Vec<PayoutView>, ProjectionError> {
    const SQL: &str = "SELECT payout_id, product_id, account_id, amount, period, kind, status, \
                       attempts, provider_ref FROM payouts \
                       WHERE ($1 IS NULL OR product_id = $1) AND ($2 IS NULL OR status = $2) \
                       ORDER BY created_at, payout_id LIMIT $3";
    Ok(store::on_backend!(db.reader(), |pool| sqlx::query_as(SQL)
        .bind(product_id)
        .bind(status)
        .bind(PAYOUT_LIST_MAX)
        .fetch_all(pool)
        .await?))
}

/// Most payouts of one account listed at once.
pub const ACCOUNT_PAYOUTS_MAX: i64 = 1_000;

/// One account's payouts (index `payouts.by_account`), newest first.
pub async fn account_payouts(
    db: &ReadDb,
    account_id: &str,
) -> Result<Vec<PayoutView>, ProjectionError> {
    const SQL: &str = "SELECT payout_id, product_id, account_id, amount, period, kind, status, \
                       attempts, provider_ref FROM payouts WHERE account_id = $1 \
                       ORDER BY created_at DESC, payout_id DESC LIMIT $2";
    Ok(store::on_backend!(db.reader(), |pool| sqlx::query_as(SQL)
        .bind(account_id)
        .bind(ACCOUNT_PAYOUTS_MAX)
        .fetch_all(pool)
        .await?))
}

/// Most orders of one account per page.
pub const ACCOUNT_ORDERS_MAX: u32 = 1_000;

/// One account's orders (index `orders.by_account`), newest first, at most
/// `limit` (1 to `ACCOUNT_ORDERS_MAX`; callers validate it).
pub async fn account_orders(
    db: &ReadDb,
    account_id: &str,
    limit: u32,
) -> Result<Vec<Order>, ProjectionError> {
    assert!(
        (1..=ACCOUNT_ORDERS_MAX).contains(&limit),
        "BUG: the orders page limit must be validated by the caller"
    );
    const SQL: &str = "SELECT order_id, product_id, account_id, amount, status, reason, created_at \
                       FROM orders WHERE account_id = $1 \
                       ORDER BY created_at DESC, order_id DESC LIMIT $2";
    Ok(store::on_backend!(db.reader(), |pool| sqlx::query_as(SQL)
        .bind(account_id)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?))
}

/// Most accounts a search by deposit reference names.
pub const REFERENCE_MATCHES_MAX: i64 = 20;

/// The accounts that received a deposit with this reference (references
/// are unique per account, not across accounts), by the index
/// `ledger_entries.by_reference`.
pub async fn accounts_by_deposit_reference(
    db: &ReadDb,
    reference: &str,
) -> Result<Vec<String>, ProjectionError> {
    const SQL: &str = "SELECT DISTINCT account_id FROM ledger_entries \
                       WHERE reference = $1 AND kind = 'deposit' ORDER BY account_id LIMIT $2";
    Ok(store::on_backend!(db.reader(), |pool| sqlx::query_scalar(
        SQL
    )
    .bind(reference)
    .bind(REFERENCE_MATCHES_MAX)
    .fetch_all(pool)
    .await?))
}

/// How many payouts are in each status (for metrics).
pub async fn payout_status_counts(
    db: &ReadDb,
) -> Result<std::collections::BTreeMap<String, i64>, ProjectionError> {
    const SQL: &str = "SELECT status, COUNT(*) FROM payouts GROUP BY status";
    let rows: Vec<(String, i64)> = store::on_backend!(db.reader(), |pool| sqlx::query_as(SQL)
        .fetch_all(pool)
        .await?);
    Ok(rows.into_iter().collect())
}

/// What a product's holders are owed and how much of it payout runs have
/// planned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Entitlement {
    /// The product.
    pub product_id: String,
    /// The term in days (interest is owed for at most this many).
    pub term_days: i64,
    /// The holders' confirmed principal.
    pub principal_total: i64,
    /// Principal planned to be paid back.
    pub principal_scheduled: i64,
    /// Days of the term whose interest is planned.
    pub interest_days_scheduled: i64,
    /// Days of the term whose interest may still be planned.
    pub interest_days_remaining: i64,
    /// The last event reflected.
    pub position: i64,
}

/// One product's entitlement, from its sale progress row.
pub async fn entitlement(
    db: &ReadDb,
    product_id: &str,
) -> Result<Option<Entitlement>, ProjectionError> {
    const SQL: &str = "SELECT product_id, term_days, confirmed AS principal_total, \
                       principal_scheduled, interest_days AS interest_days_scheduled, \
                       term_days - interest_days AS interest_days_remaining, position \
                       FROM sale_progress WHERE product_id = $1";
    Ok(store::on_backend!(db.reader(), |pool| sqlx::query_as(SQL)
        .bind(product_id)
        .fetch_optional(pool)
        .await?))
}
