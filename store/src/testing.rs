//! Throw-away databases for tests: a SQLite file in a temporary folder, or a
//! fresh PostgreSQL database next to the one `DATABASE_URL` names. Without
//! `DATABASE_URL`, PostgreSQL tests are skipped and say so on standard error.

use crate::error::StoreError;
use crate::postgres::PostgresEventStore;
use crate::scratch::ScratchPostgres;
use crate::sqlite::SqliteEventStore;
use std::io::Write;
use std::path::PathBuf;

/// A SQLite event store in its own temporary folder (removed on drop).
pub struct TestSqlite {
    /// The store.
    pub store: SqliteEventStore,
    /// The database file.
    pub path: PathBuf,
    _folder: tempfile::TempDir,
}

impl TestSqlite {
    /// Creates and migrates a fresh file.
    pub async fn create() -> Result<TestSqlite, StoreError> {
        let folder = tempfile::tempdir().expect("a temporary folder");
        let path = folder.path().join("ledger.db");
        let store = SqliteEventStore::open(&path).await?;
        Ok(TestSqlite {
            store,
            path,
            _folder: folder,
        })
    }
}

/// A fresh PostgreSQL database for one test, dropped afterwards.
pub struct TestPostgres {
    /// Connection URL of the fresh database.
    pub url: String,
    _scratch: ScratchPostgres,
}

impl TestPostgres {
    /// Creates a fresh database, or `None` (with a note on standard error) when
    /// `DATABASE_URL` is not set.
    pub async fn create(test: &str) -> Option<TestPostgres> {
        let Ok(admin_url) = std::env::var("DATABASE_URL") else {
            // Written to the real standard error so it shows even when the
            // test harness captures output.
            let _ = writeln!(
                std::io::stderr(),
                "skipped {test}: DATABASE_URL is not set, PostgreSQL not tested"
            );
            return None;
        };
        let scratch = ScratchPostgres::create(&admin_url, "ledger_test")
            .await
            .expect("DATABASE_URL is set, so PostgreSQL must be reachable");
        Some(TestPostgres {
            url: scratch.url.clone(),
            _scratch: scratch,
        })
    }

    /// Opens the event store on the fresh database.
    pub async fn store(&self) -> PostgresEventStore {
        PostgresEventStore::open(&self.url)
            .await
            .expect("open the test database")
    }
}

/// The EventStoreDB server tests run against: `EVENTSTOREDB_URL`, or `None`
/// (with a note on standard error) when it is not set. An EventStoreDB
/// database cannot be dropped, so tests use streams of their own, and the
/// server should be one kept for tests.
#[cfg(feature = "eventstoredb")]
pub fn eventstoredb_url(test: &str) -> Option<String> {
    match std::env::var("EVENTSTOREDB_URL") {
        Ok(url) => Some(url),
        Err(_) => {
            let _ = writeln!(
                std::io::stderr(),
                "skipped {test}: EVENTSTOREDB_URL is not set, EventStoreDB not tested"
            );
            None
        }
    }
}
