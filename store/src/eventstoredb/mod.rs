//! The EventStoreDB (KurrentDB) backend, behind the `eventstoredb` feature:
//! the log in an EventStoreDB node or cluster, through its gRPC client.
//!
//! What it maps and how is in `mapping`; what differs from the SQL
//! backends:
//!
//! - A batch is not atomic across streams: EventStoreDB has no
//!   multi-stream transaction in this client, so each stream is appended on
//!   its own (several at once). Each stream's outcome is still all or
//!   nothing, and on an error some streams may be written and others not;
//!   retrying with the same event ids answers the written ones as
//!   duplicates.
//! - Idempotency: before writing, the events already at the versions the
//!   append expects to fill are read; if they are this append's ids, it is
//!   answered as a duplicate with its first result (the same after a
//!   conflict). EventStoreDB itself also recognizes a retry at an exact
//!   expected version. With `ExpectedVersion::Any` the stream's last
//!   `ANY_DUPLICATE_SCAN_MAX` events are looked at, beyond that only the
//!   server's short-lived id cache. Ids reused in another stream are not
//!   detected (EventStoreDB keeps no index of event ids). Two identical
//!   appends racing each other may both answer `duplicate: false` (the
//!   server writes the events once).
//! - No hash chain: EventStoreDB offers no global write lock under which
//!   a client could link each event to the one before it, so events carry
//!   no hash and `verify_chain` answers `StoreError::Unsupported`.
//! - Positions are commit positions: sparse byte offsets in the server's
//!   log, increasing in commit order, not 1, 2, 3. `read_all` takes 0 or a
//!   position it handed out (a checkpoint, the head).
//! - `AppendHook` runs just before the write request (there is no
//!   transaction to hold open): an error from it means nothing is written.

pub mod mapping;

use crate::error::StoreError;
use crate::model::{
    Appended, Position, RecordedEvent, StreamAppend, StreamOutcome, VersionConflict,
};
use crate::plan::{self, StoredId};
use crate::port::{AppendHook, EventStore, clamp_limit, run_hook};
use async_trait::async_trait;
use futures::StreamExt as _;
use kurrentdb::{
    AppendToStreamOptions, Client, ClientSettings, ReadAllOptions, ReadStreamOptions,
    StreamPosition, SubscribeToAllOptions, SubscriptionEvent, SubscriptionFilter,
};
use mapping::{Expectation, StoredEvent};
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::watch;

/// Streams of one batch appended at once.
pub const APPEND_STREAMS_CONCURRENCY_MAX: usize = 16;
/// Events looked back at, from a stream's end, for a re-append with
/// `ExpectedVersion::Any`.
pub const ANY_DUPLICATE_SCAN_MAX: usize = 1_000;
/// Events read back from the end of `$all` at a time to find the last one
/// that is the ledger's.
const HEAD_SCAN: usize = 64;
/// Longest one call to the server may take.
pub const OPERATION_DEADLINE: Duration = Duration::from_secs(10);
/// First pause before the commit watch subscribes again after an error.
const WATCH_RETRY_PAUSE_MIN: Duration = Duration::from_millis(100);
/// Longest pause between the commit watch's attempts.
const WATCH_RETRY_PAUSE_MAX: Duration = Duration::from_secs(10);

/// The event store on EventStoreDB. Clones share the client and the commit
/// watch.
#[derive(Clone)]
pub struct EventStoreDb {
    connection: Arc<Connection>,
    commits: Arc<watch::Sender<Position>>,
    hook: Option<Arc<dyn AppendHook>>,
    _watch: Arc<WatchGuard>,
    /// The SQL store of the read models' database, kept open beside this log:
    /// it applied the schema and, on SQLite, checkpoints the write-ahead log
    /// the read models share.
    _database: Option<Arc<dyn EventStore>>,
}

/// The client, and the settings to make a new one: the client's connection
/// task gives up for good when reconnecting fails in some cases (a refused
/// first connection, a failed reconnect after a not-leader redirect), after
/// which every call answers `ConnectionClosed`.
struct Connection {
    settings: ClientSettings,
    client: std::sync::RwLock<Client>,
}

