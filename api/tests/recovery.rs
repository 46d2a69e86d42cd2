//! Recovery without traffic, against the real binary: a log left as a
//! `kill -9` leaves it (one order debited and not confirmed, one
//! reservation pending past its expiry, one order released after its money
//! was taken), then `ledger serve` restarted on it with no purchase sent.
//! Within the reservation TTL plus a margin the product shows nothing
//! pending, the paid order is confirmed, the other money is back with its
//! owners, and `ledger audit drift` is clean.
//!
//! The crash state is written with the domain's own deciders straight into
//! the log the stopped server used (exactly the events a crash between
//! those steps leaves), so the test does not depend on where a `kill -9`
//! happens to land.

mod process;

use chrono::Utc;
use domain::account::AccountEvent;
use domain::product::{ProductEvent, ReleaseReason};
use domain::{AccountId, Amount, ProductId};
use engine::RequestContext;
use engine::aggregate::encode_all;
use process::{ADMIN, Launch};
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};
use store::{Backend, EventStore, ExpectedVersion};

const PRODUCT: &str = "quiet-1";
const DEPOSIT: i64 = 100_000;
const AMOUNT: i64 = 10_000;
/// The reservation TTL the server runs with.
const TTL_SECONDS: u64 = 5;
/// How long recovery may take beyond the TTL.
const MARGIN: Duration = Duration::from_secs(20);

