//! The SQL toolkit the SQLite and PostgreSQL code shares, in the store, the
//! read models and the API's tables:
//!
//! - [`Either`] and [`on_backend!`](crate::on_backend): one value per
//!   backend (a pool, a connection, a transaction) and the one switch that
//!   writes a statement's code once and types it once per backend;
//! - [`RowBatch`]: many rows sent as one parameter set (PostgreSQL: one
//!   array per column, read with `UNNEST`; SQLite: one JSON array of rows,
//!   read with `json_each` and `value ->> N`);
//! - the hash chain over stored rows: [`walk_chain`] (verify) and
//!   [`backfill_hashes`] (give the unhashed prefix of an old log its
//!   hashes), the same algorithm on both backends.
//!
//! What truly differs (locks, `UNNEST` against `json_each`, types) stays in
//! each backend's SQL, side by side.

use crate::chain;
use crate::error::StoreError;
use crate::model::{NewEvent, Position, RecordedEvent, StreamAppend};
use crate::plan::Planned;
use crate::rows::{RawEvent, metadata_text};
use chrono::{DateTime, Utc};
use serde::ser::{Serialize, SerializeSeq, Serializer};
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::sqlite::SqliteRow;
use sqlx::{PgConnection, PgPool, Postgres, Row, SqliteConnection, SqlitePool};
use uuid::Uuid;

/// One value per backend: a pool, a connection or a transaction of either
/// kind, matched by [`on_backend!`](crate::on_backend).
#[derive(Debug, Clone, Copy)]
pub enum Either<S, P> {
    /// The SQLite one.
    Sqlite(S),
    /// The PostgreSQL one.
    Postgres(P),
}

/// A pool of either backend.
pub type AnyPool<'a> = Either<&'a SqlitePool, &'a PgPool>;
/// A connection (or an open transaction's connection) of either backend.
pub type AnyConnection<'a> = Either<&'a mut SqliteConnection, &'a mut PgConnection>;

/// Runs the same code on whichever backend an [`Either`] holds: the body
/// is written once and type-checked once per backend, with `$handle` bound
/// to the SQLite or the PostgreSQL value.
///
/// ```ignore
/// let count: i64 = store::on_backend!(db.pool(), |pool| {
///     sqlx::query_scalar("SELECT COUNT(*) FROM users").fetch_one(pool).await?
/// });
/// ```
#[macro_export]
macro_rules! on_backend {
    ($value:expr, |$handle:ident| $body:expr) => {
        match $value {
            $crate::sql::Either::Sqlite($handle) => $body,
            $crate::sql::Either::Postgres($handle) => $body,
        }
    };
}

/// The kind of one column of a [`RowBatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    /// Text (PostgreSQL `text[]`).
    Text,
    /// A 64-bit integer (PostgreSQL `bigint[]`).
    Integer,
}

/// One cell of a row pushed into a [`RowBatch`]; `None` is SQL `NULL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell<'a> {
    /// A text cell.
    Text(Option<&'a str>),
    /// An integer cell.
    Integer(Option<i64>),
}

/// One column's values, in row order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Column<'a> {
    Text(Vec<Option<&'a str>>),
    Integer(Vec<Option<i64>>),
}

/// Many rows bound as one set of parameters, so a batch costs one
/// statement: on PostgreSQL one array per column ([`RowBatch::bind_arrays`],
/// read with `UNNEST($1::text[], $2::bigint[], ...)`), on SQLite one JSON
/// array of rows, each an array of its cells in column order
/// ([`RowBatch::json_rows`], read with `json_each($1)` and `value ->> N`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowBatch<'a> {
    columns: Vec<Column<'a>>,
    rows: usize,
}

impl<'a> RowBatch<'a> {
    /// An empty batch with these columns.
    pub fn new(kinds: &[ColumnKind]) -> RowBatch<'a> {
        assert!(!kinds.is_empty(), "BUG: a row batch needs a column");
        let columns = kinds
            .iter()
            .map(|kind| match kind {
                ColumnKind::Text => Column::Text(Vec::new()),
                ColumnKind::Integer => Column::Integer(Vec::new()),
            })
            .collect();
        RowBatch { columns, rows: 0 }
    }

    /// Adds a row: one cell per column, of the column's kind.
    ///
    /// # Panics
    /// When the row has another number of cells or a cell of another kind
    /// (a bug in the caller's statement code).
    pub fn push(&mut self, row: &[Cell<'a>]) {
        assert_eq!(
            row.len(),
            self.columns.len(),
            "BUG: a row of {} cells in a batch of {} columns",
            row.len(),
            self.columns.len()
        );
        for (index, (column, cell)) in self.columns.iter_mut().zip(row).enumerate() {
            match (column, cell) {
                (Column::Text(values), Cell::Text(value)) => values.push(*value),
                (Column::Integer(values), Cell::Integer(value)) => values.push(*value),
                (_, cell) => {
                    panic!("BUG: cell {index} of a row is {cell:?}, not the column's kind")
                }
            }
        }
        self.rows += 1;
    }

    /// How many rows it holds.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Whether it holds no row.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// The rows as one JSON array of arrays (SQLite's parameter).
    pub fn json_rows(&self) -> String {
        serde_json::to_string(&JsonRows(self)).expect("BUG: text and integers serialize")
    }

    /// Binds one array per column, in column order (PostgreSQL's
    /// parameters), after whatever the query has bound already.
    pub fn bind_arrays<'q, Q: BindArray<'q>>(&'q self, mut query: Q) -> Q {
        for column in &self.columns {
            query = match column {
                Column::Text(values) => query.bind_text_array(values),
                Column::Integer(values) => query.bind_integer_array(values),
            };
        }
        query
    }
}

