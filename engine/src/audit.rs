//! The log auditor: reads the whole log, folds every stream with the domain
//! deciders, and lists every broken invariant. Used by tests, benchmarks and
//! the CLI; it trusts nothing but the events.

use domain::account::{AccountEvent, AccountState, CustomerAccount};
use domain::posting::{LedgerAccount, is_balanced};
use domain::product::{ProductEvent, ProductSale, ProductState, ReservationState, Sale};
use domain::{AccountId, Decider, OrderId, ProductId};
use std::collections::HashMap;
use store::{EventStore, StoreError, codec};

/// Events read per page while auditing.
const AUDIT_PAGE: usize = 5_000;

/// Everything the log says, folded per stream.
#[derive(Debug, Default)]
pub struct Audit {
    /// Product states by stream.
    pub products: HashMap<String, ProductState>,
    /// Account states by stream.
    pub accounts: HashMap<String, AccountState>,
    /// Each customer's available balance summed from postings.
    pub posted: HashMap<AccountId, i128>,
    /// Events whose postings do not balance (positions).
    pub unbalanced: Vec<i64>,
    /// Events read.
    pub events: u64,
}

/// Reads and folds the whole log.
pub async fn audit(store: &dyn EventStore) -> Result<Audit, StoreError> {
    let mut audit = Audit::default();
    let mut after = 0;
    loop {
        let batch = store.read_all(after, AUDIT_PAGE).await?;
        let Some(last) = batch.last() else {
            return Ok(audit);
        };
        after = last.position;
        for recorded in batch {
            audit.events += 1;
            let corrupt = |error: codec::DecodeError| StoreError::Corrupt {
                position: error.position,
                reason: error.to_string(),
            };
            if recorded.stream_id.starts_with("product-") {
                let event: ProductEvent = codec::decode(&recorded).map_err(corrupt)?;
                let state = audit
                    .products
                    .remove(&recorded.stream_id)
                    .unwrap_or_default();
                audit
                    .products
                    .insert(recorded.stream_id, ProductSale::evolve(state, &event));
            } else if recorded.stream_id.starts_with("account-") {
                let event: AccountEvent = codec::decode(&recorded).map_err(corrupt)?;
                audit.post(recorded.position, &event);
                let state = audit
                    .accounts
                    .remove(&recorded.stream_id)
                    .unwrap_or_default();
                audit
                    .accounts
                    .insert(recorded.stream_id, CustomerAccount::evolve(state, &event));
            }
        }
    }
}

impl Audit {
    fn post(&mut self, position: i64, event: &AccountEvent) {
        let postings = event.postings();
        if !postings.is_empty() && !is_balanced(&postings) {
            self.unbalanced.push(position);
        }
        for posting in &postings {
            if let LedgerAccount::CustomerAvailable { account_id } = posting.account {
                *self.posted.entry(account_id).or_default() += posting.signed_minor();
            }
        }
    }

    /// Invariants that hold at every instant; returns every violation.
    pub fn always_violations(&self) -> Vec<String> {
        let mut violations: Vec<String> = self
            .unbalanced
            .iter()
            .map(|p| format!("unbalanced postings at position {p}"))
            .collect();
        for (stream, product) in &self.products {
            let Some(sale) = &product.sale else { continue };
            let total = sale.confirmed.minor() + sale.pending.minor() + sale.available().minor();
            if total != sale.terms.quota.minor() {
                violations.push(format!(
                    "{stream}: confirmed + pending + available = {total}, quota {}",
                    sale.terms.quota
                ));
            }
        }
        for (stream, account) in &self.accounts {
            let Some(open) = &account.account else {
                continue;
            };
            let posted = self.posted.get(&open.account_id).copied().unwrap_or(0);
            if posted < 0 || i128::from(open.available.minor()) != posted {
                violations.push(format!(
                    "{stream}: available {} but postings sum to {posted}",
                    open.available
                ));
            }
        }
        violations
    }

    /// Invariants that hold once every reservation is resolved: no pending
    /// quota, and an order is confirmed exactly when one unrefunded debit pays it.
    pub fn settled_violations(&self) -> Vec<String> {
        let mut violations = self.always_violations();
        let debits = self.debits();
        for (stream, product) in &self.products {
            let Some(sale) = &product.sale else { continue };
            if !sale.pending.is_zero() {
                violations.push(format!("{stream}: {} still pending", sale.pending));
            }
            for (order_id, reservation) in &sale.reservations {
                let paid = debits.get(order_id).copied().unwrap_or(0);
                let expected = u32::from(reservation.state == ReservationState::Confirmed);
                if reservation.state != ReservationState::Pending && paid != expected {
                    violations.push(format!(
                        "order {order_id} is {:?} and paid {paid} times",
                        reservation.state
                    ));
                }
            }
        }
        for order_id in debits.keys() {
            if self.reservation(order_id).is_none() {
                violations.push(format!(
                    "money taken for {order_id}, which has no reservation"
                ));
            }
        }
        violations
    }

    /// Unrefunded debits per order.
    pub fn debits(&self) -> HashMap<OrderId, u32> {
        let mut debits = HashMap::new();
        for account in self.accounts.values().filter_map(|a| a.account.as_ref()) {
            for (order_id, purchase) in &account.purchases {
                if !purchase.refunded {
                    *debits.entry(*order_id).or_default() += 1;
                }
            }
        }
        debits
    }

    /// The state of one order's reservation, if it has one.
    pub fn reservation(&self, order_id: &OrderId) -> Option<ReservationState> {
        self.products
            .values()
            .filter_map(|p| p.sale.as_ref())
            .find_map(|s| s.reservations.get(order_id).map(|r| r.state))
    }

    /// The sale of one product, if listed.
    pub fn sale(&self, product_id: &ProductId) -> Option<&Sale> {
        self.products.get(&product_id.stream())?.sale.as_ref()
    }
}
