//! Reading your own writes (API.md, "Additions (v1.1)") on SQLite and
//! PostgreSQL: every write that appended answers the `position` it reached;
//! a read given `min_position` answers only once its read model reached it
//! (so it always shows the write), and 503 `stale` with `Retry-After` when
//! the read model cannot get there in time. PostgreSQL tests are skipped,
//! and say so, without `DATABASE_URL`.

mod support;

use axum::http::StatusCode;
use projections::ProjectionError;
use projections::runner::RunnerOptions;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use support::{Kind, Reply, TestApi};

const PRODUCT: &str = "ryw-fund";
const DEPOSIT: i64 = 1_000_000;
const PURCHASES: i64 = 12;
const AMOUNT: i64 = 1_000;

fn position(reply: &Reply) -> i64 {
    reply.body["position"]
        .as_i64()
        .unwrap_or_else(|| panic!("no position in {reply:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_given_a_writes_position_show_that_write_on_sqlite() {
    reads_show_own_writes(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_given_a_writes_position_show_that_write_on_postgres() {
    reads_show_own_writes(Kind::Postgres).await;
}

/// Each purchase is read back at once with its position: the balance, the
/// ledger, the order, its timeline and the sale progress all show it (the
/// projections gather events for 100 ms, so reads without the position
/// would often not).
async fn reads_show_own_writes(kind: Kind) {
    let Some(api) = TestApi::start(kind, "read_your_writes").await else {
        return;
    };
    // Writes that appended carry the position they reached, in log order.
    let created = api
        .post(
            "/v1/users",
            &api.admin,
            json!({"username": "reader", "password": "reader-password", "role": "customer"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let account = created.body["account_id"].as_str().unwrap().to_owned();
    let opened_at = position(&created);
    let staff = api
        .post(
            "/v1/users",
            &api.admin,
            json!({"username": "helper", "password": "helper-password", "role": "support"}),
        )
        .await;
    assert_eq!(staff.body["position"], serde_json::Value::Null, "{staff:?}");
    let deposited = api
        .post(
            &format!("/v1/accounts/{account}/deposits"),
            &api.admin,
            json!({"amount": DEPOSIT, "reference": "ryw-1"}),
        )
        .await;
    assert!(position(&deposited) > opened_at, "{deposited:?}");
    let balance = api
        .get(
            &format!(
                "/v1/accounts/{account}?min_position={}",
                position(&deposited)
            ),
            &api.admin,
        )
        .await;
    assert_eq!(balance.status, StatusCode::OK, "{balance:?}");
    assert_eq!(balance.body["available"], DEPOSIT);

    let listed = api
        .post(
            "/v1/products",
            &api.admin,
            json!({"product_id": PRODUCT, "name": "Read your writes", "quota": 1_000_000,
                   "min_purchase": 1, "max_purchase": 100_000, "annual_rate_bps": 300,
                   "term_days": 30}),
        )
        .await;
    let opened = api
        .post(
            &format!("/v1/products/{PRODUCT}/open"),
            &api.admin,
            json!({}),
        )
        .await;
    assert!(
        position(&opened) > position(&listed),
        "{listed:?} {opened:?}"
    );
    // Opening again appends nothing; its position still covers the opening.
    let again = api
        .post(
            &format!("/v1/products/{PRODUCT}/open"),
            &api.admin,
            json!({}),
        )
        .await;
    assert!(position(&again) >= position(&opened), "{again:?}");
    let progress = api
        .get(
            &format!(
                "/v1/products/{PRODUCT}/progress?min_position={}",
                position(&opened)
            ),
            &api.admin,
        )
        .await;
    assert_eq!(progress.body["status"], "open", "{progress:?}");

    let token = api.login("reader", "reader-password").await;
    let customer = support::User {
        token: token.clone(),
        user_id: String::new(),
        account_id: Some(account.clone()),
    };
    let mut last = 0;
    for n in 1..=PURCHASES {
        let bought = api
            .buy(&customer, PRODUCT, AMOUNT, &format!("ryw-{n}"))
            .await;
        assert_eq!(bought.status, StatusCode::CREATED, "{bought:?}");
        let at = position(&bought);
        assert!(at > last, "positions must grow: {last} then {at}");
        last = at;
        let order = bought.body["order_id"].as_str().unwrap();
        let seen = |path: String| {
            let api = &api;
            let token = token.clone();
            async move { api.get(&format!("{path}?min_position={at}"), &token).await }
        };
        let balance = seen(format!("/v1/accounts/{account}")).await;
        assert_eq!(balance.status, StatusCode::OK, "{balance:?}");
        assert_eq!(balance.body["total_invested"], n * AMOUNT, "{balance:?}");
        assert_eq!(balance.body["available"], DEPOSIT - n * AMOUNT);
        let order_view = seen(format!("/v1/orders/{order}")).await;
        assert_eq!(order_view.body["status"], "confirmed", "{order_view:?}");
        let timeline = seen(format!("/v1/orders/{order}/timeline")).await;
        let types: Vec<&str> = timeline.body["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["type"].as_str().unwrap())
            .collect();
        assert!(
            types.contains(&"reservation_confirmed"),
            "timeline at {at}: {types:?}"
        );
        let ledger = api
            .get(
                &format!("/v1/accounts/{account}/ledger?limit=1000&min_position={at}"),
                &token,
            )
            .await;
        let entries = ledger.body["entries"].as_array().unwrap();
        assert_eq!(entries.len() as i64, 1 + n, "{ledger:?}");
        let progress = api
            .get(
                &format!("/v1/products/{PRODUCT}/progress?min_position={at}"),
                &token,
            )
            .await;
        assert_eq!(progress.body["confirmed"], n * AMOUNT, "{progress:?}");
    }
    // The other parameters of a read are kept.
    let page = api
        .get(
            &format!("/v1/accounts/{account}/ledger?limit=2&min_position={last}&after=0"),
            &token,
        )
        .await;
    assert_eq!(
        page.body["entries"].as_array().unwrap().len(),
        2,
        "{page:?}"
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_model_that_cannot_catch_up_answers_stale_on_sqlite() {
    stale_reads(Kind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_model_that_cannot_catch_up_answers_stale_on_postgres() {
    stale_reads(Kind::Postgres).await;
}

/// With the projections held (every commit fails), a read at the new
/// position waits and answers 503 `stale` with `Retry-After`; once they
/// are let go, the same read shows the write. Bad or impossible positions
/// are refused.
async fn stale_reads(kind: Kind) {
    let held = Arc::new(AtomicBool::new(false));
    let hold = held.clone();
    let runner = RunnerOptions {
        before_commit: Some(Arc::new(move |_, position| {
            if hold.load(Ordering::SeqCst) {
                Err(ProjectionError::Inconsistent {
                    position,
                    reason: "held by the test".into(),
                })
            } else {
                Ok(())
            }
        })),
        ..RunnerOptions::default()
    };
    let Some(api) = TestApi::start_with_runner(
        kind,
        "stale_reads",
        support::generous(),
        engine::EngineSettings::default(),
        runner,
    )
    .await
    else {
        return;
    };
    let customer = api.customer("waiting", DEPOSIT).await;
    let account = customer.account_id.clone().unwrap();
    api.settle().await;
    held.store(true, Ordering::SeqCst);
    let deposited = api
        .post(
            &format!("/v1/accounts/{account}/deposits"),
            &api.admin,
            json!({"amount": 5, "reference": "while-held"}),
        )
        .await;
    let at = position(&deposited);
    let uri = format!("/v1/accounts/{account}?min_position={at}");
    let stale = api.get(&uri, &customer.token).await;
    assert_eq!(
        (stale.status, stale.code()),
        (StatusCode::SERVICE_UNAVAILABLE, "stale"),
        "{stale:?}"
    );
    assert_eq!(stale.headers["retry-after"], "1");
    // Without the position the old figures answer at once.
    let old = api
        .get(&format!("/v1/accounts/{account}"), &customer.token)
        .await;
    assert_eq!(old.body["available"], DEPOSIT, "{old:?}");

    held.store(false, Ordering::SeqCst);
    // The runner retries with a backoff of up to 5 s: follow Retry-After.
    let mut answer = api.get(&uri, &customer.token).await;
    for _ in 0..10 {
        if answer.status != StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        assert_eq!(answer.code(), "stale", "{answer:?}");
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        answer = api.get(&uri, &customer.token).await;
    }
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert_eq!(answer.body["available"], DEPOSIT + 5, "{answer:?}");

    // A position no write reached (beyond the head) and a malformed one are
    // refused at once.
    let head = api.server.state.store.head().await.unwrap();
    let future = api
        .get(
            &format!("/v1/accounts/{account}?min_position={}", head + 1_000),
            &customer.token,
        )
        .await;
    assert_eq!(
        (future.status, future.code()),
        (StatusCode::BAD_REQUEST, "invalid_request"),
        "{future:?}"
    );
    for bad in ["-1", "x", "1&min_position=2", ""] {
        let reply = api
            .get(
                &format!("/v1/accounts/{account}/ledger?min_position={bad}"),
                &customer.token,
            )
            .await;
        assert_eq!(
            (reply.status, reply.code()),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "min_position={bad}: {reply:?}"
        );
    }
    // Public progress takes it too.
    let progress = api
        .call(
            axum::http::Method::GET,
            &format!("/v1/progress?min_position={head}"),
            None,
            None,
            None,
        )
        .await;
    assert_eq!(progress.status, StatusCode::OK, "{progress:?}");
    api.stop().await;
}
