//! Purchase storms: 1,000 concurrent HTTP buyers on one product while a
//! fault strikes, retrying every purchase with its idempotency key until it
//! gets a final answer. Afterwards the sale and the money must add up
//! exactly, and `ledger audit drift` must find nothing.

use crate::client::{self, HANG};
use crate::cluster::Cluster;
use crate::postgres;
use crate::report::Report;
use futures::StreamExt;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::RwLock;

const CUSTOMERS: usize = 100;
const BUYERS_PER_CUSTOMER: usize = 10;
const AMOUNT: i64 = 100;
/// 1,500 purchases.
const QUOTA: i64 = 150_000;
/// Confirmed purchases before the fault strikes.
const FAULT_AFTER: u64 = 300;
/// How long PostgreSQL stays down: longer than the nodes' request timeout,
/// so requests that arrive during the outage must be answered during it.
const OUTAGE: Duration = Duration::from_secs(8);
/// Bound on the whole storm.
const STORM_LIMIT: Duration = Duration::from_secs(180);

/// The `serve` arguments of every node in a storm: limits out of the way,
/// short reservations so those a crash strands expire during the scenario.
pub const SERVE_ARGS: &[&str] = &[
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
];

/// What strikes mid-storm.
pub enum Fault {
    /// `kill -9` of the only node, then a restart on the same data.
    KillAndRestart,
    /// `kill -9` of one node of three; its buyers move to the others.
    KillOneOfThree,
    /// PostgreSQL stopped for a few seconds and started again.
    RestartPostgres(postgres::Control),
    /// `kill -9` of the node owning the hot product's lease, of three
    /// cluster members; the load balancer drops it, another node takes over.
    KillOwner,
    /// SIGSTOP of the owning member until another node took the lease,
    /// then SIGCONT; the load balancer sends it traffic again, and it must
    /// decide nothing more (it finds its lease lost; an append it had in
    /// flight conflicts).
    StopOwner,
}

/// How long after losing its owner the hot product must have another
/// (the lease's time to live plus a second).
const TAKEOVER_MAX: Duration = Duration::from_secs(crate::cluster::LEASE_TTL.as_secs() + 1);

