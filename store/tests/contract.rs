//! The event store contract: every backend runs these same tests.
//! PostgreSQL runs when `DATABASE_URL` is set, and says it was skipped otherwise;
//! EventStoreDB likewise with the `eventstoredb` feature and `EVENTSTOREDB_URL`.
//!
//! Each harness gives a fresh log, except EventStoreDB, whose database
//! cannot be dropped: there each test names its streams uniquely
//! (`Harness::stream`), starts reading at the head it found (`Harness::start`),
//! and holds a lock so its tests run one at a time and see only their own
//! events. The SQL backends start at 0 with the names as written, so their
//! checks are exactly as strong as on a fresh database.

use async_trait::async_trait;
use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;
use store::testing::{TestPostgres, TestSqlite};
use store::{
    AppendHook, EventStore, ExpectedVersion, MemoryEventStore, Metadata, NewEvent, Position,
    PostgresEventStore, RecordedEvent, SqliteEventStore, StoreError, StreamAppend, StreamOutcome,
    Subscription,
};
use tokio::sync::Notify;
use uuid::Uuid;

/// Upper bound on any wait in these tests, so a bug fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(20);

enum Database {
    Memory(MemoryEventStore),
    Sqlite(TestSqlite),
    Postgres(TestPostgres),
    #[cfg(feature = "eventstoredb")]
    EventStoreDb {
        url: String,
        /// Held for the whole test: one EventStoreDB test at a time.
        _alone: tokio::sync::OwnedMutexGuard<()>,
    },
}

/// A fresh database of one backend (or, on EventStoreDB, a fresh corner of
/// a shared one); `store` opens another independent instance on it (its own
/// pools or client), optionally with a hook.
struct Harness {
    database: Database,
    /// The head when the test began: where "the whole log" starts for it.
    start: Position,
    /// Appended to stream names on a shared database.
    suffix: Option<String>,
}

impl Harness {
    fn fresh(database: Database) -> Harness {
        Harness {
            database,
            start: 0,
            suffix: None,
        }
    }

    async fn memory(_test: &str) -> Option<Harness> {
        Some(Harness::fresh(Database::Memory(MemoryEventStore::new())))
    }

    async fn sqlite(_test: &str) -> Option<Harness> {
        let database = TestSqlite::create().await.expect("a fresh SQLite file");
        Some(Harness::fresh(Database::Sqlite(database)))
    }

    async fn postgres(test: &str) -> Option<Harness> {
        let database = TestPostgres::create(test).await?;
        Some(Harness::fresh(Database::Postgres(database)))
    }

    #[cfg(feature = "eventstoredb")]
    async fn eventstoredb(test: &str) -> Option<Harness> {
        static ALONE: std::sync::OnceLock<Arc<tokio::sync::Mutex<()>>> = std::sync::OnceLock::new();
        let url = store::testing::eventstoredb_url(test)?;
        let alone = ALONE
            .get_or_init(Default::default)
            .clone()
            .lock_owned()
            .await;
        let store = store::eventstoredb::EventStoreDb::open(&url)
            .await
            .expect("EVENTSTOREDB_URL is set, so EventStoreDB must be reachable");
        let start = store.head().await.unwrap();
        Some(Harness {
            database: Database::EventStoreDb { url, _alone: alone },
            start,
            suffix: Some(Uuid::now_v7().simple().to_string()),
        })
    }

    /// The name this test's stream `name` has in the database.
    fn stream(&self, name: &str) -> String {
        match &self.suffix {
            Some(suffix) => format!("{name}-{suffix}"),
            None => name.to_owned(),
        }
    }

    /// Whether an append's events take consecutive positions (1, 2, 3 on
    /// the SQL backends; EventStoreDB's are byte offsets in its log).
    fn dense_positions(&self) -> bool {
        !self.shared()
    }

    /// Whether a batch is one transaction across its streams (not on
    /// EventStoreDB, which appends each stream on its own).
    fn atomic_batches(&self) -> bool {
        !self.shared()
    }

