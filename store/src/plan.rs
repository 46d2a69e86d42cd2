//! The pure part of an append, shared by every backend: validate the batch,
//! then, from the streams' current versions and the already-stored event ids,
//! decide per stream whether to insert, answer as a duplicate, or conflict.

use crate::error::StoreError;
use crate::model::{Appended, NewEvent, Position, StreamAppend, StreamOutcome, VersionConflict};
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

/// Most events one batched append may carry.
pub const APPEND_EVENTS_MAX: usize = 20_000;
/// Longest stream id accepted, in bytes.
pub const STREAM_ID_LENGTH_MAX: usize = 200;
/// Longest event type accepted, in bytes.
pub const EVENT_TYPE_LENGTH_MAX: usize = 100;

/// An event id already in the store, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredId {
    /// Its stream.
    pub stream_id: String,
    /// Its version.
    pub version: i64,
    /// Its position.
    pub position: Position,
}

/// What to do with one stream of the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Planned {
    /// Insert the events as versions `first_version..`.
    Insert {
        /// Version of the first event.
        first_version: i64,
    },
    /// Already done; answer this.
    Done(StreamOutcome),
}

/// How an append looks for event ids stored before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdLookup {
    /// Skip the lookup and let the unique constraint on event ids catch a
    /// re-append (then retry with `Full`). Used unless a version mismatch
    /// could be a re-append answered with its first result.
    Optimistic,
    /// Look every event id up before deciding.
    Full,
}

/// Decides with versions alone when that is safe: `None` means some stream
/// mismatched its expected version, so stored ids must be looked up (it may be
/// a re-append that should be answered with its first result).
pub fn plan_optimistic(
    appends: &[StreamAppend],
    versions: &HashMap<String, i64>,
) -> Option<Vec<Planned>> {
    let planned = plan(appends, versions, &HashMap::new()).expect("BUG: no stored ids, no reuse");
    let conflicted = planned
        .iter()
        .any(|p| matches!(p, Planned::Done(StreamOutcome::Conflict(_))));
    (!conflicted).then_some(planned)
}

/// Checks the batch is well-formed; returns all its event ids.
pub fn validate(appends: &[StreamAppend]) -> Result<Vec<Uuid>, StoreError> {
    let invalid = |why: String| Err(StoreError::InvalidAppend(why));
    let total: usize = appends.iter().map(|a| a.events.len()).sum();
    if total > APPEND_EVENTS_MAX {
        return invalid(format!(
            "{total} events exceed the limit of {APPEND_EVENTS_MAX}"
        ));
    }
    let mut streams = HashSet::new();
    let mut ids = HashSet::with_capacity(total);
    for append in appends {
        let stream = &append.stream_id;
        if stream.is_empty()
            || stream.len() > STREAM_ID_LENGTH_MAX
            || stream.chars().any(char::is_control)
        {
            return invalid(format!("bad stream id {stream:?}"));
        }
        if !streams.insert(stream.as_str()) {
            return invalid(format!("stream {stream} appears twice in one batch"));
        }
        if append.events.is_empty() {
            return invalid(format!("no events for stream {stream}"));
        }
        for event in &append.events {
            let kind = &event.event_type;
            if kind.is_empty() || kind.len() > EVENT_TYPE_LENGTH_MAX {
                return invalid(format!("bad event type {kind:?}"));
            }
            if !ids.insert(event.event_id) {
                return invalid(format!("event id {} appears twice", event.event_id));
            }
        }
    }
    Ok(appends
        .iter()
        .flat_map(|a| a.events.iter().map(|e| e.event_id))
        .collect())
}

/// Decides each stream's fate. `versions` holds each existing stream's last
/// version; `stored` the batch's event ids that are already in the store.
pub fn plan(
    appends: &[StreamAppend],
    versions: &HashMap<String, i64>,
    stored: &HashMap<Uuid, StoredId>,
) -> Result<Vec<Planned>, StoreError> {
    appends
        .iter()
        .map(|append| {
            if let Some(done) = duplicate(append, stored)? {
                return Ok(Planned::Done(StreamOutcome::Appended(done)));
            }
            let actual = versions.get(&append.stream_id).copied().unwrap_or(0);
            if !append.expected.admits(actual) {
                return Ok(Planned::Done(StreamOutcome::Conflict(VersionConflict {
                    stream_id: append.stream_id.clone(),
                    expected: append.expected,
                    actual,
                })));
            }
            // Versions only grow: a stream continues from its last version.
            assert!(
                actual >= 0,
                "BUG: stream {} at version {actual}",
                append.stream_id
            );
            Ok(Planned::Insert {
                first_version: actual + 1,
            })
        })
        .collect()
}

/// If every event id of this append is stored, contiguously and in order in
/// this stream, the append already happened: answer its first result. If only
/// some are, or elsewhere, the ids were reused: an error.
pub(crate) fn duplicate(
    append: &StreamAppend,
    stored: &HashMap<Uuid, StoredId>,
) -> Result<Option<Appended>, StoreError> {
    let found: Vec<Option<&StoredId>> = append
        .events
        .iter()
        .map(|e| stored.get(&e.event_id))
        .collect();
    if found.iter().all(Option::is_none) {
        return Ok(None);
    }
    let reused = |index: usize| StoreError::EventIdReused(append.events[index].event_id);
    let first = found[0].ok_or_else(|| reused(0))?;
    for (index, entry) in found.iter().enumerate() {
        let entry = entry.ok_or_else(|| reused(index))?;
        let contiguous =
            entry.stream_id == append.stream_id && entry.version == first.version + index as i64;
        if !contiguous {
            return Err(reused(index));
        }
    }
    let last = found[found.len() - 1].expect("BUG: checked above");
    Ok(Some(Appended {
        stream_id: append.stream_id.clone(),
        first_version: first.version,
        last_version: last.version,
        first_position: first.position,
        last_position: last.position,
        duplicate: true,
    }))
}