/// Waits until a node other than `old` holds the product's live lease;
/// answers how long that took (`None`: not within 10 s).
async fn takeover(cluster: &Cluster, old: usize, since: Instant) -> Option<Duration> {
    while since.elapsed() < Duration::from_secs(10) {
        if cluster
            .owner("storm")
            .await
            .is_some_and(|owner| owner != old)
        {
            return Some(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    None
}

/// A gauge of a node's `/metrics`.
async fn gauge(http: &reqwest::Client, base: &str, name: &str) -> Option<f64> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Every answer the buyers got, by kind.
#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    confirmed: AtomicU64,
    /// 409/503 with `Retry-After`: the same key again.
    retried: AtomicU64,
    /// No connection (a node down): the same key again.
    unreachable: AtomicU64,
    /// No answer within `HANG`.
    hung: AtomicU64,
    /// A key's reservation expired when a fault cut it off: next key.
    expired: AtomicU64,
    /// Answers to requests sent or answered while PostgreSQL was down, by
    /// status and error code.
    while_down: Mutex<BTreeMap<String, u64>>,
    /// 503s received while PostgreSQL was down.
    answered_503_down: AtomicU64,
    /// The slowest answer to a request sent or answered during the outage,
    /// in milliseconds.
    slowest_down_ms: AtomicU64,
    /// True while PostgreSQL is down.
    down: AtomicBool,
    sold_out: AtomicBool,
    /// Answers no buyer should ever get (5xx other than 503, unknown codes).
    unexpected: Mutex<Vec<String>>,
    /// Keys answered with two different orders.
    doubled: Mutex<Vec<String>>,
}

impl Tally {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn count(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Runs one storm on `cluster` with `fault`; `report` gets the figures.
pub async fn run(mut cluster: Cluster, nodes: usize, fault: Fault, report: &mut Report) {
    let http = client::http();
    let urls: Vec<String> = (0..nodes).map(|index| cluster.start(index)).collect();
    let (admin, customers) = prepare(&http, &urls[0]).await;
    let live = Arc::new(RwLock::new(urls));
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let buyers: Vec<_> = (0..CUSTOMERS * BUYERS_PER_CUSTOMER)
        .map(|index| {
            let token = customers[index % CUSTOMERS].1.clone();
            tokio::spawn(buyer(
                http.clone(),
                live.clone(),
                token,
                index,
                tally.clone(),
            ))
        })
        .collect();
    while Tally::count(&tally.confirmed) < FAULT_AFTER && started.elapsed() < STORM_LIMIT {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let at_fault = Tally::count(&tally.confirmed);
    // The stopped owner: its address, its product appends as sampled just
    // before the stop, and how many product appends reached the log between
    // that sample and the stop.
    let mut woken: Option<(String, f64, i64)> = None;
    let struck = match &fault {
        Fault::KillOwner | Fault::StopOwner => {
            let owner = cluster
                .owner("storm")
                .await
                .expect("a node owns the hot product");
            let url = live.read().await[owner].clone();
            let position_before = cluster.stream_position("storm").await;
            let appends_before = gauge(&http, &url, "ledger_engine_product_appends").await;
            let since = Instant::now();
            let stop = matches!(fault, Fault::StopOwner);
            if stop {
                cluster.signal(owner, "STOP");
            } else {
                cluster.kill(owner);
            }
            // Nobody else writes the product until the lease lapses (TTL):
            // what reaches the log now is the stopped owner's, up to the
            // append in flight at the stop.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let written_in_window = match position_before {
                Some(before) => cluster.appends_since("storm", before).await.unwrap_or(0),
                None => 0,
            };
            live.write().await.retain(|node| *node != url);
            let took = takeover(&cluster, owner, since).await;
            report.check(
                format!(
                    "another node took the hot product's lease within {}s (TTL + 1 s)",
                    TAKEOVER_MAX.as_secs()
                ),
                took.is_some_and(|took| took <= TAKEOVER_MAX),
                format!("taken over after {took:?}"),
            );
            if stop {
                // Stopped past its lease's end whatever the check found.
                let lapsed = since + crate::cluster::LEASE_TTL + Duration::from_millis(500);
                tokio::time::sleep_until(lapsed.into()).await;
                cluster.signal(owner, "CONT");
                live.write().await.push(url.clone());
                woken = Some((url, appends_before.unwrap_or(f64::NAN), written_in_window));
                format!(
                    "owner node {owner} of {nodes} stopped after {at_fault} confirmations, woken after {:.1}s",
                    since.elapsed().as_secs_f64()
                )
            } else {
                format!("owner node {owner} of {nodes} killed after {at_fault} confirmations")
            }
        }
        Fault::KillAndRestart => {
            cluster.kill(0);
            let url = cluster.start(0);
            *live.write().await = vec![url];
            format!("node killed and restarted after {at_fault} confirmations")
        }
        Fault::KillOneOfThree => {
            let victim = nodes - 1;
            cluster.kill(victim);
            live.write().await.remove(victim);
            format!("node {victim} of {nodes} killed after {at_fault} confirmations")
        }
        Fault::RestartPostgres(control) => {
            // "While down": from the moment the server has stopped until
            // it is told to start again.
            let stopped = control.stop();
            tally.down.store(true, Ordering::SeqCst);
            tokio::time::sleep(OUTAGE).await;
            tally.down.store(false, Ordering::SeqCst);
            drop(stopped);
            format!(
                "PostgreSQL down {}s after {at_fault} confirmations",
                OUTAGE.as_secs()
            )
        }
    };
    let mut keys: HashMap<String, String> = HashMap::new();
    for task in buyers {
        keys.extend(task.await.unwrap());
    }
    let storm_seconds = started.elapsed().as_secs_f64();
    let base = live.read().await[0].clone();
    report.outcome = format!(
        "{} buyers; {struck}; {} answered 201 in {storm_seconds:.1}s",
        CUSTOMERS * BUYERS_PER_CUSTOMER,
        keys.len()
    );
    answers_checks(&tally, &fault, report);
    if let Some((url, appends_before, written_in_window)) = woken {
        let lost = gauge(&http, &url, "ledger_engine_leases_lost").await;
        let appends = gauge(&http, &url, "ledger_engine_product_appends").await;
        let after_wake = appends.map(|appends| appends - appends_before);
        // Appends counted since the sample: those the log gained between
        // the position read and the stop, plus at most two more (the writer
        // appends one batch at a time): one committed before the position
        // read but counted after the gauge sample (two sources cannot be
        // read at one instant), and the one in flight at the stop, which
        // may commit only after waking. Nothing decided after waking.
        let allowed = (written_in_window + 2) as f64;
        report.check(
            "the stopped owner decided nothing after waking: it found its lease lost",
            lost.is_some_and(|lost| lost >= 1.0) && after_wake.is_some_and(|n| n <= allowed),
            format!(
                "leases lost {lost:?}; product appends since the sample before the stop {after_wake:?}, at most {allowed} (the log gained {written_in_window} product appends between the sample and the stop; 2 more: one straddling the two samples, one in flight at the stop)"
            ),
        );
    }
    let admin = if matches!(fault, Fault::KillAndRestart) {
        client::admin(&http, &base).await // Sessions survive; a fresh one is fine too.
    } else {
        admin
    };
    let checker = Checker {
        http: &http,
        base: &base,
        admin: &admin,
        requests: AtomicU64::new(0),
    };
    checker.sale(&keys, report).await;
    checker.money(&customers, report).await;
    report.requests = Tally::count(&tally.requests) + Tally::count(&checker.requests);
    cluster.kill_all();
    oracle(&cluster.audit().await, report);
    let (clean, printed) = cluster.drift();
    report.check(
        "`ledger audit drift`: read models = a fresh rebuild, trial balance holds",
        clean,
        printed.lines().last().unwrap_or_default(),
    );
}

/// The independent oracle over the raw log the nodes left: never more
/// reserved than the quota at any position, sold out exactly, and every
/// settled rule (one matching debit per confirmed order, every other debit
/// refunded, money taken = confirmed + refunded, no negative balance).
fn oracle(audit: &engine::audit::Audit, report: &mut Report) {
    let product_id = domain::ProductId::parse("storm").expect("BUG: static id");
    let oracle = &audit.oracle;
    let (peak, confirmed) = (oracle.held_peak(&product_id), oracle.confirmed(&product_id));
    report.check(
        "oracle: never oversold, at every position of the log",
        peak <= QUOTA,
        format!("at most {peak} reserved and not released, quota {QUOTA}"),
    );
    report.check(
        "oracle: confirmed in the log = quota",
        confirmed == QUOTA,
        format!("{confirmed} confirmed in {} events", audit.events),
    );
    let violations = audit.settled_violations();
    report.check(
        "oracle: every settled rule holds over the raw log",
        violations.is_empty(),
        format!(
            "{} violations{}",
            violations.len(),
            violations
                .first()
                .map(|v| format!(", first: {v}"))
                .unwrap_or_default()
        ),
    );
}

/// Reads what the checks need from a live node as the admin.
struct Checker<'a> {
    http: &'a reqwest::Client,
    base: &'a str,
    admin: &'a str,
    /// Requests the checks sent.
    requests: AtomicU64,
}

/// The product, open, and the customers, each with money for the whole
/// quota: answers the admin's token and every customer's account and token.
async fn prepare(http: &reqwest::Client, base: &str) -> (String, Vec<(String, String)>) {
    let admin = client::admin(http, base).await;
    let product = json!({"product_id": "storm", "name": "Storm", "quota": QUOTA,
        "min_purchase": 1, "max_purchase": AMOUNT, "annual_rate_bps": 300, "term_days": 30});
    client::open_product(http, base, &admin, product).await;
    let customers = futures::stream::iter(0..CUSTOMERS)
        .map(|index| {
            let (http, admin) = (http.clone(), admin.clone());
            async move {
                let name = format!("storm{index}");
                client::customer(&http, base, &admin, &name, "storm-password", QUOTA).await
            }
        })
        .buffered(20)
        .collect()
        .await;
    (admin, customers)
}

/// One buyer: purchases with fresh keys until sold out, retrying each key
/// through errors and faults until it gets a final answer. Answers the
/// orders it was answered 201 for, by key.
async fn buyer(
    http: reqwest::Client,
    live: Arc<RwLock<Vec<String>>>,
    token: String,
    buyer: usize,
    tally: Arc<Tally>,
) -> HashMap<String, String> {
    let mut bought: HashMap<String, String> = HashMap::new();
    let started = Instant::now();
    let mut sequence = 0;
    while !tally.sold_out.load(Ordering::Relaxed) && started.elapsed() < STORM_LIMIT {
        sequence += 1;
        let key = format!("b{buyer}-{sequence}");
        while started.elapsed() < STORM_LIMIT {
            let url = {
                let live = live.read().await;
                format!("{}/v1/products/storm/purchases", live[buyer % live.len()])
            };
            Tally::bump(&tally.requests);
            let down = tally.down.load(Ordering::SeqCst);
            let asked = Instant::now();
            let sent = http
                .post(url)
                .bearer_auth(&token)
                .header("idempotency-key", &key)
                .json(&json!({"amount": AMOUNT}))
                .send()
                .await;
            let response = match sent {
                Ok(response) => response,
                Err(error) => {
                    Tally::bump(if error.is_timeout() {
                        &tally.hung
                    } else {
                        &tally.unreachable
                    });
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let status = response.status().as_u16();
            let retry_after = response.headers().contains_key("retry-after");
            let body: Value = response.json().await.unwrap_or(Value::Null);
            let down_now = tally.down.load(Ordering::SeqCst);
            if down_now && status == 503 {
                Tally::bump(&tally.answered_503_down);
            }
            if down || down_now {
                let waited = asked.elapsed().as_millis() as u64;
                tally.slowest_down_ms.fetch_max(waited, Ordering::Relaxed);
                let answer = format!("{status} {}", body["error"].as_str().unwrap_or_default());
                *tally.while_down.lock().unwrap().entry(answer).or_default() += 1;
            }
            match (status, body["error"].as_str()) {
                (201, _) => {
                    let order = body["order_id"].as_str().unwrap_or_default().to_owned();
                    if let Some(earlier) = bought.insert(key.clone(), order.clone())
                        && earlier != order
                    {
                        tally.doubled.lock().unwrap().push(key.clone());
                    }
                    Tally::bump(&tally.confirmed);
                    break;
                }
                (409, Some("sold_out")) => {
                    tally.sold_out.store(true, Ordering::Relaxed);
                    break;
                }
                // Quota held by pending reservations: wait for them.
                (409, Some("insufficient_quota")) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
                // Still being decided, or the server is busy: same key again.
                (409 | 503, _) if retry_after => {
                    Tally::bump(&tally.retried);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // A definite "no" for this key (its reservation expired when
                // a fault cut it off before payment): next key.
                (409, Some("conflict")) => {
                    Tally::bump(&tally.expired);
                    break;
                }
                (other, _) => {
                    {
                        let mut unexpected = tally.unexpected.lock().unwrap();
                        if unexpected.len() < 1_000 {
                            unexpected.push(format!("{other} {body}"));
                        }
                    }
                    // The same key again: it is safe, and the fault may pass.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    bought
}

fn answers_checks(tally: &Tally, fault: &Fault, report: &mut Report) {
    report.check(
        "the product sold out",
        tally.sold_out.load(Ordering::Relaxed),
        format!("within {}s", STORM_LIMIT.as_secs()),
    );
    let unexpected = tally.unexpected.lock().unwrap();
    report.check(
        "no 5xx but 503, no unexpected answer",
        unexpected.is_empty(),
        format!(
            "{} unexpected{}",
            unexpected.len(),
            unexpected
                .first()
                .map(|first| format!(", first: {first}"))
                .unwrap_or_default()
        ),
    );
    report.check(
        "no request hung",
        Tally::count(&tally.hung) == 0,
        format!(
            "{} without an answer in {}s; {} retried on 409/503 + Retry-After, {} unreachable, {} expired by the fault",
            Tally::count(&tally.hung),
            HANG.as_secs(),
            Tally::count(&tally.retried),
            Tally::count(&tally.unreachable),
            Tally::count(&tally.expired)
        ),
    );
    let doubled = tally.doubled.lock().unwrap();
    report.check(
        "a retried key never bought twice",
        doubled.is_empty(),
        format!("{} keys answered two orders", doubled.len()),
    );
    if let Fault::RestartPostgres(_) = fault {
        let while_down = tally.while_down.lock().unwrap();
        let answers: Vec<String> = while_down
            .iter()
            .map(|(answer, count)| format!("{count} × {}", answer.trim()))
            .collect();
        report.check(
            "answered 503 while PostgreSQL was down, and recovered by itself",
            Tally::count(&tally.answered_503_down) > 0,
            format!(
                "{} answered 503 during the outage; answers sent or received during it: {}; the slowest took {:.1}s",
                Tally::count(&tally.answered_503_down),
                answers.join(", "),
                Tally::count(&tally.slowest_down_ms) as f64 / 1000.0
            ),
        );
    }
}

impl Checker<'_> {
    async fn get(&self, path: &str) -> Value {
        Tally::bump(&self.requests);
        let (status, body) = client::get(self.http, self.base, path, self.admin).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// The sale adds up once the read models catch up and stranded
    /// reservations expire.
    async fn sale(&self, keys: &HashMap<String, String>, report: &mut Report) {
        let purchases = QUOTA / AMOUNT;
        let mut progress = Value::Null;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            progress = self.get("/v1/products/storm/progress").await;
            if progress["reserved"] == 0 && progress["orders"] == purchases {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let figure = |name: &str| progress[name].as_i64().unwrap_or(-1);
        let (confirmed, reserved, available) =
            (figure("confirmed"), figure("reserved"), figure("available"));
        report.check(
            "progress shows the sale settled within 30 s: nothing available or reserved",
            available == 0 && reserved == 0,
            format!("confirmed {confirmed}, reserved {reserved}, available {available}"),
        );
        report.check(
            "no over- or under-booking: confirmed = quota, status sold_out",
            confirmed == QUOTA && progress["status"] == "sold_out",
            format!("confirmed {confirmed}, status {}", progress["status"]),
        );
        report.check(
            "pending reservations resolved after their expiry",
            reserved == 0,
            format!("reserved {reserved}"),
        );
        let orders: HashSet<&String> = keys.values().collect();
        report.check(
            "every 201 is a distinct order; 201s = confirmed orders",
            orders.len() == keys.len() && keys.len() as i64 == purchases,
            format!(
                "{} answers 201, {} distinct orders, {purchases} confirmed",
                keys.len(),
                orders.len()
            ),
        );
        let statuses: Vec<String> = futures::stream::iter(orders)
            .map(|order| async move {
                let body = self.get(&format!("/v1/orders/{order}")).await;
                body["status"].as_str().unwrap_or_default().to_owned()
            })
            .buffer_unordered(50)
            .collect()
            .await;
        let not_confirmed = statuses.iter().filter(|s| *s != "confirmed").count();
        report.check(
            "every order answered 201 is confirmed",
            not_confirmed == 0,
            format!(
                "{} looked up, {not_confirmed} not confirmed",
                statuses.len()
            ),
        );
    }

    /// Each customer paid exactly for what it was sold, nothing is held, and
    /// no balance is negative.
    async fn money(&self, customers: &[(String, String)], report: &mut Report) {
        // Money taken for an order released elsewhere (a stopped owner's
        // debit that landed after the new owner released the order) comes
        // back through the recovery sweep, within its grace and period:
        // wait for the balances to add up, with a deadline, before judging.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            let mut invested = 0;
            for (account, _) in customers {
                let balance = self.get(&format!("/v1/accounts/{account}")).await;
                invested += balance["total_invested"].as_i64().unwrap_or(i64::MIN / 2);
            }
            if invested == QUOTA {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let (mut invested_total, mut negative, mut unbalanced) = (0, 0, 0);
        for (account, _) in customers {
            let balance = self.get(&format!("/v1/accounts/{account}")).await;
            let figure = |name: &str| balance[name].as_i64().unwrap_or(i64::MIN);
            let (available, held, invested) = (
                figure("available"),
                figure("held"),
                figure("total_invested"),
            );
            negative += usize::from(available < 0 || held < 0 || invested < 0);
            unbalanced += usize::from(held != 0 || available + invested != QUOTA);
            invested_total += invested;
        }
        report.check(
            "no negative balance",
            negative == 0,
            format!("{negative} of {} accounts negative", customers.len()),
        );
        report.check(
            "every account: available + invested = deposited, held = 0",
            unbalanced == 0,
            format!("{unbalanced} of {} accounts off", customers.len()),
        );
        report.check(
            "money invested = quota confirmed",
            invested_total == QUOTA,
            format!("{invested_total} invested"),
        );
    }
}
