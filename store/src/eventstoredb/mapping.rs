//! The pure mapping between the port's model and EventStoreDB's: versions
//! and revisions, checkpoints and `$all` positions, expected versions,
//! the stored metadata and recording times. No I/O, so it is tested without
//! a server.
//!
//! - Versions start at 1, revisions at 0: version = revision + 1, and
//!   "after version v" is "from revision v".
//! - A position is an event's commit position in `$all`. Events appended
//!   through gRPC are implicit transactions, whose every event has its
//!   commit position equal to its prepare position, its own log offset, so
//!   the commit position alone names one event and orders the log. Events
//!   of explicit transactions (the legacy TCP API) share one commit
//!   position: they are refused rather than misordered.
//! - The body is the event's data as JSON; the custom metadata is the
//!   port's metadata plus `schema_version` (and `$correlationId` /
//!   `$causationId`, the names EventStoreDB's own projections read).

use crate::error::StoreError;
use crate::model::{Appended, ExpectedVersion, Metadata, NewEvent, Position, RecordedEvent};
use chrono::{DateTime, Utc};
use kurrentdb::{CurrentRevision, EventData, StreamPosition, StreamState};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The version of the event at `revision`.
pub fn version(revision: u64) -> Result<i64, StoreError> {
    i64::try_from(revision)
        .ok()
        .and_then(|revision| revision.checked_add(1))
        .ok_or_else(|| {
            StoreError::Remote(format!("stream revision {revision} is too large").into())
        })
}

/// The revision of the first event after `after_version` (0: from the start).
pub fn revision_after(after_version: i64) -> u64 {
    u64::try_from(after_version).unwrap_or(0)
}

/// The stream's version as a conflict reports it (0: no stream).
pub fn current_version(current: CurrentRevision) -> Result<i64, StoreError> {
    match current {
        CurrentRevision::NoStream => Ok(0),
        CurrentRevision::Current(revision) => version(revision),
    }
}

/// What EventStoreDB is asked to check before it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expectation {
    /// This stream state.
    Check(StreamState),
    /// Nothing can satisfy it (an exact version below 0): a conflict
    /// without asking.
    Unsatisfiable,
}

/// The stream state EventStoreDB checks for an expected version.
pub fn expectation(expected: ExpectedVersion) -> Expectation {
    match expected {
        ExpectedVersion::Any => Expectation::Check(StreamState::Any),
        // Version 0 is "no event yet", as `ExpectedVersion::admits` says.
        ExpectedVersion::NoStream | ExpectedVersion::Exact(0) => {
            Expectation::Check(StreamState::NoStream)
        }
        ExpectedVersion::Exact(version) => match u64::try_from(version - 1) {
            Ok(revision) => Expectation::Check(StreamState::StreamRevision(revision)),
            Err(_) => Expectation::Unsatisfiable,
        },
    }
}

/// The revision where an append with this expectation puts its first event,
/// when the expectation says (not for `Any`).
pub fn first_revision(expected: ExpectedVersion) -> Option<u64> {
    match expected {
        ExpectedVersion::Any => None,
        ExpectedVersion::NoStream => Some(0),
        ExpectedVersion::Exact(version) => u64::try_from(version).ok(),
    }
}

/// The checkpoint of an event: its commit position, which must be its
/// prepare position too (see the module's comment) and fit a `Position`.
pub fn checkpoint(position: kurrentdb::Position) -> Result<Position, StoreError> {
    let unsupported = |why: String| Err(StoreError::Remote(why.into()));
    if position.commit == u64::MAX {
        return unsupported(
            "the server did not report the event's $all position; stream reads carry it \
             from EventStoreDB 22.6 on, for events not written in explicit transactions"
                .into(),
        );
    }
    if position.commit != position.prepare {
        return unsupported(format!(
            "the event at {position} was written in an explicit transaction: its commit \
             position is shared, so it cannot be a checkpoint of its own"
        ));
    }
    match i64::try_from(position.commit) {
        Ok(checkpoint) if checkpoint > 0 => Ok(checkpoint),
        _ => unsupported(format!(
            "commit position {} is outside 1..=i64::MAX",
            position.commit
        )),
    }
}

