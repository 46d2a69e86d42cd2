//! Products and purchases.

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::guard::{Context, IDEMPOTENCY_KEY_HEADER};
use super::handlers::parse_product_id;
use super::model::{
    CreateProductRequest, CreateProductResponse, JsonBody, PathText, PayoutKindName,
    ProductStateResponse, PurchaseRequest, PurchaseResponse, SchedulePayoutsRequest,
    SchedulePayoutsResponse, positive_amount,
};
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use domain::product::{ProductCommand, ProductTerms};
use domain::{AccountId, Currency, ProductId};
use engine::PurchaseError;
use uuid::Uuid;

/// Namespace of product ids derived from (caller, idempotency key), so a
/// retried creation names the same product.
const PRODUCT_NAMESPACE: Uuid = Uuid::from_u128(0x6c65_6467_6572_2d70_726f_6475_6374_7321);

/// `POST /v1/products` (operator): lists a product; it starts closed.
#[utoipa::path(post, path = "/v1/products", tag = "products", security(("bearer" = [])),
    request_body = CreateProductRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retry safe",
        min_length = 1, max_length = 128, pattern = r"^[!-~]([ -~]*[!-~])?$")),
    responses((status = 201, body = CreateProductResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    Context(context): Context,
    caller: Caller,
    headers: HeaderMap,
    JsonBody(request): JsonBody<CreateProductRequest>,
) -> Result<Response, ApiError> {
    let product_id = match &request.product_id {
        Some(text) => parse_product_id(text)?,
        None => {
            let id = match headers.get(IDEMPOTENCY_KEY_HEADER) {
                Some(key) => {
                    let mut name = caller.user_id.clone().into_bytes();
                    name.push(0);
                    name.extend_from_slice(key.as_bytes());
                    Uuid::new_v5(&PRODUCT_NAMESPACE, &name)
                }
                None => Uuid::now_v7(),
            };
            ProductId::parse(&id.to_string()).expect("BUG: a UUID is a product id")
        }
    };
    let terms = terms(&request)?;
    let command = ProductCommand::List {
        product_id: product_id.clone(),
        terms,
    };
    let appended =
        match super::cluster::product_command(&state, &product_id, command, context).await? {
            Ok(appended) => appended,
            Err(refused) => return Ok(refused),
        };
    let position = position_reached(&state, appended).await?;
    tracing::info!(product_id = product_id.as_str(), "product listed");
    Ok((
        StatusCode::CREATED,
        Json(CreateProductResponse {
            product_id: product_id.as_str().to_owned(),
            position,
        }),
    )
        .into_response())
}

fn terms(request: &CreateProductRequest) -> Result<ProductTerms, ApiError> {
    let name = request.name.trim();
    if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(ApiError::InvalidRequest(
            "name must be 1 to 200 characters without control characters".into(),
        ));
    }
    let currency = match &request.currency {
        Some(code) => Currency::parse(code)
            .map_err(|_| ApiError::InvalidRequest("currency must be 3 capital letters".into()))?,
        None => Currency::CNY,
    };
    let amount = |field: &str, minor: i64| {
        positive_amount(minor).map_err(|_| {
            ApiError::InvalidRequest(format!("{field} must be 1 to 10^15 minor units"))
        })
    };
    Ok(ProductTerms {
        name: name.to_owned(),
        currency,
        quota: amount("quota", request.quota)?,
        min_purchase: amount("min_purchase", request.min_purchase)?,
        max_purchase: amount("max_purchase", request.max_purchase)?,
        annual_rate_bps: request.annual_rate_bps,
        term_days: request.term_days,
    })
}

