//! `/openapi.json`, generated from the handlers' annotations and the model
//! types, so the document cannot drift from the code. A test checks it
//! names exactly the routes of the route table. The answers the guard gives
//! in front of every handler (401, 403, 413, 429, 503...) are added from the
//! route table itself, so each operation lists every status it can answer.

use super::auth::Role;
use super::routes::{self, Access, Idempotency};
use super::{auditing, handlers, orders, products, support, users};
use axum::http::Method;
use std::sync::OnceLock;
use utoipa::openapi::Required;
use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, Parameter, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{Modify, OpenApi};

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "ledger",
        description = "Event-sourced ledger for fixed-quota financial products: sales, \
                       accounts, orders and payouts. Amounts are integers in minor units."
    ),
    paths(
        handlers::dashboard,
        handlers::console,
        handlers::asset,
        handlers::health,
        handlers::ready,
        handlers::metrics,
        handlers::openapi,
        handlers::all_progress,
        handlers::progress_stream,
        handlers::progress,
        users::login,
        users::logout,
        users::me,
        users::create,
        users::account,
        users::ledger,
        users::deposit,
        products::create,
        products::open,
        products::close,
        products::purchase,
        products::schedule_payouts,
        orders::order,
        orders::timeline,
        orders::payouts,
        orders::entitlements,
        orders::retry_payout,
        orders::cancel_payout,
        auditing::events,
        auditing::verify,
        auditing::progress_as_of,
        auditing::start_verification,
        auditing::verification,
        support::search,
        support::account_orders,
        support::account_payouts,
        support::payout_timeline,
        super::cluster::purchases,
        super::cluster::command,
    ),
    components(schemas(super::error::ErrorBody)),
    modifiers(&BearerAuth, &GuardResponses),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "node",
            SecurityScheme::ApiKey(utoipa::openapi::security::ApiKey::Header(
                utoipa::openapi::security::ApiKeyValue::new(super::cluster::NODE_SECRET_HEADER),
            )),
        );
    }
}

/// Adds to each operation the answers its route's guard and extractors can
/// give (API.md, "Errors"), unless the handler's annotation describes them
/// already, and gives every response a description.
struct GuardResponses;

impl Modify for GuardResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for route in routes::table() {
            let Some(operation) = openapi
                .paths
                .paths
                .get_mut(route.path)
                .and_then(|item| operation_mut(item, &route.method))
            else {
                continue;
            };
            let mut statuses = Vec::new();
            // A path parameter that is not UTF-8 once decoded.
            if route.path.contains('{') {
                statuses.push(400);
            }
            // A body that is not JSON of the right shape, is too large, or
            // does not arrive within the body read timeout.
            if operation.request_body.is_some() {
                statuses.extend([400, 408, 413]);
            }
            // A read of read models takes `min_position` (a malformed one,
            // or one beyond the log's head, is 400; one not reached in time
            // is 503 `stale`).
            if !route.reads.is_empty() {
                operation
                    .parameters
                    .get_or_insert_with(Vec::new)
                    .push(RefOr::T(min_position_parameter()));
                statuses.push(400);
            }
            match route.access {
                Access::Roles(roles) => {
                    statuses.push(401);
                    if !Role::ALL.iter().all(|role| roles.contains(role)) {
                        statuses.push(403);
                    }
                }
                Access::Node => statuses.push(401),
                Access::Public => {}
            }
            // Idempotency-Key: malformed (400), used for another request or
            // still being decided (409); the body is read under the limit.
            if route.method == Method::POST && route.idempotency != Idempotency::None {
                statuses.extend([400, 408, 409, 413]);
            }
            // The rate limit and the request timeout apply to every route.
            statuses.extend([429, 503]);
            for status in statuses {
                operation
                    .responses
                    .responses
                    .entry(status.to_string())
                    .or_insert_with(|| RefOr::T(error_response(status)));
            }
        }
        for item in openapi.paths.paths.values_mut() {
            for operation in operations_mut(item) {
                for (status, response) in &mut operation.responses.responses {
                    if let RefOr::T(response) = response
                        && response.description.is_empty()
                    {
                        response.description = describe(status).to_owned();
                    }
                }
            }
        }
    }
}