impl Connection {
    fn client(&self) -> Client {
        self.client.read().expect("BUG: poisoned").clone()
    }

    /// Replaces a client whose connection task has ended, so that the next
    /// call connects afresh.
    fn renew_if_closed(&self, error: &StoreError) {
        let StoreError::RemoteUnavailable(source) = error else {
            return;
        };
        if !matches!(
            source.downcast_ref::<kurrentdb::Error>(),
            Some(kurrentdb::Error::ConnectionClosed)
        ) {
            return;
        }
        match Client::new(self.settings.clone()) {
            Ok(client) => {
                tracing::warn!("EventStoreDB client lost its connection for good; made a new one");
                *self.client.write().expect("BUG: poisoned") = client;
            }
            Err(error) => tracing::warn!(%error, "cannot make a new EventStoreDB client"),
        }
    }

    /// `result`, after renewing the client if it says the connection ended.
    fn checked<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(error) = &result {
            self.renew_if_closed(error);
        }
        result
    }
}

/// Stops the commit watch when the last clone of the store is dropped.
struct WatchGuard(tokio::task::AbortHandle);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl EventStoreDb {
    /// Connects (`esdb://`, `esdb+discover://`, `kurrentdb://` or
    /// `kurrentdb+discover://`), reads the head and starts watching commits.
    /// The connection string is never logged nor put in an error: it may
    /// hold credentials.
    pub async fn open(connection: &str) -> Result<EventStoreDb, StoreError> {
        let settings: ClientSettings = connection.parse().map_err(|_| {
            StoreError::Remote(
                "not a valid EventStoreDB connection string \
                 (esdb://host:port[,host:port...][?option=value&...], see the README)"
                    .into(),
            )
        })?;
        let client = Client::new(settings.clone()).map_err(|error| {
            StoreError::Remote(format!("cannot create the EventStoreDB client: {error}").into())
        })?;
        let connection = Arc::new(Connection {
            settings,
            client: std::sync::RwLock::new(client),
        });
        let head = connection.checked(head(&connection.client()).await)?;
        let (sender, _) = watch::channel(head);
        let commits = Arc::new(sender);
        let task = tokio::spawn(watch_commits(
            connection.clone(),
            head,
            Arc::downgrade(&commits),
        ));
        Ok(EventStoreDb {
            connection,
            commits,
            hook: None,
            _watch: Arc::new(WatchGuard(task.abort_handle())),
            _database: None,
        })
    }

    /// Keeps `database` open as long as this log (see the field).
    pub fn beside(mut self, database: Arc<dyn EventStore>) -> EventStoreDb {
        self._database = Some(database);
        self
    }

    /// Installs a fault-injection hook (tests only), run before each
    /// stream's write request.
    pub fn with_hook(mut self, hook: Arc<dyn AppendHook>) -> EventStoreDb {
        self.hook = Some(hook);
        self
    }

    /// Reads up to `count` events of a stream from `start` (an empty list
    /// when the stream does not exist).
    async fn read_revisions(
        &self,
        stream_id: &str,
        start: StreamPosition<u64>,
        backwards: bool,
        count: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let options = ReadStreamOptions::default()
            .position(start)
            .max_count(count)
            .requires_leader(true)
            .deadline(OPERATION_DEADLINE);
        let options = if backwards {
            options.backwards()
        } else {
            options.forwards()
        };
        let mut read = match self
            .connection
            .client()
            .read_stream(stream_id, &options)
            .await
        {
            Ok(read) => read,
            Err(kurrentdb::Error::ResourceNotFound) => return Ok(Vec::new()),
            Err(error) => return Err(mapping::store_error(error)),
        };
        let mut events = Vec::new();
        while events.len() < count {
            match read.next().await {
                Ok(Some(resolved)) => {
                    events.push(mapping::recorded(StoredEvent::of(
                        resolved.get_original_event(),
                    ))?);
                }
                Ok(None) => break,
                Err(kurrentdb::Error::ResourceNotFound) => break,
                Err(error) => return Err(mapping::store_error(error)),
            }
        }
        Ok(events)
    }