/// `POST /v1/products/{product_id}/open` (operator).
#[utoipa::path(post, path = "/v1/products/{product_id}/open", tag = "products",
    security(("bearer" = [])),
    params(("product_id" = String, Path, description = "The product",
        pattern = r"^[A-Za-z0-9._-]{1,64}$"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes a retry safe",
        min_length = 1, max_length = 128, pattern = r"^[!-~]([ -~]*[!-~])?$")),
    responses((status = 200, body = ProductStateResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn open(
    state: State<AppState>,
    context: Context,
    product_id: PathText,
) -> Result<Response, ApiError> {
    switch(state, context, product_id, ProductCommand::Open, "open").await
}

/// `POST /v1/products/{product_id}/close` (operator).
#[utoipa::path(post, path = "/v1/products/{product_id}/close", tag = "products",
    security(("bearer" = [])),
    params(("product_id" = String, Path, description = "The product",
        pattern = r"^[A-Za-z0-9._-]{1,64}$"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes a retry safe",
        min_length = 1, max_length = 128, pattern = r"^[!-~]([ -~]*[!-~])?$")),
    responses((status = 200, body = ProductStateResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn close(
    state: State<AppState>,
    context: Context,
    product_id: PathText,
) -> Result<Response, ApiError> {
    switch(state, context, product_id, ProductCommand::Close, "closed").await
}

async fn switch(
    State(state): State<AppState>,
    Context(context): Context,
    PathText(product_id): PathText,
    command: ProductCommand,
    result: &str,
) -> Result<Response, ApiError> {
    let product_id = parse_product_id(&product_id)?;
    let appended =
        match super::cluster::product_command(&state, &product_id, command, context).await? {
            Ok(appended) => appended,
            Err(refused) => return Ok(refused),
        };
    let position = position_reached(&state, appended).await?;
    tracing::info!(
        product_id = product_id.as_str(),
        state = result,
        "sale switched"
    );
    Ok(Json(ProductStateResponse {
        product_id: product_id.as_str().to_owned(),
        state: result.to_owned(),
        position,
    })
    .into_response())
}

/// The log position a command reached: its append's last event, or, when
/// the command was already satisfied and appended nothing, the log's head
/// (which is at or after whatever satisfied it).
pub async fn position_reached(
    state: &AppState,
    appended: Option<store::Appended>,
) -> Result<i64, ApiError> {
    match appended {
        Some(appended) => Ok(appended.last_position),
        None => Ok(state.store.head().await?),
    }
}

/// `POST /v1/products/{product_id}/purchases` (customer; `Idempotency-Key`
/// required): reserve, pay from the buyer's balance, confirm.
#[utoipa::path(post, path = "/v1/products/{product_id}/purchases", tag = "products",
    security(("bearer" = [])), request_body = PurchaseRequest,
    params(("product_id" = String, Path, description = "The product",
        pattern = r"^[A-Za-z0-9._-]{1,64}$"),
        ("Idempotency-Key" = String, Header, description = "Required: the same key never buys twice",
        min_length = 1, max_length = 128, pattern = r"^[!-~]([ -~]*[!-~])?$")),
    responses((status = 201, body = PurchaseResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 429, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn purchase(
    State(state): State<AppState>,
    Context(context): Context,
    caller: Caller,
    headers: HeaderMap,
    PathText(product_id): PathText,
    JsonBody(request): JsonBody<PurchaseRequest>,
) -> Result<Response, ApiError> {
    let product_id = parse_product_id(&product_id)?;
    let amount = positive_amount(request.amount)?;
    let account_id = caller
        .account_id
        .as_deref()
        .and_then(|id| Uuid::parse_str(id).ok())
        .map(AccountId)
        .ok_or(ApiError::Forbidden)?;
    let idempotency_key = headers
        .get(IDEMPOTENCY_KEY_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::InvalidRequest("Idempotency-Key is required".into()))?
        .to_owned();
    let request = engine::PurchaseRequest {
        product_id,
        account_id,
        amount,
        idempotency_key,
        context,
    };
    match state.engine.place(request.clone()).await {
        // Another node runs this product's writer: ask it, relay its answer.
        Err(PurchaseError::NotOwner(owner)) => {
            super::cluster::forward_purchase(&state, &owner, request).await
        }
        outcome => purchase_answer(outcome),
    }
}

/// Decides a purchase forwarded by another node here, with no second hop:
/// when this node no longer owns the product the answer is 503, and the
/// buyer's retry (same key) reaches the new owner.
pub async fn purchase_here(
    state: &AppState,
    request: engine::PurchaseRequest,
) -> Result<Response, ApiError> {
    match state.engine.place(request).await {
        Err(PurchaseError::NotOwner(_)) => Err(ApiError::Unavailable("the product's owner".into())),
        outcome => purchase_answer(outcome),
    }
}

/// A purchase's outcome as its answer (201 with the order, or the error).
fn purchase_answer(outcome: Result<engine::Placed, PurchaseError>) -> Result<Response, ApiError> {
    let label = match &outcome {
        Ok(_) => "confirmed",
        Err(error) => outcome_label(error),
    };
    metrics::counter!("ledger_purchases_total", "outcome" => label).increment(1);
    let placed = outcome.map_err(purchase_error)?;
    let receipt = placed.receipt;
    Ok((
        StatusCode::CREATED,
        Json(PurchaseResponse {
            order_id: receipt.order_id.to_string(),
            product_id: receipt.product_id.as_str().to_owned(),
            account_id: receipt.account_id.to_string(),
            amount: receipt.amount.minor(),
            status: "confirmed".into(),
            position: placed.visible_at,
        }),
    )
        .into_response())
}

/// A purchase outcome's metric label.
fn outcome_label(error: &PurchaseError) -> &'static str {
    match error {
        PurchaseError::UnknownProduct => "unknown_product",
        PurchaseError::SaleNotOpen => "sale_not_open",
        PurchaseError::SoldOut => "sold_out",
        PurchaseError::InsufficientQuota => "insufficient_quota",
        PurchaseError::AmountOutOfRange { .. } => "amount_out_of_range",
        PurchaseError::InsufficientFunds => "insufficient_funds",
        PurchaseError::PaymentFailed => "payment_failed",
        PurchaseError::Expired => "expired",
        PurchaseError::CurrencyMismatch => "currency_mismatch",
        PurchaseError::KeyReused => "idempotency_key_reused",
        PurchaseError::Invalid(_) => "invalid",
        PurchaseError::Overloaded => "overloaded",
        PurchaseError::Unavailable(_) => "unavailable",
        PurchaseError::NotOwner(_) => "not_owner",
    }
}

/// A purchase's failure as an answer (API.md, "Products and sales").
fn purchase_error(error: PurchaseError) -> ApiError {
    match error {
        PurchaseError::UnknownProduct => ApiError::NotFound,
        PurchaseError::SaleNotOpen => {
            ApiError::Conflict("sale_not_open", "the sale is not open".into())
        }
        PurchaseError::SoldOut => ApiError::Conflict("sold_out", "sold out".into()),
        PurchaseError::InsufficientQuota => ApiError::Conflict(
            "insufficient_quota",
            "less quota is available than asked for".into(),
        ),
        PurchaseError::AmountOutOfRange { .. } | PurchaseError::Invalid(_) => {
            ApiError::InvalidRequest(error.to_string())
        }
        PurchaseError::InsufficientFunds => ApiError::InsufficientFunds,
        PurchaseError::CurrencyMismatch => ApiError::CurrencyMismatch,
        PurchaseError::PaymentFailed | PurchaseError::Expired => {
            ApiError::Conflict("conflict", error.to_string())
        }
        PurchaseError::KeyReused => ApiError::Conflict(
            "idempotency_key_reused",
            "this idempotency key was used for a different purchase".into(),
        ),
        PurchaseError::Overloaded => ApiError::Overloaded(1),
        PurchaseError::Unavailable(_) => ApiError::Unavailable("the event store".into()),
        PurchaseError::NotOwner(_) => ApiError::Unavailable("the product's owner".into()),
    }
}

/// `POST /v1/products/{product_id}/payouts` (operator): one payout per
/// holder of confirmed orders; calling it again, or concurrently, schedules
/// nothing twice.
#[utoipa::path(post, path = "/v1/products/{product_id}/payouts", tag = "payouts",
    security(("bearer" = [])), request_body = SchedulePayoutsRequest,
    params(("product_id" = String, Path, description = "The product",
        pattern = r"^[A-Za-z0-9._-]{1,64}$"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes a retry safe",
        min_length = 1, max_length = 128, pattern = r"^[!-~]([ -~]*[!-~])?$")),
    responses((status = 202, body = SchedulePayoutsResponse), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn schedule_payouts(
    State(state): State<AppState>,
    Context(context): Context,
    PathText(product_id): PathText,
    JsonBody(request): JsonBody<SchedulePayoutsRequest>,
) -> Result<(StatusCode, Json<SchedulePayoutsResponse>), ApiError> {
    use engine::payouts::{ScheduleError, ScheduleRequest};
    let product_id = parse_product_id(&product_id)?;
    let kind = match request.kind {
        PayoutKindName::Interest => domain::payout::PayoutKind::Interest,
        PayoutKindName::Principal => domain::payout::PayoutKind::Principal,
    };
    let request = ScheduleRequest {
        product_id,
        period: request.period,
        kind,
        days: request.days,
        context,
    };
    // Run to the end even if the caller hangs up: a run planned in the
    // product stream is then scheduled whole, not left half-created.
    let scheduling = tokio::spawn({
        let (store, request) = (state.store.clone(), request.clone());
        async move { engine::payouts::schedule(store.as_ref(), &request).await }
    });
    let report = scheduling
        .await
        .map_err(|error| {
            ApiError::Internal(anyhow::anyhow!("payout scheduling task failed: {error}"))
        })?
        .map_err(|error| match error {
            ScheduleError::Invalid(why) => ApiError::InvalidRequest(why),
            ScheduleError::UnknownProduct => ApiError::NotFound,
            ScheduleError::SaleNotClosed(why) => ApiError::Conflict("sale_not_closed", why),
            ScheduleError::EntitlementExceeded { message, .. } => {
                ApiError::Conflict("entitlement_exceeded", message)
            }
            ScheduleError::Conflict(why) => ApiError::Conflict("conflict", why),
            ScheduleError::Contention => ApiError::Conflict("conflict", error.to_string()),
            ScheduleError::LimitExceeded(why) => ApiError::Conflict("limit_exceeded", why),
            ScheduleError::Store(store) => ApiError::from(store),
        })?;
    tracing::info!(
        product_id = request.product_id.as_str(),
        period = %request.period,
        scheduled = report.scheduled,
        existing = report.existing,
        "payouts scheduled"
    );
    Ok((
        StatusCode::ACCEPTED,
        Json(SchedulePayoutsResponse {
            scheduled: report.scheduled,
            position: report.position,
        }),
    ))
}
