//! `ledger bench attack`: honest buyers buy a hot product over HTTP from
//! 127.0.0.1, once undisturbed and once while attackers on the same machine,
//! from their own loopback addresses (127.0.0.2 and up), run slowloris
//! (half-open connections), a login flood with wrong passwords, a
//! random-token flood and a made-up-product flood, each at a stated rate.
//!
//! The server is the real `ledger serve`, started as a child process with
//! its default limits, so its peak RSS and open file descriptors are its
//! own (read from `/proc`). Set-up goes through the API like a client's.
//! Afterwards: each product's quota is conserved, confirmed units equal
//! the 201 answers, the hash chain verifies, and `ledger audit drift` finds
//! the read models equal to a rebuild with a balanced trial balance.

use super::{BenchBackend, BenchDatabase, Latency, histogram, record};
use anyhow::Context as _;
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Mutex;

/// The bootstrap admin of the server under test.
const ADMIN: (&str, &str) = ("admin", "attack-bench-admin-password");
/// Pause before an honest client retries an answer that decided nothing.
const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// How often the server's memory and descriptors are sampled.
const SAMPLE_PERIOD: Duration = Duration::from_millis(100);
/// Set-up requests in flight at once (each user costs two argon2 hashes).
const SET_UP_CONCURRENCY: usize = 4;
/// Workers per attacking address for each request flood.
const FLOOD_WORKERS_PER_ADDRESS: u32 = 4;
/// How long slowloris and the floods run before the honest sale starts.
const ATTACK_WARM_UP: Duration = Duration::from_secs(2);
/// Beyond the server's header read timeout, how long the attack runs at
/// least, so every slow connection opened in its first second has had the
/// time to be cut off, however fast the honest sale under fire sold out.
const ATTACK_MARGIN: Duration = Duration::from_secs(4);
/// How long to wait for the read models to show every confirmation.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Options of `ledger bench attack`.
#[derive(Debug, Clone, clap::Args)]
pub struct AttackOptions {
    /// Backend to run on, on a fresh, empty database.
    #[arg(long, value_enum, default_value = "sqlite")]
    pub backend: BenchBackend,
    /// PostgreSQL server to create the scratch database on (`--backend postgres`).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Honest buyers, each with its own user, token and connection (from 127.0.0.1).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=2_000))]
    pub clients: u64,
    /// Each product's quota, in minor units (one product per phase).
    #[arg(long, default_value_t = 4_000_000, value_parser = clap::value_parser!(i64).range(1..=1_000_000_000_000))]
    pub quota: i64,
    /// Every honest purchase's amount, in minor units.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=1_000_000_000))]
    pub amount: i64,
    /// Most seconds each phase's sale may run.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub seconds: u64,
    /// Slowloris connections held half-open (headers never finished).
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(0..=20_000))]
    pub slowloris: u64,
    /// Logins with wrong passwords per second.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub login_rate: u64,
    /// Requests with random bearer tokens per second.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub token_rate: u64,
    /// Purchases of made-up products per second (by an attacker's own
    /// customer account).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub product_rate: u64,
    /// Loopback addresses the attackers use (127.0.0.2 and up).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u8).range(1..=200))]
    pub attack_addresses: u8,
    /// The server's peak resident memory must stay under this (MiB).
    #[arg(long, default_value_t = 512)]
    pub rss_bound_mib: u64,
    /// Print one JSON object with the figures and checks instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// What the honest buyers saw in one phase.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    /// Purchases answered 201.
    pub confirmed: u64,
    /// Seconds until the sell-out (or the time limit).
    pub seconds: f64,
    /// Whether the product sold out in time.
    pub sold_out: bool,
    /// Confirmed purchases per second.
    pub confirmed_per_second: f64,
    /// Latency of every honest request.
    pub latency: Latency,
    /// Honest requests sent.
    pub requests: u64,
    /// Honest requests answered with anything but 201, `sold_out` or
    /// `insufficient_quota` (or not answered).
    pub failed: u64,
    /// `failed / requests`.
    pub error_rate: f64,
    /// Every honest answer by status and code.
    pub answers: BTreeMap<String, u64>,
    /// The server's peak resident memory during the phase (MiB).
    pub server_rss_peak_mib: f64,
    /// The server's most open file descriptors during the phase.
    pub server_fds_peak: u64,
}

