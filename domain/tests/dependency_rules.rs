//! The workspace's dependency rules (ARCHITECTURE.md, "Architecture
//! invariants"), checked on what cargo resolves (`cargo metadata`), so a
//! change to any `Cargo.toml` that breaks an arrow fails `cargo test
//! --workspace`:
//!
//! - `domain` is pure: it reaches no I/O, async or HTTP crate, directly or
//!   through another dependency, and depends directly only on serde, chrono,
//!   uuid and thiserror.
//! - `engine` (the command side) depends on neither `projections` (the read
//!   side) nor `api`.
//! - `store` depends on none of `engine`, `projections` and `api`.
//! - `projections` depends on neither `engine` nor `api`.
//!
//! Only what a crate's library and binaries are built with on this
//! platform counts (normal and build dependencies); dev-dependencies are
//! free: the engine's tests
//! project their logs with `projections` to check for drift.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// Crates that do I/O, run async tasks or speak HTTP: none may be reachable
/// from `domain`.
const IO_CRATES: &[&str] = &[
    "tokio",
    "tokio-util",
    "tokio-stream",
    "mio",
    "socket2",
    "async-std",
    "smol",
    "futures-io",
    "sqlx",
    "sqlx-core",
    "sqlx-sqlite",
    "sqlx-postgres",
    "libsqlite3-sys",
    "reqwest",
    "hyper",
    "hyper-util",
    "h2",
    "http-body",
    "axum",
    "tower",
    "tower-http",
    "tonic",
    "kurrentdb",
    "rustls",
    "tempfile",
    "tracing-subscriber",
    "metrics-exporter-prometheus",
];

/// What `domain` may depend on directly.
const DOMAIN_DIRECT_ALLOWED: &[&str] = &["chrono", "serde", "thiserror", "uuid"];

/// Crates each workspace crate must not reach, with the reason.
const FORBIDDEN_ARROWS: &[(&str, &[&str], &str)] = &[
    (
        "engine",
        &["projections", "api"],
        "the command side never reads read models or the HTTP layer",
    ),
    (
        "store",
        &["engine", "projections", "api"],
        "the event store is the inner layer: dependencies point inward",
    ),
    (
        "projections",
        &["engine", "api"],
        "read models are derived from the log alone",
    ),
];

/// Package name → the names of its normal and build dependencies.
type Graph = BTreeMap<String, BTreeSet<String>>;

/// The machine's target triple (`rustc -vV`), so dependencies only other
/// platforms build (wasm's `js-sys`, Windows' `winapi`) are left out.
fn host_triple() -> String {
    let output = Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc -vV runs");
    String::from_utf8(output.stdout)
        .expect("rustc prints UTF-8")
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .to_owned()
}

/// The workspace's resolved dependency graph on this platform, normal and
/// build edges only.
fn resolved_graph() -> Graph {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--filter-platform"])
        .arg(host_triple())
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON");
    graph_of(&metadata)
}

/// Reads the dependency edges out of `cargo metadata`'s JSON.
fn graph_of(metadata: &serde_json::Value) -> Graph {
    let names: BTreeMap<&str, &str> = metadata["packages"]
        .as_array()
        .expect("metadata lists packages")
        .iter()
        .map(|package| {
            (
                package["id"].as_str().expect("a package has an id"),
                package["name"].as_str().expect("a package has a name"),
            )
        })
        .collect();
    let mut graph = Graph::new();
    for node in metadata["resolve"]["nodes"]
        .as_array()
        .expect("metadata resolves the graph")
    {
        let name = names[node["id"].as_str().expect("a node has an id")];
        let dependencies = graph.entry(name.to_owned()).or_default();
        for dependency in node["deps"].as_array().expect("a node lists its deps") {
            let built_with = dependency["dep_kinds"]
                .as_array()
                .expect("a dependency has kinds")
                .iter()
                .any(|kind| kind["kind"].as_str() != Some("dev"));
            if built_with {
                let id = dependency["pkg"]
                    .as_str()
                    .expect("a dependency names a package");
                dependencies.insert(names[id].to_owned());
            }
        }
    }
    graph
}

