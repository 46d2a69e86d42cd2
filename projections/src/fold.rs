//! The pure part of each projection: which rows a batch of events touches,
//! and how the events change them. No I/O here; `apply` loads the rows,
//! runs the fold and writes what changed.

use crate::envelope::{Envelope, Fact, time_text};
use crate::error::ProjectionError;
use crate::rows::{AccountRow, HoldRow, LedgerEntryRow, OrderRow, PayoutRow, SaleRow, TimelineRow};
use crate::schema::{
    ACCOUNT_BALANCES, ACCOUNT_HOLDS, LEDGER_ENTRIES, ORDERS, PAYOUTS, SALE_PROGRESS,
    TIMELINE_EVENTS, Table,
};
use domain::account::AccountEvent;
use domain::payout::{PayoutEvent, PayoutKind, ProviderFinding};
use domain::posting::LedgerAccount;
use domain::product::ProductEvent;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// Rows of one table loaded for a batch, and which of them changed.
#[derive(Debug)]
pub struct Rows<R> {
    table: &'static Table,
    rows: BTreeMap<String, R>,
    dirty: BTreeSet<String>,
    /// Keys loaded from the database.
    stored: BTreeSet<String>,
    /// Stored keys to delete.
    removed: BTreeSet<String>,
}

impl<R: Serialize + DeserializeOwned> Rows<R> {
    fn new(table: &'static Table) -> Rows<R> {
        Rows {
            table,
            rows: BTreeMap::new(),
            dirty: BTreeSet::new(),
            stored: BTreeSet::new(),
            removed: BTreeSet::new(),
        }
    }

    fn load(&mut self, texts: Vec<String>, key: fn(&R) -> &str) -> Result<(), ProjectionError> {
        for text in texts {
            let row: R = serde_json::from_str(&text).map_err(|e| ProjectionError::CorruptRow {
                table: self.table.name,
                reason: e.to_string(),
            })?;
            self.stored.insert(key(&row).to_owned());
            self.rows.insert(key(&row).to_owned(), row);
        }
        Ok(())
    }

    fn remove(&mut self, key: &str) {
        self.rows.remove(key);
        self.dirty.remove(key);
        if self.stored.contains(key) {
            self.removed.insert(key.to_owned());
        }
    }

    fn removed(&self) -> Option<Removal> {
        (!self.removed.is_empty()).then(|| (self.table, self.removed.iter().cloned().collect()))
    }

    fn get_mut(&mut self, key: &str) -> Option<&mut R> {
        let row = self.rows.get_mut(key)?;
        self.dirty.insert(key.to_owned());
        Some(row)
    }

    fn contains(&self, key: &str) -> bool {
        self.rows.contains_key(key)
    }

    fn insert(&mut self, key: String, row: R) {
        self.dirty.insert(key.clone());
        self.rows.insert(key, row);
    }

    fn changed(&self) -> Option<Change> {
        if self.dirty.is_empty() {
            return None;
        }
        let changed = self
            .dirty
            .iter()
            .map(|key| to_value(&self.rows[key]))
            .collect();
        Some((self.table, changed))
    }
}