/// What the attackers sent and got.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AttackReport {
    /// Half-open connections the server closed (each was then reopened).
    pub slowloris_cut_off: u64,
    /// Half-open connections opened in all.
    pub slowloris_opened: u64,
    /// Answers to the login flood, by status.
    pub login_answers: BTreeMap<String, u64>,
    /// Answers to the random-token flood, by status.
    pub token_answers: BTreeMap<String, u64>,
    /// Answers to the made-up-product flood, by status.
    pub product_answers: BTreeMap<String, u64>,
}

/// The figures and checks (`--json` prints exactly this).
#[derive(Debug, Serialize)]
pub struct AttackBenchReport {
    /// Always `attack`.
    pub benchmark: &'static str,
    /// Backend measured.
    pub backend: BenchBackend,
    /// Backend configuration.
    pub setup: &'static str,
    /// The options, as run.
    pub clients: u64,
    /// Quota per product.
    pub quota: i64,
    /// Amount per purchase.
    pub amount: i64,
    /// Attack rates and sizes.
    pub attack: Value,
    /// Without the attack.
    pub baseline: PhaseReport,
    /// Under the attack.
    pub under_attack: PhaseReport,
    /// What the attackers saw.
    pub attackers: AttackReport,
    /// Under attack ÷ baseline, confirmed per second (target ≥ 0.7).
    pub throughput_ratio: f64,
    /// Under attack ÷ baseline, p99 latency (target ≤ 2).
    pub p99_ratio: f64,
    /// Whether both timing targets were met (reported, not enforced).
    pub timing_targets_met: bool,
    /// The memory bound (MiB).
    pub rss_bound_mib: u64,
    /// What the checks found.
    pub checks: AttackChecks,
}

/// What was verified.
#[derive(Debug, Serialize)]
pub struct AttackChecks {
    /// No honest request failed for a reason but sold out.
    pub no_honest_failures: bool,
    /// The server's peak RSS stayed under the bound.
    pub rss_within_bound: bool,
    /// Each product: confirmed + reserved + available = quota, and
    /// confirmed = the sum of 201 answers.
    pub quotas_conserved: bool,
    /// `POST /v1/audit/verify` found the hash chain intact.
    pub chain_verified: bool,
    /// `ledger audit drift` found no difference and a balanced ledger.
    pub drift_clean: bool,
    /// Every check above.
    pub ok: bool,
}

/// The server under test.
struct Target {
    child: tokio::process::Child,
    base: String,
    address: SocketAddr,
}

