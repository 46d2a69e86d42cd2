//! Payout workers at scale, in-process: the engine's payout index keeps
//! exactly the payouts with work left, and workers on two "nodes" (two
//! engines on one log), each split into partitions, pay every payout once
//! with many calls in flight.

mod support;

use async_trait::async_trait;
use domain::payout::{Payout, PayoutCommand, PayoutKind, PayoutState, ProviderFinding};
use domain::{AccountId, Currency, Decider, PayoutId, ProductId};
use engine::aggregate::encode_all;
use engine::payouts::{
    LookupOutcome, Pacer, PaymentOutcome, PaymentProvider, PaymentRequest, PayoutIndex,
    PayoutWorker, WorkerSettings,
};
use engine::{Engine, EngineSettings, SystemClock};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::{EventStore, ExpectedVersion, MemoryEventStore, StreamAppend};
use support::{amount, funded_account, operator};
use uuid::Uuid;

/// Appends a payout's first events, decided one command after another.
async fn write_payout(
    store: &dyn EventStore,
    payout_id: PayoutId,
    account_id: AccountId,
    commands: &[PayoutCommand],
) {
    let mut state = PayoutState::default();
    let mut events = Vec::new();
    let schedule = PayoutCommand::Schedule {
        payout_id,
        product_id: ProductId::parse("bond").unwrap(),
        account_id,
        period: "2026-Q4".into(),
        kind: PayoutKind::Interest,
        amount: amount(100),
        currency: Currency::CNY,
    };
    for command in std::iter::once(&schedule).chain(commands) {
        let decided = Payout::decide(&state, command, chrono::Utc::now()).unwrap();
        for event in &decided {
            state = Payout::evolve(state, event);
        }
        events.extend(decided);
    }
    let metadata = operator().metadata(Some(payout_id.0), None);
    store
        .append_batch(vec![StreamAppend {
            stream_id: payout_id.stream(),
            expected: ExpectedVersion::NoStream,
            events: encode_all(&events, &metadata),
        }])
        .await
        .unwrap();
}

#[tokio::test]
async fn the_index_keeps_exactly_the_payouts_with_work_left() {
    let store = MemoryEventStore::new();
    let lease_until = chrono::Utc::now() + chrono::Duration::seconds(30);
    let attempt = PayoutCommand::Attempt { lease_until };
    let ids: Vec<PayoutId> = (1..=4).map(|n| PayoutId(Uuid::from_u128(n))).collect();
    let holder = AccountId(Uuid::from_u128(99));
    write_payout(&store, ids[0], holder, &[]).await;
    let succeeded = PayoutCommand::RecordSucceeded {
        attempt: 1,
        provider_ref: "pay-1".into(),
    };
    write_payout(&store, ids[1], holder, &[attempt.clone(), succeeded]).await;
    let failed = PayoutCommand::RecordFailed {
        attempt: 1,
        reason: "declined".into(),
    };
    write_payout(&store, ids[2], holder, &[attempt.clone(), failed]).await;
    let unknown = PayoutCommand::RecordUnknown {
        attempt: 1,
        detail: "timeout".into(),
    };
    let found = PayoutCommand::Reconcile {
        finding: ProviderFinding::Refused {
            reason: "declined".into(),
        },
    };
    write_payout(&store, ids[3], holder, &[attempt, unknown]).await;

    let mut index = PayoutIndex::default();
    index.catch_up(&store).await.unwrap();
    let mut open: Vec<(PayoutId, i64)> = index
        .partition(Default::default())
        .iter()
        .map(|entry| (entry.payout.payout_id, entry.version))
        .collect();
    open.sort();
    // Scheduled; succeeded but not credited; unknown. Not the failed one.
    assert_eq!(open, vec![(ids[0], 1), (ids[1], 3), (ids[3], 3)]);

    // Followed from its position: the unknown one is settled (refused),
    // the succeeded one credited.
    let metadata = operator().metadata(Some(ids[3].0), None);
    let mut unknown_state = PayoutState::default();
    for recorded in store.read_stream(&ids[3].stream(), 0, 100).await.unwrap() {
        let event = engine::aggregate::decode::<Payout>(&recorded).unwrap();
        unknown_state = Payout::evolve(unknown_state, &event);
    }
    let reconciled = Payout::decide(&unknown_state, &found, chrono::Utc::now()).unwrap();
    store
        .append(
            &ids[3].stream(),
            ExpectedVersion::Exact(3),
            encode_all(&reconciled, &metadata),
        )
        .await
        .unwrap();
    let engine = Engine::new(
        Arc::new(store.clone()),
        Arc::new(SystemClock),
        EngineSettings::default(),
    );
    funded_account(&engine, holder, 0).await;
    let credit = domain::account::AccountCommand::CreditPayout {
        payout_id: ids[1],
        product_id: ProductId::parse("bond").unwrap(),
        kind: PayoutKind::Interest,
        amount: amount(100),
    };
    engine
        .account_command(holder, credit, operator())
        .await
        .unwrap();
    let before = index.position();
    index.catch_up(&store).await.unwrap();
    assert!(index.position() > before);
    let open: Vec<PayoutId> = index
        .partition(Default::default())
        .iter()
        .map(|entry| entry.payout.payout_id)
        .collect();
    assert_eq!(open, vec![ids[0]]);
}

