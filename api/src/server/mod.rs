//! `ledger serve`: the HTTP API over the engine and the read models.

pub mod access;
pub mod auditing;
pub mod auth;
pub mod cluster;
pub mod error;
pub mod feed;
pub mod fresh;
pub mod guard;
pub mod handlers;
pub mod keys;
pub mod metered;
pub mod model;
pub mod openapi;
pub mod orders;
pub mod products;
pub mod routes;
pub mod support;
pub mod throttle;
pub mod transport;
pub mod users;

use crate::cli::StoreArgs;
use access::AccessDb;
use auth::{Authenticator, Role};
use engine::{Engine, EngineSettings, SystemClock};
use error::ApiError;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use projections::{ReadDb, Runner, RunnerOptions, Statuses};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use store::{Backend, EventStore, LogLocation};
use tower_http::request_id::PropagateRequestIdLayer;

/// How often expired sessions and idle rate-limit entries are swept.
pub const HOUSEKEEPING_PERIOD: Duration = Duration::from_secs(60);

/// Options of `ledger serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeOptions {
    /// Address to listen on (`host:port`; port 0 picks a free one).
    #[arg(long, env = "LEDGER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Where the log and read models live.
    #[command(flatten)]
    pub store: StoreArgs,
    /// Limits on clients and requests.
    #[command(flatten)]
    pub limits: Limits,
    /// Limits on connections.
    #[command(flatten)]
    pub transport: transport::TransportLimits,
    /// Several nodes on one database: product leases and forwarding.
    #[command(flatten)]
    pub cluster: cluster::ClusterOptions,
    /// Purchases queued per product before new ones are refused with 503.
    #[arg(long, env = "LEDGER_PURCHASE_QUEUE_MAX", default_value_t = 10_000)]
    pub purchase_queue_max: usize,
    /// How long a reservation waits for its payment before it is released
    /// (a crash between reserving and confirming leaves it pending this long).
    #[arg(long, env = "LEDGER_RESERVATION_TTL", default_value = "30s", value_parser = parse_duration)]
    pub reservation_ttl: Duration,
    /// The payment provider (`http://...`); without it payouts stay
    /// `scheduled`.
    #[arg(long, env = "LEDGER_GATEWAY_URL")]
    pub gateway_url: Option<String>,
    /// How long a call to the gateway may take before its outcome is
    /// unknown (then resolved by asking the gateway).
    #[arg(long, env = "LEDGER_GATEWAY_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub gateway_timeout: Duration,
    /// How long a payout attempt's claim holds before another worker may
    /// expire it (a worker that died mid-call).
    #[arg(long, env = "LEDGER_PAYOUT_LEASE", default_value = "30s", value_parser = parse_duration)]
    pub payout_lease: Duration,
    /// Payout workers this node runs when a gateway is set; they split the
    /// payouts between them by id and share the node's concurrency and rate.
    #[arg(long, env = "LEDGER_PAYOUT_WORKERS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub payout_workers: u32,
    /// Calls to the gateway (payments and lookups) this node may have in
    /// flight at once, across its payout workers. Size it as the gateway's
    /// rate limit times its latency (Little's law), plus a margin.
    #[arg(long, env = "LEDGER_PAYOUT_CONCURRENCY", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=engine::payouts::CONCURRENCY_MAX as i64))]
    pub payout_concurrency: u32,
    /// Calls to the gateway this node makes per second at most (0: no limit
    /// but the gateway's own 429s, which pause every call of the node).
    /// With several nodes, give each its share of the gateway's limit.
    #[arg(long, env = "LEDGER_PAYOUT_RATE_LIMIT", default_value_t = 1_000)]
    pub payout_rate_limit: u32,
    /// How long a payout's outcome may stay unknown (the gateway cannot
    /// say) after its last claim ended before it is parked for an operator.
    #[arg(long, env = "LEDGER_PAYOUT_PARK_UNKNOWN_AFTER", default_value = "1h", value_parser = parse_duration)]
    pub payout_park_unknown_after: Duration,
    /// How often every product is checked for reservations past their
    /// expiry and refunds owed, so a crash is repaired without traffic.
    #[arg(long, env = "LEDGER_RECOVERY_PERIOD", default_value = "5s", value_parser = parse_duration)]
    pub recovery_period: Duration,
}