/// Runs the benchmark and prints its report; fails if a check fails.
pub async fn run(options: AttackOptions) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        options.amount <= options.quota,
        "--amount must be at most --quota"
    );
    let database = BenchDatabase::create(options.backend, options.database_url.as_deref()).await?;
    let mut target = start_server(&database).await?;
    let http = client(None)?;
    let admin = login(&http, &target.base, ADMIN.0, ADMIN.1).await?;
    let (tokens, usernames) = honest_users(&http, &target.base, &admin, &options).await?;
    let (_, attacker) = customer(&http, &target.base, &admin, "mallory", 1_000, "attacker").await?;
    for product in ["attack-baseline", "attack-under-fire"] {
        open_product(&http, &target.base, &admin, product, &options).await?;
    }
    let pid = target.child.id().context("the server has no pid")?;
    let baseline = phase(&target.base, &tokens, "attack-baseline", &options, pid).await?;
    let attack = Attack::start(&target, &options, usernames, attacker);
    let attack_started = tokio::time::Instant::now();
    tokio::time::sleep(ATTACK_WARM_UP).await;
    let under_attack = phase(&target.base, &tokens, "attack-under-fire", &options, pid).await?;
    // The server runs with its default limits.
    let header_read_timeout =
        crate::server::transport::TransportLimits::default().header_read_timeout;
    tokio::time::sleep_until(attack_started + header_read_timeout + ATTACK_MARGIN).await;
    let attackers = attack.stop().await;
    let quotas_conserved = conserved(&http, &target.base, "attack-baseline", &baseline, &options)
        .await?
        && conserved(
            &http,
            &target.base,
            "attack-under-fire",
            &under_attack,
            &options,
        )
        .await?;
    let chain_verified = verify_chain(&http, &target.base, &admin).await?;
    target.child.start_kill()?;
    target.child.wait().await?;
    let drift_clean = drift_clean(&database).await?;
    let rss_peak = baseline
        .server_rss_peak_mib
        .max(under_attack.server_rss_peak_mib);
    let throughput_ratio =
        under_attack.confirmed_per_second / baseline.confirmed_per_second.max(1e-9);
    let p99_ratio = under_attack.latency.p99_ms / baseline.latency.p99_ms.max(1e-9);
    let checks = AttackChecks {
        no_honest_failures: baseline.failed == 0 && under_attack.failed == 0,
        rss_within_bound: rss_peak <= options.rss_bound_mib as f64,
        quotas_conserved,
        chain_verified,
        drift_clean,
        ok: false,
    };
    let ok = checks.no_honest_failures
        && checks.rss_within_bound
        && checks.quotas_conserved
        && checks.chain_verified
        && checks.drift_clean;
    let report = AttackBenchReport {
        benchmark: "attack",
        backend: options.backend,
        setup: database.describe(),
        clients: options.clients,
        quota: options.quota,
        amount: options.amount,
        attack: json!({
            "slowloris_connections": options.slowloris,
            "login_per_second": options.login_rate,
            "random_token_per_second": options.token_rate,
            "made_up_product_per_second": options.product_rate,
            "addresses": options.attack_addresses,
        }),
        baseline,
        under_attack,
        attackers,
        throughput_ratio,
        p99_ratio,
        timing_targets_met: throughput_ratio >= 0.7 && p99_ratio <= 2.0,
        rss_bound_mib: options.rss_bound_mib,
        checks: AttackChecks { ok, ..checks },
    };
    if options.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Starts `ledger serve` (this binary) on the database, with its default
/// limits, and reads the address it prints.
async fn start_server(database: &BenchDatabase) -> anyhow::Result<Target> {
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    command
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env_remove("DATABASE_URL")
        .env("LEDGER_ADMIN_USER", ADMIN.0)
        .env("LEDGER_ADMIN_PASSWORD", ADMIN.1)
        .env("RUST_LOG", "error")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    match database {
        BenchDatabase::Sqlite(folder) => command.arg("--data-dir").arg(folder.path()),
        BenchDatabase::Postgres(scratch) => command.arg("--database-url").arg(&scratch.url),
    };
    let mut child = command.spawn().context("starting ledger serve")?;
    let stdout = child.stdout.take().context("no standard output")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(line) = lines.next_line().await? {
            if line.starts_with("ledger serving on http://") {
                return Ok(line);
            }
        }
        anyhow::bail!("ledger serve ended before serving")
    })
    .await
    .context("ledger serve did not start in time")??;
    let address: SocketAddr = line["ledger serving on http://".len()..]
        .split_whitespace()
        .next()
        .context("no address")?
        .parse()?;
    // Keep reading its output so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Target {
        child,
        base: format!("http://{address}"),
        address,
    })
}

/// An HTTP client, from `local` if given.
fn client(local: Option<IpAddr>) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .local_address(local)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(60))
        .build()
        .context("building an HTTP client")
}

async fn send(request: reqwest::RequestBuilder) -> (u16, Value) {
    match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.json().await.unwrap_or_default())
        }
        Err(_) => (0, Value::Null),
    }
}

async fn login(
    http: &reqwest::Client,
    base: &str,
    username: &str,
    password: &str,
) -> anyhow::Result<String> {
    for _ in 0..100 {
        let (status, body) = send(
            http.post(format!("{base}/v1/auth/login"))
                .json(&json!({"username": username, "password": password})),
        )
        .await;
        match status {
            200 => return Ok(body["token"].as_str().unwrap_or_default().to_owned()),
            503 | 429 => tokio::time::sleep(Duration::from_millis(200)).await,
            _ => anyhow::bail!("login {username}: {status} {body}"),
        }
    }
    anyhow::bail!("login {username}: still refused")
}