/// Every crate reachable from `from` (not `from` itself), with the path
/// that reaches it first.
fn reachable(graph: &Graph, from: &str) -> BTreeMap<String, Vec<String>> {
    let mut paths = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([vec![from.to_owned()]]);
    while let Some(path) = queue.pop_front() {
        let last = path.last().expect("a path is never empty");
        for next in graph.get(last).into_iter().flatten() {
            if next != from && !paths.contains_key(next) {
                let mut longer = path.clone();
                longer.push(next.clone());
                paths.insert(next.clone(), longer.clone());
                queue.push_back(longer);
            }
        }
    }
    paths
}

/// Every broken rule, each naming the path that breaks it.
fn violations(graph: &Graph) -> Vec<String> {
    let mut found = Vec::new();
    for (crate_name, _, _) in FORBIDDEN_ARROWS {
        assert!(
            graph.contains_key(*crate_name),
            "BUG: the rules name `{crate_name}`, which the workspace does not have"
        );
    }
    let direct = graph.get("domain").expect("the workspace has domain");
    for dependency in direct {
        if !DOMAIN_DIRECT_ALLOWED.contains(&dependency.as_str()) {
            found.push(format!(
                "domain depends on `{dependency}`; it may depend only on {DOMAIN_DIRECT_ALLOWED:?}"
            ));
        }
    }
    for (name, path) in reachable(graph, "domain") {
        if IO_CRATES.contains(&name.as_str()) {
            found.push(format!(
                "domain reaches the I/O crate `{name}` through {}",
                path.join(" -> ")
            ));
        }
    }
    for (crate_name, forbidden, why) in FORBIDDEN_ARROWS {
        for (name, path) in reachable(graph, crate_name) {
            if forbidden.contains(&name.as_str()) {
                found.push(format!(
                    "{crate_name} depends on `{name}` through {} ({why})",
                    path.join(" -> ")
                ));
            }
        }
    }
    found
}

#[test]
fn the_workspace_keeps_its_dependency_rules() {
    let graph = resolved_graph();
    for member in ["domain", "store", "engine", "projections", "api"] {
        assert!(graph.contains_key(member), "no `{member}` in the metadata");
    }
    assert!(
        graph["api"].contains("engine") && graph["store"].contains("domain"),
        "the graph read from cargo metadata lost the workspace's own edges"
    );
    let found = violations(&graph);
    assert!(found.is_empty(), "dependency rules broken:\n{found:#?}");
}

fn edge(graph: &mut Graph, from: &str, to: &str) {
    graph
        .entry(from.to_owned())
        .or_default()
        .insert(to.to_owned());
}

#[test]
fn the_rules_catch_each_forbidden_arrow() {
    let clean = resolved_graph();
    assert_eq!(violations(&clean), Vec::<String>::new());

    let mut doctored = clean.clone();
    edge(&mut doctored, "domain", "tokio");
    assert!(
        violations(&doctored)
            .iter()
            .any(|v| v.starts_with("domain depends on `tokio`"))
    );
    assert!(
        violations(&doctored)
            .iter()
            .any(|v| v == "domain reaches the I/O crate `tokio` through domain -> tokio")
    );

    // An I/O crate reached through an innocent-looking dependency.
    let mut doctored = clean.clone();
    edge(&mut doctored, "uuid", "reqwest");
    assert!(
        violations(&doctored).iter().any(
            |v| v == "domain reaches the I/O crate `reqwest` through domain -> uuid -> reqwest"
        )
    );

    let mut doctored = clean.clone();
    edge(&mut doctored, "engine", "projections");
    assert!(
        violations(&doctored)
            .iter()
            .any(|v| v.starts_with("engine depends on `projections` through engine -> projections"))
    );

    let mut doctored = clean.clone();
    edge(&mut doctored, "store", "engine");
    let found = violations(&doctored);
    assert!(
        found
            .iter()
            .any(|v| v.starts_with("store depends on `engine`"))
    );
    // Through engine, store would reach nothing else forbidden today, but
    // a store -> api edge is named too.
    let mut doctored = clean;
    edge(&mut doctored, "store", "api");
    let found = violations(&doctored);
    assert!(
        found
            .iter()
            .any(|v| v.starts_with("store depends on `api`"))
    );
    assert!(
        found
            .iter()
            .any(|v| v.starts_with("store depends on `engine` through store -> api -> engine"))
    );
}
