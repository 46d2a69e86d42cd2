//! The embedded SQLite backend: one file in WAL mode, `synchronous=FULL`.
//!
//! All appends go through one write connection inside `BEGIN IMMEDIATE`, so
//! commits are serialized and become visible in position order: a reader can
//! never see position N+1 before N. Reads use a separate small pool.

use crate::chain;
use crate::error::StoreError;
use crate::model::{Position, RecordedEvent, StreamAppend, StreamOutcome};
use crate::plan::{self, IdLookup, Planned, StoredId, outcomes};
use crate::port::{AppendHook, EventStore, READ_LIMIT_MAX, clamp_limit, run_hook};
use crate::sql::{self, parse_uuid};
use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use uuid::Uuid;

/// The SQLite schema migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// Tries at migrating an SQLite file before giving up (see `migrate`).
const MIGRATE_ATTEMPTS: u32 = 20;

/// Connects a pool to an SQLite file and applies `migrator`'s pending
/// migrations, while other processes may be opening the same file. Both
/// steps can lose a race on a fresh file: switching it to WAL takes an
/// exclusive lock that SQLite refuses at once ("database is locked")
/// rather than waiting for, and sqlx takes no lock for SQLite migrations,
/// so two processes may both see migration N pending and the loser's
/// attempt fails ("table already exists"). Each migration runs in its own
/// transaction, so a lost attempt left nothing behind: it tries again,
/// finds N applied and goes on.
pub async fn connect_migrated(
    pool: SqlitePoolOptions,
    options: SqliteConnectOptions,
    migrator: &sqlx::migrate::Migrator,
) -> Result<SqlitePool, sqlx::migrate::MigrateError> {
    let mut attempt = 1;
    loop {
        let result = match pool.clone().connect_with(options.clone()).await {
            Ok(connected) => migrator.run(&connected).await.map(|()| connected),
            Err(error) => Err(sqlx::migrate::MigrateError::Execute(error)),
        };
        match result {
            Ok(connected) => return Ok(connected),
            Err(error) if attempt < MIGRATE_ATTEMPTS => {
                tracing::debug!(%error, attempt, "opening raced another process; again");
                tokio::time::sleep(Duration::from_millis(25 * u64::from(attempt))).await;
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Connections in the read pool.
pub const SQLITE_READ_CONNECTIONS_MAX: u32 = 4;
/// How long a statement waits for another process's write lock.
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The event store on one SQLite file.
#[derive(Clone)]
pub struct SqliteEventStore {
    write: SqlitePool,
    read: SqlitePool,
    commits: Arc<watch::Sender<Position>>,
    hook: Option<Arc<dyn AppendHook>>,
    gate: WriteGate,
    _checkpointer: Arc<Checkpointer>,
}

/// The checkpoint task, stopped when the last handle on the store goes.
struct Checkpointer(tokio::task::AbortHandle);

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The write gate of one SQLite file in this process.
pub type WriteGate = Arc<tokio::sync::Mutex<()>>;

/// The gate every writer of this file in this process takes before
/// `BEGIN IMMEDIATE`: the log's appends, the projections and the API's own
/// tables. SQLite has one writer at a time; without the gate, writers of one
/// process meet in SQLite's busy handler, which sleeps 1, 2, 5, 10... ms
/// between tries and leaves the lock idle while everyone sleeps. With it they
/// queue in order and the lock passes straight on. (Other processes still
/// meet in the busy handler.)
pub fn write_gate(path: &Path) -> WriteGate {
    static GATES: std::sync::OnceLock<std::sync::Mutex<HashMap<PathBuf, WriteGate>>> =
        std::sync::OnceLock::new();
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut gates = GATES
        .get_or_init(Default::default)
        .lock()
        .expect("BUG: write gates poisoned");
    gates.entry(key).or_default().clone()
}

/// How often the WAL is copied back into the database file.
pub const SQLITE_CHECKPOINT_PERIOD: Duration = Duration::from_millis(500);

/// Copies the WAL back into the database file every
/// `SQLITE_CHECKPOINT_PERIOD` (a passive checkpoint: it never waits for or
/// blocks writers), until the pool closes. The log's and the projections'
/// write connections turn SQLite's automatic checkpoint off, which otherwise
/// runs inside the commit that makes the WAL cross 1,000 pages and holds the
/// write lock meanwhile: in a flash sale that landed on the log's appends.
async fn checkpoint_periodically(pool: SqlitePool) {
    loop {
        tokio::time::sleep(SQLITE_CHECKPOINT_PERIOD).await;
        if pool.is_closed() {
            return;
        }
        if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            tracing::debug!(%error, "WAL checkpoint failed; trying again later");
        }
    }
}

/// Connection options for the ledger's SQLite file: WAL, full sync, foreign keys.
pub fn connect_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(SQLITE_BUSY_TIMEOUT)
        .foreign_keys(true)
}

impl SqliteEventStore {
    /// Opens (creating if needed) the file and applies pending migrations.
    pub async fn open(path: &Path) -> Result<SqliteEventStore, StoreError> {
        let options = connect_options(path);
        // Checkpoints run beside the writers (see `checkpoint_periodically`),
        // not inside whichever commit happens to cross the WAL's size.
        let write = connect_migrated(
            SqlitePoolOptions::new().max_connections(1),
            options.clone().pragma("wal_autocheckpoint", "0"),
            &MIGRATOR,
        )
        .await
        .map_err(|e| StoreError::from(sqlx::Error::from(e)))?;
        let filled = backfill_hashes(&write).await?;
        if filled > 0 {
            tracing::info!(
                events = filled,
                "gave events written before the hash chain their hashes"
            );
        }
        let read = SqlitePoolOptions::new()
            .max_connections(SQLITE_READ_CONNECTIONS_MAX)
            .connect_with(options)
            .await?;
        let checkpointer = Arc::new(Checkpointer(
            tokio::spawn(checkpoint_periodically(read.clone())).abort_handle(),
        ));
        let (sender, _) = watch::channel(0);
        Ok(SqliteEventStore {
            write,
            read,
            commits: Arc::new(sender),
            hook: None,
            gate: write_gate(path),
            _checkpointer: checkpointer,
        })
    }

    /// Installs a fault-injection hook (tests only).
    pub fn with_hook(mut self, hook: Arc<dyn AppendHook>) -> SqliteEventStore {
        self.hook = Some(hook);
        self
    }

    /// The read pool, for callers that query the same file.
    pub fn read_pool(&self) -> &SqlitePool {
        &self.read
    }

    async fn current_versions(
        tx: &mut sqlx::SqliteConnection,
        appends: &[StreamAppend],
    ) -> Result<HashMap<String, i64>, StoreError> {
        let streams: Vec<&str> = appends.iter().map(|a| a.stream_id.as_str()).collect();
        let rows: Vec<(String, Option<i64>)> = sqlx::query_as(
            // One index probe per stream: MAX with an equality is answered from
            // the end of the (stream_id, version) index; GROUP BY would scan
            // every version of a hot stream.
            "SELECT value, (SELECT MAX(version) FROM events WHERE stream_id = value) \
             FROM json_each(?1)",
        )
        .bind(serde_json::to_string(&streams).expect("BUG: strings serialize"))
        .fetch_all(tx)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(stream, version)| Some((stream, version?)))
            .collect())
    }

    async fn stored_ids(
        tx: &mut sqlx::SqliteConnection,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, StoredId>, StoreError> {
        let rows: Vec<(String, String, i64, i64)> = sqlx::query_as(
            "SELECT event_id, stream_id, version, position FROM events \
             WHERE event_id IN (SELECT value FROM json_each(?1))",
        )
        .bind(serde_json::to_string(ids).expect("BUG: uuids serialize"))
        .fetch_all(tx)
        .await?;
        let mut stored = HashMap::with_capacity(rows.len());
        for (event_id, stream_id, version, position) in rows {
            let event_id = parse_uuid(&event_id, position)?;
            stored.insert(
                event_id,
                StoredId {
                    stream_id,
                    version,
                    position,
                },
            );
        }
        Ok(stored)
    }

    /// Inserts every planned stream's events in one statement; returns each
    /// event id's position.
    async fn insert(
        tx: &mut sqlx::SqliteConnection,
        appends: &[StreamAppend],
        planned: &[Planned],
    ) -> Result<HashMap<Uuid, Position>, StoreError> {
        // Under the write lock: the chain's end, and a recording time no
        // earlier than the last event's, so times follow positions.
        let (end_position, previous, last_recorded_at) = chain_end(&mut *tx).await?;
        let now = chrono::SubsecRound::trunc_subsecs(Utc::now(), 6);
        let recorded_at = last_recorded_at.map_or(now, |last| now.max(last));
        let recorded_text = recorded_at.to_rfc3339_opts(SecondsFormat::Micros, true);
        let mut order = Vec::new();
        let rows: Vec<BatchRow<'_>> = sql::event_rows(appends, planned, previous, recorded_at)
            .into_iter()
            .map(|row| {
                order.push(row.event_id);
                BatchRow {
                    s: row.stream_id,
                    v: row.version,
                    i: row.event_id,
                    t: row.event_type,
                    n: row.schema_version,
                    d: row.data,
                    m: row.metadata,
                    r: &recorded_text,
                    h: row.hash,
                }
            })
            .collect();
        if rows.is_empty() {
            return Ok(HashMap::new());
        }
        // One statement for the whole batch. `jsonb_each` parses the batch
        // once; each row's fields are then read from the binary form.
        let inserted = sqlx::query(
            "INSERT INTO events \
             (stream_id, version, event_id, event_type, schema_version, data, metadata, recorded_at, \
              hash) \
             SELECT value ->> 's', value ->> 'v', value ->> 'i', value ->> 't', value ->> 'n', \
                    value ->> 'd', value ->> 'm', value ->> 'r', value ->> 'h' \
             FROM jsonb_each(?1) ORDER BY key",
        )
        .bind(serde_json::to_string(&rows).expect("BUG: rows serialize"))
        .execute(tx)
        .await?;
        // The write lock is held and one statement inserted the rows in
        // order, so their positions are the contiguous run ending at the last
        // rowid (AUTOINCREMENT never reuses or skips within a statement).
        let count = i64::try_from(order.len()).expect("BUG: batch size fits i64");
        assert_eq!(
            inserted.rows_affected(),
            order.len() as u64,
            "BUG: not every row was inserted"
        );
        let first = inserted.last_insert_rowid() - count + 1;
        // The batch's positions are the dense run right after the log's end.
        assert!(
            first > end_position,
            "BUG: a batch inserted at position {first} after the log's end at {end_position}"
        );
        Ok(order.into_iter().zip(first..).collect())
    }
}

/// One event as the SQLite batch insert reads it.
#[derive(serde::Serialize)]
struct BatchRow<'a> {
    s: &'a str,
    v: i64,
    i: Uuid,
    t: &'a str,
    n: i32,
    d: String,
    m: String,
    r: &'a str,
    h: String,
}

