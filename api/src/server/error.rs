//! The one error type of the HTTP API: each variant is one status and code
//! of API.md, and internal details never reach a response.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An answer other than 2xx.
#[derive(Debug)]
pub enum ApiError {
    /// 400 `invalid_request`: malformed input.
    InvalidRequest(String),
    /// 404 `not_found`: no such resource (or not the caller's).
    NotFound,
    /// 405 `method_not_allowed`: the path exists, the method does not.
    MethodNotAllowed,
    /// 503 `not_ready`: a dependency (the database) is not answering.
    NotReady(String),
    /// 500 `internal`: logged with its details, answered without them.
    Internal(anyhow::Error),
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, String) {
        match self {
            ApiError::InvalidRequest(why) => {
                (StatusCode::BAD_REQUEST, "invalid_request", why.clone())
            }
            ApiError::NotFound => (
                StatusCode::NOT_FOUND,
                "not_found",
                "no such resource".to_owned(),
            ),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this path does not take this method".to_owned(),
            ),
            ApiError::NotReady(what) => {
                (StatusCode::SERVICE_UNAVAILABLE, "not_ready", what.clone())
            }
            ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error; it has been logged".to_owned(),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(error) = &self {
            tracing::error!(error = format!("{error:#}"), "request failed");
        }
        let (status, code, message) = self.parts();
        (status, Json(json!({ "error": code, "message": message }))).into_response()
    }
}

impl From<projections::ProjectionError> for ApiError {
    fn from(error: projections::ProjectionError) -> ApiError {
        ApiError::Internal(error.into())
    }
}
