//! The Redis seckill baseline of `ledger bench purchases --redis-url`.
//!
//! What a seckill team deploys: one Lua script that checks the buyer has not
//! bought yet, checks the stock and decrements it, atomically inside Redis.
//! The concurrent buyers call it with `EVALSHA` over one multiplexed
//! connection (the `redis` crate's tokio connection, which pipelines the
//! calls of every task that shares it). Redis keeps the stock in memory:
//! nothing here is durable unless the server is configured so.
//!
//! Each of the `clients` concurrent callers buys for a sequence of distinct
//! buyers (a seckill sells one item per buyer), closed loop, until the stock
//! is gone or the time limit passes. After the sale each caller sends its
//! first buyer's purchase again (a retry after a lost answer), which the
//! script must refuse as a duplicate, and then `rejections_per_client`
//! purchases for new buyers, which it must refuse as sold out. The checks
//! read the stock and the set of buyers back from Redis.

use super::{Latency, histogram, record};
use hdrhistogram::Histogram;
use redis::aio::MultiplexedConnection;
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Barrier;

/// The check-and-decrement script. `KEYS[1]` is the stock (units left),
/// `KEYS[2]` the set of buyers who bought; `ARGV[1]` the buyer, `ARGV[2]`
/// the amount. Answers 1 sold, 0 sold out (not enough stock left), -1 this
/// buyer already bought.
pub const SECKILL_SCRIPT: &str = r"
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then
  return -1
end
local stock = tonumber(redis.call('GET', KEYS[1]) or '0')
local amount = tonumber(ARGV[2])
if stock < amount then
  return 0
end
redis.call('DECRBY', KEYS[1], amount)
redis.call('SADD', KEYS[2], ARGV[1])
return 1
";

/// How long the baseline's keys live in Redis if a run dies before it
/// deletes them.
const KEYS_TTL_SECONDS: u64 = 3_600;

/// How long to wait for Redis to accept the connection or answer a call.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

/// What to run: the same concurrency, stock and amount as the engine run.
#[derive(Debug, Clone)]
pub struct SeckillSetup {
    /// Concurrent callers sharing the one multiplexed connection.
    pub clients: u64,
    /// Units in stock at the start.
    pub quota: i64,
    /// Units per purchase.
    pub amount: i64,
    /// Most time the sale may take.
    pub seconds_limit: u64,
    /// Purchases for new buyers each caller sends after the sell-out.
    pub rejections_per_client: u64,
}

/// What one call of the script answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeckillAnswer {
    /// The stock was decremented for this buyer.
    Sold,
    /// Not enough stock left.
    SoldOut,
    /// This buyer already bought.
    Duplicate,
}

/// The Redis side's invariants, read back from Redis after the run.
#[derive(Debug, Clone, Serialize)]
pub struct SeckillChecks {
    /// Units left in Redis after the run.
    pub stock_left: i64,
    /// Buyers in Redis's set of buyers.
    pub buyers_in_set: u64,
    /// Units sold according to Redis (quota less the stock left).
    pub sold_units: i64,
    /// The stock never went below zero (what is left is not negative).
    pub stock_not_negative: bool,
    /// Sold out and exactly the quota sold (or not sold out and less).
    pub exactly_quota_sold: bool,
    /// Every sold answer is one distinct buyer in the set, and the units
    /// sold are exactly those buyers' purchases.
    pub sold_matches_buyers: bool,
    /// Every repeated purchase of a buyer who had bought was refused.
    pub no_buyer_twice: bool,
    /// All of the above.
    pub ok: bool,
}

/// The baseline's figures and checks.
#[derive(Debug, Clone, Serialize)]
pub struct SeckillReport {
    /// The script's SHA-1, as called with `EVALSHA`.
    pub script_sha1: String,
    /// How the client talks to Redis.
    pub client: &'static str,
    /// Concurrent callers.
    pub clients: u64,
    /// Purchases answered sold.
    pub confirmed_purchases: u64,
    /// Seconds from the start to the sell-out (or the time limit).
    pub sale_seconds: f64,
    /// Whether the stock ran out within the time limit.
    pub sold_out: bool,
    /// Sold answers per second during the sale.
    pub confirmed_per_second: f64,
    /// Latency of a sold answer.
    pub purchase_latency: Latency,
    /// Repeated purchases sent after the sale (one per caller that sold).
    pub duplicates_sent: u64,
    /// Those answered as duplicates.
    pub duplicates_refused: u64,
    /// Sold-out answers after the sell-out.
    pub rejections_after_sell_out: u64,
    /// Those per second.
    pub rejections_per_second: f64,
    /// What was read back from Redis.
    pub checks: SeckillChecks,
}