/// Gives events written before hashes existed their hash, in one write
/// transaction (see `sql::backfill_hashes`).
async fn backfill_hashes(pool: &SqlitePool) -> Result<u64, StoreError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let filled = sql::backfill_hashes(sql::Either::Sqlite(&mut *tx)).await?;
    tx.commit().await?;
    Ok(filled)
}

/// The last event's position (0 for an empty log), its hash (the chain's
/// genesis for an empty log) and its recording time.
async fn chain_end(
    tx: &mut sqlx::SqliteConnection,
) -> Result<(Position, String, Option<DateTime<Utc>>), StoreError> {
    let last: Option<(i64, Option<String>, String)> = sqlx::query_as(
        "SELECT position, hash, recorded_at FROM events ORDER BY position DESC LIMIT 1",
    )
    .fetch_optional(tx)
    .await?;
    match last {
        None => Ok((0, chain::GENESIS.to_owned(), None)),
        Some((position, Some(hash), recorded_at)) => {
            let recorded_at = DateTime::parse_from_rfc3339(&recorded_at)
                .map_err(|e| StoreError::Corrupt {
                    position,
                    reason: format!("recorded_at: {e}"),
                })?
                .with_timezone(&Utc);
            Ok((position, hash, Some(recorded_at)))
        }
        Some((position, None, _)) => Err(StoreError::Corrupt {
            position,
            reason: "the last event has no hash".into(),
        }),
    }
}

