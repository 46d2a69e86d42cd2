//! The auditors' routes: the log itself, page by page with its hashes, and
//! a walk of the hash chain.

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::model::{PathText, ProgressResponse};
use crate::audit::{AsOf, ExportedEvent};
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Events per page when `limit` is not given.
pub const EVENTS_PAGE_DEFAULT: u32 = 100;
/// Most events per page.
pub const EVENTS_PAGE_MAX: u32 = 1_000;

/// Paging of the log.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsParams {
    /// Events after this position (0: from the start).
    #[param(minimum = 0)]
    pub after: Option<i64>,
    /// 1 to 1000, default 100.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// A page of the log.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventsResponse {
    /// The events, in position order, each with its hash and the one before.
    pub events: Vec<ExportedEvent>,
    /// Pass as `after` for the next page; null at the head.
    pub next: Option<i64>,
}

/// What a walk of the chain found.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VerifyResponse {
    /// True when every stored hash matches.
    pub ok: bool,
    /// Events walked.
    pub events_checked: u64,
    /// The first event whose hash does not match.
    pub first_bad_position: Option<i64>,
    /// The last event's hash (publish it to anchor the log).
    pub head_hash: Option<String>,
}

/// `GET /v1/audit/events` (auditor): the log with hashes and metadata.
#[utoipa::path(get, path = "/v1/audit/events", tag = "audit", security(("bearer" = [])),
    params(EventsParams),
    responses((status = 200, body = EventsResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn events(
    State(state): State<AppState>,
    params: Result<Query<EventsParams>, QueryRejection>,
) -> Result<Json<EventsResponse>, ApiError> {
    let Query(params) = params
        .map_err(|e| ApiError::InvalidRequest(format!("invalid query: {}", e.body_text())))?;
    let limit = params.limit.unwrap_or(EVENTS_PAGE_DEFAULT);
    if !(1..=EVENTS_PAGE_MAX).contains(&limit) {
        return Err(ApiError::InvalidRequest("limit must be 1 to 1000".into()));
    }
    let after = params.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::InvalidRequest(
            "after must not be negative".into(),
        ));
    }
    // The hash before the page: the stored hash of the event at or before
    // `after` (one read of a single event). A log without a hash chain
    // (EventStoreDB) answers empty hashes.
    let previous = if !state.store.keeps_hash_chain() {
        String::new()
    } else if after == 0 {
        store::chain::GENESIS.to_owned()
    } else {
        previous_hash(&state, after).await?
    };
    let page = state.store.read_all(after, limit as usize).await?;
    let next = (page.len() == limit as usize)
        .then(|| page.last().map(|e| e.position))
        .flatten();
    let mut previous = previous;
    let events = page
        .into_iter()
        .map(|event| {
            let hash = event.hash.clone().unwrap_or_default();
            ExportedEvent::from_recorded(event, std::mem::replace(&mut previous, hash))
        })
        .collect();
    Ok(Json(EventsResponse { events, next }))
}

/// The stored hash of the last event at or before `position`, looking back
/// page by page over any holes rolled-back appends left in the positions.
async fn previous_hash(state: &AppState, position: i64) -> Result<String, ApiError> {
    const LOOK_BACK: i64 = 1_000;
    // Past the head, the head's hash: never walk back from an absurd `after`.
    let mut until = position.min(state.store.head().await?);
    while until > 0 {
        let from = (until - LOOK_BACK).max(0);
        let events = state.store.read_all(from, LOOK_BACK as usize).await?;
        if let Some(event) = events.into_iter().rfind(|e| e.position <= until) {
            return event.hash.ok_or_else(|| {
                ApiError::Internal(anyhow::anyhow!("event {} has no hash", event.position))
            });
        }
        until = from;
    }
    Ok(store::chain::GENESIS.to_owned())
}

/// `POST /v1/audit/verify` (auditor): walks the whole chain; 501
/// `not_supported` on a log that keeps none (EventStoreDB).
#[utoipa::path(post, path = "/v1/audit/verify", tag = "audit", security(("bearer" = [])),
    responses((status = 200, body = VerifyResponse), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 501, body = ErrorBody)))]