    /// Whether an event id stored in one stream is refused in another
    /// (EventStoreDB keeps no index of event ids to tell).
    fn ids_unique_across_streams(&self) -> bool {
        !self.shared()
    }

    fn shared(&self) -> bool {
        self.suffix.is_some()
    }

    async fn store(&self, hook: Option<Arc<dyn AppendHook>>) -> Arc<dyn EventStore> {
        match (&self.database, hook) {
            (Database::Memory(log), None) => Arc::new(log.clone()),
            (Database::Memory(log), Some(hook)) => Arc::new(log.with_hook(hook)),
            (Database::Sqlite(db), None) => {
                Arc::new(SqliteEventStore::open(&db.path).await.unwrap())
            }
            (Database::Sqlite(db), Some(hook)) => Arc::new(
                SqliteEventStore::open(&db.path)
                    .await
                    .unwrap()
                    .with_hook(hook),
            ),
            (Database::Postgres(db), None) => {
                Arc::new(PostgresEventStore::open(&db.url).await.unwrap())
            }
            (Database::Postgres(db), Some(hook)) => Arc::new(
                PostgresEventStore::open(&db.url)
                    .await
                    .unwrap()
                    .with_hook(hook),
            ),
            #[cfg(feature = "eventstoredb")]
            (Database::EventStoreDb { url, .. }, hook) => {
                let store = store::eventstoredb::EventStoreDb::open(url).await.unwrap();
                match hook {
                    Some(hook) => Arc::new(store.with_hook(hook)),
                    None => Arc::new(store),
                }
            }
        }
    }

    /// Whether a commit by one instance wakes another instance's subscribers
    /// (PostgreSQL NOTIFY, an EventStoreDB subscription); SQLite instances
    /// only see each other by polling.
    fn signals_across_instances(&self) -> bool {
        match self.database {
            Database::Postgres(_) | Database::Memory(_) => true,
            Database::Sqlite(_) => false,
            #[cfg(feature = "eventstoredb")]
            Database::EventStoreDb { .. } => true,
        }
    }
}

fn event(n: u64) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "test_event".into(),
        schema_version: 1,
        data: serde_json::json!({ "n": n, "text": "quote ' and \"double\" and \\ slash" }),
        metadata: Metadata {
            correlation_id: Some(Uuid::from_u128(u128::from(n))),
            actor_id: Some("tester".into()),
            actor_role: Some("admin".into()),
            request_id: Some(format!("req-{n}")),
            causation_id: None,
        },
    }
}

fn events(count: u64) -> Vec<NewEvent> {
    (0..count).map(event).collect()
}

async fn collect(subscription: &mut Subscription, count: usize) -> Vec<RecordedEvent> {
    let mut seen = Vec::new();
    while seen.len() < count {
        let batch = tokio::time::timeout(PATIENCE, subscription.next_batch(1000))
            .await
            .expect("subscription delivered in time")
            .unwrap();
        seen.extend(batch);
    }
    assert_eq!(seen.len(), count, "more events than expected");
    seen
}

fn assert_strictly_increasing(events: &[RecordedEvent]) {
    for pair in events.windows(2) {
        assert!(
            pair[0].position < pair[1].position,
            "positions out of order"
        );
    }
}

