//! The PostgreSQL backend.
//!
//! Positions come from an identity column, whose values are taken at insert
//! time but become visible at commit. To keep readers from ever seeing
//! position N+1 before N, every append first takes one transaction-level
//! advisory lock: appends commit one at a time, in position order, and the
//! lock is released only after the commit is visible. The engine's group
//! commit keeps that single writer busy with large batches rather than many
//! small ones. Other processes learn of commits through `LISTEN/NOTIFY`.

use crate::chain;
use crate::error::StoreError;
use crate::model::{Position, RecordedEvent, StreamAppend, StreamOutcome};
use crate::plan::{self, IdLookup, Planned, StoredId, outcomes};
use crate::port::{AppendHook, EventStore, clamp_limit, run_hook};
use crate::sql;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::watch;
use uuid::Uuid;

/// The PostgreSQL schema migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// The advisory lock every append holds until it commits ("ledger" in ASCII).
pub const APPEND_LOCK_KEY: i64 = 0x6c65_6467_6572;
/// The `NOTIFY` channel carrying the last committed position.
pub const COMMIT_CHANNEL: &str = "ledger_events";
/// Connections in the pool.
pub const POSTGRES_CONNECTIONS_MAX: u32 = 16;
/// How long a caller waits for a pooled connection.
pub const POSTGRES_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the listener waits before reconnecting after an error.
const LISTENER_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// The event store on PostgreSQL.
#[derive(Clone)]
pub struct PostgresEventStore {
    pool: PgPool,
    commits: Arc<watch::Sender<Position>>,
    hook: Option<Arc<dyn AppendHook>>,
    _listener: Arc<ListenerGuard>,
}

/// Stops the listener task when the last clone of the store is dropped.
struct ListenerGuard(tokio::task::AbortHandle);

impl Drop for ListenerGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Connection options with bounded lock and statement waits.
pub fn connect_options(url: &str) -> Result<PgConnectOptions, StoreError> {
    let options = PgConnectOptions::from_str(url)?;
    // Appends read the current versions after taking the append lock, which
    // is only correct when each statement sees the latest commits.
    Ok(options.options([
        ("lock_timeout", "10s"),
        ("statement_timeout", "60s"),
        ("default_transaction_isolation", "read committed"),
    ]))
}

