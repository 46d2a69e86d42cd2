//! The live sale progress: one task reads the read models a few times a
//! second and publishes the figures; every `/v1/progress/stream` client
//! watches that one copy, so a thousand dashboards cost one query.

use super::model::ProgressResponse;
use axum::response::sse::Event;
use engine::Engine;
use futures::Stream;
use projections::{ReadDb, Statuses};
use serde::Serialize;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// How often the figures are read.
pub const FEED_PERIOD: Duration = Duration::from_millis(250);

/// What every dashboard sees.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Snapshot {
    /// Every product's progress.
    pub products: Vec<ProgressResponse>,
    /// Stream-level figures.
    pub stats: Stats,
}

/// Figures beside the products.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    /// The largest projection lag, in events.
    pub projection_lag: i64,
    /// Purchases confirmed by this node since it started.
    pub purchases_confirmed: u64,
    /// Purchases refused by this node since it started.
    pub purchases_refused: u64,
}

/// Bounds on the progress streams.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Streams open at once in all.
    pub total_max: usize,
    /// Streams open at once from one client address.
    pub per_address_max: u32,
    /// How long one stream lasts; the dashboard then reconnects by itself.
    pub lifetime: Duration,
}

/// The published figures, and the switch that ends every stream.
#[derive(Clone)]
pub struct ProgressFeed {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    closing: watch::Sender<bool>,
    task: Arc<tokio::task::AbortHandle>,
    limits: StreamLimits,
    open: Arc<Mutex<OpenStreams>>,
}

/// Streams open now, in all and per address (only addresses with a stream
/// open are kept, so the map is bounded by the total).
#[derive(Debug, Default)]
struct OpenStreams {
    total: usize,
    per_address: HashMap<String, u32>,
}

/// One open stream's place, given back when the stream ends.
pub struct StreamSlot {
    open: Arc<Mutex<OpenStreams>>,
    address: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("BUG: open streams poisoned");
        open.total -= 1;
        if let Some(count) = open.per_address.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.per_address.remove(&self.address);
            }
        }
    }
}

impl ProgressFeed {
    /// Starts reading the figures; streams are bounded by `limits`.
    pub fn start(
        db: ReadDb,
        statuses: Arc<Statuses>,
        engine: Engine,
        limits: StreamLimits,
    ) -> ProgressFeed {
        let (publish, snapshot) = watch::channel(Arc::new(Snapshot::default()));
        let (closing, _) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(FEED_PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let products = match projections::query::all_progress(&db).await {
                    Ok(products) => products.into_iter().map(ProgressResponse::from).collect(),
                    Err(error) => {
                        tracing::debug!(%error, "progress feed could not read the read models");
                        continue;
                    }
                };
                let engine_stats = engine.stats();
                let next = Snapshot {
                    products,
                    stats: Stats {
                        projection_lag: statuses.lag_max(),
                        purchases_confirmed: engine_stats.purchases_confirmed,
                        purchases_refused: engine_stats.purchases_refused,
                    },
                };
                publish.send_if_modified(|current| {
                    let changed = **current != next;
                    if changed {
                        *current = Arc::new(next.clone());
                    }
                    changed
                });
            }
        })
        .abort_handle();
        ProgressFeed {
            snapshot,
            closing,
            task: Arc::new(task),
            limits,
            open: Arc::new(Mutex::new(OpenStreams::default())),
        }
    }

    /// A place for one more stream from `address`, unless the caps are
    /// reached.
    pub fn admit(&self, address: &str) -> Option<StreamSlot> {
        let mut open = self.open.lock().expect("BUG: open streams poisoned");
        let from_address = open.per_address.get(address).copied().unwrap_or(0);
        if open.total >= self.limits.total_max || from_address >= self.limits.per_address_max {
            metrics::counter!("ledger_streams_refused_total").increment(1);
            return None;
        }
        open.total += 1;
        *open.per_address.entry(address.to_owned()).or_insert(0) += 1;
        Some(StreamSlot {
            open: self.open.clone(),
            address: address.to_owned(),
        })
    }

    /// Streams open now.
    pub fn open_streams(&self) -> usize {
        self.open.lock().expect("BUG: open streams poisoned").total
    }

    /// Ends every open stream (at shutdown, so draining does not wait on
    /// dashboards that never hang up).
    pub fn close_streams(&self) {
        self.closing.send_replace(true);
    }

    /// Stops reading.
    pub fn stop(&self) {
        self.close_streams();
        self.task.abort();
    }

    /// A client's stream: every product's progress at once, then each
    /// product whose figures change (event `progress`), and the stream-level
    /// figures when they change (event `stats`).
    /// It holds its `slot` while open and ends after the stream lifetime.
    pub fn events(
        &self,
        slot: StreamSlot,
    ) -> impl Stream<Item = Result<Event, Infallible>> + Send + use<> {
        let mut snapshot = self.snapshot.clone();
        snapshot.mark_changed();
        let closing = self.closing.subscribe();
        let sent: HashMap<String, ProgressResponse> = HashMap::new();
        let ends_at = tokio::time::Instant::now() + self.limits.lifetime;
        let state = (snapshot, closing, sent, None::<Stats>, Vec::<Event>::new());
        futures::stream::unfold(
            (state, slot),
            move |((mut snapshot, mut closing, mut sent, mut stats, mut queue), slot)| async move {
                loop {
                    if let Some(event) = queue.pop() {
                        let state = (snapshot, closing, sent, stats, queue);
                        return Some((Ok(event), (state, slot)));
                    }
                    if *closing.borrow() {
                        return None;
                    }
                    tokio::select! {
                        changed = snapshot.changed() => if changed.is_err() { return None },
                        _ = closing.changed() => return None,
                        () = tokio::time::sleep_until(ends_at) => return None,
                    }
                    let current = snapshot.borrow_and_update().clone();
                    for product in &current.products {
                        if sent.get(&product.product_id) != Some(product) {
                            sent.insert(product.product_id.clone(), product.clone());
                            queue.push(json_event("progress", product));
                        }
                    }
                    if stats.as_ref() != Some(&current.stats) {
                        stats = Some(current.stats.clone());
                        queue.push(json_event("stats", &current.stats));
                    }
                    queue.reverse();
                }
            },
        )
    }
}

fn json_event<T: Serialize>(name: &str, value: &T) -> Event {
    Event::default()
        .event(name)
        .json_data(value)
        .expect("BUG: progress figures serialize")
}
