//! The real binaries: `ledger fake-gateway` lying 30% of the time and
//! `ledger serve --gateway-url`, killed with SIGKILL mid-run and started
//! again on the same data. The gateway's record shows one payment per
//! holder for the period, the ledger agrees, and the read models have no
//! drift.

mod process;

use process::{Process, start};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

const HOLDERS: usize = 10;

fn serve(data_dir: &std::path::Path, gateway: &str) -> Process {
    start(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--gateway-url",
            gateway,
            "--gateway-timeout",
            "400ms",
            "--payout-lease",
            "2s",
            "--payout-workers",
            "3",
            "--rate-limit",
            "100000",
            "--rate-burst",
            "100000",
        ],
        data_dir,
    )
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, token, Some(body))
            .await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, &self.token, None)
            .await
    }
}

async fn login(http: &reqwest::Client, base: &str, username: &str, password: &str) -> String {
    let reply: Value = http
        .post(format!("{base}/v1/auth/login"))
        .json(&json!({"username": username, "password": password}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    reply["token"].as_str().unwrap().to_owned()
}

/// Customers with confirmed orders in a closed product, and the schedule.
async fn prepare(client: &Client) -> Vec<(String, i64)> {
    let admin = client.token.clone();
    let (status, _) = client
        .post(
            "/v1/products",
            &admin,
            json!({"product_id": "bond", "name": "Bond", "quota": 10_000_000, "min_purchase": 1,
                   "max_purchase": 1_000_000, "annual_rate_bps": 500, "term_days": 180}),
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(
        client
            .post("/v1/products/bond/open", &admin, json!({}))
            .await
            .0,
        200
    );
    let mut holders = Vec::new();
    for index in 0..HOLDERS {
        let name = format!("investor{index}");
        let (status, user) = client
            .post(
                "/v1/users",
                &admin,
                json!({"username": name, "password": "investor-password", "role": "customer"}),
            )
            .await;
        assert_eq!(status, 201, "{user}");
        let account = user["account_id"].as_str().unwrap().to_owned();
        let (status, _) = client
            .post(
                &format!("/v1/accounts/{account}/deposits"),
                &admin,
                json!({"amount": 2_000_000, "reference": "seed"}),
            )
            .await;
        assert_eq!(status, 201);
        let token = login(&client.http, &client.base, &name, "investor-password").await;
        let amount = 10_000 + 99_991 * index as i64;
        let response = client
            .http
            .post(format!("{}/v1/products/bond/purchases", client.base))
            .bearer_auth(&token)
            .header("idempotency-key", "buy-1")
            .json(&json!({"amount": amount}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 201);
        holders.push((account, amount));
    }
    assert_eq!(
        client
            .post("/v1/products/bond/close", &admin, json!({}))
            .await
            .0,
        200
    );
    let (status, scheduled) = client
        .post(
            "/v1/products/bond/payouts",
            &admin,
            json!({"period": "2026-H2", "kind": "interest", "days": 180}),
        )
        .await;
    assert_eq!(status, 202, "{scheduled}");
    assert_eq!(scheduled["scheduled"], HOLDERS as u64);
    holders
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_killed_mid_payout_run_pays_each_holder_once_after_restart() {
    let folder = tempfile::tempdir().unwrap();
    let gateway = start(
        &[
            "fake-gateway",
            "--listen",
            "127.0.0.1:0",
            "--timeout-rate",
            "0.15",
            "--late-pay-rate",
            "0.05",
            "--error-after-pay-rate",
            "0.10",
            "--hang-ms",
            "1500",
            "--latency-ms",
            "20",
            "--seed",
            "5",
        ],
        folder.path(),
    );
    let data = folder.path().join("data");
    let first = serve(&data, &gateway.url);
    let http = reqwest::Client::new();
    let client = Client {
        token: login(&http, &first.url, "admin", "admin-password-1").await,
        http,
        base: first.url.clone(),
    };
    let holders = prepare(&client).await;
    // Kill the process outright as soon as the workers got going.
    let mut at_kill = Vec::new();
    for _ in 0..500 {
        let (_, listed) = client.get("/v1/payouts?product_id=bond").await;
        at_kill = listed["payouts"].as_array().cloned().unwrap_or_default();
        if at_kill.iter().any(|p| p["status"] != "scheduled") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(first);
    let settled = at_kill
        .iter()
        .filter(|p| p["status"] == "succeeded")
        .count();
    eprintln!("killed with {settled} of {HOLDERS} payouts succeeded (as the read model saw it)");
    assert!(
        at_kill.iter().any(|p| p["status"] != "scheduled") && settled < HOLDERS,
        "killed mid-run: {at_kill:?}"
    );

    let second = serve(&data, &gateway.url);
    let client = Client {
        token: login(&client.http, &second.url, "admin", "admin-password-1").await,
        http: client.http,
        base: second.url.clone(),
    };
    let mut payouts = Vec::new();
    for _ in 0..600 {
        let (_, listed) = client.get("/v1/payouts?product_id=bond").await;
        payouts = listed["payouts"].as_array().cloned().unwrap_or_default();
        if payouts.len() == HOLDERS && payouts.iter().all(|p| p["status"] == "succeeded") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        payouts.iter().all(|p| p["status"] == "succeeded") && payouts.len() == HOLDERS,
        "{payouts:?}"
    );
    let record: Value = reqwest::get(format!("{}/payments", gateway.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut paid: HashMap<String, Vec<i64>> = HashMap::new();
    for payment in record["payments"].as_array().unwrap() {
        if payment["status"] == "succeeded" {
            paid.entry(payment["idempotency_key"].as_str().unwrap().to_owned())
                .or_default()
                .push(payment["amount"].as_i64().unwrap());
        }
    }
    assert_eq!(paid.len(), HOLDERS);
    for payout in &payouts {
        let amounts = &paid[payout["payout_id"].as_str().unwrap()];
        assert_eq!(amounts.len(), 1, "paid twice: {payout}");
        assert_eq!(Some(amounts[0]), payout["amount"].as_i64());
    }
    // Each holder is credited its interest once (the read models may lag a
    // moment behind the log).
    for (account, principal) in &holders {
        let interest = principal * 500 * 180 / 3_650_000;
        let mut balance = Value::Null;
        for _ in 0..100 {
            balance = client.get(&format!("/v1/accounts/{account}")).await.1;
            if balance["total_paid_out"] == interest {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(balance["total_paid_out"], interest, "{balance}");
    }
    drop(second);
    let drift = Command::new(env!("CARGO_BIN_EXE_ledger"))
        .args(["audit", "drift", "--data-dir"])
        .arg(&data)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        drift.status.success(),
        "drift after the crash: {}",
        String::from_utf8_lossy(&drift.stdout)
    );
}
