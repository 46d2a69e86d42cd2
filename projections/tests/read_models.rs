//! Read models against real databases: the runner equals a rebuild, rebuilds
//! swap in under readers, crashes neither lose nor repeat events, several
//! runners share one database, and the drift check finds tampering.

mod support;

use projections::history::Shape;
use projections::runner::{BeforeCommit, Step, step};
use projections::{Projection, ProjectionError, Runner, RunnerOptions, catch_up, install, rebuild};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use support::{Harness, assert_clean};

const SHAPE: Shape = Shape {
    accounts: 200,
    products: 3,
    seed: 7,
};

async fn count(harness: &Harness, sql: &'static str) -> i64 {
    match &harness.db {
        projections::ReadDb::Sqlite { read, .. } => sqlx::query_scalar(sql).fetch_one(read).await,
        projections::ReadDb::Postgres { read, .. } => sqlx::query_scalar(sql).fetch_one(read).await,
    }
    .expect("the query runs")
}

/// Quota is never over- or under-booked in the read model.
async fn assert_quota_adds_up(harness: &Harness) {
    let broken = count(
        harness,
        "SELECT COUNT(*) FROM sale_progress WHERE confirmed + reserved + available <> quota \
         OR available < 0 OR reserved < 0",
    )
    .await;
    assert_eq!(
        broken, 0,
        "sale progress rows that do not add up to the quota"
    );
    let negative = count(
        harness,
        "SELECT COUNT(*) FROM account_balances WHERE available < 0 OR held < 0",
    )
    .await;
    assert_eq!(negative, 0, "negative balances");
}

async fn runner_catches_up_and_equals_a_rebuild(harness: Harness) {
    harness.generate(SHAPE, 6_000, 500).await;
    install(&harness.db).await.expect("install");
    let applied = catch_up(harness.store.as_ref(), &harness.db, &Projection::ALL, None)
        .await
        .expect("catch up");
    assert!(
        applied >= 4 * 6_000,
        "every projection saw every event: {applied}"
    );
    assert_quota_adds_up(&harness).await;
    let orders = count(&harness, "SELECT COUNT(*) FROM orders").await;
    let entries = count(&harness, "SELECT COUNT(*) FROM ledger_entries").await;
    let payouts = count(
        &harness,
        "SELECT COUNT(*) FROM payouts WHERE status = 'succeeded'",
    )
    .await;
    assert!(
        orders > 100 && entries > 100 && payouts > 10,
        "{orders} {entries} {payouts}"
    );
    let report = harness
        .drift("runner_catches_up_and_equals_a_rebuild")
        .await;
    assert_clean(&report);
    assert!(report.trial_balance.accounts_checked > 100);
    assert_eq!(
        report
            .tables
            .iter()
            .find(|t| t.table == "orders")
            .map(|t| t.rows_live),
        Some(orders as u64)
    );
}