async fn racing_writers_on_one_stream(harness: Harness) {
    const WRITERS: usize = 32;
    const WINS_EACH: usize = 8;
    let store = harness.store(None).await;
    let race = harness.stream("race");
    let writers = (0..WRITERS).map(|_| {
        let (store, race) = (store.clone(), race.clone());
        tokio::spawn(async move {
            let (mut wins, mut conflicts, mut known) = (Vec::new(), 0, 0);
            while wins.len() < WINS_EACH {
                let expected = if known == 0 {
                    ExpectedVersion::NoStream
                } else {
                    ExpectedVersion::Exact(known)
                };
                let new = event(0);
                let id = new.event_id;
                match store.append(&race, expected, vec![new]).await {
                    Ok(appended) => {
                        assert_eq!(appended.first_version, known + 1);
                        known = appended.last_version;
                        wins.push((appended.first_version, id));
                    }
                    Err(StoreError::Conflict(conflict)) => {
                        assert_ne!(
                            conflict.actual, known,
                            "a conflict must report another version"
                        );
                        known = conflict.actual;
                        conflicts += 1;
                    }
                    Err(other) => panic!("unexpected error {other}"),
                }
            }
            (wins, conflicts)
        })
    });
    let mut claimed = Vec::new();
    let mut conflicts = 0;
    for writer in writers {
        let (wins, lost) = writer.await.unwrap();
        claimed.extend(wins);
        conflicts += lost;
    }
    claimed.sort();
    let stored = store.read_stream_to_end(&race).await.unwrap();
    let total = WRITERS * WINS_EACH;
    assert_eq!(stored.len(), total, "nothing lost, nothing duplicated");
    assert!(
        conflicts >= WRITERS - 1,
        "all but one first writer must lose the first version"
    );
    for (index, (event, (version, id))) in stored.iter().zip(&claimed).enumerate() {
        assert_eq!(event.version, index as i64 + 1, "versions are contiguous");
        assert_eq!(
            (event.version, event.event_id),
            (*version, *id),
            "each version has exactly one winner"
        );
    }
}

async fn reappending_the_same_events_is_idempotent(harness: Harness) {
    let store = harness.store(None).await;
    let idem = harness.stream("idem");
    let batch = events(3);
    let first = store
        .append(&idem, ExpectedVersion::NoStream, batch.clone())
        .await
        .unwrap();
    assert!(!first.duplicate);
    // A retry with a stale expected version, several at once: all answer the first result.
    let retries = (0..8).map(|_| {
        let (store, batch, idem) = (store.clone(), batch.clone(), idem.clone());
        tokio::spawn(async move { store.append(&idem, ExpectedVersion::NoStream, batch).await })
    });
    for retry in retries {
        let again = retry.await.unwrap().unwrap();
        assert!(again.duplicate);
        assert_eq!(
            (again.first_position, again.last_position),
            (first.first_position, first.last_position)
        );
        assert_eq!((again.first_version, again.last_version), (1, 3));
    }
    assert_eq!(
        store.read_all(harness.start, 100).await.unwrap().len(),
        3,
        "retries wrote nothing"
    );
    let mut partial = batch.clone();
    partial.push(event(9));
    assert!(matches!(
        store.append(&idem, ExpectedVersion::Any, partial).await,
        Err(StoreError::EventIdReused(_))
    ));
    assert_eq!(store.head().await.unwrap(), first.last_position);
    if harness.ids_unique_across_streams() {
        assert!(matches!(
            store
                .append(&harness.stream("elsewhere"), ExpectedVersion::Any, batch)
                .await,
            Err(StoreError::EventIdReused(_))
        ));
        assert_eq!(store.head().await.unwrap(), first.last_position);
    }
}

