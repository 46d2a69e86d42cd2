//! Shared set-up: a log and read models on one fresh database per test, on
//! SQLite or PostgreSQL, plus scratch databases for drift checks.

#![allow(dead_code)]

use projections::ReadDb;
use projections::drift::DriftReport;
use projections::history::{History, Shape};
use std::sync::Arc;
use store::EventStore;
use store::testing::{TestPostgres, TestSqlite};

/// A log and its read models on one database.
pub struct Harness {
    pub store: Arc<dyn EventStore>,
    pub db: ReadDb,
    pub backend: &'static str,
    sqlite: Option<TestSqlite>,
    postgres: Option<TestPostgres>,
}

impl Harness {
    pub async fn sqlite(_test: &str) -> Option<Harness> {
        let sqlite = TestSqlite::create().await.expect("a fresh SQLite file");
        let db = ReadDb::open_sqlite(&sqlite.path)
            .await
            .expect("read models open");
        Some(Harness {
            store: Arc::new(sqlite.store.clone()),
            db,
            backend: "sqlite",
            sqlite: Some(sqlite),
            postgres: None,
        })
    }

    pub async fn postgres(test: &str) -> Option<Harness> {
        let postgres = TestPostgres::create(test).await?;
        let store = postgres.store().await;
        let db = ReadDb::open_postgres(&postgres.url)
            .await
            .expect("read models open");
        Some(Harness {
            store: Arc::new(store),
            db,
            backend: "postgres",
            sqlite: None,
            postgres: Some(postgres),
        })
    }

    /// An empty database of the same kind, for a rebuild to compare against.
    pub async fn scratch(&self, test: &str) -> Scratch {
        match self.backend {
            "sqlite" => {
                let sqlite = TestSqlite::create().await.expect("a fresh SQLite file");
                let db = ReadDb::open_sqlite(&sqlite.path)
                    .await
                    .expect("scratch opens");
                Scratch {
                    db,
                    _sqlite: Some(sqlite),
                    _postgres: None,
                }
            }
            _ => {
                let postgres = TestPostgres::create(test)
                    .await
                    .expect("PostgreSQL was reachable");
                let db = ReadDb::open_postgres(&postgres.url)
                    .await
                    .expect("scratch opens");
                Scratch {
                    db,
                    _sqlite: None,
                    _postgres: Some(postgres),
                }
            }
        }
    }

    /// Appends a generated history of about `events` events in batches.
    pub async fn generate(&self, shape: Shape, events: usize, batch: usize) -> History {
        let mut history = History::new(shape);
        self.extend(&mut history, events, batch).await;
        history
    }

    /// Appends more of an existing history.
    pub async fn extend(&self, history: &mut History, events: usize, batch: usize) {
        let mut written = 0;
        while written < events {
            let appends = history.next_batch(batch);
            written += appends.iter().map(|a| a.events.len()).sum::<usize>();
            self.store
                .append_batch(appends)
                .await
                .expect("generated appends succeed");
        }
    }

    /// Runs the drift check against a fresh scratch database.
    pub async fn drift(&self, test: &str) -> DriftReport {
        let scratch = self.scratch(test).await;
        projections::check_drift(self.store.clone(), &self.db, &scratch.db, &mut |_, _| {})
            .await
            .expect("the drift check runs")
    }
}

/// A scratch database, dropped with this.
pub struct Scratch {
    pub db: ReadDb,
    _sqlite: Option<TestSqlite>,
    _postgres: Option<TestPostgres>,
}

/// Asserts a drift report is clean, printing it otherwise.
pub fn assert_clean(report: &DriftReport) {
    assert!(
        report.clean(),
        "drift found: {}",
        serde_json::to_string_pretty(report).expect("reports serialize")
    );
}

/// Runs each test on SQLite and on PostgreSQL (skipped without `DATABASE_URL`).
#[macro_export]
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    if let Some(harness) = super::support::Harness::sqlite(stringify!($test)).await {
                        super::$test(harness).await;
                    }
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    if let Some(harness) = super::support::Harness::postgres(stringify!($test)).await {
                        super::$test(harness).await;
                    }
                }
            )*
        }
    };
}