/// Limits on clients and requests.
#[derive(Debug, Clone, clap::Args)]
pub struct Limits {
    /// Requests per second each client may make (by user, or by address
    /// before logging in); over it the answer is 429 with `Retry-After`.
    #[arg(long = "rate-limit", env = "LEDGER_RATE_LIMIT", default_value_t = 50)]
    pub rate_per_second: u32,
    /// Requests a client may make at once above its rate.
    #[arg(long, env = "LEDGER_RATE_BURST", default_value_t = 100)]
    pub rate_burst: u32,
    /// Longest a request may take before it is answered 503 `timeout`.
    #[arg(long, env = "LEDGER_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// How long a login's token lasts.
    #[arg(long, env = "LEDGER_SESSION_TTL", default_value = "24h", value_parser = parse_duration)]
    pub session_ttl: Duration,
    /// Failed authentications (wrong passwords, unknown tokens) one client
    /// address may make per `--auth-failure-window`; past it the address
    /// gets 429 before any password hash or token lookup.
    #[arg(long, env = "LEDGER_AUTH_FAILURES_PER_ADDRESS", default_value_t = 30)]
    pub auth_failures_per_address: u32,
    /// The window of `--auth-failures-per-address`, from the first failure.
    #[arg(long, env = "LEDGER_AUTH_FAILURE_WINDOW", default_value = "1m", value_parser = parse_duration)]
    pub auth_failure_window: Duration,
    /// Failed logins per username from one address per `--login-lockout`
    /// (from all addresses together: 20 times as many; see the README).
    #[arg(long, env = "LEDGER_LOGIN_FAILURES_PER_USER", default_value_t = 5)]
    pub login_failures_per_user: u32,
    /// Logins per second, all addresses together, from addresses with a
    /// failed authentication in the current window (a guessing crowd's
    /// share of argon2); over it 429.
    #[arg(long, env = "LEDGER_SUSPECT_LOGINS_PER_SECOND", default_value_t = 5)]
    pub suspect_logins_per_second: u32,
    /// How long a username's failed logins are counted from the first.
    #[arg(long, env = "LEDGER_LOGIN_LOCKOUT", default_value = "15m", value_parser = parse_duration)]
    pub login_lockout: Duration,
    /// Password checks that may wait for a turn at argon2 (as many run at
    /// once as there are cores); past it a login gets 503 `overloaded`.
    #[arg(long, env = "LEDGER_PASSWORD_QUEUE_MAX", default_value_t = 64)]
    pub password_queue_max: usize,
    /// Progress streams (`/v1/progress/stream`) open at once in all; more
    /// get 429.
    #[arg(long, env = "LEDGER_STREAMS_MAX", default_value_t = 1_024)]
    pub streams_max: usize,
    /// Progress streams open at once from one client address; more get 429.
    #[arg(long, env = "LEDGER_STREAMS_PER_ADDRESS_MAX", default_value_t = 16)]
    pub streams_per_address_max: u32,
    /// How long one progress stream lasts before the server ends it (the
    /// dashboard reconnects by itself).
    #[arg(long, env = "LEDGER_STREAM_LIFETIME", default_value = "10m", value_parser = parse_duration)]
    pub stream_lifetime: Duration,
    /// How long an idempotency key (and its stored answer) is kept before
    /// it is purged; at least 24 h.
    #[arg(long, env = "LEDGER_IDEMPOTENCY_KEY_TTL", default_value = "24h", value_parser = parse_key_ttl)]
    pub idempotency_key_ttl: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            rate_per_second: 50,
            rate_burst: 100,
            request_timeout: Duration::from_secs(30),
            session_ttl: auth::SESSION_TTL_DEFAULT,
            auth_failures_per_address: 30,
            auth_failure_window: Duration::from_secs(60),
            login_failures_per_user: 5,
            suspect_logins_per_second: 5,
            login_lockout: Duration::from_secs(15 * 60),
            password_queue_max: 64,
            streams_max: 1_024,
            streams_per_address_max: 16,
            stream_lifetime: Duration::from_secs(10 * 60),
            idempotency_key_ttl: IDEMPOTENCY_KEY_TTL_MIN,
        }
    }
}

