//! `ledger fake-gateway`: a payment provider for development, demos and
//! tests. It speaks the provider contract of docs/http-api.md and, like the real ones
//! the ledger must survive, does **not** de-duplicate: every call that pays
//! makes a new payment, whatever its key. It records every payment, lists
//! them (`GET /payments`), and injects faults drawn from a seeded generator:
//! latency, timeouts (it hangs, then answers 504 without paying), late
//! payments (it hangs, pays, then answers 504), 5xx after paying, and
//! definitive refusals.

use super::{PaymentAnswer, PaymentBody};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Options of `ledger fake-gateway`.
#[derive(Debug, Clone, clap::Args)]
pub struct FakeGatewayOptions {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub listen: SocketAddr,
    /// Delay before every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Share of payment calls that hang for `--hang-ms`, then answer 504
    /// without paying (the caller times out first).
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    pub timeout_rate: f64,
    /// Share of payment calls that hang for `--hang-ms`, then pay, then
    /// answer 504 (the caller gave up before the payment landed).
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    pub late_pay_rate: f64,
    /// Share of payment calls that pay, then answer 500.
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    pub error_after_pay_rate: f64,
    /// Share of payment calls refused definitively (422).
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    pub fail_rate: f64,
    /// How long a timed-out call hangs, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub hang_ms: u64,
    /// Seed of the fault generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Calls (payments and lookups) answered per second at most; beyond
    /// it, 429 with `Retry-After: 1` and nothing paid (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub rate_limit: u32,
}

pub(crate) fn rate(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if !(0.0..=1.0).contains(&value) {
        return Err("a rate is between 0 and 1".into());
    }
    Ok(value)
}

/// A payment the gateway made (or refused).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Payment {
    /// Its id.
    pub payment_id: String,
    /// The key it was asked with.
    pub idempotency_key: String,
    /// The payee.
    pub account_id: String,
    /// Minor units.
    pub amount: i64,
    /// ISO 4217.
    pub currency: String,
    /// `succeeded` or `failed`.
    pub status: String,
}

/// Every payment, in order.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PaymentList {
    /// The payments.
    pub payments: Vec<Payment>,
}

struct Book {
    payments: Vec<Payment>,
    random: StdRng,
}

#[derive(Clone)]
struct Gateway {
    book: Arc<Mutex<Book>>,
    options: FakeGatewayOptions,
    calls: Arc<CallStats>,
    limiter: Option<Arc<governor::DefaultDirectRateLimiter>>,
}

/// What the gateway saw of its callers, for benchmarks.
#[derive(Debug, Default)]
pub struct CallStats {
    in_flight: AtomicU64,
    peak: AtomicU64,
    calls: AtomicU64,
    throttled: AtomicU64,
    paid: AtomicU64,
}

