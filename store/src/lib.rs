//! The event store: an append-only log with per-stream optimistic concurrency,
//! idempotent appends, batched multi-stream appends, global reads and
//! catch-up subscriptions, on SQLite (embedded) and PostgreSQL.

pub mod chain;
pub mod codec;
pub mod error;
pub mod memory;
pub mod model;
pub mod plan;
pub mod port;
pub mod postgres;
mod rows;
pub use rows::metadata_text;
pub mod scratch;
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

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Sqlite(path) => write!(f, "sqlite {}", path.display()),
            // Never print credentials that may be in the URL.
            Backend::Postgres(_) => f.write_str("postgres"),
        }
    }
}