impl PostgresEventStore {
    /// Connects, applies pending migrations and starts listening for commits.
    pub async fn open(url: &str) -> Result<PostgresEventStore, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(POSTGRES_CONNECTIONS_MAX)
            .acquire_timeout(POSTGRES_ACQUIRE_TIMEOUT)
            .connect_with(connect_options(url)?)
            .await?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| StoreError::Database(e.into()))?;
        let filled = backfill_hashes(&pool).await?;
        if filled > 0 {
            tracing::info!(
                events = filled,
                "gave events written before the hash chain their hashes"
            );
        }
        let (sender, _) = watch::channel(0);
        let commits = Arc::new(sender);
        let task = tokio::spawn(listen(pool.clone(), Arc::downgrade(&commits)));
        Ok(PostgresEventStore {
            pool,
            commits,
            hook: None,
            _listener: Arc::new(ListenerGuard(task.abort_handle())),
        })
    }

    /// Installs a fault-injection hook (tests only).
    pub fn with_hook(mut self, hook: Arc<dyn AppendHook>) -> PostgresEventStore {
        self.hook = Some(hook);
        self
    }

    /// The pool, for callers that query the same database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn current_versions(
        tx: &mut sqlx::PgConnection,
        appends: &[StreamAppend],
    ) -> Result<HashMap<String, i64>, StoreError> {
        let streams: Vec<&str> = appends.iter().map(|a| a.stream_id.as_str()).collect();
        let rows: Vec<(String, i64)> = sqlx::query_as(
            // One backward index probe per stream; GROUP BY would scan every
            // version of a hot stream.
            "SELECT s, v FROM UNNEST($1::text[]) AS s, \
             LATERAL (SELECT MAX(version) AS v FROM events WHERE stream_id = s) AS m \
             WHERE v IS NOT NULL",
        )
        .bind(&streams)
        .fetch_all(tx)
        .await?;
        Ok(rows.into_iter().collect())
    }

    async fn stored_ids(
        tx: &mut sqlx::PgConnection,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, StoredId>, StoreError> {
        let rows: Vec<(Uuid, String, i64, i64)> = sqlx::query_as(
            "SELECT event_id, stream_id, version, position FROM events WHERE event_id = ANY($1)",
        )
        .bind(ids)
        .fetch_all(tx)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, stream_id, version, position)| {
                (
                    id,
                    StoredId {
                        stream_id,
                        version,
                        position,
                    },
                )
            })
            .collect())
    }

    /// Inserts every planned stream's events in one statement (arrays bound
    /// as parameters); returns each event id's position.
    async fn insert(
        tx: &mut sqlx::PgConnection,
        appends: &[StreamAppend],
        planned: &[Planned],
    ) -> Result<HashMap<Uuid, Position>, StoreError> {
        let mut columns = Columns::default();
        // Under the append lock: the last committed event is the chain's
        // end, and the recording time is no earlier than its, so times
        // follow positions.
        let (end_position, previous, last_recorded_at) = chain_end(&mut *tx).await?;
        let now = chrono::SubsecRound::trunc_subsecs(Utc::now(), 6);
        let recorded_at = last_recorded_at.map_or(now, |last| now.max(last));
        for row in sql::event_rows(appends, planned, previous, recorded_at) {
            columns.stream_ids.push(row.stream_id);
            columns.versions.push(row.version);
            columns.event_ids.push(row.event_id);
            columns.event_types.push(row.event_type);
            columns.schema_versions.push(row.schema_version);
            columns.data.push(row.data);
            columns.metadata.push(row.metadata);
            columns.hashes.push(row.hash);
        }
        if columns.event_ids.is_empty() {
            return Ok(HashMap::new());
        }
        let inserted: Vec<(i64, Uuid)> = sqlx::query_as(
            "INSERT INTO events \
             (stream_id, version, event_id, event_type, schema_version, data, metadata, recorded_at, \
              hash) \
             SELECT s, v, i, t, n, d, m, $8, h \
             FROM UNNEST($1::text[], $2::bigint[], $3::uuid[], $4::text[], $5::int[], $6::text[], $7::text[], \
                         $9::text[]) \
                  WITH ORDINALITY AS u(s, v, i, t, n, d, m, h, o) \
             ORDER BY o \
             RETURNING position, event_id",
        )
        .bind(&columns.stream_ids)
        .bind(&columns.versions)
        .bind(&columns.event_ids)
        .bind(&columns.event_types)
        .bind(&columns.schema_versions)
        .bind(&columns.data)
        .bind(&columns.metadata)
        .bind(recorded_at)
        .bind(&columns.hashes)
        .fetch_all(tx)
        .await?;
        check_positions(&columns.event_ids, &inserted, end_position);
        Ok(inserted
            .into_iter()
            .map(|(position, id)| (id, position))
            .collect())
    }
}

/// The insert's parameters, one array per column.
#[derive(Default)]
struct Columns<'a> {
    stream_ids: Vec<&'a str>,
    versions: Vec<i64>,
    event_ids: Vec<Uuid>,
    event_types: Vec<&'a str>,
    schema_versions: Vec<i32>,
    data: Vec<String>,
    metadata: Vec<String>,
    hashes: Vec<String>,
}

/// A batch's positions, checked: one per event, every one past the log's
/// end (`end_position`, read under the append lock), increasing in the
/// order the events were given, so readers see the batch in that order.
fn check_positions(order: &[Uuid], inserted: &[(Position, Uuid)], end_position: Position) {
    assert_eq!(
        order.len(),
        inserted.len(),
        "BUG: {} events inserted as {} rows",
        order.len(),
        inserted.len()
    );
    let positions: HashMap<Uuid, Position> = inserted.iter().map(|(p, id)| (*id, *p)).collect();
    let mut before = end_position;
    for event_id in order {
        let position = positions[event_id];
        assert!(
            position > before,
            "BUG: event {event_id} inserted at position {position}, not after {before}"
        );
        before = position;
    }
}

