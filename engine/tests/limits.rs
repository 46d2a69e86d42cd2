//! Load shedding and the sold-out fast path.

mod support;

use async_trait::async_trait;
use domain::{AccountId, ProductId};
use engine::{Engine, EngineSettings, PurchaseError, PurchaseRequest, RequestContext, SystemClock};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use store::{AppendHook, EventStore, MemoryEventStore, StoreError};
use support::{amount, funded_account, open_product, terms};
use tokio::sync::Notify;
use uuid::Uuid;

/// Holds product appends open while armed.
struct Hold {
    armed: AtomicBool,
    entered: Notify,
    release: Notify,
}

#[async_trait]
impl AppendHook for Hold {
    async fn before_commit(&self, streams: &[&str]) -> Result<(), StoreError> {
        if self.armed.load(Ordering::SeqCst) && streams.iter().any(|s| s.starts_with("product-")) {
            self.entered.notify_one();
            self.release.notified().await;
        }
        Ok(())
    }
}

fn request(product_id: &ProductId, buyer: AccountId, key: &str) -> PurchaseRequest {
    PurchaseRequest {
        product_id: product_id.clone(),
        account_id: buyer,
        amount: amount(100),
        idempotency_key: key.into(),
        context: RequestContext::user("buyer", "customer", None),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_sheds_load_at_once_and_loses_nothing() {
    let hold = Arc::new(Hold {
        armed: AtomicBool::new(false),
        entered: Notify::new(),
        release: Notify::new(),
    });
    let log = MemoryEventStore::new();
    let store: Arc<dyn EventStore> = Arc::new(log.with_hook(hold.clone()));
    let settings = EngineSettings {
        queue_max: 2,
        batch_max: 1,
        ..EngineSettings::default()
    };
    let engine = Engine::new(store.clone(), Arc::new(SystemClock), settings);
    let product_id = ProductId::parse("shed").unwrap();
    open_product(&engine, &product_id, terms(10_000, 100, 100)).await;
    let buyer = AccountId(Uuid::from_u128(1));
    funded_account(&engine, buyer, 10_000).await;

    hold.armed.store(true, Ordering::SeqCst);
    let first = tokio::spawn({
        let (engine, request) = (engine.clone(), request(&product_id, buyer, "k0"));
        async move { engine.purchase(request).await }
    });
    hold.entered.notified().await;
    // The writer is stuck in its append; two purchases fill the queue.
    let queued: Vec<_> = (1..=2)
        .map(|n| {
            let (engine, request) = (
                engine.clone(),
                request(&product_id, buyer, &format!("k{n}")),
            );
            tokio::spawn(async move { engine.purchase(request).await })
        })
        .collect();
    support::wait_until(
        "two purchases queued behind the held append",
        std::time::Duration::from_secs(10),
        || {
            let depths = engine.queue_depths();
            let product_id = &product_id;
            async move {
                depths
                    .iter()
                    .any(|(queued, depth)| queued == product_id && *depth == 2)
            }
        },
    )
    .await;
    let shed = engine.purchase(request(&product_id, buyer, "k3")).await;
    assert_eq!(
        shed,
        Err(PurchaseError::Overloaded),
        "a full queue answers at once"
    );

    hold.armed.store(false, Ordering::SeqCst);
    hold.release.notify_one();
    assert!(first.await.unwrap().is_ok());
    for task in queued {
        assert!(task.await.unwrap().is_ok(), "queued purchases complete");
    }
    // The shed purchase was never taken: retrying it later buys it once.
    assert!(
        engine
            .purchase(request(&product_id, buyer, "k3"))
            .await
            .is_ok()
    );
    let audit = support::audit(store.as_ref()).await;
    use support::Checks;
    audit.check_settled();
    assert_eq!(audit.listed(&product_id).confirmed_orders, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sold_out_product_refuses_from_memory_without_touching_the_store() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryEventStore::new());
    let engine = Engine::new(
        store.clone(),
        Arc::new(SystemClock),
        EngineSettings::default(),
    );
    let product_id = ProductId::parse("tiny").unwrap();
    open_product(&engine, &product_id, terms(200, 100, 100)).await;
    let buyer = AccountId(Uuid::from_u128(1));
    funded_account(&engine, buyer, 10_000).await;
    for key in ["a", "b"] {
        assert!(
            engine
                .purchase(request(&product_id, buyer, key))
                .await
                .is_ok()
        );
    }
    let head = store.head().await.unwrap();
    for n in 0..100 {
        let refused = engine
            .purchase(request(&product_id, buyer, &format!("late-{n}")))
            .await;
        assert_eq!(refused, Err(PurchaseError::SoldOut));
    }
    assert_eq!(
        store.head().await.unwrap(),
        head,
        "no event was appended for the refusals"
    );
    assert_eq!(engine.stats().sold_out_from_memory, 100);
    // A retry of a confirmed purchase still gets its confirmation, not sold out.
    assert!(
        engine
            .purchase(request(&product_id, buyer, "a"))
            .await
            .is_ok()
    );
}