    /// If this append's events are already where its expected version
    /// would put them (or, for `Any`, among the stream's last events), its
    /// first result; an error if only some of them are.
    async fn already_appended(
        &self,
        append: &StreamAppend,
    ) -> Result<Option<Appended>, StoreError> {
        let found = match mapping::first_revision(append.expected) {
            Some(revision) => {
                self.read_revisions(
                    &append.stream_id,
                    StreamPosition::Position(revision),
                    false,
                    append.events.len(),
                )
                .await?
            }
            None => {
                self.read_revisions(
                    &append.stream_id,
                    StreamPosition::End,
                    true,
                    ANY_DUPLICATE_SCAN_MAX,
                )
                .await?
            }
        };
        let stored: HashMap<_, _> = found
            .into_iter()
            .map(|event| {
                let entry = StoredId {
                    stream_id: event.stream_id,
                    version: event.version,
                    position: event.position,
                };
                (event.event_id, entry)
            })
            .collect();
        plan::duplicate(append, &stored)
    }

    /// The stream's last version (0: no stream).
    async fn last_version(&self, stream_id: &str) -> Result<i64, StoreError> {
        let last = self
            .read_revisions(stream_id, StreamPosition::End, true, 1)
            .await?;
        Ok(last.first().map_or(0, |event| event.version))
    }

    /// Appends one stream of a batch.
    async fn append_stream(&self, append: &StreamAppend) -> Result<StreamOutcome, StoreError> {
        let conflict = |actual| {
            StreamOutcome::Conflict(VersionConflict {
                stream_id: append.stream_id.clone(),
                expected: append.expected,
                actual,
            })
        };
        let state = match mapping::expectation(append.expected) {
            Expectation::Check(state) => state,
            Expectation::Unsatisfiable => {
                return Ok(conflict(self.last_version(&append.stream_id).await?));
            }
        };
        if let Some(done) = self.already_appended(append).await? {
            return Ok(StreamOutcome::Appended(done));
        }
        run_hook(self.hook.as_ref(), std::slice::from_ref(append)).await?;
        let events: Vec<_> = append.events.iter().map(mapping::event_data).collect();
        let options = AppendToStreamOptions::default()
            .stream_state(state)
            .deadline(OPERATION_DEADLINE);
        match self
            .connection
            .client()
            .append_to_stream(append.stream_id.as_str(), &options, events)
            .await
        {
            Ok(written) => {
                let appended = self
                    .read_back(append, written.next_expected_version)
                    .await?;
                self.commits
                    .send_modify(|head| *head = (*head).max(appended.last_position));
                Ok(StreamOutcome::Appended(appended))
            }
            Err(kurrentdb::Error::WrongExpectedVersion { current, .. }) => {
                // Another writer got there first, or this very append did
                // (a retry racing its first attempt).
                match self.already_appended(append).await? {
                    Some(done) => Ok(StreamOutcome::Appended(done)),
                    None => Ok(conflict(mapping::current_version(current)?)),
                }
            }
            Err(error) => Err(mapping::store_error(error)),
        }
    }

    /// Reads the appended events back (the write answers only the last
    /// event's position) and checks they are the ones appended.
    async fn read_back(
        &self,
        append: &StreamAppend,
        last_revision: u64,
    ) -> Result<Appended, StoreError> {
        let count = append.events.len();
        let last_version = mapping::version(last_revision)?;
        let first_version = last_version - count as i64 + 1;
        let first_revision = u64::try_from(first_version - 1).map_err(|_| {
            StoreError::Remote(
                format!(
                    "{}: the server answered revision {last_revision} for {count} events",
                    append.stream_id
                )
                .into(),
            )
        })?;
        let stored = self
            .read_revisions(
                &append.stream_id,
                StreamPosition::Position(first_revision),
                false,
                count,
            )
            .await?;
        mapping::written(&append.stream_id, &append.events, first_version, &stored)
    }
}