/// A funded customer and their token.
async fn customer(
    http: &reqwest::Client,
    base: &str,
    admin: &str,
    username: &str,
    funds: i64,
    password: &str,
) -> anyhow::Result<(String, String)> {
    let password = format!("{password}-{username}-password");
    let (status, user) = send(
        http.post(format!("{base}/v1/users"))
            .bearer_auth(admin)
            .json(&json!({"username": username, "password": password, "role": "customer"})),
    )
    .await;
    anyhow::ensure!(status == 201, "creating {username}: {status} {user}");
    let account = user["account_id"].as_str().unwrap_or_default().to_owned();
    let (status, reply) = send(
        http.post(format!("{base}/v1/accounts/{account}/deposits"))
            .bearer_auth(admin)
            .json(&json!({"amount": funds, "reference": "attack-bench"})),
    )
    .await;
    anyhow::ensure!(status == 201, "funding {username}: {status} {reply}");
    Ok((account, login(http, base, username, &password).await?))
}

async fn honest_users(
    http: &reqwest::Client,
    base: &str,
    admin: &str,
    options: &AttackOptions,
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let usernames: Vec<String> = (0..options.clients)
        .map(|index| format!("honest-{index}"))
        .collect();
    let tokens = futures::stream::iter(usernames.clone())
        .map(|username| async move {
            customer(http, base, admin, &username, options.quota, "honest")
                .await
                .map(|(_, token)| token)
        })
        .buffered(SET_UP_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<String>>>()?;
    Ok((tokens, usernames))
}

async fn open_product(
    http: &reqwest::Client,
    base: &str,
    admin: &str,
    product: &str,
    options: &AttackOptions,
) -> anyhow::Result<()> {
    let body = json!({"product_id": product, "name": product, "quota": options.quota,
        "min_purchase": 1, "max_purchase": options.amount, "annual_rate_bps": 450, "term_days": 90});
    let (status, reply) = send(
        http.post(format!("{base}/v1/products"))
            .bearer_auth(admin)
            .json(&body),
    )
    .await;
    anyhow::ensure!(status == 201, "listing {product}: {status} {reply}");
    let (status, reply) = send(
        http.post(format!("{base}/v1/products/{product}/open"))
            .bearer_auth(admin),
    )
    .await;
    anyhow::ensure!(status == 200, "opening {product}: {status} {reply}");
    Ok(())
}

/// What one honest client saw.
struct Seen {
    confirmed: u64,
    confirmed_amount: i64,
    requests: u64,
    failed: u64,
    latency: Histogram<u64>,
    answers: BTreeMap<String, u64>,
}

/// One sale: every honest client buys until the product sells out.
async fn phase(
    base: &str,
    tokens: &[String],
    product: &str,
    options: &AttackOptions,
    pid: u32,
) -> anyhow::Result<PhaseReport> {
    let http = client(Some(IpAddr::V4(Ipv4Addr::LOCALHOST)))?;
    let url = format!("{base}/v1/products/{product}/purchases");
    let sold_out = Arc::new(AtomicBool::new(false));
    let ended = Arc::new(Mutex::new(None::<Instant>));
    let deadline = Instant::now() + Duration::from_secs(options.seconds);
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = tokio::spawn(sample(pid, sampling.clone()));
    let started = Instant::now();
    let buyers: Vec<_> = tokens
        .iter()
        .enumerate()
        .map(|(index, token)| {
            let (http, url, token) = (http.clone(), url.clone(), token.clone());
            let key_prefix = format!("{product}-c{index}");
            let (sold_out, ended, amount) = (sold_out.clone(), ended.clone(), options.amount);
            tokio::spawn(async move {
                buy_until_sold_out(
                    &http,
                    &url,
                    &token,
                    &key_prefix,
                    amount,
                    &sold_out,
                    &ended,
                    deadline,
                )
                .await
            })
        })
        .collect();
    let mut total = Seen {
        confirmed: 0,
        confirmed_amount: 0,
        requests: 0,
        failed: 0,
        latency: histogram(),
        answers: BTreeMap::new(),
    };
    for buyer in buyers {
        let seen = buyer.await?;
        total.confirmed += seen.confirmed;
        total.confirmed_amount += seen.confirmed_amount;
        total.requests += seen.requests;
        total.failed += seen.failed;
        total.latency.add(&seen.latency)?;
        for (label, count) in seen.answers {
            *total.answers.entry(label).or_default() += count;
        }
    }
    sampling.store(false, Ordering::Relaxed);
    let (rss_peak_kib, fds_peak) = sampler.await?;
    let seconds = ended
        .lock()
        .await
        .unwrap_or_else(Instant::now)
        .duration_since(started)
        .as_secs_f64();
    Ok(PhaseReport {
        confirmed: total.confirmed,
        seconds,
        sold_out: sold_out.load(Ordering::Relaxed),
        confirmed_per_second: total.confirmed as f64 / seconds.max(1e-9),
        latency: Latency::of(&total.latency),
        requests: total.requests,
        failed: total.failed,
        error_rate: total.failed as f64 / (total.requests.max(1)) as f64,
        answers: total.answers,
        server_rss_peak_mib: rss_peak_kib as f64 / 1024.0,
        server_fds_peak: fds_peak,
    })
}

#[allow(clippy::too_many_arguments)]
async fn buy_until_sold_out(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    key_prefix: &str,
    amount: i64,
    sold_out: &AtomicBool,
    ended: &Mutex<Option<Instant>>,
    deadline: Instant,
) -> Seen {
    let mut seen = Seen {
        confirmed: 0,
        confirmed_amount: 0,
        requests: 0,
        failed: 0,
        latency: histogram(),
        answers: BTreeMap::new(),
    };
    let mut sequence = 0u64;
    let mut retry = false;
    while !sold_out.load(Ordering::Relaxed) && Instant::now() < deadline {
        if !retry {
            sequence += 1;
        }
        let began = Instant::now();
        let (status, body) = send(
            http.post(url)
                .bearer_auth(token)
                .header("idempotency-key", format!("{key_prefix}-{sequence}"))
                .json(&json!({ "amount": amount })),
        )
        .await;
        record(&mut seen.latency, began.elapsed());
        seen.requests += 1;
        let code = body["error"].as_str().unwrap_or("");
        *seen
            .answers
            .entry(format!("{status} {code}").trim().to_owned())
            .or_default() += 1;
        retry = false;
        match (status, code) {
            (201, _) => {
                seen.confirmed += 1;
                seen.confirmed_amount += body["amount"].as_i64().unwrap_or(0);
            }
            (409, "sold_out" | "insufficient_quota") => {
                if !sold_out.swap(true, Ordering::Relaxed) {
                    *ended.lock().await = Some(Instant::now());
                }
            }
            _ => {
                seen.failed += 1;
                retry = true;
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
    }
    seen
}

/// Samples the server's resident memory high-water mark and open
/// descriptors until told to stop; returns (peak KiB, most descriptors).
async fn sample(pid: u32, running: Arc<AtomicBool>) -> (u64, u64) {
    let mut fds_peak = 0;
    let mut rss_peak_kib = 0;
    while running.load(Ordering::Relaxed) {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
        fds_peak = fds_peak.max(fds);
        rss_peak_kib = rss_peak_kib.max(status_kib(pid, "VmHWM:"));
        tokio::time::sleep(SAMPLE_PERIOD).await;
    }
    (rss_peak_kib.max(status_kib(pid, "VmHWM:")), fds_peak)
}

/// A `kB` field of `/proc/<pid>/status` (0 when unreadable).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with(field))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

/// The attackers at work.
struct Attack {
    stop: Arc<AtomicBool>,
    slowloris: Vec<tokio::task::JoinHandle<(u64, u64)>>,
    floods: Vec<(Flood, tokio::task::JoinHandle<BTreeMap<String, u64>>)>,
}

#[derive(Debug, Clone, Copy)]
enum Flood {
    Login,
    Token,
    Product,
}

impl Attack {
    fn start(
        target: &Target,
        options: &AttackOptions,
        usernames: Vec<String>,
        attacker_token: String,
    ) -> Attack {
        let stop = Arc::new(AtomicBool::new(false));
        let addresses: Vec<IpAddr> = (0..options.attack_addresses)
            .map(|index| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + index)))
            .collect();
        let slowloris = (0..options.slowloris)
            .map(|index| {
                let local = addresses[index as usize % addresses.len()];
                tokio::spawn(slowloris(target.address, local, stop.clone()))
            })
            .collect();
        let usernames = Arc::new(usernames);
        let mut floods = Vec::new();
        for (flood, rate) in [
            (Flood::Login, options.login_rate),
            (Flood::Token, options.token_rate),
            (Flood::Product, options.product_rate),
        ] {
            if rate == 0 {
                continue;
            }
            let workers = addresses.len() as u32 * FLOOD_WORKERS_PER_ADDRESS;
            let period = Duration::from_secs_f64(f64::from(workers) / rate as f64);
            for worker in 0..workers {
                let local = addresses[(worker / FLOOD_WORKERS_PER_ADDRESS) as usize];
                let Ok(http) = client(Some(local)) else {
                    continue;
                };
                let context = FloodContext {
                    http,
                    base: target.base.clone(),
                    usernames: usernames.clone(),
                    attacker_token: attacker_token.clone(),
                    stop: stop.clone(),
                };
                floods.push((flood, tokio::spawn(flood_worker(flood, period, context))));
            }
        }
        Attack {
            stop,
            slowloris,
            floods,
        }
    }

    async fn stop(self) -> AttackReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut report = AttackReport::default();
        for task in self.slowloris {
            let (opened, cut_off) = task.await.unwrap_or_default();
            report.slowloris_opened += opened;
            report.slowloris_cut_off += cut_off;
        }
        for (flood, task) in self.floods {
            let answers = task.await.unwrap_or_default();
            let into = match flood {
                Flood::Login => &mut report.login_answers,
                Flood::Token => &mut report.token_answers,
                Flood::Product => &mut report.product_answers,
            };
            for (label, count) in answers {
                *into.entry(label).or_default() += count;
            }
        }
        report
    }
}

