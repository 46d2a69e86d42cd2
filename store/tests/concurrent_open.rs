//! Processes opening one fresh SQLite file at the same moment (a `serve`
//! and a `projections run`, say) each migrate it: every one must succeed,
//! and the schema must come out whole.

use store::sqlite::{MIGRATOR, SqliteEventStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_opens_of_a_fresh_file_all_migrate_it() {
    for round in 0..5 {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("ledger.db");
        let opens: Vec<_> = (0..8)
            .map(|_| {
                let path = path.clone();
                tokio::spawn(async move { SqliteEventStore::open(&path).await.map(|_| ()) })
            })
            .collect();
        for open in opens {
            open.await
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
        let store = SqliteEventStore::open(&path).await.unwrap();
        let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations")
            .fetch_one(store.read_pool())
            .await
            .unwrap();
        assert_eq!(applied as usize, MIGRATOR.iter().count());
    }
}
