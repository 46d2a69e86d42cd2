//! An in-memory event store with the same contract as the SQL backends, for
//! deterministic simulation tests of the engine (no I/O, no threads of its
//! own). It keeps nothing across processes and is never used to hold money.

use crate::error::StoreError;
use crate::model::{Position, RecordedEvent, StreamAppend, StreamOutcome};
use crate::plan::{self, StoredId, outcomes};
use crate::port::{AppendHook, EventStore, clamp_limit, run_hook};
use async_trait::async_trait;
use chrono::Utc;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use tokio::sync::{Mutex, watch};
use uuid::Uuid;

#[derive(Default)]
struct Log {
    events: Vec<RecordedEvent>,
    streams: HashMap<String, Vec<usize>>,
    ids: HashMap<Uuid, usize>,
    /// The next position to hand out; rolled-back appends leave holes, as in PostgreSQL.
    next_position: Position,
}

/// The in-memory store. Clones share the same log.
#[derive(Clone)]
pub struct MemoryEventStore {
    log: Arc<RwLock<Log>>,
    writer: Arc<Mutex<()>>,
    commits: Arc<watch::Sender<Position>>,
    hook: Option<Arc<dyn AppendHook>>,
}

impl Default for MemoryEventStore {
    fn default() -> Self {
        MemoryEventStore::new()
    }
}

impl MemoryEventStore {
    /// An empty log.
    pub fn new() -> MemoryEventStore {
        let log = Log {
            next_position: 1,
            ..Log::default()
        };
        MemoryEventStore {
            log: Arc::new(RwLock::new(log)),
            writer: Arc::new(Mutex::new(())),
            commits: Arc::new(watch::channel(0).0),
            hook: None,
        }
    }

    /// Another handle on the same log with a fault-injection hook.
    pub fn with_hook(&self, hook: Arc<dyn AppendHook>) -> MemoryEventStore {
        MemoryEventStore {
            hook: Some(hook),
            ..self.clone()
        }
    }

    fn snapshot_for(
        &self,
        appends: &[StreamAppend],
        ids: &[Uuid],
    ) -> (HashMap<String, i64>, HashMap<Uuid, StoredId>) {
        let log = self.log.read().expect("BUG: memory log poisoned");
        let versions = appends
            .iter()
            .filter_map(|a| {
                let last = *log.streams.get(&a.stream_id)?.last()?;
                Some((a.stream_id.clone(), log.events[last].version))
            })
            .collect();
        let stored = ids
            .iter()
            .filter_map(|id| {
                let event = &log.events[*log.ids.get(id)?];
                let entry = StoredId {
                    stream_id: event.stream_id.clone(),
                    version: event.version,
                    position: event.position,
                };
                Some((*id, entry))
            })
            .collect();
        (versions, stored)
    }
}

#[async_trait]
impl EventStore for MemoryEventStore {
    /// Checks the hashes kept beside the events (nothing outside the
    /// process can edit them, but a bug could).
    async fn verify_chain(
        &self,
        progress: &(dyn Fn(i64) + Send + Sync),
    ) -> Result<crate::chain::ChainReport, StoreError> {
        let log = self.log.read().expect("BUG: memory log poisoned");
        let mut verifier = crate::chain::Verifier::default();
        for event in &log.events {
            let data = event.data.to_string();
            let metadata = crate::rows::metadata_text(&event.metadata);
            let link = crate::chain::Link {
                stream_id: &event.stream_id,
                version: event.version,
                event_id: event.event_id,
                event_type: &event.event_type,
                schema_version: event.schema_version,
                data: &data,
                metadata: &metadata,
                recorded_at: event.recorded_at,
            };
            verifier.check(event.position, &link, event.hash.as_deref());
        }
        if let Some(last) = log.events.last() {
            progress(last.position);
        }
        Ok(verifier.report())
    }

    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn append_batch(
        &self,
        appends: Vec<StreamAppend>,
    ) -> Result<Vec<StreamOutcome>, StoreError> {
        let ids = plan::validate(&appends)?;
        let _writer = self.writer.lock().await;
        let (versions, stored) = self.snapshot_for(&appends, &ids);
        let planned = plan::plan(&appends, &versions, &stored)?;
        // Microseconds: what both SQL backends store, so the hash covers
        // exactly what is read back.
        let now = chrono::SubsecRound::trunc_subsecs(Utc::now(), 6);
        let (first_position, previous, recorded_at) = {
            let log = self.log.read().expect("BUG: memory log poisoned");
            let previous = log
                .events
                .last()
                .and_then(|e| e.hash.clone())
                .unwrap_or_else(|| crate::chain::GENESIS.to_owned());
            // Times follow positions, as on the SQL backends.
            let recorded_at = log.events.last().map_or(now, |e| now.max(e.recorded_at));
            (log.next_position, previous, recorded_at)
        };
        let rows: Vec<RecordedEvent> =
            crate::sql::event_rows(&appends, &planned, previous, recorded_at)
                .into_iter()
                .zip(first_position..)
                .map(|(row, position)| RecordedEvent {
                    position,
                    stream_id: row.stream_id.to_owned(),
                    version: row.version,
                    event_id: row.event_id,
                    event_type: row.event_type.to_owned(),
                    schema_version: row.schema_version,
                    data: row.event.data.clone(),
                    metadata: row.event.metadata.clone(),
                    recorded_at,
                    hash: Some(row.hash),
                })
                .collect();
        // Positions are taken before the hook runs, like an identity column.
        self.log
            .write()
            .expect("BUG: memory log poisoned")
            .next_position += rows.len() as i64;
        run_hook(self.hook.as_ref(), &appends).await?;
        let positions: HashMap<Uuid, Position> =
            rows.iter().map(|r| (r.event_id, r.position)).collect();
        let last = rows.last().map(|r| r.position);
        {
            let mut log = self.log.write().expect("BUG: memory log poisoned");
            for row in rows {
                let index = log.events.len();
                log.streams
                    .entry(row.stream_id.clone())
                    .or_default()
                    .push(index);
                log.ids.insert(row.event_id, index);
                log.events.push(row);
            }
        }
        if let Some(last) = last {
            self.commits.send_modify(|head| *head = (*head).max(last));
        }
        Ok(outcomes(&appends, planned, &positions))
    }

    async fn read_stream(
        &self,
        stream_id: &str,
        after_version: i64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let log = self.log.read().expect("BUG: memory log poisoned");
        let Some(indexes) = log.streams.get(stream_id) else {
            return Ok(Vec::new());
        };
        let skip = usize::try_from(after_version.max(0)).unwrap_or(usize::MAX);
        Ok(indexes
            .iter()
            .skip(skip)
            .take(clamp_limit(limit) as usize)
            .map(|i| log.events[*i].clone())
            .collect())
    }

    async fn read_all(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let log = self.log.read().expect("BUG: memory log poisoned");
        let start = log.events.partition_point(|e| e.position <= after);
        Ok(log.events[start..]
            .iter()
            .take(clamp_limit(limit) as usize)
            .cloned()
            .collect())
    }

    async fn head(&self) -> Result<Position, StoreError> {
        let log = self.log.read().expect("BUG: memory log poisoned");
        Ok(log.events.last().map_or(0, |e| e.position))
    }

    fn commits(&self) -> watch::Receiver<Position> {
        self.commits.subscribe()
    }
}
