//! The event store port: what the engine and the projections need of a log.

use crate::error::StoreError;
use crate::model::{
    Appended, ExpectedVersion, NewEvent, Position, RecordedEvent, StreamAppend, StreamOutcome,
};
use async_trait::async_trait;
use tokio::sync::watch;

/// Most events one read returns.
pub const READ_LIMIT_MAX: usize = 10_000;

/// An append-only event log with optimistic concurrency per stream.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// The backend's name, for logs and benchmarks (`sqlite`, `postgres`).
    fn backend(&self) -> &'static str;

    /// Appends many streams in one transaction, each with its own expected
    /// version. A stream whose version does not match is answered with a
    /// conflict and writes nothing; the others are written. Event ids make it
    /// idempotent: a stream whose ids are all stored already is answered with
    /// its first result and writes nothing.
    async fn append_batch(
        &self,
        appends: Vec<StreamAppend>,
    ) -> Result<Vec<StreamOutcome>, StoreError>;

    /// Events of one stream with a version above `after_version`, oldest first.
    async fn read_stream(
        &self,
        stream_id: &str,
        after_version: i64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Events of the whole log with a position above `after`, in position order.
    async fn read_all(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// The event at exactly `position` (one the log handed out), if the log
    /// holds one there.
    async fn read_at(&self, position: Position) -> Result<Option<RecordedEvent>, StoreError> {
        let found = self.read_all(position - 1, 1).await?;
        Ok(found.into_iter().find(|e| e.position == position))
    }

    /// The highest committed position (0 for an empty log).
    async fn head(&self) -> Result<Position, StoreError>;

    /// Walks the hash chain over the whole log as stored and reports the
    /// first event whose stored hash does not match; `progress` hears the
    /// last position checked now and then.
    async fn verify_chain(
        &self,
        progress: &(dyn Fn(i64) + Send + Sync),
    ) -> Result<crate::chain::ChainReport, StoreError>;

    /// Whether this backend keeps the hash chain: each event's `hash`, and a
    /// `verify_chain` that walks it. EventStoreDB does not (see
    /// `eventstoredb`).
    fn keeps_hash_chain(&self) -> bool {
        true
    }

    /// A wake-up signal: its value changes after events are committed (by this
    /// process, or by another one where the backend can tell).
    fn commits(&self) -> watch::Receiver<Position>;

    /// Appends to one stream; a version mismatch is `StoreError::Conflict`.
    async fn append(
        &self,
        stream_id: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<Appended, StoreError> {
        let append = StreamAppend {
            stream_id: stream_id.to_owned(),
            expected,
            events,
        };
        let mut outcomes = self.append_batch(vec![append]).await?;
        match outcomes.pop().expect("BUG: one outcome per stream") {
            StreamOutcome::Appended(appended) => Ok(appended),
            StreamOutcome::Conflict(conflict) => Err(StoreError::Conflict(conflict)),
        }
    }

    /// Every event of one stream, paging through it.
    async fn read_stream_to_end(&self, stream_id: &str) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut events: Vec<RecordedEvent> = Vec::new();
        loop {
            let after = events.last().map_or(0, |e| e.version);
            let page = self.read_stream(stream_id, after, READ_LIMIT_MAX).await?;
            let full = page.len() == READ_LIMIT_MAX;
            events.extend(page);
            if !full {
                return Ok(events);
            }
        }
    }
}

/// A fault-injection point inside every append transaction, called after the
/// rows are written and before the commit. Tests use it to hold a transaction
/// open or to make it roll back; production stores have none.
#[async_trait]
pub trait AppendHook: Send + Sync {
    /// Called with the streams being written. An error rolls the append back.
    async fn before_commit(&self, stream_ids: &[&str]) -> Result<(), StoreError>;
}

pub(crate) async fn run_hook(
    hook: Option<&std::sync::Arc<dyn AppendHook>>,
    appends: &[StreamAppend],
) -> Result<(), StoreError> {
    let Some(hook) = hook else { return Ok(()) };
    let streams: Vec<&str> = appends.iter().map(|a| a.stream_id.as_str()).collect();
    hook.before_commit(&streams).await
}

/// Clamps a caller's limit to `1..=READ_LIMIT_MAX`.
pub(crate) fn clamp_limit(limit: usize) -> i64 {
    limit.clamp(1, READ_LIMIT_MAX) as i64
}