/// The last event's position (0 for an empty log), its hash (the chain's
/// genesis for an empty log) and its recording time.
async fn chain_end(
    tx: &mut sqlx::PgConnection,
) -> Result<(Position, String, Option<DateTime<Utc>>), StoreError> {
    let last: Option<(i64, Option<String>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT position, hash, recorded_at FROM events ORDER BY position DESC LIMIT 1",
    )
    .fetch_optional(tx)
    .await?;
    match last {
        None => Ok((0, chain::GENESIS.to_owned(), None)),
        Some((position, Some(hash), recorded_at)) => Ok((position, hash, Some(recorded_at))),
        Some((position, None, _)) => Err(StoreError::Corrupt {
            position,
            reason: "the last event has no hash".into(),
        }),
    }
}

/// Forwards `NOTIFY` messages from any process to the commit signal, and
/// reconnects after errors. Ends when the store is dropped.
async fn listen(pool: PgPool, commits: Weak<watch::Sender<Position>>) {
    loop {
        match listen_once(&pool, &commits).await {
            Ok(()) => return,
            Err(error) => {
                tracing::warn!(%error, "commit listener lost its connection; reconnecting")
            }
        }
        tokio::time::sleep(LISTENER_RETRY_PAUSE).await;
    }
}

async fn listen_once(
    pool: &PgPool,
    commits: &Weak<watch::Sender<Position>>,
) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(COMMIT_CHANNEL).await?;
    // Commits may have happened while we were not listening: wake everyone.
    match commits.upgrade() {
        Some(sender) => sender.send_modify(|_| {}),
        None => return Ok(()),
    }
    loop {
        let notification = listener.recv().await?;
        let Some(sender) = commits.upgrade() else {
            return Ok(());
        };
        let position = notification.payload().parse::<Position>().unwrap_or(0);
        sender.send_modify(|head| *head = (*head).max(position));
    }
}

/// Gives events written before hashes existed their hash, under the
/// append lock (see `sql::backfill_hashes`).
async fn backfill_hashes(pool: &PgPool) -> Result<u64, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(APPEND_LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    let filled = sql::backfill_hashes(sql::Either::Postgres(&mut *tx)).await?;
    tx.commit().await?;
    Ok(filled)
}

impl PostgresEventStore {
    /// One attempt at a batched append in one transaction holding the append lock.
    async fn append_once(
        &self,
        appends: &[StreamAppend],
        ids: &[Uuid],
        lookup: IdLookup,
    ) -> Result<Vec<StreamOutcome>, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(APPEND_LOCK_KEY)
            .execute(&mut *tx)
            .await?;
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
        let positions = Self::insert(&mut tx, appends, &planned).await?;
        if let Some(last) = positions.values().max() {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(COMMIT_CHANNEL)
                .bind(last.to_string())
                .execute(&mut *tx)
                .await?;
        }
        run_hook(self.hook.as_ref(), appends).await?;
        tx.commit().await?;
        if let Some(last) = positions.values().max() {
            self.commits.send_modify(|head| *head = (*head).max(*last));
        }
        Ok(outcomes(appends, planned, &positions))
    }
}

#[async_trait]
impl EventStore for PostgresEventStore {
    async fn verify_chain(
        &self,
        progress: &(dyn Fn(i64) + Send + Sync),
    ) -> Result<chain::ChainReport, StoreError> {
        sql::walk_chain(
            sql::Either::Postgres(&self.pool),
            i64::try_from(crate::port::READ_LIMIT_MAX).expect("BUG: small constant"),
            progress,
        )
        .await
    }

    fn backend(&self) -> &'static str {
        "postgres"
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
            sql::Either::Postgres(&self.pool),
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
        sql::read_all(sql::Either::Postgres(&self.pool), after, clamp_limit(limit)).await
    }

    async fn head(&self) -> Result<Position, StoreError> {
        sql::head(sql::Either::Postgres(&self.pool)).await
    }

    fn commits(&self) -> watch::Receiver<Position> {
        self.commits.subscribe()
    }
}
