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
use crate::rows::{RawEvent, metadata_text};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{PgPool, Row};
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
        let (mut previous, last_recorded_at) = chain_end(&mut *tx).await?;
        let now = chrono::SubsecRound::trunc_subsecs(Utc::now(), 6);
        let recorded_at = last_recorded_at.map_or(now, |last| now.max(last));
        for (append, plan) in appends.iter().zip(planned) {
            let Planned::Insert { first_version } = plan else {
                continue;
            };
            for (offset, event) in append.events.iter().enumerate() {
                let data = event.data.to_string();
                let metadata = metadata_text(&event.metadata);
                let version = first_version + offset as i64;
                previous = chain::link(
                    &previous,
                    &chain::Link::appended(
                        &append.stream_id,
                        version,
                        event,
                        &data,
                        &metadata,
                        recorded_at,
                    ),
                );
                columns.stream_ids.push(append.stream_id.as_str());
                columns.versions.push(version);
                columns.event_ids.push(event.event_id);
                columns.event_types.push(event.event_type.as_str());
                columns.schema_versions.push(event.schema_version);
                columns.data.push(data);
                columns.metadata.push(metadata);
                columns.hashes.push(previous.clone());
            }
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

/// The last event's hash (the chain's genesis for an empty log) and its
/// recording time.
async fn chain_end(
    tx: &mut sqlx::PgConnection,
) -> Result<(String, Option<DateTime<Utc>>), StoreError> {
    let last: Option<(i64, Option<String>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT position, hash, recorded_at FROM events ORDER BY position DESC LIMIT 1",
    )
    .fetch_optional(tx)
    .await?;
    match last {
        None => Ok((chain::GENESIS.to_owned(), None)),
        Some((_, Some(hash), recorded_at)) => Ok((hash, Some(recorded_at))),
        Some((position, None, _)) => Err(StoreError::Corrupt {
            position,
            reason: "the last event has no hash".into(),
        }),
    }
}

/// A page of stored rows, exactly as stored, with their hashes.
const RAW_PAGE: &str = "SELECT position, stream_id, version, event_id, event_type, schema_version, \
     data, metadata, recorded_at, hash FROM events WHERE position > $1 ORDER BY position LIMIT $2";

fn raw_row(row: &sqlx::postgres::PgRow) -> Result<RawEvent, StoreError> {
    let raw = RawEvent {
        position: row.try_get("position")?,
        stream_id: row.try_get("stream_id")?,
        version: row.try_get("version")?,
        event_id: row.try_get("event_id")?,
        event_type: row.try_get("event_type")?,
        schema_version: row.try_get("schema_version")?,
        data: row.try_get("data")?,
        metadata: row.try_get("metadata")?,
        recorded_at: row.try_get("recorded_at")?,
        hash: row.try_get("hash")?,
    };
    Ok(raw)
}

/// Gives events written before hashes existed their hash, in position
/// order, under the append lock (the only update the table allows).
async fn backfill_hashes(pool: &PgPool) -> Result<u64, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(APPEND_LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    // Only events from before the chain: the unhashed prefix of the log. A
    // missing hash after a hashed event is damage for `verify` to report,
    // never something to fill in.
    let hashed: Option<i64> =
        sqlx::query_scalar("SELECT MIN(position) FROM events WHERE hash IS NOT NULL")
            .fetch_one(&mut *tx)
            .await?;
    let unhashed: Option<i64> =
        sqlx::query_scalar("SELECT MAX(position) FROM events WHERE hash IS NULL AND position < $1")
            .bind(hashed.unwrap_or(i64::MAX))
            .fetch_one(&mut *tx)
            .await?;
    let Some(end) = unhashed else {
        return Ok(0);
    };
    let mut previous = chain::GENESIS.to_owned();
    let mut after = 0;
    let mut filled = 0;
    loop {
        let rows = sqlx::query(RAW_PAGE)
            .bind(after)
            .bind(1_000i64)
            .fetch_all(&mut *tx)
            .await?;
        if rows.is_empty() || after >= end {
            break;
        }
        for row in &rows {
            let raw = raw_row(row)?;
            after = raw.position;
            if after > end {
                break;
            }
            previous = chain::link(&previous, &raw.link());
            sqlx::query("UPDATE events SET hash = $1 WHERE position = $2")
                .bind(&previous)
                .bind(raw.position)
                .execute(&mut *tx)
                .await?;
            filled += 1;
        }
    }
    tx.commit().await?;
    Ok(filled)
}

impl PostgresEventStore {
    /// Walks the whole hash chain over the rows exactly as stored;
    /// `progress` hears each page's last position.
    async fn walk_chain(
        &self,
        progress: &(dyn Fn(i64) + Send + Sync),
    ) -> Result<chain::ChainReport, StoreError> {
        let mut verifier = chain::Verifier::default();
        let mut after = 0i64;
        loop {
            let rows = sqlx::query(RAW_PAGE)
                .bind(after)
                .bind(i64::try_from(crate::port::READ_LIMIT_MAX).expect("BUG: small constant"))
                .fetch_all(&self.pool)
                .await?;
            if rows.is_empty() {
                return Ok(verifier.report());
            }
            for row in &rows {
                let raw = raw_row(row)?;
                after = raw.position;
                verifier.check(raw.position, &raw.link(), raw.hash.as_deref());
            }
            progress(after);
        }
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

fn parse_row(row: &sqlx::postgres::PgRow) -> Result<RecordedEvent, StoreError> {
    raw_row(row)?.parse()
}

#[async_trait]
impl EventStore for PostgresEventStore {
    async fn verify_chain(
        &self,
        progress: &(dyn Fn(i64) + Send + Sync),
    ) -> Result<chain::ChainReport, StoreError> {
        self.walk_chain(progress).await
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
        let rows = sqlx::query(
            "SELECT position, stream_id, version, event_id, event_type, schema_version, data, \
                    metadata, recorded_at, hash \
             FROM events WHERE stream_id = $1 AND version > $2 ORDER BY version LIMIT $3",
        )
        .bind(stream_id)
        .bind(after_version)
        .bind(clamp_limit(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(parse_row).collect()
    }

    async fn read_all(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT position, stream_id, version, event_id, event_type, schema_version, data, \
                    metadata, recorded_at, hash \
             FROM events WHERE position > $1 ORDER BY position LIMIT $2",
        )
        .bind(after)
        .bind(clamp_limit(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(parse_row).collect()
    }

    async fn head(&self) -> Result<Position, StoreError> {
        let head: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM events")
            .fetch_one(&self.pool)
            .await?;
        Ok(head)
    }

    fn commits(&self) -> watch::Receiver<Position> {
        self.commits.subscribe()
    }
}