impl CallStats {
    /// The most calls (payments and lookups) in progress at once so far.
    pub fn peak_in_flight(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Calls received so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Payments made so far (succeeded, whatever was answered).
    pub fn paid(&self) -> u64 {
        self.paid.load(Ordering::Relaxed)
    }

    /// Calls answered 429 so far.
    pub fn throttled(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }

    fn enter(self: &Arc<CallStats>) -> InFlight {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(now, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// One call in progress; counted out when dropped (also when the caller
/// hangs up mid-call).
struct InFlight(Arc<CallStats>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The gateway's record and call counts, read in-process (benchmarks).
#[derive(Clone)]
pub struct GatewayHandle {
    book: Arc<Mutex<Book>>,
    /// What the gateway saw of its callers.
    pub calls: Arc<CallStats>,
}

impl GatewayHandle {
    /// Every payment made or refused so far, in order.
    pub fn payments(&self) -> Vec<Payment> {
        self.book.lock().expect("BUG: poisoned").payments.clone()
    }
}

enum Fault {
    None,
    Refuse,
    Hang,
    HangThenPay,
    ErrorAfterPay,
}

impl Gateway {
    /// A 429 when the caller is over the rate limit.
    fn over_rate(&self) -> Option<Response> {
        let limiter = self.limiter.as_ref()?;
        if limiter.check().is_ok() {
            return None;
        }
        self.calls.throttled.fetch_add(1, Ordering::Relaxed);
        Some((StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")]).into_response())
    }

    fn fault(&self) -> Fault {
        let roll: f64 = self.book.lock().expect("BUG: poisoned").random.random();
        let o = &self.options;
        if roll < o.fail_rate {
            Fault::Refuse
        } else if roll < o.fail_rate + o.timeout_rate {
            Fault::Hang
        } else if roll < o.fail_rate + o.timeout_rate + o.late_pay_rate {
            Fault::HangThenPay
        } else if roll < o.fail_rate + o.timeout_rate + o.late_pay_rate + o.error_after_pay_rate {
            Fault::ErrorAfterPay
        } else {
            Fault::None
        }
    }

    fn record(&self, body: &PaymentBody, status: &str) -> String {
        if status == "succeeded" {
            self.calls.paid.fetch_add(1, Ordering::Relaxed);
        }
        let mut book = self.book.lock().expect("BUG: poisoned");
        let payment_id = format!("pay-{}", book.payments.len() + 1);
        book.payments.push(Payment {
            payment_id: payment_id.clone(),
            idempotency_key: body.idempotency_key.clone(),
            account_id: body.account_id.clone(),
            amount: body.amount,
            currency: body.currency.clone(),
            status: status.to_owned(),
        });
        payment_id
    }
}

async fn pay(State(gateway): State<Gateway>, Json(body): Json<PaymentBody>) -> Response {
    let _in_flight = gateway.calls.enter();
    tokio::time::sleep(Duration::from_millis(gateway.options.latency_ms)).await;
    if let Some(throttled) = gateway.over_rate() {
        return throttled;
    }
    if body.amount <= 0 || body.idempotency_key.is_empty() {
        let answer = PaymentAnswer {
            status: "failed".into(),
            reason: Some("invalid payment".into()),
            ..PaymentAnswer::default()
        };
        return (StatusCode::UNPROCESSABLE_ENTITY, Json(answer)).into_response();
    }
    match gateway.fault() {
        Fault::Refuse => {
            gateway.record(&body, "failed");
            let answer = PaymentAnswer {
                status: "failed".into(),
                reason: Some("declined by the fake gateway".into()),
                ..PaymentAnswer::default()
            };
            (StatusCode::UNPROCESSABLE_ENTITY, Json(answer)).into_response()
        }
        Fault::Hang => {
            tokio::time::sleep(Duration::from_millis(gateway.options.hang_ms)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        Fault::HangThenPay => {
            tokio::time::sleep(Duration::from_millis(gateway.options.hang_ms)).await;
            gateway.record(&body, "succeeded");
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        Fault::ErrorAfterPay => {
            gateway.record(&body, "succeeded");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
        Fault::None => {
            let payment_id = gateway.record(&body, "succeeded");
            let answer = PaymentAnswer {
                status: "succeeded".into(),
                payment_id: Some(payment_id),
                reason: None,
            };
            (StatusCode::OK, Json(answer)).into_response()
        }
    }
}

async fn lookup(State(gateway): State<Gateway>, Path(key): Path<String>) -> Response {
    let _in_flight = gateway.calls.enter();
    tokio::time::sleep(Duration::from_millis(gateway.options.latency_ms)).await;
    if let Some(throttled) = gateway.over_rate() {
        return throttled;
    }
    let book = gateway.book.lock().expect("BUG: poisoned");
    let with_key: Vec<&Payment> = book
        .payments
        .iter()
        .filter(|p| p.idempotency_key == key)
        .collect();
    let answer = if let Some(paid) = with_key.iter().find(|p| p.status == "succeeded") {
        PaymentAnswer {
            status: "succeeded".into(),
            payment_id: Some(paid.payment_id.clone()),
            reason: None,
        }
    } else if with_key.is_empty() {
        return StatusCode::NOT_FOUND.into_response();
    } else {
        PaymentAnswer {
            status: "failed".into(),
            payment_id: None,
            reason: Some("declined by the fake gateway".into()),
        }
    };
    (StatusCode::OK, Json(answer)).into_response()
}

async fn list(State(gateway): State<Gateway>) -> Json<PaymentList> {
    let book = gateway.book.lock().expect("BUG: poisoned");
    Json(PaymentList {
        payments: book.payments.clone(),
    })
}

/// The gateway's routes.
pub fn router(options: FakeGatewayOptions) -> Router {
    observed_router(options).0
}

/// The gateway's routes and a handle on its record and call counts.
pub fn observed_router(options: FakeGatewayOptions) -> (Router, GatewayHandle) {
    let limiter = NonZeroU32::new(options.rate_limit).map(|rate| {
        Arc::new(governor::RateLimiter::direct(governor::Quota::per_second(
            rate,
        )))
    });
    let gateway = Gateway {
        book: Arc::new(Mutex::new(Book {
            payments: Vec::new(),
            random: StdRng::seed_from_u64(options.seed),
        })),
        options,
        calls: Arc::new(CallStats::default()),
        limiter,
    };
    let handle = GatewayHandle {
        book: gateway.book.clone(),
        calls: gateway.calls.clone(),
    };
    let router = Router::new()
        .route("/payments", post(pay).get(list))
        .route("/payments/{key}", get(lookup))
        .with_state(gateway);
    (router, handle)
}

/// Starts the gateway on a bound listener in this process (tests).
pub fn spawn(
    options: FakeGatewayOptions,
    listener: tokio::net::TcpListener,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    spawn_observed(options, listener).0
}

/// Starts the gateway in this process, with a handle on its record.
pub fn spawn_observed(
    options: FakeGatewayOptions,
    listener: tokio::net::TcpListener,
) -> (tokio::task::JoinHandle<std::io::Result<()>>, GatewayHandle) {
    let (app, handle) = observed_router(options);
    (
        tokio::spawn(async move { axum::serve(listener, app).await }),
        handle,
    )
}

/// Runs `ledger fake-gateway` until Ctrl-C or SIGTERM.
pub async fn run(options: FakeGatewayOptions) -> anyhow::Result<ExitCode> {
    let listener = tokio::net::TcpListener::bind(options.listen).await?;
    let address = listener.local_addr()?;
    let stop = crate::read_models::shutdown_signal();
    println!(
        "fake gateway on http://{address} (timeouts {}, late payments {}, 5xx after paying {}, refusals {}, latency {} ms, rate limit {}/s, seed {}); it does not de-duplicate",
        options.timeout_rate,
        options.late_pay_rate,
        options.error_after_pay_rate,
        options.fail_rate,
        options.latency_ms,
        options.rate_limit,
        options.seed
    );
    axum::serve(listener, router(options))
        .with_graceful_shutdown(stop)
        .await?;
    Ok(ExitCode::SUCCESS)
}
