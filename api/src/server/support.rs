//! The support console's reads: finding a customer by what they quote
//! (username, account id, order id, deposit reference), an account's
//! orders and payouts, and a payout's timeline. Staff only for the search;
//! a customer sees only their own account's lists (another's is 404).

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::model::{
    OrderResponse, PathText, PayoutListResponse, PayoutResponse, TimelineEventResponse,
    TimelineResponse,
};
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use projections::query;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// Longest search text, in characters.
pub const SEARCH_TEXT_CHARS_MAX: usize = 200;
/// Most customers one search answers.
pub const SEARCH_RESULTS_MAX: usize = 25;
/// Orders per page when `limit` is not given.
pub const ORDERS_PAGE_DEFAULT: u32 = 100;

/// `GET /v1/customers?q=`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SearchParams {
    /// What the customer quoted: a username (exact), an account id, an
    /// order id or a deposit reference. 1 to 200 characters.
    #[param(min_length = 1, max_length = 200)]
    pub q: String,
}

/// How a customer was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MatchedBy {
    /// Their username, exactly.
    Username,
    /// Their account id.
    AccountId,
    /// One of their orders' id.
    OrderId,
    /// The reference of one of their deposits.
    DepositReference,
}

/// A customer found.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CustomerMatch {
    /// Their account.
    pub account_id: String,
    /// Their user id (null for an account no user holds, e.g. generated
    /// histories).
    pub user_id: Option<String>,
    /// Their username (null as above).
    pub username: Option<String>,
    /// What matched.
    pub matched_by: MatchedBy,
    /// The order that matched, when found by order id.
    pub order_id: Option<String>,
}

/// The customers a search found.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SearchResponse {
    /// At most 25, each account once.
    pub customers: Vec<CustomerMatch>,
}

