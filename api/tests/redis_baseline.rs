//! The Redis seckill baseline of `ledger bench purchases --redis-url`: the
//! script sells exactly the stock, once per buyer, and the checks catch a
//! script or a count that does not. The tests that need Redis use
//! `REDIS_URL` (default `redis://127.0.0.1:6379`) and print why they are
//! skipped when it cannot be reached; CI needs no Redis.

use api::bench::redis_seckill::{
    self, Seckill, SeckillAnswer, SeckillChecks, SeckillCounts, SeckillSetup,
};

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A connection with `quota` units stocked, or `None` (printed) without Redis.
async fn seckill_or_skip(test: &str, quota: i64) -> Option<Seckill> {
    let url = redis_url();
    match Seckill::connect(&url, quota).await {
        Ok(seckill) => Some(seckill),
        Err(error) => {
            eprintln!("skipped {test}: Redis is unreachable at {url}: {error}");
            None
        }
    }
}

#[tokio::test]
async fn the_script_sells_once_per_buyer_and_never_past_the_stock() {
    let Some(mut seckill) = seckill_or_skip("the_script_sells_once_per_buyer", 250).await else {
        return;
    };
    let answers = [
        seckill.purchase("alice", 100).await,
        seckill.purchase("alice", 100).await,
        seckill.purchase("bob", 100).await,
        seckill.purchase("carol", 100).await,
        seckill.purchase("bob", 100).await,
    ];
    let read_back = seckill.read_back().await;
    seckill.clean_up().await.expect("delete the test's keys");
    let answers: Vec<SeckillAnswer> = answers
        .into_iter()
        .map(|answer| answer.expect("a script call"))
        .collect();
    assert_eq!(
        answers,
        [
            SeckillAnswer::Sold,
            SeckillAnswer::Duplicate,
            SeckillAnswer::Sold,
            SeckillAnswer::SoldOut,
            SeckillAnswer::Duplicate,
        ]
    );
    assert_eq!(read_back.expect("read back"), (50, 2));
}

async fn run_or_skip(test: &str, setup: &SeckillSetup) -> Option<redis_seckill::SeckillReport> {
    // Probe first, so that an unreachable Redis skips and any other error fails.
    let mut probe = seckill_or_skip(test, 0).await?;
    probe.clean_up().await.expect("delete the probe's keys");
    Some(
        redis_seckill::run(&redis_url(), setup)
            .await
            .expect("the baseline runs"),
    )
}

#[tokio::test]
async fn concurrent_callers_on_one_connection_sell_exactly_the_quota() {
    let setup = SeckillSetup {
        clients: 200,
        quota: 100_000,
        amount: 100,
        seconds_limit: 60,
        rejections_per_client: 3,
    };
    let Some(report) = run_or_skip("concurrent_callers_sell_exactly_the_quota", &setup).await
    else {
        return;
    };
    let checks = &report.checks;
    assert!(checks.ok, "{checks:?}");
    assert!(report.sold_out);
    assert_eq!(report.confirmed_purchases, 1_000);
    assert_eq!(checks.stock_left, 0);
    assert_eq!(checks.sold_units, 100_000);
    assert_eq!(checks.buyers_in_set, 1_000);
    // Every caller that sold repeated its first buyer, and each was refused.
    assert!(report.duplicates_sent > 0 && report.duplicates_sent <= 200);
    assert_eq!(report.duplicates_refused, report.duplicates_sent);
    assert_eq!(report.rejections_after_sell_out, 600);
    assert!(report.purchase_latency.p50_ms > 0.0);
}

#[tokio::test]
async fn a_quota_that_is_not_a_multiple_of_the_amount_keeps_its_remainder() {
    let setup = SeckillSetup {
        clients: 16,
        quota: 1_050,
        amount: 100,
        seconds_limit: 60,
        rejections_per_client: 1,
    };
    let Some(report) = run_or_skip("a_quota_that_is_not_a_multiple", &setup).await else {
        return;
    };
    assert!(report.checks.ok, "{:?}", report.checks);
    assert_eq!(report.confirmed_purchases, 10);
    assert_eq!(report.checks.stock_left, 50);
}

fn counts() -> SeckillCounts {
    SeckillCounts {
        quota: 1_000,
        amount: 100,
        sold: 10,
        sold_out: true,
        duplicates_sent: 4,
        duplicates_refused: 4,
    }
}

#[test]
fn the_checks_catch_an_oversell_a_double_sale_and_a_lost_unit() {
    let check = |counts: SeckillCounts, stock_left: i64, buyers: u64| {
        let checks = SeckillChecks::evaluate(counts, stock_left, buyers);
        (
            checks.stock_not_negative,
            checks.exactly_quota_sold,
            checks.sold_matches_buyers,
            checks.no_buyer_twice,
            checks.ok,
        )
    };
    // What a correct script leaves.
    assert_eq!(check(counts(), 0, 10), (true, true, true, true, true));
    // A script without a stock check sold an eleventh purchase.
    let oversold = SeckillCounts {
        sold: 11,
        ..counts()
    };
    assert_eq!(check(oversold, -100, 11), (false, false, true, true, false));
    // A script without the dedupe sold one buyer twice: ten answers, nine
    // buyers, and a repeat that was sold again.
    let twice = SeckillCounts {
        duplicates_refused: 3,
        ..counts()
    };
    assert_eq!(check(twice, 0, 9), (true, true, false, false, false));
    // The stock moved by more than the answers account for.
    let lost = SeckillCounts {
        sold: 9,
        ..counts()
    };
    assert_eq!(check(lost, 0, 9), (true, true, false, true, false));
    // Not sold out, yet less than one purchase left.
    let stalled = SeckillCounts {
        sold_out: false,
        sold: 10,
        ..counts()
    };
    assert!(!check(stalled, 0, 10).1);
}
