//! Orders, their timelines, and payouts.

use super::AppState;
use super::auth::{Caller, Role};
use super::error::{ApiError, ErrorBody};
use super::model::{
    OrderResponse, PathText, PayoutListResponse, PayoutResponse, TimelineEventResponse,
    TimelineResponse,
};
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use projections::query;
use serde::Deserialize;
use uuid::Uuid;

/// Payout statuses a filter may name.
const PAYOUT_STATUSES: [&str; 5] = ["scheduled", "in_flight", "unknown", "succeeded", "failed"];

/// The order a path names, if the caller may see it (a customer sees only
/// their own; another's is answered as missing).
async fn visible_order(
    state: &AppState,
    caller: &Caller,
    order_id: &str,
) -> Result<query::Order, ApiError> {
    let order_id = Uuid::parse_str(order_id)
        .map_err(|_| ApiError::InvalidRequest("order_id is not a UUID".into()))?;
    let order = query::order(&state.db, &order_id.to_string())
        .await?
        .ok_or(ApiError::NotFound)?;
    if caller.role == Role::Customer && caller.account_id.as_deref() != Some(&order.account_id) {
        return Err(ApiError::NotFound);
    }
    Ok(order)
}

/// `GET /v1/orders/{order_id}`.
#[utoipa::path(get, path = "/v1/orders/{order_id}", tag = "orders", security(("bearer" = [])),
    params(("order_id" = String, Path, description = "The order",
        pattern = r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$")),
    responses((status = 200, body = OrderResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn order(
    State(state): State<AppState>,
    caller: Caller,
    PathText(order_id): PathText,
) -> Result<Json<OrderResponse>, ApiError> {
    let order = visible_order(&state, &caller, &order_id).await?;
    Ok(Json(OrderResponse::from(order)))
}

/// `GET /v1/orders/{order_id}/timeline`: every event of the order, with who
/// caused it.
#[utoipa::path(get, path = "/v1/orders/{order_id}/timeline", tag = "orders",
    security(("bearer" = [])),
    params(("order_id" = String, Path, description = "The order",
        pattern = r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$")),
    responses((status = 200, body = TimelineResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn timeline(
    State(state): State<AppState>,
    caller: Caller,
    PathText(order_id): PathText,
) -> Result<Json<TimelineResponse>, ApiError> {
    let order = visible_order(&state, &caller, &order_id).await?;
    let events = query::timeline(&state.db, state.store.as_ref(), &order.order_id).await?;
    Ok(Json(TimelineResponse {
        events: events
            .into_iter()
            .map(|event| TimelineEventResponse {
                position: event.position,
                event_type: event.event_type,
                occurred_at: event.occurred_at,
                data: event.data,
                metadata: serde_json::to_value(&event.metadata).expect("BUG: metadata serializes"),
            })
            .collect(),
    }))
}

/// Filters of the payout list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PayoutParams {
    /// Only this product's (empty: any).
    #[param(pattern = r"^([A-Za-z0-9._-]{1,64})?$")]
    pub product_id: Option<String>,
    /// Only in this status: `scheduled`, `in_flight`, `unknown`,
    /// `succeeded` or `failed` (empty: any).
    #[param(pattern = r"^(scheduled|in_flight|unknown|succeeded|failed)?$")]
    pub status: Option<String>,
}

/// `GET /v1/payouts` (operator, support, auditor).
#[utoipa::path(get, path = "/v1/payouts", tag = "payouts", security(("bearer" = [])),
    params(PayoutParams),
    responses((status = 200, body = PayoutListResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn payouts(
    State(state): State<AppState>,
    params: Result<Query<PayoutParams>, QueryRejection>,
) -> Result<Json<PayoutListResponse>, ApiError> {
    let Query(params) = params
        .map_err(|e| ApiError::InvalidRequest(format!("invalid query: {}", e.body_text())))?;
    let product_id = match params.product_id.as_deref().filter(|p| !p.is_empty()) {
        Some(text) => Some(super::handlers::parse_product_id(text)?),
        None => None,
    };
    let status = params.status.as_deref().filter(|s| !s.is_empty());
    if let Some(status) = status
        && !PAYOUT_STATUSES.contains(&status)
    {
        return Err(ApiError::InvalidRequest(format!(
            "status must be one of {}",
            PAYOUT_STATUSES.join(", ")
        )));
    }
    let payouts =
        query::payouts(&state.db, product_id.as_ref().map(|p| p.as_str()), status).await?;
    Ok(Json(PayoutListResponse {
        payouts: payouts.into_iter().map(PayoutResponse::from).collect(),
    }))
}
