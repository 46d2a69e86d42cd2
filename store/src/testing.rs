//! Throw-away databases for tests: a SQLite file in a temporary folder, or a
//! fresh PostgreSQL database created next to the one `DATABASE_URL` names and
//! dropped afterwards. Without `DATABASE_URL`, PostgreSQL tests are skipped
//! and say so on standard error.

use crate::error::StoreError;
use crate::postgres::PostgresEventStore;
use crate::sqlite::SqliteEventStore;
use sqlx::Connection as _;
use std::io::Write;
use std::path::PathBuf;
use uuid::Uuid;

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

/// A fresh PostgreSQL database, dropped when this is dropped.
pub struct TestPostgres {
    /// Connection URL of the fresh database.
    pub url: String,
    name: String,
    admin_url: String,
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
        let name = format!("ledger_test_{}", Uuid::now_v7().simple());
        let mut admin =
            sqlx::PgConnection::connect_with(&crate::postgres::connect_options(&admin_url).ok()?)
                .await
                .expect("DATABASE_URL is set but PostgreSQL is not reachable");
        // The name is generated above from hex digits only; identifiers cannot be bound.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("CREATE DATABASE");
        let url = with_database(&admin_url, &name);
        Some(TestPostgres {
            url,
            name,
            admin_url,
        })
    }

    /// Opens the event store on the fresh database.
    pub async fn store(&self) -> PostgresEventStore {
        PostgresEventStore::open(&self.url)
            .await
            .expect("open the test database")
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs inside the test's runtime; use a thread with its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                use sqlx::Connection;
                let mut admin = sqlx::PgConnection::connect(&admin_url)
                    .await
                    .map_err(std::io::Error::other)?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut admin)
                .await
                .map_err(std::io::Error::other)?;
                Ok::<(), std::io::Error>(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            let _ = writeln!(
                std::io::stderr(),
                "could not drop test database {}",
                self.name
            );
        }
    }
}

/// The same URL with another database name.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut out = format!("{}/{}", &base[..path_start], database);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_names_are_swapped_in_urls() {
        assert_eq!(
            with_database("postgres://u@h:5432/test", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@h/test?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h", "x"), "postgres://u@h/x");
    }
}