async fn expected_versions_are_enforced(harness: Harness) {
    let store = harness.store(None).await;
    let (s, new) = (harness.stream("s"), harness.stream("new"));
    store
        .append(&s, ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    store
        .append(&s, ExpectedVersion::Any, events(1))
        .await
        .unwrap();
    let conflict = |result: Result<store::Appended, StoreError>| match result {
        Err(StoreError::Conflict(conflict)) => conflict.actual,
        other => panic!("expected a conflict, got {other:?}"),
    };
    assert_eq!(
        conflict(store.append(&s, ExpectedVersion::NoStream, events(1)).await),
        2
    );
    assert_eq!(
        conflict(store.append(&s, ExpectedVersion::Exact(1), events(1)).await),
        2
    );
    assert_eq!(
        conflict(
            store
                .append(&new, ExpectedVersion::Exact(1), events(1))
                .await
        ),
        0
    );
    let appended = store
        .append(&s, ExpectedVersion::Exact(2), events(2))
        .await
        .unwrap();
    assert_eq!((appended.first_version, appended.last_version), (3, 4));
    if harness.dense_positions() {
        assert_eq!(appended.last_position - appended.first_position, 1);
    } else {
        assert!(appended.last_position > appended.first_position);
    }
    assert!(matches!(
        store.append(&s, ExpectedVersion::Any, vec![]).await,
        Err(StoreError::InvalidAppend(_))
    ));
    let stored = store.read_stream_to_end(&s).await.unwrap();
    assert_eq!(
        stored.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
}

async fn read_all_pages_in_position_order(harness: Harness) {
    let store = harness.store(None).await;
    let mut written = Vec::new();
    for round in 0..5u64 {
        for stream in ["a", "b", "c"] {
            let batch = events(round + 1);
            written.extend(batch.iter().map(|e| e.event_id));
            store
                .append(&harness.stream(stream), ExpectedVersion::Any, batch)
                .await
                .unwrap();
        }
    }
    let mut read = Vec::new();
    let mut after = harness.start;
    loop {
        let page = store.read_all(after, 7).await.unwrap();
        assert!(page.len() <= 7);
        let Some(last) = page.last() else { break };
        after = last.position;
        read.extend(page);
    }
    assert_strictly_increasing(&read);
    assert_eq!(
        read.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        written,
        "commit order is read order"
    );
    let sample = &read[0];
    for event in [&read[0], &read[17], read.last().unwrap()] {
        assert_eq!(
            store.read_at(event.position).await.unwrap().as_ref(),
            Some(event)
        );
    }
    assert_eq!(store.read_at(0).await.unwrap(), None);
    assert_eq!(sample.data["text"], "quote ' and \"double\" and \\ slash");
    assert_eq!(sample.metadata.request_id.as_deref(), Some("req-0"));
    let tail = store
        .read_stream(&harness.stream("b"), 10, 100)
        .await
        .unwrap();
    assert_eq!(
        tail.iter().map(|e| e.version).collect::<Vec<_>>(),
        (11..=15).collect::<Vec<_>>()
    );
    assert_eq!(store.head().await.unwrap(), read.last().unwrap().position);
}

async fn batched_append_answers_each_stream(harness: Harness) {
    let store = harness.store(None).await;
    for n in 0..6 {
        store
            .append(
                &harness.stream(&format!("buyer-{n}")),
                ExpectedVersion::NoStream,
                events(1),
            )
            .await
            .unwrap();
    }
    let appends: Vec<StreamAppend> = (0..6)
        .map(|n| StreamAppend {
            stream_id: harness.stream(&format!("buyer-{n}")),
            // Buyers 1 and 4 are stale: another writer got there first.
            expected: if n == 1 || n == 4 {
                ExpectedVersion::NoStream
            } else {
                ExpectedVersion::Exact(1)
            },
            events: events(2),
        })
        .chain(std::iter::once(StreamAppend {
            stream_id: harness.stream("buyer-new"),
            expected: ExpectedVersion::NoStream,
            events: events(1),
        }))
        .collect();
    let outcomes = store.append_batch(appends.clone()).await.unwrap();
    assert_eq!(outcomes.len(), 7);
    let mut positions = Vec::new();
    for (n, outcome) in outcomes.iter().enumerate() {
        match outcome {
            StreamOutcome::Conflict(conflict) => {
                assert!(n == 1 || n == 4, "only the stale buyers conflict");
                assert_eq!(conflict.actual, 1);
            }
            StreamOutcome::Appended(appended) => {
                assert!(n != 1 && n != 4);
                positions.push((appended.first_position, appended.last_position));
            }
        }
    }
    positions.sort();
    for pair in positions.windows(2) {
        if harness.atomic_batches() && harness.dense_positions() {
            // The whole batch is one transaction: its positions are one contiguous run.
            assert_eq!(pair[0].1 + 1, pair[1].0);
        } else {
            assert!(pair[0].1 < pair[1].0, "streams never share positions");
        }
    }
    for n in [1, 4] {
        let stale = harness.stream(&format!("buyer-{n}"));
        assert_eq!(store.read_stream_to_end(&stale).await.unwrap().len(), 1);
    }
    let buyer = harness.stream("buyer-0");
    assert_eq!(store.read_stream_to_end(&buyer).await.unwrap().len(), 3);
    // Replaying the batch writes nothing: appended streams are duplicates, stale ones still conflict.
    let again = store.append_batch(appends).await.unwrap();
    let duplicates = again
        .iter()
        .filter(|o| matches!(o, StreamOutcome::Appended(a) if a.duplicate))
        .count();
    assert_eq!(duplicates, 5);
    assert_eq!(
        store.read_all(harness.start, 1000).await.unwrap().len(),
        6 + 4 * 2 + 1
    );
}

/// Holds the transaction of any append touching `stream` open until released.
struct Hold {
    stream: &'static str,
    entered: Notify,
    release: Notify,
}

#[async_trait]
impl AppendHook for Hold {
    async fn before_commit(&self, streams: &[&str]) -> Result<(), StoreError> {
        if streams.contains(&self.stream) {
            self.entered.notify_one();
            self.release.notified().await;
        }
        Ok(())
    }
}

async fn subscription_never_skips_a_late_commit(harness: Harness) {
    let hold = Arc::new(Hold {
        stream: "held",
        entered: Notify::new(),
        release: Notify::new(),
    });
    let store = harness.store(Some(hold.clone())).await;
    let seed = store
        .append("seed", ExpectedVersion::NoStream, events(1))
        .await
        .unwrap();
    let mut subscription = Subscription::new(store.clone(), 0);
    assert_eq!(
        collect(&mut subscription, 1).await[0].position,
        seed.last_position
    );

    let held = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .append("held", ExpectedVersion::NoStream, events(1))
                .await
        }
    });
    tokio::time::timeout(PATIENCE, hold.entered.notified())
        .await
        .expect("held append started");
    let others: Vec<_> = (0..10)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .append(&format!("other-{n}"), ExpectedVersion::NoStream, events(2))
                    .await
            })
        })
        .collect();
    // Let the others reach the store while the held transaction is open.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        store
            .read_all(seed.last_position, 100)
            .await
            .unwrap()
            .is_empty(),
        "nothing may be visible past a held append"
    );
    assert!(
        others.iter().all(|task| !task.is_finished()),
        "appends commit one at a time"
    );
    hold.release.notify_one();
    let held = held.await.unwrap().unwrap();
    let mut expected = HashSet::new();
    for task in others {
        let appended = task.await.unwrap().unwrap();
        expected.extend(appended.first_position..=appended.last_position);
    }
    expected.extend(held.first_position..=held.last_position);
    let delivered = collect(&mut subscription, expected.len()).await;
    assert_strictly_increasing(&delivered);
    let delivered_positions: HashSet<_> = delivered.iter().map(|e| e.position).collect();
    assert_eq!(
        delivered_positions, expected,
        "every commit delivered, the late one included"
    );
    assert_eq!(
        delivered,
        store.read_all(seed.last_position, 1000).await.unwrap()
    );
}

