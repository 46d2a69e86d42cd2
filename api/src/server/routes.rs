//! Every route in one table, each with the policy saying who may call it.
//! The router is built only from this table, so a route cannot exist
//! without a declared policy.

use super::AppState;
use super::handlers;
use axum::Router;
use axum::routing::{MethodRouter, get};

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Anyone, without credentials (API.md names these).
    Public,
}

/// One route.
pub struct RouteSpec {
    /// The path, in axum's syntax.
    pub path: &'static str,
    /// Who may call it.
    pub policy: Policy,
    /// Its handlers by method.
    pub handler: MethodRouter<AppState>,
}

/// The route table.
pub fn table() -> Vec<RouteSpec> {
    vec![
        RouteSpec {
            path: "/healthz",
            policy: Policy::Public,
            handler: get(handlers::health),
        },
        RouteSpec {
            path: "/readyz",
            policy: Policy::Public,
            handler: get(handlers::ready),
        },
        RouteSpec {
            path: "/v1/progress",
            policy: Policy::Public,
            handler: get(handlers::all_progress),
        },
        RouteSpec {
            path: "/v1/products/{product_id}/progress",
            policy: Policy::Public,
            handler: get(handlers::progress),
        },
    ]
}

/// The router over the table.
pub fn router(state: AppState) -> Router {
    let mut router = Router::new();
    for spec in table() {
        router = match spec.policy {
            Policy::Public => router.route(spec.path, spec.handler),
        };
    }
    router
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .with_state(state)
}