#[async_trait]
impl EventStore for EventStoreDb {
    fn backend(&self) -> &'static str {
        "eventstoredb"
    }

    /// Appends each stream on its own (see the module's comment); the
    /// outcomes are in the batch's order.
    async fn append_batch(
        &self,
        appends: Vec<StreamAppend>,
    ) -> Result<Vec<StreamOutcome>, StoreError> {
        plan::validate(&appends)?;
        if let Some(append) = appends.iter().find(|a| a.stream_id.starts_with('$')) {
            return Err(StoreError::InvalidAppend(format!(
                "stream {} starts with $, which EventStoreDB keeps for its own streams",
                append.stream_id
            )));
        }
        let pending: Vec<_> = appends
            .iter()
            .map(|append| self.append_stream(append))
            .collect();
        let outcomes = futures::stream::iter(pending)
            .buffered(APPEND_STREAMS_CONCURRENCY_MAX)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect();
        self.connection.checked(outcomes)
    }

    async fn read_stream(
        &self,
        stream_id: &str,
        after_version: i64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let start = StreamPosition::Position(mapping::revision_after(after_version));
        let limit = clamp_limit(limit) as usize;
        let read = self.read_revisions(stream_id, start, false, limit).await;
        self.connection.checked(read)
    }

    /// Reads forward from `after` (which the server includes), dropping it
    /// and any system event; a page made only of dropped events is read
    /// past, so an empty answer means the end of the log.
    async fn read_all(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let limit = clamp_limit(limit) as usize;
        let mut start = after;
        loop {
            let options = ReadAllOptions::default()
                .position(mapping::read_start(start))
                .forwards()
                .max_count(limit + 1);
            let page = self
                .connection
                .checked(read_all_page(&self.connection.client(), options).await)?;
            let events = page
                .iter()
                .map(|resolved| resolved.get_original_event())
                .filter(|e| {
                    mapping::follows(e.stream_id(), &e.event_type, e.position.commit, start)
                })
                .take(limit)
                .map(|e| mapping::recorded(StoredEvent::of(e)))
                .collect::<Result<Vec<_>, _>>()?;
            let full = page.len() == limit + 1;
            let Some(last) = page.last() else {
                return Ok(events);
            };
            if !events.is_empty() || !full {
                return Ok(events);
            }
            let next = mapping::checkpoint(last.get_original_event().position)?;
            if next <= start {
                return Err(StoreError::Remote(
                    format!("$all went backwards from {start} to {next}").into(),
                ));
            }
            start = next;
        }
    }

    /// Reads `$all` from `position` itself (a forward read includes its
    /// start): `read_all(position - 1, ..)` would start between records.
    async fn read_at(&self, position: Position) -> Result<Option<RecordedEvent>, StoreError> {
        let StreamPosition::Position(start) = mapping::read_start(position) else {
            return Ok(None);
        };
        let options = ReadAllOptions::default()
            .position(StreamPosition::Position(start))
            .forwards()
            .max_count(1);
        let page = self
            .connection
            .checked(read_all_page(&self.connection.client(), options).await)?;
        let Some(event) = page.first().map(|resolved| resolved.get_original_event()) else {
            return Ok(None);
        };
        if event.position.commit != start.commit
            || mapping::is_system(event.stream_id(), &event.event_type)
        {
            return Ok(None);
        }
        mapping::recorded(StoredEvent::of(event)).map(Some)
    }

    async fn head(&self) -> Result<Position, StoreError> {
        self.connection
            .checked(head(&self.connection.client()).await)
    }

    fn keeps_hash_chain(&self) -> bool {
        false
    }

    async fn verify_chain(
        &self,
        _progress: &(dyn Fn(i64) + Send + Sync),
    ) -> Result<crate::chain::ChainReport, StoreError> {
        Err(StoreError::Unsupported(
            "the EventStoreDB backend keeps no hash chain (no global write lock to link each \
             event to the one before it), so there is nothing to verify; rely on the cluster's \
             replication and access control, or keep the log in PostgreSQL or SQLite"
                .into(),
        ))
    }

    fn commits(&self) -> watch::Receiver<Position> {
        self.commits.subscribe()
    }
}