struct Client {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl Client {
    async fn login(url: &str) -> Client {
        let http = reqwest::Client::new();
        let reply: Value = http
            .post(format!("{url}/v1/auth/login"))
            .json(&json!({"username": ADMIN.0, "password": ADMIN.1}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        Client {
            http,
            url: url.to_owned(),
            token: reply["token"].as_str().expect("admin logs in").to_owned(),
        }
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let reply = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = reply.status();
        let body: Value = reply.json().await.unwrap();
        assert!(status.is_success(), "POST {path}: {status} {body}");
        body
    }

    async fn get(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

/// Lists and opens the product and makes three funded customers; returns
/// their account ids.
async fn set_up(client: &Client) -> Vec<AccountId> {
    client
        .post(
            "/v1/products",
            json!({"product_id": PRODUCT, "name": "Quiet", "quota": 1_000_000,
                   "min_purchase": 1, "max_purchase": 100_000,
                   "annual_rate_bps": 300, "term_days": 30}),
        )
        .await;
    client
        .post(&format!("/v1/products/{PRODUCT}/open"), json!({}))
        .await;
    let mut accounts = Vec::new();
    for name in ["paid", "unpaid", "released"] {
        let user = client
            .post(
                "/v1/users",
                json!({"username": name, "password": "customer-password-1", "role": "customer"}),
            )
            .await;
        let account = user["account_id"].as_str().unwrap().to_owned();
        client
            .post(
                &format!("/v1/accounts/{account}/deposits"),
                json!({"amount": DEPOSIT, "reference": format!("dep-{name}")}),
            )
            .await;
        accounts.push(AccountId(account.parse().unwrap()));
    }
    accounts
}

/// Writes what a crash leaves: `paid` reserved and debited (no
/// confirmation), `unpaid` reserved and past its expiry, `released`
/// reserved, debited, then released (no refund).
async fn leave_crash_state(store: &dyn EventStore, accounts: &[AccountId]) -> Vec<String> {
    let product_id = ProductId::parse(PRODUCT).unwrap();
    let now = Utc::now();
    let amount = Amount::new(AMOUNT).unwrap();
    let context = RequestContext::system();
    let orders: Vec<_> = ["paid", "unpaid", "released"]
        .iter()
        .zip(accounts)
        .map(|(key, account)| (engine::order_id_for(&product_id, *account, key), *account))
        .collect();
    let expiry = [
        now + chrono::Duration::seconds(TTL_SECONDS as i64),
        now - chrono::Duration::seconds(1),
        now + chrono::Duration::seconds(TTL_SECONDS as i64),
    ];
    let mut product_events = Vec::new();
    for ((order_id, account_id), expires_at) in orders.iter().zip(expiry) {
        product_events.push(ProductEvent::QuotaReserved {
            order_id: *order_id,
            account_id: *account_id,
            amount,
            expires_at,
        });
    }
    product_events.push(ProductEvent::ReservationReleased {
        order_id: orders[2].0,
        account_id: orders[2].1,
        amount,
        reason: ReleaseReason::Cancelled,
    });
    let stream = product_id.stream();
    let version = store.read_stream(&stream, 0, 1_000).await.unwrap().len() as i64;
    store
        .append(
            &stream,
            ExpectedVersion::Exact(version),
            encode_all(&product_events, &context.metadata(None, None)),
        )
        .await
        .unwrap();
    for (order_id, account_id) in [orders[0], orders[2]] {
        let debited = AccountEvent::PurchaseDebited {
            account_id,
            order_id,
            product_id: product_id.clone(),
            amount,
        };
        let stream = account_id.stream();
        let version = store.read_stream(&stream, 0, 1_000).await.unwrap().len() as i64;
        store
            .append(
                &stream,
                ExpectedVersion::Exact(version),
                encode_all(&[debited], &context.metadata(Some(order_id.0), None)),
            )
            .await
            .unwrap();
    }
    orders.iter().map(|(id, _)| id.to_string()).collect()
}

fn serve(data_dir: &Path, database_url: Option<&str>) -> process::Process {
    let ttl = format!("{TTL_SECONDS}s");
    process::launch(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--reservation-ttl",
            &ttl,
            "--recovery-period",
            "1s",
        ],
        data_dir,
        &Launch {
            database_url,
            ..Launch::default()
        },
    )
}

async fn recovers_a_quiet_product(database_url: Option<&str>) {
    let folder = tempfile::tempdir().unwrap();
    let accounts = {
        let server = serve(folder.path(), database_url);
        let client = Client::login(&server.url).await;
        set_up(&client).await
        // Dropping the process kills it (SIGKILL).
    };
    let backend = Backend::choose(database_url, folder.path());
    let orders = {
        let store = backend.open().await.unwrap();
        leave_crash_state(store.as_ref(), &accounts).await
    };
    let server = serve(folder.path(), database_url);
    let client = Client::login(&server.url).await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(TTL_SECONDS) + MARGIN;
    let settled = loop {
        let progress = client
            .get(&format!("/v1/products/{PRODUCT}/progress"))
            .await;
        let mut statuses = Vec::new();
        for order in &orders {
            statuses.push(client.get(&format!("/v1/orders/{order}")).await["status"].clone());
        }
        let mut available = Vec::new();
        for account in &accounts {
            available
                .push(client.get(&format!("/v1/accounts/{account}")).await["available"].clone());
        }
        let done = progress["reserved"] == 0
            && statuses == [json!("confirmed"), json!("released"), json!("refunded")]
            && available == [json!(DEPOSIT - AMOUNT), json!(DEPOSIT), json!(DEPOSIT)];
        if done {
            break (progress, statuses, available);
        }
        assert!(
            Instant::now() < deadline,
            "no recovery within the TTL plus {MARGIN:?}, with no traffic: progress {progress}, orders {statuses:?}, available {available:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "recovered in {:?} with no purchase sent: {settled:?}",
        started.elapsed()
    );
    assert_eq!(settled.0["confirmed"], AMOUNT);
    drop(server);
    let mut drift = std::process::Command::new(env!("CARGO_BIN_EXE_ledger"));
    drift
        .args(["audit", "drift"])
        .env_remove("DATABASE_URL")
        .env("LEDGER_DATA_DIR", folder.path())
        .env("RUST_LOG", "warn");
    if let Some(url) = database_url {
        drift.env("DATABASE_URL", url);
    }
    let output = drift.output().unwrap();
    assert!(
        output.status.success(),
        "drift after recovery: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_product_is_recovered_without_traffic_on_sqlite() {
    recovers_a_quiet_product(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_product_is_recovered_without_traffic_on_postgres() {
    let Ok(admin_url) = std::env::var("DATABASE_URL") else {
        eprintln!(
            "skipped a_quiet_product_is_recovered_without_traffic_on_postgres: DATABASE_URL is not set"
        );
        return;
    };
    let scratch = store::scratch::ScratchPostgres::create(&admin_url, "ledger_recovery")
        .await
        .unwrap();
    recovers_a_quiet_product(Some(&scratch.url)).await;
}
