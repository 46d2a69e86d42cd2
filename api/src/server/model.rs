//! The JSON shapes of API.md, as Rust types: requests refuse unknown fields,
//! responses are what OpenAPI describes. Read-model rows are converted here,
//! so only the API knows about JSON over HTTP.

use super::auth::Role;
use super::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::header;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// Largest accepted request body.
pub const BODY_BYTES_MAX: usize = 64 * 1024;

/// A JSON request body: `application/json`, within the size limit, with
/// exactly the fields of `T`; anything else is a 400 (or 413).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split(';').next())
            .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(ApiError::InvalidRequest(
                "the body must be JSON (Content-Type: application/json)".into(),
            ));
        }
        let bytes =
            Bytes::from_request(request, state)
                .await
                .map_err(|rejection| match rejection.status().as_u16() {
                    413 => ApiError::PayloadTooLarge,
                    _ if super::transport::is_body_read_timeout(&rejection) => {
                        ApiError::BodyTimeout
                    }
                    _ => ApiError::InvalidRequest("the body could not be read".into()),
                })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// A route's one path parameter, as text. A segment that is not UTF-8 once
/// percent-decoded is a 400 with the usual JSON error body (axum's own
/// rejection is plain text); the handler validates the text itself.
pub struct PathText(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathText {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(text)) => Ok(PathText(text)),
            Err(rejection) if rejection.status().is_client_error() => Err(
                ApiError::InvalidRequest(format!("invalid path: {}", rejection.body_text())),
            ),
            Err(rejection) => Err(ApiError::Internal(anyhow::anyhow!(
                "path parameters: {}",
                rejection.body_text()
            ))),
        }
    }
}

/// A positive amount in minor units.
pub fn positive_amount(minor: i64) -> Result<domain::Amount, ApiError> {
    if minor <= 0 || minor > domain::Amount::LIMIT.minor() {
        return Err(ApiError::InvalidRequest(
            "amount must be 1 to 10^15 minor units".into(),
        ));
    }
    domain::Amount::new(minor).map_err(|e| ApiError::InvalidRequest(e.to_string()))
}

/// Parses a JSON body into `T`, with serde's description of what is wrong.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // serde would also read a struct from an array (`[500]` as a purchase):
    // every request body of this API is an object.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::InvalidRequest(
            "the body must be a JSON object".into(),
        ));
    }
    serde_json::from_slice(bytes).map_err(|error| {
        // serde's messages name the field and type, never server internals.
        ApiError::InvalidRequest(format!("invalid JSON body: {error}"))
    })
}

/// `POST /v1/auth/login`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// Exact, case-sensitive.
    pub username: String,
    /// The password.
    pub password: String,
}

/// A new session.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LoginResponse {
    /// Bearer token for `Authorization: Bearer <token>`.
    pub token: String,
    /// The user's role.
    pub role: Role,
    /// The user.
    pub user_id: String,
    /// A customer's account; null for staff.
    pub account_id: Option<String>,
    /// When the token stops working (RFC 3339).
    pub expires_at: String,
}

/// `POST /v1/users`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUserRequest {
    /// 1 to 64 characters, no leading or trailing whitespace, no control
    /// characters.
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = r"^[^\s\x00-\x1f\x7f-\x9f]([^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f])?$"
    )]
    pub username: String,
    /// At least 8 characters and at most 1024 bytes (256 characters always
    /// fit).
    #[schema(min_length = 8, max_length = 256)]
    pub password: String,
    /// The role.
    pub role: Role,
}

/// A created user.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreateUserResponse {
    /// The user.
    pub user_id: String,
    /// A customer's new account; null for staff.
    pub account_id: Option<String>,
    /// The log position the account's opening reached (pass it as
    /// `min_position` to a read); null for staff, who get no account.
    pub position: Option<i64>,
}

/// The caller, as `GET /v1/me` shows them.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MeResponse {
    /// The user.
    pub user_id: String,
    /// Their role.
    pub role: Role,
    /// A customer's account.
    pub account_id: Option<String>,
}

/// `POST /v1/accounts/{account_id}/deposits`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DepositRequest {
    /// Minor units, positive.
    #[schema(minimum = 1, maximum = 1e15)]
    pub amount: i64,
    /// External reference, unique per account: a repeat is not a second
    /// deposit. 1 to 128 characters, no leading or trailing whitespace, no
    /// control characters.
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = r"^[^\s\x00-\x1f\x7f-\x9f]([^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f])?$"
    )]
    pub reference: String,
}

/// A deposit's effect.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DepositResponse {
    /// The account.
    pub account_id: String,
    /// Its available balance after the deposit.
    pub available: i64,
    /// The deposit event's position in the log.
    pub position: i64,
}

/// An account's balances.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AccountResponse {
    /// The account.
    pub account_id: String,
    /// Spendable now.
    pub available: i64,
    /// Paid for reservations not yet confirmed.
    pub held: i64,
    /// Sum of deposits.
    pub total_deposited: i64,
    /// Sum of confirmed purchases.
    pub total_invested: i64,
    /// Sum of payouts received.
    pub total_paid_out: i64,
    /// The account stream's version.
    pub version: i64,
}

