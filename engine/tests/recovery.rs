//! A process killed between any two steps of a purchase leaves nothing stuck:
//! each test writes the log as a crash would have left it, starts a fresh
//! engine, and checks the outcome and the settled invariants.

mod support;

use chrono::Duration;
use domain::account::AccountEvent;
use domain::product::{ProductCommand, ProductEvent, ReleaseReason, ReservationState};
use domain::{AccountId, Currency, EventType, OrderId, ProductId};
use engine::{
    Engine, EngineSettings, ManualClock, PurchaseError, PurchaseRequest, RequestContext,
    order_id_for,
};
use std::sync::Arc;
use store::{EventStore, ExpectedVersion, MemoryEventStore, Metadata, codec};
use support::{Checks, amount, audit, start, terms};
use uuid::Uuid;

const KEY: &str = "crash-1";

struct Crashed {
    store: Arc<dyn EventStore>,
    clock: Arc<ManualClock>,
    product_id: ProductId,
    account_id: AccountId,
    order_id: OrderId,
}

async fn append<E: serde::Serialize + EventType>(
    store: &dyn EventStore,
    stream: &str,
    events: &[E],
) {
    let encoded = events
        .iter()
        .map(|e| codec::encode(e, Uuid::now_v7(), Metadata::default()))
        .collect();
    store
        .append(stream, ExpectedVersion::Any, encoded)
        .await
        .unwrap();
}

/// A listed, open product and a funded buyer; then the steps a crash left.
async fn crashed_after(reserved: bool, debited: bool, released: Option<ReleaseReason>) -> Crashed {
    let store: Arc<dyn EventStore> = Arc::new(MemoryEventStore::new());
    let product_id = ProductId::parse("crashy").unwrap();
    let account_id = AccountId(Uuid::from_u128(1));
    let order_id = order_id_for(&product_id, account_id, KEY);
    let expires_at = start() + Duration::seconds(30);
    let mut product = vec![
        ProductEvent::ProductListed {
            product_id: product_id.clone(),
            terms: terms(1_000, 10, 500),
        },
        ProductEvent::SaleOpened {},
    ];
    if reserved {
        product.push(ProductEvent::QuotaReserved {
            order_id,
            account_id,
            amount: amount(100),
            expires_at,
        });
    }
    if let Some(reason) = released {
        product.push(ProductEvent::ReservationReleased {
            order_id,
            account_id,
            amount: amount(100),
            reason,
        });
    }
    append(store.as_ref(), &product_id.stream(), &product).await;
    let mut account = vec![
        AccountEvent::AccountOpened {
            account_id,
            currency: Currency::CNY,
        },
        AccountEvent::FundsDeposited {
            account_id,
            amount: amount(1_000),
            reference: "wire-1".into(),
        },
    ];
    if debited {
        account.push(AccountEvent::PurchaseDebited {
            account_id,
            order_id,
            product_id: product_id.clone(),
            amount: amount(100),
        });
    }
    append(store.as_ref(), &account_id.stream(), &account).await;
    Crashed {
        store,
        clock: Arc::new(ManualClock::new(start())),
        product_id,
        account_id,
        order_id,
    }
}

impl Crashed {
    fn engine(&self) -> Engine {
        Engine::new(
            self.store.clone(),
            self.clock.clone(),
            EngineSettings {
                sweep_period: std::time::Duration::from_millis(50),
                ..EngineSettings::default()
            },
        )
    }

    async fn retry(&self, engine: &Engine) -> Result<engine::PurchaseReceipt, PurchaseError> {
        engine
            .purchase(PurchaseRequest {
                product_id: self.product_id.clone(),
                account_id: self.account_id,
                amount: amount(100),
                idempotency_key: KEY.into(),
                context: RequestContext::user("buyer", "customer", None),
            })
            .await
    }

    /// Lets the restarted writer load the product and run its recovery:
    /// the first snapshot is answered in the turn that reloads and queues
    /// the recovery, the second after that turn ended; then the log settles.
    async fn restart(&self) -> Engine {
        let engine = self.engine();
        engine.sale(&self.product_id).await.unwrap();
        engine.sale(&self.product_id).await.unwrap();
        support::wait_settled(self.store.as_ref()).await;
        engine
    }

