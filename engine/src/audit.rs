//! The log auditor: reads the whole log once, feeds every product and
//! account event to the independent `oracle` (which checks the ledger's
//! rules from the raw events with arithmetic of its own), and folds every
//! stream with the domain deciders for the tests' and benchmarks' look-ups.
//! A stream whose event broke a rule is no longer folded (`evolve` would
//! panic on it): the violation is reported instead. Used by tests,
//! benchmarks and the CLI; it trusts nothing but the events.

use crate::oracle::{Oracle, Violation};
use domain::account::{AccountEvent, AccountState, CustomerAccount};
use domain::product::{ProductEvent, ProductSale, ProductState, ReservationState, Sale};
use domain::{Decider, OrderId, ProductId};
use std::collections::{HashMap, HashSet};
use store::{EventStore, StoreError, codec};

/// Events read per page while auditing.
const AUDIT_PAGE: usize = 5_000;

/// Everything the log says: the oracle's findings and every sound stream folded.
#[derive(Debug, Default)]
pub struct Audit {
    /// The independent oracle, fed every product and account event.
    pub oracle: Oracle,
    /// Product states by stream (streams that broke a rule left out).
    pub products: HashMap<String, ProductState>,
    /// Account states by stream (streams that broke a rule left out).
    pub accounts: HashMap<String, AccountState>,
    /// Streams no longer folded because one of their events broke a rule.
    pub broken: HashSet<String>,
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
            let (position, stream) = (recorded.position, recorded.stream_id.as_str());
            if stream.starts_with("product-") {
                let event: ProductEvent = codec::decode(&recorded).map_err(corrupt)?;
                let broke = audit.oracle.observe_product(position, stream, &event);
                audit.fold_product(stream, &event, broke);
            } else if stream.starts_with("account-") {
                let event: AccountEvent = codec::decode(&recorded).map_err(corrupt)?;
                let broke = audit.oracle.observe_account(position, stream, &event);
                audit.fold_account(stream, &event, broke);
            }
        }
    }
}

impl Audit {
    fn fold_product(&mut self, stream: &str, event: &ProductEvent, broke: bool) {
        if broke || self.broken.contains(stream) {
            self.products.remove(stream);
            self.broken.insert(stream.to_owned());
            return;
        }
        let state = self.products.remove(stream).unwrap_or_default();
        let state = ProductSale::evolve(state, event);
        self.products.insert(stream.to_owned(), state);
    }

    fn fold_account(&mut self, stream: &str, event: &AccountEvent, broke: bool) {
        if broke || self.broken.contains(stream) {
            self.accounts.remove(stream);
            self.broken.insert(stream.to_owned());
            return;
        }
        let state = self.accounts.remove(stream).unwrap_or_default();
        let state = CustomerAccount::evolve(state, event);
        self.accounts.insert(stream.to_owned(), state);
    }

    /// Rules that hold at every position (see `oracle`); every violation, in log order.
    pub fn always_violations(&self) -> Vec<Violation> {
        self.oracle.always_violations()
    }

    /// Rules that hold once every reservation is resolved (see `oracle`):
    /// the always rules, nothing pending, every debit confirmed or refunded,
    /// each product's money conserved.
    pub fn settled_violations(&self) -> Vec<Violation> {
        self.oracle.settled_violations()
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
