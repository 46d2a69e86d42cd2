//! Properties over random histories: read models built incrementally (in
//! random batch sizes, interleaved with appends) equal a full rebuild, agree
//! with the deciders' own states, and pass the trial balance.
//!
//! Case counts: 48 random histories on SQLite and 16 on PostgreSQL by
//! default, twice as many as before (what CI runs: one to two minutes on
//! two cores); the long mode
//! `LEDGER_PROJECTION_CASES=N` runs N on each backend.

mod support;

use projections::history::{History, Shape};
use projections::runner::step;
use projections::{Projection, ReadDb, catch_up, install};
use proptest::prelude::*;
use support::{Harness, assert_clean};

#[derive(Debug, Clone)]
struct Case {
    shape: Shape,
    events: usize,
    append_batch: usize,
    step_limits: Vec<usize>,
}

fn cases() -> impl Strategy<Value = Case> {
    (
        any::<u64>(),
        2usize..60,
        1usize..5,
        50usize..1_500,
        1usize..200,
        prop::collection::vec(1usize..400, 1..12),
    )
        .prop_map(
            |(seed, accounts, products, events, append_batch, step_limits)| Case {
                shape: Shape {
                    accounts,
                    products,
                    seed,
                },
                events,
                append_batch,
                step_limits,
            },
        )
}

type SaleTuple = (String, i64, i64, i64, i64, i64, String);
type AccountTuple = (String, i64, i64, i64, i64, i64, i64);

const SALES: &str = "SELECT product_id, quota, confirmed, reserved, available, orders, status \
                     FROM sale_progress ORDER BY product_id";
const ACCOUNTS: &str = "SELECT account_id, available, held, total_deposited, total_invested, \
                        total_paid_out, total_withdrawn FROM account_balances ORDER BY account_id";

async fn stored(db: &ReadDb) -> (Vec<SaleTuple>, Vec<AccountTuple>) {
    let result = match db {
        ReadDb::Sqlite { read, .. } => {
            let sales = sqlx::query_as(SALES).fetch_all(read).await;
            let accounts = sqlx::query_as(ACCOUNTS).fetch_all(read).await;
            (sales, accounts)
        }
        ReadDb::Postgres { read, .. } => {
            let sales = sqlx::query_as(SALES).fetch_all(read).await;
            let accounts = sqlx::query_as(ACCOUNTS).fetch_all(read).await;
            (sales, accounts)
        }
    };
    (
        result.0.expect("sales read"),
        result.1.expect("accounts read"),
    )
}

fn expected(history: &History) -> (Vec<SaleTuple>, Vec<AccountTuple>) {
    let mut sales: Vec<SaleTuple> = history
        .expected_sales()
        .into_iter()
        .map(|s| {
            (
                s.product_id,
                s.quota,
                s.confirmed,
                s.reserved,
                s.available,
                s.orders,
                s.status,
            )
        })
        .collect();
    sales.sort();
    let mut accounts: Vec<AccountTuple> = history
        .expected_accounts()
        .into_iter()
        .map(|a| {
            (
                a.account_id,
                a.available,
                a.held,
                a.total_deposited,
                a.total_invested,
                a.total_paid_out,
                a.total_withdrawn,
            )
        })
        .collect();
    accounts.sort();
    (sales, accounts)
}

async fn incremental_equals_rebuild(harness: Harness, case: Case) {
    install(&harness.db).await.expect("install");
    let mut history = History::new(case.shape);
    let (mut written, mut turn) = (0, 0);
    while written < case.events {
        let appends = history.next_batch(case.append_batch);
        written += appends.iter().map(|a| a.events.len()).sum::<usize>();
        harness.store.append_batch(appends).await.expect("append");
        // Each projection takes one step of a random size between appends,
        // so batches end anywhere, also between an order's events, and the
        // projections drift apart; the final catch-up steps them together.
        for projection in Projection::ALL {
            let limit = case.step_limits[turn % case.step_limits.len()];
            turn += 1;
            let one = std::slice::from_ref(&projection);
            step(harness.store.as_ref(), &harness.db, one, limit, None, None)
                .await
                .expect("step");
        }
    }
    catch_up(harness.store.as_ref(), &harness.db, &Projection::ALL, None)
        .await
        .expect("catch up");
    assert_eq!(
        stored(&harness.db).await,
        expected(&history),
        "read models agree with the deciders"
    );
    assert_clean(&harness.drift("incremental_equals_rebuild").await);
}

fn run(backend: &'static str, case: Case) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let harness = match backend {
            "sqlite" => Harness::sqlite("incremental_equals_rebuild").await,
            _ => Harness::postgres("incremental_equals_rebuild").await,
        };
        if let Some(harness) = harness {
            incremental_equals_rebuild(harness, case).await;
        }
    });
}

/// Random histories per backend: `LEDGER_PROJECTION_CASES`, else `default`.
fn case_count(default: u32) -> u32 {
    std::env::var("LEDGER_PROJECTION_CASES")
        .ok()
        .map(|cases| cases.parse().expect("LEDGER_PROJECTION_CASES is a number"))
        .unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: case_count(48), ..ProptestConfig::default() })]

    #[test]
    fn sqlite_incremental_equals_rebuild(case in cases()) {
        run("sqlite", case);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: case_count(16), ..ProptestConfig::default() })]

    #[test]
    fn postgres_incremental_equals_rebuild(case in cases()) {
        run("postgres", case);
    }
}