/// Serializes a batch as rows of cells.
struct JsonRows<'b, 'a>(&'b RowBatch<'a>);

impl Serialize for JsonRows<'_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let batch = self.0;
        let mut rows = serializer.serialize_seq(Some(batch.rows))?;
        for index in 0..batch.rows {
            rows.serialize_element(&JsonRow { batch, index })?;
        }
        rows.end()
    }
}

/// One row of a batch as a JSON array.
struct JsonRow<'b, 'a> {
    batch: &'b RowBatch<'a>,
    index: usize,
}

impl Serialize for JsonRow<'_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut cells = serializer.serialize_seq(Some(self.batch.columns.len()))?;
        for column in &self.batch.columns {
            match column {
                Column::Text(values) => cells.serialize_element(&values[self.index])?,
                Column::Integer(values) => cells.serialize_element(&values[self.index])?,
            }
        }
        cells.end()
    }
}

/// A PostgreSQL query that can take a [`RowBatch`]'s arrays
/// (`sqlx::query`, `sqlx::query_as`, `sqlx::query_scalar`).
pub trait BindArray<'q>: Sized {
    /// Binds a nullable text array.
    fn bind_text_array(self, values: &'q [Option<&'q str>]) -> Self;
    /// Binds a nullable bigint array.
    fn bind_integer_array(self, values: &'q [Option<i64>]) -> Self;
}

impl<'q> BindArray<'q> for sqlx::query::Query<'q, Postgres, PgArguments> {
    fn bind_text_array(self, values: &'q [Option<&'q str>]) -> Self {
        self.bind(values)
    }
    fn bind_integer_array(self, values: &'q [Option<i64>]) -> Self {
        self.bind(values)
    }
}

impl<'q, O> BindArray<'q> for sqlx::query::QueryAs<'q, Postgres, O, PgArguments> {
    fn bind_text_array(self, values: &'q [Option<&'q str>]) -> Self {
        self.bind(values)
    }
    fn bind_integer_array(self, values: &'q [Option<i64>]) -> Self {
        self.bind(values)
    }
}

impl<'q, O> BindArray<'q> for sqlx::query::QueryScalar<'q, Postgres, O, PgArguments> {
    fn bind_text_array(self, values: &'q [Option<&'q str>]) -> Self {
        self.bind(values)
    }
    fn bind_integer_array(self, values: &'q [Option<i64>]) -> Self {
        self.bind(values)
    }
}

/// One event as an append inserts it: its place, its stored text and its
/// hash.
pub(crate) struct EventRow<'a> {
    /// The event as the caller gave it.
    pub event: &'a NewEvent,
    pub stream_id: &'a str,
    pub version: i64,
    pub event_id: Uuid,
    pub event_type: &'a str,
    pub schema_version: i32,
    pub data: String,
    pub metadata: String,
    pub hash: String,
}

/// The rows an append inserts for its planned streams, in order, each
/// chained to the one before it from `previous` (the log's last hash), all
/// recorded at `recorded_at`. Every backend that keeps the chain (SQLite,
/// PostgreSQL, memory) inserts exactly these.
pub(crate) fn event_rows<'a>(
    appends: &'a [StreamAppend],
    planned: &[Planned],
    mut previous: String,
    recorded_at: DateTime<Utc>,
) -> Vec<EventRow<'a>> {
    assert_eq!(
        appends.len(),
        planned.len(),
        "BUG: one plan per stream of the batch"
    );
    let mut rows = Vec::new();
    for (append, plan) in appends.iter().zip(planned) {
        let Planned::Insert { first_version } = plan else {
            continue;
        };
        assert!(
            *first_version >= 1,
            "BUG: stream {} planned from version {first_version}",
            append.stream_id
        );
        for (offset, event) in append.events.iter().enumerate() {
            let data = event.data.to_string();
            let metadata = metadata_text(&event.metadata);
            // Versions within a stream are dense: first, first + 1, ...
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
            rows.push(EventRow {
                event,
                stream_id: &append.stream_id,
                version,
                event_id: event.event_id,
                event_type: &event.event_type,
                schema_version: event.schema_version,
                data,
                metadata,
                hash: previous.clone(),
            });
        }
    }
    rows
}