/// The keys of one run: fresh names, so runs never share state.
#[derive(Debug, Clone)]
pub struct SeckillKeys {
    /// Units left.
    pub stock: String,
    /// Buyers who bought.
    pub buyers: String,
}

impl SeckillKeys {
    /// Keys under a fresh prefix.
    pub fn fresh() -> SeckillKeys {
        let run = uuid::Uuid::now_v7();
        SeckillKeys {
            stock: format!("ledger-bench:{run}:stock"),
            buyers: format!("ledger-bench:{run}:buyers"),
        }
    }
}

/// One multiplexed connection and the loaded script.
#[derive(Clone)]
pub struct Seckill {
    connection: MultiplexedConnection,
    sha1: Arc<str>,
    keys: Arc<SeckillKeys>,
}

impl Seckill {
    /// Connects (one connection for every caller), loads the script with
    /// `SCRIPT LOAD` and stocks `quota` units under fresh keys.
    pub async fn connect(redis_url: &str, quota: i64) -> anyhow::Result<Seckill> {
        let client = redis::Client::open(redis_url)
            .map_err(|error| anyhow::anyhow!("--redis-url {redis_url:?} is not usable: {error}"))?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT));
        let mut connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|error| anyhow::anyhow!("cannot reach Redis at {redis_url}: {error}"))?;
        let sha1: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(SECKILL_SCRIPT)
            .query_async(&mut connection)
            .await?;
        let keys = SeckillKeys::fresh();
        let () = redis::cmd("SET")
            .arg(&keys.stock)
            .arg(quota)
            .arg("EX")
            .arg(KEYS_TTL_SECONDS)
            .query_async(&mut connection)
            .await?;
        Ok(Seckill {
            connection,
            sha1: sha1.into(),
            keys: Arc::new(keys),
        })
    }

    /// The script's SHA-1.
    pub fn sha1(&self) -> &str {
        &self.sha1
    }

    /// One purchase: `EVALSHA` of the script for `buyer`.
    pub async fn purchase(&mut self, buyer: &str, amount: i64) -> anyhow::Result<SeckillAnswer> {
        let answer: i64 = redis::cmd("EVALSHA")
            .arg(&*self.sha1)
            .arg(2)
            .arg(&self.keys.stock)
            .arg(&self.keys.buyers)
            .arg(buyer)
            .arg(amount)
            .query_async(&mut self.connection)
            .await?;
        match answer {
            1 => Ok(SeckillAnswer::Sold),
            0 => Ok(SeckillAnswer::SoldOut),
            -1 => Ok(SeckillAnswer::Duplicate),
            other => anyhow::bail!("the seckill script answered {other}, not 1, 0 or -1"),
        }
    }

    /// The stock left and the number of buyers in the set.
    pub async fn read_back(&mut self) -> anyhow::Result<(i64, u64)> {
        let stock: Option<i64> = redis::cmd("GET")
            .arg(&self.keys.stock)
            .query_async(&mut self.connection)
            .await?;
        let buyers: u64 = redis::cmd("SCARD")
            .arg(&self.keys.buyers)
            .query_async(&mut self.connection)
            .await?;
        let stock = stock.ok_or_else(|| anyhow::anyhow!("the stock key vanished from Redis"))?;
        Ok((stock, buyers))
    }

    /// Deletes the run's keys.
    pub async fn clean_up(&mut self) -> anyhow::Result<()> {
        let _: u64 = redis::cmd("DEL")
            .arg(&self.keys.stock)
            .arg(&self.keys.buyers)
            .query_async(&mut self.connection)
            .await?;
        Ok(())
    }
}

