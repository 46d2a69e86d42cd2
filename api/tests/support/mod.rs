//! A running API for tests: the real server state and router on SQLite or
//! PostgreSQL, called without a socket (`Router::oneshot`).

#![allow(dead_code)]

use api::server::{Limits, Server, bootstrap_admin};
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;
use store::Backend;
use store::testing::TestPostgres;
use tower::ServiceExt;

/// The bootstrap admin of every test server.
pub const ADMIN: (&str, &str) = ("admin", "admin-password-1");

/// An answer.
#[derive(Debug)]
pub struct Reply {
    /// Its status.
    pub status: StatusCode,
    /// Its headers.
    pub headers: HeaderMap,
    /// Its body as JSON (`Null` when not JSON).
    pub body: Value,
}

impl Reply {
    /// The error code of a non-2xx answer.
    pub fn code(&self) -> &str {
        self.body["error"].as_str().unwrap_or("")
    }
}

/// A user made for a test.
#[derive(Debug, Clone)]
pub struct User {
    /// Their token.
    pub token: String,
    /// Their id.
    pub user_id: String,
    /// A customer's account.
    pub account_id: Option<String>,
}

/// A server under test.
pub struct TestApi {
    /// The server.
    pub server: Server,
    router: axum::Router,
    /// The admin's token.
    pub admin: String,
    _sqlite: Option<tempfile::TempDir>,
    _postgres: Option<TestPostgres>,
}

/// The backend a test runs on.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// A temporary SQLite file.
    Sqlite,
    /// A fresh PostgreSQL database (skipped without `DATABASE_URL`).
    Postgres,
}

impl TestApi {
    /// A server on a fresh database of this kind, with generous limits;
    /// `None` when PostgreSQL is asked for and not configured.
    pub async fn start(kind: Kind, test: &str) -> Option<TestApi> {
        TestApi::start_with(kind, test, generous()).await
    }

    /// A server with these limits.
    pub async fn start_with(kind: Kind, test: &str, limits: Limits) -> Option<TestApi> {
        TestApi::start_full(kind, test, limits, engine::EngineSettings::default()).await
    }

    /// A server with these limits and engine settings.
    pub async fn start_full(
        kind: Kind,
        test: &str,
        limits: Limits,
        settings: engine::EngineSettings,
    ) -> Option<TestApi> {
        TestApi::start_with_runner(kind, test, limits, settings, Default::default()).await
    }

    /// A server with these limits, engine settings and projection runner
    /// options.
    pub async fn start_with_runner(
        kind: Kind,
        test: &str,
        limits: Limits,
        settings: engine::EngineSettings,
        runner: projections::runner::RunnerOptions,
    ) -> Option<TestApi> {
        let (backend, sqlite, postgres) = match kind {
            Kind::Sqlite => {
                let folder = tempfile::tempdir().unwrap();
                let backend = Backend::Sqlite(folder.path().join("ledger.db"));
                (backend, Some(folder), None)
            }
            Kind::Postgres => {
                let database = TestPostgres::create(test).await?;
                (
                    Backend::Postgres(database.url.clone()),
                    None,
                    Some(database),
                )
            }
        };
        let server = Server::start_with_runner(
            &backend,
            &store::LogLocation::Database,
            limits,
            settings,
            runner,
        )
        .await
        .unwrap();
        bootstrap_admin(&server.state, ADMIN.0, ADMIN.1)
            .await
            .unwrap();
        let router = server.router();
        let mut api = TestApi {
            server,
            router,
            admin: String::new(),
            _sqlite: sqlite,
            _postgres: postgres,
        };
        api.admin = api.login(ADMIN.0, ADMIN.1).await;
        Some(api)
    }

    /// The folder of a SQLite test server's files.
    pub fn sqlite_folder(&self) -> Option<std::path::PathBuf> {
        self._sqlite.as_ref().map(|folder| folder.path().to_owned())
    }

