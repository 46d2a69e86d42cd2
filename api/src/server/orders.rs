//! Orders, their timelines, and payouts.

use super::AppState;
use super::auth::{Caller, Role};
use super::error::{ApiError, ErrorBody};
use super::guard::Context;
use super::model::{
    EntitlementResponse, OrderResponse, PathText, PayoutActionResponse, PayoutListResponse,
    PayoutResponse, TimelineEventResponse, TimelineResponse,
};
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use domain::PayoutId;
use domain::payout::PayoutStatus;
use engine::payouts::{PayoutActionError, PayoutActionReport};
use projections::query;
use serde::Deserialize;
use uuid::Uuid;

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
    /// `succeeded`, `failed`, `parked` or `cancelled` (empty: any).
    #[param(pattern = r"^(scheduled|in_flight|unknown|succeeded|failed|parked|cancelled)?$")]
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
        && !PayoutStatus::ALL.iter().any(|known| known.name() == status)
    {
        let names: Vec<&str> = PayoutStatus::ALL.iter().map(|s| s.name()).collect();
        return Err(ApiError::InvalidRequest(format!(
            "status must be one of {}",
            names.join(", ")
        )));
    }
    let payouts =
        query::payouts(&state.db, product_id.as_ref().map(|p| p.as_str()), status).await?;
    Ok(Json(PayoutListResponse {
        payouts: payouts.into_iter().map(PayoutResponse::from).collect(),
    }))
}

/// `GET /v1/products/{product_id}/entitlements` (operator, support,
/// auditor): what the holders are owed and how much payout runs scheduled.
#[utoipa::path(get, path = "/v1/products/{product_id}/entitlements", tag = "payouts",
    security(("bearer" = [])),
    params(("product_id" = String, Path, description = "The product",
        pattern = r"^[A-Za-z0-9._-]{1,64}$")),
    responses((status = 200, body = EntitlementResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn entitlements(
    State(state): State<AppState>,
    PathText(product_id): PathText,
) -> Result<Json<EntitlementResponse>, ApiError> {
    let product_id = super::handlers::parse_product_id(&product_id)?;
    let entitlement = query::entitlement(&state.db, product_id.as_str())
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(EntitlementResponse {
        product_id: entitlement.product_id,
        term_days: entitlement.term_days,
        principal_total: entitlement.principal_total,
        principal_scheduled: entitlement.principal_scheduled,
        interest_days_scheduled: entitlement.interest_days_scheduled,
        interest_days_remaining: entitlement.interest_days_remaining,
    }))
}

fn parse_payout_id(text: &str) -> Result<PayoutId, ApiError> {
    Uuid::parse_str(text)
        .map(PayoutId)
        .map_err(|_| ApiError::InvalidRequest("payout_id is not a UUID".into()))
}

fn action_answer(
    payout_id: PayoutId,
    outcome: Result<PayoutActionReport, PayoutActionError>,
    action: &str,
) -> Result<Json<PayoutActionResponse>, ApiError> {
    let report = outcome.map_err(|error| match error {
        PayoutActionError::NotFound => ApiError::NotFound,
        PayoutActionError::Conflict(why) => ApiError::Conflict("conflict", why),
        PayoutActionError::Contention => ApiError::Conflict("conflict", error.to_string()),
        PayoutActionError::ProviderUnavailable(_) => {
            ApiError::Unavailable("the payment provider".into())
        }
        PayoutActionError::Store(store) => ApiError::from(store),
    })?;
    tracing::warn!(%payout_id, action, status = report.status.name(), "operator acted on a parked payout");
    Ok(Json(PayoutActionResponse {
        payout_id: payout_id.to_string(),
        status: report.status.name().to_owned(),
        position: report.position,
    }))
}

/// `POST /v1/payouts/{payout_id}/retry` (operator): sends a parked payout
/// back to work; the provider is asked about its key before any new attempt.
#[utoipa::path(post, path = "/v1/payouts/{payout_id}/retry", tag = "payouts",
    security(("bearer" = [])),
    params(("payout_id" = String, Path, description = "The payout",
        pattern = r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes a retry safe",
        min_length = 1, max_length = 128, pattern = r"^[!-~]([ -~]*[!-~])?$")),
    responses((status = 200, body = PayoutActionResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn retry_payout(
    State(state): State<AppState>,
    Context(context): Context,
    PathText(payout_id): PathText,
) -> Result<Json<PayoutActionResponse>, ApiError> {
    let payout_id = parse_payout_id(&payout_id)?;
    let outcome = engine::payouts::retry_parked(
        state.store.as_ref(),
        &engine::SystemClock,
        payout_id,
        &context,
    )
    .await;
    action_answer(payout_id, outcome, "retry")
}

/// `POST /v1/payouts/{payout_id}/cancel` (operator): cancels a parked
/// payout once the provider shows no payment for its key; it keeps its
/// entitlement used and is never created again.
#[utoipa::path(post, path = "/v1/payouts/{payout_id}/cancel", tag = "payouts",
    security(("bearer" = [])),
    params(("payout_id" = String, Path, description = "The payout",
        pattern = r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes a retry safe",
        min_length = 1, max_length = 128, pattern = r"^[!-~]([ -~]*[!-~])?$")),
    responses((status = 200, body = PayoutActionResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn cancel_payout(
    State(state): State<AppState>,
    Context(context): Context,
    PathText(payout_id): PathText,
) -> Result<Json<PayoutActionResponse>, ApiError> {
    let payout_id = parse_payout_id(&payout_id)?;
    let outcome = engine::payouts::cancel_parked(
        state.store.as_ref(),
        state.provider.as_deref(),
        &engine::SystemClock,
        payout_id,
        &context,
    )
    .await;
    action_answer(payout_id, outcome, "cancel")
}
