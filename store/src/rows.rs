//! Turning stored rows back into events, shared by the SQL backends.

use crate::error::StoreError;
use crate::model::{Metadata, RecordedEvent};
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// A row as both SQL backends return it, before parsing.
pub(crate) struct RawEvent {
    pub position: i64,
    pub stream_id: String,
    pub version: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i32,
    pub data: String,
    pub metadata: String,
    pub recorded_at: DateTime<Utc>,
    pub hash: Option<String>,
}

impl RawEvent {
    /// What its hash covers.
    pub(crate) fn link(&self) -> crate::chain::Link<'_> {
        crate::chain::Link {
            stream_id: &self.stream_id,
            version: self.version,
            event_id: self.event_id,
            event_type: &self.event_type,
            schema_version: self.schema_version,
            data: &self.data,
            metadata: &self.metadata,
            recorded_at: self.recorded_at,
        }
    }

    pub(crate) fn parse(self) -> Result<RecordedEvent, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            position: self.position,
            reason,
        };
        let data = serde_json::from_str(&self.data).map_err(|e| corrupt(format!("data: {e}")))?;
        let metadata: Metadata =
            serde_json::from_str(&self.metadata).map_err(|e| corrupt(format!("metadata: {e}")))?;
        Ok(RecordedEvent {
            position: self.position,
            stream_id: self.stream_id,
            version: self.version,
            event_id: self.event_id,
            event_type: self.event_type,
            schema_version: self.schema_version,
            data,
            metadata,
            recorded_at: self.recorded_at,
            hash: self.hash,
        })
    }
}

/// Serializes metadata for storage (and for hashing: exactly this text).
pub fn metadata_text(metadata: &Metadata) -> String {
    serde_json::to_string(metadata).expect("BUG: metadata always serializes")
}