impl SqliteEventStore {
    /// One attempt at a batched append in one write transaction.
    async fn append_once(
        &self,
        appends: &[StreamAppend],
        ids: &[Uuid],
        lookup: IdLookup,
    ) -> Result<Vec<StreamOutcome>, StoreError> {
        let started = std::time::Instant::now();
        let _gate = self.gate.lock().await;
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        let began = started.elapsed();
        let versions = Self::current_versions(&mut tx, appends).await?;
        let optimistic = match lookup {
            IdLookup::Optimistic => plan::plan_optimistic(appends, &versions),
            IdLookup::Full => None,
        };
        let planned = match optimistic {
            Some(planned) => planned,
            None => {
                let stored = Self::stored_ids(&mut tx, ids).await?;
                plan::plan(appends, &versions, &stored)?
            }
        };
        let checked = started.elapsed();
        let positions = Self::insert(&mut tx, appends, &planned).await?;
        let inserted = started.elapsed();
        run_hook(self.hook.as_ref(), appends).await?;
        tx.commit().await?;
        tracing::trace!(
            streams = appends.len(),
            events = ids.len(),
            begin_ms = began.as_secs_f64() * 1e3,
            check_ms = (checked - began).as_secs_f64() * 1e3,
            insert_ms = (inserted - checked).as_secs_f64() * 1e3,
            commit_ms = (started.elapsed() - inserted).as_secs_f64() * 1e3,
            "sqlite append"
        );
        if let Some(last) = positions.values().max() {
            self.commits.send_modify(|head| *head = (*head).max(*last));
        }
        Ok(outcomes(appends, planned, &positions))
    }
}