    /// Sends a request.
    pub async fn send(&self, request: Request<Body>) -> Reply {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 24)
            .await
            .unwrap();
        Reply {
            status,
            headers,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    /// Calls a route with an optional token, idempotency key and JSON body.
    pub async fn call(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        let body = match body {
            Some(value) => {
                request = request.header("content-type", "application/json");
                Body::from(value.to_string())
            }
            None => Body::empty(),
        };
        self.send(request.body(body).unwrap()).await
    }

    /// GET with a token.
    pub async fn get(&self, uri: &str, token: &str) -> Reply {
        self.call(Method::GET, uri, Some(token), None, None).await
    }

    /// POST JSON with a token and no idempotency key.
    pub async fn post(&self, uri: &str, token: &str, body: Value) -> Reply {
        self.call(Method::POST, uri, Some(token), None, Some(body))
            .await
    }

    /// Logs in; panics unless it works.
    pub async fn login(&self, username: &str, password: &str) -> String {
        let reply = self
            .call(
                Method::POST,
                "/v1/auth/login",
                None,
                None,
                Some(json!({"username": username, "password": password})),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "login {username}: {reply:?}");
        reply.body["token"].as_str().unwrap().to_owned()
    }

    /// Creates a user in a role and logs them in.
    pub async fn user(&self, username: &str, role: &str) -> User {
        let password = format!("{username}-password");
        let reply = self
            .post(
                "/v1/users",
                &self.admin,
                json!({"username": username, "password": password, "role": role}),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
        User {
            token: self.login(username, &password).await,
            user_id: reply.body["user_id"].as_str().unwrap().to_owned(),
            account_id: reply.body["account_id"].as_str().map(str::to_owned),
        }
    }

    /// A customer with money.
    pub async fn customer(&self, username: &str, deposit: i64) -> User {
        let user = self.user(username, "customer").await;
        let account = user.account_id.clone().unwrap();
        let reply = self
            .post(
                &format!("/v1/accounts/{account}/deposits"),
                &self.admin,
                json!({"amount": deposit, "reference": format!("seed-{username}")}),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
        user
    }

    /// Lists and opens a product.
    pub async fn open_product(&self, product_id: &str, quota: i64, min: i64, max: i64) {
        let reply = self
            .post(
                "/v1/products",
                &self.admin,
                json!({"product_id": product_id, "name": format!("Product {product_id}"),
                       "quota": quota, "min_purchase": min, "max_purchase": max,
                       "annual_rate_bps": 450, "term_days": 90}),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
        let reply = self
            .post(
                &format!("/v1/products/{product_id}/open"),
                &self.admin,
                json!({}),
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    }

    /// Buys with an idempotency key.
    pub async fn buy(&self, customer: &User, product_id: &str, amount: i64, key: &str) -> Reply {
        self.call(
            Method::POST,
            &format!("/v1/products/{product_id}/purchases"),
            Some(&customer.token),
            Some(key),
            Some(json!({"amount": amount})),
        )
        .await
    }

    /// Waits until every projection has applied the whole log.
    pub async fn settle(&self) {
        let state = &self.server.state;
        for _ in 0..600 {
            let head = state.store.head().await.unwrap();
            let report = state.statuses.report();
            if !report.is_empty() && report.iter().all(|r| r.position >= head) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "projections did not catch up: {:?}",
            state.statuses.report()
        );
    }

    /// Serves the server's state as it is now (after payout workers were
    /// started, say, which give the handlers a payment provider).
    pub fn refresh_router(&mut self) {
        self.router = self.server.router();
    }

    /// Stops the server.
    pub async fn stop(self) {
        self.server.stop().await;
    }
}

/// Limits that never get in a functional test's way.
pub fn generous() -> Limits {
    Limits {
        rate_per_second: 100_000,
        rate_burst: 100_000,
        auth_failures_per_address: 1_000_000,
        login_failures_per_user: 1_000_000,
        suspect_logins_per_second: 1_000_000,
        ..Limits::default()
    }
}

/// Runs a test body on SQLite, then on PostgreSQL when configured.
#[macro_export]
macro_rules! on_both_backends {
    ($sqlite:ident, $postgres:ident, $body:path) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $sqlite() {
            let api = support::TestApi::start(support::Kind::Sqlite, stringify!($sqlite))
                .await
                .unwrap();
            $body(&api).await;
            api.stop().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $postgres() {
            let Some(api) =
                support::TestApi::start(support::Kind::Postgres, stringify!($postgres)).await
            else {
                return;
            };
            $body(&api).await;
            api.stop().await;
        }
    };
}