/// The `min_position` query parameter (`fresh`).
fn min_position_parameter() -> Parameter {
    ParameterBuilder::new()
        .name(super::fresh::MIN_POSITION_PARAM)
        .parameter_in(ParameterIn::Query)
        .required(Required::False)
        .description(Some(
            "Answer only once the read model reflects the log up to this position (a \
             write's `position`); waits at most 2 s, else 503 `stale` with `Retry-After`; \
             a position beyond the log's head is 400",
        ))
        .schema(Some(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
                .minimum(Some(0)),
        ))
        .build()
}

/// The operation of a path for a method, if documented.
fn operation_mut<'a>(item: &'a mut PathItem, method: &Method) -> Option<&'a mut Operation> {
    let slot = if method == Method::GET {
        &mut item.get
    } else if method == Method::POST {
        &mut item.post
    } else if method == Method::PUT {
        &mut item.put
    } else if method == Method::PATCH {
        &mut item.patch
    } else if method == Method::DELETE {
        &mut item.delete
    } else {
        return None;
    };
    slot.as_mut()
}

/// Every operation of a path.
fn operations_mut(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        item.get.as_mut(),
        item.put.as_mut(),
        item.post.as_mut(),
        item.delete.as_mut(),
        item.options.as_mut(),
        item.head.as_mut(),
        item.patch.as_mut(),
        item.trace.as_mut(),
    ]
    .into_iter()
    .flatten()
}

/// An error answer: the `ErrorBody` JSON, with `Retry-After` where API.md
/// promises it.
fn error_response(status: u16) -> Response {
    let mut response = ResponseBuilder::new().description(describe(&status.to_string()));
    response = response.content(
        "application/json",
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("ErrorBody")))
            .build(),
    );
    if matches!(status, 429 | 503) {
        response = response.header(
            "Retry-After",
            HeaderBuilder::new()
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .minimum(Some(1)),
                ))
                .description(Some("Seconds to wait before retrying"))
                .build(),
        );
    }
    response.build()
}

/// What a status means on this API.
fn describe(status: &str) -> &'static str {
    match status {
        "200" => "OK",
        "201" => "Created",
        "204" => "No Content",
        "202" => "Accepted",
        "400" => {
            "`invalid_request`: malformed JSON, unknown fields, wrong types, out-of-range \
             values, bad ids, a bad `Idempotency-Key`"
        }
        "401" => "`unauthorized`: missing, malformed, expired or wrong credentials",
        "403" => "`forbidden`: the caller's role may not use this route",
        "404" => "`not_found`: no such resource, or not the caller's",
        "409" => {
            "`sold_out`, `insufficient_quota`, `sale_not_open`, `idempotency_key_reused` \
             (same key, different request) or `conflict` (with `Retry-After` while the \
             key's first request is still being decided)"
        }
        "408" => {
            "`request_timeout`: the request body did not arrive within the body read \
             timeout; the connection is closed"
        }
        "413" => "`payload_too_large`: the request body is over the limit (64 KiB)",
        "422" => "`insufficient_funds`: the available balance is below the amount",
        "429" => {
            "`rate_limited`: too many requests from this client, or too many failed \
             authentications from its address or at its username"
        }
        "503" => {
            "`overloaded` (load shed), `unavailable` (a database is not answering), \
             `timeout`, or `stale` (a read's `min_position` was not reached within 2 s); \
             a POST may still take effect: retry it with the same `Idempotency-Key`"
        }
        _ => "See the error code",
    }
}

/// The document as JSON, built once.
pub fn document_json() -> String {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        ApiDoc::openapi()
            .to_pretty_json()
            .expect("BUG: the OpenAPI document serializes")
    })
    .clone()
}
