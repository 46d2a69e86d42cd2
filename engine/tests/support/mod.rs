//! Test support: assertions over `engine::audit`, and fixtures.

#![allow(dead_code)]

use chrono::{DateTime, TimeZone, Utc};
use domain::account::AccountCommand;
use domain::product::{ProductCommand, ProductTerms, Sale};
use domain::{AccountId, Amount, Currency, ProductId};
pub use engine::audit::Audit;
use engine::{Engine, RequestContext};
use store::EventStore;

/// Reads and folds the whole log (see `engine::audit`), with assertions.
pub async fn audit(store: &dyn EventStore) -> Audit {
    engine::audit::audit(store)
        .await
        .expect("the log is readable")
}

/// Assertions over an audit.
pub trait Checks {
    /// Panics on any violation of the always-true invariants.
    fn check_always(&self);
    /// Panics on any violation of the settled invariants.
    fn check_settled(&self);
    /// The sale of a listed product.
    fn listed(&self, product_id: &ProductId) -> &Sale;
}

impl Checks for Audit {
    fn check_always(&self) {
        let violations = self.always_violations();
        assert!(violations.is_empty(), "invariants broken: {violations:#?}");
    }

    fn check_settled(&self) {
        let violations = self.settled_violations();
        assert!(violations.is_empty(), "invariants broken: {violations:#?}");
    }

    fn listed(&self, product_id: &ProductId) -> &Sale {
        self.sale(product_id).expect("listed")
    }
}

/// Polls `condition` every 10 ms until it holds; panics naming `what` if it
/// still does not after `deadline`. Tests wait for conditions, never for time.
pub async fn wait_until<F, Fut>(what: &str, deadline: std::time::Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = tokio::time::Instant::now();
    while !condition().await {
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Waits until every reservation in the log is resolved and every settled
/// rule holds (see `engine::oracle`), or panics with what is still wrong.
pub async fn wait_settled(store: &dyn EventStore) {
    let deadline = std::time::Duration::from_secs(10);
    let started = tokio::time::Instant::now();
    loop {
        let violations = audit(store).await.settled_violations();
        if violations.is_empty() {
            return;
        }
        assert!(
            started.elapsed() < deadline,
            "the log did not settle within {deadline:?}: {violations:#?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
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

/// Projects the log into fresh read models (an SQLite file of their own),
/// then checks them: equal to a scratch rebuild, trial balance holds, and
/// every product's progress and account's balances equal the audit's fold.
pub async fn check_read_models(store: std::sync::Arc<dyn EventStore>, audit: &Audit) {
    use projections::{Projection, ReadDb};
    let folder = tempfile::tempdir().expect("a temporary folder");
    let live = ReadDb::open_sqlite(&folder.path().join("read.db"))
        .await
        .expect("read models open");
    let scratch = ReadDb::open_sqlite(&folder.path().join("scratch.db"))
        .await
        .expect("scratch opens");
    projections::install(&live).await.expect("install");
    projections::catch_up(store.as_ref(), &live, &Projection::ALL, None)
        .await
        .expect("projections apply the engine's log");
    let report = projections::check_drift(store, &live, &scratch, &mut |_, _| {})
        .await
        .expect("drift check runs");
    assert!(
        report.clean(),
        "read models drift: {}",
        serde_json::to_string_pretty(&report).expect("serializes")
    );
    let read = live.sqlite_reader().expect("SQLite");
    let sales: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT product_id, confirmed, reserved, available, orders FROM sale_progress",
    )
    .fetch_all(read)
    .await
    .expect("progress reads");
    for (product_id, confirmed, reserved, available, orders) in sales {
        // Compared with the oracle's sums from the raw events, not with the
        // deciders' `Sale`, whose arithmetic the read model repeats.
        let product_id = ProductId::parse(&product_id).expect("valid id");
        let oracle = &audit.oracle;
        let (held, quota) = (oracle.held(&product_id), oracle.quota(&product_id));
        assert!(quota > 0, "the oracle knows {product_id}");
        assert_eq!(
            (confirmed, reserved, available, orders),
            (
                oracle.confirmed(&product_id),
                held - oracle.confirmed(&product_id),
                quota - held,
                i64::try_from(oracle.confirmed_orders(&product_id)).expect("few orders")
            ),
            "progress of {product_id}"
        );
    }
    let accounts: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT account_id, available, total_deposited, total_invested FROM account_balances",
    )
    .fetch_all(read)
    .await
    .expect("balances read");
    assert_eq!(
        accounts.len(),
        audit
            .accounts
            .values()
            .filter(|a| a.account.is_some())
            .count()
    );
    for (account_id, available, deposited, invested) in accounts {
        let state = &audit.accounts[&format!("account-{account_id}")];
        let account = state.account.as_ref().expect("opened");
        assert_eq!(
            (available, deposited, invested),
            (
                account.available.minor(),
                account.total_deposited.minor(),
                account.total_invested.minor()
            ),
            "balances of {account_id}"
        );
    }
    live.close().await;
    scratch.close().await;
}
