//! `ledger bench http`: N concurrent clients buying one hot product over
//! HTTP, through the whole API (authentication, rate limiting, idempotency
//! keys, the engine, the read models), with the load generator in the same
//! process on the same machine.
//!
//! Set-up is not measured: the product, accounts and deposits are appended
//! directly to the log, and users and sessions inserted directly (an argon2
//! login per client would take seconds of CPU and measure nothing about
//! purchases). Each client then buys with its own bearer token and a fresh
//! `Idempotency-Key` per purchase until the product sells out; an
//! `overloaded` answer is retried with the same key after a pause.
//! Afterwards the log is audited and the read models compared with what the
//! clients were told.
//!
//! `--external wrk` drives the same server with `wrk` (an external process,
//! on the same cores) instead of the in-process clients: a Lua script gives
//! each request one of the clients' tokens in turn and a fresh idempotency
//! key, and counts the answers. Either way, `lag` samples every 100 ms how
//! far the public progress and the other read models trail the log, and
//! how long they take to catch up after the storm.

use super::lag::{LagReport, LagSampler, LagTarget};
use super::{BenchBackend, BenchDatabase, Latency, histogram, progress, record};
use crate::server::auth::{Role, random_hex, sha256_hex};
use crate::server::{Limits, Server};
use anyhow::Context as _;
use domain::account::AccountEvent;
use domain::product::{ProductEvent, ProductTerms};
use domain::{AccountId, Amount, Currency, ProductId};
use engine::EngineSettings;
use engine::RequestContext;
use engine::aggregate::encode_all;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use store::{EventStore, StreamAppend};
use tokio::sync::Barrier;
use uuid::Uuid;

/// Pause before retrying a purchase answered `overloaded` or `conflict`.
const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// Most retries of one purchase before the client gives up on it.
const RETRIES_MAX: u32 = 1_000;
/// How long to wait for the read models to catch up afterwards.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Options of `ledger bench http`.
#[derive(Debug, Clone, clap::Args)]
pub struct HttpBenchOptions {
    /// Backend to measure, on a fresh, empty database.
    #[arg(long, value_enum, default_value = "sqlite")]
    pub backend: BenchBackend,
    /// PostgreSQL server to create the scratch database on (`--backend postgres`).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Concurrent clients, each with its own user, token and connection.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=20_000))]
    pub clients: u64,
    /// The product's quota, in minor units.
    #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(i64).range(1..=1_000_000_000_000))]
    pub quota: i64,
    /// Every purchase's amount, in minor units.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=1_000_000_000))]
    pub amount: i64,
    /// Most seconds the sale may run before the clients stop.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub seconds: u64,
    /// Purchases each client makes after the sell-out (each refused `sold_out`).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub rejections_per_client: u64,
    /// Nodes serving the API on one PostgreSQL database (`--backend
    /// postgres`): with N > 1 the sale runs twice in this run, on one node
    /// and then on N nodes (each a cluster member with its own listener,
    /// taking product leases and forwarding to the owner), the clients
    /// spread evenly over the nodes, as a load balancer would.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    pub nodes: u64,
    /// Load generator: the in-process clients, or `wrk` (must be on PATH;
    /// `scripts/bench-http-storm.sh` installs it), which then runs for
    /// `--seconds` whether or not the product sells out.
    #[arg(long, value_enum, default_value = "in-process")]
    pub external: Generator,
    /// `wrk`'s threads (`--external wrk`).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub wrk_threads: u64,
    /// Print one JSON object with the figures and checks instead of a table
    /// (with `--nodes` above 1: `{"benchmark":"http-nodes","runs":[...]}`).
    #[arg(long)]
    pub json: bool,
}

/// Where the purchase storm comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Generator {
    /// Tokio tasks in this process, each with its own reqwest connection.
    InProcess,
    /// `wrk` with a Lua script, as a child process.
    Wrk,
}

