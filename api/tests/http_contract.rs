//! `docs/http-api.md` is the HTTP contract kept in the repository; this test
//! keeps it true. It reads every route the document lists (a heading
//! `### METHOD /path` followed by a line `Statuses: 200, 401, ...`, the
//! convention the document states at its top) and compares the methods,
//! paths and statuses with the OpenAPI document the server generates
//! (`GET /openapi.json`), failing on any difference in either direction and
//! naming exactly what to add or remove, and where.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

/// The contract, as the repository holds it.
const CONTRACT_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/http-api.md");

/// Methods a route heading may name.
const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE"];

/// A route: method (upper case) and path (OpenAPI's syntax).
type Route = (String, String);
/// Every route with the statuses it may answer.
type Routes = BTreeMap<Route, BTreeSet<u16>>;

/// Reads the routes a contract document lists. A heading `### METHOD /path`
/// (the route may be in backticks, and may be followed by text after ` — `)
/// opens a route; the first line after it starting with `Statuses:` lists its
/// statuses, comma-separated. A route heading without a statuses line, a
/// malformed status, or a route listed twice is an error.
fn parse_contract(text: &str) -> Result<Routes, String> {
    let mut routes = Routes::new();
    let mut open: Option<(Route, usize)> = None;
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if let Some(heading) = line.strip_prefix("### ") {
            if let Some((route, opened_at)) = open.take() {
                return Err(format!(
                    "line {opened_at}: `{} {}` has no `Statuses:` line",
                    route.0, route.1
                ));
            }
            let heading = heading.split(" — ").next().unwrap_or_default();
            let heading = heading.trim().trim_matches('`');
            let mut words = heading.split_whitespace();
            let (Some(method), Some(path), None) = (words.next(), words.next(), words.next())
            else {
                continue;
            };
            if METHODS.contains(&method) && path.starts_with('/') {
                open = Some(((method.to_owned(), path.to_owned()), number));
            }
            continue;
        }
        let Some(list) = line.strip_prefix("Statuses:") else {
            continue;
        };
        let Some((route, _)) = open.take() else {
            return Err(format!(
                "line {number}: `Statuses:` outside a route section"
            ));
        };
        let mut statuses = BTreeSet::new();
        for item in list.split(',') {
            let item = item.trim().trim_end_matches('.');
            let status: u16 = item
                .parse()
                .ok()
                .filter(|status| (100..600).contains(status))
                .ok_or_else(|| format!("line {number}: `{item}` is not an HTTP status"))?;
            statuses.insert(status);
        }
        if routes.insert(route.clone(), statuses).is_some() {
            return Err(format!(
                "line {number}: `{} {}` is listed twice",
                route.0, route.1
            ));
        }
    }
    if let Some((route, opened_at)) = open {
        return Err(format!(
            "line {opened_at}: `{} {}` has no `Statuses:` line",
            route.0, route.1
        ));
    }
    Ok(routes)
}

/// The routes and statuses of an OpenAPI document.
fn openapi_routes(document: &serde_json::Value) -> Routes {
    let mut routes = Routes::new();
    let paths = document["paths"]
        .as_object()
        .expect("the OpenAPI document has paths");
    for (path, item) in paths {
        let item = item.as_object().expect("a path item is an object");
        for (method, operation) in item {
            let method = method.to_uppercase();
            if !METHODS.contains(&method.as_str()) {
                continue;
            }
            let statuses = operation["responses"]
                .as_object()
                .expect("an operation has responses")
                .keys()
                .map(|status| status.parse().expect("statuses are numbers"))
                .collect();
            routes.insert((method, path.clone()), statuses);
        }
    }
    routes
}