/// Builds each stream's outcome once the positions of inserted events are known.
pub(crate) fn outcomes(
    appends: &[StreamAppend],
    planned: Vec<Planned>,
    positions: &HashMap<Uuid, Position>,
) -> Vec<StreamOutcome> {
    appends
        .iter()
        .zip(planned)
        .map(|(append, plan)| match plan {
            Planned::Done(outcome) => outcome,
            Planned::Insert { first_version } => {
                let position = |event: &NewEvent| {
                    *positions
                        .get(&event.event_id)
                        .expect("BUG: inserted event has a position")
                };
                let first = append.events.first().expect("BUG: validated non-empty");
                let last = append.events.last().expect("BUG: validated non-empty");
                // A stream's new events take increasing positions, in the
                // order of their versions.
                for pair in append.events.windows(2) {
                    let (before, after) = (position(&pair[0]), position(&pair[1]));
                    assert!(
                        before < after,
                        "BUG: stream {} got position {after} after {before}",
                        append.stream_id
                    );
                }
                StreamOutcome::Appended(Appended {
                    stream_id: append.stream_id.clone(),
                    first_version,
                    last_version: first_version + append.events.len() as i64 - 1,
                    first_position: position(first),
                    last_position: position(last),
                    duplicate: false,
                })
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ExpectedVersion, Metadata};

    fn event(n: u128) -> NewEvent {
        NewEvent {
            event_id: Uuid::from_u128(n),
            event_type: "t".into(),
            schema_version: 1,
            data: serde_json::json!({}),
            metadata: Metadata::default(),
        }
    }

    fn append(stream: &str, expected: ExpectedVersion, ids: &[u128]) -> StreamAppend {
        StreamAppend {
            stream_id: stream.into(),
            expected,
            events: ids.iter().copied().map(event).collect(),
        }
    }

    #[test]
    fn validation_refuses_malformed_batches() {
        assert!(validate(&[append("a", ExpectedVersion::Any, &[])]).is_err());
        assert!(
            validate(&[
                append("a", ExpectedVersion::Any, &[1]),
                append("a", ExpectedVersion::Any, &[2])
            ])
            .is_err()
        );
        assert!(validate(&[append("a", ExpectedVersion::Any, &[1, 1])]).is_err());
        assert!(validate(&[append("", ExpectedVersion::Any, &[1])]).is_err());
        assert_eq!(
            validate(&[append("a", ExpectedVersion::Any, &[1, 2])])
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn outcomes_carry_a_streams_first_and_last_positions() {
        let appends = [append("a", ExpectedVersion::NoStream, &[1, 2])];
        let positions = HashMap::from([(Uuid::from_u128(1), 7), (Uuid::from_u128(2), 9)]);
        let planned = vec![Planned::Insert { first_version: 1 }];
        let outcome = &outcomes(&appends, planned, &positions)[0];
        assert!(matches!(outcome, StreamOutcome::Appended(a)
            if (a.first_version, a.last_version, a.first_position, a.last_position) == (1, 2, 7, 9)));
    }

    #[test]
    #[should_panic(expected = "BUG: stream a got position 7 after 9")]
    fn positions_out_of_version_order_are_a_bug() {
        let appends = [append("a", ExpectedVersion::NoStream, &[1, 2])];
        let positions = HashMap::from([(Uuid::from_u128(1), 9), (Uuid::from_u128(2), 7)]);
        outcomes(
            &appends,
            vec![Planned::Insert { first_version: 1 }],
            &positions,
        );
    }

    #[test]
    fn plan_separates_inserts_duplicates_and_conflicts() {
        let versions = HashMap::from([("b".to_string(), 3), ("c".to_string(), 1)]);
        let stored = HashMap::from([(
            Uuid::from_u128(9),
            StoredId {
                stream_id: "c".into(),
                version: 1,
                position: 40,
            },
        )]);
        let appends = [
            append("a", ExpectedVersion::NoStream, &[1]),
            append("b", ExpectedVersion::Exact(2), &[2]),
            append("c", ExpectedVersion::NoStream, &[9]),
        ];
        let planned = plan(&appends, &versions, &stored).unwrap();
        assert_eq!(planned[0], Planned::Insert { first_version: 1 });
        assert!(matches!(&planned[1], Planned::Done(StreamOutcome::Conflict(c)) if c.actual == 3));
        assert!(
            matches!(&planned[2], Planned::Done(StreamOutcome::Appended(a)) if a.duplicate && a.first_position == 40)
        );
        let partial = [append("c", ExpectedVersion::Any, &[9, 10])];
        assert!(matches!(
            plan(&partial, &versions, &stored),
            Err(StoreError::EventIdReused(_))
        ));
        let elsewhere = [append("d", ExpectedVersion::Any, &[9])];
        assert!(matches!(
            plan(&elsewhere, &versions, &stored),
            Err(StoreError::EventIdReused(_))
        ));
    }
}
