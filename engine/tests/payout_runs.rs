//! A payout run planned in the product stream and left without its payouts
//! (the scheduler crashed, or its append failed, between the two) is
//! completed by the recovery sweep with nobody asking again: each holder
//! gets exactly the one payout the plan owes, never a second.

mod support;

use async_trait::async_trait;
use domain::payout::PayoutKind;
use domain::product::ProductCommand;
use domain::{AccountId, ProductId};
use engine::payouts::{ScheduleError, ScheduleRequest, schedule};
use engine::recovery::{RecoveryIndex, sweep};
use engine::{Engine, EngineSettings, ManualClock, PurchaseRequest, RequestContext};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use store::{AppendHook, EventStore, MemoryEventStore, StoreError};
use support::{amount, funded_account, open_product, operator, terms};
use uuid::Uuid;

const HOLDERS: u128 = 6;

/// Fails every append to a payout stream while armed, as a scheduler that
/// died right after planning would leave the log.
struct NoPayouts {
    armed: AtomicBool,
}

#[async_trait]
impl AppendHook for NoPayouts {
    async fn before_commit(&self, streams: &[&str]) -> Result<(), StoreError> {
        if self.armed.load(Ordering::SeqCst) && streams.iter().any(|s| s.starts_with("payout-")) {
            return Err(StoreError::Injected("payouts not created".into()));
        }
        Ok(())
    }
}

async fn payouts_by_holder(store: &dyn EventStore) -> HashMap<String, Vec<i64>> {
    let mut by_holder: HashMap<String, Vec<i64>> = HashMap::new();
    for event in store.read_all(0, 10_000).await.unwrap() {
        if event.event_type == "payout_scheduled" {
            by_holder
                .entry(event.data["account_id"].as_str().unwrap().to_owned())
                .or_default()
                .push(event.data["amount"].as_i64().unwrap());
        }
    }
    by_holder
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_completes_a_payout_run_left_without_its_payouts() {
    let hook = Arc::new(NoPayouts {
        armed: AtomicBool::new(false),
    });
    let log = MemoryEventStore::new();
    let store: Arc<dyn EventStore> = Arc::new(log.with_hook(hook.clone()));
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let engine = Engine::new(store.clone(), clock.clone(), EngineSettings::default());
    let product_id = ProductId::parse("runs-1").unwrap();
    open_product(&engine, &product_id, terms(100_000, 100, 10_000)).await;
    for n in 1..=HOLDERS {
        let buyer = AccountId(Uuid::from_u128(n));
        funded_account(&engine, buyer, 10_000).await;
        engine
            .purchase(PurchaseRequest {
                product_id: product_id.clone(),
                account_id: buyer,
                amount: amount(1_000 * n as i64),
                idempotency_key: format!("buy-{n}"),
                context: RequestContext::user("buyer", "customer", None),
            })
            .await
            .unwrap();
    }
    engine
        .product_command(&product_id, ProductCommand::Close, operator())
        .await
        .unwrap();

    hook.armed.store(true, Ordering::SeqCst);
    let request = ScheduleRequest {
        product_id: product_id.clone(),
        period: "maturity".into(),
        kind: PayoutKind::Principal,
        days: None,
        context: operator(),
    };
    let failed = schedule(store.as_ref(), &request).await;
    assert!(matches!(failed, Err(ScheduleError::Store(_))), "{failed:?}");
    hook.armed.store(false, Ordering::SeqCst);
    let planned = store
        .read_stream_to_end(&product_id.stream())
        .await
        .unwrap()
        .iter()
        .filter(|e| e.event_type == "payout_run_planned")
        .count();
    assert_eq!(planned, 1, "the run is planned");
    assert!(payouts_by_holder(store.as_ref()).await.is_empty());

    // Within the grace period a scheduler may still be at work: untouched.
    let mut index = RecoveryIndex::new();
    let report = sweep(&mut index, store.as_ref(), &engine).await.unwrap();
    assert_eq!(report.payouts_created, 0);
    assert_eq!(index.runs_incomplete(), 1);

    clock.advance(chrono::Duration::seconds(4));
    let report = sweep(&mut index, store.as_ref(), &engine).await.unwrap();
    assert_eq!(report.payouts_created, HOLDERS as usize);
    assert_eq!(index.runs_incomplete(), 0);
    let by_holder = payouts_by_holder(store.as_ref()).await;
    assert_eq!(by_holder.len(), HOLDERS as usize);
    for n in 1..=HOLDERS {
        let holder = AccountId(Uuid::from_u128(n)).0.to_string();
        assert_eq!(
            by_holder[&holder],
            vec![1_000 * n as i64],
            "holder {n} is owed its principal once"
        );
    }

    // A fresh index (another node, a restart) sees the run complete and
    // creates nothing; the operator's repeat creates nothing either.
    let mut fresh = RecoveryIndex::new();
    let report = sweep(&mut fresh, store.as_ref(), &engine).await.unwrap();
    assert_eq!((report.payouts_created, fresh.runs_incomplete()), (0, 0));
    let again = schedule(store.as_ref(), &request).await.unwrap();
    assert_eq!(again.scheduled, 0);
    let total: usize = payouts_by_holder(store.as_ref())
        .await
        .values()
        .map(Vec::len)
        .sum();
    assert_eq!(total, HOLDERS as usize);
}
