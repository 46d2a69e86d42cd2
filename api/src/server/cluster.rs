//! Several nodes, one owner per product: `ledger serve`'s cluster options,
//! and the forwarding of a product's purchases and commands to the node
//! holding the product's lease, whose answer is relayed unchanged.
//!
//! A node that is not a product's owner (its engine answers `NotOwner`)
//! sends the request, already authenticated, authorized and checked here,
//! to the owner's internal routes (`/internal/v1/...`), which take only
//! callers presenting the node secret. Forwarding uses one HTTP client
//! with pooled keep-alive connections, a bounded timeout and a bounded
//! number of requests in flight; an owner that cannot be reached, or a full
//! forwarding bound, is answered 503 `unavailable` with `Retry-After`. The
//! owner never forwards again: a request reaching a node that has just lost
//! the lease is answered 503 and retried by its buyer with the same key.

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::guard::REQUEST_ID_HEADER;
use super::handlers::parse_product_id;
use super::model::{JsonBody, PathText};
use super::products;
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use domain::product::{ProductCommand, ProductTerms};
use domain::{AccountId, ProductId};
use engine::{CommandError, RequestContext};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use store::lease::NodeAddress;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// The header carrying the node secret on node-to-node requests.
pub const NODE_SECRET_HEADER: &str = "x-ledger-node-secret";
/// Shortest node secret accepted, in bytes.
pub const NODE_SECRET_BYTES_MIN: usize = 16;
/// How long connecting to an owner may take before it is unreachable.
pub const FORWARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Idle keep-alive connections kept per owner node.
pub const FORWARD_IDLE_CONNECTIONS_MAX: usize = 256;
/// Largest answer relayed from an owner, in bytes (a batch's answers).
pub const FORWARD_ANSWER_BYTES_MAX: usize = 1024 * 1024;
/// Most purchases forwarded to one owner in one request (a batch stays
/// under the 64 KiB body limit: a forwarded purchase is at most ~350 bytes).
pub const FORWARD_BATCH_MAX: usize = 128;
/// Batches in flight to one owner at once; purchases arriving meanwhile
/// wait for a slot and go together in the next batch.
pub const FORWARD_BATCHES_IN_FLIGHT_MAX: usize = 4;
/// Owner nodes a node keeps a purchase batcher for (nodes of the cluster:
/// URLs come from the lease table, which only nodes write).
pub const FORWARD_OWNERS_MAX: usize = 64;

/// How this node takes part in a cluster (`ledger serve`).
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterOptions {
    /// This node's id among the nodes on one database (default: a new
    /// random id per start).
    #[arg(long, env = "LEDGER_NODE_ID")]
    pub node_id: Option<String>,
    /// The base URL other nodes reach this node at (`http://host:port`).
    /// With it (and `--node-secret`), on PostgreSQL, the node takes product
    /// leases: one node runs each product's writer, the others forward to
    /// it. Without it the node owns every product it is asked about.
    #[arg(long, env = "LEDGER_ADVERTISE_URL", requires = "node_secret")]
    pub advertise_url: Option<String>,
    /// The secret nodes present to each other (at least 16 bytes, the same
    /// on every node). Without it forwarded requests are refused.
    #[arg(long, env = "LEDGER_NODE_SECRET", hide_env_values = true)]
    pub node_secret: Option<String>,
    /// How long a product lease runs without renewal (a dead owner's
    /// products are taken over within this, plus a request's claim).
    #[arg(long, env = "LEDGER_LEASE_TTL", default_value = "3s", value_parser = super::parse_duration)]
    pub lease_ttl: Duration,
    /// How often a product's owner renews its lease (at most half the TTL).
    #[arg(long, env = "LEDGER_LEASE_RENEW", default_value = "1s", value_parser = super::parse_duration)]
    pub lease_renew: Duration,
    /// Longest a forwarded request may take before it is answered 503.
    #[arg(long, env = "LEDGER_FORWARD_TIMEOUT", default_value = "10s", value_parser = super::parse_duration)]
    pub forward_timeout: Duration,
    /// Forwarded requests this node may have in flight at once; more are
    /// answered 503 `unavailable` with `Retry-After`.
    #[arg(long, env = "LEDGER_FORWARD_IN_FLIGHT_MAX", default_value_t = 2_048)]
    pub forward_in_flight_max: usize,
}

