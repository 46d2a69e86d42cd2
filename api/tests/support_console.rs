//! The support console's reads over HTTP on SQLite and PostgreSQL: finding a
//! customer by username, account id, order id or deposit reference; an
//! account's orders and payouts; a product's sale as of a position; the
//! pages and assets under a strict Content-Security-Policy.

mod support;

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};
use support::TestApi;

const PRODUCT: &str = "console-fund";

fn accounts(reply: &support::Reply) -> Vec<(String, String)> {
    reply.body["customers"]
        .as_array()
        .unwrap_or_else(|| panic!("no customers in {reply:?}"))
        .iter()
        .map(|c| {
            (
                c["account_id"].as_str().unwrap().to_owned(),
                c["matched_by"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn finds_customers(api: &TestApi) {
    let probe = "<img src=x onerror=alert(1)>";
    let alice = api.customer(probe, 100_000).await;
    let bob = api.customer("bob", 100_000).await;
    let alice_account = alice.account_id.clone().unwrap();
    let bob_account = bob.account_id.clone().unwrap();
    // Both hold a deposit with the same reference (references are unique
    // per account only).
    for account in [&alice_account, &bob_account] {
        let reply = api
            .post(
                &format!("/v1/accounts/{account}/deposits"),
                &api.admin,
                json!({"amount": 10, "reference": "wire-2026-12-06"}),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
    }
    api.open_product(PRODUCT, 1_000_000, 1, 100_000).await;
    let bought = api.buy(&alice, PRODUCT, 5_000, "console-1").await;
    assert_eq!(bought.status, StatusCode::CREATED, "{bought:?}");
    let order = bought.body["order_id"].as_str().unwrap().to_owned();
    let at = bought.body["position"].as_i64().unwrap();
    let helper = api.user("helper", "support").await;
    let search = |text: &str| {
        let uri = format!("/v1/customers?q={}&min_position={at}", form_encode(text));
        let token = helper.token.clone();
        async move { api.get(&uri, &token).await }
    };

    let by_name = search(probe).await;
    assert_eq!(by_name.status, StatusCode::OK, "{by_name:?}");
    assert_eq!(
        accounts(&by_name),
        [(alice_account.clone(), "username".into())]
    );
    assert_eq!(by_name.body["customers"][0]["username"], probe);
    assert_eq!(by_name.body["customers"][0]["user_id"], alice.user_id);
    // Usernames match exactly.
    assert_eq!(accounts(&search("BOB").await), []);
    assert_eq!(
        accounts(&search(&bob_account).await),
        [(bob_account.clone(), "account_id".into())]
    );
    let by_order = search(&order).await;
    assert_eq!(
        accounts(&by_order),
        [(alice_account.clone(), "order_id".into())]
    );
    assert_eq!(by_order.body["customers"][0]["order_id"], order.as_str());
    let mut by_reference = accounts(&search("wire-2026-12-06").await);
    by_reference.sort();
    let mut expected = vec![
        (alice_account.clone(), "deposit_reference".to_owned()),
        (bob_account.clone(), "deposit_reference".to_owned()),
    ];
    expected.sort();
    assert_eq!(by_reference, expected);
    assert_eq!(accounts(&search("no-such-thing").await), []);
    for bad in ["", "%0A", &"x".repeat(201)] {
        let reply = api
            .get(&format!("/v1/customers?q={bad}"), &helper.token)
            .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "q={bad}: {reply:?}");
    }
    // Customers may not search.
    let reply = api.get("/v1/customers?q=bob", &alice.token).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{reply:?}");

    // The account's orders: the owner and staff see them, another customer
    // gets 404.
    let orders_uri = format!("/v1/accounts/{alice_account}/orders?min_position={at}");
    for token in [&alice.token, &helper.token] {
        let orders = api.get(&orders_uri, token).await;
        assert_eq!(orders.status, StatusCode::OK, "{orders:?}");
        let listed: Vec<&Value> = orders.body["orders"].as_array().unwrap().iter().collect();
        assert_eq!(listed.len(), 1, "{orders:?}");
        assert_eq!(listed[0]["order_id"], order.as_str());
        assert_eq!(listed[0]["status"], "confirmed");
    }
    let other = api.get(&orders_uri, &bob.token).await;
    assert_eq!(other.status, StatusCode::NOT_FOUND, "{other:?}");
    let limited = api
        .get(
            &format!("/v1/accounts/{alice_account}/orders?limit=0"),
            &helper.token,
        )
        .await;
    assert_eq!(limited.status, StatusCode::BAD_REQUEST, "{limited:?}");
    let payouts = api
        .get(
            &format!("/v1/accounts/{alice_account}/payouts"),
            &helper.token,
        )
        .await;
    assert_eq!(payouts.status, StatusCode::OK, "{payouts:?}");
    assert_eq!(payouts.body["payouts"], json!([]));
    let none = api
        .get(
            "/v1/payouts/00000000-0000-0000-0000-000000000000/timeline",
            &helper.token,
        )
        .await;
    assert_eq!(none.status, StatusCode::NOT_FOUND, "{none:?}");

    // The sale as of a position: before the purchase nothing was sold,
    // at it the purchase shows; auditors only.
    let before = api
        .get(
            &format!("/v1/audit/products/{PRODUCT}/progress?as_of={}", at - 3),
            &api.admin,
        )
        .await;
    assert_eq!(before.status, StatusCode::OK, "{before:?}");
    assert_eq!(
        (
            before.body["confirmed"].as_i64(),
            before.body["status"].as_str()
        ),
        (Some(0), Some("open")),
        "{before:?}"
    );
    let then = api
        .get(
            &format!("/v1/audit/products/{PRODUCT}/progress?as_of={at}"),
            &api.admin,
        )
        .await;
    assert_eq!(then.body["confirmed"], 5_000, "{then:?}");
    assert_eq!(then.body["orders"], 1);
    assert_eq!(then.body["name"], format!("Product {PRODUCT}"));
    assert!(then.body["opened_at"].is_string(), "{then:?}");
    let live = api
        .get(
            &format!("/v1/products/{PRODUCT}/progress?min_position={at}"),
            &api.admin,
        )
        .await;
    assert_eq!(live.body["confirmed"], then.body["confirmed"], "{live:?}");
    assert_eq!(live.body["opened_at"], then.body["opened_at"], "{live:?}");
    let unlisted = api
        .get(
            &format!("/v1/audit/products/{PRODUCT}/progress?as_of=1"),
            &api.admin,
        )
        .await;
    assert_eq!(unlisted.status, StatusCode::NOT_FOUND, "{unlisted:?}");
    let refused = api
        .get(
            &format!("/v1/audit/products/{PRODUCT}/progress?as_of=yesterday"),
            &api.admin,
        )
        .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{refused:?}");
    let support_may_not = api
        .get(
            &format!("/v1/audit/products/{PRODUCT}/progress?as_of={at}"),
            &helper.token,
        )
        .await;
    assert_eq!(support_may_not.status, StatusCode::FORBIDDEN);
}

/// Percent-encodes a query value.
fn form_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn pages_are_strict(api: &TestApi) {
    for (path, content_type) in [
        ("/", "text/html"),
        ("/console", "text/html"),
        ("/assets/console.js", "text/javascript"),
        ("/assets/dashboard.js", "text/javascript"),
        ("/assets/ledger.css", "text/css"),
    ] {
        let reply = api.call(Method::GET, path, None, None, None).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
        let csp = reply.headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'"), "{path}: {csp}");
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        assert_eq!(reply.headers["x-content-type-options"], "nosniff");
        assert!(
            reply.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with(content_type),
            "{path}"
        );
    }
    let missing = api
        .call(Method::GET, "/assets/../Cargo.toml", None, None, None)
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let unknown = api
        .call(Method::GET, "/assets/other.js", None, None, None)
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
}

/// A verification walks in the background; its progress, then its result,
/// are read back by id.
async fn verifies_in_the_background(api: &TestApi) {
    let head = api.server.state.store.head().await.unwrap();
    let started = api
        .post("/v1/audit/verifications", &api.admin, json!({}))
        .await;
    assert_eq!(started.status, StatusCode::ACCEPTED, "{started:?}");
    assert!(
        started.body["head"].as_i64().unwrap() >= head,
        "{started:?}"
    );
    let id = started.body["verification_id"].as_str().unwrap().to_owned();
    let mut job = started.body;
    for _ in 0..500 {
        if job["state"] != "running" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let reply = api
            .get(&format!("/v1/audit/verifications/{id}"), &api.admin)
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        job = reply.body;
    }
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["result"]["ok"], true, "{job}");
    assert_eq!(job["result"]["first_bad_position"], Value::Null, "{job}");
    assert!(
        job["result"]["events_checked"].as_u64().unwrap() >= head as u64,
        "{job}"
    );
    assert!(job["checked_position"].as_i64().unwrap() >= head, "{job}");
    let unknown = api
        .get(
            "/v1/audit/verifications/00000000-0000-0000-0000-000000000000",
            &api.admin,
        )
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{unknown:?}");
    let helper = api.login("helper", "helper-password").await;
    let refused = api
        .post("/v1/audit/verifications", &helper, json!({}))
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{refused:?}");
}

async fn console(api: &TestApi) {
    finds_customers(api).await;
    pages_are_strict(api).await;
    verifies_in_the_background(api).await;
}

on_both_backends!(console_reads_on_sqlite, console_reads_on_postgres, console);