impl Limits {
    /// The failure limits of the throttle.
    pub fn failure_limits(&self) -> throttle::FailureLimits {
        throttle::FailureLimits {
            per_address: self.auth_failures_per_address,
            address_window: self.auth_failure_window,
            per_user_address: self.login_failures_per_user,
            lockout: self.login_lockout,
            suspect_logins_per_second: self.suspect_logins_per_second,
        }
    }
}

/// How many argon2 hashes run at once: one per core. (Half the cores was
/// tried: honest bursts of logins, 20 users created at once, then waited
/// past the request timeout on a busy machine. A flood's hashes are
/// bounded by the failure limits instead.)
pub fn password_hashes_at_once() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// The shortest time idempotency keys are kept (API.md: at least 24 h).
pub const IDEMPOTENCY_KEY_TTL_MIN: Duration = Duration::from_secs(24 * 60 * 60);
/// Most idempotency keys one purge statement deletes (a purge repeats
/// until fewer are left, so no statement holds the database long).
pub const KEY_PURGE_BATCH_MAX: i64 = 10_000;
/// Most purge statements per housekeeping pass.
pub const KEY_PURGE_ROUNDS_MAX: usize = 100;

fn parse_key_ttl(text: &str) -> Result<Duration, String> {
    let ttl = parse_duration(text)?;
    if ttl < IDEMPOTENCY_KEY_TTL_MIN {
        return Err("idempotency keys are kept at least 24h".into());
    }
    Ok(ttl)
}

/// Parses `30s`, `500ms`, `5m`, `24h`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} needs a unit: ms, s, m or h"))?;
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} does not start with a number"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("{text:?}: the unit must be ms, s, m or h")),
    };
    if duration.is_zero() {
        return Err("the duration must be positive".into());
    }
    Ok(duration)
}

/// What every handler may use.
#[derive(Clone)]
pub struct AppState {
    /// The event log.
    pub store: Arc<dyn EventStore>,
    /// The read models.
    pub db: ReadDb,
    /// Users, sessions, idempotency keys.
    pub access: AccessDb,
    /// Logins and tokens.
    pub auth: Authenticator,
    /// Idempotency keys, written in batches.
    pub keys: keys::KeyLog,
    /// The command side.
    pub engine: Engine,
    /// The projections' progress.
    pub statuses: Arc<Statuses>,
    /// The live progress every dashboard watches.
    pub feed: feed::ProgressFeed,
    /// The limits in force.
    pub limits: Limits,
    /// Requests per client.
    pub limiter: Arc<DefaultKeyedRateLimiter<String>>,
    /// The payment provider, when this node pays out (an operator's cancel
    /// asks it about the payout's key).
    pub provider: Option<Arc<dyn engine::payouts::PaymentProvider>>,
    /// Failed authentications per address and username.
    pub throttle: throttle::Throttle,
    /// Sends requests for products other nodes own to their owner.
    pub forwarder: Arc<cluster::Forwarder>,
    /// Chain verifications walking (or walked) in the background.
    pub verifications: Arc<auditing::Verifications>,
}

impl AppState {
    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        chrono::Utc::now().timestamp_millis()
    }

    /// Counts a request against a client's rate.
    pub fn limit_rate(&self, client: &str) -> Result<(), ApiError> {
        self.limiter
            .check_key(&client.to_owned())
            .map_err(|not_until| {
                // The limiter's own clock: a new one per refusal would be
                // set up anew each time (it showed in profiles under floods).
                let wait =
                    not_until.wait_time_from(governor::clock::Clock::now(self.limiter.clock()));
                metrics::counter!("ledger_rate_limited_total").increment(1);
                ApiError::RateLimited(wait.as_secs().max(1))
            })
    }
}