impl Default for ClusterOptions {
    fn default() -> ClusterOptions {
        ClusterOptions {
            node_id: None,
            advertise_url: None,
            node_secret: None,
            lease_ttl: engine::ownership::LEASE_TTL_DEFAULT,
            lease_renew: engine::ownership::LEASE_RENEW_PERIOD_DEFAULT,
            forward_timeout: Duration::from_secs(10),
            forward_in_flight_max: 2_048,
        }
    }
}

impl ClusterOptions {
    /// Checks the options together.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(secret) = &self.node_secret {
            anyhow::ensure!(
                secret.len() >= NODE_SECRET_BYTES_MIN
                    && secret.bytes().all(|b| b.is_ascii_graphic()),
                "--node-secret must be at least {NODE_SECRET_BYTES_MIN} printable characters without spaces"
            );
        }
        if let Some(url) = &self.advertise_url {
            let parsed = reqwest::Url::parse(url)
                .map_err(|error| anyhow::anyhow!("--advertise-url {url:?}: {error}"))?;
            anyhow::ensure!(
                parsed.scheme() == "http" && parsed.host().is_some() && parsed.path() == "/",
                "--advertise-url must be http://host:port"
            );
            anyhow::ensure!(
                self.node_secret.is_some(),
                "--advertise-url needs --node-secret"
            );
        }
        if let Some(id) = &self.node_id {
            anyhow::ensure!(
                (1..=64).contains(&id.len())
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')),
                "--node-id must be 1 to 64 characters of [A-Za-z0-9._-]"
            );
        }
        anyhow::ensure!(
            self.lease_renew * 2 <= self.lease_ttl,
            "--lease-renew must be at most half of --lease-ttl"
        );
        anyhow::ensure!(
            self.forward_in_flight_max > 0,
            "--forward-in-flight-max must be positive"
        );
        Ok(())
    }

    /// This node as leases name it, when it takes part in a cluster.
    pub fn node(&self) -> Option<NodeAddress> {
        let url = self.advertise_url.as_ref()?;
        let node_id = self
            .node_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        Some(NodeAddress {
            node_id,
            url: url.trim_end_matches('/').to_owned(),
        })
    }
}

/// Forwarding counters (per node, for tests and metrics).
#[derive(Debug, Default)]
pub struct ForwardStats {
    /// Requests sent to an owner that answered.
    pub forwarded: AtomicU64,
    /// Requests not forwarded: the owner could not be reached, or the
    /// bound on requests in flight was hit.
    pub unreachable: AtomicU64,
    /// Forwarded requests this node served as the owner.
    pub served: AtomicU64,
}

/// Sends requests for products other nodes own to their owner.
pub struct Forwarder {
    client: reqwest::Client,
    /// SHA-256 of the node secret (`None`: forwarding refused both ways).
    secret_hash: Option<[u8; 32]>,
    secret: Option<HeaderValue>,
    in_flight: Arc<Semaphore>,
    timeout: Duration,
    /// One purchase batcher per owner URL.
    batchers: std::sync::Mutex<std::collections::HashMap<String, mpsc::Sender<Pending>>>,
    /// Counters.
    pub stats: Arc<ForwardStats>,
}

/// A purchase waiting for its batch, and who waits for its answer.
struct Pending {
    purchase: BatchedPurchase,
    reply: oneshot::Sender<Option<RelayedAnswer>>,
}

impl Forwarder {
    /// A forwarder with these options.
    pub fn new(options: &ClusterOptions) -> anyhow::Result<Forwarder> {
        let client = reqwest::Client::builder()
            .connect_timeout(FORWARD_CONNECT_TIMEOUT)
            .timeout(options.forward_timeout)
            .pool_max_idle_per_host(FORWARD_IDLE_CONNECTIONS_MAX)
            .tcp_nodelay(true)
            .build()?;
        let secret = match &options.node_secret {
            Some(secret) => Some(HeaderValue::from_str(secret)?),
            None => None,
        };
        Ok(Forwarder {
            client,
            secret_hash: options
                .node_secret
                .as_ref()
                .map(|secret| Sha256::digest(secret.as_bytes()).into()),
            secret,
            in_flight: Arc::new(Semaphore::new(options.forward_in_flight_max)),
            timeout: options.forward_timeout,
            batchers: std::sync::Mutex::new(std::collections::HashMap::new()),
            stats: Arc::default(),
        })
    }