#[async_trait]
impl EventStore for SqliteEventStore {
    async fn verify_chain(
        &self,
        progress: &(dyn Fn(i64) + Send + Sync),
    ) -> Result<chain::ChainReport, StoreError> {
        sql::walk_chain(
            sql::Either::Sqlite(&self.read),
            i64::try_from(READ_LIMIT_MAX).expect("BUG: small constant"),
            progress,
        )
        .await
    }

    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn append_batch(
        &self,
        appends: Vec<StreamAppend>,
    ) -> Result<Vec<StreamOutcome>, StoreError> {
        let ids = plan::validate(&appends)?;
        match self.append_once(&appends, &ids, IdLookup::Optimistic).await {
            Err(error) if error.is_unique_violation() => {
                self.append_once(&appends, &ids, IdLookup::Full).await
            }
            other => other,
        }
    }

    async fn read_stream(
        &self,
        stream_id: &str,
        after_version: i64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        sql::read_stream(
            sql::Either::Sqlite(&self.read),
            stream_id,
            after_version,
            clamp_limit(limit),
        )
        .await
    }

    async fn read_all(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        sql::read_all(sql::Either::Sqlite(&self.read), after, clamp_limit(limit)).await
    }

    async fn head(&self) -> Result<Position, StoreError> {
        sql::head(sql::Either::Sqlite(&self.read)).await
    }

    fn commits(&self) -> watch::Receiver<Position> {
        self.commits.subscribe()
    }
}