pub async fn verify(State(state): State<AppState>) -> Result<Json<VerifyResponse>, ApiError> {
    let report = state.store.verify_chain(&|_| {}).await?;
    if !report.ok {
        tracing::error!(first_bad_position = ?report.first_bad_position, "hash chain broken");
    }
    Ok(Json(VerifyResponse {
        ok: report.ok,
        events_checked: report.events_checked,
        first_bad_position: report.first_bad_position,
        head_hash: report.head_hash,
    }))
}

/// `?as_of=` of a product's progress in history.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ProgressAsOfParams {
    /// A log position, or an RFC 3339 time: the sale as it stood then.
    pub as_of: String,
}

/// `GET /v1/audit/products/{product_id}/progress?as_of=` (auditor): a
/// product's sale progress as it stood at a position or time, folded by
/// the product's own decider from its stream (not from the read model, so
/// it can be set beside the read model's figures). 404 when the product
/// was not listed by then.
#[utoipa::path(get, path = "/v1/audit/products/{product_id}/progress", tag = "audit",
    security(("bearer" = [])),
    params(("product_id" = String, Path, description = "The product",
        pattern = r"^[A-Za-z0-9._-]{1,64}$"), ProgressAsOfParams),
    responses((status = 200, body = ProgressResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn progress_as_of(
    State(state): State<AppState>,
    PathText(product_id): PathText,
    params: Result<Query<ProgressAsOfParams>, QueryRejection>,
) -> Result<Json<ProgressResponse>, ApiError> {
    use domain::Decider;
    use domain::product::{ProductEvent, ProductSale, SaleStatus};
    let product_id = super::handlers::parse_product_id(&product_id)?;
    let Query(params) = params
        .map_err(|e| ApiError::InvalidRequest(format!("invalid query: {}", e.body_text())))?;
    let as_of: AsOf = params.as_of.parse().map_err(ApiError::InvalidRequest)?;
    let events = state.store.read_stream_to_end(&product_id.stream()).await?;
    let mut sale = domain::product::ProductState::default();
    let (mut position, mut opened_at, mut sold_out_at) = (0, None, None);
    for recorded in events.iter().filter(|e| as_of.covers(e)) {
        let event = engine::aggregate::decode::<ProductSale>(recorded)?;
        let time = projections::envelope::time_text(recorded.recorded_at);
        if matches!(event, ProductEvent::SaleOpened {}) && opened_at.is_none() {
            opened_at = Some(time.clone());
        }
        sale = ProductSale::evolve(sale, &event);
        let sold_out = sale
            .sale
            .as_ref()
            .is_some_and(|s| s.status() == SaleStatus::SoldOut);
        if sold_out && sold_out_at.is_none() {
            sold_out_at = Some(time);
        }
        position = recorded.position;
    }
    let sale = sale.sale.ok_or(ApiError::NotFound)?;
    let status = match sale.status() {
        SaleStatus::Closed => "closed",
        SaleStatus::Open => "open",
        SaleStatus::FullyReserved => "fully_reserved",
        SaleStatus::SoldOut => "sold_out",
    };
    Ok(Json(ProgressResponse {
        product_id: product_id.as_str().to_owned(),
        quota: sale.terms.quota.minor(),
        confirmed: sale.confirmed.minor(),
        reserved: sale.pending.minor(),
        available: sale.available().minor(),
        status: status.to_owned(),
        orders: i64::try_from(sale.confirmed_orders).expect("BUG: orders fit in i64"),
        position,
        name: sale.terms.name.clone(),
        opened_at,
        sold_out_at,
    }))
}

/// Chain verifications kept in memory, newest first; older ones are
/// forgotten (their results were answered to whoever watched them).
pub const VERIFICATIONS_KEPT_MAX: usize = 16;

/// One walk of the chain started by `POST /v1/audit/verifications`, with
/// its progress.
#[derive(Debug)]
struct Verification {
    id: String,
    head: i64,
    started_at: String,
    checked_position: std::sync::atomic::AtomicI64,
    outcome: std::sync::Mutex<Option<Result<VerifyResponse, String>>>,
}

/// The node's chain verifications: at most one walks at a time.
#[derive(Debug, Default)]
pub struct Verifications {
    jobs: std::sync::Mutex<std::collections::VecDeque<std::sync::Arc<Verification>>>,
}

/// A verification as answered.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VerificationResponse {
    /// Its id.
    pub verification_id: String,
    /// `running`, `done` (see `result`) or `failed` (see `error`).
    pub state: String,
    /// The log's head when it started: it walks up to here at least.
    pub head: i64,
    /// The last position checked so far.
    pub checked_position: i64,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// The walk's result, once done.
    pub result: Option<VerifyResponse>,
    /// Why it could not finish, if it failed.
    pub error: Option<String>,
}

impl Verification {
    fn answer(&self) -> VerificationResponse {
        let outcome = self.outcome.lock().expect("BUG: poisoned").clone();
        let (state, result, error) = match outcome {
            None => ("running", None, None),
            Some(Ok(result)) => ("done", Some(result), None),
            Some(Err(error)) => ("failed", None, Some(error)),
        };
        VerificationResponse {
            verification_id: self.id.clone(),
            state: state.to_owned(),
            head: self.head,
            checked_position: self
                .checked_position
                .load(std::sync::atomic::Ordering::Relaxed),
            started_at: self.started_at.clone(),
            result,
            error,
        }
    }
}

/// `POST /v1/audit/verifications` (auditor): starts walking the chain in
/// the background and answers at once, so a page can show the walk's
/// progress; while one runs, answers that one.
#[utoipa::path(post, path = "/v1/audit/verifications", tag = "audit", security(("bearer" = [])),
    responses((status = 202, body = VerificationResponse), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 501, body = ErrorBody)))]
