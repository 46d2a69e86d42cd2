//! The hash chain binding every event to all before it, in global order:
//! each event's hash is the SHA-256 of the previous event's hash and the
//! event's stream, version, id, type, schema version, data, metadata and
//! recording time. Editing, deleting, inserting or swapping a stored row
//! breaks the chain at the first row affected, which `verify` reports.
//!
//! The hash is computed by the store inside the append's write transaction
//! (appends are serialized, so "the previous event" is well defined) over
//! exactly the text it stores.

use crate::model::NewEvent;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The "previous hash" of the first event.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What one event's hash covers.
#[derive(Debug, Clone, Copy)]
pub struct Link<'a> {
    /// Its stream.
    pub stream_id: &'a str,
    /// Its version in the stream.
    pub version: i64,
    /// Its id.
    pub event_id: Uuid,
    /// Its type.
    pub event_type: &'a str,
    /// The version of its data's shape.
    pub schema_version: i32,
    /// Its data, as stored.
    pub data: &'a str,
    /// Its metadata, as stored.
    pub metadata: &'a str,
    /// When it was recorded.
    pub recorded_at: DateTime<Utc>,
}

impl<'a> Link<'a> {
    /// The link of an event being appended at `version` of `stream_id`,
    /// with its data and metadata as they will be stored.
    pub fn appended(
        stream_id: &'a str,
        version: i64,
        event: &'a NewEvent,
        data: &'a str,
        metadata: &'a str,
        recorded_at: DateTime<Utc>,
    ) -> Link<'a> {
        Link {
            stream_id,
            version,
            event_id: event.event_id,
            event_type: &event.event_type,
            schema_version: event.schema_version,
            data,
            metadata,
            recorded_at,
        }
    }
}

/// How recording times are written wherever they are hashed or exported.
pub fn time_text(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The hash of an event following `previous`.
pub fn link(previous: &str, event: &Link<'_>) -> String {
    // A JSON array: every field is delimited and escaped, so no two
    // different events (or previous hashes) give the same bytes.
    let material = serde_json::to_string(&(
        previous,
        event.stream_id,
        event.version,
        event.event_id,
        event.event_type,
        event.schema_version,
        event.data,
        event.metadata,
        time_text(event.recorded_at),
    ))
    .expect("BUG: strings serialize");
    hex::encode(Sha256::digest(material.as_bytes()))
}

/// What a walk of the chain found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    /// True when every event's stored hash is the one its content and
    /// predecessor give.
    pub ok: bool,
    /// Events walked.
    pub events_checked: u64,
    /// The first event whose stored hash does not match.
    pub first_bad_position: Option<i64>,
    /// The last event's stored hash (publish it to anchor the log).
    pub head_hash: Option<String>,
}

/// Walks events in position order, checking each stored hash.
#[derive(Debug, Clone)]
pub struct Verifier {
    previous: String,
    checked: u64,
    first_bad: Option<i64>,
}

impl Default for Verifier {
    fn default() -> Self {
        Verifier {
            previous: GENESIS.to_owned(),
            checked: 0,
            first_bad: None,
        }
    }
}

impl Verifier {
    /// A walk starting after an event whose hash is `previous` (an export
    /// that does not begin at the first event).
    pub fn starting_at(previous: &str) -> Verifier {
        Verifier {
            previous: previous.to_owned(),
            ..Verifier::default()
        }
    }

    /// Checks the next event; later events are checked against its stored
    /// hash, so one edit is reported once, at its own position.
    pub fn check(&mut self, position: i64, event: &Link<'_>, stored: Option<&str>) {
        let expected = link(&self.previous, event);
        if stored != Some(expected.as_str()) && self.first_bad.is_none() {
            self.first_bad = Some(position);
        }
        self.previous = stored.map_or(expected, str::to_owned);
        self.checked += 1;
    }

    /// What the walk found.
    pub fn report(&self) -> ChainReport {
        ChainReport {
            ok: self.first_bad.is_none(),
            events_checked: self.checked,
            first_bad_position: self.first_bad,
            head_hash: (self.checked > 0).then(|| self.previous.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(data: &str) -> Link<'_> {
        Link {
            stream_id: "s",
            version: 1,
            event_id: Uuid::from_u128(1),
            event_type: "t",
            schema_version: 1,
            data,
            metadata: "{}",
            recorded_at: DateTime::from_timestamp(0, 0).unwrap(),
        }
    }

    #[test]
    fn any_change_changes_the_hash() {
        let base = link(GENESIS, &event("{\"a\":1}"));
        assert_eq!(base.len(), 64);
        assert_ne!(base, link(GENESIS, &event("{\"a\":2}")));
        assert_ne!(base, link(&base, &event("{\"a\":1}")));
        // Field boundaries are unambiguous.
        let split = Link {
            stream_id: "s\",\"",
            ..event("{\"a\":1}")
        };
        assert_ne!(base, link(GENESIS, &split));
    }

    #[test]
    fn the_verifier_reports_the_first_bad_position() {
        let mut verifier = Verifier::default();
        let first = link(GENESIS, &event("1"));
        let second = link(&first, &event("2"));
        verifier.check(1, &event("1"), Some(&first));
        verifier.check(2, &event("2"), Some(&second));
        assert!(verifier.report().ok);
        let mut tampered = Verifier::default();
        tampered.check(1, &event("1"), Some(&first));
        tampered.check(5, &event("edited"), Some(&second));
        tampered.check(6, &event("3"), Some(&link(&second, &event("3"))));
        assert_eq!(tampered.report().first_bad_position, Some(5));
    }
}
