//! The money bounds of docs/http-api.md ("Conventions", "Payouts"), over HTTP on both
//! backends: payouts bounded by what holders are owed whatever the labels,
//! the entitlements view, parked payouts and the operator's retry and
//! cancel, the product's currency at purchase, and the 10^15 limits.

mod support;

use async_trait::async_trait;
use axum::http::StatusCode;
use domain::payout::ProviderFinding;
use engine::payouts::{
    LookupOutcome, PaymentOutcome, PaymentProvider, PaymentRequest, WorkerSettings,
};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};
use support::{Kind, TestApi, User};

const PRODUCT: &str = "bond-2026";
/// Principal of each holder; at 450 bps the interest of 60 days is
/// 100,000 × 450 × 60 / 3,650,000 = 739 (rounded down) and of 30 days 369.
const PRINCIPAL: i64 = 100_000;
const HOLDERS: usize = 3;

async fn schedule(api: &TestApi, body: Value) -> support::Reply {
    api.post(&format!("/v1/products/{PRODUCT}/payouts"), &api.admin, body)
        .await
}

fn interest(period: &str, days: i64) -> Value {
    json!({"period": period, "kind": "interest", "days": days})
}

fn principal(period: &str) -> Value {
    json!({"period": period, "kind": "principal"})
}

async fn holders(api: &TestApi) -> Vec<User> {
    api.open_product(PRODUCT, 10_000_000, 1, 1_000_000).await;
    let mut holders = Vec::new();
    for index in 0..HOLDERS {
        let customer = api.customer(&format!("holder{index}"), PRINCIPAL).await;
        let bought = api.buy(&customer, PRODUCT, PRINCIPAL, "buy").await;
        assert_eq!(bought.status, StatusCode::CREATED, "{bought:?}");
        holders.push(customer);
    }
    holders
}

async fn close(api: &TestApi) -> support::Reply {
    api.post(
        &format!("/v1/products/{PRODUCT}/close"),
        &api.admin,
        json!({}),
    )
    .await
}