impl From<projections::query::Balance> for AccountResponse {
    fn from(b: projections::query::Balance) -> AccountResponse {
        AccountResponse {
            account_id: b.account_id,
            available: b.available,
            held: b.held,
            total_deposited: b.total_deposited,
            total_invested: b.total_invested,
            total_paid_out: b.total_paid_out,
            version: b.version,
        }
    }
}

/// One ledger entry.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EntryResponse {
    /// The event's position.
    pub position: i64,
    /// The event.
    pub event_id: String,
    /// `deposit`, `purchase`, `refund`, `payout`, `withdrawal`.
    pub kind: String,
    /// Signed: credits positive.
    pub amount: i64,
    /// Available balance after the entry.
    pub balance_after: i64,
    /// The order, for purchases and refunds.
    pub order_id: Option<String>,
    /// The payout, for payouts.
    pub payout_id: Option<String>,
    /// When (RFC 3339).
    pub occurred_at: String,
}

/// A page of a ledger, oldest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LedgerResponse {
    /// The entries.
    pub entries: Vec<EntryResponse>,
    /// Pass as `after` for the next page; null at the end.
    pub next: Option<i64>,
}

impl From<projections::query::LedgerPage> for LedgerResponse {
    fn from(page: projections::query::LedgerPage) -> LedgerResponse {
        LedgerResponse {
            entries: page
                .entries
                .into_iter()
                .map(|e| EntryResponse {
                    position: e.position,
                    event_id: e.event_id,
                    kind: e.kind,
                    amount: e.amount,
                    balance_after: e.balance_after,
                    order_id: e.order_id,
                    payout_id: e.payout_id,
                    occurred_at: e.occurred_at,
                })
                .collect(),
            next: page.next,
        }
    }
}

/// `POST /v1/products`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProductRequest {
    /// The id to give it (1 to 64 of `A-Z a-z 0-9 - _ .`); generated when
    /// absent.
    #[schema(pattern = r"^[A-Za-z0-9._-]{1,64}$")]
    pub product_id: Option<String>,
    /// Display name: 1 to 200 characters once trimmed, no control
    /// characters.
    #[schema(
        max_length = 200,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
    )]
    pub name: String,
    /// Total amount that can be sold, minor units.
    #[schema(minimum = 1, maximum = 1e15)]
    pub quota: i64,
    /// Smallest single purchase (at most `max_purchase`).
    #[schema(minimum = 1, maximum = 1e15)]
    pub min_purchase: i64,
    /// Largest single purchase (at most `quota`).
    #[schema(minimum = 1, maximum = 1e15)]
    pub max_purchase: i64,
    /// Annual interest rate, basis points (at most 100,000).
    #[schema(maximum = 100_000)]
    pub annual_rate_bps: u32,
    /// Term in days (1 to 36,500); it starts when the sale closes.
    #[schema(minimum = 1, maximum = 36_500)]
    pub term_days: u32,
    /// ISO 4217 code; CNY when absent.
    #[schema(pattern = r"^[A-Z]{3}$")]
    pub currency: Option<String>,
}

/// A listed product.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreateProductResponse {
    /// Its id.
    pub product_id: String,
    /// The log position this write reached: pass it as `min_position` to
    /// a read to see the write there.
    pub position: i64,
}

/// A product after open or close.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProductStateResponse {
    /// The product.
    pub product_id: String,
    /// `open` or `closed`.
    pub state: String,
    /// The log position this write reached: pass it as `min_position` to
    /// a read to see the write there.
    pub position: i64,
}

/// `POST /v1/products/{product_id}/payouts`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SchedulePayoutsRequest {
    /// The period label (1 to 128 printable characters), e.g. `2026-Q4`.
    #[schema(min_length = 1, max_length = 128)]
    pub period: String,
    /// `interest` or `principal`.
    pub kind: PayoutKindName,
    /// Days of interest (interest only), 1 to the product's term; runs use
    /// up the term's days in order.
    #[schema(minimum = 1, maximum = 36_500)]
    pub days: Option<u32>,
}

/// What a payout pays.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PayoutKindName {
    /// Interest for a number of days.
    Interest,
    /// The principal, once the sale is closed.
    Principal,
}

/// What scheduling did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SchedulePayoutsResponse {
    /// Payouts this call created (0 when an earlier or concurrent call
    /// created them, or when the same money was scheduled under another
    /// label).
    pub scheduled: usize,
    /// The log position this call's writes reached (0 when it wrote
    /// nothing).
    pub position: i64,
}

/// `GET /v1/products/{product_id}/entitlements`: what the holders are owed
/// and how much of it is scheduled.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EntitlementResponse {
    /// The product.
    pub product_id: String,
    /// The term in days.
    pub term_days: i64,
    /// The holders' confirmed principal.
    pub principal_total: i64,
    /// Principal scheduled to be paid back.
    pub principal_scheduled: i64,
    /// Days of the term whose interest is scheduled.
    pub interest_days_scheduled: i64,
    /// Days of the term whose interest may still be scheduled.
    pub interest_days_remaining: i64,
}