/// The sale's counts as the callers saw them, for the checks.
#[derive(Debug, Clone, Copy)]
pub struct SeckillCounts {
    /// Units at the start.
    pub quota: i64,
    /// Units per purchase.
    pub amount: i64,
    /// Sold answers.
    pub sold: u64,
    /// Whether a caller was answered sold out during the sale.
    pub sold_out: bool,
    /// Repeated purchases sent.
    pub duplicates_sent: u64,
    /// Those refused as duplicates.
    pub duplicates_refused: u64,
}

impl SeckillChecks {
    /// Compares what the callers were answered with what Redis holds.
    pub fn evaluate(counts: SeckillCounts, stock_left: i64, buyers_in_set: u64) -> SeckillChecks {
        let sold_units = counts.quota - stock_left;
        let stock_not_negative = stock_left >= 0;
        let exactly_quota_sold = if counts.sold_out {
            // Sold out means less than one purchase left, and the answers
            // account for every unit that left the stock.
            stock_left < counts.amount && stock_left == counts.quota % counts.amount
        } else {
            stock_left >= counts.amount
        };
        let sold_units_answered = i64::try_from(counts.sold)
            .ok()
            .and_then(|sold| sold.checked_mul(counts.amount));
        let sold_matches_buyers =
            buyers_in_set == counts.sold && sold_units_answered == Some(sold_units);
        let no_buyer_twice = counts.duplicates_refused == counts.duplicates_sent;
        SeckillChecks {
            stock_left,
            buyers_in_set,
            sold_units,
            stock_not_negative,
            exactly_quota_sold,
            sold_matches_buyers,
            no_buyer_twice,
            ok: stock_not_negative && exactly_quota_sold && sold_matches_buyers && no_buyer_twice,
        }
    }
}

/// What one caller saw.
struct CallerResult {
    sold: u64,
    latency: Histogram<u64>,
    sold_out_seen: bool,
    duplicates_sent: u64,
    duplicates_refused: u64,
    rejections: u64,
}

/// Runs the baseline and reads its checks back from Redis.
pub async fn run(redis_url: &str, setup: &SeckillSetup) -> anyhow::Result<SeckillReport> {
    anyhow::ensure!(setup.clients > 0, "the baseline needs at least one client");
    anyhow::ensure!(
        setup.amount > 0 && setup.amount <= setup.quota,
        "the amount must be positive and at most the quota"
    );
    let mut seckill = Seckill::connect(redis_url, setup.quota).await?;
    let outcome = run_sale(&seckill, setup).await;
    let read_back = seckill.read_back().await;
    seckill.clean_up().await?;
    let (results, sale_seconds, rejection_seconds) = outcome?;
    let (stock_left, buyers_in_set) = read_back?;
    let mut latency = histogram();
    let mut counts = SeckillCounts {
        quota: setup.quota,
        amount: setup.amount,
        sold: 0,
        sold_out: false,
        duplicates_sent: 0,
        duplicates_refused: 0,
    };
    let mut rejections = 0;
    for result in &results {
        counts.sold += result.sold;
        counts.sold_out |= result.sold_out_seen;
        counts.duplicates_sent += result.duplicates_sent;
        counts.duplicates_refused += result.duplicates_refused;
        rejections += result.rejections;
        latency.add(&result.latency)?;
    }
    let checks = SeckillChecks::evaluate(counts, stock_left, buyers_in_set);
    Ok(SeckillReport {
        script_sha1: seckill.sha1().to_owned(),
        client: "redis crate, one tokio multiplexed connection shared by every caller, EVALSHA",
        clients: setup.clients,
        confirmed_purchases: counts.sold,
        sale_seconds,
        sold_out: counts.sold_out,
        confirmed_per_second: counts.sold as f64 / sale_seconds.max(1e-9),
        purchase_latency: Latency::of(&latency),
        duplicates_sent: counts.duplicates_sent,
        duplicates_refused: counts.duplicates_refused,
        rejections_after_sell_out: rejections,
        rejections_per_second: rejections as f64 / rejection_seconds.max(1e-9),
        checks,
    })
}

