//! Every route in one table, each declaring who may call it and how its
//! POSTs are made idempotent. The router is built only from this table, so a
//! route cannot exist without a declared policy, and building refuses a
//! table that names one method and path twice.

use super::AppState;
use super::auth::Role::{self, Admin, Auditor, Customer, Operator, Support};
use super::{auditing, cluster, guard, handlers, orders, products, support, users};
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::Method;
use axum::routing::{MethodRouter, get, post};
use projections::Projection;
use std::collections::HashMap;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without credentials (API.md names these).
    Public,
    /// An authenticated caller in one of these roles. A customer on a route
    /// about accounts or orders is further limited to their own (404
    /// otherwise, checked by the handler, which knows the owner).
    Roles(&'static [Role]),
    /// Another node of the cluster, presenting the node secret
    /// (`cluster::NODE_SECRET_HEADER`); refused when this node has none.
    Node,
}

/// How a POST uses the `Idempotency-Key` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotency {
    /// Not taken (GETs, and login, which has no caller to key on).
    None,
    /// Honoured when sent.
    Optional,
    /// Refused (400) without it.
    Required,
}

/// One route: a method on a path.
pub struct RouteSpec {
    /// The method.
    pub method: Method,
    /// The path, in axum's syntax.
    pub path: &'static str,
    /// Who may call it.
    pub access: Access,
    /// Its idempotency rule.
    pub idempotency: Idempotency,
    /// The read models a GET reads: it takes `min_position` and waits for
    /// all of these to reach it (`fresh`). Empty: it reads none.
    pub reads: &'static [Projection],
    /// The handler.
    pub handler: MethodRouter<AppState>,
}

/// Roles that move products and money.
const OPERATORS: &[Role] = &[Operator, Admin];
/// Roles that may read any account or order; customers their own.
const READERS: &[Role] = &[Customer, Support, Operator, Auditor, Admin];
/// Roles that may read the log itself and check it.
const AUDITORS: &[Role] = &[Auditor, Admin];
/// Staff who look customers up (support's console).
const STAFF: &[Role] = &[Support, Operator, Auditor, Admin];
/// Roles that may read payouts.
const PAYOUT_READERS: &[Role] = &[Operator, Support, Auditor, Admin];

fn route(
    method: Method,
    path: &'static str,
    access: Access,
    handler: MethodRouter<AppState>,
) -> RouteSpec {
    let idempotency = if method == Method::POST {
        Idempotency::Optional
    } else {
        Idempotency::None
    };
    RouteSpec {
        method,
        path,
        access,
        idempotency,
        reads: &[],
        handler,
    }
}

/// A GET of read models: it takes `min_position`.
fn read(
    path: &'static str,
    access: Access,
    reads: &'static [Projection],
    handler: MethodRouter<AppState>,
) -> RouteSpec {
    RouteSpec {
        reads,
        ..route(Method::GET, path, access, handler)
    }
}

/// Reads of the sale progress.
const PROGRESS: &[Projection] = &[Projection::SaleProgress];
/// Reads of balances and ledgers.
const ACCOUNTS: &[Projection] = &[Projection::Accounts];
/// Reads of orders and their timelines.
const ORDERS: &[Projection] = &[Projection::Orders];
/// Reads of payouts.
const PAYOUTS: &[Projection] = &[Projection::Payouts];

