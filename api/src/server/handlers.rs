//! Handlers: thin translations between HTTP and the read models.

use super::AppState;
use super::error::ApiError;
use axum::Json;
use axum::extract::{Path, State};
use domain::ProductId;
use projections::query::{self, Progress};
use serde_json::{Value, json};

/// `GET /healthz`: the process is up.
pub async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`: the database answers; reports the log head and the
/// projections' lag.
pub async fn ready(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let head = state
        .store
        .head()
        .await
        .map_err(|e| ApiError::NotReady(format!("event store: {e}")))?;
    query::all_progress(&state.db)
        .await
        .map_err(|e| ApiError::NotReady(format!("read models: {e}")))?;
    Ok(Json(json!({
        "status": "ready",
        "head": head,
        "projection_lag": state.statuses.lag_max(),
    })))
}

/// `GET /v1/progress`: every product's sale progress.
pub async fn all_progress(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let products = query::all_progress(&state.db).await?;
    Ok(Json(json!({ "products": products })))
}

/// `GET /v1/products/{product_id}/progress`.
pub async fn progress(
    State(state): State<AppState>,
    Path(product_id): Path<String>,
) -> Result<Json<Progress>, ApiError> {
    let product_id = ProductId::parse(&product_id)
        .map_err(|_| ApiError::InvalidRequest("product_id is not a valid product id".to_owned()))?;
    query::progress(&state.db, product_id.as_str())
        .await?
        .map(Json)
        .ok_or(ApiError::NotFound)
}

/// Any path no route serves.
pub async fn not_found() -> ApiError {
    ApiError::NotFound
}

/// A known path with a method it does not serve.
pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
