//! The hash chain against tampering behind the ledger's back: rows edited,
//! deleted, inserted and swapped directly in the database (the immutability
//! triggers switched off first, as an attacker with database access would),
//! on SQLite and PostgreSQL. Each is reported at its position.

use store::testing::{TestPostgres, TestSqlite};
use store::{EventStore, ExpectedVersion, Metadata, NewEvent};
use uuid::Uuid;

/// Runs one SQL text on the database behind a store.
type Execute = Box<dyn Fn(&str) -> futures::future::BoxFuture<'static, ()>>;

fn event(n: u64) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "test_event".into(),
        schema_version: 1,
        data: serde_json::json!({ "n": n, "amount": 100 + n, "text": "quote ' and \"double\"" }),
        metadata: Metadata {
            correlation_id: Some(Uuid::from_u128(u128::from(n))),
            actor_id: Some("tester".into()),
            actor_role: Some("admin".into()),
            request_id: Some(format!("req-{n}")),
            causation_id: None,
        },
    }
}

/// Ten events on three streams, in batches; positions 1 to 10.
async fn fill(store: &dyn EventStore) {
    for (index, stream) in ["account-a", "account-b", "product-c"].iter().enumerate() {
        let count = if index == 2 { 4 } else { 3 };
        let events = (0..count).map(|n| event(index as u64 * 10 + n)).collect();
        store
            .append(stream, ExpectedVersion::NoStream, events)
            .await
            .unwrap();
    }
    let report = store.verify_chain(&|_| {}).await.unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.events_checked, 10);
    assert_eq!(report.head_hash.as_deref().map(str::len), Some(64));
}

/// The tampering statements, per database kind.
struct Tamper {
    unlock: &'static [&'static str],
    edit: &'static str,
    delete: &'static str,
    insert: &'static str,
    swap: &'static [&'static str],
}

/// Exchanges the data of events 8 and 9 (one string: one connection).
const SWAP: &str = "CREATE TEMP TABLE swapped AS SELECT position, data FROM events WHERE position IN (8, 9); \
     UPDATE events SET data = (SELECT data FROM swapped WHERE swapped.position = 17 - events.position) \
     WHERE position IN (8, 9);";

const SQLITE: Tamper = Tamper {
    unlock: &[
        "DROP TRIGGER events_no_update",
        "DROP TRIGGER events_no_delete",
    ],
    edit: "UPDATE events SET data = replace(data, '\"amount\":101', '\"amount\":999') WHERE position = 2",
    delete: "DELETE FROM events WHERE position = 5",
    insert: "INSERT INTO events (position, stream_id, version, event_id, event_type, schema_version, \
             data, metadata, recorded_at, hash) \
             SELECT 11, stream_id, 99, '00000000-0000-0000-0000-0000000000ff', event_type, \
                    schema_version, data, metadata, recorded_at, hash FROM events WHERE position = 10",
    swap: &[SWAP],
};

const POSTGRES: Tamper = Tamper {
    unlock: &["ALTER TABLE events DISABLE TRIGGER USER"],
    edit: "UPDATE events SET data = replace(data, '\"amount\":101', '\"amount\":999') WHERE position = 2",
    delete: "DELETE FROM events WHERE position = 5",
    insert: "INSERT INTO events (position, stream_id, version, event_id, event_type, schema_version, \
             data, metadata, recorded_at, hash) OVERRIDING SYSTEM VALUE \
             SELECT 11, stream_id, 99, '00000000-0000-0000-0000-0000000000ff', event_type, \
                    schema_version, data, metadata, recorded_at, hash FROM events WHERE position = 10",
    swap: &[SWAP],
};

/// Runs one tampering on a fresh log and returns the position verify names.
async fn tampered<F, Fut>(open: F, statements: &[&str]) -> Option<i64>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = (Box<dyn EventStore>, Execute)>,
{
    let (store, execute) = open().await;
    fill(store.as_ref()).await;
    for statement in statements {
        execute(statement).await;
    }
    let report = store.verify_chain(&|_| {}).await.unwrap();
    assert!(!report.ok || report.first_bad_position.is_none());
    report.first_bad_position
}

async fn check_all<F, Fut>(open: F, tamper: &Tamper)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = (Box<dyn EventStore>, Execute)>,
{
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        tamper
            .unlock
            .iter()
            .copied()
            .chain(extra.iter().copied())
            .collect()
    };
    // An edited amount: that event's own hash no longer matches.
    assert_eq!(tampered(&open, &with(&[tamper.edit])).await, Some(2));
    // A deleted event: the next event no longer follows its predecessor.
    assert_eq!(tampered(&open, &with(&[tamper.delete])).await, Some(6));
    // An inserted event carrying a copied hash.
    assert_eq!(tampered(&open, &with(&[tamper.insert])).await, Some(11));
    // Two events' data swapped.
    assert_eq!(tampered(&open, &with(tamper.swap)).await, Some(8));
    // Untouched, after switching the triggers off: still intact.
    assert_eq!(tampered(&open, &with(&[])).await, None);
}

