//! Encoding domain events for the store and decoding them back.
//!
//! Domain events are adjacently tagged (`{"type": ..., "data": ...}`); the
//! store keeps the type in its own column and the data as the body.

use crate::model::{Metadata, NewEvent, RecordedEvent};
use domain::EventType;
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

/// Why a stored event could not be turned into a domain event.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode {event_type} v{schema_version} at position {position}: {source}")]
pub struct DecodeError {
    /// Where.
    pub position: i64,
    /// Its stored type.
    pub event_type: String,
    /// Its stored schema version.
    pub schema_version: i32,
    /// What serde said.
    #[source]
    pub source: serde_json::Error,
}

/// Turns a domain event into an event to append.
pub fn encode<E: Serialize + EventType>(event: &E, event_id: Uuid, metadata: Metadata) -> NewEvent {
    let mut tagged = serde_json::to_value(event).expect("BUG: domain events always serialize");
    let data = tagged
        .as_object_mut()
        .and_then(|object| object.remove("data"))
        .unwrap_or_else(|| serde_json::json!({}));
    NewEvent {
        event_id,
        event_type: event.event_type().to_owned(),
        schema_version: i32::from(event.schema_version()),
        data,
        metadata,
    }
}

/// Turns a stored event back into a domain event of type `E`, upcast from
/// its stored shape to the current one.
pub fn decode<E: DeserializeOwned>(recorded: &RecordedEvent) -> Result<E, DecodeError> {
    let error = |source| DecodeError {
        position: recorded.position,
        event_type: recorded.event_type.clone(),
        schema_version: recorded.schema_version,
        source,
    };
    let data = crate::upcast::upcast(
        &recorded.event_type,
        recorded.schema_version,
        &recorded.data,
    )
    .map_err(|why| error(serde::de::Error::custom(why)))?;
    let tagged = serde_json::json!({ "type": recorded.event_type, "data": data });
    serde_json::from_value(tagged).map_err(|source| DecodeError {
        position: recorded.position,
        event_type: recorded.event_type.clone(),
        schema_version: recorded.schema_version,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use domain::product::ProductEvent;

    #[test]
    fn domain_events_survive_the_store_shape() {
        let event = ProductEvent::SaleOpened {};
        let new = encode(&event, Uuid::from_u128(1), Metadata::default());
        assert_eq!(
            (new.event_type.as_str(), new.schema_version),
            ("sale_opened", 1)
        );
        let recorded = RecordedEvent {
            position: 1,
            stream_id: "product-p".into(),
            version: 1,
            event_id: new.event_id,
            event_type: new.event_type,
            schema_version: new.schema_version,
            data: new.data,
            metadata: new.metadata,
            recorded_at: Utc::now(),
            hash: None,
        };
        assert_eq!(decode::<ProductEvent>(&recorded).unwrap(), event);
        let wrong = RecordedEvent {
            event_type: "no_such_event".into(),
            ..recorded
        };
        assert!(decode::<ProductEvent>(&wrong).is_err());
    }
}