pub async fn start_verification(
    State(state): State<AppState>,
) -> Result<(axum::http::StatusCode, Json<VerificationResponse>), ApiError> {
    if !state.store.keeps_hash_chain() {
        return Err(ApiError::NotSupported(
            "this event store keeps no hash chain".into(),
        ));
    }
    let head = state.store.head().await?;
    let job = {
        let mut jobs = state.verifications.jobs.lock().expect("BUG: poisoned");
        if let Some(running) = jobs
            .iter()
            .find(|job| job.outcome.lock().expect("BUG: poisoned").is_none())
        {
            let answer = running.answer();
            return Ok((axum::http::StatusCode::ACCEPTED, Json(answer)));
        }
        let job = std::sync::Arc::new(Verification {
            id: uuid::Uuid::now_v7().to_string(),
            head,
            started_at: projections::envelope::time_text(chrono::Utc::now()),
            checked_position: std::sync::atomic::AtomicI64::new(0),
            outcome: std::sync::Mutex::new(None),
        });
        jobs.push_front(job.clone());
        jobs.truncate(VERIFICATIONS_KEPT_MAX);
        job
    };
    let answer = job.answer();
    let store = state.store.clone();
    tokio::spawn(async move {
        let watched = job.clone();
        let progress = move |position: i64| {
            watched
                .checked_position
                .fetch_max(position, std::sync::atomic::Ordering::Relaxed);
        };
        let outcome = match store.verify_chain(&progress).await {
            Ok(report) => {
                if !report.ok {
                    tracing::error!(first_bad_position = ?report.first_bad_position, "hash chain broken");
                }
                Ok(VerifyResponse {
                    ok: report.ok,
                    events_checked: report.events_checked,
                    first_bad_position: report.first_bad_position,
                    head_hash: report.head_hash,
                })
            }
            Err(error) => {
                tracing::warn!(%error, "chain verification failed");
                Err("the event store could not be read to the end; start again".to_owned())
            }
        };
        *job.outcome.lock().expect("BUG: poisoned") = Some(outcome);
    });
    Ok((axum::http::StatusCode::ACCEPTED, Json(answer)))
}

/// `GET /v1/audit/verifications/{verification_id}` (auditor): a
/// verification's progress, then its result (404 once forgotten).
#[utoipa::path(get, path = "/v1/audit/verifications/{verification_id}", tag = "audit",
    security(("bearer" = [])),
    params(("verification_id" = String, Path, description = "The verification",
        pattern = r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$")),
    responses((status = 200, body = VerificationResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn verification(
    State(state): State<AppState>,
    PathText(verification_id): PathText,
) -> Result<Json<VerificationResponse>, ApiError> {
    let id = uuid::Uuid::parse_str(&verification_id)
        .map_err(|_| ApiError::InvalidRequest("verification_id is not a UUID".into()))?
        .to_string();
    let jobs = state.verifications.jobs.lock().expect("BUG: poisoned");
    jobs.iter()
        .find(|job| job.id == id)
        .map(|job| Json(job.answer()))
        .ok_or(ApiError::NotFound)
}
