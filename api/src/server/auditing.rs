//! The auditors' routes: the log itself, page by page with its hashes, and
//! a walk of the hash chain.

use super::AppState;
use super::error::{ApiError, ErrorBody};
use crate::audit::ExportedEvent;
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
#[derive(Debug, Serialize, Deserialize, ToSchema)]
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
