//! Payout storm: the same money scheduled under different labels from
//! every node at once (interest for a two-period term under three labels,
//! the principal under two), paid through `ledger fake-gateway` lying about
//! a third of its calls (hanging without paying, paying late, answering 5xx
//! after paying), with a node killed mid-run. The gateway's own record must
//! show exactly one payment per payout and, per holder, the principal once
//! and interest for at most the term, equal to what the ledger credited.

use crate::client;
use crate::cluster::Cluster;
use crate::process;
use crate::report::Report;
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const HOLDERS: usize = 20;
/// Interest labels, all asked for at once; the term holds two of them.
const PERIODS: [&str; 3] = ["2026-H2", "2027-H1", "2027-H1-settlement"];
/// Interest runs the term holds.
const RUNS: i64 = 2;
/// Principal labels, all asked for at once; the principal is paid once.
const MATURITIES: [&str; 2] = ["maturity", "bond-settlement"];
const RATE_BPS: i64 = 500;
const DAYS: i64 = 180;
/// Bound on waiting for every payout to settle.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);

/// The gateway's lies: 15% hang without paying, 5% hang then pay, 10%
/// pay then answer 500.
const GATEWAY_ARGS: &[&str] = &[
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
    "8",
];

/// Counts the scenario's requests.
struct Api {
    http: reqwest::Client,
    requests: AtomicU64,
}

impl Api {
    async fn get(&self, base: &str, path: &str, token: &str) -> Value {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let (status, body) = client::get(&self.http, base, path, token).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    async fn post(&self, base: &str, path: &str, token: &str, body: Value) -> (u16, Value) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        client::post(&self.http, base, path, token, body).await
    }
}

