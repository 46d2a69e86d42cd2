//! Flash sales with many concurrent buyers on every backend, with one engine
//! and with several engines (separate store connections) on one database.

mod support;

use domain::{AccountId, ProductId};
use engine::{
    Engine, EngineSettings, PurchaseError, PurchaseReceipt, PurchaseRequest, RequestContext,
    SystemClock,
};
use std::collections::HashMap;
use std::sync::Arc;
use store::testing::{TestPostgres, TestSqlite};
use store::{EventStore, MemoryEventStore, PostgresEventStore, SqliteEventStore};
use support::{Checks, amount, audit, check_read_models, funded_account, open_product, terms};
use uuid::Uuid;

const BUYERS: u128 = 1_200;
const PURCHASES_PER_BUYER: u64 = 3;
const QUOTA: i64 = 150_000;

type Outcome = Result<PurchaseReceipt, PurchaseError>;

fn settings() -> EngineSettings {
    EngineSettings {
        queue_max: 100_000,
        ..EngineSettings::default()
    }
}

/// Runs the storm: every buyer makes a few purchases on engines picked
/// round-robin, then retries each with the same key; returns every answer.
async fn storm(
    engines: &[Engine],
    product_id: &ProductId,
) -> HashMap<(AccountId, String), Outcome> {
    // Some buyers can afford everything, some a little, some nothing.
    for buyer in 0..BUYERS {
        let funds = match buyer % 5 {
            0 => 0,
            1 => 150,
            _ => 1_500,
        };
        funded_account(&engines[0], AccountId(Uuid::from_u128(buyer + 1)), funds).await;
    }
    let tasks: Vec<_> = (0..BUYERS)
        .map(|buyer| {
            let engine = engines[buyer as usize % engines.len()].clone();
            let retry_engine = engines[(buyer as usize + 1) % engines.len()].clone();
            let product_id = product_id.clone();
            tokio::spawn(async move {
                let account_id = AccountId(Uuid::from_u128(buyer + 1));
                let mut answers = Vec::new();
                for purchase in 0..PURCHASES_PER_BUYER {
                    let key = format!("buy-{purchase}");
                    let request = PurchaseRequest {
                        product_id: product_id.clone(),
                        account_id,
                        amount: amount(100 + ((buyer as i64 * 37 + purchase as i64 * 11) % 400)),
                        idempotency_key: key.clone(),
                        context: RequestContext::user(
                            account_id.to_string(),
                            "customer",
                            Some(format!("req-{buyer}-{purchase}")),
                        ),
                    };
                    let first = engine.purchase(request.clone()).await;
                    // A retry of the same key, possibly on another engine, gives the same answer.
                    let retry = retry_engine.purchase(request).await;
                    assert_eq!(
                        first, retry,
                        "buyer {buyer} purchase {purchase}: a retry changed the answer"
                    );
                    answers.push(((account_id, key), first));
                }
                answers
            })
        })
        .collect();
    let mut outcomes = HashMap::new();
    for task in tasks {
        outcomes.extend(task.await.unwrap());
    }
    outcomes
}