/// A running API: its state (for tests and benchmarks) and the background
/// work to stop.
pub struct Server {
    /// The state the router serves.
    pub state: AppState,
    runner: Runner,
    housekeeping: tokio::task::JoinHandle<()>,
    recovery: tokio::task::JoinHandle<()>,
    revocations: tokio::task::JoinHandle<()>,
    payout_stop: tokio::sync::watch::Sender<bool>,
    payout_workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Opens the database, applies migrations, prepares the read models,
    /// starts the projections, the engine and the progress feed, and creates
    /// the bootstrap admin when asked to.
    pub async fn start(
        backend: &Backend,
        limits: Limits,
        settings: EngineSettings,
    ) -> anyhow::Result<Server> {
        Server::start_with_log(backend, &LogLocation::Database, limits, settings).await
    }

    /// Like `start_with_log`, as a node of a cluster when `cluster` names
    /// this node (`--advertise-url`) and the database is PostgreSQL.
    pub async fn start_with_log(
        backend: &Backend,
        log: &LogLocation,
        limits: Limits,
        settings: EngineSettings,
    ) -> anyhow::Result<Server> {
        Server::start_full(
            backend,
            log,
            limits,
            settings,
            &cluster::ClusterOptions::default(),
            RunnerOptions::default(),
        )
        .await
    }

    /// Like `start`, with the log where `log` says (the read models and API
    /// tables stay in `backend`), and this node's part in a cluster.
    pub async fn start_node(
        backend: &Backend,
        log: &LogLocation,
        limits: Limits,
        settings: EngineSettings,
        cluster: &cluster::ClusterOptions,
    ) -> anyhow::Result<Server> {
        Server::start_full(
            backend,
            log,
            limits,
            settings,
            cluster,
            RunnerOptions::default(),
        )
        .await
    }

    /// Like `start_with_log`, with these projection runner options (tests
    /// inject faults before the runner's commits with them).
    pub async fn start_with_runner(
        backend: &Backend,
        log: &LogLocation,
        limits: Limits,
        settings: EngineSettings,
        runner_options: RunnerOptions,
    ) -> anyhow::Result<Server> {
        Server::start_full(
            backend,
            log,
            limits,
            settings,
            &cluster::ClusterOptions::default(),
            runner_options,
        )
        .await
    }

    /// Everything `start` does, with every option.
    pub async fn start_full(
        backend: &Backend,
        log: &LogLocation,
        limits: Limits,
        settings: EngineSettings,
        cluster: &cluster::ClusterOptions,
        runner_options: RunnerOptions,
    ) -> anyhow::Result<Server> {
        cluster.validate()?;
        handlers::prometheus();
        let store: Arc<dyn EventStore> =
            Arc::new(metered::MeteredStore::new(log.open(backend).await?));
        let db = ReadDb::open(backend).await?;
        projections::prepare(store.clone(), &db).await?;
        let access = AccessDb::open(backend).await?;
        let runner = Runner::start(store.clone(), db.clone(), runner_options);
        let statuses = runner.statuses();
        let recovery_period = settings.recovery_period;
        let engine = Engine::with_cluster(
            store.clone(),
            Arc::new(SystemClock),
            settings,
            cluster_settings(backend, cluster).await?,
        );
        let quota =
            Quota::per_second(NonZeroU32::new(limits.rate_per_second.max(1)).expect("max(1)"))
                .allow_burst(NonZeroU32::new(limits.rate_burst.max(1)).expect("max(1)"));
        let state = AppState {
            auth: Authenticator::new(
                access.clone(),
                limits.session_ttl,
                throttle::PasswordGate::new(password_hashes_at_once(), limits.password_queue_max),
            ),
            throttle: throttle::Throttle::new(limits.failure_limits()),
            keys: keys::KeyLog::start(AccessDb::open_key_writer(backend).await?),
            feed: feed::ProgressFeed::start(
                db.clone(),
                statuses.clone(),
                engine.clone(),
                feed::StreamLimits {
                    total_max: limits.streams_max,
                    per_address_max: limits.streams_per_address_max,
                    lifetime: limits.stream_lifetime,
                },
            ),
            store,
            db,
            access,
            engine,
            statuses,
            limits,
            limiter: Arc::new(RateLimiter::keyed(quota)),
            provider: None,
            forwarder: Arc::new(cluster::Forwarder::new(cluster)?),
            verifications: Arc::default(),
        };
        auth::warm_up().await;
        let housekeeping = tokio::spawn(housekeeping(state.clone()));
        let revocations = tokio::spawn(revocations(state.auth.clone()));
        let payout_stop = tokio::sync::watch::channel(false).0;
        // Repairs what a crash left in any product, with no traffic needed.
        let recovery = tokio::spawn(engine::recovery::run(
            state.store.clone(),
            state.engine.clone(),
            recovery_period,
            payout_stop.subscribe(),
        ));
        Ok(Server {
            state,
            runner,
            housekeeping,
            recovery,
            revocations,
            payout_stop,
            payout_workers: Vec::new(),
        })
    }