/// What an operator's action on a parked payout did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PayoutActionResponse {
    /// The payout.
    pub payout_id: String,
    /// Its status after the action (`unknown` or `scheduled` after a retry,
    /// `cancelled` after a cancel).
    pub status: String,
    /// The log position the action reached.
    pub position: i64,
}

/// `POST /v1/products/{product_id}/purchases`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurchaseRequest {
    /// Minor units, positive.
    #[schema(minimum = 1, maximum = 1e15)]
    pub amount: i64,
}

/// A confirmed purchase.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PurchaseResponse {
    /// The order.
    pub order_id: String,
    /// The product.
    pub product_id: String,
    /// The buyer's account.
    pub account_id: String,
    /// Units bought.
    pub amount: i64,
    /// Always `confirmed`.
    pub status: String,
    /// The log position this write reached: pass it as `min_position` to
    /// a read to see the write there.
    pub position: i64,
}

/// A product's sale progress: `confirmed + reserved + available = quota`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProgressResponse {
    /// The product.
    pub product_id: String,
    /// Total quota.
    pub quota: i64,
    /// Sold.
    pub confirmed: i64,
    /// Held for orders awaiting payment.
    pub reserved: i64,
    /// Neither.
    pub available: i64,
    /// `closed`, `open`, `fully_reserved`, `sold_out`.
    pub status: String,
    /// Confirmed orders.
    pub orders: i64,
    /// Log position the figures reflect.
    pub position: i64,
    /// The product's display name.
    pub name: String,
    /// When the sale first opened (RFC 3339); null until then.
    pub opened_at: Option<String>,
    /// When the last of the quota was confirmed; null until sold out.
    pub sold_out_at: Option<String>,
}

impl From<projections::query::Progress> for ProgressResponse {
    fn from(p: projections::query::Progress) -> ProgressResponse {
        ProgressResponse {
            product_id: p.product_id,
            quota: p.quota,
            confirmed: p.confirmed,
            reserved: p.reserved,
            available: p.available,
            status: p.status,
            orders: p.orders,
            position: p.position,
            name: p.name,
            opened_at: p.opened_at,
            sold_out_at: p.sold_out_at,
        }
    }
}

/// Every product's progress.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProgressListResponse {
    /// One per listed product.
    pub products: Vec<ProgressResponse>,
}

/// An order.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OrderResponse {
    /// The order.
    pub order_id: String,
    /// The product.
    pub product_id: String,
    /// The buyer's account.
    pub account_id: String,
    /// Units.
    pub amount: i64,
    /// `reserved`, `confirmed`, `released`, `refunded` (or `refused`).
    pub status: String,
    /// Why it was released or refused.
    pub reason: Option<String>,
    /// When it was placed (RFC 3339).
    pub created_at: String,
}

impl From<projections::query::Order> for OrderResponse {
    fn from(o: projections::query::Order) -> OrderResponse {
        OrderResponse {
            order_id: o.order_id,
            product_id: o.product_id,
            account_id: o.account_id,
            amount: o.amount,
            status: o.status,
            reason: o.reason,
            created_at: o.created_at,
        }
    }
}

/// One event of an order's story.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TimelineEventResponse {
    /// Its position in the log.
    pub position: i64,
    /// Its type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// When (RFC 3339).
    pub occurred_at: String,
    /// Its data.
    pub data: Value,
    /// Who and why: actor, role, request, correlation and causation ids.
    pub metadata: Value,
}

/// An order's events, oldest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TimelineResponse {
    /// The events.
    pub events: Vec<TimelineEventResponse>,
}

/// A payout.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PayoutResponse {
    /// The payout.
    pub payout_id: String,
    /// Its product.
    pub product_id: String,
    /// The holder.
    pub account_id: String,
    /// Minor units.
    pub amount: i64,
    /// The period label.
    pub period: String,
    /// `interest` or `principal`.
    pub kind: String,
    /// `scheduled`, `in_flight`, `unknown`, `succeeded`, `failed`,
    /// `parked` (waits for an operator's retry or cancel) or `cancelled`.
    pub status: String,
    /// Calls made to the provider.
    pub attempts: i64,
    /// The provider's payment id.
    pub provider_ref: Option<String>,
}

impl From<projections::query::PayoutView> for PayoutResponse {
    fn from(p: projections::query::PayoutView) -> PayoutResponse {
        PayoutResponse {
            payout_id: p.payout_id,
            product_id: p.product_id,
            account_id: p.account_id,
            amount: p.amount,
            period: p.period,
            kind: p.kind,
            status: p.status,
            attempts: p.attempts,
            provider_ref: p.provider_ref,
        }
    }
}

/// Payouts.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PayoutListResponse {
    /// The payouts.
    pub payouts: Vec<PayoutResponse>,
}

/// `GET /healthz`, `GET /readyz`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    /// `ok` or `ready`.
    pub status: String,
    /// The log's head position (readiness only).
    pub head: Option<i64>,
    /// The largest projection lag, in events (readiness only).
    pub projection_lag: Option<i64>,
}