#[tokio::test]
async fn tampering_is_found_on_sqlite() {
    let open = || async {
        let database = TestSqlite::create().await.unwrap();
        let pool = sqlx::SqlitePool::connect_with(store::sqlite::connect_options(&database.path))
            .await
            .unwrap();
        let store: Box<dyn EventStore> = Box::new(database.store.clone());
        // Keep the temporary file alive as long as the executor.
        let database = std::sync::Arc::new(database);
        let execute: Execute = Box::new(move |sql: &str| {
            let (pool, sql, _keep) = (pool.clone(), sql.to_owned(), database.clone());
            Box::pin(async move {
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&pool)
                    .await
                    .unwrap();
            })
        });
        (store, execute)
    };
    check_all(open, &SQLITE).await;
}

#[tokio::test]
async fn tampering_is_found_on_postgres() {
    if std::env::var("DATABASE_URL").is_err() {
        eprintln!("skipped tampering_is_found_on_postgres: DATABASE_URL is not set");
        return;
    }
    let open = || async {
        let database = TestPostgres::create("chain").await.unwrap();
        let store = database.store().await;
        let pool = store.pool().clone();
        let database = std::sync::Arc::new(database);
        let execute: Execute = Box::new(move |sql: &str| {
            let (pool, sql, _keep) = (pool.clone(), sql.to_owned(), database.clone());
            Box::pin(async move {
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&pool)
                    .await
                    .unwrap();
            })
        });
        (Box::new(store) as Box<dyn EventStore>, execute)
    };
    check_all(open, &POSTGRES).await;
}

#[tokio::test]
async fn events_written_before_the_chain_get_their_hashes_once() {
    let database = TestSqlite::create().await.unwrap();
    fill(&database.store).await;
    let pool = sqlx::SqlitePool::connect_with(store::sqlite::connect_options(&database.path))
        .await
        .unwrap();
    // A log from before migration 0004: no hashes (set through the one
    // update the table allows, from NULL, so clear them first by rebuilding
    // the table without triggers).
    for sql in [
        "DROP TRIGGER events_no_update",
        "UPDATE events SET hash = NULL",
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .unwrap();
    }
    // Reopening gives every event its hash again; the chain verifies.
    let reopened = store::SqliteEventStore::open(&database.path).await.unwrap();
    let report = reopened.verify_chain(&|_| {}).await.unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.events_checked, 10);
    let missing: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events WHERE hash IS NULL")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(missing, 0);
}

#[tokio::test]
async fn events_written_before_the_chain_get_their_hashes_once_on_postgres() {
    if std::env::var("DATABASE_URL").is_err() {
        eprintln!(
            "skipped events_written_before_the_chain_get_their_hashes_once_on_postgres: \
             DATABASE_URL is not set"
        );
        return;
    }
    let database = TestPostgres::create("backfill").await.unwrap();
    let store = database.store().await;
    fill(&store).await;
    let appended = store.verify_chain(&|_| {}).await.unwrap();
    assert!(appended.ok, "{appended:?}");
    let pool = store.pool().clone();
    // A log from before migration 0005: no hashes. The triggers are off
    // only to clear them; the backfill runs under the real ones, which let
    // a hash be set once, from NULL.
    for sql in [
        "ALTER TABLE events DISABLE TRIGGER USER",
        "UPDATE events SET hash = NULL",
        "ALTER TABLE events ENABLE TRIGGER USER",
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .unwrap();
    }
    let reopened = database.store().await;
    let report = reopened.verify_chain(&|_| {}).await.unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.events_checked, 10);
    let missing: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM events WHERE hash IS NULL")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(missing, 0);
    // The hashes the appends gave, again: the backfill and the append
    // chain the same stored text the same way.
    let stored_head: String =
        sqlx::query_scalar("SELECT hash FROM events ORDER BY position DESC LIMIT 1")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(Some(stored_head), appended.head_hash);
}

#[tokio::test]
async fn a_hash_missing_after_the_chain_began_is_damage_not_filled_in() {
    let database = TestSqlite::create().await.unwrap();
    fill(&database.store).await;
    let pool = sqlx::SqlitePool::connect_with(store::sqlite::connect_options(&database.path))
        .await
        .unwrap();
    for sql in [
        "DROP TRIGGER events_no_update",
        "UPDATE events SET hash = NULL WHERE position >= 7",
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .unwrap();
    }
    // Reopening does not re-hash them: only a log's unhashed prefix (events
    // from before the chain) is ever filled in.
    let reopened = store::SqliteEventStore::open(&database.path).await.unwrap();
    let report = reopened.verify_chain(&|_| {}).await.unwrap();
    assert_eq!(report.first_bad_position, Some(7), "{report:?}");
    // And nothing new may arrive without its hash.
    let forged = sqlx::raw_sql(sqlx::AssertSqlSafe(
        "INSERT INTO events (stream_id, version, event_id, event_type, schema_version, data, \
         metadata, recorded_at) VALUES ('x', 1, 'id', 't', 1, '{}', '{}', '2026-01-01T00:00:00Z')",
    ))
    .execute(&pool)
    .await;
    assert!(forged.is_err(), "an event without a hash is refused");
}