async fn check(
    store: &dyn EventStore,
    product_id: &ProductId,
    outcomes: &HashMap<(AccountId, String), Outcome>,
) {
    let audit = audit(store).await;
    audit.check_settled();
    let sale = audit.listed(product_id);
    let mut sold = 0;
    for ((account_id, key), outcome) in outcomes {
        let order_id = engine::order_id_for(product_id, *account_id, key);
        match outcome {
            Ok(receipt) => {
                assert_eq!(receipt.order_id, order_id);
                assert_eq!(
                    audit.reservation(&order_id),
                    Some(domain::product::ReservationState::Confirmed)
                );
                sold += receipt.amount.minor();
            }
            Err(PurchaseError::Overloaded | PurchaseError::Unavailable(_)) => {
                panic!("unexpected {outcome:?}")
            }
            Err(_) => assert_ne!(
                audit.reservation(&order_id),
                Some(domain::product::ReservationState::Confirmed)
            ),
        }
    }
    assert_eq!(
        sale.confirmed.minor(),
        sold,
        "confirmed equals the sum of successful purchases"
    );
    assert_eq!(
        sale.confirmed_orders as usize,
        outcomes.values().filter(|o| o.is_ok()).count()
    );
    // The same from the oracle's own sums over the raw events.
    let oracle = &audit.oracle;
    assert_eq!(oracle.confirmed(product_id), sold, "oracle: confirmed");
    assert_eq!(
        oracle.confirmed_orders(product_id),
        outcomes.values().filter(|o| o.is_ok()).count(),
        "oracle: confirmed orders"
    );
    assert!(
        oracle.held_peak(product_id) <= oracle.quota(product_id),
        "never oversold"
    );
    let refusals: Vec<_> = outcomes.values().filter_map(|o| o.as_ref().err()).collect();
    assert!(
        refusals
            .iter()
            .any(|e| matches!(e, PurchaseError::InsufficientFunds)),
        "some buyers could not pay"
    );
    assert!(
        refusals
            .iter()
            .any(|e| matches!(e, PurchaseError::SoldOut | PurchaseError::InsufficientQuota)),
        "demand exceeded the quota"
    );
}

async fn one_engine(store: Arc<dyn EventStore>) {
    let engine = Engine::new(store.clone(), Arc::new(SystemClock), settings());
    let product_id = ProductId::parse("flash-1").unwrap();
    open_product(&engine, &product_id, terms(QUOTA, 100, 1_000)).await;
    let outcomes = storm(std::slice::from_ref(&engine), &product_id).await;
    check(store.as_ref(), &product_id, &outcomes).await;
    check_read_models(store.clone(), &audit(store.as_ref()).await).await;
    let snapshot = engine.sale(&product_id).await.unwrap().unwrap();
    assert_eq!(
        snapshot.confirmed.minor() + snapshot.pending.minor() + snapshot.available.minor(),
        QUOTA
    );
}

async fn three_engines(stores: Vec<Arc<dyn EventStore>>) {
    let engines: Vec<Engine> = stores
        .iter()
        .map(|s| Engine::new(s.clone(), Arc::new(SystemClock), settings()))
        .collect();
    let product_id = ProductId::parse("flash-shared").unwrap();
    open_product(&engines[0], &product_id, terms(QUOTA, 100, 1_000)).await;
    let outcomes = storm(&engines, &product_id).await;
    check(stores[0].as_ref(), &product_id, &outcomes).await;
    check_read_models(stores[0].clone(), &audit(stores[0].as_ref()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_one_engine_many_buyers() {
    one_engine(Arc::new(MemoryEventStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_one_engine_many_buyers() {
    let database = TestSqlite::create().await.unwrap();
    one_engine(Arc::new(database.store.clone())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_one_engine_many_buyers() {
    let Some(database) = TestPostgres::create("postgres_one_engine_many_buyers").await else {
        return;
    };
    one_engine(Arc::new(database.store().await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_three_engines_share_one_product() {
    let database = TestSqlite::create().await.unwrap();
    let mut stores: Vec<Arc<dyn EventStore>> = Vec::new();
    for _ in 0..3 {
        stores.push(Arc::new(
            SqliteEventStore::open(&database.path).await.unwrap(),
        ));
    }
    three_engines(stores).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_three_engines_share_one_product() {
    let Some(database) = TestPostgres::create("postgres_three_engines_share_one_product").await
    else {
        return;
    };
    let mut stores: Vec<Arc<dyn EventStore>> = Vec::new();
    for _ in 0..3 {
        stores.push(Arc::new(
            PostgresEventStore::open(&database.url).await.unwrap(),
        ));
    }
    three_engines(stores).await;
}