/// The route table.
pub fn table() -> Vec<RouteSpec> {
    use Access::{Node, Public, Roles};
    let get_ = Method::GET;
    let post_ = Method::POST;
    vec![
        route(get_.clone(), "/", Public, get(handlers::dashboard)),
        route(get_.clone(), "/console", Public, get(handlers::console)),
        route(get_.clone(), "/assets/{file}", Public, get(handlers::asset)),
        route(get_.clone(), "/healthz", Public, get(handlers::health)),
        route(get_.clone(), "/readyz", Public, get(handlers::ready)),
        route(get_.clone(), "/metrics", Public, get(handlers::metrics)),
        route(
            get_.clone(),
            "/openapi.json",
            Public,
            get(handlers::openapi),
        ),
        RouteSpec {
            idempotency: Idempotency::None,
            ..route(post_.clone(), "/v1/auth/login", Public, post(users::login))
        },
        RouteSpec {
            idempotency: Idempotency::None,
            ..route(
                post_.clone(),
                "/v1/auth/logout",
                Roles(&Role::ALL),
                post(users::logout),
            )
        },
        route(get_.clone(), "/v1/me", Roles(&Role::ALL), get(users::me)),
        route(
            post_.clone(),
            "/v1/users",
            Roles(&[Admin]),
            post(users::create),
        ),
        read(
            "/v1/accounts/{account_id}",
            Roles(READERS),
            &[Projection::Accounts, Projection::Orders],
            get(users::account),
        ),
        read(
            "/v1/accounts/{account_id}/ledger",
            Roles(READERS),
            ACCOUNTS,
            get(users::ledger),
        ),
        read(
            "/v1/customers",
            Roles(STAFF),
            &[Projection::Accounts, Projection::Orders],
            get(support::search),
        ),
        read(
            "/v1/accounts/{account_id}/orders",
            Roles(READERS),
            &[Projection::Accounts, Projection::Orders],
            get(support::account_orders),
        ),
        read(
            "/v1/accounts/{account_id}/payouts",
            Roles(READERS),
            &[Projection::Accounts, Projection::Payouts],
            get(support::account_payouts),
        ),
        read(
            "/v1/payouts/{payout_id}/timeline",
            Roles(PAYOUT_READERS),
            ORDERS,
            get(support::payout_timeline),
        ),
        route(
            post_.clone(),
            "/v1/accounts/{account_id}/deposits",
            Roles(OPERATORS),
            post(users::deposit),
        ),
        route(
            post_.clone(),
            "/v1/products",
            Roles(OPERATORS),
            post(products::create),
        ),
        route(
            post_.clone(),
            "/v1/products/{product_id}/open",
            Roles(OPERATORS),
            post(products::open),
        ),
        route(
            post_.clone(),
            "/v1/products/{product_id}/close",
            Roles(OPERATORS),
            post(products::close),
        ),
        RouteSpec {
            idempotency: Idempotency::Required,
            ..route(
                post_.clone(),
                "/v1/products/{product_id}/purchases",
                Roles(&[Customer]),
                post(products::purchase),
            )
        },
        route(
            post_.clone(),
            "/v1/products/{product_id}/payouts",
            Roles(OPERATORS),
            post(products::schedule_payouts),
        ),
        read(
            "/v1/products/{product_id}/entitlements",
            Roles(PAYOUT_READERS),
            PROGRESS,
            get(orders::entitlements),
        ),
        route(
            post_.clone(),
            "/v1/payouts/{payout_id}/retry",
            Roles(OPERATORS),
            post(orders::retry_payout),
        ),
        route(
            post_.clone(),
            "/v1/payouts/{payout_id}/cancel",
            Roles(OPERATORS),
            post(orders::cancel_payout),
        ),
        read(
            "/v1/progress",
            Public,
            PROGRESS,
            get(handlers::all_progress),
        ),
        read(
            "/v1/progress/stream",
            Public,
            PROGRESS,
            get(handlers::progress_stream),
        ),
        read(
            "/v1/products/{product_id}/progress",
            Public,
            PROGRESS,
            get(handlers::progress),
        ),
        read(
            "/v1/orders/{order_id}",
            Roles(READERS),
            ORDERS,
            get(orders::order),
        ),
        read(
            "/v1/orders/{order_id}/timeline",
            Roles(READERS),
            ORDERS,
            get(orders::timeline),
        ),
        read(
            "/v1/payouts",
            Roles(PAYOUT_READERS),
            PAYOUTS,
            get(orders::payouts),
        ),
        route(
            get_.clone(),
            "/v1/audit/events",
            Roles(AUDITORS),
            get(auditing::events),
        ),
        route(
            get_.clone(),
            "/v1/audit/products/{product_id}/progress",
            Roles(AUDITORS),
            get(auditing::progress_as_of),
        ),
        route(
            post_.clone(),
            "/v1/audit/verifications",
            Roles(AUDITORS),
            post(auditing::start_verification),
        ),
        route(
            get_.clone(),
            "/v1/audit/verifications/{verification_id}",
            Roles(AUDITORS),
            get(auditing::verification),
        ),
        route(
            post_.clone(),
            "/v1/audit/verify",
            Roles(AUDITORS),
            post(auditing::verify),
        ),
        // Forwarded by the node that took the request: its guard checked
        // the caller and the idempotency key already.
        RouteSpec {
            idempotency: Idempotency::None,
            ..route(
                post_.clone(),
                "/internal/v1/purchases",
                Node,
                post(cluster::purchases),
            )
        },
        RouteSpec {
            idempotency: Idempotency::None,
            ..route(
                post_,
                "/internal/v1/products/{product_id}/commands",
                Node,
                post(cluster::command),
            )
        },
    ]
}

/// The router over the table, each route behind its guard.
///
/// # Panics
/// When the table names one method on one path twice (a bug in the table).
pub fn router(state: AppState) -> Router {
    let mut by_path: HashMap<&'static str, MethodRouter<AppState>> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for spec in table() {
        assert!(
            seen.insert((spec.method.clone(), spec.path)),
            "BUG: the route table names {} {} twice",
            spec.method,
            spec.path
        );
        let rule = guard::Rule {
            path: spec.path,
            access: spec.access,
            idempotency: spec.idempotency,
            reads: spec.reads,
        };
        let guarded = spec
            .handler
            .route_layer(axum::middleware::from_fn_with_state(
                guard::Guarded {
                    state: state.clone(),
                    rule,
                },
                guard::guard,
            ));
        let merged = match by_path.remove(spec.path) {
            Some(existing) => existing.merge(guarded),
            None => guarded,
        };
        by_path.insert(spec.path, merged);
    }
    let mut router = Router::new();
    for (path, handler) in by_path {
        router = router.route(path, handler);
    }
    router
        // JSON bodies are read under API.md's limit whether or not the
        // guard buffered them for an idempotency key.
        .layer(DefaultBodyLimit::max(super::model::BODY_BYTES_MAX))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .with_state(state)
}
