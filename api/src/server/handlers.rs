//! Operations and sale-progress handlers: health, readiness, metrics,
//! OpenAPI, the dashboard page and the progress routes.

use super::AppState;
use super::error::ApiError;
use super::guard::ClientAddress;
use super::model::{HealthResponse, PathText, ProgressListResponse, ProgressResponse};
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use domain::ProductId;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use projections::query;
use std::sync::OnceLock;

/// The dashboard page: plain HTML and JavaScript, no build step.
const DASHBOARD_HTML: &str = include_str!("dashboard.html");

/// The process's Prometheus recorder, installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("ledger_payout_provider_seconds".into()),
                crate::gateway::PROVIDER_SECONDS_BUCKETS,
            )
            .expect("BUG: static, non-empty buckets")
            .install_recorder()
            .expect("BUG: another metrics recorder was installed")
    })
}

/// The console page (support and audit): plain HTML, no build step.
const CONSOLE_HTML: &str = include_str!("assets/console.html");

/// The static files the pages load, embedded in the binary: name, content
/// type, bytes. Nothing else is served under `/assets/`.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "dashboard.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/dashboard.js"),
    ),
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/console.js"),
    ),
    (
        "ledger.css",
        "text/css; charset=utf-8",
        include_str!("assets/ledger.css"),
    ),
];

/// `GET /console`: the support and audit console (it holds no data; it
/// logs in and calls the API like any client).
#[utoipa::path(get, path = "/console", tag = "operations",
    responses((status = 200, description = "The console page", content_type = "text/html")))]
pub async fn console() -> Html<&'static str> {
    Html(CONSOLE_HTML)
}

/// `GET /assets/{file}`: the pages' scripts and styles.
#[utoipa::path(get, path = "/assets/{file}", tag = "operations",
    params(("file" = String, Path, description = "An asset's name",
        pattern = r"^[a-z]+\.(js|css)$")),
    responses((status = 200, description = "The file", content(
            (String = "text/javascript"), (String = "text/css"))),
        (status = 404, body = super::error::ErrorBody)))]
pub async fn asset(PathText(file): PathText) -> Result<Response, ApiError> {
    let (_, content_type, body) = ASSETS
        .iter()
        .find(|(name, _, _)| *name == file)
        .ok_or(ApiError::NotFound)?;
    let mut response = (*body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// `GET /`: the live progress dashboard.
#[utoipa::path(get, path = "/", tag = "operations",
    responses((status = 200, description = "The dashboard page", content_type = "text/html")))]
pub async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD_HTML)
}

/// `GET /healthz`: the process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, body = HealthResponse)))]
pub async fn health() -> Json<HealthResponse> {
    Json(HealthResponse {
        status: "ok".into(),
        head: None,
        projection_lag: None,
    })
}

/// `GET /readyz`: the databases answer; reports the log head and the
/// projections' lag.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, body = HealthResponse), (status = 503, body = super::error::ErrorBody)))]
pub async fn ready(State(state): State<AppState>) -> Result<Json<HealthResponse>, ApiError> {
    let head = state
        .store
        .head()
        .await
        .map_err(|_| ApiError::Unavailable("the event store".into()))?;
    query::all_progress(&state.db)
        .await
        .map_err(|_| ApiError::Unavailable("the read models".into()))?;
    state
        .access
        .user_count()
        .await
        .map_err(|_| ApiError::Unavailable("the user database".into()))?;
    Ok(Json(HealthResponse {
        status: "ready".into(),
        head: Some(head),
        projection_lag: Some(state.statuses.lag_max()),
    }))
}