/// A stream's events after a version, in version order (the same text on
/// both backends).
const STREAM_PAGE: &str = "SELECT position, stream_id, version, event_id, event_type, \
     schema_version, data, metadata, recorded_at, hash \
     FROM events WHERE stream_id = $1 AND version > $2 ORDER BY version LIMIT $3";

/// The log's events after a position, in position order.
const LOG_PAGE: &str = "SELECT position, stream_id, version, event_id, event_type, \
     schema_version, data, metadata, recorded_at, hash \
     FROM events WHERE position > $1 ORDER BY position LIMIT $2";

/// Up to `limit` events of a stream after `after_version`, parsed.
pub(crate) async fn read_stream(
    pool: AnyPool<'_>,
    stream_id: &str,
    after_version: i64,
    limit: i64,
) -> Result<Vec<RecordedEvent>, StoreError> {
    crate::on_backend!(pool, |pool| {
        let rows = sqlx::query(STREAM_PAGE)
            .bind(stream_id)
            .bind(after_version)
            .bind(limit)
            .fetch_all(pool)
            .await?;
        rows.iter().map(|row| row.raw()?.parse()).collect()
    })
}

/// Up to `limit` events of the log after `after`, parsed.
pub(crate) async fn read_all(
    pool: AnyPool<'_>,
    after: Position,
    limit: i64,
) -> Result<Vec<RecordedEvent>, StoreError> {
    crate::on_backend!(pool, |pool| {
        let rows = sqlx::query(LOG_PAGE)
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?;
        rows.iter().map(|row| row.raw()?.parse()).collect()
    })
}

/// The log's last position (0 when empty).
pub(crate) async fn head(pool: AnyPool<'_>) -> Result<Position, StoreError> {
    Ok(crate::on_backend!(pool, |pool| {
        sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM events")
            .fetch_one(pool)
            .await?
    }))
}

/// A page of stored rows, exactly as stored, with their hashes (the same
/// text on both backends).
const RAW_PAGE: &str = "SELECT position, stream_id, version, event_id, event_type, schema_version, \
     data, metadata, recorded_at, hash FROM events WHERE position > $1 ORDER BY position LIMIT $2";

/// Rows per page while giving an old log its hashes.
const BACKFILL_PAGE_ROWS: i64 = 1_000;

/// A stored row read back as text, with its stored hash.
pub(crate) trait RawRow {
    /// The row, parsed as far as the chain needs.
    fn raw(&self) -> Result<RawEvent, StoreError>;
}

impl RawRow for SqliteRow {
    fn raw(&self) -> Result<RawEvent, StoreError> {
        let position: i64 = self.try_get("position")?;
        // SQLite stores times as RFC 3339 text.
        let recorded_at: String = self.try_get("recorded_at")?;
        let recorded_at = DateTime::parse_from_rfc3339(&recorded_at)
            .map_err(|e| StoreError::Corrupt {
                position,
                reason: format!("recorded_at: {e}"),
            })?
            .with_timezone(&Utc);
        let event_id: &str = self.try_get("event_id")?;
        Ok(RawEvent {
            position,
            stream_id: self.try_get("stream_id")?,
            version: self.try_get("version")?,
            event_id: parse_uuid(event_id, position)?,
            event_type: self.try_get("event_type")?,
            schema_version: self.try_get("schema_version")?,
            data: self.try_get("data")?,
            metadata: self.try_get("metadata")?,
            recorded_at,
            hash: self.try_get("hash")?,
        })
    }
}

impl RawRow for PgRow {
    fn raw(&self) -> Result<RawEvent, StoreError> {
        Ok(RawEvent {
            position: self.try_get("position")?,
            stream_id: self.try_get("stream_id")?,
            version: self.try_get("version")?,
            event_id: self.try_get("event_id")?,
            event_type: self.try_get("event_type")?,
            schema_version: self.try_get("schema_version")?,
            data: self.try_get("data")?,
            metadata: self.try_get("metadata")?,
            recorded_at: self.try_get("recorded_at")?,
            hash: self.try_get("hash")?,
        })
    }
}

/// An event id stored as text (SQLite).
pub(crate) fn parse_uuid(text: &str, position: i64) -> Result<Uuid, StoreError> {
    Uuid::parse_str(text).map_err(|e| StoreError::Corrupt {
        position,
        reason: format!("event id: {e}"),
    })
}