/// Where a forward read of `$all` starts to see the events after `after`.
/// Forward reads include the event at their start: callers drop it.
pub fn read_start(after: Position) -> StreamPosition<kurrentdb::Position> {
    match u64::try_from(after) {
        Ok(after) if after > 0 => StreamPosition::Position(kurrentdb::Position {
            commit: after,
            prepare: after,
        }),
        _ => StreamPosition::Start,
    }
}

/// Whether an event of `$all` is EventStoreDB's own (its stream or type
/// starts with `$`: statistics, metadata, projections' links).
pub fn is_system(stream_id: &str, event_type: &str) -> bool {
    stream_id.starts_with('$') || event_type.starts_with('$')
}

/// Whether `read_all(after, ..)` hands out this event of a forward page.
pub fn follows(stream_id: &str, event_type: &str, commit: u64, after: Position) -> bool {
    let after = u64::try_from(after).unwrap_or(0);
    commit > after && !is_system(stream_id, event_type)
}

/// The custom metadata stored with each event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredMetadata {
    schema_version: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    correlation_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    causation_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    actor_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    actor_role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request_id: Option<String>,
    /// The correlation id again, where `$by_correlation_id` looks for it.
    #[serde(
        rename = "$correlationId",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    server_correlation_id: Option<Uuid>,
    /// The causation id again, under EventStoreDB's name.
    #[serde(
        rename = "$causationId",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    server_causation_id: Option<Uuid>,
}

/// The custom metadata JSON for an event of this schema version.
pub fn encode_metadata(schema_version: i32, metadata: &Metadata) -> Vec<u8> {
    // Destructured in full: a new field of `Metadata` fails to compile here
    // rather than being silently dropped.
    let Metadata {
        correlation_id,
        causation_id,
        actor_id,
        actor_role,
        request_id,
    } = metadata.clone();
    let stored = StoredMetadata {
        schema_version,
        correlation_id,
        causation_id,
        actor_id,
        actor_role,
        request_id,
        server_correlation_id: correlation_id,
        server_causation_id: causation_id,
    };
    serde_json::to_vec(&stored).expect("BUG: metadata always serializes")
}

/// The schema version and metadata stored in an event's custom metadata.
pub fn decode_metadata(bytes: &[u8]) -> Result<(i32, Metadata), String> {
    let stored: StoredMetadata =
        serde_json::from_slice(bytes).map_err(|e| format!("metadata: {e}"))?;
    if stored.server_correlation_id != stored.correlation_id
        || stored.server_causation_id != stored.causation_id
    {
        return Err("metadata: $correlationId or $causationId differs from the ledger's".into());
    }
    let metadata = Metadata {
        correlation_id: stored.correlation_id,
        causation_id: stored.causation_id,
        actor_id: stored.actor_id,
        actor_role: stored.actor_role,
        request_id: stored.request_id,
    };
    Ok((stored.schema_version, metadata))
}

/// EventStoreDB's `created` (100-nanosecond ticks since the Unix epoch, as
/// text) as a time in microseconds, what the SQL backends store. (The
/// client's own `created` field keeps whole seconds only.)
pub fn recorded_at(created_ticks: &str) -> Result<DateTime<Utc>, String> {
    let ticks: i64 = created_ticks
        .parse()
        .map_err(|_| format!("created: {created_ticks:?} is not a tick count"))?;
    DateTime::from_timestamp_micros(ticks / 10)
        .ok_or_else(|| format!("created: {ticks} ticks is out of range"))
}

/// The event EventStoreDB is asked to store.
pub fn event_data(event: &NewEvent) -> EventData {
    let metadata: serde_json::Value =
        serde_json::from_slice(&encode_metadata(event.schema_version, &event.metadata))
            .expect("BUG: encoded metadata is JSON");
    EventData::json(&event.event_type, &event.data)
        .and_then(|data| data.metadata_as_json(&metadata))
        .expect("BUG: JSON values always serialize")
        .id(event.event_id)
}

/// A stored event as the client reads it, in the parts the mapping needs
/// (the client's own type cannot be built outside it, so tests use this).
#[derive(Debug, Clone, Copy)]
pub struct StoredEvent<'a> {
    /// Its stream.
    pub stream_id: &'a str,
    /// Its revision in the stream.
    pub revision: u64,
    /// Its position in `$all`.
    pub position: kurrentdb::Position,
    /// Its id.
    pub event_id: Uuid,
    /// Its type.
    pub event_type: &'a str,
    /// Its body.
    pub data: &'a [u8],
    /// Its custom metadata.
    pub custom_metadata: &'a [u8],
    /// The server's `created` system metadata, if present.
    pub created_ticks: Option<&'a str>,
}

