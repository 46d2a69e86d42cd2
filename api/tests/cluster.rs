//! Several `ledger serve` nodes on one PostgreSQL database, in this process,
//! each on a real socket: one node holds each product's lease and runs its
//! writer, the others forward its purchases and commands to it and relay
//! the answers. Purchases go through every node; one writer decides them
//! all; the ledger's invariants hold (the oracle and the drift check); an
//! owner that stops is replaced within the lease's time to live plus a
//! second, and buyers retrying with their keys get their first outcome.
//! Skipped (with a note) without `DATABASE_URL`.

use api::server::cluster::ClusterOptions;
use api::server::{Limits, Server, bootstrap_admin};
use axum::extract::ConnectInfo;
use engine::EngineSettings;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use store::testing::TestPostgres;
use store::{Backend, EventStore, LogLocation};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tower::Service;

const SECRET: &str = "cluster-test-node-secret";
const ADMIN: (&str, &str) = ("admin", "admin-password-1");
const LEASE_TTL: Duration = Duration::from_secs(3);

/// One cluster at a time: three nodes' pools take a good share of a
/// PostgreSQL server's 100 connections.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One node: its server, its listener's task and its connections' tasks
/// (aborted together to stop it as a crash would).
struct Node {
    url: String,
    server: Option<Server>,
    accept: tokio::task::JoinHandle<()>,
    connections: Arc<Mutex<JoinSet<()>>>,
    alive: AtomicBool,
}

impl Node {
    async fn start(database_url: &str, index: usize) -> Node {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let options = ClusterOptions {
            node_id: Some(format!("node-{index}")),
            advertise_url: Some(url.clone()),
            node_secret: Some(SECRET.into()),
            lease_ttl: LEASE_TTL,
            lease_renew: LEASE_TTL / 3,
            ..ClusterOptions::default()
        };
        let limits = Limits {
            rate_per_second: 100_000,
            rate_burst: 100_000,
            auth_failures_per_address: 1_000_000,
            ..Limits::default()
        };
        let server = Server::start_node(
            &Backend::Postgres(database_url.to_owned()),
            &LogLocation::Database,
            limits,
            EngineSettings::default(),
            &options,
        )
        .await
        .unwrap();
        let router = server.router();
        let connections = Arc::new(Mutex::new(JoinSet::new()));
        let accept = tokio::spawn(accept(listener, router, connections.clone()));
        Node {
            url,
            server: Some(server),
            accept,
            connections,
            alive: AtomicBool::new(true),
        }
    }

    fn server(&self) -> &Server {
        self.server.as_ref().expect("a live node")
    }

    fn stats(&self) -> engine::StatsSnapshot {
        self.server().state.engine.stats()
    }

    fn forwarded(&self) -> (u64, u64) {
        let stats = &self.server().state.forwarder.stats;
        (
            stats.forwarded.load(Ordering::Relaxed),
            stats.served.load(Ordering::Relaxed),
        )
    }

    /// Stops the node at once: no more connections, open ones cut, its
    /// writers aborted (no lease released: the lease must lapse). Returns
    /// the server, whose background work the caller stops.
    fn kill(&mut self) -> Server {
        self.alive.store(false, Ordering::SeqCst);
        self.accept.abort();
        self.connections.lock().unwrap().abort_all();
        let server = self.server.take().expect("a live node");
        server.state.engine.halt();
        server
    }
}

