//! Payouts exactly once against `ledger fake-gateway` lying 30% of the time
//! (half of the lies after paying): three workers and concurrent scheduling
//! of the same money under different labels, then the same with every
//! worker killed mid-run and new ones started. The gateway's own record
//! must show, per holder, the principal paid once and the term's interest
//! once, matching the ledger.

mod support;

use api::gateway::HttpProvider;
use api::gateway::fake::{FakeGatewayOptions, PaymentList};
use axum::http::StatusCode;
use engine::payouts::{Pacer, WorkerSettings};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use support::{Kind, TestApi, User};

const PRODUCT: &str = "yield-2026";
const HOLDERS: usize = 24;
const RATE_BPS: i64 = 450;
const DAYS: i64 = 90;

struct Gateway {
    url: String,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn lying_gateway(seed: u64) -> Gateway {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let options = FakeGatewayOptions {
        listen: listener.local_addr().unwrap(),
        latency_ms: 2,
        // 30% ambiguous, half of it after paying: 15% hang without paying,
        // 5% hang and pay while the caller has given up, 10% pay and 500.
        timeout_rate: 0.15,
        late_pay_rate: 0.05,
        error_after_pay_rate: 0.10,
        fail_rate: 0.0,
        hang_ms: 1_500,
        seed,
        rate_limit: 0,
    };
    let task = api::gateway::fake::spawn(options, listener);
    Gateway { url, task }
}

fn settings(name: &str) -> WorkerSettings {
    WorkerSettings {
        name: name.into(),
        lease: chrono::Duration::seconds(2),
        idle_pause: Duration::from_millis(50),
        retry_pause: chrono::Duration::milliseconds(100),
        // The provider's timeout below: a claim recorded with less of its
        // lease left than this is not used for a call.
        call_timeout: chrono::Duration::milliseconds(400),
        park_unknown_after: chrono::Duration::minutes(10),
        ..WorkerSettings::default()
    }
}

fn provider(gateway: &Gateway) -> Arc<HttpProvider> {
    // Shorter than the gateway's hang: a hung call is an unknown outcome.
    Arc::new(HttpProvider::new(&gateway.url, Duration::from_millis(400)).unwrap())
}

/// Holders with confirmed orders of different sizes, the sale closed.
async fn holders(api: &TestApi) -> Vec<(User, i64)> {
    api.open_product(PRODUCT, 20_000_000, 1, 1_000_000).await;
    let mut holders = Vec::new();
    for index in 0..HOLDERS {
        let customer = api.customer(&format!("holder{index}"), 1_000_000).await;
        // Amounts whose interest leaves rounding remainders.
        let amount = 1_000 + 37_123 * index as i64;
        let bought = api.buy(&customer, PRODUCT, amount, "first").await;
        assert_eq!(bought.status, StatusCode::CREATED, "{bought:?}");
        holders.push((customer, amount));
    }
    let closed = api
        .post(
            &format!("/v1/products/{PRODUCT}/close"),
            &api.admin,
            json!({}),
        )
        .await;
    assert_eq!(closed.status, StatusCode::OK);
    holders
}

async fn schedule(api: &TestApi, period: &str) -> usize {
    let reply = schedule_body(
        api,
        json!({"period": period, "kind": "interest", "days": DAYS}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    reply.body["scheduled"].as_u64().unwrap() as usize
}

async fn schedule_body(api: &TestApi, body: serde_json::Value) -> support::Reply {
    api.post(&format!("/v1/products/{PRODUCT}/payouts"), &api.admin, body)
        .await
}

/// Schedules the principal under `period`; its count of new payouts.
async fn schedule_principal(api: &TestApi, period: &str) -> usize {
    let reply = schedule_body(api, json!({"period": period, "kind": "principal"})).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    reply.body["scheduled"].as_u64().unwrap() as usize
}

/// Interest for the whole term under `period`: the number of new payouts,
/// or `None` if the term was already used (409 `entitlement_exceeded`).
async fn schedule_term(api: &TestApi, period: &str) -> Option<usize> {
    let reply = schedule_body(
        api,
        json!({"period": period, "kind": "interest", "days": DAYS}),
    )
    .await;
    if reply.status == StatusCode::CONFLICT {
        assert_eq!(reply.code(), "entitlement_exceeded", "{reply:?}");
        return None;
    }
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{reply:?}");
    Some(reply.body["scheduled"].as_u64().unwrap() as usize)
}

async fn wait_until_all_succeeded(api: &TestApi, expected: usize) {
    for _ in 0..600 {
        api.settle().await;
        let reply = api
            .get(&format!("/v1/payouts?product_id={PRODUCT}"), &api.admin)
            .await;
        let payouts = reply.body["payouts"].as_array().unwrap();
        let done = payouts
            .iter()
            .filter(|p| p["status"] == "succeeded")
            .count();
        if payouts.len() == expected && done == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reply = api.get("/v1/payouts", &api.admin).await;
    panic!("payouts did not all succeed: {}", reply.body);
}

/// The gateway's record and the ledger agree: one payment per payout key,
/// each holder credited exactly its interest once (and its principal once,
/// when `with_principal`).
async fn check_exactly_once(
    api: &TestApi,
    gateway: &Gateway,
    holders: &[(User, i64)],
    with_principal: bool,
) {
    let list: PaymentList = reqwest::get(format!("{}/payments", gateway.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut paid_per_key: HashMap<&str, Vec<i64>> = HashMap::new();
    for payment in list.payments.iter().filter(|p| p.status == "succeeded") {
        paid_per_key
            .entry(payment.idempotency_key.as_str())
            .or_default()
            .push(payment.amount);
    }
    let payouts = api
        .get(&format!("/v1/payouts?product_id={PRODUCT}"), &api.admin)
        .await;
    let payouts = payouts.body["payouts"].as_array().unwrap().clone();
    assert_eq!(paid_per_key.len(), payouts.len(), "one paid key per payout");
    let mut ambiguous = 0;
    for payout in &payouts {
        let key = payout["payout_id"].as_str().unwrap();
        let paid = &paid_per_key[key];
        assert_eq!(paid.len(), 1, "payout {key} paid {} times", paid.len());
        assert_eq!(Some(paid[0]), payout["amount"].as_i64());
        if payout["attempts"].as_i64() > Some(1) {
            ambiguous += 1;
        }
    }
    let timelines_unknown = count_events(api, "payout_outcome_unknown").await;
    let found_paid = count_reconciled(api, "paid").await;
    let found_missing = count_reconciled(api, "not_found").await;
    assert!(
        found_paid > 0,
        "some ambiguous calls had paid, and lookups found them"
    );
    eprintln!(
        "{} payouts; gateway calls recorded {}; attempts {}, unknown outcomes {}, lookups found {} paid and {} missing",
        payouts.len(),
        list.payments.len(),
        count_events(api, "payout_attempted").await,
        timelines_unknown,
        found_paid,
        found_missing,
    );
    assert!(
        timelines_unknown > 0 || ambiguous > 0,
        "the gateway lied 30% of the time, so some outcomes were unknown"
    );
    // Per holder in the gateway's own record: what it paid under the
    // holder's account, against what the holder is owed.
    let mut paid_to: HashMap<&str, i64> = HashMap::new();
    for payment in list.payments.iter().filter(|p| p.status == "succeeded") {
        *paid_to.entry(payment.account_id.as_str()).or_default() += payment.amount;
    }
    for (holder, principal) in holders {
        let interest = principal * RATE_BPS * DAYS / 3_650_000;
        let owed = interest + if with_principal { *principal } else { 0 };
        let account = holder.account_id.as_deref().unwrap();
        assert_eq!(
            paid_to.get(account).copied().unwrap_or(0),
            owed,
            "the gateway paid holder {account} exactly what is owed"
        );
        // A payout is credited after its success is recorded (in the
        // worker's next batch): wait for the credit, with a deadline. A
        // credit twice would pass `owed` and never come back to it.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let balance = loop {
            api.settle().await;
            let balance = api
                .get(&format!("/v1/accounts/{account}"), &holder.token)
                .await;
            if balance.body["total_paid_out"] == owed || std::time::Instant::now() >= deadline {
                break balance;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(balance.body["total_paid_out"], owed, "{balance:?}");
        let ledger = api
            .get(
                &format!("/v1/accounts/{account}/ledger?limit=1000"),
                &holder.token,
            )
            .await;
        let mut payouts: Vec<i64> = ledger.body["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "payout")
            .map(|e| e["amount"].as_i64().unwrap())
            .collect();
        payouts.sort();
        let mut expected: Vec<i64> = [interest]
            .into_iter()
            .chain(with_principal.then_some(*principal))
            .filter(|amount| *amount > 0)
            .collect();
        expected.sort();
        assert_eq!(payouts, expected, "{ledger:?}");
    }
}

/// Reconciliations whose lookup found this outcome (`paid`, `not_found`).
async fn count_reconciled(api: &TestApi, outcome: &str) -> usize {
    count_where(api, |e| {
        e.event_type == "payout_reconciled" && e.data["finding"]["outcome"] == outcome
    })
    .await
}

async fn count_events(api: &TestApi, event_type: &str) -> usize {
    count_where(api, |e| e.event_type == event_type).await
}

/// Events of the whole log that match.
async fn count_where(api: &TestApi, matches: impl Fn(&store::RecordedEvent) -> bool) -> usize {
    let mut count = 0;
    let mut after = 0;
    loop {
        let page = api
            .server
            .state
            .store
            .read_all(after, 10_000)
            .await
            .unwrap();
        let Some(last) = page.last() else {
            return count;
        };
        after = last.position;
        count += page.iter().filter(|e| matches(e)).count();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_and_concurrent_schedulers_pay_each_holder_once_on_sqlite() {
    three_workers_and_concurrent_schedulers(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_and_concurrent_schedulers_pay_each_holder_once_on_postgres() {
    three_workers_and_concurrent_schedulers(Kind::Postgres).await;
}

async fn three_workers_and_concurrent_schedulers(kind: Kind) {
    let Some(mut api) = TestApi::start(kind, "payouts").await else {
        return;
    };
    let holders = holders(&api).await;
    let gateway = lying_gateway(7).await;
    api.server
        .start_payout_workers(provider(&gateway), 3, settings("w"));
    // The same money under different labels, all at once: a payout job
    // and a settlement job naming one payment differently.
    let (first, second, third, maturity, settlement) = futures::join!(
        schedule_term(&api, "2026-Q4"),
        schedule_term(&api, "2026-Q4"),
        schedule_term(&api, "Q4-settlement"),
        schedule_principal(&api, "maturity"),
        schedule_principal(&api, "2026-maturity"),
    );
    let interest: usize = [first, second, third].into_iter().flatten().sum();
    assert_eq!(
        interest, HOLDERS,
        "the term's interest scheduled once across labels: {first:?} {second:?} {third:?}"
    );
    assert_eq!(
        maturity + settlement,
        HOLDERS,
        "principal scheduled once across labels"
    );
    assert_eq!(
        schedule_term(&api, "2026-Q4-again").await,
        None,
        "the term is used up"
    );
    assert_eq!(schedule_principal(&api, "final").await, 0);
    wait_until_all_succeeded(&api, 2 * HOLDERS).await;
    check_exactly_once(&api, &gateway, &holders, true).await;
    gateway.task.abort();
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_killed_mid_run_leave_nothing_paid_twice() {
    let mut api = TestApi::start(Kind::Sqlite, "payouts_crash").await.unwrap();
    let holders = holders(&api).await;
    let gateway = lying_gateway(11).await;
    assert_eq!(schedule(&api, "2026-Q4").await, HOLDERS);
    api.server
        .start_payout_workers(provider(&gateway), 3, settings("first"));
    // Kill every worker mid-run, as a crash would: claims stay in flight,
    // provider calls are abandoned half-way.
    // Killed once they are under way: the first attempts are in the log.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while count_events(&api, "payout_attempted").await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first workers made no attempt within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    api.server.kill_payout_workers();
    let attempted = count_events(&api, "payout_attempted").await;
    assert!(attempted > 0, "the first workers got going");
    api.server
        .start_payout_workers(provider(&gateway), 3, settings("second"));
    wait_until_all_succeeded(&api, HOLDERS).await;
    check_exactly_once(&api, &gateway, &holders, false).await;
    gateway.task.abort();
    api.stop().await;
}

/// A gateway that answers 429 beyond 5 calls a second, against workers
/// allowed 32 calls in flight and no rate of their own: the 429s pause
/// the workers and are asked again with the same key within the same
/// claim, so every holder is paid once with one attempt each (a 429 is
/// neither a refusal nor an attempt's outcome).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_gateway_slows_the_workers_without_spending_attempts() {
    let mut api = TestApi::start(Kind::Sqlite, "payouts_429").await.unwrap();
    let holders = holders(&api).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let options = FakeGatewayOptions {
        listen: listener.local_addr().unwrap(),
        latency_ms: 20,
        timeout_rate: 0.0,
        late_pay_rate: 0.0,
        error_after_pay_rate: 0.0,
        fail_rate: 0.0,
        hang_ms: 0,
        seed: 3,
        rate_limit: 5,
    };
    let (task, observed) = api::gateway::fake::spawn_observed(options, listener);
    let gateway = Gateway { url, task };
    assert_eq!(schedule(&api, "2026-Q4").await, HOLDERS);
    let pacer = Arc::new(Pacer::new(None));
    let settings = WorkerSettings {
        name: "throttled".into(),
        // Long enough that a claim outlives the pauses 429s impose.
        lease: chrono::Duration::seconds(60),
        call_timeout: chrono::Duration::seconds(2),
        concurrency: 32,
        pacer: pacer.clone(),
        ..WorkerSettings::default()
    };
    let provider = Arc::new(HttpProvider::new(&gateway.url, Duration::from_secs(2)).unwrap());
    api.server.start_payout_workers(provider, 1, settings);
    wait_until_all_succeeded(&api, HOLDERS).await;
    assert!(observed.calls.throttled() > 0, "the gateway answered 429");
    assert!(pacer.throttled() > 0, "the workers heard the 429s");
    assert!(
        observed.calls.peak_in_flight() > 1,
        "calls were in flight at once"
    );
    let payouts = api
        .get(&format!("/v1/payouts?product_id={PRODUCT}"), &api.admin)
        .await;
    for payout in payouts.body["payouts"].as_array().unwrap() {
        assert_eq!(payout["attempts"], 1, "a 429 is not an attempt: {payout}");
    }
    assert_eq!(count_events(&api, "payout_outcome_unknown").await, 0);
    let list: PaymentList = reqwest::get(format!("{}/payments", gateway.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut paid_to: HashMap<&str, (usize, i64)> = HashMap::new();
    for payment in list.payments.iter().filter(|p| p.status == "succeeded") {
        let entry = paid_to.entry(payment.account_id.as_str()).or_default();
        entry.0 += 1;
        entry.1 += payment.amount;
    }
    assert_eq!(paid_to.len(), HOLDERS, "every holder paid");
    for (holder, principal) in &holders {
        let account = holder.account_id.as_deref().unwrap();
        let interest = principal * RATE_BPS * DAYS / 3_650_000;
        assert_eq!(
            paid_to[account],
            (1, interest),
            "holder {account} paid once"
        );
    }
    gateway.task.abort();
    api.stop().await;
}
