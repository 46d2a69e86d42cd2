//! The store's data types: what is appended, what is read back, and outcomes.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A global log position. Positions increase with commit order; 0 means
/// "before the first event". Rolled-back appends may leave holes.
pub type Position = i64;

/// What the writer believes the stream's version to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpectedVersion {
    /// No check.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream's last version must be exactly this (versions start at 1).
    Exact(i64),
}

impl ExpectedVersion {
    /// Whether a stream whose last version is `actual` (0: no stream) satisfies this.
    pub fn admits(self, actual: i64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual == 0,
            ExpectedVersion::Exact(expected) => expected == actual,
        }
    }
}

/// Who caused an event and why: carried by every event.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// The business process this event belongs to (an order or a payout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// The command or event that caused this event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// The user who asked, if a user did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_id: Option<String>,
    /// The role the actor acted in, or `system` for the engine's own work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_role: Option<String>,
    /// The HTTP request (or CLI run) that led to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// An event to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Unique id (UUID v7); re-appending the same id is a no-op.
    pub event_id: Uuid,
    /// Stable type name, e.g. `quota_reserved`.
    pub event_type: String,
    /// Version of the data's shape.
    pub schema_version: i32,
    /// The event's body.
    pub data: serde_json::Value,
    /// Who and why.
    pub metadata: Metadata,
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    /// Global position.
    pub position: Position,
    /// Its stream.
    pub stream_id: String,
    /// Its version within the stream (1-based, contiguous).
    pub version: i64,
    /// Unique id.
    pub event_id: Uuid,
    /// Stable type name.
    pub event_type: String,
    /// Version of the data's shape.
    pub schema_version: i32,
    /// The event's body.
    pub data: serde_json::Value,
    /// Who and why.
    pub metadata: Metadata,
    /// When the store recorded it.
    pub recorded_at: DateTime<Utc>,
    /// Its link in the hash chain (see `chain`); `None` only for an event
    /// read before its hash was given.
    pub hash: Option<String>,
}

/// One stream's part of a batched append.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamAppend {
    /// The stream.
    pub stream_id: String,
    /// The version the writer expects.
    pub expected: ExpectedVersion,
    /// The events, in order.
    pub events: Vec<NewEvent>,
}

/// Where an append landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The stream.
    pub stream_id: String,
    /// Version of the first event appended.
    pub first_version: i64,
    /// Version of the last event appended: the stream's version afterwards.
    pub last_version: i64,
    /// Position of the first event appended.
    pub first_position: Position,
    /// Position of the last event appended.
    pub last_position: Position,
    /// True when these event ids were already stored and nothing was written.
    pub duplicate: bool,
}

/// A stale writer: the stream's version differs from the expected one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("version conflict on {stream_id}: expected {expected:?}, stream is at {actual}")]
pub struct VersionConflict {
    /// The stream.
    pub stream_id: String,
    /// What the writer expected.
    pub expected: ExpectedVersion,
    /// The stream's last version (0: no stream).
    pub actual: i64,
}

/// One stream's outcome in a batched append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamOutcome {
    /// Written (or already written with these event ids).
    Appended(Appended),
    /// Refused: nothing of this stream was written.
    Conflict(VersionConflict),
}
