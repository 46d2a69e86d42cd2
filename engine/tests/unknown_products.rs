//! Nothing keyed by made-up input: unknown products start nothing and
//! append nothing, refusals that decide nothing are not appended, and idle
//! writers stop and come back on demand.

mod support;

use domain::product::{ProductCommand, ProductRejection};
use domain::{AccountId, ProductId};
use engine::{
    CommandError, Engine, EngineSettings, PurchaseError, PurchaseRequest, RequestContext,
    SystemClock,
};
use std::sync::Arc;
use std::time::Duration;
use store::{EventStore, MemoryEventStore};
use support::{amount, funded_account, open_product, operator, terms};
use uuid::Uuid;

/// How long a test waits for something the engine does by itself before
/// it declares a hang (not a timing assertion).
const HANG: Duration = Duration::from_secs(60);

fn purchase(product_id: &ProductId, buyer: AccountId, minor: i64, key: &str) -> PurchaseRequest {
    PurchaseRequest {
        product_id: product_id.clone(),
        account_id: buyer,
        amount: amount(minor),
        idempotency_key: key.into(),
        context: RequestContext::user("buyer", "customer", Some("req-1".into())),
    }
}

fn engine(store: &Arc<dyn EventStore>, settings: EngineSettings) -> Engine {
    Engine::new(store.clone(), Arc::new(SystemClock), settings)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_products_start_nothing_and_append_nothing() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryEventStore::new());
    let engine = engine(&store, EngineSettings::default());
    let buyer = AccountId(Uuid::from_u128(7));
    funded_account(&engine, buyer, 10_000).await;
    let head = store.head().await.unwrap();
    for index in 0..200 {
        let made_up = ProductId::parse(&format!("made-up-{index}")).unwrap();
        assert_eq!(
            engine
                .purchase(purchase(&made_up, buyer, 100, "k"))
                .await
                .unwrap_err(),
            PurchaseError::UnknownProduct
        );
        for command in [ProductCommand::Open, ProductCommand::Close] {
            let refused = engine
                .product_command(&made_up, command, operator())
                .await
                .unwrap_err();
            assert!(
                matches!(refused, CommandError::Product(ProductRejection::NotListed)),
                "{refused:?}"
            );
        }
        assert_eq!(engine.sale(&made_up).await.unwrap(), None);
    }
    assert!(engine.queue_depths().is_empty(), "a writer was started");
    assert_eq!(store.head().await.unwrap(), head, "something was appended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_that_decide_nothing_are_not_appended() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryEventStore::new());
    let engine = engine(&store, EngineSettings::default());
    let buyer = AccountId(Uuid::from_u128(8));
    funded_account(&engine, buyer, 100_000).await;
    let product_id = ProductId::parse("closed-bond").unwrap();
    let list = ProductCommand::List {
        product_id: product_id.clone(),
        terms: terms(1_000, 100, 500),
    };
    engine
        .product_command(&product_id, list, operator())
        .await
        .unwrap();
    let head = store.head().await.unwrap();
    // Not open yet.
    assert_eq!(
        engine
            .purchase(purchase(&product_id, buyer, 100, "early"))
            .await
            .unwrap_err(),
        PurchaseError::SaleNotOpen
    );
    assert_eq!(store.head().await.unwrap(), head);
    engine
        .product_command(&product_id, ProductCommand::Open, operator())
        .await
        .unwrap();
    let head = store.head().await.unwrap();
    // Out of range.
    assert!(matches!(
        engine
            .purchase(purchase(&product_id, buyer, 501, "big"))
            .await
            .unwrap_err(),
        PurchaseError::AmountOutOfRange { .. }
    ));
    assert_eq!(store.head().await.unwrap(), head);
    // The same keys, now within the rules, buy: nothing was decided.
    engine
        .purchase(purchase(&product_id, buyer, 100, "early"))
        .await
        .unwrap();
    engine
        .purchase(purchase(&product_id, buyer, 500, "big"))
        .await
        .unwrap();
    // Insufficient quota is a fairness record: appended.
    let head = store.head().await.unwrap();
    assert_eq!(
        engine
            .purchase(purchase(&product_id, buyer, 500, "too-much"))
            .await
            .unwrap_err(),
        PurchaseError::InsufficientQuota
    );
    assert!(store.head().await.unwrap() > head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_from_memory_checks_the_log_first() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryEventStore::new());
    let here = engine(&store, EngineSettings::default());
    let there = engine(&store, EngineSettings::default());
    let buyer = AccountId(Uuid::from_u128(9));
    funded_account(&here, buyer, 10_000).await;
    let product_id = ProductId::parse("opened-elsewhere").unwrap();
    let list = ProductCommand::List {
        product_id: product_id.clone(),
        terms: terms(1_000, 100, 500),
    };
    there
        .product_command(&product_id, list, operator())
        .await
        .unwrap();
    // This engine's writer learns the product closed...
    assert_eq!(
        here.purchase(purchase(&product_id, buyer, 100, "k1"))
            .await
            .unwrap_err(),
        PurchaseError::SaleNotOpen
    );
    // ...another opens it; a refusal from stale memory would be wrong.
    there
        .product_command(&product_id, ProductCommand::Open, operator())
        .await
        .unwrap();
    here.purchase(purchase(&product_id, buyer, 100, "k2"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_writers_stop_and_come_back_on_demand() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryEventStore::new());
    let settings = EngineSettings {
        writer_idle_stop: Duration::from_millis(100),
        ..EngineSettings::default()
    };
    let engine = engine(&store, settings);
    let buyer = AccountId(Uuid::from_u128(10));
    funded_account(&engine, buyer, 10_000).await;
    let product_id = ProductId::parse("sleepy").unwrap();
    open_product(&engine, &product_id, terms(1_000, 100, 500)).await;
    for round in 0..3 {
        engine
            .purchase(purchase(&product_id, buyer, 100, &format!("k{round}")))
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + HANG;
        while !engine.queue_depths().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the idle writer never stopped"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let sale = engine.sale(&product_id).await.unwrap().unwrap();
    assert_eq!(sale.confirmed, amount(300));
    assert_eq!(sale.confirmed_orders, 3);
}