    /// The batcher of purchases for one owner, started on first use.
    fn batcher(&self, url: &str, secret: HeaderValue) -> Option<mpsc::Sender<Pending>> {
        let mut batchers = self.batchers.lock().expect("BUG: batchers poisoned");
        if let Some(batcher) = batchers.get(url).filter(|b| !b.is_closed()) {
            return Some(batcher.clone());
        }
        batchers.retain(|_, batcher| !batcher.is_closed());
        if batchers.len() >= FORWARD_OWNERS_MAX {
            return None;
        }
        let (sender, receiver) = mpsc::channel(self.in_flight.available_permits().max(1));
        let batches = Batches {
            client: self.client.clone(),
            url: format!("{url}/internal/v1/purchases"),
            secret,
            timeout: self.timeout,
            stats: self.stats.clone(),
        };
        tokio::spawn(batches.run(receiver));
        batchers.insert(url.to_owned(), sender.clone());
        Some(sender)
    }

    /// Forwards a purchase to its owner within a batch, and relays the
    /// owner's answer to it.
    async fn forward_purchase(
        &self,
        engine: &engine::Engine,
        owner: &NodeAddress,
        purchase: BatchedPurchase,
    ) -> Result<Response, ApiError> {
        let unavailable = || ApiError::Unavailable("the product's owner node".into());
        let Some(secret) = self.secret.clone() else {
            tracing::warn!(owner = %owner.node_id, "another node owns the product but this node has no --node-secret");
            return Err(unavailable());
        };
        let Ok(_permit) = self.in_flight.try_acquire() else {
            self.stats.unreachable.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("ledger_forwarded_total", "outcome" => "in_flight_max").increment(1);
            return Err(unavailable());
        };
        let batcher = self.batcher(&owner.url, secret).ok_or_else(unavailable)?;
        let product_id = ProductId::parse(&purchase.product_id).map_err(|_| unavailable())?;
        let (reply, answer) = oneshot::channel();
        batcher
            .send(Pending { purchase, reply })
            .await
            .map_err(|_| unavailable())?;
        match answer.await.ok().flatten() {
            Some(answer) => Ok(answer.into_response()),
            None => {
                engine.claim_when_lapsed(&product_id);
                Err(unavailable())
            }
        }
    }

    /// Whether a request carries this cluster's node secret. Digests are
    /// compared, so the comparison's time says nothing about the secret.
    pub fn is_node(&self, headers: &HeaderMap) -> bool {
        let (Some(expected), Some(presented)) = (self.secret_hash, headers.get(NODE_SECRET_HEADER))
        else {
            return false;
        };
        let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        presented == expected
    }

    /// Sends a request to the owner's internal route and relays its answer
    /// (status, body, `Content-Type`, `Retry-After`) unchanged.
    async fn forward<T: Serialize>(
        &self,
        engine: &engine::Engine,
        product_id: &ProductId,
        owner: &NodeAddress,
        path: &str,
        body: &T,
        request_id: Option<&str>,
    ) -> Result<Response, ApiError> {
        let unavailable = || ApiError::Unavailable("the product's owner node".into());
        let Some(secret) = self.secret.clone() else {
            tracing::warn!(owner = %owner.node_id, "another node owns the product but this node has no --node-secret");
            return Err(unavailable());
        };
        let Ok(_permit) = self.in_flight.try_acquire() else {
            self.stats.unreachable.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("ledger_forwarded_total", "outcome" => "in_flight_max").increment(1);
            return Err(unavailable());
        };
        let mut request = self
            .client
            .post(format!("{}{path}", owner.url))
            .header(NODE_SECRET_HEADER, secret)
            .json(body);
        if let Some(request_id) = request_id {
            request = request.header(REQUEST_ID_HEADER, request_id);
        }
        let answer = match request.send().await {
            Ok(answer) => answer,
            Err(error) => {
                self.stats.unreachable.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("ledger_forwarded_total", "outcome" => "unreachable")
                    .increment(1);
                // The owner may be gone (or stopped): its lease is claimed
                // here once it runs out, with or without traffic.
                tracing::warn!(owner = %owner.node_id, %product_id, %error, "the product's owner did not answer");
                engine.claim_when_lapsed(product_id);
                return Err(unavailable());
            }
        };
        let status = StatusCode::from_u16(answer.status().as_u16()).map_err(|_| unavailable())?;
        let mut headers = HeaderMap::new();
        for name in [header::CONTENT_TYPE, header::RETRY_AFTER] {
            if let Some(value) = answer.headers().get(name.as_str()) {
                let value = HeaderValue::from_bytes(value.as_bytes()).map_err(|_| unavailable())?;
                headers.insert(name, value);
            }
        }
        let body = read_bounded(answer).await.map_err(|error| {
            tracing::warn!(owner = %owner.node_id, %error, "the owner's answer was cut off");
            unavailable()
        })?;
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("ledger_forwarded_total", "outcome" => "relayed").increment(1);
        let mut response = (status, Body::from(body)).into_response();
        response.headers_mut().extend(headers);
        Ok(response)
    }
}