/// Rolls back every append touching `stream`.
struct Doom {
    stream: String,
}

#[async_trait]
impl AppendHook for Doom {
    async fn before_commit(&self, streams: &[&str]) -> Result<(), StoreError> {
        if streams.contains(&self.stream.as_str()) {
            return Err(StoreError::Injected("rolled back by the test".into()));
        }
        Ok(())
    }
}

async fn rolled_back_appends_leave_nothing_and_stall_nobody(harness: Harness) {
    let (doomed, after) = (harness.stream("doomed"), harness.stream("after"));
    let doom = Doom {
        stream: doomed.clone(),
    };
    let store = harness.store(Some(Arc::new(doom))).await;
    let mut subscription = Subscription::new(store.clone(), harness.start);
    for _ in 0..3 {
        let failed = store
            .append(&doomed, ExpectedVersion::NoStream, events(4))
            .await;
        assert!(matches!(failed, Err(StoreError::Injected(_))));
    }
    let appended = store
        .append(&after, ExpectedVersion::NoStream, events(2))
        .await
        .unwrap();
    let delivered = collect(&mut subscription, 2).await;
    assert_eq!(delivered.last().unwrap().position, appended.last_position);
    assert!(delivered.iter().all(|e| e.stream_id == after));
    assert!(store.read_stream_to_end(&doomed).await.unwrap().is_empty());
}