/// The callers' sale, then their duplicates and refusals; returns each
/// caller's result, the sale's seconds and the refusals' seconds.
async fn run_sale(
    seckill: &Seckill,
    setup: &SeckillSetup,
) -> anyhow::Result<(Vec<CallerResult>, f64, f64)> {
    let deadline = Instant::now() + Duration::from_secs(setup.seconds_limit);
    let sold_out = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicBool::new(false));
    let sale_ended_at = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(usize::try_from(setup.clients)?));
    let started = Instant::now();
    let tasks: Vec<_> = (0..setup.clients)
        .map(|client| {
            let mut seckill = seckill.clone();
            let (sold_out, failed, ended, barrier) = (
                sold_out.clone(),
                failed.clone(),
                sale_ended_at.clone(),
                barrier.clone(),
            );
            let (amount, rejections) = (setup.amount, setup.rejections_per_client);
            tokio::spawn(async move {
                let mut result = CallerResult {
                    sold: 0,
                    latency: histogram(),
                    sold_out_seen: false,
                    duplicates_sent: 0,
                    duplicates_refused: 0,
                    rejections: 0,
                };
                let sale = sell(&mut seckill, client, amount, deadline, &sold_out, &failed)
                    .await
                    .map(|(sold, latency, seen)| {
                        result.sold = sold;
                        result.latency = latency;
                        result.sold_out_seen = seen;
                    });
                if sale.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                ended.fetch_max(
                    u64::try_from(started.elapsed().as_micros())?,
                    Ordering::Relaxed,
                );
                // Every caller reaches the barrier, even after an error, so
                // that one failure cannot leave the others waiting forever.
                barrier.wait().await;
                sale?;
                if sold_out.load(Ordering::Relaxed) {
                    after_sale(&mut seckill, client, amount, rejections, &mut result).await?;
                }
                anyhow::Ok(result)
            })
        })
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await??);
    }
    let sale_seconds = sale_ended_at.load(Ordering::Relaxed) as f64 / 1e6;
    let rejection_seconds = started.elapsed().as_secs_f64() - sale_seconds;
    Ok((results, sale_seconds, rejection_seconds))
}

fn buyer_name(client: u64, purchase: u64) -> String {
    format!("c{client}-b{purchase}")
}

/// One caller's sale: a new buyer per purchase until sold out, the deadline
/// or another caller's failure. Returns the sold answers, their latency and
/// whether this caller saw the sell-out.
async fn sell(
    seckill: &mut Seckill,
    client: u64,
    amount: i64,
    deadline: Instant,
    sold_out: &AtomicBool,
    failed: &AtomicBool,
) -> anyhow::Result<(u64, Histogram<u64>, bool)> {
    let mut latency = histogram();
    let mut sold = 0u64;
    let mut purchase = 0u64;
    while Instant::now() < deadline
        && !sold_out.load(Ordering::Relaxed)
        && !failed.load(Ordering::Relaxed)
    {
        let call = Instant::now();
        match seckill
            .purchase(&buyer_name(client, purchase), amount)
            .await?
        {
            SeckillAnswer::Sold => {
                record(&mut latency, call.elapsed());
                sold += 1;
            }
            SeckillAnswer::SoldOut => {
                sold_out.store(true, Ordering::Relaxed);
                return Ok((sold, latency, true));
            }
            SeckillAnswer::Duplicate => {
                anyhow::bail!("the script refused a buyer that never bought as a duplicate")
            }
        }
        purchase += 1;
    }
    Ok((sold, latency, false))
}

/// After the sell-out: the caller's first buyer again (must be a
/// duplicate), then new buyers (must be sold out).
async fn after_sale(
    seckill: &mut Seckill,
    client: u64,
    amount: i64,
    rejections: u64,
    result: &mut CallerResult,
) -> anyhow::Result<()> {
    if result.sold > 0 {
        result.duplicates_sent += 1;
        if seckill.purchase(&buyer_name(client, 0), amount).await? == SeckillAnswer::Duplicate {
            result.duplicates_refused += 1;
        }
    }
    for extra in 0..rejections {
        let buyer = format!("c{client}-after-{extra}");
        match seckill.purchase(&buyer, amount).await? {
            SeckillAnswer::SoldOut => result.rejections += 1,
            SeckillAnswer::Sold => anyhow::bail!("the script sold after the sell-out"),
            SeckillAnswer::Duplicate => anyhow::bail!("a new buyer was refused as a duplicate"),
        }
    }
    Ok(())
}