/// Sends one owner's purchases in batches.
struct Batches {
    client: reqwest::Client,
    url: String,
    secret: HeaderValue,
    timeout: Duration,
    stats: Arc<ForwardStats>,
}

impl Batches {
    /// Takes what is queued (up to `FORWARD_BATCH_MAX`) once a batch slot is
    /// free, and sends it; ends when the forwarder is dropped.
    async fn run(self, mut queue: mpsc::Receiver<Pending>) {
        let batches = Arc::new(self);
        let slots = Arc::new(Semaphore::new(FORWARD_BATCHES_IN_FLIGHT_MAX));
        while let Some(first) = queue.recv().await {
            let slot = slots
                .clone()
                .acquire_owned()
                .await
                .expect("BUG: the batch slots are never closed");
            let mut batch = vec![first];
            while batch.len() < FORWARD_BATCH_MAX {
                match queue.try_recv() {
                    Ok(pending) => batch.push(pending),
                    Err(_) => break,
                }
            }
            let batches = batches.clone();
            tokio::spawn(async move {
                batches.send(batch).await;
                drop(slot);
            });
        }
    }

    /// Sends a batch and hands each purchase its answer (`None` to all when
    /// the owner could not be reached or answered out of contract).
    async fn send(&self, batch: Vec<Pending>) {
        let (purchases, replies): (Vec<BatchedPurchase>, Vec<_>) = batch
            .into_iter()
            .map(|pending| (pending.purchase, pending.reply))
            .unzip();
        let count = purchases.len();
        let answers = self.exchange(ForwardedBatch { purchases }).await;
        match answers {
            Ok(answers) if answers.len() == count => {
                self.stats
                    .forwarded
                    .fetch_add(count as u64, Ordering::Relaxed);
                metrics::counter!("ledger_forwarded_total", "outcome" => "relayed")
                    .increment(count as u64);
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(Some(answer));
                }
            }
            outcome => {
                if let Err(error) = outcome {
                    tracing::warn!(url = %self.url, %error, "the product's owner did not answer");
                }
                self.stats
                    .unreachable
                    .fetch_add(count as u64, Ordering::Relaxed);
                metrics::counter!("ledger_forwarded_total", "outcome" => "unreachable")
                    .increment(count as u64);
                for reply in replies {
                    let _ = reply.send(None);
                }
            }
        }
    }

    async fn exchange(&self, batch: ForwardedBatch) -> anyhow::Result<Vec<RelayedAnswer>> {
        let answer = self
            .client
            .post(&self.url)
            .header(NODE_SECRET_HEADER, self.secret.clone())
            .timeout(self.timeout)
            .json(&batch)
            .send()
            .await?;
        anyhow::ensure!(
            answer.status() == reqwest::StatusCode::OK,
            "the owner answered {}",
            answer.status()
        );
        let body = read_bounded(answer).await?;
        let answers: ForwardedAnswers = serde_json::from_slice(&body)?;
        Ok(answers.answers)
    }
}

