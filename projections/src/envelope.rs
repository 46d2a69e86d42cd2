//! A stored event decoded for the read models.

use crate::error::ProjectionError;
use chrono::{DateTime, SecondsFormat, Utc};
use domain::account::AccountEvent;
use domain::payout::PayoutEvent;
use domain::product::ProductEvent;
use domain::{PayoutId, ProductId};
use store::RecordedEvent;
use store::codec;
use uuid::Uuid;

/// What an event says, typed by the stream it belongs to.
#[derive(Debug, Clone)]
pub enum Fact {
    /// An event of a product stream.
    Product(ProductId, ProductEvent),
    /// An event of a customer account stream.
    Account(AccountEvent),
    /// An event of a payout stream.
    Payout(PayoutId, PayoutEvent),
    /// An event of a stream no read model covers (users, sessions, ...).
    Other,
}

/// A stored event with its decoded fact.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The stored event.
    pub recorded: RecordedEvent,
    /// What it says.
    pub fact: Fact,
    /// `recorded_at` in the read models' fixed text form.
    pub occurred_at: String,
}

/// Times as the read models store them: RFC 3339, UTC, microseconds, so text
/// order is time order.
pub fn time_text(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Micros, true)
}

impl Envelope {
    /// Decodes a stored event by its stream's kind.
    pub fn decode(recorded: RecordedEvent) -> Result<Envelope, ProjectionError> {
        let fact = if let Some(id) = recorded.stream_id.strip_prefix("product-") {
            let product_id = ProductId::parse(id).map_err(|e| {
                ProjectionError::inconsistent(
                    recorded.position,
                    format!("bad product stream: {e:?}"),
                )
            })?;
            Fact::Product(product_id, codec::decode(&recorded)?)
        } else if recorded.stream_id.starts_with("account-") {
            Fact::Account(codec::decode(&recorded)?)
        } else if let Some(id) = recorded.stream_id.strip_prefix("payout-") {
            let payout_id = Uuid::parse_str(id).map_err(|e| {
                ProjectionError::inconsistent(recorded.position, format!("bad payout stream: {e}"))
            })?;
            Fact::Payout(PayoutId(payout_id), codec::decode(&recorded)?)
        } else {
            Fact::Other
        };
        Ok(Envelope {
            occurred_at: time_text(recorded.recorded_at),
            recorded,
            fact,
        })
    }

    /// The event's global position.
    pub fn position(&self) -> i64 {
        self.recorded.position
    }

    /// A shorthand for an `Inconsistent` error at this event.
    pub fn inconsistent(&self, reason: impl Into<String>) -> ProjectionError {
        ProjectionError::inconsistent(self.position(), reason)
    }
}

/// Decodes a page of stored events.
pub fn decode_all(events: Vec<RecordedEvent>) -> Result<Vec<Envelope>, ProjectionError> {
    events.into_iter().map(Envelope::decode).collect()
}