async fn entitlements(api: &TestApi) -> Value {
    api.settle().await;
    let reply = api
        .get(&format!("/v1/products/{PRODUCT}/entitlements"), &api.admin)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    reply.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payouts_are_bounded_by_entitlement_on_sqlite() {
    payouts_are_bounded_by_entitlement(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payouts_are_bounded_by_entitlement_on_postgres() {
    payouts_are_bounded_by_entitlement(Kind::Postgres).await;
}

async fn payouts_are_bounded_by_entitlement(kind: Kind) {
    let Some(api) = TestApi::start(kind, "entitlements").await else {
        return;
    };
    holders(&api).await;
    // Nothing is owed while the sale is open.
    let open = schedule(&api, principal("maturity")).await;
    assert_eq!(
        (open.status, open.code()),
        (StatusCode::CONFLICT, "sale_not_closed")
    );
    assert_eq!(close(&api).await.status, StatusCode::OK);
    let before = entitlements(&api).await;
    assert_eq!(
        before,
        json!({"product_id": PRODUCT, "term_days": 90, "principal_total": 3 * PRINCIPAL,
               "principal_scheduled": 0, "interest_days_scheduled": 0,
               "interest_days_remaining": 90})
    );

    // More days than the term: invalid, whatever remains.
    let too_long = schedule(&api, interest("2026-Q4", 91)).await;
    assert_eq!(
        (too_long.status, too_long.code()),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
    let first = schedule(&api, interest("2026-Q4", 60)).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{first:?}");
    assert_eq!(first.body["scheduled"], HOLDERS);
    assert!(first.body["position"].as_i64().unwrap() > 0);
    // The same period and parameters again: nothing new.
    let again = schedule(&api, interest("2026-Q4", 60)).await;
    assert_eq!(
        (again.status, &again.body["scheduled"]),
        (StatusCode::ACCEPTED, &json!(0))
    );
    // The same period with other parameters: refused, not ignored.
    let other = schedule(&api, interest("2026-Q4", 30)).await;
    assert_eq!(
        (other.status, other.code()),
        (StatusCode::CONFLICT, "conflict")
    );
    // Another label for more days than remain: refused, saying how many.
    let beyond = schedule(&api, interest("2026-Q4-again", 60)).await;
    assert_eq!(
        (beyond.status, beyond.code()),
        (StatusCode::CONFLICT, "entitlement_exceeded"),
        "{beyond:?}"
    );
    assert!(
        beyond.body["message"]
            .as_str()
            .unwrap()
            .contains("only 30 of the 90-day term remain"),
        "{beyond:?}"
    );
    let rest = schedule(&api, interest("2026-Q4-rest", 30)).await;
    assert_eq!(rest.body["scheduled"], HOLDERS, "{rest:?}");
    let over = schedule(&api, interest("2027-Q1", 1)).await;
    assert_eq!(over.code(), "entitlement_exceeded");

    // Principal once per holder, under any label.
    let maturity = schedule(&api, principal("2026-maturity")).await;
    assert_eq!(maturity.body["scheduled"], HOLDERS, "{maturity:?}");
    for label in ["maturity", "2026-maturity", "settlement"] {
        let twice = schedule(&api, principal(label)).await;
        assert_eq!(
            (twice.status, &twice.body["scheduled"]),
            (StatusCode::ACCEPTED, &json!(0)),
            "{label}: {twice:?}"
        );
    }
    // A product with payouts cannot reopen.
    let reopen = api
        .post(
            &format!("/v1/products/{PRODUCT}/open"),
            &api.admin,
            json!({}),
        )
        .await;
    assert_eq!(
        (reopen.status, reopen.code()),
        (StatusCode::CONFLICT, "conflict")
    );

    let after = entitlements(&api).await;
    assert_eq!(after["principal_scheduled"], 3 * PRINCIPAL);
    assert_eq!(after["interest_days_scheduled"], 90);
    assert_eq!(after["interest_days_remaining"], 0);
    // Each holder: principal once, and 739 + 369 of interest (each run
    // rounded down, never more than the 90 days' 1,109).
    let listed = api
        .get(&format!("/v1/payouts?product_id={PRODUCT}"), &api.admin)
        .await;
    let mut per_holder: HashMap<String, Vec<(String, i64)>> = HashMap::new();
    for payout in listed.body["payouts"].as_array().unwrap() {
        per_holder
            .entry(payout["account_id"].as_str().unwrap().to_owned())
            .or_default()
            .push((
                payout["kind"].as_str().unwrap().to_owned(),
                payout["amount"].as_i64().unwrap(),
            ));
    }
    assert_eq!(per_holder.len(), HOLDERS);
    for (holder, mut payouts) in per_holder {
        payouts.sort();
        assert_eq!(
            payouts,
            vec![
                ("interest".to_owned(), 369),
                ("interest".to_owned(), 739),
                ("principal".to_owned(), PRINCIPAL)
            ],
            "{holder}"
        );
    }
    // Who may look.
    let holder = api.customer("nosy", 1).await;
    let forbidden = api
        .get(
            &format!("/v1/products/{PRODUCT}/entitlements"),
            &holder.token,
        )
        .await;
    assert_eq!(forbidden.status, StatusCode::FORBIDDEN);
    let missing = api
        .get("/v1/products/no-such-product/entitlements", &api.admin)
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amounts_and_currencies_are_bounded_on_sqlite() {
    amounts_and_currencies_are_bounded(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amounts_and_currencies_are_bounded_on_postgres() {
    amounts_and_currencies_are_bounded(Kind::Postgres).await;
}

async fn amounts_and_currencies_are_bounded(kind: Kind) {
    let Some(api) = TestApi::start(kind, "bounds").await else {
        return;
    };
    const LIMIT: i64 = 1_000_000_000_000_000;
    let product = |id: &str, quota: i64, rate: i64, term: i64, currency: Option<&str>| {
        let mut body = json!({"product_id": id, "name": id, "quota": quota,
            "min_purchase": 1, "max_purchase": quota.min(LIMIT),
            "annual_rate_bps": rate, "term_days": term});
        if let Some(currency) = currency {
            body["currency"] = json!(currency);
        }
        body
    };
    for (body, field) in [
        (product("q", LIMIT + 1, 100, 30, None), "quota"),
        (product("r", 1_000, 100_001, 30, None), "annual_rate_bps"),
        (product("t", 1_000, 100, 36_501, None), "term_days"),
    ] {
        let reply = api.post("/v1/products", &api.admin, body).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{field}: {reply:?}");
        assert!(
            reply.body["message"].as_str().unwrap().contains(field),
            "{field}: {reply:?}"
        );
    }
    let biggest = api
        .post(
            "/v1/products",
            &api.admin,
            product("max", LIMIT, 100_000, 36_500, None),
        )
        .await;
    assert_eq!(biggest.status, StatusCode::CREATED, "{biggest:?}");

    // A deposit over the bound is invalid; one that would take the balance
    // past it is refused as a limit.
    let customer = api.customer("rich", LIMIT - 10).await;
    let account = customer.account_id.clone().unwrap();
    let deposits = format!("/v1/accounts/{account}/deposits");
    let deposit = |amount: i64, reference: &str| {
        api.post(
            &deposits,
            &api.admin,
            json!({"amount": amount, "reference": reference}),
        )
    };
    let invalid = deposit(LIMIT + 1, "too-big").await;
    assert_eq!(invalid.status, StatusCode::BAD_REQUEST, "{invalid:?}");
    let limited = deposit(11, "one-too-many").await;
    assert_eq!(
        (limited.status, limited.code()),
        (StatusCode::CONFLICT, "limit_exceeded"),
        "{limited:?}"
    );
    assert_eq!(
        deposit(10, "to-the-limit").await.status,
        StatusCode::CREATED
    );
    api.settle().await;
    let balance = api
        .get(&format!("/v1/accounts/{account}"), &api.admin)
        .await;
    assert_eq!(balance.body["available"], LIMIT);

    // A product in another currency than the buyer's account.
    let usd = api
        .post(
            "/v1/products",
            &api.admin,
            product("usd-note", 1_000_000, 300, 30, Some("USD")),
        )
        .await;
    assert_eq!(usd.status, StatusCode::CREATED, "{usd:?}");
    let opened = api
        .post("/v1/products/usd-note/open", &api.admin, json!({}))
        .await;
    assert_eq!(opened.status, StatusCode::OK);
    let buyer = api.customer("yuan-holder", 50_000).await;
    let bought = api.buy(&buyer, "usd-note", 10_000, "k1").await;
    assert_eq!(
        (bought.status, bought.code()),
        (StatusCode::UNPROCESSABLE_ENTITY, "currency_mismatch"),
        "{bought:?}"
    );
    // The same key again gets the same answer; nothing was taken or held.
    let again = api.buy(&buyer, "usd-note", 10_000, "k1").await;
    assert_eq!(again.code(), "currency_mismatch");
    api.settle().await;
    let progress = api.get("/v1/products/usd-note/progress", &api.admin).await;
    assert_eq!(
        (&progress.body["reserved"], &progress.body["confirmed"]),
        (&json!(0), &json!(0))
    );
    let buyer_account = buyer.account_id.clone().unwrap();
    let balance = api
        .get(&format!("/v1/accounts/{buyer_account}"), &buyer.token)
        .await;
    assert_eq!(
        (&balance.body["available"], &balance.body["held"]),
        (&json!(50_000), &json!(0))
    );
    api.stop().await;
}

/// A provider whose answers the test switches: every call and lookup
/// "cannot tell", until it is told to show no payment.
struct SwitchedProvider {
    mode: AtomicU8,
}

const CANNOT_TELL: u8 = 0;
const NO_PAYMENT: u8 = 1;

#[async_trait]
impl PaymentProvider for SwitchedProvider {
    async fn pay(&self, _request: &PaymentRequest) -> PaymentOutcome {
        PaymentOutcome::Unknown {
            detail: "timeout".into(),
        }
    }

    async fn lookup(&self, _key: &str) -> LookupOutcome {
        match self.mode.load(Ordering::SeqCst) {
            NO_PAYMENT => LookupOutcome::Found(ProviderFinding::NotFound),
            _ => LookupOutcome::Unknown {
                detail: "provider down".into(),
            },
        }
    }
}

async fn payout_statuses(api: &TestApi) -> Vec<(String, String)> {
    api.settle().await;
    let listed = api
        .get(&format!("/v1/payouts?product_id={PRODUCT}"), &api.admin)
        .await;
    listed.body["payouts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["payout_id"].as_str().unwrap().to_owned(),
                p["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn wait_for_status(api: &TestApi, status: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let statuses = payout_statuses(api).await;
        if !statuses.is_empty() && statuses.iter().all(|(_, s)| s == status) {
            return statuses.into_iter().map(|(id, _)| id).collect();
        }
        assert!(
            Instant::now() < deadline,
            "payouts never all became {status}: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresolvable_payout_is_parked_then_retried_or_cancelled() {
    let mut api = TestApi::start(Kind::Sqlite, "parked").await.unwrap();
    holders(&api).await;
    assert_eq!(close(&api).await.status, StatusCode::OK);
    let scheduled = schedule(&api, principal("maturity")).await;
    assert_eq!(scheduled.body["scheduled"], HOLDERS);
    let ids: Vec<String> = payout_statuses(&api)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    // Not parked: neither retried nor cancelled.
    let early = api
        .post(
            &format!("/v1/payouts/{}/retry", ids[0]),
            &api.admin,
            json!({}),
        )
        .await;
    assert_eq!(
        (early.status, early.code()),
        (StatusCode::CONFLICT, "conflict")
    );
    let unknown = api
        .post(
            "/v1/payouts/00000000-0000-0000-0000-000000000001/retry",
            &api.admin,
            json!({}),
        )
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    let provider = Arc::new(SwitchedProvider {
        mode: AtomicU8::new(CANNOT_TELL),
    });
    let settings = WorkerSettings {
        name: "parking".into(),
        lease: chrono::Duration::milliseconds(300),
        idle_pause: Duration::from_millis(20),
        retry_pause: chrono::Duration::milliseconds(10),
        call_timeout: chrono::Duration::milliseconds(100),
        park_unknown_after: chrono::Duration::milliseconds(200),
        ..WorkerSettings::default()
    };
    api.server
        .start_payout_workers(provider.clone(), 1, settings);
    api.refresh_router();
    // Every call unknown, every lookup unanswered: parked, not retried
    // forever.
    let parked = wait_for_status(&api, "parked").await;
    assert_eq!(parked.len(), HOLDERS);
    let request = axum::http::Request::get("/metrics")
        .body(axum::body::Body::empty())
        .unwrap();
    let response = tower::ServiceExt::oneshot(api.server.router(), request)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = axum::body::to_bytes(response.into_body(), 1 << 22)
        .await
        .unwrap();
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(
        text.contains(r#"ledger_payouts{status="parked"} 3"#),
        "payouts by status: {text}"
    );
    // Provider calls as a histogram with buckets, by call and outcome.
    assert!(
        text.contains(
            r#"ledger_payout_provider_seconds_bucket{call="pay",outcome="unknown",le="0.005"}"#
        ),
        "provider latency histogram: {text}"
    );

    // A customer may not act; an operator may.
    let customer = api.customer("not-an-operator", 1).await;
    let forbidden = api
        .post(
            &format!("/v1/payouts/{}/cancel", parked[0]),
            &customer.token,
            json!({}),
        )
        .await;
    assert_eq!(forbidden.status, StatusCode::FORBIDDEN);
    // The provider cannot say whether it paid: no cancel.
    let blind = api
        .post(
            &format!("/v1/payouts/{}/cancel", parked[0]),
            &api.admin,
            json!({}),
        )
        .await;
    assert_eq!(blind.status, StatusCode::SERVICE_UNAVAILABLE, "{blind:?}");
    // It shows no payment: cancelled, for good.
    provider.mode.store(NO_PAYMENT, Ordering::SeqCst);
    let cancelled = api
        .post(
            &format!("/v1/payouts/{}/cancel", parked[0]),
            &api.admin,
            json!({}),
        )
        .await;
    assert_eq!(cancelled.status, StatusCode::OK, "{cancelled:?}");
    assert_eq!(cancelled.body["status"], "cancelled");
    let twice = api
        .post(
            &format!("/v1/payouts/{}/cancel", parked[0]),
            &api.admin,
            json!({}),
        )
        .await;
    assert_eq!(twice.code(), "conflict");
    // Retried: back to work through a lookup of its key.
    provider.mode.store(CANNOT_TELL, Ordering::SeqCst);
    let retried = api
        .post(
            &format!("/v1/payouts/{}/retry", parked[1]),
            &api.admin,
            json!({}),
        )
        .await;
    assert_eq!(retried.status, StatusCode::OK, "{retried:?}");
    assert_eq!(retried.body["status"], "unknown");
    // Still unresolvable: parked again after the bound.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let statuses: HashMap<String, String> = payout_statuses(&api).await.into_iter().collect();
        if statuses[&parked[1]] == "parked" {
            assert_eq!(statuses[&parked[0]], "cancelled");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "retried payout never parked again: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A cancelled payout keeps its entitlement used: scheduling again
    // creates nothing.
    let again = schedule(&api, principal("maturity-2")).await;
    assert_eq!(again.body["scheduled"], 0);
    api.stop().await;
}