/// The figures and checks (`--json` prints exactly this).
#[derive(Debug, Serialize)]
pub struct HttpReport {
    /// Always `http`.
    pub benchmark: &'static str,
    /// Backend measured.
    pub backend: BenchBackend,
    /// Backend configuration.
    pub setup: &'static str,
    /// Where the load came from.
    pub generator: &'static str,
    /// Nodes serving the API (clients spread evenly over them).
    pub nodes: u64,
    /// Answers with a 5xx status (`503 overloaded` included).
    pub server_errors: u64,
    /// How far the read models trailed the log during and after the storm.
    pub lag: LagReport,
    /// Concurrent clients.
    pub clients: u64,
    /// Quota.
    pub quota: i64,
    /// Amount per purchase.
    pub amount: i64,
    /// Purchases answered 201.
    pub confirmed_purchases: u64,
    /// Seconds from the start to the sell-out (or the time limit).
    pub sale_seconds: f64,
    /// Whether the product sold out within the time limit.
    pub sold_out: bool,
    /// Confirmed purchases per second during the sale.
    pub confirmed_per_second: f64,
    /// Latency of a purchase answered 201 (including any retries); with
    /// `wrk`, of every request whatever its answer.
    pub purchase_latency: Latency,
    /// What `purchase_latency` measures.
    pub latency_of: &'static str,
    /// Latency of one HTTP request answered `sold_out` after the sell-out.
    pub rejection_latency: Latency,
    /// Those rejections per second.
    pub rejections_per_second: f64,
    /// Every answer by status and error code (`201`, `409 sold_out`, ...).
    pub answers: BTreeMap<String, u64>,
    /// What the checks found.
    pub checks: HttpChecks,
}

/// What was verified afterwards.
#[derive(Debug, Serialize)]
pub struct HttpChecks {
    /// Events audited.
    pub events_audited: u64,
    /// Confirmed units in the log.
    pub confirmed_in_log: i64,
    /// Pending units in the log.
    pub pending_in_log: i64,
    /// Available units in the log (quota less reserved and not released).
    pub available_in_log: i64,
    /// The most units ever reserved and not released at once, summed by the
    /// oracle from the raw events.
    pub held_peak_in_log: i64,
    /// Never more reserved and not released than the quota, at any position
    /// (the independent oracle, `engine::oracle`).
    pub never_oversold: bool,
    /// The log's confirmed units equal the sum of 201 answers (with `wrk`,
    /// which stops with a request in flight per connection: at least that
    /// sum and at most one purchase per connection more).
    pub confirmed_matches_answers: bool,
    /// Distinct order ids answered 201 equal the 201 answers (no purchase
    /// answered twice as two orders); `None` when the generator does not
    /// keep the answers' bodies (`wrk`).
    pub orders_distinct: Option<bool>,
    /// `GET /v1/products/{id}/progress` agrees with the log.
    pub progress_matches_log: bool,
    /// Every answer was a documented one (no 5xx but `overloaded`).
    pub no_server_errors: bool,
    /// Ledger invariant violations (empty when all hold).
    pub violations: Vec<String>,
    /// All of the above.
    pub ok: bool,
}

const PRODUCT: &str = "bench-http-hot";

/// Runs the benchmark (once, or on one node and then on `--nodes`) and
/// prints its report; fails if a check fails.
pub async fn run(options: HttpBenchOptions) -> anyhow::Result<ExitCode> {
    if options.amount > options.quota {
        anyhow::bail!("--amount must be at most --quota");
    }
    if options.nodes > 1 && options.external == Generator::Wrk {
        anyhow::bail!(
            "--external wrk drives one address; with --nodes above 1 use the in-process clients"
        );
    }
    if options.nodes == 1 {
        let report = measure(&options, 1).await?;
        if options.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print_table(&report);
        }
        return Ok(exit_code(report.checks.ok));
    }
    anyhow::ensure!(
        matches!(options.backend, BenchBackend::Postgres),
        "--nodes above 1 needs --backend postgres (nodes share one database)"
    );
    let mut runs = Vec::new();
    for nodes in [1, options.nodes] {
        let report = measure(&options, nodes).await?;
        if !options.json {
            print_table(&report);
        }
        runs.push(report);
    }
    if options.json {
        let all = serde_json::json!({ "benchmark": "http-nodes", "runs": runs });
        println!("{all}");
    } else {
        println!(
            "ledger bench http --nodes {}: nodes, confirmed/s, p99 of a 201, 5xx",
            options.nodes
        );
        for run in &runs {
            println!(
                "  {} node(s): {:.0} confirmed/s, p99 {:.1} ms, {} 5xx",
                run.nodes, run.confirmed_per_second, run.purchase_latency.p99_ms, run.server_errors
            );
        }
    }
    Ok(exit_code(runs.iter().all(|run| run.checks.ok)))
}

