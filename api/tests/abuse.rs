//! Abuse resistance: slow and greedy clients, floods of guesses and
//! made-up ids. The transport tests serve the real router on a loopback
//! socket through `transport::serve`; the others call the router directly.

mod support;

use api::server::transport::{self, TransportLimits};
use api::server::{Limits, Server};
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;
use support::{Kind, TestApi};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;
use uuid::Uuid;

/// How long a test waits for something the server must do by itself
/// before it declares a hang (not a timing assertion: the server's own
/// timeouts in these tests are a second or two).
const HANG: Duration = Duration::from_secs(60);

/// A server on a loopback socket with these transport limits.
struct Served {
    address: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    serving: tokio::task::JoinHandle<()>,
}

async fn serve(api: &TestApi, limits: TransportLimits) -> Served {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(transport::serve(
        listener,
        api.server.router(),
        limits,
        async move {
            let _ = stopped.await;
        },
    ));
    Served {
        address,
        stop,
        serving,
    }
}

/// Reads until the server closes the connection (EOF or reset); what it
/// sent first.
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match tokio::time::timeout(HANG, stream.read(&mut buffer)).await {
            Err(_) => panic!("the server never closed the connection"),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
        }
    }
    String::from_utf8_lossy(&received).into_owned()
}

/// Sends one request on a keep-alive connection and reads its answer's
/// status line and headers (the bodies asked for here are small).
async fn request(stream: &mut TcpStream, text: &str) -> String {
    stream.write_all(text.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while !String::from_utf8_lossy(&received).contains("\r\n\r\n") {
        let n = tokio::time::timeout(HANG, stream.read(&mut buffer))
            .await
            .expect("no answer")
            .unwrap();
        assert!(n > 0, "closed before answering");
        received.extend_from_slice(&buffer[..n]);
    }
    String::from_utf8_lossy(&received).into_owned()
}

const HEALTH: &str = "GET /healthz HTTP/1.1\r\nHost: ledger\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_while_others_are_served() {
    let api = TestApi::start(Kind::Sqlite, "slow_clients").await.unwrap();
    let limits = TransportLimits {
        header_read_timeout: Duration::from_secs(1),
        body_read_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(30),
        connections_max: 64,
        connections_per_address_max: 32,
    };
    let served = serve(&api, limits).await;
    // Slowloris: headers begun and never finished, on several connections.
    let mut slow = Vec::new();
    for _ in 0..8 {
        let mut stream = TcpStream::connect(served.address).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: ledger\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(stream);
    }
    // Meanwhile an honest client is answered.
    let mut honest = TcpStream::connect(served.address).await.unwrap();
    let answer = request(&mut honest, HEALTH).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Every slow connection is closed by the server, without a 200.
    for mut stream in slow {
        let answer = read_until_closed(&mut stream).await;
        assert!(!answer.contains(" 200 "), "{answer}");
    }
    // A body that never finishes gets 408 and the connection is closed.
    let mut dripping = TcpStream::connect(served.address).await.unwrap();
    dripping
        .write_all(
            b"POST /v1/auth/login HTTP/1.1\r\nHost: ledger\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"user",
        )
        .await
        .unwrap();
    let answer = read_until_closed(&mut dripping).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    served.stop.send(()).unwrap();
    tokio::time::timeout(HANG, served.serving)
        .await
        .unwrap()
        .unwrap();
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_capped_per_address() {
    let api = TestApi::start(Kind::Sqlite, "connection_caps")
        .await
        .unwrap();
    let limits = TransportLimits {
        connections_per_address_max: 3,
        ..TransportLimits::default()
    };
    let served = serve(&api, limits).await;
    // Three keep-alive connections, each known to be accepted: answered.
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(served.address).await.unwrap();
        let answer = request(&mut stream, HEALTH).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        open.push(stream);
    }
    // A fourth from the same address is closed unanswered.
    let mut extra = TcpStream::connect(served.address).await.unwrap();
    let _ = extra.write_all(HEALTH.as_bytes()).await;
    let answer = read_until_closed(&mut extra).await;
    assert!(answer.is_empty(), "{answer}");
    // Once one closes, a new connection is served again.
    drop(open.pop());
    let mut served_again = None;
    for _ in 0..100 {
        let mut stream = TcpStream::connect(served.address).await.unwrap();
        if stream.write_all(HEALTH.as_bytes()).await.is_err() {
            continue;
        }
        let answer = read_until_first_bytes(&mut stream).await;
        if answer.starts_with("HTTP/1.1 200") {
            served_again = Some(stream);
            break;
        }
        // The server may not have seen the close yet: try again shortly.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served_again.is_some(), "a freed slot is never given again");
    drop(open);
    served.stop.send(()).unwrap();
    tokio::time::timeout(HANG, served.serving)
        .await
        .unwrap()
        .unwrap();
    api.stop().await;
}

/// The first bytes the server sends, or nothing if it closes.
async fn read_until_first_bytes(stream: &mut TcpStream) -> String {
    let mut buffer = [0u8; 4096];
    match tokio::time::timeout(HANG, stream.read(&mut buffer)).await {
        Err(_) => panic!("no answer and no close"),
        Ok(Ok(n)) => String::from_utf8_lossy(&buffer[..n]).into_owned(),
        Ok(Err(_)) => String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_and_closes_idle_connections() {
    let api = TestApi::start(Kind::Sqlite, "transport_shutdown")
        .await
        .unwrap();
    let served = serve(&api, TransportLimits::default()).await;
    let mut idle = TcpStream::connect(served.address).await.unwrap();
    let answer = request(&mut idle, HEALTH).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    served.stop.send(()).unwrap();
    // The idle keep-alive connection is closed and serving returns.
    let rest = read_until_closed(&mut idle).await;
    assert!(rest.is_empty(), "{rest}");
    tokio::time::timeout(HANG, served.serving)
        .await
        .unwrap()
        .unwrap();
    api.stop().await;
}

/// A request from a given client address (as the listener would tag it).
fn from_address(
    address: &str,
    method: Method,
    uri: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Request<Body> {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let body = match body {
        Some(value) => {
            request = request.header("content-type", "application/json");
            Body::from(value.to_string())
        }
        None => Body::empty(),
    };
    let mut request = request.body(body).unwrap();
    let socket: SocketAddr = format!("{address}:40000").parse().unwrap();
    request.extensions_mut().insert(ConnectInfo(socket));
    request
}

fn login_body(username: &str, password: &str) -> Option<Value> {
    Some(json!({"username": username, "password": password}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_tokens_cost_one_lookup_each_then_the_address_waits() {
    let limits = Limits {
        auth_failures_per_address: 5,
        ..support::generous()
    };
    let api = TestApi::start_with(Kind::Sqlite, "random_tokens", limits)
        .await
        .unwrap();
    let auth = &api.server.state.auth;
    // The same unknown token again and again: one database lookup.
    let forged = "ab".repeat(32);
    let before = auth.lookups();
    for _ in 0..4 {
        let reply = api
            .send(from_address(
                "10.0.0.1",
                Method::GET,
                "/v1/me",
                Some(&forged),
                None,
            ))
            .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(auth.lookups() - before, 1);
    // Fresh random tokens: past the address's failures, 429 before any lookup.
    let before = auth.lookups();
    let mut statuses = Vec::new();
    for index in 0..20 {
        let token = format!("{index:064x}");
        let reply = api
            .send(from_address(
                "10.0.0.1",
                Method::GET,
                "/v1/me",
                Some(&token),
                None,
            ))
            .await;
        statuses.push(reply.status);
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(reply.code(), "rate_limited");
            assert!(reply.headers.contains_key("retry-after"));
        }
    }
    assert_eq!(statuses[0], StatusCode::UNAUTHORIZED);
    assert_eq!(statuses[19], StatusCode::TOO_MANY_REQUESTS);
    assert!(auth.lookups() - before <= 5, "{}", auth.lookups() - before);
    // Another address, and a known token from the failing one, still work.
    let reply = api
        .send(from_address(
            "10.0.0.2",
            Method::GET,
            "/v1/me",
            Some(&"cd".repeat(32)),
            None,
        ))
        .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let reply = api
        .send(from_address(
            "10.0.0.1",
            Method::GET,
            "/v1/me",
            Some(&api.admin),
            None,
        ))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_lock_out_the_guessing_address_only() {
    let limits = Limits {
        login_failures_per_user: 3,
        ..support::generous()
    };
    let api = TestApi::start_with(Kind::Sqlite, "login_lockout", limits)
        .await
        .unwrap();
    api.user("alice", "customer").await;
    let login = |address: &'static str, password: &'static str| {
        api.send(from_address(
            address,
            Method::POST,
            "/v1/auth/login",
            None,
            login_body("alice", password),
        ))
    };
    for _ in 0..3 {
        assert_eq!(
            login("10.6.6.6", "wrong-password").await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    // The guessing address is locked out, even with the right password,
    // and no hash is spent on it.
    let locked = login("10.6.6.6", "alice-password").await;
    assert_eq!(
        (locked.status, locked.code()),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
    );
    assert!(locked.headers.contains_key("retry-after"));
    // Alice, elsewhere, logs in.
    assert_eq!(
        login("10.0.0.7", "alice-password").await.status,
        StatusCode::OK
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_burst_beyond_the_hash_queue_is_shed_with_503() {
    let limits = Limits {
        password_queue_max: 0,
        ..support::generous()
    };
    let api = TestApi::start_with(Kind::Sqlite, "login_burst", limits)
        .await
        .unwrap();
    let attempts = (0..32).map(|index| {
        api.send(from_address(
            &format!("10.0.1.{index}"),
            Method::POST,
            "/v1/auth/login",
            None,
            login_body(support::ADMIN.0, support::ADMIN.1),
        ))
    });
    let replies = futures::future::join_all(attempts).await;
    let shed: Vec<_> = replies
        .iter()
        .filter(|r| r.status == StatusCode::SERVICE_UNAVAILABLE)
        .collect();
    assert!(
        !shed.is_empty(),
        "32 logins at once, none waiting: some are shed"
    );
    for reply in &shed {
        assert_eq!(reply.code(), "overloaded");
        assert!(reply.headers.contains_key("retry-after"));
    }
    for reply in &replies {
        assert!(
            [StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE].contains(&reply.status),
            "{reply:?}"
        );
    }
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_ends_the_token_on_every_node() {
    let api = TestApi::start(Kind::Sqlite, "logout").await.unwrap();
    let folder = api.sqlite_folder().unwrap();
    let other = Server::start(
        &store::Backend::Sqlite(folder.join("ledger.db")),
        support::generous(),
        engine::EngineSettings::default(),
    )
    .await
    .unwrap();
    let bob = api.user("bob", "support").await;
    // The other node knows the token (and caches it).
    let other_router = other.router();
    let me = |router: &axum::Router| {
        let request = from_address("10.0.0.9", Method::GET, "/v1/me", Some(&bob.token), None);
        let router = router.clone();
        async move { router.oneshot(request).await.unwrap().status() }
    };
    assert_eq!(me(&other_router).await, StatusCode::OK);
    let reply = api
        .call(
            Method::POST,
            "/v1/auth/logout",
            Some(&bob.token),
            None,
            None,
        )
        .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    // Here at once; a second logout with it is refused like any bad token.
    assert_eq!(
        api.get("/v1/me", &bob.token).await.status,
        StatusCode::UNAUTHORIZED
    );
    let again = api
        .call(
            Method::POST,
            "/v1/auth/logout",
            Some(&bob.token),
            None,
            None,
        )
        .await;
    assert_eq!(again.status, StatusCode::UNAUTHORIZED);
    // There once its revocation poll has run.
    let deadline = std::time::Instant::now() + HANG;
    while me(&other_router).await != StatusCode::UNAUTHORIZED {
        assert!(
            std::time::Instant::now() < deadline,
            "the other node never saw the logout"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Other sessions live on.
    assert_eq!(api.get("/v1/me", &api.admin).await.status, StatusCode::OK);
    other.stop().await;
    api.stop().await;
}

async fn old_keys_and_ended_sessions_are_purged(api: &TestApi) {
    let access = &api.server.state.access;
    let day_ms = 24 * 60 * 60 * 1000;
    let created_ms = 1_000_000;
    assert_eq!(
        access
            .begin("user-1", "done", "hash", created_ms, 500)
            .await
            .unwrap(),
        api::server::access::Begun::Run
    );
    access.complete("user-1", "done", 201, "{}").await.unwrap();
    access
        .begin("user-1", "in-flight", "hash", created_ms, 500)
        .await
        .unwrap();
    // Younger than a day: kept.
    let now_ms = created_ms + day_ms - 1;
    assert_eq!(
        access
            .purge_keys(now_ms - day_ms, now_ms, 100)
            .await
            .unwrap(),
        0
    );
    // A day old: both go (the claim ran out long ago), in batches.
    let now_ms = created_ms + day_ms;
    assert_eq!(
        access.purge_keys(now_ms - day_ms, now_ms, 1).await.unwrap(),
        1
    );
    assert_eq!(
        access
            .purge_keys(now_ms - day_ms, now_ms, 100)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        access
            .begin("user-1", "done", "other-hash", now_ms, 500)
            .await
            .unwrap(),
        api::server::access::Begun::Run
    );
    // A logout ends the session at once; it is listed as ended, then purged.
    let carol = api.user("carol", "customer").await;
    let now_ms = api.server.state.now_ms();
    api.server
        .state
        .auth
        .logout(&carol.token, now_ms)
        .await
        .unwrap();
    let ended = access
        .sessions_ended_since(now_ms - 1_000, now_ms + 1, 10)
        .await
        .unwrap();
    assert_eq!(ended.len(), 1);
    assert!(access.purge_sessions(now_ms + 1).await.unwrap() >= 1);
    assert!(
        access
            .sessions_ended_since(now_ms - 1_000, now_ms + 1, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

on_both_backends!(
    purges_on_sqlite,
    purges_on_postgres,
    old_keys_and_ended_sessions_are_purged
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_products_answer_404_and_leave_no_trace() {
    let api = TestApi::start(Kind::Sqlite, "made_up_products")
        .await
        .unwrap();
    let buyer = api.customer("mallory", 100_000).await;
    api.open_product("real-bond", 10_000, 1, 1_000).await;
    let head = api.server.state.store.head().await.unwrap();
    for index in 0..50 {
        let made_up = format!("made-up-{index}");
        let bought = api.buy(&buyer, &made_up, 10, &format!("k{index}")).await;
        assert_eq!(
            (bought.status, bought.code()),
            (StatusCode::NOT_FOUND, "not_found")
        );
        for action in ["open", "close"] {
            let reply = api
                .call(
                    Method::POST,
                    &format!("/v1/products/{made_up}/{action}"),
                    Some(&api.admin),
                    None,
                    None,
                )
                .await;
            assert_eq!(
                (reply.status, reply.code()),
                (StatusCode::NOT_FOUND, "not_found")
            );
        }
    }
    assert_eq!(api.server.state.store.head().await.unwrap(), head);
    // Refused before their idempotency keys were written: no key is taken.
    api.settle().await;
    for index in [0, 49] {
        let begun = api
            .server
            .state
            .access
            .begin(&buyer.user_id, &format!("k{index}"), "probe", 1, 500)
            .await
            .unwrap();
        assert_eq!(begun, api::server::access::Begun::Run, "key k{index}");
    }
    let queues = api.server.state.engine.queue_depths();
    assert!(
        queues.iter().all(|(id, _)| id.as_str() == "real-bond"),
        "{queues:?}"
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_never_name_a_made_up_product() {
    let api = TestApi::start(Kind::Sqlite, "metrics_labels")
        .await
        .unwrap();
    let buyer = api.customer("mallory", 100_000).await;
    api.open_product("real-bond", 10_000, 1, 1_000).await;
    assert_eq!(
        api.buy(&buyer, "real-bond", 10, "k").await.status,
        StatusCode::CREATED
    );
    let marker = format!("zz-made-up-{}", Uuid::now_v7().simple());
    assert_eq!(
        api.buy(&buyer, &marker, 10, "k2").await.status,
        StatusCode::NOT_FOUND
    );
    let text = metrics_text(&api).await;
    assert!(
        text.contains("real-bond"),
        "the real product's queue is reported"
    );
    assert!(!text.contains(&marker), "a made-up product has a series");
    api.stop().await;
}

async fn metrics_text(api: &TestApi) -> String {
    let response = api
        .server
        .router()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 24)
        .await
        .unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_short_plain_request_ids_are_kept_and_recorded() {
    let api = TestApi::start(Kind::Sqlite, "request_ids").await.unwrap();
    let buyer = api.customer("rita", 100_000).await;
    api.open_product("id-bond", 10_000, 1, 1_000).await;
    let buy = |request_id: String, key: &'static str| {
        let request = Request::post("/v1/products/id-bond/purchases")
            .header("authorization", format!("Bearer {}", buyer.token))
            .header("idempotency-key", key)
            .header("content-type", "application/json")
            .header("x-request-id", request_id)
            .body(Body::from(json!({"amount": 10}).to_string()))
            .unwrap();
        api.send(request)
    };
    let kept = buy("client-req.1:a_b".into(), "k1").await;
    assert_eq!(kept.status, StatusCode::CREATED);
    assert_eq!(kept.headers["x-request-id"], "client-req.1:a_b");
    let mut used = vec!["client-req.1:a_b".to_owned()];
    for (bad, key) in [
        ("x".repeat(65), "k2"),
        ("<script>alert(1)</script>".into(), "k3"),
    ] {
        let replaced = buy(bad.clone(), key).await;
        assert_eq!(replaced.status, StatusCode::CREATED);
        let id = replaced.headers["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_ne!(id, bad);
        assert!(
            api::server::guard::is_acceptable_request_id(id.as_bytes()),
            "{id}"
        );
        used.push(id);
    }
    // The log records exactly the ids the answers carried.
    let events = api.get("/v1/audit/events?limit=1000", &api.admin).await;
    let recorded: BTreeSet<String> = events.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|event| event["metadata"]["request_id"].as_str().map(str::to_owned))
        .collect();
    for id in &recorded {
        assert!(
            api::server::guard::is_acceptable_request_id(id.as_bytes()),
            "{id}"
        );
    }
    for id in &used {
        assert!(recorded.contains(id), "{id} not in {recorded:?}");
    }
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_streams_are_capped_and_end_by_themselves() {
    let limits = Limits {
        streams_per_address_max: 2,
        streams_max: 3,
        stream_lifetime: Duration::from_secs(1),
        ..support::generous()
    };
    let api = TestApi::start_with(Kind::Sqlite, "stream_caps", limits)
        .await
        .unwrap();
    let router = api.server.router();
    let open = |address: &'static str| {
        let router = router.clone();
        async move {
            router
                .oneshot(from_address(
                    address,
                    Method::GET,
                    "/v1/progress/stream",
                    None,
                    None,
                ))
                .await
                .unwrap()
        }
    };
    let first = open("10.0.0.1").await;
    let second = open("10.0.0.1").await;
    assert_eq!(
        (first.status(), second.status()),
        (StatusCode::OK, StatusCode::OK)
    );
    let third = open("10.0.0.1").await;
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(third.headers().contains_key("retry-after"));
    let elsewhere = open("10.0.0.2").await;
    assert_eq!(elsewhere.status(), StatusCode::OK);
    // The total is reached too.
    assert_eq!(
        open("10.0.0.3").await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // Each stream ends by itself after its lifetime, and its place is free.
    for stream in [first, second, elsewhere] {
        tokio::time::timeout(HANG, axum::body::to_bytes(stream.into_body(), 1 << 24))
            .await
            .expect("the stream outlived its lifetime")
            .unwrap();
    }
    assert_eq!(api.server.state.feed.open_streams(), 0);
    assert_eq!(open("10.0.0.1").await.status(), StatusCode::OK);
    api.stop().await;
}