/// Runs the storm on `nodes` nodes of `cluster`; with one node it is
/// killed and started again, with more the first is killed for good.
pub async fn run(mut cluster: Cluster, nodes: usize, report: &mut Report) {
    let gateway = process::start(GATEWAY_ARGS, cluster.folder());
    cluster.add_args(&[
        "--gateway-url",
        &gateway.url,
        "--gateway-timeout",
        "400ms",
        "--payout-lease",
        "2s",
        "--payout-workers",
        "2",
        "--rate-limit",
        "100000",
        "--rate-burst",
        "100000",
    ]);
    let mut urls: Vec<String> = (0..nodes).map(|index| cluster.start(index)).collect();
    let api = Api {
        http: client::http(),
        requests: AtomicU64::new(0),
    };
    let admin = client::admin(&api.http, &urls[0]).await;
    let principals = holders(&api, &urls[0], &admin).await;

    // Every node schedules every label at once.
    let bodies: Vec<(&str, Value)> = PERIODS
        .iter()
        .map(|period| {
            let body = json!({"period": period, "kind": "interest", "days": DAYS});
            (*period, body)
        })
        .chain(MATURITIES.iter().map(|period| {
            let body = json!({"period": period, "kind": "principal"});
            (*period, body)
        }))
        .collect();
    let (api_ref, admin_ref, bodies_ref) = (&api, &admin, &bodies);
    let calls = urls.iter().flat_map(|base| {
        bodies_ref.iter().map(move |(period, body)| {
            let (api, admin) = (api_ref, admin_ref);
            async move {
                let (status, reply) = api
                    .post(base, "/v1/products/bond/payouts", admin, body.clone())
                    .await;
                let code = reply["error"].as_str().unwrap_or_default().to_owned();
                (
                    *period,
                    status,
                    code,
                    reply["scheduled"].as_u64().unwrap_or(0),
                )
            }
        })
    });
    let answers = futures::future::join_all(calls).await;
    let mut scheduled: HashMap<&str, u64> = HashMap::new();
    let mut refused = 0;
    for (period, status, code, count) in &answers {
        let interest = PERIODS.contains(period);
        match (*status, code.as_str()) {
            (202, _) => *scheduled.entry(period).or_default() += count,
            (409, "entitlement_exceeded") if interest => refused += 1,
            other => panic!("scheduling {period}: {other:?}"),
        }
    }
    let interest_created: u64 = PERIODS.iter().filter_map(|p| scheduled.get(p)).sum();
    let principal_created: u64 = MATURITIES.iter().filter_map(|p| scheduled.get(p)).sum();
    report.check(
        "the same money under many labels, from every node at once, was scheduled once",
        interest_created == RUNS as u64 * HOLDERS as u64
            && principal_created == HOLDERS as u64
            && refused > 0,
        format!(
            "{} calls; created per label: {scheduled:?}; {refused} refused as beyond the term; {HOLDERS} holders",
            answers.len()
        ),
    );

    // Kill a node once a quarter of the payouts are settled, with its
    // workers in the middle of paying the rest.
    let started = Instant::now();
    let total = HOLDERS * (RUNS as usize + 1);
    let mut at_kill = Vec::new();
    while started.elapsed() < SETTLE_LIMIT {
        at_kill = payouts(&api, &urls[0], &admin).await;
        if at_kill
            .iter()
            .filter(|p| p["status"] == "succeeded")
            .count()
            >= total / 4
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster.kill(0);
    let settled_at_kill = at_kill
        .iter()
        .filter(|p| p["status"] == "succeeded")
        .count();
    let struck = if nodes == 1 {
        urls[0] = cluster.start(0);
        "the node killed and restarted".to_owned()
    } else {
        urls.remove(0);
        format!("node 0 of {nodes} killed")
    };
    report.check(
        "the node was killed mid-run",
        at_kill.iter().any(|p| p["status"] != "scheduled") && settled_at_kill < total,
        format!("{settled_at_kill} of {total} payouts succeeded at the kill"),
    );

    let admin = client::admin(&api.http, &urls[0]).await;
    let mut listed = Vec::new();
    while started.elapsed() < SETTLE_LIMIT {
        listed = payouts(&api, &urls[0], &admin).await;
        if listed.len() == total && listed.iter().all(|p| p["status"] == "succeeded") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let succeeded = listed.iter().filter(|p| p["status"] == "succeeded").count();
    report.check(
        "every payout succeeded",
        succeeded == total && listed.len() == total,
        format!(
            "{succeeded} of {} listed succeeded, {total} expected, within {}s",
            listed.len(),
            SETTLE_LIMIT.as_secs()
        ),
    );
    let attempts: i64 = listed.iter().filter_map(|p| p["attempts"].as_i64()).sum();
    let holder_periods: BTreeSet<(String, String)> = listed
        .iter()
        .map(|p| (p["account_id"].to_string(), p["period"].to_string()))
        .collect();
    report.check(
        "one payout per holder per period",
        holder_periods.len() == listed.len(),
        format!(
            "{} payouts, {} (holder, period) pairs",
            listed.len(),
            holder_periods.len()
        ),
    );

    gateway_checks(&api, &gateway.url, &listed, &principals, report).await;
    credit_checks(&api, &urls[0], &admin, &principals, report).await;
    report.requests = api.requests.load(Ordering::Relaxed);
    report.outcome = format!(
        "{total} payouts ({HOLDERS} holders × {RUNS} interest runs + principal, {} labels) from {nodes} node(s); {struck} with {settled_at_kill} settled; {attempts} attempts; {}",
        PERIODS.len() + MATURITIES.len(),
        report.outcome
    );
    cluster.kill_all();
    let audit = cluster.audit().await;
    let violations = audit.settled_violations();
    report.check(
        "oracle over the raw log: no payout credited twice, no negative balance, postings balance",
        violations.is_empty(),
        format!(
            "{} events, {} violations{}",
            audit.events,
            violations.len(),
            violations
                .first()
                .map(|v| format!(", first: {v}"))
                .unwrap_or_default()
        ),
    );
    let (clean, printed) = cluster.drift();
    report.check(
        "`ledger audit drift`: read models = a fresh rebuild, trial balance holds",
        clean,
        printed.lines().last().unwrap_or_default(),
    );
}

/// Holders with confirmed orders in a closed product: answers each
/// holder's account and principal.
async fn holders(api: &Api, base: &str, admin: &str) -> Vec<(String, i64)> {
    let product = json!({"product_id": "bond", "name": "Bond", "quota": 100_000_000,
        "min_purchase": 1, "max_purchase": 10_000_000, "annual_rate_bps": RATE_BPS,
        "term_days": DAYS * RUNS});
    client::open_product(&api.http, base, admin, product).await;
    let mut holders = Vec::new();
    for index in 0..HOLDERS {
        let name = format!("investor{index}");
        let (account, token) = client::customer(
            &api.http,
            base,
            admin,
            &name,
            "investor-password",
            5_000_000,
        )
        .await;
        api.requests.fetch_add(4, Ordering::Relaxed);
        let amount = 10_000 + 99_991 * index as i64;
        let response = api
            .http
            .post(format!("{base}/v1/products/bond/purchases"))
            .bearer_auth(&token)
            .header("idempotency-key", "buy-1")
            .json(&json!({"amount": amount}))
            .send()
            .await
            .unwrap();
        api.requests.fetch_add(1, Ordering::Relaxed);
        assert_eq!(response.status().as_u16(), 201);
        holders.push((account, amount));
    }
    let (status, _) = api
        .post(base, "/v1/products/bond/close", admin, json!({}))
        .await;
    assert_eq!(status, 200);
    holders
}

async fn payouts(api: &Api, base: &str, admin: &str) -> Vec<Value> {
    let listed = api.get(base, "/v1/payouts?product_id=bond", admin).await;
    listed["payouts"].as_array().cloned().unwrap_or_default()
}

/// What a holder is owed in all: the principal and the term's interest
/// paid in `RUNS` runs, each rounded down.
fn owed(principal: i64) -> i64 {
    principal + RUNS * (principal * RATE_BPS * DAYS / 3_650_000)
}

/// The gateway's record: one succeeded payment per payout, of its amount;
/// per holder, what is owed and no more.
async fn gateway_checks(
    api: &Api,
    gateway: &str,
    listed: &[Value],
    principals: &[(String, i64)],
    report: &mut Report,
) {
    let record: Value = api
        .http
        .get(format!("{gateway}/payments"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let record = record["payments"].as_array().cloned().unwrap_or_default();
    let mut paid: HashMap<String, Vec<i64>> = HashMap::new();
    for payment in record.iter().filter(|p| p["status"] == "succeeded") {
        paid.entry(
            payment["idempotency_key"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
        .or_default()
        .push(payment["amount"].as_i64().unwrap_or_default());
    }
    let twice = paid.values().filter(|amounts| amounts.len() > 1).count();
    report.check(
        "the gateway paid each payout exactly once",
        twice == 0 && paid.len() == listed.len(),
        format!(
            "{} payments recorded, {} keys paid, {twice} paid more than once",
            record.len(),
            paid.len()
        ),
    );
    let wrong = listed
        .iter()
        .filter(|p| {
            let key = p["payout_id"].as_str().unwrap_or_default();
            paid.get(key).map(Vec::as_slice) != Some(&[p["amount"].as_i64().unwrap_or(-1)])
        })
        .count();
    report.check(
        "each payment equals its payout's amount",
        wrong == 0,
        format!("{wrong} payouts without a matching payment"),
    );
    let mut per_holder: HashMap<String, i64> = HashMap::new();
    for payment in record.iter().filter(|p| p["status"] == "succeeded") {
        *per_holder
            .entry(
                payment["account_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
            .or_default() += payment["amount"].as_i64().unwrap_or_default();
    }
    let beyond: Vec<String> = principals
        .iter()
        .filter(|(account, principal)| per_holder.get(account).copied() != Some(owed(*principal)))
        .map(|(account, principal)| {
            format!(
                "{account}: paid {:?}, owed {}",
                per_holder.get(account),
                owed(*principal)
            )
        })
        .collect();
    // The most interest the term allows, from the raw figures.
    let term_cap: i64 = principals
        .iter()
        .map(|(_, p)| p + p * RATE_BPS * DAYS * RUNS / 3_650_000)
        .sum();
    let paid_total: i64 = per_holder.values().sum();
    report.check(
        "per holder, the gateway paid the principal once and the term's interest, no more",
        beyond.is_empty() && paid_total <= term_cap,
        format!(
            "{} holders paid {paid_total} in all (term allows {term_cap}); off: {beyond:?}",
            per_holder.len()
        ),
    );
    report.outcome = format!("gateway recorded {} payments", record.len());
}

/// Each holder was credited its principal once and its floored interest
/// once per interest run.
async fn credit_checks(
    api: &Api,
    base: &str,
    admin: &str,
    principals: &[(String, i64)],
    report: &mut Report,
) {
    let mut off = Vec::new();
    for (account, principal) in principals {
        let expected = owed(*principal);
        let mut paid_out = Value::Null;
        // The read models may lag a moment behind the log.
        for _ in 0..100 {
            paid_out = api
                .get(base, &format!("/v1/accounts/{account}"), admin)
                .await["total_paid_out"]
                .clone();
            if paid_out == expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if paid_out != expected {
            off.push(format!("{account}: {paid_out} != {expected}"));
        }
    }
    report.check(
        "each holder credited its principal once and its interest once per run",
        off.is_empty(),
        format!("{} of {} holders off {off:?}", off.len(), principals.len()),
    );
}
