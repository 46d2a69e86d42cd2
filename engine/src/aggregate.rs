//! Loading an aggregate's state from its stream, and catching it up.

use domain::{Decider, EventType};
use store::{EventStore, NewEvent, RecordedEvent, StoreError, codec};
use uuid::Uuid;

/// An aggregate's state and the stream version it reflects.
#[derive(Debug, Default)]
pub struct Loaded<S> {
    /// The folded state.
    pub state: S,
    /// The stream's last version folded in (0: no stream).
    pub version: i64,
    /// The log position of the last event folded in or appended (0: none):
    /// a reader of the read models that has reached it sees this state.
    pub position: i64,
}

/// Decodes a stored event into the aggregate's event type.
pub fn decode<D: Decider>(recorded: &RecordedEvent) -> Result<D::Event, StoreError>
where
    D::Event: serde::de::DeserializeOwned,
{
    codec::decode::<D::Event>(recorded).map_err(|error| StoreError::Corrupt {
        position: recorded.position,
        reason: error.to_string(),
    })
}

impl<S: Default> Loaded<S> {
    /// Folds events read from the store (which must continue this version).
    pub fn apply_recorded<D: Decider<State = S>>(
        &mut self,
        events: &[RecordedEvent],
    ) -> Result<(), StoreError>
    where
        D::Event: serde::de::DeserializeOwned,
    {
        for recorded in events {
            assert_eq!(
                recorded.version,
                self.version + 1,
                "BUG: stream versions not contiguous"
            );
            let event = decode::<D>(recorded)?;
            self.state = D::evolve(std::mem::take(&mut self.state), &event);
            self.version = recorded.version;
            self.position = self.position.max(recorded.position);
        }
        Ok(())
    }

    /// Reads and folds whatever the stream has beyond this version; true if it had anything.
    pub async fn catch_up<D: Decider<State = S>>(
        &mut self,
        store: &dyn EventStore,
        stream: &str,
    ) -> Result<bool, StoreError>
    where
        D::Event: serde::de::DeserializeOwned,
    {
        let before = self.version;
        loop {
            let page = store
                .read_stream(stream, self.version, store::port::READ_LIMIT_MAX)
                .await?;
            if page.is_empty() {
                return Ok(self.version != before);
            }
            self.apply_recorded::<D>(&page)?;
        }
    }
}

/// Encodes decided events with fresh ids and the given metadata.
pub fn encode_all<E: serde::Serialize + EventType>(
    events: &[E],
    metadata: &store::Metadata,
) -> Vec<NewEvent> {
    events
        .iter()
        .map(|event| codec::encode(event, Uuid::now_v7(), metadata.clone()))
        .collect()
}

/// The expected version for appending after `version`.
pub fn expected_after(version: i64) -> store::ExpectedVersion {
    if version == 0 {
        store::ExpectedVersion::NoStream
    } else {
        store::ExpectedVersion::Exact(version)
    }
}