    /// Starts `count` payout workers paying through `provider`: each takes
    /// its partition of the payouts and its share of `settings.concurrency`
    /// (the node's), and all share `settings.pacer`. Calls are metered
    /// (`crate::gateway::MeteredProvider`).
    pub fn start_payout_workers(
        &mut self,
        provider: Arc<dyn engine::payouts::PaymentProvider>,
        count: u32,
        settings: engine::payouts::WorkerSettings,
    ) {
        let provider: Arc<dyn engine::payouts::PaymentProvider> =
            Arc::new(crate::gateway::MeteredProvider::new(provider));
        self.state.provider = Some(provider.clone());
        let count = count.max(1);
        let concurrency = settings.concurrency.div_ceil(count as usize).max(1);
        for index in 0..count {
            let worker = engine::payouts::PayoutWorker::new(
                self.state.store.clone(),
                self.state.engine.clone(),
                provider.clone(),
                Arc::new(SystemClock),
                engine::payouts::WorkerSettings {
                    name: format!("{}-{index}", settings.name),
                    concurrency,
                    partition: engine::payouts::Partition { index, count },
                    ..settings.clone()
                },
            );
            let stop = self.payout_stop.subscribe();
            self.payout_workers.push(tokio::spawn(worker.run(stop)));
        }
    }

    /// The HTTP service: the route table plus request ids and panic capture.
    pub fn router(&self) -> axum::Router {
        routes::router(self.state.clone())
            .layer(axum::middleware::from_fn(guard::run_to_completion))
            .layer(PropagateRequestIdLayer::x_request_id())
            .layer(tower_http::catch_panic::CatchPanicLayer::custom(
                handlers::panicked,
            ))
            .layer(
                tower_http::trace::TraceLayer::new_for_http()
                    // 5xx answers are expected operating conditions here
                    // (load shedding, timeouts, a database restart: 503);
                    // internal errors log themselves at ERROR with details.
                    .on_failure(
                        tower_http::trace::DefaultOnFailure::new().level(tracing::Level::WARN),
                    )
                    .make_span_with(|request: &axum::http::Request<_>| {
                        let request_id = request
                            .headers()
                            .get(guard::REQUEST_ID_HEADER)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("");
                        tracing::info_span!(
                            "request",
                            method = %request.method(),
                            path = %request.uri().path(),
                            request_id,
                        )
                    }),
            )
            .layer(axum::middleware::from_fn(guard::sanitize_request_id))
            .layer(axum::middleware::from_fn(guard::security_headers))
            .layer(axum::middleware::from_fn(guard::close_after_unread_body))
    }

    /// Aborts every payout worker at once, as a crash would: claims stay in
    /// flight and provider calls are abandoned mid-way (tests).
    pub fn kill_payout_workers(&mut self) {
        for worker in self.payout_workers.drain(..) {
            worker.abort();
        }
    }

