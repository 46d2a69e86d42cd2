//! The event store: an append-only log with per-stream optimistic concurrency,
//! idempotent appends, batched multi-stream appends, global reads and
//! catch-up subscriptions, on SQLite (embedded) and PostgreSQL, and with the
//! `eventstoredb` feature on EventStoreDB (KurrentDB).

pub mod chain;
pub mod codec;
pub mod error;
#[cfg(feature = "eventstoredb")]
pub mod eventstoredb;
pub mod lease;
pub mod memory;
pub mod model;
pub mod plan;
pub mod port;
pub mod postgres;
mod rows;
pub use rows::metadata_text;
pub mod scratch;
pub mod sql;
pub mod sqlite;
pub mod subscription;
#[cfg(feature = "testing")]
pub mod testing;
pub mod upcast;

pub use error::StoreError;
pub use memory::MemoryEventStore;
pub use model::{
    Appended, ExpectedVersion, Metadata, NewEvent, Position, RecordedEvent, StreamAppend,
    StreamOutcome, VersionConflict,
};
pub use port::{AppendHook, EventStore};
pub use postgres::PostgresEventStore;
pub use sqlite::SqliteEventStore;
pub use subscription::Subscription;

use std::path::Path;
use std::sync::Arc;

/// Applies pending migrations; returns every applied migration as
/// `(version, description)`, oldest first.
pub async fn migrate(backend: &Backend) -> Result<Vec<(i64, String)>, StoreError> {
    const APPLIED: &str = "SELECT version, description FROM _sqlx_migrations ORDER BY version";
    match backend {
        Backend::Sqlite(path) => {
            let store = open_sqlite(path).await?;
            Ok(sqlx::query_as(APPLIED).fetch_all(store.read_pool()).await?)
        }
        Backend::Postgres(url) => {
            let store = PostgresEventStore::open(url).await?;
            Ok(sqlx::query_as(APPLIED).fetch_all(store.pool()).await?)
        }
    }
}

async fn open_sqlite(path: &Path) -> Result<SqliteEventStore, StoreError> {
    if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(folder).map_err(|e| StoreError::Unavailable(e.into()))?;
    }
    SqliteEventStore::open(path).await
}

/// Where the log lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// An SQLite file.
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL database URL.
    Postgres(String),
}

impl Backend {
    /// PostgreSQL when a `postgres://` URL is given, else SQLite in `data_dir`.
    pub fn choose(database_url: Option<&str>, data_dir: &Path) -> Backend {
        match database_url {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Backend::Postgres(url.to_owned())
            }
            Some(url) => Backend::Sqlite(url.trim_start_matches("sqlite://").into()),
            None => Backend::Sqlite(data_dir.join("ledger.db")),
        }
    }

    /// Opens the store (creating and migrating the schema if needed).
    pub async fn open(&self) -> Result<Arc<dyn EventStore>, StoreError> {
        Ok(match self {
            Backend::Sqlite(path) => {
                if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(folder)
                        .map_err(|e| StoreError::Unavailable(e.into()))?;
                }
                Arc::new(SqliteEventStore::open(path).await?)
            }
            Backend::Postgres(url) => Arc::new(PostgresEventStore::open(url).await?),
        })
    }
}

/// Where the log lives: in the SQL database beside the read models (the
/// default), or in EventStoreDB with the read models still in SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogLocation {
    /// In the SQL database the `Backend` names.
    Database,
    /// In EventStoreDB (KurrentDB): its connection string.
    EventStoreDb(String),
}

impl LogLocation {
    /// EventStoreDB when a connection string is given (`esdb://`,
    /// `esdb+discover://`, `kurrentdb://`, `kurrentdb+discover://`), else
    /// the database. Refuses anything else, and refuses EventStoreDB in a
    /// build without the `eventstoredb` feature rather than ignoring it.
    pub fn choose(event_store: Option<&str>) -> Result<LogLocation, StoreError> {
        let Some(connection) = event_store else {
            return Ok(LogLocation::Database);
        };
        let schemes = [
            "esdb://",
            "esdb+discover://",
            "kurrentdb://",
            "kurrentdb+discover://",
        ];
        if !schemes.iter().any(|scheme| connection.starts_with(scheme)) {
            return Err(StoreError::Unsupported(format!(
                "the event store must be an EventStoreDB connection string starting with one of {}",
                schemes.join(", ")
            )));
        }
        if !cfg!(feature = "eventstoredb") {
            return Err(StoreError::Unsupported(
                "this ledger binary was built without the `eventstoredb` feature, so it cannot \
                 keep the log in EventStoreDB; build it with `cargo build --release --features \
                 api/eventstoredb`"
                    .into(),
            ));
        }
        Ok(LogLocation::EventStoreDb(connection.to_owned()))
    }

    /// Opens the log. The database is opened (and migrated) either way: it
    /// holds the read models, and on SQLite its store checkpoints the file
    /// they share.
    pub async fn open(&self, database: &Backend) -> Result<Arc<dyn EventStore>, StoreError> {
        let sql = database.open().await?;
        match self {
            LogLocation::Database => Ok(sql),
            #[cfg(feature = "eventstoredb")]
            LogLocation::EventStoreDb(connection) => Ok(Arc::new(
                eventstoredb::EventStoreDb::open(connection)
                    .await?
                    .beside(sql),
            )),
            #[cfg(not(feature = "eventstoredb"))]
            LogLocation::EventStoreDb(_) => Err(StoreError::Unsupported(
                "this ledger binary was built without the `eventstoredb` feature".into(),
            )),
        }
    }
}

impl std::fmt::Display for LogLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogLocation::Database => f.write_str("the database"),
            // Never print the connection string: it may hold credentials.
            LogLocation::EventStoreDb(_) => f.write_str("eventstoredb"),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Sqlite(path) => write!(f, "sqlite {}", path.display()),
            // Never print credentials that may be in the URL.
            Backend::Postgres(_) => f.write_str("postgres"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_goes_to_eventstoredb_only_when_asked_and_built_for() {
        assert_eq!(LogLocation::choose(None).unwrap(), LogLocation::Database);
        assert!(matches!(
            LogLocation::choose(Some("postgres://localhost/ledger")),
            Err(StoreError::Unsupported(_))
        ));
        let url = "esdb://admin:secret@node1:2113,node2:2113?tls=true";
        let chosen = LogLocation::choose(Some(url));
        if cfg!(feature = "eventstoredb") {
            let chosen = chosen.unwrap();
            assert_eq!(chosen, LogLocation::EventStoreDb(url.into()));
            assert!(
                !chosen.to_string().contains("secret"),
                "no credentials shown"
            );
            assert!(LogLocation::choose(Some("kurrentdb+discover://cluster:2113")).is_ok());
        } else {
            let error = chosen.unwrap_err().to_string();
            assert!(error.contains("`eventstoredb` feature"), "{error}");
            assert!(!error.contains("secret"));
        }
    }
}