/// Holds a connection with headers begun and never finished, one header
/// line a second; when the server closes it, opens another. Returns
/// (connections opened, connections the server cut off).
async fn slowloris(server: SocketAddr, local: IpAddr, stop: Arc<AtomicBool>) -> (u64, u64) {
    let (mut opened, mut cut_off) = (0, 0);
    let spread = Duration::from_millis(u64::from(rand::random::<u16>() % 1000));
    tokio::time::sleep(spread).await;
    while !stop.load(Ordering::Relaxed) {
        let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
            return (opened, cut_off);
        };
        if socket.bind(SocketAddr::new(local, 0)).is_err() {
            return (opened, cut_off);
        }
        let Ok(Ok(mut stream)) =
            tokio::time::timeout(Duration::from_secs(5), socket.connect(server)).await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        opened += 1;
        let mut line = b"GET /healthz HTTP/1.1\r\nHost: ledger\r\n".to_vec();
        loop {
            if stream.write_all(&line).await.is_err() {
                cut_off += 1;
                break;
            }
            line = b"X-Slow: yes\r\n".to_vec();
            if stop.load(Ordering::Relaxed) {
                return (opened, cut_off);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    (opened, cut_off)
}

/// What a flood worker needs.
struct FloodContext {
    http: reqwest::Client,
    base: String,
    usernames: Arc<Vec<String>>,
    attacker_token: String,
    stop: Arc<AtomicBool>,
}

/// Sends one flood request per `period` until stopped; returns the answers
/// by status.
async fn flood_worker(
    flood: Flood,
    period: Duration,
    context: FloodContext,
) -> BTreeMap<String, u64> {
    let mut answers = BTreeMap::new();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let sent = AtomicU64::new(0);
    while !context.stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let index = sent.fetch_add(1, Ordering::Relaxed);
        let request = match flood {
            Flood::Login => {
                let username = &context.usernames[index as usize % context.usernames.len()];
                context
                    .http
                    .post(format!("{}/v1/auth/login", context.base))
                    .json(&json!({"username": username, "password": format!("guess-{index}")}))
            }
            Flood::Token => context
                .http
                .get(format!("{}/v1/me", context.base))
                .bearer_auth(crate::server::auth::random_hex(32)),
            Flood::Product => {
                let made_up = crate::server::auth::random_hex(8);
                context
                    .http
                    .post(format!(
                        "{}/v1/products/made-up-{made_up}/purchases",
                        context.base
                    ))
                    .bearer_auth(&context.attacker_token)
                    .header("idempotency-key", format!("attack-{made_up}-{index}"))
                    .json(&json!({"amount": 1}))
            }
        };
        let (status, body) = send(request).await;
        let code = body["error"].as_str().unwrap_or("");
        *answers
            .entry(format!("{status} {code}").trim().to_owned())
            .or_default() += 1;
    }
    answers
}

/// Whether a product's figures hold once the read models caught up.
async fn conserved(
    http: &reqwest::Client,
    base: &str,
    product: &str,
    phase: &PhaseReport,
    options: &AttackOptions,
) -> anyhow::Result<bool> {
    let expected = phase.confirmed as i64 * options.amount;
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let (status, progress) =
            send(http.get(format!("{base}/v1/products/{product}/progress"))).await;
        let figure = |name: &str| progress[name].as_i64().unwrap_or(-1);
        let sum = figure("confirmed") + figure("reserved") + figure("available");
        if status == 200 && figure("confirmed") == expected && figure("reserved") == 0 {
            return Ok(sum == options.quota);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn verify_chain(http: &reqwest::Client, base: &str, admin: &str) -> anyhow::Result<bool> {
    let (status, body) = send(
        http.post(format!("{base}/v1/audit/verify"))
            .bearer_auth(admin),
    )
    .await;
    Ok(status == 200 && body["ok"] == json!(true))
}

/// Runs `ledger audit drift` on the database (the server stopped).
async fn drift_clean(database: &BenchDatabase) -> anyhow::Result<bool> {
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    command
        .args(["audit", "drift"])
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    match database {
        BenchDatabase::Sqlite(folder) => command.arg("--data-dir").arg(folder.path()),
        BenchDatabase::Postgres(scratch) => command.arg("--database-url").arg(&scratch.url),
    };
    Ok(command.status().await?.success())
}

fn print_table(report: &AttackBenchReport) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "ledger bench attack: {} honest buyers, quota {} per product, {} per purchase; backend {}",
        report.clients, report.quota, report.amount, report.setup
    );
    let _ = writeln!(out, "attack: {}", report.attack);
    let _ = writeln!(
        out,
        "{:<14} {:>10} {:>8} {:>10} {:>10} {:>8} {:>8} {:>10} {:>6}",
        "phase", "confirmed", "secs", "confirm/s", "p50 ms", "p99 ms", "errors", "rss MiB", "fds"
    );
    for (name, phase) in [
        ("baseline", &report.baseline),
        ("under attack", &report.under_attack),
    ] {
        let _ = writeln!(
            out,
            "{:<14} {:>10} {:>8.1} {:>10.0} {:>10.1} {:>8.1} {:>8.4} {:>10.1} {:>6}",
            name,
            phase.confirmed,
            phase.seconds,
            phase.confirmed_per_second,
            phase.latency.p50_ms,
            phase.latency.p99_ms,
            phase.error_rate,
            phase.server_rss_peak_mib,
            phase.server_fds_peak
        );
    }
    let _ = writeln!(
        out,
        "throughput ratio {:.2} (target >= 0.7), p99 ratio {:.2} (target <= 2): {}",
        report.throughput_ratio,
        report.p99_ratio,
        if report.timing_targets_met {
            "met"
        } else {
            "NOT met"
        }
    );
    let _ = writeln!(out, "attackers: {:?}", report.attackers);
    let _ = writeln!(
        out,
        "checks: {:?} (rss bound {} MiB)",
        report.checks, report.rss_bound_mib
    );
}
