//! Recovery without traffic: a product's writer repairs what a crash left
//! (pending reservations, money taken for released orders) when it loads,
//! but a writer starts only when a request touches its product. The sweep
//! follows the log, keeps every order still in flight, and starts the writer
//! of any product with a reservation pending past a grace period (its
//! payment was taken and not confirmed, or it is past its expiry) or a
//! refund owed, whichever node was selling it.
//!
//! Several nodes may sweep at once: the writers they start are fenced by the
//! product stream's expected version, and recovery is idempotent per order.

use crate::engine::Engine;
use chrono::{DateTime, Utc};
use domain::account::AccountEvent;
use domain::product::ProductEvent;
use domain::{OrderId, ProductId};
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

/// The orders still in flight, followed from the log.
#[derive(Debug, Default)]
pub struct RecoveryIndex {
    position: i64,
    orders: HashMap<OrderId, InFlight>,
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
        if let Some(id) = recorded.stream_id.strip_prefix("product-") {
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
                    ..
                } => match self.orders.get_mut(&order_id) {
                    Some(order) => order.debited = true,
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
}

/// One sweep: catch up with the log, then start the writer of every product
/// that needs one. Returns the products whose writer this sweep started.
pub async fn sweep(
    index: &mut RecoveryIndex,
    store: &dyn EventStore,
    engine: &Engine,
) -> Result<Vec<ProductId>, StoreError> {
    index.catch_up(store).await?;
    let mut started = Vec::new();
    for product_id in index.products_to_recover(engine.now()) {
        if engine.recover(&product_id) {
            tracing::info!(product = %product_id, "recovery: started the writer of a product with orders left in flight");
            started.push(product_id);
        }
    }
    Ok(started)
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