/// Walks the whole hash chain over the rows exactly as stored, a page of
/// `page_rows` at a time; `progress` hears each page's last position.
pub(crate) async fn walk_chain(
    pool: AnyPool<'_>,
    page_rows: i64,
    progress: &(dyn Fn(i64) + Send + Sync),
) -> Result<chain::ChainReport, StoreError> {
    let mut verifier = chain::Verifier::default();
    let mut after = 0i64;
    loop {
        let raws: Vec<RawEvent> = crate::on_backend!(pool, |pool| {
            let rows = sqlx::query(RAW_PAGE)
                .bind(after)
                .bind(page_rows)
                .fetch_all(pool)
                .await?;
            rows.iter().map(RawRow::raw).collect::<Result<_, _>>()?
        });
        if raws.is_empty() {
            return Ok(verifier.report());
        }
        for raw in &raws {
            assert!(
                raw.position > after,
                "BUG: a page of the log went back from {after} to {}",
                raw.position
            );
            after = raw.position;
            verifier.check(raw.position, &raw.link(), raw.hash.as_deref());
        }
        progress(after);
    }
}

/// Gives events written before hashes existed their hash, in position
/// order, inside the caller's write transaction (which holds the backend's
/// append lock; this is the only update the table allows); returns how
/// many it filled. Only the unhashed prefix of the log is filled: a hash
/// missing after a hashed event is damage for `verify` to report, never
/// something to fill in.
pub(crate) async fn backfill_hashes(mut connection: AnyConnection<'_>) -> Result<u64, StoreError> {
    let end: Option<i64> = crate::on_backend!(&mut connection, |connection| {
        let hashed: Option<i64> =
            sqlx::query_scalar("SELECT MIN(position) FROM events WHERE hash IS NOT NULL")
                .fetch_one(&mut **connection)
                .await?;
        sqlx::query_scalar("SELECT MAX(position) FROM events WHERE hash IS NULL AND position < $1")
            .bind(hashed.unwrap_or(i64::MAX))
            .fetch_one(&mut **connection)
            .await?
    });
    let Some(end) = end else {
        return Ok(0);
    };
    let mut previous = chain::GENESIS.to_owned();
    let mut after = 0;
    let mut filled = 0;
    loop {
        let raws: Vec<RawEvent> = crate::on_backend!(&mut connection, |connection| {
            let rows = sqlx::query(RAW_PAGE)
                .bind(after)
                .bind(BACKFILL_PAGE_ROWS)
                .fetch_all(&mut **connection)
                .await?;
            rows.iter().map(RawRow::raw).collect::<Result<_, _>>()?
        });
        if raws.is_empty() || after >= end {
            break;
        }
        for raw in &raws {
            after = raw.position;
            if after > end {
                break;
            }
            previous = chain::link(&previous, &raw.link());
            crate::on_backend!(&mut connection, |connection| {
                sqlx::query("UPDATE events SET hash = $1 WHERE position = $2")
                    .bind(&previous)
                    .bind(raw.position)
                    .execute(&mut **connection)
                    .await?;
            });
            filled += 1;
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> RowBatch<'static> {
        let mut batch = RowBatch::new(&[ColumnKind::Text, ColumnKind::Integer, ColumnKind::Text]);
        batch.push(&[
            Cell::Text(Some("alice")),
            Cell::Integer(Some(7)),
            Cell::Text(None),
        ]);
        batch.push(&[
            Cell::Text(Some("b\"ob")),
            Cell::Integer(None),
            Cell::Text(Some("")),
        ]);
        batch
    }

    #[test]
    fn a_batch_is_sent_to_sqlite_as_rows_of_cells_in_column_order() {
        let batch = keys();
        assert_eq!(batch.len(), 2);
        assert_eq!(batch.json_rows(), r#"[["alice",7,null],["b\"ob",null,""]]"#);
        assert_eq!(RowBatch::new(&[ColumnKind::Text]).json_rows(), "[]");
    }

    #[test]
    fn a_batch_keeps_one_vector_per_column_for_postgres() {
        let batch = keys();
        assert_eq!(
            batch.columns,
            vec![
                Column::Text(vec![Some("alice"), Some("b\"ob")]),
                Column::Integer(vec![Some(7), None]),
                Column::Text(vec![None, Some("")]),
            ]
        );
    }

    #[test]
    #[should_panic(expected = "not the column's kind")]
    fn a_cell_of_the_wrong_kind_is_a_bug() {
        keys().push(&[
            Cell::Integer(Some(1)),
            Cell::Integer(Some(2)),
            Cell::Text(None),
        ]);
    }

    #[test]
    #[should_panic(expected = "a row of 2 cells in a batch of 3 columns")]
    fn a_short_row_is_a_bug() {
        keys().push(&[Cell::Text(None), Cell::Integer(None)]);
    }
}
