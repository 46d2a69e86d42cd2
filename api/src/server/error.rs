//! The one error type of the HTTP API: each variant is one status and code
//! of API.md, and internal details never reach a response.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// The body of every answer other than 2xx.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Stable snake_case code.
    pub error: String,
    /// Human text.
    pub message: String,
}

/// An answer other than 2xx.
#[derive(Debug)]
pub enum ApiError {
    /// 400 `invalid_request`: malformed input.
    InvalidRequest(String),
    /// 401 `unauthorized`: missing, malformed, expired or wrong credentials.
    Unauthorized,
    /// 403 `forbidden`: the caller's role may not use this route.
    Forbidden,
    /// 404 `not_found`: no such resource (or not the caller's).
    NotFound,
    /// 405 `method_not_allowed`: the path exists, the method does not.
    MethodNotAllowed,
    /// 409 with a specific code (`sold_out`, `insufficient_quota`,
    /// `sale_not_open`, `idempotency_key_reused`, `conflict`).
    Conflict(&'static str, String),
    /// 409 `conflict` with `Retry-After`: the same idempotency key is still
    /// being decided.
    InFlight,
    /// 408 `request_timeout`: the request body did not arrive within
    /// `--body-read-timeout` (the connection is closed).
    BodyTimeout,
    /// 413 `payload_too_large`.
    PayloadTooLarge,
    /// 422 `insufficient_funds`.
    InsufficientFunds,
    /// 422 `currency_mismatch`: the buyer's account holds another currency
    /// than the product.
    CurrencyMismatch,
    /// 429 `rate_limited`, with `Retry-After` seconds.
    RateLimited(u64),
    /// 503 `overloaded`: load shed, with `Retry-After` seconds.
    Overloaded(u64),
    /// 503 `unavailable`: the store or database is not answering (the
    /// request may still take effect; retry with the same idempotency key).
    Unavailable(String),
    /// 503 `stale`, with `Retry-After` seconds: the read model did not
    /// reach the `min_position` asked for within the wait allowed.
    Stale(u64),
    /// 503 `timeout`: the request took longer than its limit; it may still
    /// take effect (retry with the same idempotency key).
    Timeout,
    /// 501 `not_supported`: this deployment's event store cannot do it
    /// (the EventStoreDB backend keeps no hash chain to verify).
    NotSupported(String),
    /// 500 `internal`: logged with its details, answered without them.
    Internal(anyhow::Error),
}

impl ApiError {
    /// Its status and code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Conflict(code, _) => (StatusCode::CONFLICT, code),
            ApiError::InFlight => (StatusCode::CONFLICT, "conflict"),
            ApiError::BodyTimeout => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::InsufficientFunds => (StatusCode::UNPROCESSABLE_ENTITY, "insufficient_funds"),
            ApiError::CurrencyMismatch => (StatusCode::UNPROCESSABLE_ENTITY, "currency_mismatch"),
            ApiError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::Overloaded(_) => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Stale(_) => (StatusCode::SERVICE_UNAVAILABLE, "stale"),
            ApiError::Timeout => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
            ApiError::NotSupported(_) => (StatusCode::NOT_IMPLEMENTED, "not_supported"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    fn message(&self) -> String {
        match self {
            ApiError::InvalidRequest(why)
            | ApiError::Conflict(_, why)
            | ApiError::NotSupported(why) => why.clone(),
            ApiError::Unauthorized => "missing, malformed, expired or wrong credentials".into(),
            ApiError::Forbidden => "your role may not use this route".into(),
            ApiError::NotFound => "no such resource".into(),
            ApiError::MethodNotAllowed => "this path does not take this method".into(),
            ApiError::InFlight => {
                "a request with this idempotency key is still being decided; retry shortly".into()
            }
            ApiError::BodyTimeout => "the request body did not arrive in time".into(),
            ApiError::PayloadTooLarge => "the request body is over the limit".into(),
            ApiError::InsufficientFunds => "the available balance is below the amount".into(),
            ApiError::CurrencyMismatch => {
                "the account's currency is not the product's currency".into()
            }
            ApiError::RateLimited(_) => "too many requests; slow down".into(),
            ApiError::Overloaded(_) => "the queue is full; retry shortly".into(),
            ApiError::Unavailable(what) => {
                format!("{what} is unavailable; retry with the same idempotency key")
            }
            ApiError::Stale(_) => {
                "the read model has not reached min_position yet; retry shortly".into()
            }
            ApiError::Timeout => {
                "the request took too long; retry with the same idempotency key".into()
            }
            ApiError::Internal(_) => "internal error; it has been logged".into(),
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited(seconds)
            | ApiError::Overloaded(seconds)
            | ApiError::Stale(seconds) => Some(*seconds),
            ApiError::InFlight | ApiError::Unavailable(_) | ApiError::Timeout => Some(1),
            _ => None,
        }
    }

    /// A database error: unavailable when the database cannot be reached
    /// or a transaction lost a deadlock or serialization conflict (after
    /// its retries), internal otherwise.
    pub fn database(error: sqlx::Error) -> ApiError {
        if store::error::is_unavailable(&error) || store::error::is_transient_conflict(&error) {
            tracing::warn!(error = %error, "database unavailable");
            ApiError::Unavailable("the database".into())
        } else {
            ApiError::Internal(error.into())
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(error) = &self {
            tracing::error!(error = format!("{error:#}"), "request failed");
        }
        let (status, code) = self.status_and_code();
        let body = ErrorBody {
            error: code.to_owned(),
            message: self.message(),
        };
        let mut response = (status, Json(body)).into_response();
        if matches!(self, ApiError::BodyTimeout) {
            // The rest of the body may still be on its way: this connection
            // cannot carry another request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(seconds) = self.retry_after() {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_str(&seconds.to_string()).expect("BUG: digits are a header"),
            );
        }
        response
    }
}

impl From<projections::ProjectionError> for ApiError {
    fn from(error: projections::ProjectionError) -> ApiError {
        match error {
            projections::ProjectionError::Database(inner) => ApiError::database(inner),
            other => ApiError::Internal(other.into()),
        }
    }
}

impl From<super::auth::AuthError> for ApiError {
    fn from(error: super::auth::AuthError) -> ApiError {
        use super::auth::AuthError;
        match error {
            AuthError::Unauthorized => ApiError::Unauthorized,
            AuthError::Overloaded => ApiError::Overloaded(1),
            AuthError::Database(inner) => ApiError::database(inner),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> ApiError {
        ApiError::database(error)
    }
}

impl From<store::StoreError> for ApiError {
    fn from(error: store::StoreError) -> ApiError {
        match error {
            store::StoreError::Unavailable(_) | store::StoreError::RemoteUnavailable(_) => {
                ApiError::Unavailable("the event store".into())
            }
            store::StoreError::Unsupported(why) => ApiError::NotSupported(why),
            other => ApiError::Internal(other.into()),
        }
    }
}

impl From<engine::CommandError> for ApiError {
    /// An engine command's failure as an answer.
    fn from(error: engine::CommandError) -> ApiError {
        use domain::account::AccountRejection as A;
        use domain::product::ProductRejection as P;
        use engine::CommandError;
        match error {
            CommandError::Product(P::NotListed) | CommandError::Account(A::NotOpen) => {
                ApiError::NotFound
            }
            CommandError::Product(P::InvalidTerms(why)) => ApiError::InvalidRequest(why),
            CommandError::Account(A::NonPositiveAmount | A::InvalidReference) => {
                ApiError::InvalidRequest(error.to_string())
            }
            CommandError::Account(A::InsufficientFunds { .. }) => ApiError::InsufficientFunds,
            CommandError::Account(A::CurrencyMismatch { .. }) => ApiError::CurrencyMismatch,
            CommandError::Account(A::LimitExceeded(_))
            | CommandError::Product(P::LimitExceeded(_)) => {
                ApiError::Conflict("limit_exceeded", error.to_string())
            }
            CommandError::Product(P::SaleNotClosed) => {
                ApiError::Conflict("sale_not_closed", error.to_string())
            }
            CommandError::Product(P::EntitlementExceeded { .. }) => {
                ApiError::Conflict("entitlement_exceeded", error.to_string())
            }
            CommandError::Product(P::InvalidPayoutRun(why)) => ApiError::InvalidRequest(why),
            CommandError::Product(rejection) => {
                ApiError::Conflict("conflict", rejection.to_string())
            }
            CommandError::Account(rejection) => {
                ApiError::Conflict("conflict", rejection.to_string())
            }
            CommandError::Contention(_) => ApiError::Conflict("conflict", error.to_string()),
            CommandError::ShuttingDown | CommandError::Unavailable => {
                ApiError::Unavailable("the engine".into())
            }
            CommandError::NotAllowed(why) => ApiError::InvalidRequest(why.into()),
            CommandError::NotOwner(_) => ApiError::Unavailable("the product's owner".into()),
            CommandError::Store(store) => ApiError::from(store),
        }
    }
}
