//! Crash in a storm (the first scenario of the fault suite): 1,000
//! concurrent HTTP buyers on one product against the real `ledger serve`,
//! which is killed with SIGKILL mid-storm and started again on the same
//! data; buyers retry with the same idempotency keys. Afterwards every
//! purchase answered 201 is a confirmed order, no key bought twice,
//! confirmed + reserved + available = quota, pending reservations left by
//! the crash resolved after their expiry, and `ledger audit drift` (read
//! models against a rebuild, trial balance) finds nothing.

mod process;

use process::Process;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::RwLock;

const CUSTOMERS: usize = 100;
const BUYERS_PER_CUSTOMER: usize = 10;
const AMOUNT: i64 = 100;
const QUOTA: i64 = 150_000; // 1,500 purchases
const STORM_LIMIT: Duration = Duration::from_secs(120);

fn serve(data_dir: &std::path::Path) -> Process {
    process::start(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--rate-limit",
            "1000000",
            "--rate-burst",
            "1000000",
            "--reservation-ttl",
            "3s",
            "--purchase-queue-max",
            "100000",
            "--request-timeout",
            "5s",
        ],
        data_dir,
    )
}

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = http.request(method, url).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn login(http: &reqwest::Client, base: &str, username: &str, password: &str) -> String {
    let (status, reply) = call(
        http,
        reqwest::Method::POST,
        format!("{base}/v1/auth/login"),
        "",
        Some(json!({"username": username, "password": password})),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    reply["token"].as_str().unwrap().to_owned()
}

/// The product and the customers (with money for the whole quota each).
async fn prepare(http: &reqwest::Client, base: &str) -> (String, Vec<(String, String)>) {
    let admin = login(http, base, "admin", "admin-password-1").await;
    let post = reqwest::Method::POST;
    let (status, _) = call(
        http,
        post.clone(),
        format!("{base}/v1/products"),
        &admin,
        Some(
            json!({"product_id": "storm", "name": "Storm", "quota": QUOTA, "min_purchase": 1,
                    "max_purchase": AMOUNT, "annual_rate_bps": 300, "term_days": 30}),
        ),
    )
    .await;
    assert_eq!(status, 201);
    let (status, _) = call(
        http,
        post.clone(),
        format!("{base}/v1/products/storm/open"),
        &admin,
        None,
    )
    .await;
    assert_eq!(status, 200);
    let customers = futures::future::join_all((0..CUSTOMERS).map(|index| {
        let (http, admin, base) = (http.clone(), admin.clone(), base.to_owned());
        async move {
            let name = format!("storm{index}");
            let (status, user) = call(
                &http,
                reqwest::Method::POST,
                format!("{base}/v1/users"),
                &admin,
                Some(json!({"username": name, "password": "storm-password", "role": "customer"})),
            )
            .await;
            assert_eq!(status, 201, "{user}");
            let account = user["account_id"].as_str().unwrap().to_owned();
            let (status, _) = call(
                &http,
                reqwest::Method::POST,
                format!("{base}/v1/accounts/{account}/deposits"),
                &admin,
                Some(json!({"amount": QUOTA, "reference": "storm-funding"})),
            )
            .await;
            assert_eq!(status, 201);
            (login(&http, &base, &name, "storm-password").await, account)
        }
    }))
    .await;
    (admin, customers)
}

/// One buyer: purchases with fresh keys until sold out, retrying each key
/// through errors and the crash until it gets a final answer.
async fn buyer(
    http: reqwest::Client,
    base: Arc<RwLock<String>>,
    token: String,
    buyer: usize,
    sold_out: Arc<AtomicBool>,
    confirmed: Arc<AtomicU64>,
) -> (HashMap<String, String>, u64) {
    let mut bought: HashMap<String, String> = HashMap::new();
    let mut requests = 0;
    let started = Instant::now();
    let mut sequence = 0;
    while !sold_out.load(Ordering::Relaxed) && started.elapsed() < STORM_LIMIT {
        sequence += 1;
        let key = format!("b{buyer}-{sequence}");
        loop {
            requests += 1;
            let url = format!("{}/v1/products/storm/purchases", base.read().await);
            let sent = http
                .post(url)
                .bearer_auth(&token)
                .header("idempotency-key", &key)
                .json(&json!({"amount": AMOUNT}))
                .send()
                .await;
            let Ok(response) = sent else {
                // The server is down: the same key again, shortly.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let status = response.status().as_u16();
            let retry_after = response.headers().contains_key("retry-after");
            let body: Value = response.json().await.unwrap_or(Value::Null);
            match (status, body["error"].as_str()) {
                (201, _) => {
                    let order = body["order_id"].as_str().unwrap().to_owned();
                    if let Some(earlier) = bought.insert(key.clone(), order.clone()) {
                        assert_eq!(earlier, order, "key {key} answered two orders");
                    }
                    confirmed.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                (409, Some("sold_out")) => {
                    sold_out.store(true, Ordering::Relaxed);
                    break;
                }
                // Quota held by pending reservations: wait for them.
                (409, Some("insufficient_quota")) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
                // Still being decided, or the server is busy: same key again.
                (409 | 503, _) if retry_after => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // A definite "no" for this key (its reservation expired when
                // the crash cut it off before payment): next key.
                (409, Some("conflict")) => break,
                (other, _) => panic!("unexpected answer {other}: {body}"),
            }
            if started.elapsed() > STORM_LIMIT {
                break;
            }
        }
    }
    (bought, requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_in_a_storm_loses_nothing_and_buys_nothing_twice() {
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().join("data");
    let first = serve(&data);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1_000)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let (_, customers) = prepare(&http, &first.url).await;
    let base = Arc::new(RwLock::new(first.url.clone()));
    let sold_out = Arc::new(AtomicBool::new(false));
    let confirmed = Arc::new(AtomicU64::new(0));
    let buyers: Vec<_> = (0..CUSTOMERS * BUYERS_PER_CUSTOMER)
        .map(|index| {
            let token = customers[index % CUSTOMERS].0.clone();
            tokio::spawn(buyer(
                http.clone(),
                base.clone(),
                token,
                index,
                sold_out.clone(),
                confirmed.clone(),
            ))
        })
        .collect();
    // Mid-storm: kill -9, then start again on the same data.
    while confirmed.load(Ordering::Relaxed) < 300 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(first);
    let at_crash = confirmed.load(Ordering::Relaxed);
    let second = serve(&data);
    *base.write().await = second.url.clone();
    let mut keys = HashMap::new();
    let mut requests = 0;
    for task in buyers {
        let (bought, made) = task.await.unwrap();
        requests += made;
        keys.extend(bought);
    }
    assert!(sold_out.load(Ordering::Relaxed), "the product sold out");
    eprintln!(
        "{} buyers, {requests} requests, {} purchases answered 201 ({at_crash} before the crash)",
        CUSTOMERS * BUYERS_PER_CUSTOMER,
        keys.len()
    );

    // The read models catch up; then the sale adds up.
    let admin = login(&http, &second.url, "admin", "admin-password-1").await;
    let get = reqwest::Method::GET;
    let mut progress = Value::Null;
    for _ in 0..200 {
        progress = call(
            &http,
            get.clone(),
            format!("{}/v1/products/storm/progress", second.url),
            &admin,
            None,
        )
        .await
        .1;
        if progress["status"] == "sold_out" && progress["orders"] == (QUOTA / AMOUNT) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(progress["status"], "sold_out", "{progress}");
    assert_eq!(progress["confirmed"], QUOTA);
    assert_eq!(progress["reserved"], 0, "pending reservations resolved");
    // Every 201 is a distinct confirmed order; no key bought twice.
    let orders: HashSet<&String> = keys.values().collect();
    assert_eq!(orders.len(), keys.len(), "two keys answered the same order");
    assert_eq!(
        keys.len() as i64,
        QUOTA / AMOUNT,
        "every confirmed order was answered 201"
    );
    for order in orders.iter().take(200) {
        let (status, body) = call(
            &http,
            get.clone(),
            format!("{}/v1/orders/{order}", second.url),
            &admin,
            None,
        )
        .await;
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("confirmed")),
            "{body}"
        );
    }
    // Money: what each account paid equals what it was answered.
    let mut spent_total = 0;
    for (_, account) in &customers {
        let (_, balance) = call(
            &http,
            get.clone(),
            format!("{}/v1/accounts/{account}", second.url),
            &admin,
            None,
        )
        .await;
        let available = balance["available"].as_i64().unwrap();
        assert!(available >= 0);
        assert_eq!(
            available + balance["total_invested"].as_i64().unwrap(),
            QUOTA,
            "{balance}"
        );
        assert_eq!(balance["held"], 0, "{balance}");
        spent_total += balance["total_invested"].as_i64().unwrap();
    }
    assert_eq!(spent_total, QUOTA);
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
        "drift or trial balance after the crash: {}",
        String::from_utf8_lossy(&drift.stdout)
    );
}