    async fn available(&self) -> i64 {
        let audit = audit(self.store.as_ref()).await;
        audit.check_settled();
        audit.accounts[&self.account_id.stream()]
            .account
            .as_ref()
            .unwrap()
            .available
            .minor()
    }
}

#[tokio::test]
async fn crash_after_reserving_resumes_the_purchase() {
    let crashed = crashed_after(true, false, None).await;
    let engine = crashed.restart().await;
    let receipt = crashed.retry(&engine).await.unwrap();
    assert_eq!(receipt.order_id, crashed.order_id);
    assert_eq!(crashed.available().await, 900, "debited exactly once");
}

#[tokio::test]
async fn crash_after_reserving_past_expiry_releases_without_taking_money() {
    let crashed = crashed_after(true, false, None).await;
    crashed.clock.advance(Duration::seconds(31));
    let engine = crashed.restart().await;
    assert_eq!(crashed.retry(&engine).await, Err(PurchaseError::Expired));
    assert_eq!(crashed.available().await, 1_000, "no money taken");
    let audit = audit(crashed.store.as_ref()).await;
    assert_eq!(
        audit.reservation(&crashed.order_id),
        Some(ReservationState::Released)
    );
    assert_eq!(
        audit.listed(&crashed.product_id).available().minor(),
        1_000,
        "the quota came back"
    );
}

#[tokio::test]
async fn crash_after_debiting_confirms_without_debiting_again() {
    let crashed = crashed_after(true, true, None).await;
    // Even past expiry: the money was taken in time, so the order is confirmed.
    crashed.clock.advance(Duration::seconds(31));
    let engine = crashed.restart().await;
    assert!(crashed.retry(&engine).await.is_ok());
    assert_eq!(crashed.available().await, 900);
    assert_eq!(
        audit(crashed.store.as_ref())
            .await
            .reservation(&crashed.order_id),
        Some(ReservationState::Confirmed)
    );
}

#[tokio::test]
async fn money_taken_for_a_released_reservation_is_refunded_whatever_the_reason() {
    // Another process released the reservation (it expired, an operator
    // cancelled it, or a stale refusal) while this one's debit committed,
    // then this one died before noticing.
    let cases = [
        (ReleaseReason::Expired, PurchaseError::Expired),
        (ReleaseReason::Cancelled, PurchaseError::PaymentFailed),
        (
            ReleaseReason::InsufficientFunds,
            PurchaseError::InsufficientFunds,
        ),
        (ReleaseReason::PaymentFailed, PurchaseError::PaymentFailed),
    ];
    for (reason, answer) in cases {
        let crashed = crashed_after(true, true, Some(reason)).await;
        let engine = crashed.restart().await;
        assert_eq!(crashed.retry(&engine).await, Err(answer), "{reason:?}");
        assert_eq!(
            crashed.available().await,
            1_000,
            "{reason:?}: the payment came back"
        );
        assert_eq!(engine.stats().refunds, 1, "{reason:?}");
        // A second restart refunds nothing more.
        let again = crashed.restart().await;
        assert_eq!(crashed.available().await, 1_000);
        assert_eq!(again.stats().refunds, 0);
    }
}

#[tokio::test]
async fn an_operator_cancelling_a_paid_reservation_refunds_it() {
    let crashed = crashed_after(true, true, None).await;
    let engine = crashed.engine();
    let cancel = ProductCommand::Release {
        order_id: crashed.order_id,
        reason: ReleaseReason::Cancelled,
    };
    // Racing the writer's own recovery: either the cancellation wins and the
    // money comes back, or the confirmation wins and the cancellation is refused.
    match engine
        .product_command(
            &crashed.product_id,
            cancel,
            RequestContext::user("op", "operator", None),
        )
        .await
    {
        Ok(_) => {
            support::wait_settled(crashed.store.as_ref()).await;
            assert_eq!(
                crashed.available().await,
                1_000,
                "the cancelled order's payment came back"
            );
        }
        Err(_) => assert_eq!(crashed.available().await, 900, "confirmed and paid once"),
    }
}

