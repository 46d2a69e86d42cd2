//! `/openapi.json`, generated from the handlers' annotations and the model
//! types, so the document cannot drift from the code. A test checks it
//! names exactly the routes of the route table.

use super::{handlers, orders, products, users};
use std::sync::OnceLock;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
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
        handlers::health,
        handlers::ready,
        handlers::metrics,
        handlers::openapi,
        handlers::all_progress,
        handlers::progress_stream,
        handlers::progress,
        users::login,
        users::me,
        users::create,
        users::account,
        users::ledger,
        users::deposit,
        products::create,
        products::open,
        products::close,
        products::purchase,
        orders::order,
        orders::timeline,
        orders::payouts,
    ),
    components(schemas(super::error::ErrorBody)),
    modifiers(&BearerAuth),
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