async fn read_bounded(mut answer: reqwest::Response) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    while let Some(chunk) = answer.chunk().await? {
        anyhow::ensure!(
            body.len() + chunk.len() <= FORWARD_ANSWER_BYTES_MAX,
            "the answer is over {FORWARD_ANSWER_BYTES_MAX} bytes"
        );
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Who asked, as forwarded between nodes.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForwardedCaller {
    /// The user.
    pub actor_id: Option<String>,
    /// Their role.
    pub actor_role: String,
    /// The request id at the node that took the request.
    pub request_id: Option<String>,
}

impl ForwardedCaller {
    fn of(context: &RequestContext) -> ForwardedCaller {
        ForwardedCaller {
            actor_id: context.actor_id.clone(),
            actor_role: context.actor_role.clone(),
            request_id: context.request_id.clone(),
        }
    }

    fn context(self) -> RequestContext {
        RequestContext {
            actor_id: self.actor_id,
            actor_role: self.actor_role,
            request_id: self.request_id,
            command_id: uuid::Uuid::now_v7(),
        }
    }
}

/// A purchase forwarded to its product's owner.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForwardedPurchase {
    /// The buyer's account.
    #[schema(value_type = String)]
    pub account_id: uuid::Uuid,
    /// Units, positive.
    pub amount: i64,
    /// The buyer's key (fixes the order id).
    pub idempotency_key: String,
    /// Who asked.
    pub caller: ForwardedCaller,
}

/// A purchase within a batch: its product and the purchase.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchedPurchase {
    /// The product.
    pub product_id: String,
    /// The purchase.
    pub purchase: ForwardedPurchase,
}

/// Purchases forwarded to their products' owner in one request.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForwardedBatch {
    /// At most `FORWARD_BATCH_MAX`.
    pub purchases: Vec<BatchedPurchase>,
}

/// The owner's answer to one purchase of a batch, as the purchase route
/// would have answered it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RelayedAnswer {
    /// Its HTTP status.
    pub status: u16,
    /// Its `Retry-After` header, if any.
    pub retry_after: Option<String>,
    /// Its JSON body.
    #[schema(value_type = Object)]
    pub body: serde_json::Value,
}

impl RelayedAnswer {
    async fn of(response: Response) -> RelayedAnswer {
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let bytes = axum::body::to_bytes(response.into_body(), FORWARD_ANSWER_BYTES_MAX)
            .await
            .unwrap_or_default();
        RelayedAnswer {
            status,
            retry_after,
            body: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        }
    }