async fn subscriber_resumes_from_its_checkpoint(harness: Harness) {
    let store = harness.store(None).await;
    let log = harness.stream("log");
    for n in 0..10 {
        store
            .append(&log, ExpectedVersion::Any, vec![event(n)])
            .await
            .unwrap();
    }
    let mut first = Subscription::new(store.clone(), harness.start);
    let mut seen = first.next_batch(3).await.unwrap();
    seen.extend(first.next_batch(3).await.unwrap());
    assert_eq!(seen.len(), 6);
    let checkpoint = first.position();
    assert_eq!(checkpoint, seen[5].position);
    drop(first);
    for n in 10..15 {
        store
            .append(&log, ExpectedVersion::Any, vec![event(n)])
            .await
            .unwrap();
    }
    let mut resumed = Subscription::new(harness.store(None).await, checkpoint);
    let rest = collect(&mut resumed, 9).await;
    let versions: BTreeSet<i64> = seen.iter().chain(&rest).map(|e| e.version).collect();
    assert_eq!(
        versions,
        (1..=15).collect(),
        "each event exactly once across the restart"
    );
    assert_strictly_increasing(&rest);
}

async fn subscription_tails_live_commits(harness: Harness) {
    let store = harness.store(None).await;
    let live = harness.stream("live");
    // An hour-long fallback: only a commit signal can wake these in time.
    let mut local = Subscription::new(store.clone(), harness.start)
        .with_poll_fallback(Duration::from_secs(3600));
    let waiter = tokio::spawn(async move { collect(&mut local, 3).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    store
        .append(&live, ExpectedVersion::NoStream, events(3))
        .await
        .unwrap();
    let seen = waiter.await.unwrap();
    assert_eq!(seen.len(), 3);

    if harness.signals_across_instances() {
        let other = harness.store(None).await;
        let checkpoint = seen.last().unwrap().position;
        let mut remote =
            Subscription::new(other, checkpoint).with_poll_fallback(Duration::from_secs(3600));
        let waiter = tokio::spawn(async move { collect(&mut remote, 2).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        store
            .append(&live, ExpectedVersion::Exact(3), events(2))
            .await
            .unwrap();
        assert_eq!(
            waiter.await.unwrap().len(),
            2,
            "another instance is woken by NOTIFY or its subscription"
        );
    }
}

macro_rules! contract_suite {
    ($backend:ident: $($test:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    if let Some(harness) = super::Harness::$backend(stringify!($test)).await {
                        super::$test(harness).await;
                    }
                }
            )*
        }
    };
}

/// `everywhere`: every backend runs them. `in_transactions`: they hold an
/// append's transaction open through its hook, so only backends whose
/// append is a transaction run them. On EventStoreDB the hook runs before
/// the write request and nothing can be held open inside the server; what
/// `subscription_never_skips_a_late_commit` guards against (a position
/// taken before commit and made visible after later ones) cannot happen
/// there: its single writer gives positions at commit, in order.
macro_rules! contract_suites {
    (everywhere: [$($test:ident),* $(,)?], in_transactions: [$($held:ident),* $(,)?] $(,)?) => {
        contract_suite!(memory: $($test,)* $($held),*);
        contract_suite!(sqlite: $($test,)* $($held),*);
        contract_suite!(postgres: $($test,)* $($held),*);
        #[cfg(feature = "eventstoredb")]
        contract_suite!(eventstoredb: $($test),*);
    };
}

contract_suites!(
    everywhere: [
        racing_writers_on_one_stream,
        reappending_the_same_events_is_idempotent,
        expected_versions_are_enforced,
        read_all_pages_in_position_order,
        batched_append_answers_each_stream,
        rolled_back_appends_leave_nothing_and_stall_nobody,
        subscriber_resumes_from_its_checkpoint,
        subscription_tails_live_commits,
    ],
    in_transactions: [subscription_never_skips_a_late_commit],
);