    /// Stops the background work and closes the databases.
    pub async fn stop(self) {
        self.payout_stop.send_replace(true);
        for worker in self.payout_workers {
            let _ = worker.await;
        }
        let _ = self.recovery.await;
        self.housekeeping.abort();
        self.revocations.abort();
        self.state.feed.stop();
        self.state.engine.halt();
        self.runner.stop().await;
        self.state.db.close().await;
        self.state.access.close().await;
    }
}

/// Connections of a node's lease pool: renewals never wait behind appends.
pub const LEASE_CONNECTIONS_MAX: u32 = 4;

/// The engine's part in a cluster: leases in PostgreSQL when the node has
/// an advertised URL there; otherwise (SQLite, or no URL) the node owns
/// every product.
async fn cluster_settings(
    backend: &Backend,
    options: &cluster::ClusterOptions,
) -> anyhow::Result<engine::ClusterSettings> {
    let (Some(node), Backend::Postgres(url)) = (options.node(), backend) else {
        if options.advertise_url.is_some() {
            tracing::info!("one node on SQLite: this node owns every product");
        }
        return Ok(engine::ClusterSettings::sole_node());
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(LEASE_CONNECTIONS_MAX)
        .acquire_timeout(options.lease_renew)
        .connect_with(store::postgres::connect_options(url)?)
        .await?;
    tracing::info!(node_id = %node.node_id, url = %node.url, "taking product leases");
    Ok(engine::ClusterSettings::member(
        node,
        Arc::new(store::lease::PostgresLeases::new(pool)),
        options.lease_ttl,
        options.lease_renew,
    ))
}

/// Creates the admin named by `LEDGER_ADMIN_USER` / `LEDGER_ADMIN_PASSWORD`
/// when both are set and no user of that name exists.
async fn bootstrap_admin_from_environment(state: &AppState) -> anyhow::Result<()> {
    let (Ok(username), Ok(password)) = (
        std::env::var("LEDGER_ADMIN_USER"),
        std::env::var("LEDGER_ADMIN_PASSWORD"),
    ) else {
        if state.access.user_count().await? == 0 {
            tracing::warn!(
                "no users exist; set LEDGER_ADMIN_USER and LEDGER_ADMIN_PASSWORD to create an admin"
            );
        }
        return Ok(());
    };
    bootstrap_admin(state, &username, &password).await
}

/// Creates an admin with these credentials unless a user of that name
/// exists (then nothing changes, whatever its password).
pub async fn bootstrap_admin(
    state: &AppState,
    username: &str,
    password: &str,
) -> anyhow::Result<()> {
    auth::validate_username(username).map_err(|why| anyhow::anyhow!("LEDGER_ADMIN_USER: {why}"))?;
    auth::validate_password(password)
        .map_err(|why| anyhow::anyhow!("LEDGER_ADMIN_PASSWORD: {why}"))?;
    if state.access.user_by_name(username).await?.is_some() {
        return Ok(());
    }
    let created = state
        .auth
        .create_user(username, password, Role::Admin, None, state.now_ms())
        .await?;
    if created.is_some() {
        tracing::info!(%username, "created the bootstrap admin");
    }
    Ok(())
}

async fn housekeeping(state: AppState) {
    let mut tick = tokio::time::interval(HOUSEKEEPING_PERIOD);
    loop {
        tick.tick().await;
        state.limiter.retain_recent();
        state.limiter.shrink_to_fit();
        purge(&state).await;
    }
}

/// Deletes sessions ended long enough ago that every node's revocation
/// poll has seen them, and idempotency keys older than their time to keep.
async fn purge(state: &AppState) {
    let now_ms = state.now_ms();
    let margin_ms = i64::try_from((auth::REVOCATION_LOOKBACK * 2).as_millis()).unwrap_or(0);
    match state.access.purge_sessions(now_ms - margin_ms).await {
        Ok(0) => {}
        Ok(purged) => tracing::info!(purged, "ended sessions deleted"),
        Err(error) => tracing::warn!(%error, "could not purge ended sessions"),
    }
    let keep_ms =
        i64::try_from(state.limits.idempotency_key_ttl.as_millis()).unwrap_or(i64::MAX / 2);
    let mut purged = 0;
    for _round in 0..KEY_PURGE_ROUNDS_MAX {
        match state
            .access
            .purge_keys(now_ms.saturating_sub(keep_ms), now_ms, KEY_PURGE_BATCH_MAX)
            .await
        {
            Ok(count) => {
                purged += count;
                if (count as i64) < KEY_PURGE_BATCH_MAX {
                    break;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "could not purge idempotency keys");
                break;
            }
        }
    }
    if purged > 0 {
        tracing::info!(purged, "old idempotency keys deleted");
    }
}

/// Reads the sessions ended lately (logouts on any node) and drops them
/// from this node's cache.
async fn revocations(auth: Authenticator) {
    let mut tick = tokio::time::interval(auth::REVOCATION_POLL_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(error) = auth
            .poll_revocations(chrono::Utc::now().timestamp_millis())
            .await
        {
            tracing::warn!(%error, "could not read ended sessions");
        }
    }
}

/// Runs the server until Ctrl-C or SIGTERM, then drains in-flight requests.
pub async fn serve(options: ServeOptions) -> anyhow::Result<ExitCode> {
    let backend = options.store.backend();
    let log = options.store.log()?;
    let stores = options.store.describe()?;
    let settings = EngineSettings {
        queue_max: options.purchase_queue_max.max(1),
        reservation_ttl: chrono::Duration::from_std(options.reservation_ttl)?,
        recovery_period: options.recovery_period,
        ..EngineSettings::default()
    };
    let mut server = Server::start_node(
        &backend,
        &log,
        options.limits.clone(),
        settings,
        &options.cluster,
    )
    .await?;
    bootstrap_admin_from_environment(&server.state).await?;
    match &options.gateway_url {
        Some(url) => {
            anyhow::ensure!(
                options.payout_lease > options.gateway_timeout,
                "--payout-lease must be longer than --gateway-timeout, or a live call's claim could be expired"
            );
            let provider = crate::gateway::HttpProvider::new(url, options.gateway_timeout)?;
            let settings = engine::payouts::WorkerSettings {
                name: format!("payout-worker-{}", std::process::id()),
                lease: chrono::Duration::from_std(options.payout_lease)?,
                call_timeout: chrono::Duration::from_std(options.gateway_timeout)?,
                park_unknown_after: chrono::Duration::from_std(options.payout_park_unknown_after)?,
                concurrency: options.payout_concurrency as usize,
                pacer: Arc::new(engine::payouts::Pacer::new(NonZeroU32::new(
                    options.payout_rate_limit,
                ))),
                ..Default::default()
            };
            server.start_payout_workers(Arc::new(provider), options.payout_workers, settings);
            tracing::info!(gateway = %url, workers = options.payout_workers,
                concurrency = options.payout_concurrency, rate_limit = options.payout_rate_limit,
                "paying out through the gateway");
        }
        None => tracing::warn!("no --gateway-url: payouts stay scheduled"),
    }
    let listener = tokio::net::TcpListener::bind(options.listen).await?;
    let address = listener.local_addr()?;
    tracing::info!(%address, %backend, %log, "ledger serving");
    let signal = crate::read_models::shutdown_signal();
    let feed = server.state.feed.clone();
    let stop = async move {
        signal.await;
        // Dashboards never hang up by themselves: end their streams so
        // draining finishes.
        feed.close_streams();
    };
    // One plain line on standard output, for people and for scripts.
    println!("ledger serving on http://{address} ({stores}); dashboard at http://{address}/");
    transport::serve(listener, server.router(), options.transport.clone(), stop).await;
    tracing::info!("draining done; stopping projections");
    server.stop().await;
    Ok(ExitCode::SUCCESS)
}