    fn into_response(self) -> Response {
        let Ok(status) = StatusCode::from_u16(self.status) else {
            return ApiError::Unavailable("the product's owner node".into()).into_response();
        };
        let mut response = (status, Json(self.body)).into_response();
        if let Some(value) = self
            .retry_after
            .and_then(|value| HeaderValue::from_str(&value).ok())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

/// The owner's answers to a batch, in the batch's order.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ForwardedAnswers {
    /// One per purchase.
    pub answers: Vec<RelayedAnswer>,
}

/// A product command forwarded to its product's owner.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case", tag = "command")]
pub enum ForwardedCommand {
    /// List the product.
    List {
        /// Its terms.
        #[schema(value_type = Object)]
        terms: ProductTerms,
        /// Who asked.
        caller: ForwardedCaller,
    },
    /// Open its sale.
    Open {
        /// Who asked.
        caller: ForwardedCaller,
    },
    /// Close its sale.
    Close {
        /// Who asked.
        caller: ForwardedCaller,
    },
}

/// A purchase for a product another node owns: forwarded, its answer relayed.
pub async fn forward_purchase(
    state: &AppState,
    owner: &NodeAddress,
    request: engine::PurchaseRequest,
) -> Result<Response, ApiError> {
    let purchase = BatchedPurchase {
        product_id: request.product_id.as_str().to_owned(),
        purchase: ForwardedPurchase {
            account_id: request.account_id.0,
            amount: request.amount.minor(),
            idempotency_key: request.idempotency_key,
            caller: ForwardedCaller::of(&request.context),
        },
    };
    state
        .forwarder
        .forward_purchase(&state.engine, owner, purchase)
        .await
}

/// Runs a product command here, or at the product's owner: `Ok(Ok(append))`
/// when done (the append when done here; `None` when it was already
/// satisfied or done there), `Ok(Err(answer))` when the owner refused it
/// (its answer, to relay unchanged).
pub async fn product_command(
    state: &AppState,
    product_id: &ProductId,
    command: ProductCommand,
    context: RequestContext,
) -> Result<Result<Option<store::Appended>, Response>, ApiError> {
    let caller = ForwardedCaller::of(&context);
    let request_id = context.request_id.clone();
    let forwarded = match &command {
        ProductCommand::List { terms, .. } => ForwardedCommand::List {
            terms: terms.clone(),
            caller,
        },
        ProductCommand::Open => ForwardedCommand::Open { caller },
        ProductCommand::Close => ForwardedCommand::Close { caller },
        _ => return Err(ApiError::InvalidRequest("not a product command".into())),
    };
    match state
        .engine
        .product_command(product_id, command, context)
        .await
    {
        Ok(appended) => Ok(Ok(appended)),
        Err(CommandError::NotOwner(owner)) => {
            let path = format!("/internal/v1/products/{product_id}/commands");
            let answer = state
                .forwarder
                .forward(
                    &state.engine,
                    product_id,
                    &owner,
                    &path,
                    &forwarded,
                    request_id.as_deref(),
                )
                .await?;
            // The owner's success is this node's: its position is read
            // from the log's head here, which is at or after the owner's
            // append (the owner answered once it committed).
            if answer.status().is_success() {
                Ok(Ok(None))
            } else {
                Ok(Err(answer))
            }
        }
        Err(error) => Err(ApiError::from(error)),
    }
}

/// `POST /internal/v1/purchases` (nodes only): purchases other nodes took,
/// decided by this node's writers (all queued at once, so they share
/// turns), each answered as `POST /v1/products/{product_id}/purchases`
/// would be.
#[utoipa::path(post, path = "/internal/v1/purchases", tag = "cluster",
    security(("node" = [])), request_body = ForwardedBatch,
    responses((status = 200, body = ForwardedAnswers),
        (status = 400, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn purchases(
    State(state): State<AppState>,
    JsonBody(batch): JsonBody<ForwardedBatch>,
) -> Result<Json<ForwardedAnswers>, ApiError> {
    if batch.purchases.len() > FORWARD_BATCH_MAX {
        return Err(ApiError::InvalidRequest(format!(
            "at most {FORWARD_BATCH_MAX} purchases per batch"
        )));
    }
    state
        .forwarder
        .stats
        .served
        .fetch_add(batch.purchases.len() as u64, Ordering::Relaxed);
    let decided = batch
        .purchases
        .into_iter()
        .map(|purchase| decide_forwarded(&state, purchase));
    let answers = futures::future::join_all(decided).await;
    Ok(Json(ForwardedAnswers { answers }))
}

async fn decide_forwarded(state: &AppState, batched: BatchedPurchase) -> RelayedAnswer {
    let request = parse_product_id(&batched.product_id).and_then(|product_id| {
        let purchase = batched.purchase;
        Ok(engine::PurchaseRequest {
            product_id,
            account_id: AccountId(purchase.account_id),
            amount: super::model::positive_amount(purchase.amount)?,
            idempotency_key: purchase.idempotency_key,
            context: purchase.caller.context(),
        })
    });
    let response = match request {
        Ok(request) => products::purchase_here(state, request).await,
        Err(error) => Err(error),
    };
    RelayedAnswer::of(response.unwrap_or_else(IntoResponse::into_response)).await
}

/// `POST /internal/v1/products/{product_id}/commands` (nodes only): a
/// product command another node took, run by this node's writer.
#[utoipa::path(post, path = "/internal/v1/products/{product_id}/commands", tag = "cluster",
    security(("node" = [])), request_body = ForwardedCommand,
    params(("product_id" = String, Path, description = "The product",
        pattern = r"^[A-Za-z0-9._-]{1,64}$")),
    responses((status = 200, description = "Done (`appended`: whether events were written)"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn command(
    State(state): State<AppState>,
    PathText(product_id): PathText,
    JsonBody(forwarded): JsonBody<ForwardedCommand>,
) -> Result<Json<serde_json::Value>, ApiError> {
    state.forwarder.stats.served.fetch_add(1, Ordering::Relaxed);
    let product_id = parse_product_id(&product_id)?;
    let (command, caller) = match forwarded {
        ForwardedCommand::List { terms, caller } => (
            ProductCommand::List {
                product_id: product_id.clone(),
                terms,
            },
            caller,
        ),
        ForwardedCommand::Open { caller } => (ProductCommand::Open, caller),
        ForwardedCommand::Close { caller } => (ProductCommand::Close, caller),
    };
    match state
        .engine
        .product_command(&product_id, command, caller.context())
        .await
    {
        Ok(appended) => Ok(Json(serde_json::json!({ "appended": appended.is_some() }))),
        // Ownership moved since the other node looked: no second hop.
        Err(CommandError::NotOwner(_)) => Err(ApiError::Unavailable("the product's owner".into())),
        Err(error) => Err(ApiError::from(error)),
    }
}
