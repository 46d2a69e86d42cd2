//! Hostile input against the real binary, logging everything it can
//! (`RUST_LOG=trace`): every hostile body to every route with every role,
//! plus logins with right and wrong passwords and forged tokens. Nothing
//! answers 5xx or shows internals, no balance or quota moves, and no
//! password or token appears anywhere in the log.

use crate::client;
use crate::cluster::Cluster;
use crate::hostile;
use crate::process::ADMIN;
use crate::report::Report;
use api::server::routes::table;
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Runs the scenario on the cluster's first node.
pub async fn run(mut cluster: Cluster, report: &mut Report) {
    cluster.log_level("trace");
    cluster.add_args(&[
        "--rate-limit",
        "1000000",
        "--rate-burst",
        "1000000",
        "--auth-failures-per-address",
        "1000000",
        "--suspect-logins-per-second",
        "1000000",
    ]);
    let base = cluster.start(0);
    let http = client::http();
    let requests = AtomicU64::new(0);
    let count = |n: u64| requests.fetch_add(n, Ordering::Relaxed);
    let unique = || uuid::Uuid::new_v4().simple().to_string();

    // Everything secret that passes through the node.
    let admin = client::admin(&http, &base).await;
    let mut secrets = vec![ADMIN.1.to_owned(), admin.clone()];
    let victim_password = format!("victim-pw-{}", unique());
    let (account, victim) =
        client::customer(&http, &base, &admin, "victim", &victim_password, 50_000).await;
    secrets.extend([victim_password, victim.clone()]);
    let mut tokens = vec![None, Some(victim.clone()), Some(admin.clone())];
    let mut auditor = String::new();
    for role in ["support", "operator", "auditor"] {
        let password = format!("{role}-pw-{}", unique());
        let body = json!({"username": role, "password": password, "role": role});
        let (status, reply) = client::post(&http, &base, "/v1/users", &admin, body).await;
        assert_eq!(status, 201, "{reply}");
        let token = client::login(&http, &base, role, &password).await;
        secrets.extend([password, token.clone()]);
        if role == "auditor" {
            auditor = token.clone();
        }
        tokens.push(Some(token));
    }
    count(9);
    let mut refused = Vec::new();
    for (username, password) in [
        ("victim", format!("wrong-pw-{}", unique())),
        ("nobody", format!("nobody-pw-{}", unique())),
        (" victim", format!("spaced-pw-{}", unique())),
    ] {
        let body = json!({"username": username, "password": password});
        refused.push(
            client::post(&http, &base, "/v1/auth/login", "", body)
                .await
                .0,
        );
        secrets.push(password);
    }
    let short = format!("s{}", &unique()[..3]);
    let body = json!({"username": "shorty", "password": short, "role": "customer"});
    refused.push(
        client::post(&http, &base, "/v1/users", &admin, body)
            .await
            .0,
    );
    secrets.push(short);
    let forged = format!("forged-{}", unique());
    refused.push(client::get(&http, &base, "/v1/me", &forged).await.0);
    secrets.push(forged);
    count(5);
    report.check(
        "wrong passwords, bad users and forged tokens are refused",
        refused.iter().all(|status| (400..500).contains(status)),
        format!("answers {refused:?}"),
    );

    let product = json!({"product_id": "fortress", "name": "Fortress", "quota": 100_000,
        "min_purchase": 1, "max_purchase": 10_000, "annual_rate_bps": 300, "term_days": 30});
    client::open_product(&http, &base, &admin, product).await;
    let bought = http
        .post(format!("{base}/v1/products/fortress/purchases"))
        .bearer_auth(&victim)
        .header("idempotency-key", "legit")
        .json(&json!({"amount": 500}))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(bought.as_u16(), 201);
    count(3);
    // The read models show the purchase before anything is compared.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let before = loop {
        let before = figures(&http, &base, &admin, &account).await;
        count(2);
        if before["balance"]["total_invested"] == 500 && before["product"][1] == 500 {
            break before;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the read models did not show the legitimate purchase within 30 s: {before}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let head_before = head(&http, &base).await.0;
    count(1);

    // Every hostile body to every route, with every role.
    let bodies = hostile::bodies();
    let mut sends = Vec::new();
    for route in table() {
        // An endless stream, and the route that ends the session it is
        // called with (it would log every role out mid-walk).
        if route.path == "/v1/progress/stream" || route.path == "/v1/auth/logout" {
            continue;
        }
        let uri = hostile::concrete(route.path, &account, "fortress");
        for token in &tokens {
            for method in [Method::GET, Method::POST, Method::PUT, Method::DELETE] {
                // A GET's body is ignored: one try is enough.
                let tries = if method == Method::GET {
                    1
                } else {
                    bodies.len()
                };
                for index in 0..tries {
                    sends.push((uri.clone(), token.clone(), method.clone(), index));
                }
            }
        }
    }
    let sent = sends.len();
    let answers: Vec<(u16, String, String)> = futures::stream::iter(sends)
        .map(|(uri, token, method, index)| {
            let (http, base, bodies) = (&http, &base, &bodies);
            async move {
                let (content_type, body) = &bodies[index];
                let mut request = http
                    .request(method.clone(), format!("{base}{uri}"))
                    .header("content-type", *content_type)
                    .header(
                        "idempotency-key",
                        format!("hostile-{}", uuid::Uuid::new_v4()),
                    )
                    .body(body.clone());
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                let what = format!("{method} {uri} body #{index}");
                match request.send().await {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        (status, what, response.text().await.unwrap_or_default())
                    }
                    Err(error) => {
                        let mut chain = error.to_string();
                        let mut source = std::error::Error::source(&error);
                        while let Some(inner) = source {
                            chain = format!("{chain}: {inner}");
                            source = inner.source();
                        }
                        (0, what, chain)
                    }
                }
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    count(sent as u64);
    let failed: Vec<&(u16, String, String)> = answers
        .iter()
        .filter(|(status, _, _)| *status >= 500 || *status == 0)
        .collect();
    report.check(
        "no 5xx (and an answer to each)",
        failed.is_empty(),
        format!(
            "{sent} hostile requests, {} failed{}",
            failed.len(),
            failed
                .first()
                .map(|(s, what, body)| format!(", first: {s} to {what}: {body}"))
                .unwrap_or_default()
        ),
    );
    let internals = answers
        .iter()
        .filter(|(_, _, body)| body.contains("sqlx") || body.contains("SELECT"))
        .count();
    report.check(
        "no answer shows internals",
        internals == 0,
        format!("{internals} answers mention sqlx or SQL"),
    );
    // Every hostile request has been answered, so whatever it appended is
    // committed: first the log itself, then the read models once they have
    // caught up with it (compared once, not polled until equal).
    let (moved, read) = money_events_after(&http, &base, &auditor, head_before).await;
    count(read);
    report.check(
        "no event moving money or quota appended by hostile requests",
        moved.is_empty(),
        format!("after position {head_before}: {moved:?}"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (head_now, lag) = head(&http, &base).await;
        count(1);
        if lag == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the read models still lag {lag} behind {head_now} after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = figures(&http, &base, &admin, &account).await;
    count(2);
    report.check(
        "no balance or quota moved",
        after == before,
        format!("before {before}, after {after}"),
    );

    cluster.kill_all();
    let log = std::fs::read_to_string(cluster.log_file(0)).unwrap_or_default();
    let leaked: Vec<&String> = secrets
        .iter()
        .filter(|s| log.contains(s.as_str()))
        .collect();
    report.check(
        "the trace log records the requests",
        log.contains("/v1/auth/login") && log.contains("/v1/products/fortress/purchases"),
        format!("{} lines, {} KiB", log.lines().count(), log.len() / 1024),
    );
    report.check(
        "no password or token in the log",
        leaked.is_empty(),
        format!(
            "{} secrets looked for, {} found",
            secrets.len(),
            leaked.len()
        ),
    );
    report.requests = requests.load(Ordering::Relaxed);
    report.outcome = format!(
        "{sent} hostile requests over {} routes × {} roles; log at trace level",
        table().len() - 2,
        tokens.len()
    );
    let (clean, printed) = cluster.drift();
    report.check(
        "`ledger audit drift`: read models = a fresh rebuild, trial balance holds",
        clean,
        printed.lines().last().unwrap_or_default(),
    );
}

/// The log head and the projections' largest lag, from `GET /readyz`.
async fn head(http: &reqwest::Client, base: &str) -> (i64, i64) {
    let (status, ready) = client::get(http, base, "/readyz", "").await;
    assert_eq!(status, 200, "{ready}");
    let head = ready["head"].as_i64().expect("readyz reports the head");
    let lag = ready["projection_lag"]
        .as_i64()
        .expect("readyz reports the lag");
    (head, lag)
}

/// Events after `after` that move money or quota, read from the log
/// (`GET /v1/audit/events`), as "position type"; and the requests sent.
async fn money_events_after(
    http: &reqwest::Client,
    base: &str,
    auditor: &str,
    mut after: i64,
) -> (Vec<String>, u64) {
    const MOVING: [&str; 8] = [
        "funds_deposited",
        "purchase_debited",
        "purchase_refunded",
        "payout_credited",
        "funds_withdrawn",
        "quota_reserved",
        "reservation_confirmed",
        "reservation_released",
    ];
    let (mut moved, mut requests) = (Vec::new(), 0);
    loop {
        let path = format!("/v1/audit/events?after={after}&limit=1000");
        let (status, page) = client::get(http, base, &path, auditor).await;
        requests += 1;
        assert_eq!(status, 200, "{page}");
        for event in page["events"].as_array().expect("events") {
            let kind = event["type"].as_str().unwrap_or_default();
            if MOVING.contains(&kind) {
                moved.push(format!("{} {kind}", event["position"]));
            }
        }
        match page["next"].as_i64() {
            Some(next) if next > after => after = next,
            _ => return (moved, requests),
        }
    }
}

/// The victim's balance and the product's figures (not its status: `open`
/// and `close` take no body, so an operator's garbage still closes a sale).
async fn figures(http: &reqwest::Client, base: &str, admin: &str, account: &str) -> Value {
    let balance = client::get(http, base, &format!("/v1/accounts/{account}"), admin)
        .await
        .1;
    let progress = client::get(http, base, "/v1/products/fortress/progress", admin)
        .await
        .1;
    let product: Vec<Value> = ["quota", "confirmed", "reserved", "available", "orders"]
        .iter()
        .map(|f| progress[f].clone())
        .collect();
    json!({"balance": balance, "product": product})
}