#[tokio::test]
async fn only_the_workflow_reserves_or_confirms() {
    let crashed = crashed_after(true, false, None).await;
    let engine = crashed.engine();
    let confirm = ProductCommand::Confirm {
        order_id: crashed.order_id,
    };
    let refused = engine
        .product_command(
            &crashed.product_id,
            confirm,
            RequestContext::user("op", "operator", None),
        )
        .await;
    assert!(
        matches!(refused, Err(engine::CommandError::NotAllowed(_))),
        "{refused:?}"
    );
}

#[tokio::test]
async fn the_same_key_on_two_products_is_two_orders() {
    let crashed = crashed_after(false, false, None).await;
    let other = ProductId::parse("other").unwrap();
    let engine = crashed.engine();
    let list = ProductCommand::List {
        product_id: other.clone(),
        terms: terms(1_000, 10, 500),
    };
    engine
        .product_command(&other, list, RequestContext::system())
        .await
        .unwrap();
    engine
        .product_command(&other, ProductCommand::Open, RequestContext::system())
        .await
        .unwrap();
    let first = crashed.retry(&engine).await.unwrap();
    let mut request = PurchaseRequest {
        product_id: other.clone(),
        account_id: crashed.account_id,
        amount: amount(100),
        idempotency_key: KEY.into(),
        context: RequestContext::user("buyer", "customer", None),
    };
    let second = engine.purchase(request.clone()).await.unwrap();
    assert_ne!(first.order_id, second.order_id);
    request.product_id = crashed.product_id.clone();
    assert_eq!(
        engine.purchase(request).await.unwrap(),
        first,
        "a retry still finds its own order"
    );
    // Restarting refunds neither.
    crashed.restart().await;
    assert_eq!(crashed.available().await, 800);
}

/// A former owner's debit that lands after the live writer released the
/// order (the owner was stopped, its lease taken over, and it woke up with
/// the debit in flight): the live writer does not know of it, so the
/// recovery sweep hands it the refund.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_debit_for_an_order_a_live_writer_released_is_refunded_by_the_sweep() {
    let crashed = crashed_after(true, false, Some(ReleaseReason::Expired)).await;
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let engine = Engine::new(
        crashed.store.clone(),
        clock.clone(),
        EngineSettings::default(),
    );
    // The writer is live and has loaded the product: nothing is owed yet.
    engine.sale(&crashed.product_id).await.unwrap();
    engine.sale(&crashed.product_id).await.unwrap();
    append(
        crashed.store.as_ref(),
        &crashed.account_id.stream(),
        &[AccountEvent::PurchaseDebited {
            account_id: crashed.account_id,
            order_id: crashed.order_id,
            product_id: crashed.product_id.clone(),
            amount: amount(100),
        }],
    )
    .await;
    let mut index = engine::recovery::RecoveryIndex::new();
    let report = engine::recovery::sweep(&mut index, crashed.store.as_ref(), &engine)
        .await
        .unwrap();
    assert!(
        report.started.is_empty(),
        "within the grace period: untouched"
    );
    clock.advance(Duration::seconds(4));
    let report = engine::recovery::sweep(&mut index, crashed.store.as_ref(), &engine)
        .await
        .unwrap();
    assert_eq!(report.started, vec![crashed.product_id.clone()]);
    let store = crashed.store.clone();
    let stream = crashed.account_id.stream();
    support::wait_until(
        "the late debit refunded",
        std::time::Duration::from_secs(20),
        || {
            let (store, stream) = (store.clone(), stream.clone());
            async move {
                store
                    .read_stream_to_end(&stream)
                    .await
                    .unwrap()
                    .iter()
                    .any(|e| e.event_type == "purchase_refunded")
            }
        },
    )
    .await;
    assert_eq!(crashed.available().await, 1_000, "the payment came back");
}