/// Rows to write to one table, as JSON objects.
pub type Change = (&'static Table, Vec<Value>);
/// Keys of rows to delete from one table.
pub type Removal = (&'static Table, Vec<String>);

fn to_value<T: Serialize>(row: &T) -> Value {
    serde_json::to_value(row).expect("BUG: read-model rows always serialize")
}

/// Append-only rows in key order: inserting neighbours together touches
/// fewer index pages than inserting in event order.
fn appended<R: Serialize>(table: &'static Table, rows: &[R]) -> Option<Change> {
    if rows.is_empty() {
        return None;
    }
    let mut values: Vec<Value> = rows.iter().map(to_value).collect();
    values.sort_by(|a, b| {
        table
            .key
            .iter()
            .map(|column| compare_json(&a[*column], &b[*column]))
            .find(|order| order.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    Some((table, values))
}

fn compare_json(a: &Value, b: &Value) -> std::cmp::Ordering {
    match (a, b) {
        (Value::String(a), Value::String(b)) => a.cmp(b),
        (Value::Number(a), Value::Number(b)) => a.as_i64().cmp(&b.as_i64()),
        _ => std::cmp::Ordering::Equal,
    }
}

/// Keys of rows to load before a batch, per table.
#[derive(Debug, Default)]
pub struct Wanted {
    keys: BTreeMap<&'static str, (&'static Table, BTreeSet<String>)>,
}

impl Wanted {
    fn add(&mut self, table: &'static Table, key: String) {
        self.keys
            .entry(table.name)
            .or_insert_with(|| (table, BTreeSet::new()))
            .1
            .insert(key);
    }

    /// Each table with the keys wanted from it.
    pub fn tables(&self) -> impl Iterator<Item = (&'static Table, Vec<&str>)> + '_ {
        self.keys
            .values()
            .map(|(table, keys)| (*table, keys.iter().map(String::as_str).collect()))
    }
}

/// The pure half of a projection over one batch.
pub trait Fold: Send {
    /// Notes which rows `envelope` will touch.
    fn want(&self, envelope: &Envelope, wanted: &mut Wanted);
    /// Takes loaded rows (JSON objects) of one table.
    fn load(&mut self, table: &'static Table, rows: Vec<String>) -> Result<(), ProjectionError>;
    /// Applies one event.
    fn apply(&mut self, envelope: &Envelope) -> Result<(), ProjectionError>;
    /// Rows to write, per table.
    fn changes(&self) -> Vec<Change>;
    /// Rows to delete, per table (deleted before the writes).
    fn removals(&self) -> Vec<Removal> {
        Vec::new()
    }
}

fn checked(envelope: &Envelope, value: i64, what: &str) -> Result<i64, ProjectionError> {
    if value < 0 {
        return Err(envelope.inconsistent(format!("{what} would be negative ({value})")));
    }
    Ok(value)
}

/// Sale progress per product.
pub struct SaleFold {
    sales: Rows<SaleRow>,
}

impl SaleFold {
    /// An empty batch.
    pub fn new() -> SaleFold {
        SaleFold {
            sales: Rows::new(&SALE_PROGRESS),
        }
    }
}

impl Default for SaleFold {
    fn default() -> Self {
        SaleFold::new()
    }
}

fn sale_status(row: &SaleRow) -> &'static str {
    if row.confirmed == row.quota {
        "sold_out"
    } else if row.available == 0 {
        "fully_reserved"
    } else if row.sale_open == 1 {
        "open"
    } else {
        "closed"
    }
}

impl Fold for SaleFold {
    fn want(&self, envelope: &Envelope, wanted: &mut Wanted) {
        if let Fact::Product(product_id, _) = &envelope.fact {
            wanted.add(&SALE_PROGRESS, product_id.to_string());
        }
    }

    fn load(&mut self, _table: &'static Table, rows: Vec<String>) -> Result<(), ProjectionError> {
        self.sales.load(rows, |row| &row.product_id)
    }

    fn apply(&mut self, envelope: &Envelope) -> Result<(), ProjectionError> {
        let Fact::Product(product_id, event) = &envelope.fact else {
            return Ok(());
        };
        let key = product_id.as_str();
        if let ProductEvent::ProductListed { terms, .. } = event {
            if self.sales.contains(key) {
                return Err(envelope.inconsistent("product listed twice"));
            }
            let quota = terms.quota.minor();
            let row = SaleRow {
                product_id: key.to_owned(),
                name: terms.name.clone(),
                currency: terms.currency.to_string(),
                quota,
                confirmed: 0,
                reserved: 0,
                available: quota,
                orders: 0,
                refused: 0,
                released: 0,
                status: String::new(),
                sale_open: 0,
                min_purchase: terms.min_purchase.minor(),
                max_purchase: terms.max_purchase.minor(),
                annual_rate_bps: i64::from(terms.annual_rate_bps),
                term_days: i64::from(terms.term_days),
                principal_scheduled: 0,
                interest_days: 0,
                listed_at: envelope.occurred_at.clone(),
                opened_at: None,
                sold_out_at: None,
                updated_at: String::new(),
                position: 0,
            };
            self.sales.insert(key.to_owned(), row);
        }
        let Some(row) = self.sales.get_mut(key) else {
            return Err(envelope.inconsistent("event for a product never listed"));
        };
        match event {
            ProductEvent::ProductListed { .. } => {}
            ProductEvent::SaleOpened {} => {
                row.sale_open = 1;
                if row.opened_at.is_none() {
                    row.opened_at = Some(envelope.occurred_at.clone());
                }
            }
            ProductEvent::SaleClosed {} => row.sale_open = 0,
            ProductEvent::QuotaReserved { amount, .. } => row.reserved += amount.minor(),
            ProductEvent::ReservationConfirmed { amount, .. } => {
                row.reserved = checked(envelope, row.reserved - amount.minor(), "reserved")?;
                row.confirmed += amount.minor();
                row.orders += 1;
            }
            ProductEvent::ReservationReleased { amount, .. } => {
                row.reserved = checked(envelope, row.reserved - amount.minor(), "reserved")?;
                row.released += 1;
            }
            ProductEvent::PurchaseRefused { .. } => row.refused += 1,
            ProductEvent::PayoutRunPlanned {
                kind,
                days,
                paid_total,
                ..
            } => match kind {
                PayoutKind::Principal => row.principal_scheduled = paid_total.minor(),
                PayoutKind::Interest => row.interest_days += i64::from(days.unwrap_or(0)),
            },
        }
        row.available = checked(
            envelope,
            row.quota - row.confirmed - row.reserved,
            "available quota",
        )?;
        row.status = sale_status(row).to_owned();
        if row.status == "sold_out" && row.sold_out_at.is_none() {
            row.sold_out_at = Some(envelope.occurred_at.clone());
        }
        row.updated_at.clone_from(&envelope.occurred_at);
        row.position = envelope.position();
        Ok(())
    }

    fn changes(&self) -> Vec<Change> {
        self.sales.changed().into_iter().collect()
    }
}

/// Balances, holds and the ledger of entries per customer account.
pub struct AccountsFold {
    accounts: Rows<AccountRow>,
    holds: Rows<HoldRow>,
    entries: Vec<LedgerEntryRow>,
}

impl AccountsFold {
    /// An empty batch.
    pub fn new() -> AccountsFold {
        AccountsFold {
            accounts: Rows::new(&ACCOUNT_BALANCES),
            holds: Rows::new(&ACCOUNT_HOLDS),
            entries: Vec::new(),
        }
    }
}

impl Default for AccountsFold {
    fn default() -> Self {
        AccountsFold::new()
    }
}

/// The ledger entry kind of an account event, and its order, payout, product
/// and reference.
struct EntryContext {
    kind: &'static str,
    order_id: Option<String>,
    payout_id: Option<String>,
    product_id: Option<String>,
    reference: Option<String>,
}

fn entry_context(event: &AccountEvent) -> Option<EntryContext> {
    let context = |kind| EntryContext {
        kind,
        order_id: None,
        payout_id: None,
        product_id: None,
        reference: None,
    };
    Some(match event {
        AccountEvent::AccountOpened { .. } => return None,
        AccountEvent::FundsDeposited { reference, .. } => EntryContext {
            reference: Some(reference.clone()),
            ..context("deposit")
        },
        AccountEvent::FundsWithdrawn { reference, .. } => EntryContext {
            reference: Some(reference.clone()),
            ..context("withdrawal")
        },
        AccountEvent::PurchaseDebited {
            order_id,
            product_id,
            ..
        } => EntryContext {
            order_id: Some(order_id.to_string()),
            product_id: Some(product_id.to_string()),
            ..context("purchase")
        },
        AccountEvent::PurchaseRefunded {
            order_id,
            product_id,
            ..
        } => EntryContext {
            order_id: Some(order_id.to_string()),
            product_id: Some(product_id.to_string()),
            ..context("refund")
        },
        AccountEvent::PayoutCredited {
            payout_id,
            product_id,
            ..
        } => EntryContext {
            payout_id: Some(payout_id.to_string()),
            product_id: Some(product_id.to_string()),
            ..context("payout")
        },
    })
}

fn account_of(event: &AccountEvent) -> String {
    match event {
        AccountEvent::AccountOpened { account_id, .. }
        | AccountEvent::FundsDeposited { account_id, .. }
        | AccountEvent::PurchaseDebited { account_id, .. }
        | AccountEvent::PurchaseRefunded { account_id, .. }
        | AccountEvent::PayoutCredited { account_id, .. }
        | AccountEvent::FundsWithdrawn { account_id, .. } => account_id.to_string(),
    }
}

impl AccountsFold {
    fn apply_account(
        &mut self,
        envelope: &Envelope,
        event: &AccountEvent,
    ) -> Result<(), ProjectionError> {
        let key = account_of(event);
        if let AccountEvent::AccountOpened { currency, .. } = event {
            if self.accounts.contains(&key) {
                return Err(envelope.inconsistent("account opened twice"));
            }
            let row = AccountRow {
                account_id: key.clone(),
                currency: currency.to_string(),
                available: 0,
                held: 0,
                total_deposited: 0,
                total_invested: 0,
                total_paid_out: 0,
                total_withdrawn: 0,
                version: 0,
                opened_at: envelope.occurred_at.clone(),
                updated_at: String::new(),
                position: 0,
            };
            self.accounts.insert(key.clone(), row);
        }
        let hold_change = self.hold_change(envelope, event, &key);
        let Some(row) = self.accounts.get_mut(&key) else {
            return Err(envelope.inconsistent("event for an account never opened"));
        };
        row.held = checked(envelope, row.held + hold_change, "held")?;
        match event {
            AccountEvent::AccountOpened { .. } => {}
            AccountEvent::FundsDeposited { amount, .. } => row.total_deposited += amount.minor(),
            AccountEvent::FundsWithdrawn { amount, .. } => row.total_withdrawn += amount.minor(),
            AccountEvent::PurchaseDebited { amount, .. } => row.total_invested += amount.minor(),
            AccountEvent::PurchaseRefunded { amount, .. } => {
                row.total_invested =
                    checked(envelope, row.total_invested - amount.minor(), "invested")?;
            }
            AccountEvent::PayoutCredited { amount, .. } => row.total_paid_out += amount.minor(),
        }
        if let Some(context) = entry_context(event) {
            let customer_postings = event.postings().into_iter().filter(|posting| {
                matches!(&posting.account, LedgerAccount::CustomerAvailable { account_id } if account_id.to_string() == key)
            });
            for (seq, posting) in customer_postings.enumerate() {
                // Ledger pages break between positions (see `query::ledger`).
                assert_eq!(seq, 0, "BUG: an event posts twice to one account");
                let amount =
                    i64::try_from(posting.signed_minor()).expect("BUG: postings fit in i64");
                row.available = checked(envelope, row.available + amount, "available balance")?;
                self.entries.push(LedgerEntryRow {
                    account_id: key.clone(),
                    position: envelope.position(),
                    seq: i64::try_from(seq).expect("BUG: few postings per event"),
                    event_id: envelope.recorded.event_id.to_string(),
                    kind: context.kind.to_owned(),
                    amount,
                    balance_after: row.available,
                    order_id: context.order_id.clone(),
                    payout_id: context.payout_id.clone(),
                    product_id: context.product_id.clone(),
                    reference: context.reference.clone(),
                    occurred_at: envelope.occurred_at.clone(),
                });
            }
        }
        row.version = envelope.recorded.version;
        row.updated_at.clone_from(&envelope.occurred_at);
        row.position = envelope.position();
        Ok(())
    }

    /// Updates the order's hold and returns the change to the account's `held`.
    fn hold_change(&mut self, envelope: &Envelope, event: &AccountEvent, account_id: &str) -> i64 {
        match event {
            AccountEvent::PurchaseDebited {
                order_id, amount, ..
            } => {
                let key = order_id.to_string();
                let hold = self.hold(&key, account_id);
                hold.debited = amount.minor();
                let change = if hold.settled == 1 { 0 } else { amount.minor() };
                self.forget_if_done(&key);
                change
            }
            AccountEvent::PurchaseRefunded { order_id, .. } => {
                let _ = envelope;
                self.settle(&order_id.to_string(), account_id)
            }
            _ => 0,
        }
    }

    fn hold(&mut self, order_id: &str, account_id: &str) -> &mut HoldRow {
        if !self.holds.contains(order_id) {
            let row = HoldRow {
                order_id: order_id.to_owned(),
                account_id: account_id.to_owned(),
                debited: 0,
                settled: 0,
            };
            self.holds.insert(order_id.to_owned(), row);
        }
        self.holds.get_mut(order_id).expect("BUG: inserted above")
    }

    /// Settles an order's hold; returns the change to `held`.
    fn settle(&mut self, order_id: &str, account_id: &str) -> i64 {
        let hold = self.hold(order_id, account_id);
        if hold.settled == 1 {
            return 0;
        }
        hold.settled = 1;
        let change = -hold.debited;
        self.forget_if_done(order_id);
        change
    }

    /// A hold both debited and settled will never change again: its row goes.
    fn forget_if_done(&mut self, order_id: &str) {
        let done = self
            .holds
            .rows
            .get(order_id)
            .is_some_and(|hold| hold.settled == 1 && hold.debited > 0);
        if done {
            self.holds.remove(order_id);
        }
    }

    fn apply_confirmed(
        &mut self,
        envelope: &Envelope,
        order_id: &str,
        account_id: &str,
    ) -> Result<(), ProjectionError> {
        let change = self.settle(order_id, account_id);
        if change == 0 {
            return Ok(());
        }
        let Some(row) = self.accounts.get_mut(account_id) else {
            return Err(envelope.inconsistent("order confirmed for an account never opened"));
        };
        row.held = checked(envelope, row.held + change, "held")?;
        row.updated_at.clone_from(&envelope.occurred_at);
        row.position = envelope.position();
        Ok(())
    }
}

impl Fold for AccountsFold {
    fn want(&self, envelope: &Envelope, wanted: &mut Wanted) {
        match &envelope.fact {
            Fact::Account(event) => {
                wanted.add(&ACCOUNT_BALANCES, account_of(event));
                if let AccountEvent::PurchaseDebited { order_id, .. }
                | AccountEvent::PurchaseRefunded { order_id, .. } = event
                {
                    wanted.add(&ACCOUNT_HOLDS, order_id.to_string());
                }
            }
            Fact::Product(
                _,
                ProductEvent::ReservationConfirmed {
                    order_id,
                    account_id,
                    ..
                },
            ) => {
                wanted.add(&ACCOUNT_BALANCES, account_id.to_string());
                wanted.add(&ACCOUNT_HOLDS, order_id.to_string());
            }
            _ => {}
        }
    }

    fn load(&mut self, table: &'static Table, rows: Vec<String>) -> Result<(), ProjectionError> {
        if table.name == ACCOUNT_HOLDS.name {
            self.holds.load(rows, |row| &row.order_id)
        } else {
            self.accounts.load(rows, |row| &row.account_id)
        }
    }

    fn apply(&mut self, envelope: &Envelope) -> Result<(), ProjectionError> {
        match &envelope.fact {
            Fact::Account(event) => self.apply_account(envelope, event),
            Fact::Product(
                _,
                ProductEvent::ReservationConfirmed {
                    order_id,
                    account_id,
                    ..
                },
            ) => self.apply_confirmed(envelope, &order_id.to_string(), &account_id.to_string()),
            _ => Ok(()),
        }
    }

    fn changes(&self) -> Vec<Change> {
        [
            self.accounts.changed(),
            self.holds.changed(),
            appended(&LEDGER_ENTRIES, &self.entries),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    fn removals(&self) -> Vec<Removal> {
        self.holds.removed().into_iter().collect()
    }
}

/// Orders and the timeline of every correlated event.
pub struct OrdersFold {
    orders: Rows<OrderRow>,
    timeline: Vec<TimelineRow>,
}

impl OrdersFold {
    /// An empty batch.
    pub fn new() -> OrdersFold {
        OrdersFold {
            orders: Rows::new(&ORDERS),
            timeline: Vec::new(),
        }
    }
}

impl Default for OrdersFold {
    fn default() -> Self {
        OrdersFold::new()
    }
}

fn order_of(fact: &Fact) -> Option<String> {
    match fact {
        Fact::Product(
            _,
            ProductEvent::QuotaReserved { order_id, .. }
            | ProductEvent::ReservationConfirmed { order_id, .. }
            | ProductEvent::ReservationReleased { order_id, .. }
            | ProductEvent::PurchaseRefused { order_id, .. },
        ) => Some(order_id.to_string()),
        Fact::Account(
            AccountEvent::PurchaseDebited { order_id, .. }
            | AccountEvent::PurchaseRefunded { order_id, .. },
        ) => Some(order_id.to_string()),
        _ => None,
    }
}

fn reason_text<T: Serialize>(reason: &T) -> String {
    serde_json::to_value(reason)
        .ok()
        .and_then(|value| value.as_str().map(str::to_owned))
        .expect("BUG: reasons serialize as strings")
}

impl OrdersFold {
    fn apply_order(&mut self, envelope: &Envelope, key: &str) -> Result<(), ProjectionError> {
        if let Fact::Product(product_id, event) = &envelope.fact {
            let created = match event {
                ProductEvent::QuotaReserved {
                    account_id,
                    amount,
                    expires_at,
                    ..
                } => Some((
                    account_id,
                    amount,
                    "reserved",
                    None,
                    Some(time_text(*expires_at)),
                )),
                ProductEvent::PurchaseRefused {
                    account_id,
                    amount,
                    reason,
                    ..
                } => Some((
                    account_id,
                    amount,
                    "refused",
                    Some(reason_text(reason)),
                    None,
                )),
                _ => None,
            };
            if let Some((account_id, amount, status, reason, expires_at)) = created {
                if let Some(row) = self.orders.get_mut(key) {
                    if status == "reserved" {
                        if row.expires_at.is_some() {
                            return Err(envelope.inconsistent("order reserved twice"));
                        }
                        // Its debit came first in the same batch.
                        row.expires_at = expires_at;
                    }
                    // A refusal of a retried order that exists already
                    // changes nothing about it.
                    return Ok(());
                }
                let row = OrderRow {
                    order_id: key.to_owned(),
                    product_id: product_id.to_string(),
                    account_id: account_id.to_string(),
                    amount: amount.minor(),
                    status: status.to_owned(),
                    reason,
                    expires_at,
                    paid: 0,
                    refunded: 0,
                    created_at: envelope.occurred_at.clone(),
                    updated_at: envelope.occurred_at.clone(),
                    position: envelope.position(),
                };
                self.orders.insert(key.to_owned(), row);
                return Ok(());
            }
        }
        if let Fact::Account(AccountEvent::PurchaseDebited {
            account_id,
            product_id,
            amount,
            ..
        }) = &envelope.fact
            && !self.orders.contains(key)
        {
            // A debit committed in the same batch as, but before, its
            // reservation: the reservation fills in the rest.
            let row = OrderRow {
                order_id: key.to_owned(),
                product_id: product_id.to_string(),
                account_id: account_id.to_string(),
                amount: amount.minor(),
                status: "reserved".to_owned(),
                reason: None,
                expires_at: None,
                paid: 0,
                refunded: 0,
                created_at: envelope.occurred_at.clone(),
                updated_at: envelope.occurred_at.clone(),
                position: envelope.position(),
            };
            self.orders.insert(key.to_owned(), row);
        }
        let Some(row) = self.orders.get_mut(key) else {
            return Err(envelope.inconsistent("event for an order never reserved"));
        };
        match &envelope.fact {
            Fact::Product(_, ProductEvent::ReservationConfirmed { .. }) => {
                row.status = "confirmed".to_owned();
                row.expires_at = None;
            }
            Fact::Product(_, ProductEvent::ReservationReleased { reason, .. }) => {
                if row.status != "refunded" {
                    row.status = "released".to_owned();
                }
                row.reason = Some(reason_text(reason));
                row.expires_at = None;
            }
            Fact::Account(AccountEvent::PurchaseDebited { amount, .. }) => {
                row.paid += amount.minor()
            }
            Fact::Account(AccountEvent::PurchaseRefunded { amount, .. }) => {
                row.refunded += amount.minor();
                row.status = "refunded".to_owned();
            }
            _ => unreachable!("BUG: order_of names only order events"),
        }
        row.updated_at.clone_from(&envelope.occurred_at);
        row.position = envelope.position();
        Ok(())
    }
}

impl Fold for OrdersFold {
    fn want(&self, envelope: &Envelope, wanted: &mut Wanted) {
        if let Some(key) = order_of(&envelope.fact) {
            wanted.add(&ORDERS, key);
        }
    }

    fn load(&mut self, _table: &'static Table, rows: Vec<String>) -> Result<(), ProjectionError> {
        self.orders.load(rows, |row| &row.order_id)
    }

    fn apply(&mut self, envelope: &Envelope) -> Result<(), ProjectionError> {
        if let Some(key) = order_of(&envelope.fact) {
            self.apply_order(envelope, &key)?;
        }
        let recorded = &envelope.recorded;
        if let Some(correlation_id) = recorded.metadata.correlation_id {
            self.timeline.push(TimelineRow {
                correlation_id: correlation_id.to_string(),
                position: recorded.position,
            });
        }
        Ok(())
    }

    fn changes(&self) -> Vec<Change> {
        [
            self.orders.changed(),
            appended(&TIMELINE_EVENTS, &self.timeline),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// Payout status per payout.
pub struct PayoutsFold {
    payouts: Rows<PayoutRow>,
}

impl PayoutsFold {
    /// An empty batch.
    pub fn new() -> PayoutsFold {
        PayoutsFold {
            payouts: Rows::new(&PAYOUTS),
        }
    }
}

impl Default for PayoutsFold {
    fn default() -> Self {
        PayoutsFold::new()
    }
}

impl Fold for PayoutsFold {
    fn want(&self, envelope: &Envelope, wanted: &mut Wanted) {
        if let Fact::Payout(payout_id, _) = &envelope.fact {
            wanted.add(&PAYOUTS, payout_id.to_string());
        }
    }

    fn load(&mut self, _table: &'static Table, rows: Vec<String>) -> Result<(), ProjectionError> {
        self.payouts.load(rows, |row| &row.payout_id)
    }

    fn apply(&mut self, envelope: &Envelope) -> Result<(), ProjectionError> {
        let Fact::Payout(payout_id, event) = &envelope.fact else {
            return Ok(());
        };
        let key = payout_id.to_string();
        if let PayoutEvent::PayoutScheduled {
            product_id,
            account_id,
            period,
            kind,
            amount,
            ..
        } = event
        {
            if self.payouts.contains(&key) {
                return Err(envelope.inconsistent("payout scheduled twice"));
            }
            let row = PayoutRow {
                payout_id: key.clone(),
                product_id: product_id.to_string(),
                account_id: account_id.to_string(),
                period: period.clone(),
                kind: reason_text(kind),
                amount: amount.minor(),
                status: "scheduled".to_owned(),
                attempts: 0,
                provider_ref: None,
                last_error: None,
                lease_until: None,
                created_at: envelope.occurred_at.clone(),
                updated_at: String::new(),
                position: 0,
            };
            self.payouts.insert(key.clone(), row);
        }
        let Some(row) = self.payouts.get_mut(&key) else {
            return Err(envelope.inconsistent("event for a payout never scheduled"));
        };
        let status = match event {
            PayoutEvent::PayoutScheduled { .. } => "scheduled",
            PayoutEvent::PayoutAttempted {
                attempt,
                lease_until,
                ..
            } => {
                row.attempts = i64::from(*attempt);
                row.lease_until = Some(time_text(*lease_until));
                "in_flight"
            }
            PayoutEvent::PayoutSucceeded { provider_ref } => {
                row.provider_ref = Some(provider_ref.clone());
                "succeeded"
            }
            PayoutEvent::PayoutFailed { reason } => {
                row.last_error = Some(reason.clone());
                "failed"
            }
            PayoutEvent::PayoutOutcomeUnknown { detail } => {
                row.last_error = Some(detail.clone());
                "unknown"
            }
            PayoutEvent::PayoutReconciled { finding } => match finding {
                ProviderFinding::Paid { provider_ref } => {
                    row.provider_ref = Some(provider_ref.clone());
                    "succeeded"
                }
                ProviderFinding::Refused { reason } => {
                    row.last_error = Some(reason.clone());
                    "failed"
                }
                ProviderFinding::NotFound => "scheduled",
            },
            PayoutEvent::PayoutParked { reason, .. } => {
                row.last_error = Some(reason.clone());
                "parked"
            }
            // Back to work through a lookup of its key (see the decider).
            PayoutEvent::PayoutRetried {} => "unknown",
            PayoutEvent::PayoutCancelled { .. } => "cancelled",
        };
        row.status = status.to_owned();
        if status != "in_flight" {
            row.lease_until = None;
        }
        row.updated_at.clone_from(&envelope.occurred_at);
        row.position = envelope.position();
        Ok(())
    }

    fn changes(&self) -> Vec<Change> {
        self.payouts.changed().into_iter().collect()
    }
}