async fn accept(listener: TcpListener, router: axum::Router, connections: Arc<Mutex<JoinSet<()>>>) {
    loop {
        let Ok((stream, address)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        connections.lock().unwrap().spawn(async move {
            let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let mut request = request.map(axum::body::Body::new);
                request.extensions_mut().insert(ConnectInfo(address));
                router.clone().call(request)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The cluster and a client.
struct Cluster {
    nodes: Vec<Node>,
    client: reqwest::Client,
    admin: String,
    database_url: String,
    _database: TestPostgres,
}

struct Buyer {
    token: String,
}

impl Cluster {
    async fn start(test: &str, count: usize) -> Option<Cluster> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let database = TestPostgres::create(test).await?;
        let mut nodes = Vec::new();
        for index in 0..count {
            nodes.push(Node::start(&database.url, index).await);
        }
        bootstrap_admin(&nodes[0].server().state, ADMIN.0, ADMIN.1)
            .await
            .unwrap();
        let mut cluster = Cluster {
            nodes,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            admin: String::new(),
            database_url: database.url.clone(),
            _database: database,
        };
        cluster.admin = cluster.login(0, ADMIN.0, ADMIN.1).await;
        Some(cluster)
    }

    /// POSTs to one node; `None` when the node could not be reached.
    async fn post(
        &self,
        node: usize,
        path: &str,
        token: &str,
        key: Option<&str>,
        body: Value,
    ) -> Option<(StatusCode, Value)> {
        let mut request = self
            .client
            .post(format!("{}{path}", self.nodes[node].url))
            .bearer_auth(token)
            .json(&body);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let answer = request.send().await.ok()?;
        let status = answer.status();
        let body = answer.json().await.unwrap_or(Value::Null);
        Some((status, body))
    }

    async fn ok(&self, node: usize, path: &str, token: &str, body: Value) -> Value {
        let (status, body) = self.post(node, path, token, None, body).await.unwrap();
        assert!(
            status.is_success(),
            "POST {path} on node {node}: {status} {body}"
        );
        body
    }

    async fn login(&self, node: usize, username: &str, password: &str) -> String {
        let answer = self
            .client
            .post(format!("{}/v1/auth/login", self.nodes[node].url))
            .json(&json!({"username": username, "password": password}))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        let body: Value = answer.json().await.unwrap();
        body["token"].as_str().unwrap().to_owned()
    }

    /// Customers with money, each made through another node.
    async fn buyers(&self, count: usize, deposit: i64) -> Vec<Buyer> {
        let mut buyers = Vec::new();
        for index in 0..count {
            let node = index % self.nodes.len();
            let (username, password) =
                (format!("buyer-{index}"), format!("buyer-{index}-password"));
            let user = self
                .ok(
                    node,
                    "/v1/users",
                    &self.admin,
                    json!({"username": username, "password": password, "role": "customer"}),
                )
                .await;
            let account = user["account_id"].as_str().unwrap().to_owned();
            self.ok(
                node,
                &format!("/v1/accounts/{account}/deposits"),
                &self.admin,
                json!({"amount": deposit, "reference": format!("seed-{index}")}),
            )
            .await;
            buyers.push(Buyer {
                token: self.login(node, &username, &password).await,
            });
        }
        buyers
    }

    /// Lists a product through one node and opens it through another.
    async fn product(&self, product_id: &str, quota: i64) {
        let last = self.nodes.len() - 1;
        self.ok(
            last,
            "/v1/products",
            &self.admin,
            json!({"product_id": product_id, "name": "Hot", "quota": quota,
                   "min_purchase": 1, "max_purchase": 10,
                   "annual_rate_bps": 450, "term_days": 90}),
        )
        .await;
        self.ok(
            0,
            &format!("/v1/products/{product_id}/open"),
            &self.admin,
            json!({}),
        )
        .await;
    }

    async fn buy(
        &self,
        node: usize,
        buyer: &Buyer,
        product_id: &str,
        key: &str,
    ) -> Option<(StatusCode, Value)> {
        self.post(
            node,
            &format!("/v1/products/{product_id}/purchases"),
            &buyer.token,
            Some(key),
            json!({"amount": 1}),
        )
        .await
    }

    fn live(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].alive.load(Ordering::SeqCst))
            .collect()
    }

    /// Which live nodes hold leases (claims granted so far).
    fn leases_claimed(&self) -> Vec<u64> {
        self.live()
            .into_iter()
            .map(|i| self.nodes[i].stats().leases_claimed)
            .collect()
    }

    async fn audit(&self) -> engine::audit::Audit {
        let store = store::PostgresEventStore::open(&self.database_url)
            .await
            .unwrap();
        engine::audit::audit(&store as &dyn EventStore)
            .await
            .unwrap()
    }

    /// `ledger audit drift` on the shared database: the read models equal a
    /// rebuild from the log, and the trial balance holds.
    fn check_drift(&self) {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_ledger"))
            .args(["audit", "drift"])
            .env("DATABASE_URL", &self.database_url)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "drift: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    async fn stop(mut self) {
        for node in &mut self.nodes {
            if let Some(server) = node.server.take() {
                node.accept.abort();
                node.connections.lock().unwrap().abort_all();
                server.stop().await;
            }
        }
    }
}

/// Buys with a key through the live nodes, starting at `first`, until an
/// answer that is not 503 (or a node that cannot be reached): a buyer
/// behind a load balancer retrying with the same key.
async fn buy_until_final(
    cluster: &Cluster,
    first: usize,
    buyer: &Buyer,
    product_id: &str,
    key: &str,
) -> (StatusCode, Value) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut attempt = first;
    loop {
        let live = cluster.live();
        let node = live[attempt % live.len()];
        attempt += 1;
        match cluster.buy(node, buyer, product_id, key).await {
            Some((status, body)) if status != StatusCode::SERVICE_UNAVAILABLE => {
                return (status, body);
            }
            _ => {
                assert!(Instant::now() < deadline, "no final answer for {key}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn one_writer_across(nodes: usize) {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    let Some(cluster) = Cluster::start(&format!("cluster_{nodes}_nodes"), nodes).await else {
        return;
    };
    const QUOTA: i64 = 60;
    const BUYERS: usize = 24;
    const KEYS: usize = 4;
    let product = "hot";
    cluster.product(product, QUOTA).await;
    let buyers = Arc::new(cluster.buyers(BUYERS, 1_000).await);
    let cluster = Arc::new(cluster);
    let mut storm = JoinSet::new();
    for (index, _) in buyers.iter().enumerate() {
        for key in 0..KEYS {
            let (cluster, buyers) = (cluster.clone(), buyers.clone());
            storm.spawn(async move {
                let node = (index + key) % cluster.nodes.len();
                let key_text = format!("buy-{index}-{key}");
                let (status, body) = cluster
                    .buy(node, &buyers[index], product, &key_text)
                    .await
                    .expect("every node is up");
                (index, key_text, status, body)
            });
        }
    }
    let mut answers = BTreeMap::new();
    while let Some(answer) = storm.join_next().await {
        let (index, key, status, body) = answer.unwrap();
        let code = body["error"].as_str().unwrap_or("");
        assert!(
            status == StatusCode::CREATED
                || (status == StatusCode::CONFLICT
                    && matches!(code, "sold_out" | "insufficient_quota")),
            "{key}: {status} {body}"
        );
        answers.insert(key, (index, status, body));
    }
    let confirmed = answers
        .values()
        .filter(|(_, status, _)| *status == StatusCode::CREATED)
        .count();
    assert_eq!(confirmed as i64, QUOTA, "every unit sold, none twice");
    // Retried through another node, each key gets its first outcome.
    for (key, (index, status, body)) in &answers {
        let node = (index + 1) % cluster.nodes.len();
        let (again, again_body) = cluster
            .buy(node, &buyers[*index], product, key)
            .await
            .unwrap();
        assert_eq!(again, *status, "{key}");
        assert_eq!(again_body["order_id"], body["order_id"], "{key}");
    }
    // One writer: one lease granted in the whole cluster, and the other
    // nodes forwarded to it (purchases, and the listing or the opening).
    let claimed = cluster.leases_claimed();
    assert_eq!(
        claimed.iter().sum::<u64>(),
        1,
        "leases claimed per node: {claimed:?}"
    );
    let owner = claimed.iter().position(|&c| c == 1).unwrap();
    let owner_stats = cluster.nodes[owner].stats();
    assert_eq!(owner_stats.product_conflicts, 0, "no writer fenced another");
    let mut forwarded_total = 0;
    for (index, node) in cluster.nodes.iter().enumerate() {
        let (forwarded, served) = node.forwarded();
        if index == owner {
            assert_eq!(forwarded, 0);
        } else {
            assert!(forwarded > 0, "node {index} forwarded nothing");
            assert_eq!(
                served, 0,
                "node {index} decided for a product it does not own"
            );
            assert_eq!(
                node.stats().product_appends,
                0,
                "node {index} wrote the product"
            );
            forwarded_total += forwarded;
        }
    }
    assert_eq!(cluster.nodes[owner].forwarded().1, forwarded_total);
    eprintln!(
        "{nodes} nodes: owner node-{owner}, {forwarded_total} requests forwarded, {} product appends",
        owner_stats.product_appends
    );
    let audit = cluster.audit().await;
    assert_eq!(audit.always_violations(), vec![]);
    assert_eq!(audit.settled_violations(), vec![]);
    let product_id = domain::ProductId::parse(product).unwrap();
    assert_eq!(audit.oracle.confirmed(&product_id), QUOTA);
    // Every node's read models must have caught up before the drift check
    // compares them; the check reads them from the shared database.
    wait_projected(&cluster).await;
    cluster.check_drift();
    Arc::into_inner(cluster).unwrap().stop().await;
}

async fn wait_projected(cluster: &Cluster) {
    let node = cluster.live()[0];
    let state = &cluster.nodes[node].server().state;
    for _ in 0..1_000 {
        let head = state.store.head().await.unwrap();
        let report = state.statuses.report();
        if !report.is_empty() && report.iter().all(|r| r.position >= head) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("projections did not catch up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_one_writer_purchases_through_both() {
    one_writer_across(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_one_writer_purchases_through_every_node() {
    one_writer_across(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_owner_stopped_is_replaced_within_the_lease_ttl_and_first_outcomes_hold() {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    let Some(cluster) = Cluster::start("cluster_failover", 3).await else {
        return;
    };
    const BUYERS: usize = 12;
    let product = "failover";
    cluster.product(product, 100_000).await;
    let buyers = Arc::new(cluster.buyers(BUYERS, 1_000_000).await);
    let (status, _) = buy_until_final(&cluster, 0, &buyers[0], product, "warm-up").await;
    assert_eq!(status, StatusCode::CREATED);
    let claimed = cluster.leases_claimed();
    let owner = claimed.iter().position(|&c| c == 1).unwrap();
    // The buyers keep buying, each key until a final answer, while the
    // owner is stopped under them.
    let stop_buying = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(tokio::sync::RwLock::new(cluster));
    let mut storm = JoinSet::new();
    for index in 0..BUYERS {
        let (shared, buyers, stop) = (shared.clone(), buyers.clone(), stop_buying.clone());
        storm.spawn(async move {
            let mut answers = Vec::new();
            let mut key = 0;
            while !stop.load(Ordering::SeqCst) {
                let key_text = format!("buyer-{index}-{key}");
                let cluster = shared.read().await;
                let answer =
                    buy_until_final(&cluster, index + key, &buyers[index], product, &key_text)
                        .await;
                drop(cluster);
                answers.push((key_text, answer));
                key += 1;
            }
            (index, answers)
        });
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let killed_at = Instant::now();
    let killed = shared.write().await.nodes[owner].kill();
    let stopped = tokio::spawn(killed.stop());
    // Another node takes the lease within its time to live plus a second
    // (buyers keep asking; a claim succeeds once the lease lapsed).
    let taken_over = loop {
        let cluster = shared.read().await;
        if cluster.leases_claimed().iter().sum::<u64>() == 1 {
            break killed_at.elapsed();
        }
        drop(cluster);
        assert!(
            killed_at.elapsed() <= LEASE_TTL + Duration::from_secs(1),
            "no node took the lease within {:?}",
            LEASE_TTL + Duration::from_secs(1)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("owner node-{owner} stopped; lease taken over after {taken_over:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_buying.store(true, Ordering::SeqCst);
    let mut answers = Vec::new();
    while let Some(done) = storm.join_next().await {
        let (index, keys) = done.unwrap();
        answers.extend(keys.into_iter().map(|(key, answer)| (index, key, answer)));
    }
    stopped.await.unwrap();
    let cluster = Arc::into_inner(shared).unwrap().into_inner();
    let mut confirmed = 1; // the warm-up
    for (index, key, (status, body)) in &answers {
        assert_eq!(*status, StatusCode::CREATED, "{key}: {body}");
        confirmed += 1;
        // The first outcome, asked again through a surviving node.
        let (again, again_body) =
            buy_until_final(&cluster, index + 1, &buyers[*index], product, key).await;
        assert_eq!(
            (again, &again_body["order_id"]),
            (*status, &body["order_id"]),
            "{key}"
        );
    }
    assert!(
        answers.len() > BUYERS,
        "the storm bought little: {}",
        answers.len()
    );
    let audit = cluster.audit().await;
    assert_eq!(audit.always_violations(), vec![]);
    assert_eq!(
        audit.settled_violations(),
        vec![],
        "pending reservations resolved, money conserved"
    );
    let product_id = domain::ProductId::parse(product).unwrap();
    assert_eq!(audit.oracle.confirmed(&product_id), confirmed as i64);
    let claimed = cluster.leases_claimed();
    assert_eq!(claimed.iter().sum::<u64>(), 1, "one takeover: {claimed:?}");
    eprintln!(
        "{} purchases confirmed across the failover, each once",
        confirmed
    );
    wait_projected(&cluster).await;
    cluster.check_drift();
    cluster.stop().await;
}
