//! A small HTTP client for the scenarios: JSON in, status and JSON out.

use crate::process::ADMIN;
use serde_json::{Value, json};
use std::time::Duration;

/// The longest any request may take before the scenario calls it a hang:
/// well above the nodes' request timeout.
pub const HANG: Duration = Duration::from_secs(20);

/// A client with room for a thousand keep-alive connections.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(1_000)
        .timeout(HANG)
        .build()
        .unwrap()
}

/// Sends one request; panics if no answer comes (the scenarios call this
/// only where a node must be up).
pub async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = http.request(method, &url).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// `GET` with a token.
pub async fn get(http: &reqwest::Client, base: &str, path: &str, token: &str) -> (u16, Value) {
    call(
        http,
        reqwest::Method::GET,
        format!("{base}{path}"),
        token,
        None,
    )
    .await
}

/// `POST` of a JSON body with a token.
pub async fn post(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    token: &str,
    body: Value,
) -> (u16, Value) {
    let url = format!("{base}{path}");
    call(http, reqwest::Method::POST, url, token, Some(body)).await
}

/// Logs in and answers the token.
pub async fn login(http: &reqwest::Client, base: &str, username: &str, password: &str) -> String {
    let body = json!({"username": username, "password": password});
    let (status, reply) = post(http, base, "/v1/auth/login", "", body).await;
    assert_eq!(status, 200, "login {username}: {reply}");
    reply["token"].as_str().unwrap().to_owned()
}

/// The bootstrap admin's token.
pub async fn admin(http: &reqwest::Client, base: &str) -> String {
    login(http, base, ADMIN.0, ADMIN.1).await
}

/// Creates a customer with a deposit; answers its account id and token.
pub async fn customer(
    http: &reqwest::Client,
    base: &str,
    admin: &str,
    username: &str,
    password: &str,
    deposit: i64,
) -> (String, String) {
    let body = json!({"username": username, "password": password, "role": "customer"});
    let (status, user) = post(http, base, "/v1/users", admin, body).await;
    assert_eq!(status, 201, "{user}");
    let account = user["account_id"].as_str().unwrap().to_owned();
    let body = json!({"amount": deposit, "reference": "funding"});
    let path = format!("/v1/accounts/{account}/deposits");
    let (status, reply) = post(http, base, &path, admin, body).await;
    assert_eq!(status, 201, "{reply}");
    (account, login(http, base, username, password).await)
}

/// Lists and opens a product with the bootstrap admin's token.
pub async fn open_product(http: &reqwest::Client, base: &str, admin: &str, product: Value) {
    let id = product["product_id"].as_str().unwrap().to_owned();
    let (status, reply) = post(http, base, "/v1/products", admin, product).await;
    assert_eq!(status, 201, "{reply}");
    let (status, reply) = post(
        http,
        base,
        &format!("/v1/products/{id}/open"),
        admin,
        json!({}),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
}