/// One page of `$all` without EventStoreDB's own streams, as the client
/// read it (a forward read includes its start).
async fn read_all_page(
    client: &Client,
    options: ReadAllOptions,
) -> Result<Vec<kurrentdb::ResolvedEvent>, StoreError> {
    let options = options
        .filter(SubscriptionFilter::on_stream_name().exclude_system_events())
        .requires_leader(true)
        .deadline(OPERATION_DEADLINE);
    let mut read = client
        .read_all(&options)
        .await
        .map_err(mapping::store_error)?;
    let mut events = Vec::new();
    while let Some(event) = read.next().await.map_err(mapping::store_error)? {
        events.push(event);
    }
    Ok(events)
}

/// The last event of `$all` that is the ledger's (0: none): outside
/// EventStoreDB's own streams, and not one of its own event types in a
/// ledger stream (a `$streamDeleted` tombstone, say), which `read_all`
/// never returns either.
async fn head(client: &Client) -> Result<Position, StoreError> {
    let mut from = StreamPosition::End;
    loop {
        let options = ReadAllOptions::default()
            .position(from)
            .backwards()
            .max_count(HEAD_SCAN);
        let page = read_all_page(client, options).await?;
        let found = page
            .iter()
            .map(|resolved| resolved.get_original_event())
            .find(|e| !mapping::is_system(e.stream_id(), &e.event_type));
        if let Some(event) = found {
            return mapping::checkpoint(event.position);
        }
        match page.last() {
            Some(last) if page.len() == HEAD_SCAN => {
                from = StreamPosition::Position(last.get_original_event().position);
            }
            _ => return Ok(0),
        }
    }
}

/// Feeds the commit signal from a live subscription to `$all` (without
/// EventStoreDB's own streams), so commits by any process wake this one's
/// subscribers. Subscribes again after an error, from the last position
/// seen, pausing longer after each failure in a row; ends when the store is
/// dropped.
async fn watch_commits(
    connection: Arc<Connection>,
    from: Position,
    commits: Weak<watch::Sender<Position>>,
) {
    let mut after = from;
    let mut pause = WATCH_RETRY_PAUSE_MIN;
    loop {
        let start = match mapping::read_start(after) {
            StreamPosition::Start => StreamPosition::End,
            position => position,
        };
        let options = SubscribeToAllOptions::default()
            .position(start)
            .filter(SubscriptionFilter::on_stream_name().exclude_system_events());
        let mut subscription = connection.client().subscribe_to_all(&options).await;
        loop {
            let event = subscription.next_subscription_event().await;
            let Some(sender) = commits.upgrade() else {
                return;
            };
            match event {
                Ok(SubscriptionEvent::Confirmed(_)) => {
                    pause = WATCH_RETRY_PAUSE_MIN;
                    // Commits may have happened while no subscription was
                    // live: wake everyone to look.
                    sender.send_modify(|_| {});
                }
                Ok(SubscriptionEvent::EventAppeared(resolved)) => {
                    match mapping::checkpoint(resolved.get_original_event().position) {
                        Ok(position) => {
                            after = after.max(position);
                            sender.send_modify(|head| *head = (*head).max(position));
                        }
                        Err(error) => {
                            tracing::debug!(%error, "commit watch saw an event it cannot place");
                            sender.send_modify(|_| {});
                        }
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, pause_ms = pause.as_millis() as u64,
                        "EventStoreDB commit watch lost its subscription; subscribing again");
                    connection.renew_if_closed(&mapping::store_error(error));
                    break;
                }
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(WATCH_RETRY_PAUSE_MAX);
    }
}
