//! The HTTP API against docs/http-api.md, on SQLite and PostgreSQL: the walkthrough a
//! newcomer does, the policy of every route, idempotency keys, limits,
//! concurrent buyers, metrics, OpenAPI and the progress stream.

mod hostile;
mod support;

use api::server::routes::{Access, Idempotency, table};
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use support::{Kind, Reply, TestApi, User};

const PRODUCT: &str = "fund-2026-a";

async fn walkthrough(api: &TestApi) {
    let alice = api.customer("alice", 1_000_000).await;
    let account = alice.account_id.clone().unwrap();
    api.open_product(PRODUCT, 100_000, 100, 50_000).await;

    let bought = api.buy(&alice, PRODUCT, 30_000, "alice-1").await;
    assert_eq!(bought.status, StatusCode::CREATED, "{bought:?}");
    assert_eq!(bought.body["status"], "confirmed");
    assert_eq!(bought.body["amount"], 30_000);
    assert_eq!(bought.body["account_id"], account.as_str());
    let order_id = bought.body["order_id"].as_str().unwrap().to_owned();

    // The same key and body: the same answer, nothing bought again.
    let again = api.buy(&alice, PRODUCT, 30_000, "alice-1").await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.body, bought.body);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    // The same key with another body: refused.
    let reused = api.buy(&alice, PRODUCT, 20_000, "alice-1").await;
    assert_eq!(
        (reused.status, reused.code()),
        (StatusCode::CONFLICT, "idempotency_key_reused")
    );
    // No key: refused.
    let keyless = api
        .post(
            &format!("/v1/products/{PRODUCT}/purchases"),
            &alice.token,
            json!({"amount": 100}),
        )
        .await;
    assert_eq!(
        (keyless.status, keyless.code()),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );

    let poor = api.buy(&alice, PRODUCT, 50_000, "alice-2").await;
    assert_eq!(poor.status, StatusCode::CREATED, "{poor:?}");
    let broke = api.buy(&alice, PRODUCT, 50_000, "alice-3").await;
    assert_eq!(
        (broke.status, broke.code()),
        (StatusCode::CONFLICT, "insufficient_quota"),
        "20,000 left of the quota: {broke:?}"
    );
    let too_small = api.buy(&alice, PRODUCT, 10, "alice-4").await;
    assert_eq!(too_small.status, StatusCode::BAD_REQUEST, "{too_small:?}");
    let no_sale = api.buy(&alice, "no-such-product", 100, "alice-5").await;
    assert_eq!(no_sale.status, StatusCode::NOT_FOUND, "{no_sale:?}");

    api.settle().await;
    let balance = api
        .get(&format!("/v1/accounts/{account}"), &alice.token)
        .await;
    assert_eq!(balance.status, StatusCode::OK, "{balance:?}");
    assert_eq!(balance.body["available"], 1_000_000 - 80_000);
    assert_eq!(balance.body["total_deposited"], 1_000_000);
    assert_eq!(balance.body["total_invested"], 80_000);
    assert_eq!(balance.body["held"], 0);
    for field in ["account_id", "total_paid_out", "version"] {
        assert!(balance.body.get(field).is_some(), "{field}: {balance:?}");
    }

    let ledger = api
        .get(
            &format!("/v1/accounts/{account}/ledger?limit=2"),
            &alice.token,
        )
        .await;
    assert_eq!(ledger.status, StatusCode::OK);
    let entries = ledger.body["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["kind"], "deposit");
    assert_eq!(entries[0]["amount"], 1_000_000);
    assert_eq!(entries[1]["amount"], -30_000);
    assert_eq!(entries[1]["balance_after"], 970_000);
    assert_eq!(entries[1]["order_id"], order_id.as_str());
    let next = ledger.body["next"].as_i64().unwrap();
    let rest = api
        .get(
            &format!("/v1/accounts/{account}/ledger?after={next}"),
            &alice.token,
        )
        .await;
    assert_eq!(rest.body["entries"].as_array().unwrap().len(), 1);
    assert_eq!(rest.body["next"], Value::Null);

    let order = api
        .get(&format!("/v1/orders/{order_id}"), &alice.token)
        .await;
    assert_eq!(order.status, StatusCode::OK);
    assert_eq!(order.body["status"], "confirmed");
    assert_eq!(order.body["product_id"], PRODUCT);
    let timeline = api
        .get(&format!("/v1/orders/{order_id}/timeline"), &alice.token)
        .await;
    let events = timeline.body["events"].as_array().unwrap();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "quota_reserved",
            "purchase_debited",
            "reservation_confirmed"
        ],
        "reserve, debit, confirm, in log order"
    );
    // Every event the purchase caused carries the buyer and the request.
    for event in events {
        assert_eq!(
            event["metadata"]["actor_id"],
            alice.user_id.as_str(),
            "{event}"
        );
        assert_eq!(event["metadata"]["actor_role"], "customer", "{event}");
        assert!(
            event["metadata"]["request_id"].as_str().is_some(),
            "{event}"
        );
        assert_eq!(
            event["metadata"]["correlation_id"],
            order_id.as_str(),
            "{event}"
        );
        assert!(
            event["metadata"]["causation_id"].as_str().is_some(),
            "{event}"
        );
    }

    let progress = api
        .get(&format!("/v1/products/{PRODUCT}/progress"), &alice.token)
        .await;
    assert_eq!(progress.body["confirmed"], 80_000);
    assert_eq!(progress.body["orders"], 2);
    assert_eq!(progress.body["status"], "open");
    assert_eq!(progress.body["reserved"], 0);
    assert_eq!(progress.body["available"], 100_000 - 80_000);

    // A repeated deposit reference is not a second deposit.
    let deposits = format!("/v1/accounts/{account}/deposits");
    let deposit = |reference: &str, amount: i64| {
        api.post(
            &deposits,
            &api.admin,
            json!({"amount": amount, "reference": reference}),
        )
    };
    let first = deposit("wire-77", 5_000).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    let repeat = deposit("wire-77", 5_000).await;
    assert_eq!(repeat.status, StatusCode::CREATED);
    assert_eq!(repeat.body["position"], first.body["position"]);
    assert_eq!(repeat.body["available"], first.body["available"]);
    let changed = deposit("wire-77", 6_000).await;
    assert_eq!(changed.status, StatusCode::CONFLICT, "{changed:?}");
}