fn exit_code(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// One sale on a fresh database served by `nodes` nodes.
async fn measure(options: &HttpBenchOptions, nodes: u64) -> anyhow::Result<HttpReport> {
    let database = BenchDatabase::create(options.backend, options.database_url.as_deref()).await?;
    let backend = database.backend();
    let limits = Limits {
        rate_per_second: 1_000_000,
        rate_burst: 1_000_000,
        ..Limits::default()
    };
    let settings = EngineSettings {
        queue_max: usize::try_from(options.clients)?.max(10_000) * 2,
        ..EngineSettings::default()
    };
    let secret = random_hex(32);
    let mut servers = Vec::new();
    let mut addresses = Vec::new();
    let mut serving = Vec::new();
    for index in 0..nodes {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let cluster = crate::server::cluster::ClusterOptions {
            node_id: Some(format!("bench-node-{index}")),
            advertise_url: (nodes > 1).then(|| format!("http://{address}")),
            node_secret: (nodes > 1).then(|| secret.clone()),
            ..Default::default()
        };
        let server = Server::start_node(
            &backend,
            &store::LogLocation::Database,
            limits.clone(),
            settings.clone(),
            &cluster,
        )
        .await?;
        serving.push(tokio::spawn(crate::server::transport::serve(
            listener,
            server.router(),
            crate::server::transport::TransportLimits::default(),
            std::future::pending(),
        )));
        servers.push(server);
        addresses.push(address);
    }
    let tokens = set_up(&servers[0], options).await?;

    let address = addresses[0];
    let sampler = LagSampler::start(LagTarget {
        store: backend.open().await?,
        statuses: servers[0].state.statuses.clone(),
        progress_url: format!("http://{address}/v1/products/{PRODUCT}/progress"),
        product_stream: ProductId::parse(PRODUCT).expect("BUG: static id").stream(),
        amount: options.amount,
    });
    let outcome = match options.external {
        Generator::InProcess => drive(&addresses, tokens, options).await,
        Generator::Wrk => super::wrk::drive(address, PRODUCT, tokens, options).await,
    };
    let lag = sampler.finish().await?;
    let mut outcome = outcome?;
    if let (Some(seen), Generator::Wrk) = (lag.sold_out_seen_after_seconds, options.external) {
        // wrk runs its whole duration: the sale ended when the progress
        // first showed it sold out.
        outcome.sold_out = true;
        outcome.sale_time = outcome.sale_time.min(Duration::from_secs_f64(seen));
    }
    let checks = check(&servers[0], address, &outcome, options).await?;
    for task in serving {
        task.abort();
    }
    for server in servers {
        server.stop().await;
    }

    let sale_seconds = outcome.sale_time.as_secs_f64();
    let server_errors = outcome
        .answers
        .iter()
        .filter(|(label, _)| label.starts_with('5'))
        .map(|(_, count)| count)
        .sum();
    Ok(HttpReport {
        benchmark: "http",
        backend: options.backend,
        setup: database.describe(),
        generator: match options.external {
            Generator::InProcess => {
                "in-process reqwest clients, one keep-alive connection each, over loopback"
            }
            Generator::Wrk => {
                "wrk (external process), one keep-alive connection per client, tokens taken in turn, over loopback"
            }
        },
        lag,
        nodes,
        server_errors,
        clients: options.clients,
        quota: options.quota,
        amount: options.amount,
        confirmed_purchases: outcome.confirmed,
        sale_seconds,
        sold_out: outcome.sold_out,
        confirmed_per_second: outcome.confirmed as f64 / sale_seconds.max(1e-9),
        purchase_latency: outcome
            .request_latency
            .unwrap_or_else(|| Latency::of(&outcome.purchase_latency)),
        latency_of: if outcome.request_latency.is_some() {
            "request latency (wrk: every request, any answer, no retries)"
        } else {
            "purchase latency (201, with retries)"
        },
        rejection_latency: Latency::of(&outcome.rejection_latency),
        rejections_per_second: outcome.rejections as f64
            / outcome.rejection_time.as_secs_f64().max(1e-9),
        answers: outcome.answers,
        checks,
    })
}

/// Lists and opens the product, opens and funds one account per client,
/// and gives each client a user and a session; returns the tokens.
async fn set_up(server: &Server, options: &HttpBenchOptions) -> anyhow::Result<Vec<String>> {
    let store = server.state.store.clone();
    let product_id = ProductId::parse(PRODUCT).expect("BUG: static id");
    let terms = ProductTerms {
        name: "HTTP bench hot product".into(),
        currency: Currency::CNY,
        quota: Amount::new(options.quota)?,
        min_purchase: Amount::new(1)?,
        max_purchase: Amount::new(options.amount)?,
        annual_rate_bps: 450,
        term_days: 90,
    };
    let product = [
        ProductEvent::ProductListed {
            product_id: product_id.clone(),
            terms,
        },
        ProductEvent::SaleOpened {},
    ];
    let metadata =
        RequestContext::user("bench", Role::Operator.as_str(), None).metadata(None, None);
    store
        .append(
            &product_id.stream(),
            store::ExpectedVersion::NoStream,
            encode_all(&product, &metadata),
        )
        .await?;
    let password_hash = crate::server::auth::hash_password(random_hex(16)).await?;
    let now_ms = server.state.now_ms();
    let expires_ms = now_ms + 24 * 3_600_000;
    let funds = Amount::new(options.quota)?;
    let mut tokens = Vec::new();
    let indexes: Vec<u64> = (0..options.clients).collect();
    for chunk in indexes.chunks(1_000) {
        let mut appends = Vec::new();
        for &index in chunk {
            let account_id = AccountId(Uuid::now_v7());
            let events = [
                AccountEvent::AccountOpened {
                    account_id,
                    currency: Currency::CNY,
                },
                AccountEvent::FundsDeposited {
                    account_id,
                    amount: funds,
                    reference: "bench-funding".into(),
                },
            ];
            appends.push(StreamAppend {
                stream_id: account_id.stream(),
                expected: store::ExpectedVersion::NoStream,
                events: encode_all(&events, &metadata),
            });
            let user = crate::server::access::UserRow {
                user_id: Uuid::now_v7().to_string(),
                username: format!("bench-client-{index}"),
                password_hash: password_hash.clone(),
                role: Role::Customer.as_str().to_owned(),
                account_id: Some(account_id.to_string()),
            };
            anyhow::ensure!(
                server.state.access.insert_user(&user, now_ms).await?,
                "bench user {} exists",
                user.username
            );
            let token = random_hex(crate::server::auth::TOKEN_BYTES);
            server
                .state
                .access
                .insert_session(
                    &sha256_hex(token.as_bytes()),
                    &user.user_id,
                    now_ms,
                    expires_ms,
                )
                .await?;
            tokens.push(token);
        }
        store.append_batch(appends).await?;
    }
    Ok(tokens)
}

/// What the clients saw.
pub(super) struct Outcome {
    /// Purchases answered 201.
    pub(super) confirmed: u64,
    /// Units those answers confirmed.
    pub(super) confirmed_units: i64,
    /// The 201 answers' order ids and amounts, when the generator keeps them.
    pub(super) confirmed_orders: Option<Vec<(String, i64)>>,
    pub(super) sale_time: Duration,
    pub(super) sold_out: bool,
    pub(super) rejections: u64,
    pub(super) rejection_time: Duration,
    pub(super) purchase_latency: Histogram<u64>,
    /// The generator's own latency figures, when it keeps no histogram.
    pub(super) request_latency: Option<Latency>,
    pub(super) rejection_latency: Histogram<u64>,
    pub(super) answers: BTreeMap<String, u64>,
}

/// What one client saw.
struct ClientResult {
    confirmed_orders: Vec<(String, i64)>,
    rejections: u64,
    purchase_latency: Histogram<u64>,
    rejection_latency: Histogram<u64>,
    answers: BTreeMap<String, u64>,
}

/// One answer, reduced to what the benchmark counts.
struct Answer {
    label: String,
    order: Option<(String, i64)>,
    retry: bool,
    sold_out: bool,
}

async fn purchase(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    key: &str,
    amount: i64,
) -> Answer {
    let sent = client
        .post(url)
        .bearer_auth(token)
        .header("idempotency-key", key)
        .json(&serde_json::json!({ "amount": amount }))
        .send()
        .await;
    let response = match sent {
        Ok(response) => response,
        Err(error) => {
            let label = if error.is_timeout() {
                "timeout"
            } else {
                "transport error"
            };
            return Answer {
                label: label.into(),
                order: None,
                retry: true,
                sold_out: false,
            };
        }
    };
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    let code = body["error"].as_str().unwrap_or("");
    let label = if code.is_empty() {
        status.to_string()
    } else {
        format!("{status} {code}")
    };
    let order = (status == 201).then(|| {
        (
            body["order_id"].as_str().unwrap_or("").to_owned(),
            body["amount"].as_i64().unwrap_or(0),
        )
    });
    let retry = matches!(
        code,
        "overloaded" | "conflict" | "unavailable" | "timeout" | "rate_limited"
    );
    Answer {
        label,
        order,
        retry,
        sold_out: code == "sold_out" || code == "insufficient_quota",
    }
}

async fn drive(
    addresses: &[SocketAddr],
    tokens: Vec<String>,
    options: &HttpBenchOptions,
) -> anyhow::Result<Outcome> {
    let clients = tokens.len();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(60))
        .build()
        .context("building the HTTP client")?;
    let urls: Vec<String> = addresses
        .iter()
        .map(|address| format!("http://{address}/v1/products/{PRODUCT}/purchases"))
        .collect();
    let expected_sales = u64::try_from(options.quota / options.amount)?;
    let bar = progress(expected_sales, "http purchases".into(), options.json);
    let deadline = Instant::now() + Duration::from_secs(options.seconds);
    let sold_out = Arc::new(AtomicBool::new(false));
    let sale_ended = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let barrier = Arc::new(Barrier::new(clients));
    let started = Instant::now();
    let tasks: Vec<_> = tokens
        .into_iter()
        .enumerate()
        .map(|(index, token)| {
            // Client i talks to node i mod N: spread evenly, nothing sticky.
            let url = urls[index % urls.len()].clone();
            let (client, bar) = (client.clone(), bar.clone());
            let (sold_out, sale_ended, barrier) =
                (sold_out.clone(), sale_ended.clone(), barrier.clone());
            let amount = options.amount;
            let rejections_wanted = options.rejections_per_client;
            tokio::spawn(async move {
                let mut result = ClientResult {
                    confirmed_orders: Vec::new(),
                    rejections: 0,
                    purchase_latency: histogram(),
                    rejection_latency: histogram(),
                    answers: BTreeMap::new(),
                };
                barrier.wait().await;
                let mut sequence = 0u64;
                while !sold_out.load(Ordering::Relaxed) && Instant::now() < deadline {
                    sequence += 1;
                    let key = format!("c{index}-{sequence}");
                    let began = Instant::now();
                    for _ in 0..RETRIES_MAX {
                        let answer = purchase(&client, &url, &token, &key, amount).await;
                        *result.answers.entry(answer.label).or_default() += 1;
                        if let Some(order) = answer.order {
                            record(&mut result.purchase_latency, began.elapsed());
                            result.confirmed_orders.push(order);
                            bar.inc(1);
                        }
                        if answer.sold_out && !sold_out.swap(true, Ordering::Relaxed) {
                            *sale_ended.lock().expect("BUG: poisoned") = Some(Instant::now());
                        }
                        if !answer.retry || Instant::now() >= deadline {
                            break;
                        }
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                }
                for attempt in 0..rejections_wanted {
                    if !sold_out.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("c{index}-late-{attempt}");
                    let began = Instant::now();
                    let answer = purchase(&client, &url, &token, &key, amount).await;
                    if answer.sold_out {
                        record(&mut result.rejection_latency, began.elapsed());
                        result.rejections += 1;
                    }
                    *result.answers.entry(answer.label).or_default() += 1;
                }
                result
            })
        })
        .collect();
    let mut orders = Vec::new();
    let mut outcome = Outcome {
        confirmed: 0,
        confirmed_units: 0,
        confirmed_orders: None,
        sale_time: Duration::ZERO,
        sold_out: false,
        rejections: 0,
        rejection_time: Duration::ZERO,
        purchase_latency: histogram(),
        request_latency: None,
        rejection_latency: histogram(),
        answers: BTreeMap::new(),
    };
    for task in tasks {
        let result = task.await.context("a client task panicked")?;
        orders.extend(result.confirmed_orders);
        outcome.rejections += result.rejections;
        outcome.purchase_latency.add(&result.purchase_latency)?;
        outcome.rejection_latency.add(&result.rejection_latency)?;
        for (label, count) in result.answers {
            *outcome.answers.entry(label).or_default() += count;
        }
    }
    outcome.confirmed = orders.len() as u64;
    outcome.confirmed_units = orders.iter().map(|(_, amount)| amount).sum();
    outcome.confirmed_orders = Some(orders);
    let finished = Instant::now();
    bar.finish_and_clear();
    let ended = sale_ended
        .lock()
        .expect("BUG: poisoned")
        .unwrap_or(finished);
    outcome.sold_out = sold_out.load(Ordering::Relaxed);
    outcome.sale_time = ended - started;
    outcome.rejection_time = finished - ended;
    Ok(outcome)
}

async fn check(
    server: &Server,
    address: SocketAddr,
    outcome: &Outcome,
    options: &HttpBenchOptions,
) -> anyhow::Result<HttpChecks> {
    let store: &dyn EventStore = server.state.store.as_ref();
    let audit = engine::audit::audit(store).await?;
    let product_id = ProductId::parse(PRODUCT).expect("BUG: static id");
    let oracle = &audit.oracle;
    let quota = oracle.quota(&product_id);
    anyhow::ensure!(quota > 0, "the product vanished");
    let confirmed = oracle.confirmed(&product_id);
    let held = oracle.held(&product_id);
    let held_peak = oracle.held_peak(&product_id);
    let (pending, available) = (held - confirmed, quota - held);
    let answered = outcome.confirmed_units;
    let distinct: Option<std::collections::HashSet<&str>> = outcome
        .confirmed_orders
        .as_ref()
        .map(|orders| orders.iter().map(|(id, _)| id.as_str()).collect());
    // The read models catch up, then must agree with the log.
    let head = store.head().await?;
    let settle_deadline = Instant::now() + SETTLE_TIMEOUT;
    while server
        .state
        .statuses
        .report()
        .iter()
        .any(|r| r.position < head)
        && Instant::now() < settle_deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let progress: serde_json::Value =
        reqwest::get(format!("http://{address}/v1/products/{PRODUCT}/progress"))
            .await?
            .json()
            .await?;
    let progress_matches_log = progress["confirmed"].as_i64() == Some(confirmed)
        && progress["reserved"].as_i64() == Some(pending)
        && progress["available"].as_i64() == Some(available)
        && progress["orders"].as_i64() == Some(confirmed / options.amount);
    let no_server_errors = outcome
        .answers
        .keys()
        .all(|label| !label.starts_with('5') || label == "503 overloaded");
    let violations = audit.settled_violations();
    let never_oversold = held_peak <= quota && quota == options.quota;
    let confirmed_matches_answers = match outcome.confirmed_orders {
        Some(_) => confirmed == answered,
        // wrk stops at its deadline with up to one request in flight per
        // connection: the server may confirm those without wrk counting
        // the answer, never more.
        None => answered <= confirmed && confirmed <= answered + in_flight_max(options),
    };
    let orders_distinct = distinct.map(|distinct| distinct.len() as u64 == outcome.confirmed);
    Ok(HttpChecks {
        events_audited: audit.events,
        confirmed_in_log: confirmed,
        pending_in_log: pending,
        available_in_log: available,
        held_peak_in_log: held_peak,
        never_oversold,
        confirmed_matches_answers,
        orders_distinct,
        progress_matches_log,
        no_server_errors,
        ok: never_oversold
            && confirmed_matches_answers
            && orders_distinct != Some(false)
            && progress_matches_log
            && no_server_errors
            && violations.is_empty(),
        violations: violations
            .iter()
            .take(20)
            .map(ToString::to_string)
            .collect(),
    })
}

/// Units the purchases in flight when an external generator stops may
/// confirm unseen: one purchase per connection.
fn in_flight_max(options: &HttpBenchOptions) -> i64 {
    i64::try_from(options.clients).unwrap_or(i64::MAX) * options.amount
}

fn print_table(report: &HttpReport) {
    println!("ledger bench http");
    println!(
        "  setup: {:?} backend, {}; {} node(s); {} concurrent clients ({}); quota {} in purchases of {}",
        report.backend,
        report.setup,
        report.nodes,
        report.clients,
        report.generator,
        report.quota,
        report.amount
    );
    println!(
        "  confirmed purchases: {} in {:.2} s ({}) => {:.0} confirmed/s",
        report.confirmed_purchases,
        report.sale_seconds,
        if report.sold_out {
            "sold out"
        } else {
            "time limit"
        },
        report.confirmed_per_second
    );
    let l = report.purchase_latency;
    println!(
        "  {}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        report.latency_of, l.p50_ms, l.p99_ms, l.max_ms
    );
    let r = report.rejection_latency;
    println!(
        "  after the sell-out: {:.0} rejections/s, p50 {:.1} ms, p99 {:.1} ms",
        report.rejections_per_second, r.p50_ms, r.p99_ms
    );
    println!("  answers:");
    for (label, count) in &report.answers {
        println!("    {label:<28} {count}");
    }
    let lag = &report.lag;
    println!(
        "  lag (sampled every {} ms, {} samples, longest gap {:.0} ms): public progress at most {:.3} s behind the log ({} samples with an event >= 1 s old missing); other read models at most {} events behind",
        lag.period_ms,
        lag.samples_during_storm,
        lag.sample_gap_ms_max,
        lag.progress_lag_seconds_max,
        lag.progress_samples_over_bound,
        lag.read_model_lag_events_max
    );
    if lag.samples_failed > 0 {
        println!(
            "    {} samples failed, the last: {}",
            lag.samples_failed,
            lag.last_sample_error.as_deref().unwrap_or("")
        );
    }
    for (projection, seconds) in &lag.read_model_lag_seconds_max {
        println!("    {projection:<16} at most {seconds:.3} s behind the log");
    }
    println!(
        "  after the storm: head {}, slowest read model {} events behind; caught up in {}",
        lag.head_at_storm_end,
        lag.lag_events_at_storm_end,
        lag.catch_up_seconds
            .map_or("more than the limit".to_owned(), |s| format!("{s:.2} s"))
    );
    let c = &report.checks;
    println!(
        "  checks: {} events audited; confirmed {}, pending {}, available {}; peak reserved {}, \
         never oversold: {}; \
         confirmed = 201 answers: {}; distinct orders: {}; progress = log: {}; no 5xx: {}; \
         violations: {} => {}",
        c.events_audited,
        c.confirmed_in_log,
        c.pending_in_log,
        c.available_in_log,
        c.held_peak_in_log,
        c.never_oversold,
        c.confirmed_matches_answers,
        c.orders_distinct
            .map_or("not checked (wrk)".to_owned(), |d| d.to_string()),
        c.progress_matches_log,
        c.no_server_errors,
        c.violations.len(),
        if c.ok { "OK" } else { "FAILED" }
    );
    for violation in &c.violations {
        println!("    violation: {violation}");
    }
}
