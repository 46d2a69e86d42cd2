//! Test support: an auditor that replays the whole log with the domain
//! deciders and checks the ledger's invariants, and fixtures.

#![allow(dead_code)]

use chrono::{DateTime, TimeZone, Utc};
use domain::account::{AccountCommand, AccountEvent, AccountState, CustomerAccount};
use domain::posting::{LedgerAccount, is_balanced};
use domain::product::{
    ProductCommand, ProductEvent, ProductSale, ProductState, ProductTerms, ReservationState,
};
use domain::{AccountId, Amount, Currency, Decider, OrderId, ProductId};
use engine::{Engine, RequestContext};
use std::collections::HashMap;
use store::{EventStore, codec};

/// Everything the log says, folded per stream.
#[derive(Debug, Default)]
pub struct Audit {
    pub products: HashMap<String, ProductState>,
    pub accounts: HashMap<String, AccountState>,
    /// Each customer's available balance summed from postings.
    pub posted: HashMap<AccountId, i128>,
}

/// Reads the whole log and folds it, checking every event's postings balance.
pub async fn audit(store: &dyn EventStore) -> Audit {
    let mut audit = Audit::default();
    let head = store.head().await.unwrap();
    let mut after = 0;
    while after < head {
        let batch = store.read_all(after, 5_000).await.unwrap();
        let Some(last) = batch.last() else { break };
        after = last.position;
        for recorded in batch {
            if recorded.stream_id.starts_with("product-") {
                let event: ProductEvent = codec::decode(&recorded).unwrap();
                let state = audit
                    .products
                    .remove(&recorded.stream_id)
                    .unwrap_or_default();
                audit
                    .products
                    .insert(recorded.stream_id, ProductSale::evolve(state, &event));
            } else if recorded.stream_id.starts_with("account-") {
                let event: AccountEvent = codec::decode(&recorded).unwrap();
                let postings = event.postings();
                assert!(
                    postings.is_empty() || is_balanced(&postings),
                    "unbalanced postings at {}",
                    recorded.position
                );
                for posting in &postings {
                    if let LedgerAccount::CustomerAvailable { account_id } = posting.account {
                        *audit.posted.entry(account_id).or_default() += posting.signed_minor();
                    }
                }
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
    audit
}

impl Audit {
    /// Invariants that hold at every instant.
    pub fn check_always(&self) {
        for (stream, product) in &self.products {
            let Some(sale) = &product.sale else { continue };
            let total = sale.confirmed.minor() + sale.pending.minor() + sale.available().minor();
            assert_eq!(
                total,
                sale.terms.quota.minor(),
                "{stream}: confirmed + pending + available != quota"
            );
        }
        for account in self.accounts.values() {
            let Some(open) = &account.account else {
                continue;
            };
            let posted = self.posted.get(&open.account_id).copied().unwrap_or(0);
            assert!(posted >= 0, "negative balance");
            assert_eq!(
                i128::from(open.available.minor()),
                posted,
                "balance differs from its postings"
            );
        }
    }

    /// Invariants that hold once every reservation is resolved: no pending
    /// quota, and an order is confirmed exactly when one unrefunded debit pays it.
    pub fn check_settled(&self) {
        self.check_always();
        let debits = self.debits();
        for (stream, product) in &self.products {
            let Some(sale) = &product.sale else { continue };
            assert_eq!(sale.pending, Amount::ZERO, "{stream}: pending quota left");
            for (order_id, reservation) in &sale.reservations {
                let paid = debits.get(order_id).copied().unwrap_or(0);
                match reservation.state {
                    ReservationState::Confirmed => {
                        assert_eq!(paid, 1, "confirmed order {order_id} paid {paid} times")
                    }
                    _ => assert_eq!(
                        paid, 0,
                        "order {order_id} is {:?} but money was kept",
                        reservation.state
                    ),
                }
            }
        }
        for order_id in debits.keys() {
            let reserved = self
                .products
                .values()
                .filter_map(|p| p.sale.as_ref())
                .any(|s| s.reservations.contains_key(order_id));
            assert!(
                reserved,
                "money taken for {order_id}, which has no reservation"
            );
        }
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

    /// The sale of one product.
    pub fn sale(&self, product_id: &ProductId) -> &domain::product::Sale {
        self.products[&product_id.stream()]
            .sale
            .as_ref()
            .expect("listed")
    }
}

pub fn amount(minor: i64) -> Amount {
    Amount::new(minor).unwrap()
}

pub fn start() -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000, 0).unwrap()
}

pub fn terms(quota: i64, min: i64, max: i64) -> ProductTerms {
    ProductTerms {
        name: "Flash bond".into(),
        currency: Currency::CNY,
        quota: amount(quota),
        min_purchase: amount(min),
        max_purchase: amount(max),
        annual_rate_bps: 450,
        term_days: 90,
    }
}

pub fn operator() -> RequestContext {
    RequestContext::user("operator-1", "operator", None)
}

/// Lists and opens a product.
pub async fn open_product(engine: &Engine, product_id: &ProductId, terms: ProductTerms) {
    let list = ProductCommand::List {
        product_id: product_id.clone(),
        terms,
    };
    engine
        .product_command(product_id, list, operator())
        .await
        .unwrap();
    engine
        .product_command(product_id, ProductCommand::Open, operator())
        .await
        .unwrap();
}

/// Opens an account and deposits `minor` into it (if positive).
pub async fn funded_account(engine: &Engine, account_id: AccountId, minor: i64) {
    let open = AccountCommand::Open {
        account_id,
        currency: Currency::CNY,
    };
    engine
        .account_command(account_id, open, operator())
        .await
        .unwrap();
    if minor > 0 {
        let deposit = AccountCommand::Deposit {
            amount: amount(minor),
            reference: format!("wire-{account_id}"),
        };
        engine
            .account_command(account_id, deposit, operator())
            .await
            .unwrap();
    }
}
