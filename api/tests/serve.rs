//! `ledger serve`: the public routes answered from the read models, error
//! bodies, and the real binary starting, answering and shutting down.

mod process;

use api::server::{Limits, Server};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::Value;
use std::io::{Read, Write};
use std::sync::Arc;
use store::EventStore;
use store::testing::TestSqlite;
use tower::ServiceExt;

async fn get(server: &Server, uri: &str) -> (StatusCode, Value) {
    let request = Request::get(uri).body(Body::empty()).unwrap();
    let response = server.router().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_routes_answer_from_the_read_models() {
    let database = TestSqlite::create().await.unwrap();
    let store: Arc<dyn EventStore> = Arc::new(database.store.clone());
    let mut history = projections::history::History::new(projections::history::Shape {
        accounts: 40,
        products: 2,
        seed: 3,
    });
    for _ in 0..6 {
        store.append_batch(history.next_batch(200)).await.unwrap();
    }
    let backend = store::Backend::Sqlite(database.path.clone());
    let server = Server::start(&backend, Limits::default(), Default::default())
        .await
        .unwrap();
    let head = store.head().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while server
        .state
        .statuses
        .report()
        .iter()
        .any(|r| r.position < head)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the read models did not reach the head {head}: {:?}",
            server.state.statuses.report()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (status, body) = get(&server, "/v1/progress").await;
    assert_eq!(status, StatusCode::OK);
    let products = body["products"].as_array().unwrap();
    assert_eq!(products.len(), 2);
    // Each product's progress against the oracle's sums over the raw events
    // (not "confirmed + reserved + available = quota", which the read model
    // makes true by computing available that way).
    let oracle = engine::audit::audit(store.as_ref()).await.unwrap().oracle;
    for product in products {
        let product_id = domain::ProductId::parse(product["product_id"].as_str().unwrap()).unwrap();
        let (confirmed, held) = (oracle.confirmed(&product_id), oracle.held(&product_id));
        let quota = oracle.quota(&product_id);
        let expected = (quota, confirmed, held - confirmed, quota - held);
        let actual = ["quota", "confirmed", "reserved", "available"].map(|f| product[f].as_i64());
        assert_eq!(
            actual,
            [expected.0, expected.1, expected.2, expected.3].map(Some),
            "{product_id}"
        );
        assert!(confirmed > 0, "the history sold some of {product_id}");
    }
    let (status, one) = get(&server, "/v1/products/bench-0/progress").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&one, &products[0]);
    for field in [
        "product_id",
        "quota",
        "confirmed",
        "reserved",
        "available",
        "status",
        "orders",
        "position",
    ] {
        assert!(
            one.get(field).is_some(),
            "contract field {field} missing: {one}"
        );
    }
    let (status, body) = get(&server, "/v1/products/no-such/progress").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (status, body) = get(&server, "/v1/products/bad%20id%27--/progress").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request"))
    );
    let (status, body) = get(&server, "/v1/nowhere").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let request = Request::post("/v1/progress").body(Body::empty()).unwrap();
    let response = server.router().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(get(&server, "/healthz").await.0, StatusCode::OK);
    let (status, ready) = get(&server, "/readyz").await;
    assert_eq!(status, StatusCode::OK);
    assert!(ready["head"].as_i64() > Some(0), "{ready}");
    let (status, _) = get(&server, "/").await;
    assert_eq!(status, StatusCode::OK);
    server.stop().await;
}

#[test]
fn ledger_serve_starts_on_sqlite_answers_and_stops_on_sigterm() {
    let folder = tempfile::tempdir().unwrap();
    let mut server = std::process::Command::new(env!("CARGO_BIN_EXE_ledger"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(folder.path().join("data"))
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let address = process::read_address(&mut server);
    let mut connection = std::net::TcpStream::connect(&address).unwrap();
    write!(
        connection,
        "GET /healthz HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    connection.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    for file in ["ledger.db", "read.db", "access.db"] {
        assert!(
            folder.path().join("data").join(file).exists(),
            "the SQLite files live in --data-dir: {file}"
        );
    }
    let terminated = std::process::Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    let status = server.wait().unwrap();
    assert!(status.success(), "graceful shutdown exits 0: {status}");
}