on_both_backends!(walkthrough_on_sqlite, walkthrough_on_postgres, walkthrough);

/// Fills a route's path parameters with ids that exist nowhere.
fn concrete(path: &str) -> String {
    path.replace("{account_id}", "0195f3a0-0000-7000-8000-000000000001")
        .replace("{order_id}", "0195f3a0-0000-7000-8000-000000000002")
        .replace("{product_id}", "no-such-product")
}

async fn every_route_enforces_its_policy(api: &TestApi) {
    let carol = api.customer("carol", 10_000).await;
    let support = api.user("sam", "support").await;
    let routes = table();
    assert!(routes.len() >= 20);
    let mut public = BTreeSet::new();
    for route in &routes {
        let uri = concrete(route.path);
        let body = (route.method == Method::POST).then(|| json!({}));
        let key = (route.method == Method::POST).then_some("policy-walk");
        match route.access {
            Access::Public => {
                public.insert(route.path);
                if route.path == "/v1/progress/stream" {
                    continue; // An endless stream; tested on its own.
                }
                let reply = api.call(route.method.clone(), &uri, None, key, body).await;
                assert_ne!(
                    reply.status,
                    StatusCode::UNAUTHORIZED,
                    "{} {uri}",
                    route.method
                );
                assert_ne!(
                    reply.status,
                    StatusCode::FORBIDDEN,
                    "{} {uri}",
                    route.method
                );
            }
            Access::Node => {
                // Node to node only: no bearer token opens it, and this
                // node has no node secret, so nothing does.
                for token in [None, Some(carol.token.as_str()), Some(api.admin.as_str())] {
                    let reply = api
                        .call(route.method.clone(), &uri, token, key, body.clone())
                        .await;
                    assert_eq!(
                        (reply.status, reply.code()),
                        (StatusCode::UNAUTHORIZED, "unauthorized"),
                        "{} {uri} with {token:?}",
                        route.method
                    );
                }
            }
            Access::Roles(roles) => {
                let anonymous = api
                    .call(route.method.clone(), &uri, None, key, body.clone())
                    .await;
                assert_eq!(
                    (anonymous.status, anonymous.code()),
                    (StatusCode::UNAUTHORIZED, "unauthorized"),
                    "anonymous {} {uri}",
                    route.method
                );
                let forged = api
                    .call(
                        route.method.clone(),
                        &uri,
                        Some(&"ab".repeat(32)),
                        key,
                        body.clone(),
                    )
                    .await;
                assert_eq!(
                    forged.status,
                    StatusCode::UNAUTHORIZED,
                    "forged {} {uri}",
                    route.method
                );
                // Logging out ends the session it is called with: use one
                // made for it.
                let customer_token = if route.path == "/v1/auth/logout" {
                    api.user("logout-walker", "customer").await.token
                } else {
                    carol.token.clone()
                };
                let as_customer = api
                    .call(
                        route.method.clone(),
                        &uri,
                        Some(&customer_token),
                        key,
                        body.clone(),
                    )
                    .await;
                if roles.contains(&api::server::auth::Role::Customer) {
                    assert_ne!(
                        as_customer.status,
                        StatusCode::FORBIDDEN,
                        "{} {uri}",
                        route.method
                    );
                    assert_ne!(as_customer.status, StatusCode::UNAUTHORIZED);
                } else {
                    assert_eq!(
                        (as_customer.status, as_customer.code()),
                        (StatusCode::FORBIDDEN, "forbidden"),
                        "customer on {} {uri}",
                        route.method
                    );
                }
            }
        }
        // Every authenticated POST takes idempotency keys, except logout,
        // which a retry cannot repeat (the token it needs is gone).
        if route.method == Method::POST
            && matches!(route.access, Access::Roles(_))
            && route.path != "/v1/auth/logout"
        {
            assert_ne!(route.idempotency, Idempotency::None, "{}", route.path);
        }
    }
    // The contract's public routes and the console's page and static
    // assets (which hold no data), and no others.
    let expected: BTreeSet<&str> = [
        "/",
        "/console",
        "/assets/{file}",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/v1/auth/login",
        "/v1/progress",
        "/v1/progress/stream",
        "/v1/products/{product_id}/progress",
    ]
    .into_iter()
    .collect();
    assert_eq!(public, expected);

    // A customer asking for another customer's account or order gets 404;
    // staff see it.
    let dave = api.customer("dave", 10_000).await;
    api.open_product("policy-product", 1_000, 1, 1_000).await;
    let bought = api.buy(&dave, "policy-product", 10, "dave-1").await;
    assert_eq!(bought.status, StatusCode::CREATED, "{bought:?}");
    api.settle().await;
    let order_id = bought.body["order_id"].as_str().unwrap();
    let dave_account = dave.account_id.as_deref().unwrap();
    for uri in [
        format!("/v1/accounts/{dave_account}"),
        format!("/v1/accounts/{dave_account}/ledger"),
        format!("/v1/orders/{order_id}"),
        format!("/v1/orders/{order_id}/timeline"),
    ] {
        let theirs = api.get(&uri, &carol.token).await;
        assert_eq!(
            (theirs.status, theirs.code()),
            (StatusCode::NOT_FOUND, "not_found"),
            "{uri}"
        );
        assert_eq!(
            api.get(&uri, &dave.token).await.status,
            StatusCode::OK,
            "{uri}"
        );
        assert_eq!(
            api.get(&uri, &support.token).await.status,
            StatusCode::OK,
            "{uri}"
        );
    }
    // Support reads but moves no money.
    let deposit = api
        .post(
            &format!("/v1/accounts/{dave_account}/deposits"),
            &support.token,
            json!({"amount": 5, "reference": "support-try"}),
        )
        .await;
    assert_eq!(deposit.status, StatusCode::FORBIDDEN);
    // Malformed credentials.
    for header in [
        "Bearer",
        "Basic YWRtaW46YWRtaW4=",
        "Bearer ' OR 1=1 --",
        "bearer",
    ] {
        let request = Request::get("/v1/me")
            .header("authorization", header)
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            api.send(request).await.status,
            StatusCode::UNAUTHORIZED,
            "{header}"
        );
    }
}

