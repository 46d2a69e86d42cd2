//! The payment provider over HTTP (the contract in docs/http-api.md, "The payment
//! provider"), and `ledger fake-gateway`, a real server speaking it.

pub mod fake;

use async_trait::async_trait;
use domain::payout::ProviderFinding;
use engine::payouts::{LookupOutcome, PaymentOutcome, PaymentProvider, PaymentRequest};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `POST {gateway}/payments`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentBody {
    /// The payout's key, the same on every attempt.
    pub idempotency_key: String,
    /// The holder.
    pub account_id: String,
    /// Minor units.
    pub amount: i64,
    /// ISO 4217.
    pub currency: String,
}

/// What the provider answers about a payment.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PaymentAnswer {
    /// `succeeded` or `failed`.
    pub status: String,
    /// The provider's payment id (succeeded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment_id: Option<String>,
    /// Why it failed (failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The provider at a base URL.
pub struct HttpProvider {
    base: String,
    client: reqwest::Client,
}

impl HttpProvider {
    /// A provider at `base` (`http://host:port`), each call bounded by `timeout`.
    pub fn new(base: &str, timeout: Duration) -> anyhow::Result<HttpProvider> {
        let base = base.trim_end_matches('/').to_owned();
        anyhow::ensure!(
            base.starts_with("http://") || base.starts_with("https://"),
            "the gateway URL must start with http:// or https://"
        );
        Ok(HttpProvider {
            base,
            client: reqwest::Client::builder().timeout(timeout).build()?,
        })
    }
}

#[async_trait]
impl PaymentProvider for HttpProvider {
    async fn pay(&self, request: &PaymentRequest) -> PaymentOutcome {
        let body = PaymentBody {
            idempotency_key: request.idempotency_key.clone(),
            account_id: request.account_id.to_string(),
            amount: request.amount.minor(),
            currency: request.currency.to_string(),
        };
        let sent = self
            .client
            .post(format!("{}/payments", self.base))
            .json(&body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(error) => {
                return PaymentOutcome::Unknown {
                    detail: format!("no answer: {error}"),
                };
            }
        };
        let status = response.status();
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return PaymentOutcome::Throttled {
                retry_after: retry_after(&response),
            };
        }
        let answer: Option<PaymentAnswer> = response.json().await.ok();
        match (status.as_u16(), answer) {
            (
                200,
                Some(PaymentAnswer {
                    status,
                    payment_id: Some(payment_id),
                    ..
                }),
            ) if status == "succeeded" => PaymentOutcome::Paid { payment_id },
            // Only these are definitive; 408, 409, 425 and the like say
            // "not now", not "never" (429 is answered above).
            (400 | 402 | 403 | 422, Some(answer)) if answer.status == "failed" => {
                PaymentOutcome::Refused {
                    reason: answer.reason.unwrap_or_else(|| "refused".into()),
                }
            }
            (code, _) => PaymentOutcome::Unknown {
                detail: format!("answer {code} without a definite outcome"),
            },
        }
    }

    async fn lookup(&self, idempotency_key: &str) -> LookupOutcome {
        let sent = self
            .client
            .get(format!("{}/payments/{idempotency_key}", self.base))
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(error) => {
                return LookupOutcome::Unknown {
                    detail: format!("no answer: {error}"),
                };
            }
        };
        let status = response.status().as_u16();
        if status == 404 {
            return LookupOutcome::Found(ProviderFinding::NotFound);
        }
        if status == 429 {
            return LookupOutcome::Throttled {
                retry_after: retry_after(&response),
            };
        }
        let answer: Option<PaymentAnswer> = response.json().await.ok();
        match (status, answer) {
            (
                200,
                Some(PaymentAnswer {
                    status,
                    payment_id: Some(payment_id),
                    ..
                }),
            ) if status == "succeeded" => LookupOutcome::Found(ProviderFinding::Paid {
                provider_ref: payment_id,
            }),
            (200, Some(answer)) if answer.status == "failed" => {
                LookupOutcome::Found(ProviderFinding::Refused {
                    reason: answer.reason.unwrap_or_else(|| "refused".into()),
                })
            }
            (code, _) => LookupOutcome::Unknown {
                detail: format!("lookup answered {code} without a definite outcome"),
            },
        }
    }
}

/// A 429's `Retry-After` in seconds (the HTTP-date form is not used by
/// payment providers we know; it counts as unsaid).
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let seconds: u64 = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds))
}

/// Buckets of `ledger_payout_provider_seconds`, in seconds.
pub const PROVIDER_SECONDS_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A provider with metrics: `ledger_payout_provider_seconds{call,outcome}`
/// (a histogram of each call's latency), `ledger_payout_provider_calls_in_flight`
/// and `ledger_payout_provider_throttled_total`.
pub struct MeteredProvider {
    inner: Arc<dyn PaymentProvider>,
}

impl MeteredProvider {
    /// Meters `inner`.
    pub fn new(inner: Arc<dyn PaymentProvider>) -> MeteredProvider {
        MeteredProvider { inner }
    }
}

fn observe(call: &'static str, outcome: &'static str, started: Instant) {
    metrics::gauge!("ledger_payout_provider_calls_in_flight").decrement(1.0);
    metrics::histogram!("ledger_payout_provider_seconds", "call" => call, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    if outcome == "throttled" {
        metrics::counter!("ledger_payout_provider_throttled_total").increment(1);
    }
}

#[async_trait]
impl PaymentProvider for MeteredProvider {
    async fn pay(&self, request: &PaymentRequest) -> PaymentOutcome {
        metrics::gauge!("ledger_payout_provider_calls_in_flight").increment(1.0);
        let started = Instant::now();
        let outcome = self.inner.pay(request).await;
        let name = match &outcome {
            PaymentOutcome::Paid { .. } => "paid",
            PaymentOutcome::Refused { .. } => "refused",
            PaymentOutcome::Unknown { .. } => "unknown",
            PaymentOutcome::Throttled { .. } => "throttled",
        };
        observe("pay", name, started);
        outcome
    }

    async fn lookup(&self, idempotency_key: &str) -> LookupOutcome {
        metrics::gauge!("ledger_payout_provider_calls_in_flight").increment(1.0);
        let started = Instant::now();
        let outcome = self.inner.lookup(idempotency_key).await;
        let name = match &outcome {
            LookupOutcome::Found(ProviderFinding::Paid { .. }) => "paid",
            LookupOutcome::Found(ProviderFinding::Refused { .. }) => "refused",
            LookupOutcome::Found(ProviderFinding::NotFound) => "not_found",
            LookupOutcome::Unknown { .. } => "unknown",
            LookupOutcome::Throttled { .. } => "throttled",
        };
        observe("lookup", name, started);
        outcome
    }
}
