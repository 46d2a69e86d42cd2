//! The read-model database: SQLite or PostgreSQL, usually the same database
//! as the event log.
//!
//! Statements shared by both kinds use `$N` placeholders, which sqlx's SQLite
//! driver accepts too. Table statements come from `schema` (built from
//! constants and a generation number, never from input).

use crate::envelope::time_text;
use crate::error::ProjectionError;
use crate::projection::Projection;
use crate::schema::{Dialect, Table};
use chrono::Utc;
use serde_json::Value;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqlitePool, SqlitePoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions as _, Postgres, Sqlite, Transaction};
use std::path::{Path, PathBuf};
use std::time::Duration;
use store::Backend;
use store::sql::{AnyConnection, AnyPool, Cell, ColumnKind, Either, RowBatch};

/// Connections readers of the read models may hold (per process).
pub const READ_CONNECTIONS_MAX: u32 = 8;
/// Connections projection writers may hold on PostgreSQL (per process).
pub const POSTGRES_WRITE_CONNECTIONS_MAX: u32 = 4;
/// Page cache of the SQLite writer connection, KiB.
pub const SQLITE_WRITE_CACHE_KIB: u32 = 65_536;
/// A projection write slower than this is logged as a warning (rebuild
/// transactions and index builds legitimately take seconds).
pub const SLOW_WRITE: Duration = Duration::from_secs(30);
/// A read slower than this is logged at debug level (drift checks scan
/// whole tables; API latency is measured by the API's own metrics).
pub const SLOW_READ: Duration = Duration::from_secs(1);
/// How long a rebuild's lease lasts without renewal (it renews at every
/// commit, every few seconds).
pub const REBUILD_LEASE: chrono::Duration = chrono::Duration::minutes(10);
/// The PostgreSQL advisory lock key serializing read-model installs.
pub const INSTALL_LOCK_KEY: i64 = 0x6c65_6467_6572_0002;
/// How long to wait for a connection from a pool.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// A projection's bookkeeping row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// The live generation of its tables.
    pub generation: i64,
    /// The table shape it was built with.
    pub schema_version: i64,
    /// The last event applied.
    pub position: i64,
}

/// Handle on the read-model database.
#[derive(Clone, Debug)]
pub enum ReadDb {
    /// SQLite: one writer connection (SQLite has one writer at a time), and
    /// readers.
    Sqlite {
        /// The writer.
        write: SqlitePool,
        /// Readers.
        read: SqlitePool,
        /// Taken for every write transaction (see `store::sqlite::write_gate`).
        gate: store::sqlite::WriteGate,
    },
    /// PostgreSQL.
    Postgres {
        /// Writers.
        write: PgPool,
        /// Readers.
        read: PgPool,
    },
}

/// An open write transaction on the read-model database.
pub enum Tx {
    /// On SQLite (begun `IMMEDIATE`: it holds the write lock from the
    /// start), with the file's write gate held until it ends.
    Sqlite(
        Transaction<'static, Sqlite>,
        tokio::sync::OwnedMutexGuard<()>,
    ),
    /// On PostgreSQL.
    Postgres(Transaction<'static, Postgres>),
}

const CHECKPOINT_SELECT: &str =
    "SELECT generation, schema_version, position FROM projection_checkpoints WHERE projection = $1";
const CHECKPOINT_SELECT_FOR_UPDATE: &str = "SELECT generation, schema_version, position \
     FROM projection_checkpoints WHERE projection = $1 FOR UPDATE";
const CHECKPOINT_UPSERT: &str = "INSERT INTO projection_checkpoints \
     (projection, generation, schema_version, position, updated_at) VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT (projection) DO UPDATE SET generation = excluded.generation, \
     schema_version = excluded.schema_version, position = excluded.position, \
     updated_at = excluded.updated_at";

/// The SQLite file of the read models: `read.db` beside the log's file.
/// SQLite has one writer per file; in the log's own file the runner's
/// commits took the write lock the purchase path appends under, and moving
/// them out nearly doubled confirmed purchases per second over HTTP.
pub fn sqlite_read_models(ledger: &Path) -> PathBuf {
    ledger.with_file_name("read.db")
}

impl ReadDb {
    /// Its reader pool, for queries written once for both backends
    /// (`store::on_backend!`).
    pub fn reader(&self) -> AnyPool<'_> {
        match self {
            ReadDb::Sqlite { read, .. } => Either::Sqlite(read),
            ReadDb::Postgres { read, .. } => Either::Postgres(read),
        }
    }