/// Every difference between the contract and the server, each saying what
/// to change in the contract; empty when they agree.
fn differences(contract: &Routes, served: &Routes) -> Vec<String> {
    let mut found = Vec::new();
    let list = |statuses: &BTreeSet<u16>| {
        statuses
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    for ((method, path), statuses) in served {
        match contract.get(&(method.clone(), path.clone())) {
            None => found.push(format!(
                "the server serves `{method} {path}`, the contract does not list it: add a \
                 section `### {method} {path}` with `Statuses: {}`",
                list(statuses)
            )),
            Some(listed) => {
                for status in statuses.difference(listed) {
                    found.push(format!(
                        "`{method} {path}` may answer {status}, the contract does not say so: \
                         add {status} to its `Statuses:` line"
                    ));
                }
                for status in listed.difference(statuses) {
                    found.push(format!(
                        "the contract lists {status} for `{method} {path}`, the server never \
                         answers it: remove {status} from its `Statuses:` line"
                    ));
                }
            }
        }
    }
    for (method, path) in contract.keys() {
        if !served.contains_key(&(method.clone(), path.clone())) {
            found.push(format!(
                "the contract lists `{method} {path}`, the server has no such route: remove \
                 its section"
            ));
        }
    }
    found
}

#[test]
fn the_contract_in_docs_names_exactly_what_the_server_serves() {
    let text = std::fs::read_to_string(CONTRACT_PATH)
        .unwrap_or_else(|e| panic!("cannot read {CONTRACT_PATH}: {e}"));
    let contract = parse_contract(&text).unwrap_or_else(|e| panic!("docs/http-api.md: {e}"));
    let document: serde_json::Value =
        serde_json::from_str(&api::server::openapi::document_json()).expect("OpenAPI is JSON");
    let served = openapi_routes(&document);
    assert!(
        served.len() >= 20,
        "the generated document lists only {} routes",
        served.len()
    );
    let found = differences(&contract, &served);
    let mut message = String::new();
    for difference in &found {
        writeln!(message, "- {difference}").unwrap();
    }
    assert!(
        found.is_empty(),
        "docs/http-api.md differs from the server's OpenAPI document:\n{message}"
    );
}

/// A document with two routes, for doctoring.
const SAMPLE: &str = "\
# Contract

Prose that mentions GET /v1/nothing is not a route.

### `GET /v1/progress` — public

Statuses: 200, 429, 503

### POST /v1/audit/verify

Some prose first.
Statuses: 200, 401, 403, 429, 501, 503
";

fn sample_served() -> Routes {
    Routes::from([
        (
            ("GET".to_owned(), "/v1/progress".to_owned()),
            BTreeSet::from([200, 429, 503]),
        ),
        (
            ("POST".to_owned(), "/v1/audit/verify".to_owned()),
            BTreeSet::from([200, 401, 403, 429, 501, 503]),
        ),
    ])
}

#[test]
fn the_comparer_accepts_a_matching_document() {
    let contract = parse_contract(SAMPLE).unwrap();
    assert_eq!(contract, sample_served());
    assert_eq!(
        differences(&contract, &sample_served()),
        Vec::<String>::new()
    );
}

#[test]
fn the_comparer_names_a_missing_route_and_status_to_add() {
    let doctored = SAMPLE.replace("501, ", "");
    let contract = parse_contract(&doctored).unwrap();
    let mut served = sample_served();
    served.insert(
        (
            "GET".to_owned(),
            "/v1/products/{product_id}/progress".to_owned(),
        ),
        BTreeSet::from([200, 404, 503]),
    );
    assert_eq!(
        differences(&contract, &served),
        vec![
            "the server serves `GET /v1/products/{product_id}/progress`, the contract does not \
             list it: add a section `### GET /v1/products/{product_id}/progress` with \
             `Statuses: 200, 404, 503`"
                .to_owned(),
            "`POST /v1/audit/verify` may answer 501, the contract does not say so: add 501 to \
             its `Statuses:` line"
                .to_owned(),
        ]
    );
}

#[test]
fn the_comparer_names_what_the_contract_promises_and_the_server_does_not() {
    let doctored = format!(
        "{}\n### DELETE /v1/progress\nStatuses: 204\n",
        SAMPLE.replace("200, 429, 503", "200, 429, 503, 410")
    );
    let contract = parse_contract(&doctored).unwrap();
    assert_eq!(
        differences(&contract, &sample_served()),
        vec![
            "the contract lists 410 for `GET /v1/progress`, the server never answers it: \
             remove 410 from its `Statuses:` line"
                .to_owned(),
            "the contract lists `DELETE /v1/progress`, the server has no such route: remove \
             its section"
                .to_owned(),
        ]
    );
}

#[test]
fn the_parser_refuses_a_malformed_document() {
    let no_statuses = SAMPLE.replace("Statuses: 200, 429, 503", "");
    assert!(
        parse_contract(&no_statuses)
            .unwrap_err()
            .contains("`GET /v1/progress` has no `Statuses:` line")
    );
    let twice = format!("{SAMPLE}\n### GET /v1/progress\nStatuses: 200\n");
    assert!(parse_contract(&twice).unwrap_err().contains("listed twice"));
    let bad = SAMPLE.replace("429, 503", "429, five");
    assert!(
        parse_contract(&bad)
            .unwrap_err()
            .contains("`five` is not an HTTP status")
    );
}