/// `GET /metrics`: Prometheus text.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    for (product_id, depth) in state.engine.queue_depths() {
        metrics::gauge!("ledger_purchase_queue_depth", "product_id" => product_id.as_str().to_owned())
            .set(depth as f64);
    }
    for report in state.statuses.report() {
        metrics::gauge!("ledger_projection_lag_events", "projection" => report.projection.to_string())
            .set(report.lag as f64);
    }
    let engine = state.engine.stats();
    metrics::gauge!("ledger_engine_purchases_confirmed").set(engine.purchases_confirmed as f64);
    metrics::gauge!("ledger_engine_purchases_refused").set(engine.purchases_refused as f64);
    metrics::gauge!("ledger_engine_product_conflicts").set(engine.product_conflicts as f64);
    metrics::gauge!("ledger_engine_payouts_parked").set(engine.payouts_parked as f64);
    metrics::gauge!("ledger_engine_recoveries_started").set(engine.recoveries_started as f64);
    metrics::gauge!("ledger_engine_leases_claimed").set(engine.leases_claimed as f64);
    metrics::gauge!("ledger_engine_leases_lost").set(engine.leases_lost as f64);
    metrics::gauge!("ledger_engine_product_appends").set(engine.product_appends as f64);
    let forwarder = &state.forwarder.stats;
    for (outcome, counter) in [
        ("relayed", &forwarder.forwarded),
        ("unreachable", &forwarder.unreachable),
        ("served", &forwarder.served),
    ] {
        metrics::gauge!("ledger_forwards", "outcome" => outcome)
            .set(counter.load(std::sync::atomic::Ordering::Relaxed) as f64);
    }
    // Payouts by status, from the read model (a fixed set of labels). The
    // route is public: the count is read at most once a second, however
    // often it is scraped.
    static PAYOUTS_COUNTED: std::sync::Mutex<Option<std::time::Instant>> =
        std::sync::Mutex::new(None);
    let due = {
        let mut last = PAYOUTS_COUNTED.lock().expect("BUG: poisoned");
        let due = last.is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(1));
        if due {
            *last = Some(std::time::Instant::now());
        }
        due
    };
    if due && let Ok(counts) = projections::query::payout_status_counts(&state.db).await {
        for status in domain::payout::PayoutStatus::ALL {
            let count = counts.get(status.name()).copied().unwrap_or(0);
            metrics::gauge!("ledger_payouts", "status" => status.name()).set(count as f64);
        }
    }
    let mut response = prometheus().render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// `GET /openapi.json`: the contract, generated from the code.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "This document", content_type = "application/json")))]
pub async fn openapi() -> Response {
    let mut response = super::openapi::document_json().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// `GET /v1/progress`: every product's sale progress, from the progress
/// feed's last read when it is fresh enough (see `feed`), else from the
/// database.
#[utoipa::path(get, path = "/v1/progress", tag = "sales",
    responses((status = 200, body = ProgressListResponse)))]
pub async fn all_progress(State(state): State<AppState>) -> Result<Response, ApiError> {
    if let Some(served) = state.feed.served().await {
        state.feed.count_served(true);
        return Ok(json_bytes(served.list.clone()));
    }
    state.feed.count_served(false);
    let products = query::all_progress(&state.db).await?;
    Ok(Json(ProgressListResponse {
        products: products.into_iter().map(ProgressResponse::from).collect(),
    })
    .into_response())
}

/// A body already serialized as JSON.
fn json_bytes(body: Bytes) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// `GET /v1/progress/stream`: server-sent events of progress objects.
#[utoipa::path(get, path = "/v1/progress/stream", tag = "sales",
    responses((status = 200, description = "Server-sent events: `progress` (a progress object) and `stats`; the stream ends after its lifetime (`--stream-lifetime`) and the client reconnects", content_type = "text/event-stream")))]
pub async fn progress_stream(
    State(state): State<AppState>,
    ClientAddress(address): ClientAddress,
) -> Result<Response, ApiError> {
    let slot = state
        .feed
        .admit(&address)
        .ok_or(ApiError::RateLimited(STREAM_RETRY_AFTER_SECONDS))?;
    Ok(Sse::new(state.feed.events(slot))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// Seconds a client refused a stream (too many open) is told to wait.
pub const STREAM_RETRY_AFTER_SECONDS: u64 = 5;

/// `GET /v1/products/{product_id}/progress`.
#[utoipa::path(get, path = "/v1/products/{product_id}/progress", tag = "sales",
    params(("product_id" = String, Path, description = "The product",
        pattern = r"^[A-Za-z0-9._-]{1,64}$")),
    responses((status = 200, body = ProgressResponse), (status = 400, body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody)))]
pub async fn progress(
    State(state): State<AppState>,
    PathText(product_id): PathText,
) -> Result<Response, ApiError> {
    let product_id = parse_product_id(&product_id)?;
    if let Some(served) = state.feed.served().await {
        if let Some(body) = served.by_product.get(product_id.as_str()) {
            state.feed.count_served(true);
            return Ok(json_bytes(body.clone()));
        }
        if served.complete {
            state.feed.count_served(true);
            return Err(ApiError::NotFound);
        }
    }
    state.feed.count_served(false);
    query::progress(&state.db, product_id.as_str())
        .await?
        .map(|p| Json(ProgressResponse::from(p)).into_response())
        .ok_or(ApiError::NotFound)
}

/// A product id from a path or body.
pub fn parse_product_id(text: &str) -> Result<ProductId, ApiError> {
    ProductId::parse(text)
        .map_err(|_| ApiError::InvalidRequest("product_id is not a valid product id".into()))
}

/// Any path no route serves.
pub async fn not_found() -> ApiError {
    ApiError::NotFound
}

/// A known path with a method it does not serve.
pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// A handler panicked (a bug): logged, answered 500 without details.
pub fn panicked(_panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::Internal(anyhow::anyhow!("a handler panicked")).into_response()
}