/// Pays after a short delay; counts calls per key and calls in flight.
#[derive(Default)]
struct CountingProvider {
    calls: Mutex<HashMap<String, usize>>,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
}

#[async_trait]
impl PaymentProvider for CountingProvider {
    async fn pay(&self, request: &PaymentRequest) -> PaymentOutcome {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let count = {
            let mut calls = self.calls.lock().unwrap();
            let count = calls.entry(request.idempotency_key.clone()).or_default();
            *count += 1;
            *count
        };
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        PaymentOutcome::Paid {
            payment_id: format!("pay-{}-{count}", request.idempotency_key),
        }
    }

    async fn lookup(&self, _key: &str) -> LookupOutcome {
        LookupOutcome::Unknown {
            detail: "not asked in this test".into(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_on_two_nodes_pay_every_payout_once_with_calls_in_flight() {
    const PAYOUTS: usize = 600;
    let store = MemoryEventStore::new();
    let shared: Arc<dyn EventStore> = Arc::new(store.clone());
    let nodes: Vec<Engine> = (0..2)
        .map(|_| {
            Engine::new(
                shared.clone(),
                Arc::new(SystemClock),
                EngineSettings::default(),
            )
        })
        .collect();
    let mut payouts = Vec::new();
    for n in 0..PAYOUTS {
        let holder = AccountId(Uuid::from_u128(1_000_000 + n as u128));
        funded_account(&nodes[0], holder, 0).await;
        let payout_id = PayoutId(Uuid::from_u128(n as u128 * 7_919 + 1));
        write_payout(&store, payout_id, holder, &[]).await;
        payouts.push((payout_id, holder));
    }
    let provider = Arc::new(CountingProvider::default());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for (node, engine) in nodes.iter().enumerate() {
        let pacer = Arc::new(Pacer::new(None));
        for index in 0..2 {
            let settings = WorkerSettings {
                name: format!("node{node}-worker{index}"),
                idle_pause: Duration::from_millis(20),
                concurrency: 16,
                pacer: pacer.clone(),
                partition: engine::payouts::Partition { index, count: 2 },
                ..WorkerSettings::default()
            };
            let worker = PayoutWorker::new(
                shared.clone(),
                engine.clone(),
                provider.clone(),
                Arc::new(SystemClock),
                settings,
            );
            tasks.push(tokio::spawn(worker.run(stopped.clone())));
        }
    }
    // Until node 0's index has nothing left: every payout paid and credited.
    let index = nodes[0].payout_index();
    for round in 0.. {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut index = index.lock().await;
        index.catch_up(shared.as_ref()).await.unwrap();
        if index.is_empty() {
            break;
        }
        assert!(round < 1_200, "{} payouts still open", index.len());
    }
    stop.send_replace(true);
    for task in tasks {
        task.await.unwrap();
    }
    let calls = provider.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), PAYOUTS, "every payout's key called");
    assert!(calls.values().all(|n| *n == 1), "each key called once");
    assert!(
        provider.peak.load(Ordering::SeqCst) > 1,
        "calls were in flight at once"
    );
    for (payout_id, holder) in payouts {
        let (state, _) = nodes[1].account(holder).await.unwrap();
        let account = state.account.unwrap();
        assert_eq!(
            account.total_paid_out,
            amount(100),
            "{payout_id} credited once"
        );
    }
    let audit = support::audit(shared.as_ref()).await;
    assert!(audit.always_violations().is_empty());
}