on_both_backends!(
    every_route_enforces_its_policy_on_sqlite,
    every_route_enforces_its_policy_on_postgres,
    every_route_enforces_its_policy
);

async fn bad_input_is_refused_and_changes_nothing(api: &TestApi) {
    let erin = api.customer("erin", 50_000).await;
    api.open_product("input-product", 10_000, 1, 10_000).await;
    let purchases = "/v1/products/input-product/purchases";
    let mut cases: Vec<(&str, Body, &str, StatusCode)> = vec![
        (
            "unknown field",
            Body::from(r#"{"amount":5,"price":1}"#),
            "application/json",
            StatusCode::BAD_REQUEST,
        ),
        (
            "zero",
            Body::from(r#"{"amount":0}"#),
            "application/json",
            StatusCode::BAD_REQUEST,
        ),
        (
            "negative",
            Body::from(r#"{"amount":-5}"#),
            "application/json",
            StatusCode::BAD_REQUEST,
        ),
        (
            "huge",
            Body::from(r#"{"amount":99999999999999999999999}"#),
            "application/json",
            StatusCode::BAD_REQUEST,
        ),
        (
            "float",
            Body::from(r#"{"amount":1.5}"#),
            "application/json",
            StatusCode::BAD_REQUEST,
        ),
        (
            "string",
            Body::from(r#"{"amount":"5"}"#),
            "application/json",
            StatusCode::BAD_REQUEST,
        ),
        (
            "malformed",
            Body::from(r#"{"amount":"#),
            "application/json",
            StatusCode::BAD_REQUEST,
        ),
        (
            "form",
            Body::from("amount=5"),
            "application/x-www-form-urlencoded",
            StatusCode::BAD_REQUEST,
        ),
        (
            "nested",
            Body::from(format!("{}{}", "[".repeat(10_000), "]".repeat(10_000))),
            "application/json",
            StatusCode::BAD_REQUEST,
        ),
        (
            "oversized",
            Body::from(format!(r#"{{"amount":5,"pad":"{}"}}"#, "x".repeat(70_000))),
            "application/json",
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    for (index, (name, body, content_type, expected)) in cases.drain(..).enumerate() {
        let request = Request::post(purchases)
            .header("authorization", format!("Bearer {}", erin.token))
            .header("idempotency-key", format!("bad-{index}"))
            .header("content-type", content_type)
            .body(body)
            .unwrap();
        let reply = api.send(request).await;
        assert_eq!(reply.status, expected, "{name}: {reply:?}");
        assert!(
            reply.body["message"].as_str().is_some(),
            "{name}: error body {reply:?}"
        );
        assert!(
            !reply.body.to_string().contains("sqlx"),
            "{name}: leaks internals"
        );
    }
    for key in ["", &"k".repeat(200), "tab\there"] {
        let request = Request::post(purchases)
            .header("authorization", format!("Bearer {}", erin.token))
            .header("idempotency-key", key)
            .header("content-type", "application/json")
            .body(Body::from(r#"{"amount":5}"#))
            .unwrap();
        assert_eq!(
            api.send(request).await.status,
            StatusCode::BAD_REQUEST,
            "key {key:?}"
        );
    }
    let products = [
        "x'%3B%20DROP%20TABLE%20events%3B%20--",
        "..%2F..%2Fetc",
        "%E2%80%AEevil",
        "%00",
        "%FF",
        "%C3%28",
    ];
    for (index, product) in products.into_iter().enumerate() {
        let reply = api.buy(&erin, product, 5, &format!("inject-{index}")).await;
        assert!(
            reply.status == StatusCode::BAD_REQUEST || reply.status == StatusCode::NOT_FOUND,
            "{product}: {reply:?}"
        );
        assert!(!reply.code().is_empty(), "{product}: error body {reply:?}");
    }
    // Path segments that are not UTF-8 get the usual JSON error body too.
    for path in [
        "/v1/accounts/%FF",
        "/v1/accounts/%FF/ledger",
        "/v1/orders/%C3%28/timeline",
        "/v1/products/%FF/progress",
    ] {
        let reply = api.get(path, &api.admin).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{path}: {reply:?}");
        assert_eq!(reply.code(), "invalid_request", "{path}: {reply:?}");
    }
    // The body limit holds whether or not an Idempotency-Key is sent.
    let padding = "x".repeat(70_000);
    for (path, token) in [
        ("/v1/auth/login", None),
        ("/v1/users", Some(api.admin.as_str())),
        ("/v1/products", Some(api.admin.as_str())),
    ] {
        let reply = api
            .call(
                Method::POST,
                path,
                token,
                None,
                Some(json!({"name": padding, "username": padding})),
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::PAYLOAD_TOO_LARGE,
            "{path}: {reply:?}"
        );
        assert_eq!(reply.code(), "payload_too_large", "{path}: {reply:?}");
    }
    let users = [
        json!({"username": " padded", "password": "long-enough-1", "role": "support"}),
        json!({"username": "x", "password": "short", "role": "support"}),
        json!({"username": "x", "password": "long-enough-1", "role": "root"}),
        json!({"username": "x", "password": "long-enough-1", "role": "support", "admin": true}),
    ];
    for user in users {
        let reply = api.post("/v1/users", &api.admin, user.clone()).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{user}: {reply:?}");
    }
    let taken = api
        .post(
            "/v1/users",
            &api.admin,
            json!({"username": "erin", "password": "long-enough-1", "role": "customer"}),
        )
        .await;
    assert_eq!(taken.status, StatusCode::CONFLICT);
    let ledger = api
        .get(
            &format!(
                "/v1/accounts/{}/ledger?limit=0",
                erin.account_id.as_deref().unwrap()
            ),
            &erin.token,
        )
        .await;
    assert_eq!(ledger.status, StatusCode::BAD_REQUEST);
    let payouts = api.get("/v1/payouts?status=paid", &api.admin).await;
    assert_eq!(payouts.status, StatusCode::BAD_REQUEST);
    let unknown = api
        .call(Method::DELETE, "/v1/progress", None, None, None)
        .await;
    assert_eq!(unknown.status, StatusCode::METHOD_NOT_ALLOWED);

    // Nothing moved.
    api.settle().await;
    let balance = api
        .get(
            &format!("/v1/accounts/{}", erin.account_id.as_deref().unwrap()),
            &erin.token,
        )
        .await;
    assert_eq!(balance.body["available"], 50_000);
    let progress = api
        .get("/v1/products/input-product/progress", &erin.token)
        .await;
    assert_eq!(progress.body["available"], 10_000);
}

on_both_backends!(
    bad_input_is_refused_on_sqlite,
    bad_input_is_refused_on_postgres,
    bad_input_is_refused_and_changes_nothing
);

/// Many buyers at once, each retrying every purchase with its key: no
/// over-booking, no purchase twice, money and quota add up.
async fn concurrent_buyers_never_overbook(api: &TestApi) {
    const BUYERS: usize = 24;
    const PURCHASES: usize = 6;
    const QUOTA: i64 = 10_000;
    api.open_product("hot", QUOTA, 100, 1_000).await;
    let mut buyers = Vec::new();
    for index in 0..BUYERS {
        buyers.push(api.customer(&format!("buyer{index}"), 5_000).await);
    }
    let api = std::sync::Arc::new(api);
    let results = futures::future::join_all(buyers.iter().enumerate().map(|(index, buyer)| {
        let api = api.clone();
        async move {
            let mut confirmed: HashMap<String, i64> = HashMap::new();
            for purchase in 0..PURCHASES {
                let key = format!("b{index}-p{purchase}");
                let amount = 100 * (1 + ((index + purchase) % 10) as i64);
                let (first, second) = futures::join!(
                    api.buy(buyer, "hot", amount, &key),
                    api.buy(buyer, "hot", amount, &key)
                );
                // The key's settled answer; each concurrent reply either is
                // that same answer or says the key was still in flight.
                let last = api.buy(buyer, "hot", amount, &key).await;
                let in_flight = |reply: &Reply| {
                    reply.status == StatusCode::CONFLICT && reply.body["error"] == "conflict"
                };
                let decided: Vec<&Reply> = [&first, &second]
                    .into_iter()
                    .filter(|reply| !in_flight(reply))
                    .collect();
                assert!(
                    !decided.is_empty(),
                    "{key}: both replies in flight: {first:?} {second:?}"
                );
                for reply in decided {
                    assert_eq!(
                        (reply.status, &reply.body["order_id"], &reply.body["error"]),
                        (last.status, &last.body["order_id"], &last.body["error"]),
                        "{key}: one key, two answers: {reply:?} then {last:?}"
                    );
                }
                match last.status {
                    StatusCode::CREATED => {
                        confirmed.insert(last.body["order_id"].as_str().unwrap().into(), amount);
                    }
                    StatusCode::CONFLICT | StatusCode::UNPROCESSABLE_ENTITY => {}
                    other => panic!("unexpected {other}: {last:?}"),
                }
            }
            confirmed
        }
    }))
    .await;
    api.settle().await;
    let progress = api.get("/v1/products/hot/progress", &api.admin).await;
    let confirmed_total: i64 = results.iter().flat_map(|r| r.values()).sum();
    let orders: usize = results.iter().map(HashMap::len).sum();
    assert_eq!(progress.body["confirmed"], confirmed_total, "{progress:?}");
    assert_eq!(progress.body["orders"], orders as i64);
    assert!(confirmed_total <= QUOTA);
    // Every purchase is settled: nothing reserved, the rest available.
    assert_eq!(progress.body["reserved"], 0, "{progress:?}");
    assert_eq!(
        progress.body["available"],
        QUOTA - confirmed_total,
        "{progress:?}"
    );
    let audit = engine::audit::audit(api.server.state.store.as_ref())
        .await
        .unwrap();
    let violations = audit.settled_violations();
    assert!(violations.is_empty(), "{violations:#?}");
    let hot = domain::ProductId::parse("hot").unwrap();
    assert_eq!(audit.oracle.confirmed(&hot), confirmed_total);
    assert!(audit.oracle.held_peak(&hot) <= QUOTA);
    for (buyer, mine) in buyers.iter().zip(&results) {
        let account = buyer.account_id.as_deref().unwrap();
        let balance = api
            .get(&format!("/v1/accounts/{account}"), &buyer.token)
            .await;
        let spent: i64 = mine.values().sum();
        assert_eq!(balance.body["total_invested"], spent, "{balance:?}");
        assert_eq!(balance.body["available"], 5_000 - spent);
        assert!(balance.body["available"].as_i64().unwrap() >= 0);
    }
}

on_both_backends!(
    concurrent_buyers_on_sqlite,
    concurrent_buyers_on_postgres,
    concurrent_buyers_never_overbook
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after() {
    let limits = api::server::Limits {
        rate_per_second: 1,
        rate_burst: 3,
        ..api::server::Limits::default()
    };
    let api = TestApi::start_with(Kind::Sqlite, "rate_limits", limits)
        .await
        .unwrap();
    let mut limited = None;
    for _ in 0..10 {
        let reply = api.get("/v1/me", &api.admin).await;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(reply);
            break;
        }
    }
    let reply = limited.expect("the tenth request within a second is over a 1/s rate");
    assert_eq!(reply.code(), "rate_limited");
    let retry: u64 = reply.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    api.stop().await;
}

/// An answer that leaves a large body unread says `Connection: close`, as
/// the server will close the connection; small bodies keep it alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_large_bodies_close_the_connection() {
    let api = TestApi::start(Kind::Sqlite, "unread_bodies").await.unwrap();
    let send = |bytes: usize, token: Option<String>| {
        let body = format!(r#"{{"amount":5,"pad":"{}"}}"#, "x".repeat(bytes));
        let mut request = Request::post("/v1/products")
            .header("content-type", "application/json")
            .header("content-length", body.len())
            .header("idempotency-key", "k");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        api.send(request.body(Body::from(body)).unwrap())
    };
    let close = |reply: &support::Reply| {
        reply
            .headers
            .get("connection")
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let anonymous_large = send(40_000, None).await;
    assert_eq!(anonymous_large.status, StatusCode::UNAUTHORIZED);
    assert_eq!(close(&anonymous_large).as_deref(), Some("close"));
    let oversized = send(70_000, Some(api.admin.clone())).await;
    assert_eq!(oversized.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(close(&oversized).as_deref(), Some("close"));
    let anonymous_small = send(100, None).await;
    assert_eq!(anonymous_small.status, StatusCode::UNAUTHORIZED);
    assert_eq!(close(&anonymous_small), None);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_sheds_load_with_503() {
    let settings = engine::EngineSettings {
        queue_max: 1,
        ..engine::EngineSettings::default()
    };
    let api = TestApi::start_full(Kind::Sqlite, "load_shedding", support::generous(), settings)
        .await
        .unwrap();
    api.open_product("crowded", 1_000_000, 1, 1_000).await;
    let mut buyers: Vec<User> = Vec::new();
    for index in 0..40 {
        buyers.push(api.customer(&format!("crowd{index}"), 10_000).await);
    }
    let replies = futures::future::join_all(buyers.iter().enumerate().map(|(i, b)| {
        let api = &api;
        async move { api.buy(b, "crowded", 10, &format!("c{i}")).await }
    }))
    .await;
    let shed: Vec<_> = replies
        .iter()
        .filter(|r| r.status == StatusCode::SERVICE_UNAVAILABLE)
        .collect();
    let bought = replies
        .iter()
        .filter(|r| r.status == StatusCode::CREATED)
        .count();
    assert_eq!(shed.len() + bought, buyers.len(), "{replies:?}");
    assert!(!shed.is_empty(), "40 buyers at once overflow a queue of 1");
    for reply in &shed {
        assert_eq!(reply.code(), "overloaded");
        assert!(reply.headers.contains_key("retry-after"));
    }
    // A shed purchase did not keep its key: retried, it goes through.
    let (index, _) = replies
        .iter()
        .enumerate()
        .find(|(_, r)| r.status == StatusCode::SERVICE_UNAVAILABLE)
        .unwrap();
    let retried = api
        .buy(&buyers[index], "crowded", 10, &format!("c{index}"))
        .await;
    assert_eq!(retried.status, StatusCode::CREATED, "{retried:?}");
    api.settle().await;
    let progress = api.get("/v1/products/crowded/progress", &api.admin).await;
    assert_eq!(progress.body["orders"], (bought + 1) as i64);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_names_exactly_the_route_table() {
    let api = TestApi::start(Kind::Sqlite, "openapi").await.unwrap();
    let reply = api
        .call(Method::GET, "/openapi.json", None, None, None)
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let paths = reply.body["paths"].as_object().unwrap();
    let documented: BTreeSet<(String, String)> = paths
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .keys()
                .map(move |method| (method.to_uppercase(), path.clone()))
        })
        .collect();
    let routed: BTreeSet<(String, String)> = table()
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_owned()))
        .collect();
    assert_eq!(documented, routed);
    // Protected routes declare the bearer scheme; public ones do not.
    for route in table() {
        let operation = &paths[route.path][route.method.as_str().to_lowercase()];
        let secured = operation.get("security").is_some();
        assert_eq!(
            secured,
            route.access != Access::Public,
            "{} {}",
            route.method,
            route.path
        );
        // Every status the guard can answer is listed, with the error body.
        let responses = operation["responses"].as_object().unwrap();
        let mut guarded = vec!["429", "503"];
        if secured {
            guarded.push("401");
        }
        // POSTs that read a body (logout reads none).
        if route.method == Method::POST
            && (operation.get("requestBody").is_some() || route.idempotency != Idempotency::None)
        {
            guarded.extend(["400", "408", "413"]);
        }
        for status in guarded {
            assert_eq!(
                responses[status]["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/ErrorBody",
                "{} {} {status}",
                route.method,
                route.path
            );
        }
        for (status, response) in responses {
            assert!(
                response["description"]
                    .as_str()
                    .is_some_and(|d| !d.is_empty()),
                "{} {} {status} has no description",
                route.method,
                route.path
            );
        }
    }
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_purchases_and_report_queues_and_lag() {
    let api = TestApi::start(Kind::Sqlite, "metrics").await.unwrap();
    let frank = api.customer("frank", 10_000).await;
    api.open_product("metered", 1_000, 1, 1_000).await;
    assert_eq!(
        api.buy(&frank, "metered", 10, "m1").await.status,
        StatusCode::CREATED
    );
    let refused = api.buy(&frank, "metered", 100_000, "m2").await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    let request = Request::get("/metrics").body(Body::empty()).unwrap();
    let response = tower::ServiceExt::oneshot(api.server.router(), request)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = String::from_utf8(
        axum::body::to_bytes(response.into_body(), 1 << 22)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    for needle in [
        "ledger_purchases_total{outcome=\"confirmed\"}",
        "ledger_purchases_total{outcome=\"amount_out_of_range\"}",
        "ledger_purchase_queue_depth{product_id=\"metered\"}",
        "ledger_projection_lag_events{projection=\"sale_progress\"}",
        "ledger_append_seconds",
        "ledger_http_requests_total",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_progress_stream_sends_progress_objects() {
    use futures::StreamExt;
    let api = TestApi::start(Kind::Sqlite, "stream").await.unwrap();
    api.open_product("streamed", 5_000, 1, 5_000).await;
    let request = Request::get("/v1/progress/stream")
        .body(Body::empty())
        .unwrap();
    let response = tower::ServiceExt::oneshot(api.server.router(), request)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body().into_data_stream();
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while !text.contains("event: progress") || !text.contains("\"product_id\":\"streamed\"") {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .expect("a progress event within 20 s")
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let data = text
        .lines()
        .find(|l| l.starts_with("data:") && l.contains("streamed"))
        .unwrap();
    let progress: Value = serde_json::from_str(data.trim_start_matches("data:").trim()).unwrap();
    assert_eq!(progress["quota"], 5_000);
    assert_eq!(progress["available"], 5_000);
    // Shutting the feed down ends the stream, so draining never waits on it.
    api.server.state.feed.close_streams();
    let end = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while let Some(chunk) = body.next().await {
            chunk.unwrap();
        }
    })
    .await;
    assert!(end.is_ok(), "the stream ends when the feed closes");
    api.stop().await;
}

async fn auditors_read_the_log_with_its_hashes(api: &TestApi) {
    let gina = api.customer("gina", 10_000).await;
    api.open_product("audited", 1_000, 1, 1_000).await;
    assert_eq!(
        api.buy(&gina, "audited", 10, "g1").await.status,
        StatusCode::CREATED
    );
    let auditor = api.user("audrey", "auditor").await;
    let verified = api
        .call(
            Method::POST,
            "/v1/audit/verify",
            Some(&auditor.token),
            None,
            None,
        )
        .await;
    assert_eq!(verified.status, StatusCode::OK, "{verified:?}");
    assert_eq!(verified.body["ok"], true);
    assert_eq!(verified.body["first_bad_position"], Value::Null);
    let checked = verified.body["events_checked"].as_i64().unwrap();
    assert!(checked >= 5, "{verified:?}");
    // Page through the log: each event's previous_hash is the hash before it.
    let mut previous: Option<String> = None;
    let mut seen = 0;
    let mut after = 0;
    loop {
        let page = api
            .get(
                &format!("/v1/audit/events?after={after}&limit=3"),
                &auditor.token,
            )
            .await;
        assert_eq!(page.status, StatusCode::OK, "{page:?}");
        for event in page.body["events"].as_array().unwrap() {
            if let Some(previous) = &previous {
                assert_eq!(event["previous_hash"].as_str(), Some(previous.as_str()));
            }
            previous = event["hash"].as_str().map(str::to_owned);
            assert!(event["metadata"].is_object());
            seen += 1;
        }
        match page.body["next"].as_i64() {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(seen, checked);
    assert_eq!(previous.as_deref(), verified.body["head_hash"].as_str());
    // Far past the head: an empty page, answered at once.
    let beyond = api
        .get(
            &format!("/v1/audit/events?after={}", i64::MAX),
            &auditor.token,
        )
        .await;
    assert_eq!(beyond.status, StatusCode::OK);
    assert_eq!(beyond.body["events"], json!([]));
    let bad = api.get("/v1/audit/events?limit=5000", &auditor.token).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

on_both_backends!(
    auditors_read_the_log_on_sqlite,
    auditors_read_the_log_on_postgres,
    auditors_read_the_log_with_its_hashes
);

async fn balances_as_of_a_point_in_history(api: &TestApi) {
    let hana = api.customer("hana", 100_000).await;
    let account = hana.account_id.clone().unwrap();
    api.open_product("history", 1_000_000, 1, 100_000).await;
    assert_eq!(
        api.buy(&hana, "history", 30_000, "h1").await.status,
        StatusCode::CREATED
    );
    api.settle().await;
    let then = api
        .get(&format!("/v1/accounts/{account}"), &hana.token)
        .await;
    let position = api.server.state.store.head().await.unwrap();
    let time = chrono::Utc::now();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    // Later: another deposit and purchase.
    let deposit = api
        .post(
            &format!("/v1/accounts/{account}/deposits"),
            &api.admin,
            json!({"amount": 50_000, "reference": "later"}),
        )
        .await;
    assert_eq!(deposit.status, StatusCode::CREATED);
    assert_eq!(
        api.buy(&hana, "history", 20_000, "h2").await.status,
        StatusCode::CREATED
    );
    api.settle().await;
    let now = api
        .get(&format!("/v1/accounts/{account}"), &hana.token)
        .await;
    assert_eq!(now.body["available"], 100_000);
    for as_of in [
        position.to_string(),
        time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    ] {
        let past = api
            .get(
                &format!("/v1/accounts/{account}?as_of={}", urlencode(&as_of)),
                &hana.token,
            )
            .await;
        assert_eq!(past.status, StatusCode::OK, "{as_of}: {past:?}");
        assert_eq!(past.body, then.body, "as of {as_of}");
    }
    let current = api
        .get(
            &format!("/v1/accounts/{account}?as_of={}", i64::MAX),
            &hana.token,
        )
        .await;
    assert_eq!(current.body, now.body);
    let before = api
        .get(&format!("/v1/accounts/{account}?as_of=0"), &hana.token)
        .await;
    assert_eq!(
        before.status,
        StatusCode::NOT_FOUND,
        "the account did not exist yet"
    );
    let bad = api
        .get(
            &format!("/v1/accounts/{account}?as_of=yesterday"),
            &hana.token,
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

fn urlencode(text: &str) -> String {
    text.replace(':', "%3A").replace('+', "%2B")
}

on_both_backends!(
    balances_as_of_a_point_in_history_on_sqlite,
    balances_as_of_a_point_in_history_on_postgres,
    balances_as_of_a_point_in_history
);

/// Hostile input on every route with every role: injection strings,
/// oversized, deeply nested and malformed bodies, huge, negative and zero
/// amounts, unicode tricks, wrong content types and methods. Nothing answers
/// 5xx, and no balance or quota moves.
async fn hostile_input_on_every_route_with_every_role(api: &TestApi) {
    let victim = api.customer("victim", 50_000).await;
    api.open_product("fortress", 100_000, 1, 10_000).await;
    assert_eq!(
        api.buy(&victim, "fortress", 500, "legit").await.status,
        StatusCode::CREATED
    );
    let mut tokens: Vec<Option<String>> =
        vec![None, Some(victim.token.clone()), Some(api.admin.clone())];
    for role in ["support", "operator", "auditor"] {
        tokens.push(Some(api.user(&format!("hostile-{role}"), role).await.token));
    }
    api.settle().await;
    let account = victim.account_id.clone().unwrap();
    let before_balance = api
        .get(&format!("/v1/accounts/{account}"), &api.admin)
        .await
        .body;
    let before_progress = api.get("/v1/progress", &api.admin).await.body;
    let bodies = hostile::bodies();
    let mut calls = 0;
    for route in table() {
        // An endless stream, and the route that ends the session it is
        // called with (it would log every role out mid-walk).
        if route.path == "/v1/progress/stream" || route.path == "/v1/auth/logout" {
            continue;
        }
        let uri = hostile::concrete(route.path, &account, "fortress");
        for token in &tokens {
            for method in [Method::GET, Method::POST, Method::PUT, Method::DELETE] {
                for (index, (content_type, body)) in bodies.iter().enumerate() {
                    let mut request = Request::builder()
                        .method(method.clone())
                        .uri(&uri)
                        .header("content-type", *content_type)
                        .header("idempotency-key", format!("hostile-{calls}-{index}"));
                    if let Some(token) = token {
                        request = request.header("authorization", format!("Bearer {token}"));
                    }
                    let reply = api
                        .send(request.body(Body::from(body.clone())).unwrap())
                        .await;
                    calls += 1;
                    assert!(
                        reply.status.as_u16() < 500,
                        "{method} {uri} with {content_type} body #{index}: {reply:?}"
                    );
                    let text = reply.body.to_string();
                    assert!(!text.contains("sqlx") && !text.contains("SELECT"), "{text}");
                    if method == Method::GET {
                        break; // A GET's body is ignored: one try is enough.
                    }
                }
            }
        }
    }
    assert!(calls > 1_000, "{calls}");
    api.settle().await;
    assert_eq!(
        api.get(&format!("/v1/accounts/{account}"), &api.admin)
            .await
            .body,
        before_balance
    );
    // Quota did not move. (The status may: `open`/`close` take no body, so
    // an operator's call with a garbage body still closes the sale.)
    let figures = |progress: &Value| {
        let product = &progress["products"][0];
        ["quota", "confirmed", "reserved", "available", "orders"].map(|f| product[f].clone())
    };
    let after_progress = api.get("/v1/progress", &api.admin).await.body;
    assert_eq!(figures(&after_progress), figures(&before_progress));
}

on_both_backends!(
    hostile_input_on_sqlite,
    hostile_input_on_postgres,
    hostile_input_on_every_route_with_every_role
);

on_both_backends!(
    progress_reads_come_from_memory_and_reflect_purchases_on_sqlite,
    progress_reads_come_from_memory_and_reflect_purchases_on_postgres,
    progress_reads_come_from_memory_and_reflect_purchases
);

/// Public progress reads are answered from the progress feed's last read
/// (no database query), yet reflect every event the sale-progress
/// projection has committed when the request arrives; an unknown product is
/// 404 from memory too; when the feed stops, the database answers.
async fn progress_reads_come_from_memory_and_reflect_purchases(api: &TestApi) {
    let feed = &api.server.state.feed;
    api.open_product("watched", 10_000, 100, 5_000).await;
    let carol = api.customer("carol", 10_000).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);

    // Before any purchase: the opened product is listed with all of its
    // quota available (waiting with a deadline for the projection).
    loop {
        let reply = api.get("/v1/products/watched/progress", &carol.token).await;
        if reply.status == StatusCode::OK && reply.body["status"] == "open" {
            assert_eq!(reply.body["available"], 10_000, "{reply:?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the opened product never showed: {reply:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let bought = api.buy(&carol, "watched", 1_500, "watched-1").await;
    assert_eq!(bought.status, StatusCode::CREATED, "{bought:?}");

    // The purchase shows within the deadline, in both routes.
    loop {
        let one = api.get("/v1/products/watched/progress", &carol.token).await;
        assert_eq!(one.status, StatusCode::OK, "{one:?}");
        if one.body["confirmed"] == 1_500 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the purchase never showed: {one:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // Once the projection has applied the purchase, the very next read
    // reflects it: an answer from memory is never older than what the
    // projection had committed when the request arrived.
    let second = api.buy(&carol, "watched", 2_000, "watched-2").await;
    assert_eq!(second.status, StatusCode::CREATED, "{second:?}");
    api.settle().await;
    let one = api.get("/v1/products/watched/progress", &carol.token).await;
    assert_eq!(one.status, StatusCode::OK, "{one:?}");
    let fields: BTreeSet<&str> = one
        .body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        fields,
        BTreeSet::from([
            "product_id",
            "quota",
            "confirmed",
            "reserved",
            "available",
            "status",
            "orders",
            "name",
            "opened_at",
            "sold_out_at",
            "position"
        ])
    );
    assert_eq!(
        (
            &one.body["confirmed"],
            &one.body["reserved"],
            &one.body["available"],
            &one.body["orders"]
        ),
        (&json!(3_500), &json!(0), &json!(6_500), &json!(2)),
        "{one:?}"
    );
    let all = api.get("/v1/progress", &carol.token).await;
    assert_eq!(all.status, StatusCode::OK, "{all:?}");
    assert_eq!(all.body["products"], json!([one.body]), "{all:?}");

    // An unknown product is 404; at least one such answer within the
    // deadline comes from memory (a database query only when the feed was
    // late, which a loaded machine may cause).
    loop {
        let (memory, database) = feed.served_counts();
        let unknown = api
            .get("/v1/products/nobody-sells-this/progress", &carol.token)
            .await;
        assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{unknown:?}");
        assert_eq!(unknown.code(), "not_found", "{unknown:?}");
        let (memory_after, database_after) = feed.served_counts();
        if memory_after == memory + 1 && database_after == database {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no unknown-product answer came from memory"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (memory, _) = feed.served_counts();
    assert!(memory > 0, "progress reads were never served from memory");

    // The feed stops reading: once its last read is over a second old, the
    // answers come from the database, with the same figures.
    feed.stop();
    loop {
        let (_, database) = feed.served_counts();
        let again = api.get("/v1/products/watched/progress", &carol.token).await;
        assert_eq!(again.body, one.body, "{again:?}");
        let unknown = api
            .get("/v1/products/nobody-sells-this/progress", &carol.token)
            .await;
        assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{unknown:?}");
        if feed.served_counts().1 == database + 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a stopped feed kept answering"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
