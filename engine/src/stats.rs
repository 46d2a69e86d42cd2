//! Counters of what the engine did, for metrics, benchmarks and tests.

use std::sync::atomic::{AtomicU64, Ordering};

/// Monotonic counters, shared by an engine's writers and account book.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Product appends committed.
    pub product_appends: AtomicU64,
    /// Product appends refused for a stale version (another process wrote).
    pub product_conflicts: AtomicU64,
    /// Account streams refused for a stale version within batched appends.
    pub account_conflicts: AtomicU64,
    /// Appends that failed for another reason (store down, rolled back).
    pub append_failures: AtomicU64,
    /// Purchases answered as confirmed for the first time.
    pub purchases_confirmed: AtomicU64,
    /// Purchases refused or released.
    pub purchases_refused: AtomicU64,
    /// Purchases answered `SoldOut` from memory without touching the store.
    pub sold_out_from_memory: AtomicU64,
    /// Payments refunded because their reservation ended released.
    pub refunds: AtomicU64,
    /// Payouts this process's workers parked (for an operator).
    pub payouts_parked: AtomicU64,
    /// Products whose writer the recovery sweep started (expired
    /// reservations or refunds owed, with no traffic to start it).
    pub recoveries_started: AtomicU64,
    /// Product leases this node was granted (a writer starting, or taking
    /// over a lapsed lease).
    pub leases_claimed: AtomicU64,
    /// Claims that found the product's lease held by another node.
    pub owner_found_elsewhere: AtomicU64,
    /// Writers that stopped because another node took their lease.
    pub leases_lost: AtomicU64,
}

/// A plain copy of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    /// See [`EngineStats::product_appends`].
    pub product_appends: u64,
    /// See [`EngineStats::product_conflicts`].
    pub product_conflicts: u64,
    /// See [`EngineStats::account_conflicts`].
    pub account_conflicts: u64,
    /// See [`EngineStats::append_failures`].
    pub append_failures: u64,
    /// See [`EngineStats::purchases_confirmed`].
    pub purchases_confirmed: u64,
    /// See [`EngineStats::purchases_refused`].
    pub purchases_refused: u64,
    /// See [`EngineStats::sold_out_from_memory`].
    pub sold_out_from_memory: u64,
    /// See [`EngineStats::refunds`].
    pub refunds: u64,
    /// See [`EngineStats::payouts_parked`].
    pub payouts_parked: u64,
    /// See [`EngineStats::recoveries_started`].
    pub recoveries_started: u64,
    /// See [`EngineStats::leases_claimed`].
    pub leases_claimed: u64,
    /// See [`EngineStats::owner_found_elsewhere`].
    pub owner_found_elsewhere: u64,
    /// See [`EngineStats::leases_lost`].
    pub leases_lost: u64,
}

impl EngineStats {
    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        StatsSnapshot {
            product_appends: read(&self.product_appends),
            product_conflicts: read(&self.product_conflicts),
            account_conflicts: read(&self.account_conflicts),
            append_failures: read(&self.append_failures),
            purchases_confirmed: read(&self.purchases_confirmed),
            purchases_refused: read(&self.purchases_refused),
            sold_out_from_memory: read(&self.sold_out_from_memory),
            refunds: read(&self.refunds),
            payouts_parked: read(&self.payouts_parked),
            recoveries_started: read(&self.recoveries_started),
            leases_claimed: read(&self.leases_claimed),
            owner_found_elsewhere: read(&self.owner_found_elsewhere),
            leases_lost: read(&self.leases_lost),
        }
    }
}