impl<'a> StoredEvent<'a> {
    /// The parts of an event the client read.
    pub fn of(event: &'a kurrentdb::RecordedEvent) -> StoredEvent<'a> {
        StoredEvent {
            stream_id: event.stream_id(),
            revision: event.revision,
            position: event.position,
            event_id: event.id,
            event_type: &event.event_type,
            data: &event.data,
            custom_metadata: &event.custom_metadata,
            created_ticks: event.metadata.get("created").map(String::as_str),
        }
    }
}

/// The port's view of a stored event.
pub fn recorded(stored: StoredEvent<'_>) -> Result<RecordedEvent, StoreError> {
    let position = checkpoint(stored.position)?;
    let corrupt = |reason: String| StoreError::Corrupt { position, reason };
    let data = serde_json::from_slice(stored.data).map_err(|e| corrupt(format!("data: {e}")))?;
    let (schema_version, metadata) = decode_metadata(stored.custom_metadata).map_err(corrupt)?;
    let created = stored
        .created_ticks
        .ok_or_else(|| corrupt("no created time".into()))?;
    Ok(RecordedEvent {
        position,
        stream_id: stored.stream_id.to_owned(),
        version: version(stored.revision)?,
        event_id: stored.event_id,
        event_type: stored.event_type.to_owned(),
        schema_version,
        data,
        metadata,
        recorded_at: recorded_at(created).map_err(corrupt)?,
        // No hash chain on this backend (see `super`).
        hash: None,
    })
}

/// Checks that the events read back at the versions the server answered
/// are exactly the ones appended, and says where they landed.
pub fn written(
    stream_id: &str,
    events: &[NewEvent],
    first_version: i64,
    stored: &[RecordedEvent],
) -> Result<Appended, StoreError> {
    let matches = stored.len() == events.len()
        && stored
            .iter()
            .zip(events)
            .enumerate()
            .all(|(offset, (s, e))| {
                s.event_id == e.event_id
                    && s.stream_id == stream_id
                    && s.version == first_version + offset as i64
            });
    let (Some(first), Some(last)) = (stored.first(), stored.last()) else {
        return Err(StoreError::Remote(
            format!("{stream_id}: the appended events could not be read back").into(),
        ));
    };
    if !matches {
        return Err(StoreError::Remote(
            format!(
                "{stream_id}: the events at versions {first_version}.. are not the ones appended"
            )
            .into(),
        ));
    }
    Ok(Appended {
        stream_id: stream_id.to_owned(),
        first_version,
        last_version: last.version,
        first_position: first.position,
        last_position: last.position,
        duplicate: false,
    })
}

/// Whether a client error is worth retrying after a pause: no connection,
/// no leader, a timeout, a server busy or restarting.
pub fn is_transient(error: &kurrentdb::Error) -> bool {
    use kurrentdb::Error as E;
    match error {
        E::ServerError(_)
        | E::NotLeaderException(_)
        | E::ConnectionClosed
        | E::GrpcConnectionError(_)
        | E::DeadlineExceeded => true,
        E::Grpc { code, .. } => matches!(
            code,
            tonic::Code::Unavailable
                | tonic::Code::ResourceExhausted
                | tonic::Code::Aborted
                | tonic::Code::Cancelled
        ),
        _ => false,
    }
}

/// A client error as a store error.
pub fn store_error(error: kurrentdb::Error) -> StoreError {
    if is_transient(&error) {
        StoreError::RemoteUnavailable(Box::new(error))
    } else {
        StoreError::Remote(Box::new(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// EventStoreDB's own check of an expected stream state (what its
    /// writer decides), to hold the mapping against.
    fn server_admits(state: StreamState, current: CurrentRevision) -> bool {
        match (state, current) {
            (StreamState::Any, _) => true,
            (StreamState::NoStream, current) => current == CurrentRevision::NoStream,
            (StreamState::StreamExists, current) => current != CurrentRevision::NoStream,
            (StreamState::StreamRevision(expected), CurrentRevision::Current(actual)) => {
                expected == actual
            }
            (StreamState::StreamRevision(_), CurrentRevision::NoStream) => false,
        }
    }

    fn expected_versions() -> impl Strategy<Value = ExpectedVersion> {
        prop_oneof![
            Just(ExpectedVersion::Any),
            Just(ExpectedVersion::NoStream),
            (-3i64..60).prop_map(ExpectedVersion::Exact),
        ]
    }

    fn current_revisions() -> impl Strategy<Value = CurrentRevision> {
        prop_oneof![
            Just(CurrentRevision::NoStream),
            (0u64..60).prop_map(CurrentRevision::Current),
        ]
    }

    fn metadata() -> impl Strategy<Value = Metadata> {
        let id = proptest::option::of(any::<u128>().prop_map(Uuid::from_u128));
        let text = proptest::option::of(any::<String>());
        (id.clone(), id, text.clone(), text.clone(), text).prop_map(
            |(correlation_id, causation_id, actor_id, actor_role, request_id)| Metadata {
                correlation_id,
                causation_id,
                actor_id,
                actor_role,
                request_id,
            },
        )
    }

    fn new_event(n: u128) -> NewEvent {
        NewEvent {
            event_id: Uuid::from_u128(n),
            event_type: "funds_deposited".into(),
            schema_version: 1,
            data: serde_json::json!({ "n": n.to_string() }),
            metadata: Metadata::default(),
        }
    }

    /// 2023-01-01T00:00:00Z in EventStoreDB ticks.
    const NEW_YEAR_TICKS: i64 = 1_672_531_200 * 10_000_000;

    fn stored<'a>(data: &'a [u8], custom_metadata: &'a [u8]) -> StoredEvent<'a> {
        StoredEvent {
            stream_id: "account-7",
            revision: 4,
            position: kurrentdb::Position {
                commit: 9_000,
                prepare: 9_000,
            },
            event_id: Uuid::from_u128(7),
            event_type: "funds_deposited",
            data,
            custom_metadata,
            created_ticks: Some("16725312001234567"),
        }
    }

    fn read_back(n: u128, version: i64, position: Position) -> RecordedEvent {
        RecordedEvent {
            position,
            stream_id: "s".into(),
            version,
            event_id: Uuid::from_u128(n),
            event_type: "t".into(),
            schema_version: 1,
            data: serde_json::json!({}),
            metadata: Metadata::default(),
            recorded_at: DateTime::UNIX_EPOCH,
            hash: None,
        }
    }

    #[test]
    fn versions_are_revisions_plus_one() {
        assert_eq!(version(0).unwrap(), 1);
        assert_eq!(version(41).unwrap(), 42);
        assert!(version(i64::MAX as u64).is_err(), "version would overflow");
        assert!(version(u64::MAX).is_err());
        // "After version v" starts at revision v; nothing is before 0.
        assert_eq!(revision_after(0), 0);
        assert_eq!(revision_after(3), 3);
        assert_eq!(revision_after(-5), 0);
        assert_eq!(current_version(CurrentRevision::NoStream).unwrap(), 0);
        assert_eq!(current_version(CurrentRevision::Current(2)).unwrap(), 3);
    }

    #[test]
    fn expected_versions_map_to_stream_states() {
        let cases = [
            (ExpectedVersion::Any, Expectation::Check(StreamState::Any)),
            (
                ExpectedVersion::NoStream,
                Expectation::Check(StreamState::NoStream),
            ),
            (
                ExpectedVersion::Exact(0),
                Expectation::Check(StreamState::NoStream),
            ),
            (
                ExpectedVersion::Exact(1),
                Expectation::Check(StreamState::StreamRevision(0)),
            ),
            (
                ExpectedVersion::Exact(5),
                Expectation::Check(StreamState::StreamRevision(4)),
            ),
            (ExpectedVersion::Exact(-1), Expectation::Unsatisfiable),
        ];
        for (expected, expectation_wanted) in cases {
            assert_eq!(expectation(expected), expectation_wanted, "{expected:?}");
        }
        assert_eq!(first_revision(ExpectedVersion::Any), None);
        assert_eq!(first_revision(ExpectedVersion::NoStream), Some(0));
        assert_eq!(first_revision(ExpectedVersion::Exact(3)), Some(3));
        assert_eq!(first_revision(ExpectedVersion::Exact(-2)), None);
    }

    #[test]
    fn checkpoints_are_commit_positions_of_single_events() {
        let at = |commit, prepare| kurrentdb::Position { commit, prepare };
        assert_eq!(checkpoint(at(9_000, 9_000)).unwrap(), 9_000);
        let refused = [
            at(9_000, 8_000),       // an explicit transaction's event
            at(u64::MAX, u64::MAX), // no position reported
            at(0, 0),               // "before the first event"
            at(i64::MAX as u64 + 1, i64::MAX as u64 + 1),
        ];
        for position in refused {
            assert!(
                matches!(checkpoint(position), Err(StoreError::Remote(_))),
                "{position}"
            );
        }
        assert_eq!(
            checkpoint(at(i64::MAX as u64, i64::MAX as u64)).unwrap(),
            i64::MAX
        );
        assert_eq!(read_start(0), StreamPosition::Start);
        assert_eq!(read_start(-4), StreamPosition::Start);
        assert_eq!(read_start(12), StreamPosition::Position(at(12, 12)));
    }

    #[test]
    fn reads_of_all_hand_out_only_later_ledger_events() {
        assert!(follows("account-1", "funds_deposited", 101, 100));
        assert!(
            !follows("account-1", "funds_deposited", 100, 100),
            "the start itself"
        );
        assert!(!follows("account-1", "funds_deposited", 99, 100));
        assert!(!follows(
            "$stats-127.0.0.1:2113",
            "$statsCollected",
            500,
            100
        ));
        assert!(!follows("$$account-1", "$metadata", 500, 100));
        assert!(!follows("account-1", "$streamDeleted", 500, 100));
        assert!(follows("product-p", "sale_opened", 1, 0));
    }

    #[test]
    fn metadata_decoding_refuses_what_the_ledger_did_not_write() {
        let metadata = Metadata {
            correlation_id: Some(Uuid::from_u128(1)),
            ..Metadata::default()
        };
        let encoded = encode_metadata(2, &metadata);
        let json: serde_json::Value = serde_json::from_slice(&encoded).unwrap();
        assert_eq!(json["schema_version"], 2);
        assert_eq!(json["$correlationId"], json["correlation_id"]);
        assert!(json.get("$causationId").is_none());
        assert!(decode_metadata(b"not json").is_err());
        assert!(
            decode_metadata(br#"{"correlation_id": null}"#).is_err(),
            "no schema version"
        );
        assert!(decode_metadata(br#"{"schema_version": 1, "extra": 1}"#).is_err());
        let tampered = br#"{"schema_version": 1,
            "correlation_id": "00000000-0000-0000-0000-000000000001",
            "$correlationId": "00000000-0000-0000-0000-000000000002"}"#;
        assert!(decode_metadata(tampered).is_err());
    }

    #[test]
    fn recording_times_keep_microseconds() {
        let time = recorded_at(&(NEW_YEAR_TICKS + 1_234_567).to_string()).unwrap();
        assert_eq!(
            time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            "2023-01-01T00:00:00.123456Z"
        );
        assert!(recorded_at("yesterday").is_err());
        assert!(
            recorded_at(&u64::MAX.to_string()).is_err(),
            "beyond i64 ticks"
        );
    }

    #[test]
    fn stored_events_become_recorded_events() {
        let data = br#"{"amount_minor": 500}"#;
        let metadata = encode_metadata(
            1,
            &Metadata {
                actor_id: Some("u1".into()),
                ..Metadata::default()
            },
        );
        let event = recorded(stored(data, &metadata)).unwrap();
        assert_eq!(
            (event.position, event.version, event.stream_id.as_str()),
            (9_000, 5, "account-7")
        );
        assert_eq!(event.event_id, Uuid::from_u128(7));
        assert_eq!(event.data["amount_minor"], 500);
        assert_eq!(event.metadata.actor_id.as_deref(), Some("u1"));
        assert_eq!(event.schema_version, 1);
        assert_eq!(event.recorded_at.timestamp_subsec_micros(), 123_456);
        assert_eq!(event.hash, None, "no hash chain on EventStoreDB");

        let corrupt_at = |result: Result<RecordedEvent, StoreError>| match result {
            Err(StoreError::Corrupt { position, .. }) => position,
            other => panic!("expected a corrupt event, got {other:?}"),
        };
        assert_eq!(corrupt_at(recorded(stored(b"{oops", &metadata))), 9_000);
        assert_eq!(corrupt_at(recorded(stored(data, b"{}"))), 9_000);
        let undated = StoredEvent {
            created_ticks: None,
            ..stored(data, &metadata)
        };
        assert_eq!(corrupt_at(recorded(undated)), 9_000);
        let in_transaction = StoredEvent {
            position: kurrentdb::Position {
                commit: 9_000,
                prepare: 8_500,
            },
            ..stored(data, &metadata)
        };
        assert!(matches!(
            recorded(in_transaction),
            Err(StoreError::Remote(_))
        ));
    }

    #[test]
    fn read_back_must_be_the_appended_events() {
        let events = [new_event(1), new_event(2)];
        let stored = [read_back(1, 3, 700), read_back(2, 4, 800)];
        let appended = written("s", &events, 3, &stored).unwrap();
        assert_eq!((appended.first_version, appended.last_version), (3, 4));
        assert_eq!(
            (appended.first_position, appended.last_position),
            (700, 800)
        );
        assert!(!appended.duplicate);
        assert!(
            written("s", &events, 3, &stored[..1]).is_err(),
            "one missing"
        );
        assert!(written("s", &events, 3, &[]).is_err(), "none read back");
        let swapped = [read_back(2, 3, 700), read_back(1, 4, 800)];
        assert!(written("s", &events, 3, &swapped).is_err());
        assert!(written("s", &events, 2, &stored).is_err(), "other versions");
        assert!(written("t", &events, 3, &stored).is_err(), "other stream");
    }

    #[test]
    fn unreachable_servers_are_transient_refusals_are_not() {
        use kurrentdb::Error as E;
        let transient = [
            E::ServerError("restarting".into()),
            E::ConnectionClosed,
            E::DeadlineExceeded,
            E::Grpc {
                code: tonic::Code::Unavailable,
                message: String::new(),
            },
        ];
        for error in transient {
            assert!(is_transient(&error), "{error}");
            assert!(store_error(error).is_transient());
        }
        let lasting = [
            E::AccessDenied,
            E::ResourceDeleted,
            E::Grpc {
                code: tonic::Code::InvalidArgument,
                message: String::new(),
            },
        ];
        for error in lasting {
            assert!(!is_transient(&error), "{error}");
            assert!(matches!(store_error(error), StoreError::Remote(_)));
        }
    }

    proptest! {
        #[test]
        fn positions_round_trip_through_checkpoints(position in 1i64..=i64::MAX) {
            let StreamPosition::Position(start) = read_start(position) else {
                panic!("a positive checkpoint starts at itself");
            };
            prop_assert_eq!(checkpoint(start).unwrap(), position);
        }

        #[test]
        fn versions_round_trip_through_revisions(revision in 0u64..(i64::MAX as u64)) {
            let version = version(revision).unwrap();
            prop_assert_eq!(version, revision as i64 + 1);
            // Reading after the version before it starts at this revision.
            prop_assert_eq!(revision_after(version - 1), revision);
            prop_assert_eq!(current_version(CurrentRevision::Current(revision)).unwrap(), version);
        }

        #[test]
        fn the_server_admits_exactly_what_the_port_admits(
            expected in expected_versions(),
            current in current_revisions(),
        ) {
            let port = expected.admits(current_version(current).unwrap());
            let server = match expectation(expected) {
                Expectation::Check(state) => server_admits(state, current),
                Expectation::Unsatisfiable => false,
            };
            prop_assert_eq!(port, server);
            // Where the server would write the first event, if it admits.
            if let (true, Some(revision)) = (port, first_revision(expected)) {
                let next = match current {
                    CurrentRevision::NoStream => 0,
                    CurrentRevision::Current(last) => last + 1,
                };
                prop_assert_eq!(revision, next);
            }
        }

        #[test]
        fn metadata_round_trips(schema_version in any::<i32>(), metadata in metadata()) {
            let encoded = encode_metadata(schema_version, &metadata);
            prop_assert_eq!(decode_metadata(&encoded).unwrap(), (schema_version, metadata));
        }

        #[test]
        fn recording_times_truncate_to_microseconds(ticks in 0i64..(4_102_444_800 * 10_000_000)) {
            let time = recorded_at(&ticks.to_string()).unwrap();
            prop_assert_eq!(time.timestamp_micros(), ticks / 10);
        }
    }
}