/// `GET /v1/customers` (support, operator, auditor, admin): every customer
/// the text names, by each kind of identifier it could be.
#[utoipa::path(get, path = "/v1/customers", tag = "support", security(("bearer" = [])),
    params(SearchParams),
    responses((status = 200, body = SearchResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn search(
    State(state): State<AppState>,
    params: Result<Query<SearchParams>, QueryRejection>,
) -> Result<Json<SearchResponse>, ApiError> {
    let Query(params) = params
        .map_err(|e| ApiError::InvalidRequest(format!("invalid query: {}", e.body_text())))?;
    let text = params.q.as_str();
    if text.is_empty()
        || text.chars().count() > SEARCH_TEXT_CHARS_MAX
        || text.chars().any(char::is_control)
    {
        return Err(ApiError::InvalidRequest(
            "q must be 1 to 200 characters without control characters".into(),
        ));
    }
    let mut found: Vec<Found> = Vec::new();
    if let Some(user) = state.access.user_by_name(text).await?
        && let Some(account_id) = user.account_id
    {
        found.push((account_id, MatchedBy::Username, None));
    }
    found.extend(read_model_matches(&state.db, text).await?);
    let mut customers: Vec<CustomerMatch> = Vec::new();
    for (account_id, matched_by, order_id) in found {
        if customers.len() == SEARCH_RESULTS_MAX
            || customers.iter().any(|c| c.account_id == account_id)
        {
            continue;
        }
        let user = state.access.user_by_account(&account_id).await?;
        customers.push(CustomerMatch {
            user_id: user.as_ref().map(|(id, _)| id.clone()),
            username: user.map(|(_, name)| name),
            account_id,
            matched_by,
            order_id,
        });
    }
    Ok(Json(SearchResponse { customers }))
}

/// An account found, how, and the order that matched.
pub type Found = (String, MatchedBy, Option<String>);

/// What the read models know the text as: an account id, an order id, a
/// deposit reference (one indexed lookup each; the username is the API's
/// own table).
pub async fn read_model_matches(
    db: &projections::ReadDb,
    text: &str,
) -> Result<Vec<Found>, projections::ProjectionError> {
    let mut found = Vec::new();
    if let Ok(id) = Uuid::parse_str(text) {
        let id = id.to_string();
        if query::balance(db, &id).await?.is_some() {
            found.push((id.clone(), MatchedBy::AccountId, None));
        }
        if let Some(order) = query::order(db, &id).await? {
            found.push((order.account_id, MatchedBy::OrderId, Some(order.order_id)));
        }
    }
    if domain::ids::validate_reference(text).is_ok() {
        for account_id in query::accounts_by_deposit_reference(db, text).await? {
            found.push((account_id, MatchedBy::DepositReference, None));
        }
    }
    Ok(found)
}

/// Paging of an account's orders.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct OrdersParams {
    /// 1 to 1000, default 100: the newest this many.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// An account's orders.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AccountOrdersResponse {
    /// Newest first.
    pub orders: Vec<OrderResponse>,
}

/// `GET /v1/accounts/{account_id}/orders` (owner, support, operator,
/// auditor): the account's orders, newest first.
#[utoipa::path(get, path = "/v1/accounts/{account_id}/orders", tag = "accounts",
    security(("bearer" = [])),
    params(("account_id" = String, Path, description = "The account",
        pattern = r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$"),
        OrdersParams),
    responses((status = 200, body = AccountOrdersResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn account_orders(
    State(state): State<AppState>,
    caller: Caller,
    PathText(account_id): PathText,
    params: Result<Query<OrdersParams>, QueryRejection>,
) -> Result<Json<AccountOrdersResponse>, ApiError> {
    let account_id = super::users::visible_account(&caller, &account_id)?.to_string();
    let Query(params) = params
        .map_err(|e| ApiError::InvalidRequest(format!("invalid query: {}", e.body_text())))?;
    let limit = params.limit.unwrap_or(ORDERS_PAGE_DEFAULT);
    if !(1..=query::ACCOUNT_ORDERS_MAX).contains(&limit) {
        return Err(ApiError::InvalidRequest("limit must be 1 to 1000".into()));
    }
    if query::balance(&state.db, &account_id).await?.is_none() {
        return Err(ApiError::NotFound);
    }
    let orders = query::account_orders(&state.db, &account_id, limit).await?;
    Ok(Json(AccountOrdersResponse {
        orders: orders.into_iter().map(OrderResponse::from).collect(),
    }))
}

/// `GET /v1/accounts/{account_id}/payouts` (owner, support, operator,
/// auditor): the account's payouts, newest first, at most 1000.
#[utoipa::path(get, path = "/v1/accounts/{account_id}/payouts", tag = "accounts",
    security(("bearer" = [])),
    params(("account_id" = String, Path, description = "The account",
        pattern = r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$")),
    responses((status = 200, body = PayoutListResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn account_payouts(
    State(state): State<AppState>,
    caller: Caller,
    PathText(account_id): PathText,
) -> Result<Json<PayoutListResponse>, ApiError> {
    let account_id = super::users::visible_account(&caller, &account_id)?.to_string();
    if query::balance(&state.db, &account_id).await?.is_none() {
        return Err(ApiError::NotFound);
    }
    let payouts = query::account_payouts(&state.db, &account_id).await?;
    Ok(Json(PayoutListResponse {
        payouts: payouts.into_iter().map(PayoutResponse::from).collect(),
    }))
}

/// `GET /v1/payouts/{payout_id}/timeline` (operator, support, auditor):
/// every event of the payout (scheduled, each attempt and its outcome,
/// reconciliations, parking, an operator's retry or cancel), with who
/// caused it.
#[utoipa::path(get, path = "/v1/payouts/{payout_id}/timeline", tag = "payouts",
    security(("bearer" = [])),
    params(("payout_id" = String, Path, description = "The payout",
        pattern = r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$")),
    responses((status = 200, body = TimelineResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn payout_timeline(
    State(state): State<AppState>,
    PathText(payout_id): PathText,
) -> Result<Json<TimelineResponse>, ApiError> {
    let payout_id = Uuid::parse_str(&payout_id)
        .map_err(|_| ApiError::InvalidRequest("payout_id is not a UUID".into()))?
        .to_string();
    let events = query::timeline(&state.db, state.store.as_ref(), &payout_id).await?;
    if events.is_empty() {
        return Err(ApiError::NotFound);
    }
    Ok(Json(timeline_response(events)))
}

/// A timeline as answered.
pub fn timeline_response(events: Vec<query::TimelineEvent>) -> TimelineResponse {
    TimelineResponse {
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
    }
}
