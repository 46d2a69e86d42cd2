//! Recovery without traffic: a product's writer repairs what a crash left
//! (pending reservations, money taken for released orders) when it loads,
//! but a writer starts only when a request touches its product. The sweep
//! follows the log, keeps every order still in flight, and starts the writer
//! of any product with a reservation pending past a grace period (its
//! payment was taken and not confirmed, or it is past its expiry) or a
//! refund owed, whichever node was selling it.
//!
//! It also follows payout runs: a run planned in a product stream
//! (`payout_run_planned`, which says how many payouts it makes) whose
//! payouts have not all been created a grace period later (the scheduler
//! crashed or its append failed between the plan and the payouts) is
//! completed with `payouts::complete_run`, so holders are not left owed
//! money nobody will pay until an operator repeats the request.
//!
//! Several nodes may sweep at once: the writers they start are fenced by the
//! product stream's expected version, recovery is idempotent per order, and
//! payouts are created with "no stream" expected under ids the run fixes.

use crate::engine::Engine;
use chrono::{DateTime, Utc};
use domain::account::AccountEvent;
use domain::payout::PayoutEvent;
use domain::product::ProductEvent;
use domain::{AccountId, OrderId, ProductId};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use store::{EventStore, RecordedEvent, StoreError, codec};

/// How long an order may stay pending, or a refund owed, before the sweep
/// starts its product's writer. A live writer settles an order within one
/// turn (milliseconds) and sweeps its own expired reservations every second,
/// so only orders nobody is working on wait this long.
pub const RECOVERY_GRACE: chrono::Duration = chrono::Duration::seconds(3);
/// Events read per page while following the log.
const RECOVERY_PAGE: usize = 5_000;

/// Where an order in flight stands, as far as the log says.
#[derive(Debug, Clone)]
struct InFlight {
    product_id: ProductId,
    /// When the reservation was recorded (or the stray debit, for an
    /// order released before it was paid).
    since: DateTime<Utc>,
    /// When the reservation lapses.
    expires_at: Option<DateTime<Utc>>,
    debited: bool,
    released: bool,
    /// The buyer, once known (from the reservation or the debit).
    account_id: Option<AccountId>,
}

impl InFlight {
    /// Whether this order needs its product's writer now.
    fn needs_writer(&self, now: DateTime<Utc>) -> bool {
        let stuck = now >= self.since + RECOVERY_GRACE;
        let expired = self
            .expires_at
            .is_some_and(|expires_at| now >= expires_at + RECOVERY_GRACE);
        if self.released {
            // Released but paid: the refund is owed.
            self.debited && stuck
        } else {
            stuck || expired
        }
    }
}

/// A payout run planned whose payouts the index has not all seen.
#[derive(Debug, Clone)]
struct PlannedRun {
    /// When the plan was recorded.
    since: DateTime<Utc>,
    /// Payouts the plan makes.
    expected: u32,
    /// Payouts seen created.
    seen: u32,
}

/// The orders still in flight and the payout runs not yet complete,
/// followed from the log.
#[derive(Debug, Default)]
pub struct RecoveryIndex {
    position: i64,
    orders: HashMap<OrderId, InFlight>,
    runs: HashMap<(ProductId, String), PlannedRun>,
}

impl RecoveryIndex {
    /// An index at the start of the log.
    pub fn new() -> RecoveryIndex {
        RecoveryIndex::default()
    }

    /// Orders in flight (pending, or released and not yet refunded).
    pub fn in_flight(&self) -> usize {
        self.orders.len()
    }

    /// Payout runs planned whose payouts have not all been seen.
    pub fn runs_incomplete(&self) -> usize {
        self.runs.len()
    }

    /// Reads the log from where it stopped.
    pub async fn catch_up(&mut self, store: &dyn EventStore) -> Result<(), StoreError> {
        loop {
            let page = store.read_all(self.position, RECOVERY_PAGE).await?;
            let Some(last) = page.last() else {
                return Ok(());
            };
            self.position = last.position;
            for recorded in &page {
                self.add(recorded)?;
            }
        }
    }

