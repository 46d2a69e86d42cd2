//! Throw-away PostgreSQL databases, created beside the one a URL names and
//! dropped afterwards: for benchmarks, drift checks and tests.

use crate::error::StoreError;
use sqlx::Connection as _;
use uuid::Uuid;

/// A fresh PostgreSQL database, dropped when this is dropped.
pub struct ScratchPostgres {
    /// Connection URL of the fresh database.
    pub url: String,
    name: String,
    admin_url: String,
}

impl ScratchPostgres {
    /// Creates an empty database named `{prefix}_{uuid}` next to `admin_url`'s.
    pub async fn create(
        admin_url: &str,
        prefix: &'static str,
    ) -> Result<ScratchPostgres, StoreError> {
        assert!(
            prefix.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
            "BUG: scratch prefix must be a plain identifier"
        );
        let name = format!("{prefix}_{}", Uuid::now_v7().simple());
        let options = crate::postgres::connect_options(admin_url)?;
        let mut admin = sqlx::PgConnection::connect_with(&options).await?;
        // The name is built above from a fixed prefix and hex digits only;
        // identifiers cannot be bound as parameters.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await?;
        Ok(ScratchPostgres {
            url: with_database(admin_url, &name),
            name,
            admin_url: admin_url.to_owned(),
        })
    }
}

impl Drop for ScratchPostgres {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop may run inside an async runtime; use a thread with its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut admin = sqlx::PgConnection::connect(&admin_url)
                    .await
                    .map_err(std::io::Error::other)?;
                let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                sqlx::query(sqlx::AssertSqlSafe(drop))
                    .execute(&mut admin)
                    .await
                    .map_err(std::io::Error::other)?;
                Ok::<(), std::io::Error>(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            tracing::warn!(database = %self.name, "could not drop scratch database");
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