async fn rebuild_swaps_in_while_readers_and_writers_go_on(harness: Harness) {
    let mut history = harness.generate(SHAPE, 3_000, 500).await;
    install(&harness.db).await.expect("install");
    let runner = Runner::start(
        harness.store.clone(),
        harness.db.clone(),
        RunnerOptions::default(),
    );
    let reading = Arc::new(AtomicUsize::new(0));
    let reader = {
        let db = harness.db.clone();
        let reading = reading.clone();
        tokio::spawn(async move {
            // Readers query the views throughout; none of them may fail.
            for _ in 0..400 {
                let sql = "SELECT COUNT(*) FROM account_balances";
                let counted: Result<i64, sqlx::Error> = match &db {
                    projections::ReadDb::Sqlite { read, .. } => {
                        sqlx::query_scalar(sql).fetch_one(read).await
                    }
                    projections::ReadDb::Postgres { read, .. } => {
                        sqlx::query_scalar(sql).fetch_one(read).await
                    }
                };
                counted.expect("readers keep getting answers during a rebuild");
                reading.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let rebuilt = {
        let store = harness.store.clone();
        let db = harness.db.clone();
        tokio::spawn(
            async move { rebuild(store, &db, &Projection::ALL, 700, &mut |_, _| {}).await },
        )
    };
    harness.extend(&mut history, 2_000, 200).await;
    let report = rebuilt
        .await
        .expect("no panic")
        .expect("the rebuild succeeds");
    assert!(report.events >= 3_000, "{report:?}");
    reader.await.expect("readers never failed");
    assert!(reading.load(Ordering::Relaxed) == 400);
    harness.extend(&mut history, 500, 100).await;
    runner.stop().await;
    catch_up(harness.store.as_ref(), &harness.db, &Projection::ALL, None)
        .await
        .expect("catch up");
    for projection in Projection::ALL {
        let checkpoint = harness
            .db
            .checkpoint(projection)
            .await
            .expect("read")
            .expect("installed");
        assert_eq!(checkpoint.generation, 2, "{projection} was swapped once");
        assert_eq!(
            checkpoint.position,
            harness.store.head().await.expect("head")
        );
    }
    assert_quota_adds_up(&harness).await;
    assert_clean(
        &harness
            .drift("rebuild_swaps_in_while_readers_and_writers_go_on")
            .await,
    );
}

async fn a_crash_before_commit_neither_loses_nor_repeats(harness: Harness) {
    let mut history = harness.generate(SHAPE, 2_000, 300).await;
    install(&harness.db).await.expect("install");
    // Every third commit fails after the rows and checkpoint were written in
    // the transaction: the whole batch must roll back.
    let commits = Arc::new(AtomicUsize::new(0));
    let fault: BeforeCommit = {
        let commits = commits.clone();
        Arc::new(move |projection, position| {
            if commits.fetch_add(1, Ordering::Relaxed) % 3 == 2 {
                return Err(ProjectionError::inconsistent(
                    position,
                    format!("injected crash in {projection}"),
                ));
            }
            Ok(())
        })
    };
    let mut failures = 0;
    for projection in Projection::ALL {
        for attempt in 0.. {
            assert!(attempt < 10_000, "{projection} never caught up");
            match step(
                harness.store.as_ref(),
                &harness.db,
                &[projection],
                137,
                None,
                Some(&fault),
            )
            .await
            {
                Ok(Step::Applied(_) | Step::Raced) => {}
                Ok(Step::Idle) => break,
                Err(_) => failures += 1,
            }
        }
    }
    assert!(failures > 10, "faults were injected: {failures}");
    harness.extend(&mut history, 1_000, 100).await;
    // A runner killed at random points (the task dropped mid-transaction).
    for round in 0..12u64 {
        let runner = Runner::start(
            harness.store.clone(),
            harness.db.clone(),
            RunnerOptions {
                batch: 50 + (round as usize * 37) % 200,
                before_commit: None,
            },
        );
        tokio::time::sleep(Duration::from_millis(3 + round * 7 % 23)).await;
        drop(runner);
        harness.extend(&mut history, 100, 50).await;
    }
    catch_up(harness.store.as_ref(), &harness.db, &Projection::ALL, None)
        .await
        .expect("catch up");
    assert_quota_adds_up(&harness).await;
    assert_clean(
        &harness
            .drift("a_crash_before_commit_neither_loses_nor_repeats")
            .await,
    );
}

async fn several_runners_on_one_database_apply_each_event_once(harness: Harness) {
    let mut history = harness.generate(SHAPE, 1_000, 200).await;
    install(&harness.db).await.expect("install");
    let runners: Vec<Runner> = (0..3)
        .map(|i| {
            Runner::start(
                harness.store.clone(),
                harness.db.clone(),
                RunnerOptions {
                    batch: 64 + i * 100,
                    before_commit: None,
                },
            )
        })
        .collect();
    harness.extend(&mut history, 3_000, 100).await;
    let head = harness.store.head().await.expect("head");
    for _ in 0..600 {
        let mut done = true;
        for projection in Projection::ALL {
            let checkpoint = harness
                .db
                .checkpoint(projection)
                .await
                .expect("read")
                .expect("installed");
            done &= checkpoint.position == head;
        }
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let statuses: Vec<_> = runners.iter().map(|r| r.statuses().report()).collect();
    for runner in runners {
        runner.stop().await;
    }
    for report in statuses.iter().flatten() {
        assert!(report.last_error.is_none(), "{report:?}");
    }
    let applied: u64 = statuses.iter().flatten().map(|r| r.applied).sum();
    assert_eq!(
        applied,
        4 * head as u64,
        "each event applied once per projection"
    );
    assert_clean(
        &harness
            .drift("several_runners_on_one_database_apply_each_event_once")
            .await,
    );
}

async fn drift_and_trial_balance_find_tampering(harness: Harness) {
    harness.generate(SHAPE, 1_500, 300).await;
    install(&harness.db).await.expect("install");
    catch_up(harness.store.as_ref(), &harness.db, &Projection::ALL, None)
        .await
        .expect("catch up");
    assert_clean(
        &harness
            .drift("drift_and_trial_balance_find_tampering")
            .await,
    );
    // Someone edits a balance and deletes a ledger entry behind the ledger's back.
    let edits = [
        "UPDATE account_balances_g1 SET available = available + 1 \
         WHERE account_id = (SELECT MIN(account_id) FROM account_balances_g1)",
        "DELETE FROM ledger_entries_g1 WHERE position = (SELECT MAX(position) FROM ledger_entries_g1)",
        "UPDATE sale_progress_g1 SET confirmed = confirmed + 5",
    ];
    for edit in edits {
        match &harness.db {
            projections::ReadDb::Sqlite { write, .. } => {
                sqlx::query(edit).execute(write).await.expect("edit");
            }
            projections::ReadDb::Postgres { write, .. } => {
                sqlx::query(edit).execute(write).await.expect("edit");
            }
        }
    }
    let report = harness
        .drift("drift_and_trial_balance_find_tampering")
        .await;
    assert!(!report.clean());
    let differing: Vec<&str> = report
        .tables
        .iter()
        .filter(|t| t.differences > 0)
        .map(|t| t.table)
        .collect();
    assert_eq!(
        differing,
        ["sale_progress", "account_balances", "ledger_entries"]
    );
    assert!(
        report.trial_balance.mismatches.len() >= 2,
        "{:?}",
        report.trial_balance.mismatches
    );
    assert_eq!(report.trial_balance.net, 0, "the log itself still balances");
}

async fn queries_page_and_explain_from_the_views(harness: Harness) {
    use projections::query;
    harness.generate(SHAPE, 4_000, 400).await;
    install(&harness.db).await.expect("install");
    catch_up(harness.store.as_ref(), &harness.db, &Projection::ALL, None)
        .await
        .expect("catch up");
    let products = query::all_progress(&harness.db).await.expect("progress");
    assert_eq!(products.len(), SHAPE.products);
    for progress in &products {
        assert_eq!(
            progress.confirmed + progress.reserved + progress.available,
            progress.quota
        );
        let one = query::progress(&harness.db, &progress.product_id)
            .await
            .expect("read");
        assert_eq!(one.as_ref(), Some(progress));
    }
    assert_eq!(
        query::progress(&harness.db, "no-such-product")
            .await
            .expect("read"),
        None
    );
    // The busiest account, paged through 7 entries at a time.
    let account_id: String = match &harness.db {
        projections::ReadDb::Sqlite { read, .. } => {
            sqlx::query_scalar(BUSIEST).fetch_one(read).await
        }
        projections::ReadDb::Postgres { read, .. } => {
            sqlx::query_scalar(BUSIEST).fetch_one(read).await
        }
    }
    .expect("an account with entries");
    let balance = query::balance(&harness.db, &account_id)
        .await
        .expect("read")
        .expect("exists");
    let (mut after, mut entries) = (0, Vec::new());
    loop {
        let page = query::ledger(&harness.db, &account_id, after, 7)
            .await
            .expect("page");
        assert!(page.entries.len() <= 7);
        entries.extend(page.entries);
        match page.next {
            Some(next) => after = next,
            None => break,
        }
    }
    assert!(entries.len() > 7, "several pages");
    assert!(
        entries.windows(2).all(|w| w[0].position < w[1].position),
        "oldest first, no repeats"
    );
    assert_eq!(
        entries.iter().map(|e| e.amount).sum::<i64>(),
        balance.available
    );
    assert_eq!(
        entries.last().map(|e| e.balance_after),
        Some(balance.available)
    );
    let mut running = 0;
    for entry in &entries {
        running += entry.amount;
        assert_eq!(entry.balance_after, running, "balance_after runs");
    }
    // An order's timeline is every event carrying its id, from both streams.
    let order_id = entries
        .iter()
        .find(|e| e.kind == "purchase")
        .and_then(|e| e.order_id.clone())
        .expect("the busiest account bought something");
    let order = query::order(&harness.db, &order_id)
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(order.account_id, account_id);
    let timeline = query::timeline(&harness.db, harness.store.as_ref(), &order_id)
        .await
        .expect("timeline");
    let types: Vec<&str> = timeline.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types.first(), Some(&"quota_reserved"), "{types:?}");
    assert!(types.contains(&"purchase_debited"), "{types:?}");
    for event in &timeline {
        assert_eq!(
            event.metadata.correlation_id.map(|id| id.to_string()),
            Some(order_id.clone())
        );
    }
    let paid = query::payouts(&harness.db, None, Some("succeeded"))
        .await
        .expect("payouts");
    assert!(
        !paid.is_empty()
            && paid
                .iter()
                .all(|p| p.status == "succeeded" && p.provider_ref.is_some())
    );
    let product = &paid[0].product_id;
    let of_product = query::payouts(&harness.db, Some(product), None)
        .await
        .expect("payouts");
    assert!(of_product.iter().all(|p| &p.product_id == product));
    assert!(
        query::payouts(&harness.db, Some("no-such-product"), None)
            .await
            .expect("payouts")
            .is_empty()
    );
}

async fn a_second_rebuild_waits_for_the_first_lease(harness: Harness) {
    harness.generate(SHAPE, 800, 200).await;
    install(&harness.db).await.expect("install");
    let mut tx = harness.db.begin().await.expect("begin");
    tx.claim_rebuild(&[Projection::Orders], "another terminal")
        .await
        .expect("claim");
    tx.commit().await.expect("commit");
    let refused = rebuild(
        harness.store.clone(),
        &harness.db,
        &Projection::ALL,
        300,
        &mut |_, _| {},
    )
    .await;
    match refused {
        Err(ProjectionError::RebuildRunning {
            projection, owner, ..
        }) => {
            assert_eq!((projection, owner.as_str()), ("orders", "another terminal"));
        }
        other => panic!("expected RebuildRunning, got {other:?}"),
    }
    // Nothing changed: the live generation is still the first, and the
    // refused rebuild released what it had claimed.
    let checkpoint = harness
        .db
        .checkpoint(Projection::Accounts)
        .await
        .expect("read")
        .expect("installed");
    assert_eq!(checkpoint.generation, 1);
    rebuild(
        harness.store.clone(),
        &harness.db,
        &[Projection::Accounts],
        300,
        &mut |_, _| {},
    )
    .await
    .expect("accounts were not leased");
    // A lease whose holder died expires and is taken over.
    let expire = "UPDATE projection_rebuilds SET expires_at = '2000-01-01T00:00:00.000000Z'";
    match &harness.db {
        projections::ReadDb::Sqlite { write, .. } => {
            sqlx::query(expire).execute(write).await.expect("expire");
        }
        projections::ReadDb::Postgres { write, .. } => {
            sqlx::query(expire).execute(write).await.expect("expire");
        }
    }
    let report = rebuild(
        harness.store.clone(),
        &harness.db,
        &Projection::ALL,
        300,
        &mut |_, _| {},
    )
    .await
    .expect("the expired lease is taken over");
    assert_eq!(report.projections.len(), 4);
    assert_clean(
        &harness
            .drift("a_second_rebuild_waits_for_the_first_lease")
            .await,
    );
}

async fn table_shapes_of_other_builds_are_left_alone(harness: Harness) {
    harness.generate(SHAPE, 500, 100).await;
    install(&harness.db).await.expect("install");
    let set_shape = |shape: i64| {
        let db = harness.db.clone();
        async move {
            let sql = "UPDATE projection_checkpoints SET schema_version = $1 WHERE projection = 'payouts'";
            match &db {
                projections::ReadDb::Sqlite { write, .. } => {
                    sqlx::query(sql)
                        .bind(shape)
                        .execute(write)
                        .await
                        .expect("update");
                }
                projections::ReadDb::Postgres { write, .. } => {
                    sqlx::query(sql)
                        .bind(shape)
                        .execute(write)
                        .await
                        .expect("update");
                }
            }
        }
    };
    // Built by an older build: reported stale, and not folded by this one.
    set_shape(0).await;
    assert_eq!(
        install(&harness.db).await.expect("install"),
        vec![Projection::Payouts]
    );
    catch_up(harness.store.as_ref(), &harness.db, &Projection::ALL, None)
        .await
        .expect("catch up");
    let payouts = harness
        .db
        .checkpoint(Projection::Payouts)
        .await
        .expect("read")
        .expect("installed");
    let orders = harness
        .db
        .checkpoint(Projection::Orders)
        .await
        .expect("read")
        .expect("installed");
    assert_eq!((payouts.position, orders.position > 0), (0, true));
    // Built by a newer build: this one refuses to start.
    set_shape(99).await;
    match install(&harness.db).await {
        Err(ProjectionError::SchemaNewer {
            projection, stored, ..
        }) => {
            assert_eq!((projection, stored), ("payouts", 99));
        }
        other => panic!("expected SchemaNewer, got {other:?}"),
    }
}

const BUSIEST: &str = "SELECT account_id FROM ledger_entries GROUP BY account_id \
                       ORDER BY COUNT(*) DESC, account_id LIMIT 1";

on_both_backends!(
    queries_page_and_explain_from_the_views,
    a_second_rebuild_waits_for_the_first_lease,
    table_shapes_of_other_builds_are_left_alone,
    runner_catches_up_and_equals_a_rebuild,
    rebuild_swaps_in_while_readers_and_writers_go_on,
    a_crash_before_commit_neither_loses_nor_repeats,
    several_runners_on_one_database_apply_each_event_once,
    drift_and_trial_balance_find_tampering,
);