    fn add(&mut self, recorded: &RecordedEvent) -> Result<(), StoreError> {
        let corrupt = |error: codec::DecodeError| StoreError::Corrupt {
            position: error.position,
            reason: error.to_string(),
        };
        if recorded.stream_id.starts_with("payout-") {
            if recorded.event_type != "payout_scheduled" {
                return Ok(());
            }
            if let PayoutEvent::PayoutScheduled {
                product_id, period, ..
            } = codec::decode::<PayoutEvent>(recorded).map_err(corrupt)?
            {
                let key = (product_id, period);
                if let Some(run) = self.runs.get_mut(&key) {
                    run.seen += 1;
                    if run.seen >= run.expected {
                        self.runs.remove(&key);
                    }
                }
            }
            return Ok(());
        }
        if let Some(id) = recorded.stream_id.strip_prefix("product-") {
            if recorded.event_type == "payout_run_planned" {
                let Ok(product_id) = ProductId::parse(id) else {
                    return Ok(());
                };
                if let ProductEvent::PayoutRunPlanned {
                    period, payouts, ..
                } = codec::decode::<ProductEvent>(recorded).map_err(corrupt)?
                    && payouts > 0
                {
                    let run = PlannedRun {
                        since: recorded.recorded_at,
                        expected: payouts,
                        seen: 0,
                    };
                    self.runs.insert((product_id, period), run);
                }
                return Ok(());
            }
            if !matches!(
                recorded.event_type.as_str(),
                "quota_reserved" | "reservation_confirmed" | "reservation_released"
            ) {
                return Ok(());
            }
            let Ok(product_id) = ProductId::parse(id) else {
                return Ok(());
            };
            match codec::decode::<ProductEvent>(recorded).map_err(corrupt)? {
                ProductEvent::QuotaReserved {
                    order_id,
                    account_id,
                    expires_at,
                    ..
                } => {
                    self.orders.insert(
                        order_id,
                        InFlight {
                            product_id,
                            since: recorded.recorded_at,
                            expires_at: Some(expires_at),
                            debited: false,
                            released: false,
                            account_id: Some(account_id),
                        },
                    );
                }
                ProductEvent::ReservationConfirmed { order_id, .. } => {
                    self.orders.remove(&order_id);
                }
                ProductEvent::ReservationReleased { order_id, .. } => {
                    match self.orders.get_mut(&order_id) {
                        Some(order) if order.debited => {
                            order.released = true;
                            order.since = recorded.recorded_at;
                        }
                        _ => {
                            self.orders.remove(&order_id);
                        }
                    }
                }
                _ => {}
            }
        } else if recorded.stream_id.starts_with("account-") {
            if !matches!(
                recorded.event_type.as_str(),
                "purchase_debited" | "purchase_refunded"
            ) {
                return Ok(());
            }
            match codec::decode::<AccountEvent>(recorded).map_err(corrupt)? {
                AccountEvent::PurchaseDebited {
                    order_id,
                    product_id,
                    account_id,
                    ..
                } => match self.orders.get_mut(&order_id) {
                    Some(order) => {
                        order.debited = true;
                        order.account_id = Some(account_id);
                    }
                    // Paid after its reservation ended (or a reservation in
                    // a log this index started after): the writer's first
                    // load checks its released orders for money taken.
                    None => {
                        self.orders.insert(
                            order_id,
                            InFlight {
                                product_id,
                                since: recorded.recorded_at,
                                expires_at: None,
                                debited: true,
                                released: true,
                                account_id: Some(account_id),
                            },
                        );
                    }
                },
                AccountEvent::PurchaseRefunded { order_id, .. } => {
                    self.orders.remove(&order_id);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Products with an order that needs its writer at `now`.
    pub fn products_to_recover(&self, now: DateTime<Utc>) -> BTreeSet<ProductId> {
        self.orders
            .values()
            .filter(|order| order.needs_writer(now))
            .map(|order| order.product_id.clone())
            .collect()
    }

    /// Released orders whose buyer was debited and not refunded a grace
    /// period ago, by product (the orders and their buyers).
    fn stray_debits(&self, now: DateTime<Utc>) -> HashMap<ProductId, Vec<(OrderId, AccountId)>> {
        let mut strays: HashMap<ProductId, Vec<(OrderId, AccountId)>> = HashMap::new();
        for (order_id, order) in &self.orders {
            if order.released
                && order.debited
                && order.needs_writer(now)
                && let Some(account_id) = order.account_id
            {
                strays
                    .entry(order.product_id.clone())
                    .or_default()
                    .push((*order_id, account_id));
            }
        }
        strays
    }

    /// Payout runs planned at least a grace period before `now` whose
    /// payouts have not all been seen.
    fn runs_due(&self, now: DateTime<Utc>) -> Vec<(ProductId, String)> {
        self.runs
            .iter()
            .filter(|(_, run)| now >= run.since + RECOVERY_GRACE)
            .map(|(key, _)| key.clone())
            .collect()
    }
}

/// What one sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Products whose writer the sweep started.
    pub started: Vec<ProductId>,
    /// Payouts created for runs planned and left incomplete.
    pub payouts_created: usize,
}

/// One sweep: catch up with the log, start the writer of every product that
/// needs one, and complete the payout runs left incomplete.
pub async fn sweep(
    index: &mut RecoveryIndex,
    store: &dyn EventStore,
    engine: &Engine,
) -> Result<SweepReport, StoreError> {
    index.catch_up(store).await?;
    let mut report = SweepReport::default();
    let now = engine.now();
    let strays = index.stray_debits(now);
    for product_id in index.products_to_recover(now) {
        match strays.get(&product_id) {
            // Refunds owed: a writer running here (which would not know of
            // a debit another node made after it released the order) is
            // told; otherwise one is started, which checks as it loads.
            Some(orders) => {
                if engine.refund_strays(&product_id, orders.clone()) {
                    tracing::info!(product = %product_id, orders = orders.len(), "recovery: refunds owed for released orders handed to the product's writer");
                    report.started.push(product_id);
                }
            }
            None => {
                if engine.recover(&product_id) {
                    tracing::info!(product = %product_id, "recovery: started the writer of a product with orders left in flight");
                    report.started.push(product_id);
                }
            }
        }
    }
    for key in index.runs_due(now) {
        let (product_id, period) = &key;
        match crate::payouts::complete_run(store, product_id, period).await {
            Ok(completed) => {
                if completed.scheduled > 0 {
                    tracing::warn!(
                        product = %product_id,
                        %period,
                        created = completed.scheduled,
                        "recovery: created the payouts of a run planned and left incomplete"
                    );
                }
                report.payouts_created += completed.scheduled;
                index.runs.remove(&key);
            }
            Err(crate::payouts::ScheduleError::Store(error)) => return Err(error),
            Err(error) => {
                tracing::error!(product = %product_id, %period, %error, "recovery: a planned payout run cannot be completed");
                index.runs.remove(&key);
            }
        }
    }
    Ok(report)
}

/// Sweeps at once and then every `period` until `stop` turns true.
pub async fn run(
    store: Arc<dyn EventStore>,
    engine: Engine,
    period: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut index = RecoveryIndex::new();
    while !*stop.borrow() {
        if let Err(error) = sweep(&mut index, store.as_ref(), &engine).await {
            tracing::warn!(%error, "recovery sweep failed; trying again");
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.changed() => {}
        }
    }
}