    /// Opens the read models beside the log a backend names (PostgreSQL: in
    /// the same database; SQLite: in their own file, `sqlite_read_models`),
    /// applying the ledger's migrations if needed. An SQLite deployment that
    /// kept them in the log's file starts with empty read models here, which
    /// the runner builds from the log.
    pub async fn open(backend: &Backend) -> Result<ReadDb, ProjectionError> {
        match backend {
            Backend::Sqlite(path) => ReadDb::open_sqlite(&sqlite_read_models(path)).await,
            Backend::Postgres(url) => ReadDb::open_postgres(url).await,
        }
    }

    /// Opens (creating if needed) an SQLite file.
    pub async fn open_sqlite(path: &Path) -> Result<ReadDb, ProjectionError> {
        if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(folder).map_err(sqlx::Error::Io)?;
        }
        let options = store::sqlite::connect_options(path);
        // A larger page cache keeps the B-tree pages a batch touches in
        // memory: batches write rows keyed all over the tables. Read models
        // are derived, so their commits need not reach the disk before the
        // call returns: a power loss may undo the last batches, rows and
        // checkpoint together (WAL keeps each transaction atomic), and the
        // runner applies them again. The log's own connection stays FULL.
        let write_options = options
            .clone()
            .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
            .pragma("cache_size", format!("-{SQLITE_WRITE_CACHE_KIB}"))
            // SQLite's own WAL checkpoints (every 1,000 pages, in the
            // committing connection) keep this file's log short: only the
            // runner pays for them, not the purchase path.
            .log_slow_statements(log::LevelFilter::Warn, SLOW_WRITE);
        let options = options.log_slow_statements(log::LevelFilter::Debug, SLOW_READ);
        let write = store::sqlite::connect_migrated(
            SqlitePoolOptions::new()
                .max_connections(1)
                .acquire_timeout(ACQUIRE_TIMEOUT),
            write_options,
            &store::sqlite::MIGRATOR,
        )
        .await
        .map_err(|e| ProjectionError::Database(e.into()))?;
        let read = SqlitePoolOptions::new()
            .max_connections(READ_CONNECTIONS_MAX)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        Ok(ReadDb::Sqlite {
            write,
            read,
            gate: store::sqlite::write_gate(path),
        })
    }

    /// Opens a PostgreSQL database.
    pub async fn open_postgres(url: &str) -> Result<ReadDb, ProjectionError> {
        let options = store::postgres::connect_options(url)?;
        let write = PgPoolOptions::new()
            .max_connections(POSTGRES_WRITE_CONNECTIONS_MAX)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(
                options
                    .clone()
                    .log_slow_statements(log::LevelFilter::Warn, SLOW_WRITE),
            )
            .await?;
        let options = options.log_slow_statements(log::LevelFilter::Debug, SLOW_READ);
        store::postgres::MIGRATOR
            .run(&write)
            .await
            .map_err(|e| ProjectionError::Database(e.into()))?;
        let read = PgPoolOptions::new()
            .max_connections(READ_CONNECTIONS_MAX)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        Ok(ReadDb::Postgres { write, read })
    }

    /// Its SQL dialect.
    pub fn dialect(&self) -> Dialect {
        match self {
            ReadDb::Sqlite { .. } => Dialect::Sqlite,
            ReadDb::Postgres { .. } => Dialect::Postgres,
        }
    }

    /// Begins a write transaction.
    pub async fn begin(&self) -> Result<Tx, ProjectionError> {
        Ok(match self {
            ReadDb::Sqlite { write, gate, .. } => {
                let guard = gate.clone().lock_owned().await;
                Tx::Sqlite(write.begin_with("BEGIN IMMEDIATE").await?, guard)
            }
            ReadDb::Postgres { write, .. } => {
                let mut tx = write.begin().await?;
                // Derived data: a crash may lose the last commits, rows and
                // checkpoint together, and the runner applies them again.
                sqlx::query("SET LOCAL synchronous_commit TO OFF")
                    .execute(&mut *tx)
                    .await?;
                Tx::Postgres(tx)
            }
        })
    }

    /// A projection's checkpoint, read without locking.
    pub async fn checkpoint(
        &self,
        projection: Projection,
    ) -> Result<Option<Checkpoint>, ProjectionError> {
        let row: Option<(i64, i64, i64)> = store::on_backend!(self.reader(), |read| {
            sqlx::query_as(CHECKPOINT_SELECT)
                .bind(projection.name())
                .fetch_optional(read)
                .await?
        });
        Ok(row.map(checkpoint_of))
    }

    /// The SQLite reader pool, for queries (`None` on PostgreSQL).
    pub fn sqlite_reader(&self) -> Option<&SqlitePool> {
        match self {
            ReadDb::Sqlite { read, .. } => Some(read),
            ReadDb::Postgres { .. } => None,
        }
    }

    /// The PostgreSQL reader pool, for queries (`None` on SQLite).
    pub fn postgres_reader(&self) -> Option<&PgPool> {
        match self {
            ReadDb::Postgres { read, .. } => Some(read),
            ReadDb::Sqlite { .. } => None,
        }
    }

    /// Closes the pools.
    pub async fn close(&self) {
        match self {
            ReadDb::Sqlite { write, read, .. } => {
                write.close().await;
                read.close().await;
            }
            ReadDb::Postgres { write, read } => {
                write.close().await;
                read.close().await;
            }
        }
    }
}

fn checkpoint_of((generation, schema_version, position): (i64, i64, i64)) -> Checkpoint {
    Checkpoint {
        generation,
        schema_version,
        position,
    }
}

impl Tx {
    /// Its connection, for statement code written once for both backends
    /// (`store::on_backend!`).
    pub fn connection(&mut self) -> AnyConnection<'_> {
        match self {
            Tx::Sqlite(tx, _) => Either::Sqlite(&mut **tx),
            Tx::Postgres(tx) => Either::Postgres(&mut **tx),
        }
    }

    /// Its SQL dialect.
    pub fn dialect(&self) -> Dialect {
        match self {
            Tx::Sqlite(..) => Dialect::Sqlite,
            Tx::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Runs one generated statement without parameters.
    pub async fn execute(&mut self, sql: String) -> Result<(), ProjectionError> {
        store::on_backend!(self.connection(), |conn| {
            sqlx::query(AssertSqlSafe(sql)).execute(conn).await?;
        });
        Ok(())
    }

    /// Runs one generated statement whose parameter 1 is JSON text.
    pub async fn execute_json(&mut self, sql: String, json: String) -> Result<(), ProjectionError> {
        store::on_backend!(self.connection(), |conn| {
            sqlx::query(AssertSqlSafe(sql))
                .bind(json)
                .execute(conn)
                .await?;
        });
        Ok(())
    }

    /// Writes rows (JSON objects of the table's columns): on PostgreSQL as
    /// one array parameter per column, on SQLite as bound values, many rows a
    /// statement.
    pub async fn write_rows(
        &mut self,
        table: &'static Table,
        generation: i64,
        rows: &[Value],
    ) -> Result<(), ProjectionError> {
        match self {
            Tx::Postgres(tx) => {
                let kinds: Vec<ColumnKind> = table
                    .columns
                    .iter()
                    .map(|(_, kind)| {
                        if kind.is_integer() {
                            ColumnKind::Integer
                        } else {
                            ColumnKind::Text
                        }
                    })
                    .collect();
                let mut batch = RowBatch::new(&kinds);
                let mut cells = Vec::with_capacity(kinds.len());
                for row in rows {
                    cells.clear();
                    cells.extend(table.columns.iter().zip(&kinds).map(|((column, _), kind)| {
                        match kind {
                            ColumnKind::Integer => Cell::Integer(row[*column].as_i64()),
                            ColumnKind::Text => Cell::Text(row[*column].as_str()),
                        }
                    }));
                    batch.push(&cells);
                }
                batch
                    .bind_arrays(sqlx::query(AssertSqlSafe(table.write_arrays(generation))))
                    .execute(&mut **tx)
                    .await?;
            }
            Tx::Sqlite(tx, _) => {
                let mut rest = rows;
                while !rest.is_empty() {
                    let mut size = table.values_rows_max();
                    while size > rest.len() {
                        size /= 2;
                    }
                    let (chunk, after) = rest.split_at(size);
                    let mut query =
                        sqlx::query(AssertSqlSafe(table.write_values(generation, size)));
                    for row in chunk {
                        for (column, _) in table.columns {
                            query = match &row[*column] {
                                Value::Null => query.bind(None::<i64>),
                                Value::Number(n) => {
                                    query.bind(n.as_i64().expect("BUG: integer columns hold i64"))
                                }
                                Value::String(text) => query.bind(text.as_str()),
                                other => unreachable!("BUG: column {column} holds {other}"),
                            };
                        }
                    }
                    query.execute(&mut **tx).await?;
                    rest = after;
                }
            }
        }
        Ok(())
    }

    /// Runs one generated query whose parameter 1 is JSON text and whose
    /// single column is text.
    pub async fn fetch_texts(
        &mut self,
        sql: String,
        json: String,
    ) -> Result<Vec<String>, ProjectionError> {
        Ok(store::on_backend!(self.connection(), |conn| {
            sqlx::query_scalar(AssertSqlSafe(sql))
                .bind(json)
                .fetch_all(conn)
                .await?
        }))
    }

    /// A projection's checkpoint, locked until commit where the database can
    /// lock a row (SQLite's `BEGIN IMMEDIATE` already excludes other writers).
    pub async fn checkpoint(
        &mut self,
        projection: Projection,
    ) -> Result<Option<Checkpoint>, ProjectionError> {
        let row: Option<(i64, i64, i64)> = match self {
            Tx::Sqlite(tx, _) => {
                sqlx::query_as(CHECKPOINT_SELECT)
                    .bind(projection.name())
                    .fetch_optional(&mut **tx)
                    .await?
            }
            Tx::Postgres(tx) => {
                sqlx::query_as(CHECKPOINT_SELECT_FOR_UPDATE)
                    .bind(projection.name())
                    .fetch_optional(&mut **tx)
                    .await?
            }
        };
        Ok(row.map(checkpoint_of))
    }

    /// Stores a projection's checkpoint.
    pub async fn set_checkpoint(
        &mut self,
        projection: Projection,
        checkpoint: Checkpoint,
    ) -> Result<(), ProjectionError> {
        let now = time_text(Utc::now());
        store::on_backend!(self.connection(), |conn| {
            sqlx::query(CHECKPOINT_UPSERT)
                .bind(projection.name())
                .bind(checkpoint.generation)
                .bind(checkpoint.schema_version)
                .bind(checkpoint.position)
                .bind(now)
                .execute(conn)
                .await?;
        });
        Ok(())
    }

    /// Serializes installs across processes until this transaction ends
    /// (SQLite's `BEGIN IMMEDIATE` already does).
    pub async fn lock_install(&mut self) -> Result<(), ProjectionError> {
        if let Tx::Postgres(tx) = self {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(INSTALL_LOCK_KEY)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// Takes the rebuild lease of each projection for `owner`, or fails if a
    /// live lease of another rebuild holds one.
    pub async fn claim_rebuild(
        &mut self,
        projections: &[Projection],
        owner: &str,
    ) -> Result<(), ProjectionError> {
        const EXPIRED: &str =
            "DELETE FROM projection_rebuilds WHERE projection = $1 AND expires_at < $2";
        const CLAIM: &str = "INSERT INTO projection_rebuilds (projection, owner, expires_at) \
                             VALUES ($1, $2, $3) ON CONFLICT (projection) DO NOTHING";
        const HOLDER: &str =
            "SELECT owner, expires_at FROM projection_rebuilds WHERE projection = $1";
        let now = Utc::now();
        let (now_text, until) = (time_text(now), time_text(now + REBUILD_LEASE));
        for projection in projections {
            store::on_backend!(self.connection(), |conn| {
                sqlx::query(EXPIRED)
                    .bind(projection.name())
                    .bind(&now_text)
                    .execute(&mut *conn)
                    .await?;
                let claimed = sqlx::query(CLAIM)
                    .bind(projection.name())
                    .bind(owner)
                    .bind(&until)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                if claimed == 0 {
                    let (holder, expires_at): (String, String) = sqlx::query_as(HOLDER)
                        .bind(projection.name())
                        .fetch_one(conn)
                        .await?;
                    return Err(ProjectionError::RebuildRunning {
                        projection: projection.name(),
                        owner: holder,
                        expires_at,
                    });
                }
            });
        }
        Ok(())
    }

    /// Extends `owner`'s rebuild leases, or fails if it lost one.
    pub async fn renew_rebuild(
        &mut self,
        projections: &[Projection],
        owner: &str,
    ) -> Result<(), ProjectionError> {
        const RENEW: &str =
            "UPDATE projection_rebuilds SET expires_at = $3 WHERE projection = $1 AND owner = $2";
        let until = time_text(Utc::now() + REBUILD_LEASE);
        for projection in projections {
            let renewed = store::on_backend!(self.connection(), |conn| sqlx::query(RENEW)
                .bind(projection.name())
                .bind(owner)
                .bind(&until)
                .execute(conn)
                .await?
                .rows_affected());
            if renewed == 0 {
                return Err(ProjectionError::RebuildRaced(projection.name()));
            }
        }
        Ok(())
    }

    /// Gives up `owner`'s rebuild leases.
    pub async fn release_rebuild(
        &mut self,
        projections: &[Projection],
        owner: &str,
    ) -> Result<(), ProjectionError> {
        const RELEASE: &str =
            "DELETE FROM projection_rebuilds WHERE projection = $1 AND owner = $2";
        for projection in projections {
            store::on_backend!(self.connection(), |conn| {
                sqlx::query(RELEASE)
                    .bind(projection.name())
                    .bind(owner)
                    .execute(conn)
                    .await?;
            });
        }
        Ok(())
    }

    /// Creates one generation of a projection's tables (dropping leftovers of
    /// an interrupted rebuild of the same generation first).
    pub async fn create_tables(
        &mut self,
        projection: Projection,
        generation: i64,
    ) -> Result<(), ProjectionError> {
        self.create_bare_tables(projection, generation).await?;
        self.create_indexes(projection, generation).await
    }

    /// Creates one generation of a projection's tables without the indexes
    /// `create_indexes` adds (for a rebuild to fill first).
    pub async fn create_bare_tables(
        &mut self,
        projection: Projection,
        generation: i64,
    ) -> Result<(), ProjectionError> {
        for table in projection.tables() {
            self.execute(table.drop(generation)).await?;
            self.execute(table.create_table(generation)).await?;
        }
        Ok(())
    }

    /// Adds the indexes `create_bare_tables` left out.
    pub async fn create_indexes(
        &mut self,
        projection: Projection,
        generation: i64,
    ) -> Result<(), ProjectionError> {
        if let Tx::Postgres(tx) = self {
            // Sorting for an index build in memory rather than in temp files.
            sqlx::query("SET LOCAL maintenance_work_mem TO '256MB'")
                .execute(&mut **tx)
                .await?;
        }
        for table in projection.tables() {
            for statement in table.create_indexes(generation) {
                self.execute(statement).await?;
            }
        }
        Ok(())
    }

    /// Points the readers' views at one generation.
    pub async fn point_views(
        &mut self,
        projection: Projection,
        generation: i64,
    ) -> Result<(), ProjectionError> {
        let dialect = self.dialect();
        for table in projection.tables() {
            for statement in table.point_view(generation, dialect) {
                self.execute(statement).await?;
            }
        }
        Ok(())
    }

    /// Drops one generation of a projection's tables.
    pub async fn drop_tables(
        &mut self,
        projection: Projection,
        generation: i64,
    ) -> Result<(), ProjectionError> {
        for table in projection.tables() {
            self.execute(table.drop(generation)).await?;
        }
        Ok(())
    }

    /// Loads rows of one table by key.
    pub async fn load(
        &mut self,
        table: &'static Table,
        generation: i64,
        keys: &[&str],
    ) -> Result<Vec<String>, ProjectionError> {
        let sql = table.load(generation, self.dialect());
        let keys = serde_json::to_string(keys).expect("BUG: keys serialize");
        self.fetch_texts(sql, keys).await
    }

    /// Commits.
    pub async fn commit(self) -> Result<(), ProjectionError> {
        match self {
            Tx::Sqlite(tx, _) => tx.commit().await?,
            Tx::Postgres(tx) => tx.commit().await?,
        }
        Ok(())
    }
}
